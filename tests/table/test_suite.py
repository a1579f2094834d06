"""The table tool's rows: the --rows check names the valid rows, and --seeds is checked and gives
each row's run its seed and folder."""
import os
import subprocess
import sys

import pytest
from conftest import REPO

from adaptive_l2.table.suite import select_rows, suite_rows


def test_unknown_row_name_is_refused_with_the_valid_names():
    rows = suite_rows("paper")
    with pytest.raises(ValueError) as error:
        select_rows(rows, ["Market1501", "adaptive_l2_R5O"])
    message = str(error.value)
    assert "'adaptive_l2_R5O'" in message and "'Market1501'" not in message.split("Valid")[0]
    assert "adaptive_l2_R152_rerank" in message and "DukeMTMC" in message
    assert len(select_rows(rows, ["Market1501", "DukeMTMC/adaptive_l2_R50"])) == 6

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    tool = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce_table.py"),
                           "--suite", "paper", "--rows", "Market1501,bogus", "--dry-run",
                           "--no-measure"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert tool.returncode == 2 and "unknown name(s) ['bogus']" in tool.stderr
    assert "adaptive_l2.cli.train" not in tool.stdout


def test_seeds_are_checked_and_appear_in_the_commands(tmp_path, capsys):
    from adaptive_l2.cli.table import main

    with pytest.raises(SystemExit):
        main(["--suite", "synthetic", "--seeds", "0,x"])
    assert "--seeds must list distinct integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--suite", "study", "--seeds", "1,1"])
    jobs = tmp_path / "jobs.txt"
    assert main(["--suite", "study", "--seeds", "3,4", "--output-root", str(tmp_path),
                 "--emit-commands", str(jobs)]) == 0
    commands = jobs.read_text().splitlines()
    assert len(commands) == 8
    assert commands[0].endswith(f"OUTPUT_DIR {tmp_path}/Study/none/seed3 SEED 3")
    assert commands[-1].endswith(f"OUTPUT_DIR {tmp_path}/Study/adaptive_decoupled/seed4 SEED 4")
