"""The benchmarks' runners: the GPU check runs every part (tiny, on a CPU here), records a
failing or over-budget part and goes on; run_all runs each benchmark and reports failures."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO


def _script(name, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def test_gpu_check_runs_every_part_on_cpu_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    start = time.perf_counter()
    result = _script("gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out),
                     "--work-dir", str(tmp_path / "work"))
    report = json.loads(out.read_text())
    assert result.returncode == 0, (report.get("failed"), result.stdout[-4000:])
    assert time.perf_counter() - start < 150
    parts = report["parts"]
    assert list(parts) == ["data", "train_adaptive_l2", "train_sgp", "train_at", "step_ratios",
                           "amp_penalty", "rerank", "ddp_nccl"]
    assert all(p["ok"] and all(p.get("checks", {}).values()) for p in parts.values())
    assert parts["train_adaptive_l2"]["factor_logs"] == 3  # before training and after each epoch
    assert parts["train_adaptive_l2"]["factors_changed"] > 0
    assert all(math.isfinite(parts["train_at"][k]) for k in ("clean_loss", "adversarial_loss"))
    ratios = parts["step_ratios"]
    assert set(ratios["step_s"]) == {"none", "adaptive_l2", "sgp"} and ratios["ratio_l2_on_off"] > 0
    assert parts["ddp_nccl"]["backend"] == "gloo" and parts["ddp_nccl"]["tensors_changed"] > 0
    assert parts["amp_penalty"]["fp32"] > 0 and parts["rerank"]["checks"]["same_ranks"]
    assert "CPU" in report["machine"] and report["failed"] == []


def test_gpu_check_records_a_failing_part_and_runs_the_rest(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    out = tmp_path / "gpu_check.json"
    result = _script("gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out),
                     "--parts", "data,rerank", "--work-dir", str(not_a_folder), timeout=120)
    report = json.loads(out.read_text())
    assert result.returncode == 1 and report["failed"] == ["data"]
    assert "NotADirectoryError" in report["parts"]["data"]["error"]
    assert report["parts"]["rerank"]["ok"] and report["parts"]["rerank"]["checks"]["same_ranks"]


def test_gpu_check_part_over_its_budget_is_stopped_and_recorded():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import gpu_check

    report = {"parts": {}}

    def slow(record):
        record["started"] = True
        time.sleep(5)

    start = time.perf_counter()
    gpu_check.run_part("slow", 0.3, slow, report, deadline=time.monotonic() + 60)
    assert time.perf_counter() - start < 2
    assert report["parts"]["slow"]["started"] and not report["parts"]["slow"]["ok"]
    assert "over its budget of 0 s" in report["parts"]["slow"]["error"]
    gpu_check.run_part("late", 30, slow, report, deadline=time.monotonic())
    assert "skipped" in report["parts"]["late"]["error"] and "started" not in report["parts"]["late"]


def test_run_all_runs_each_benchmark_and_reports_failures(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import run_all

    (tmp_path / "bench_good.py").write_text("import sys\nprint('figure 1.5 s', sys.argv[1:])\n")
    (tmp_path / "bench_bad.py").write_text("raise SystemExit(4)\n")
    (tmp_path / "gpu_check.py").write_text("raise SystemExit('must not run')\n")
    assert run_all.main(["--dir", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "bench_bad.py" in printed and "FAILED (exit 4)" in printed
    assert "bench_good.py        ok" in printed and "must not run" not in printed
    assert run_all.main(["--dir", str(tmp_path), "--only", "bench_good.py"]) == 0
    with pytest.raises(SystemExit):
        run_all.main(["--dir", str(tmp_path), "--only", "bench_nope.py"])
    benchmarks = ["bench_keras_adam.py", "bench_penalty.py", "bench_rerank.py", "bench_sgp.py"]
    assert [os.path.basename(s) for s in run_all.benchmark_scripts()] == benchmarks
    assert set(run_all.SHORT_ARGS) == set(benchmarks)
