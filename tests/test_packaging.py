"""The package installs: its configs are package data found through the package, the tools are
console entry points, and runs write under the current folder, not where the package lives."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

import adaptive_l2
from adaptive_l2.config import config_file_path, load_config, shipped_configs_dir
from adaptive_l2.table.runner import train_command
from adaptive_l2.table.suite import output_dir, suite_rows

PACKAGE = os.path.dirname(os.path.abspath(adaptive_l2.__file__))
ENTRY_POINTS = {"adaptive-l2-train": "adaptive_l2.cli.train:main",
                "adaptive-l2-table": "adaptive_l2.cli.table:main",
                "adaptive-l2-attack": "adaptive_l2.cli.attack:main",
                "adaptive-l2-plot": "adaptive_l2.cli.plot:main",
                "adaptive-l2-tune": "adaptive_l2.cli.tune:main"}


def test_configs_are_found_through_the_package_from_any_folder(tmp_path, monkeypatch):
    assert os.path.realpath(shipped_configs_dir()) == os.path.join(os.path.realpath(PACKAGE),
                                                                   "configs")
    rows = suite_rows("paper", with_sgp=True) + suite_rows("synthetic", with_sgp=True)
    assert len(rows) == 30 and all(os.path.isfile(r.config) for r in rows)
    assert all(os.path.realpath(r.config).startswith(os.path.realpath(PACKAGE)) for r in rows)
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped copy is used
    for name in ("configs/Synthetic/adaptive_l2.yml", "Synthetic/adaptive_l2.yml"):
        assert config_file_path(name) == os.path.join(shipped_configs_dir(), "Synthetic",
                                                      "adaptive_l2.yml")
    assert load_config("configs/Synthetic/adaptive_l2.yml").OUTPUT_DIR == \
        "logs/synthetic/Synthetic/adaptive_l2"
    (tmp_path / "configs" / "Synthetic").mkdir(parents=True)
    own = tmp_path / "configs" / "Synthetic" / "adaptive_l2.yml"
    own.write_text("_BASE_: " + os.path.join(shipped_configs_dir(), "Synthetic", "baseline.yml")
                   + "\nSOLVER:\n  MAX_EPOCH: 3\n")
    assert config_file_path("configs/Synthetic/adaptive_l2.yml") == "configs/Synthetic/adaptive_l2.yml"
    assert load_config("configs/Synthetic/adaptive_l2.yml").SOLVER.MAX_EPOCH == 3  # yours wins
    with pytest.raises(FileNotFoundError, match="'configs/Synthetic/nope.yml' does not exist"):
        config_file_path("configs/Synthetic/nope.yml")


def test_table_paths_are_taken_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    row = suite_rows("synthetic")[0]
    assert output_dir(row, "logs/synthetic") == os.path.join("logs/synthetic", "Synthetic",
                                                             "baseline")
    command = train_command(row, "logs/synthetic", [], 1, "launch", resume=False)
    assert command[1:3] == ["-m", "adaptive_l2.cli.train"]
    assert command[command.index("OUTPUT_DIR") + 1] == "logs/synthetic/Synthetic/baseline"
    assert os.path.isabs(command[command.index("--config-file") + 1])  # the package's copy


def _build_wheel(tmp_path):
    """`pip wheel .` of a copy of the source (seconds; no network, no build isolation)."""
    source = tmp_path / "source"
    shutil.copytree(os.path.join(REPO, "adaptive_l2"), source / "adaptive_l2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(os.path.join(REPO, "setup.py"), source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "wheel"), str(source)], check=True,
                   capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "wheel").iterdir()
    return wheel


def test_wheel_declares_entry_points_and_ships_configs_and_the_table_tool_runs_from_it(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    shipped = {n for n in names if n.endswith(".yml")}
    in_clone = {os.path.relpath(os.path.join(d, f), REPO).replace("configs", "adaptive_l2/configs", 1)
                for d, _, files in os.walk(os.path.join(REPO, "configs"), followlinks=True)
                for f in files if f.endswith(".yml")}
    assert shipped == in_clone and len(shipped) == 38  # 33 + configs/Study (5)
    declared = dict(line.replace(" ", "").split("=") for line in entry_points.decode().splitlines()
                    if "=" in line)
    assert declared == ENTRY_POINTS

    # installed non-editable (unpacked, as pip does) and run from an unrelated folder
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "adaptive_l2.cli.table", "--suite", "paper",
                             "--dry-run", "--no-measure"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if "adaptive_l2.cli.train" in line]
    assert len(commands) == 15
    assert all(str(site) in c and "OUTPUT_DIR logs/paper/" in c for c in commands)
    collect = subprocess.run([sys.executable, "-m", "adaptive_l2.cli.table", "--suite", "synthetic",
                              "--collect"], cwd=elsewhere, env=env, capture_output=True, text=True,
                             timeout=120)
    assert collect.returncode == 0, collect.stderr[-3000:]
    assert (elsewhere / "logs" / "synthetic" / "results.md").is_file()  # under the current folder
    assert not (site / "logs").exists() and not (site / "adaptive_l2" / "logs").exists()
