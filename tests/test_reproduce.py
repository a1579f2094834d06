"""The table tool's scheduling (rows side by side on GPU slots), its --rows check and its cost
estimate (median of timed steps of the trainer's own step)."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from adaptive_l2.table import report as reproduce
from adaptive_l2.config import load_config
from adaptive_l2.table.report import (gpu_slots, median_step_seconds, run_suite, select_rows,
                                   suite_rows)
from adaptive_l2.trainer import Trainer

# Stands in for the train tool (python -m adaptive_l2.cli.train): records its environment and lifetime, then finishes the row
# (final_results.json, model_final.pth) or fails (exit 3) when its OUTPUT_DIR is in FAIL_ROWS.
FAKE_TRAIN_NET = r'''
import json, os, sys, time
args = sys.argv[1:]
out = args[len(args) - 1 - args[::-1].index("OUTPUT_DIR") + 1]
device = args[len(args) - 1 - args[::-1].index("MODEL.DEVICE") + 1]
start = time.time()
time.sleep(float(os.environ["SLEEP_LONG"]) if "R152" in out and "rerank" not in out
           else float(os.environ["SLEEP_SHORT"]))
fail = out in os.environ.get("FAIL_ROWS", "").split(";")
os.makedirs(out, exist_ok=True)
record = {"out": out, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device,
          "eval_only": "--eval-only" in args, "start": start, "end": time.time(), "failed": fail}
with open(os.path.join(os.environ["RECORDS"], str(time.time_ns()) + ".json"), "w") as handle:
    json.dump(record, handle)
if fail:
    sys.exit(3)
open(os.path.join(out, "model_final.pth"), "w").close()
with open(os.path.join(out, "final_results.json"), "w") as handle:
    json.dump({"mAP": 50.0, "Rank-1": 60.0}, handle)
'''

ROWS = ["Market1501/conventional_l2_R50", "Market1501/adaptive_l2_R50",
        "Market1501/adaptive_l2_R152", "Market1501/adaptive_l2_R152_rerank",
        "DukeMTMC/adaptive_l2_R50"]


def _fake_launcher(script):
    def start(command, **kwargs):
        assert command[1:3] == ["-m", "adaptive_l2.cli.train"]
        return subprocess.Popen([sys.executable, script, *command[3:]], **kwargs)
    return start


def _records(directory):
    records = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as handle:
            records.append(json.load(handle))
    return {"/".join(r["out"].split(os.sep)[-2:]): r for r in records}


def test_rows_run_side_by_side_one_gpu_each_dagger_after_r152_and_failure_reported(
        tmp_path, monkeypatch):
    script = tmp_path / "fake_train_net.py"
    script.write_text(FAKE_TRAIN_NET)
    records = tmp_path / "records"
    records.mkdir()
    root = str(tmp_path / "runs")
    monkeypatch.setenv("RECORDS", str(records))
    monkeypatch.setenv("SLEEP_SHORT", "0.8")
    monkeypatch.setenv("SLEEP_LONG", "3.0")
    monkeypatch.setenv("FAIL_ROWS", os.path.join(root, "DukeMTMC", "adaptive_l2_R50"))
    rows = select_rows(suite_rows("paper"), ROWS)
    messages = []
    with pytest.raises(RuntimeError, match="DukeMTMC/adaptive_l2_R50: exit 3"):
        run_suite(rows, root, ["SOLVER.MAX_EPOCH", "1"], 1, "launch", log=messages.append,
                  gpus="0,1", start_process=_fake_launcher(str(script)), poll_seconds=0.05)
    ran = _records(records)
    assert sorted(ran) == sorted(ROWS)  # the failure did not stop the rows after it
    assert all(r["device"] == "cuda" and r["cuda"] in ("0", "1") for r in ran.values())
    pairs = [(a, b) for a in ran for b in ran if a < b
             and ran[a]["start"] < ran[b]["end"] and ran[b]["start"] < ran[a]["end"]]
    assert len(pairs) >= 2  # really side by side ...
    assert all(ran[a]["cuda"] != ran[b]["cuda"] for a, b in pairs)  # ... each on its own GPU
    r152, dagger = ran["Market1501/adaptive_l2_R152"], ran["Market1501/adaptive_l2_R152_rerank"]
    failed = ran["DukeMTMC/adaptive_l2_R50"]
    assert dagger["eval_only"] and not r152["eval_only"]
    # a GPU was free from the failure on, yet the dagger row waited for its R152 model
    assert failed["end"] < r152["end"] - 0.5
    assert dagger["start"] >= r152["end"]
    assert any("DukeMTMC/adaptive_l2_R50: FAILED (exit 3" in m for m in messages)
    assert os.path.isfile(os.path.join(root, "Market1501", "adaptive_l2_R50", "console.txt"))

    # resumable: finished rows are kept, only the failed one runs again
    monkeypatch.setenv("FAIL_ROWS", "")
    for name in os.listdir(records):
        os.remove(records / name)
    messages.clear()
    ran_again = run_suite(rows, root, [], 1, "launch", log=messages.append, gpus="0,1",
                          start_process=_fake_launcher(str(script)), poll_seconds=0.05)
    assert ran_again == ["DukeMTMC/adaptive_l2_R50"]
    assert sum("finished before, kept" in m for m in messages) == 4


def test_dagger_row_without_its_model_fails_alone(tmp_path, monkeypatch):
    script = tmp_path / "fake_train_net.py"
    script.write_text(FAKE_TRAIN_NET)
    (tmp_path / "records").mkdir()
    monkeypatch.setenv("RECORDS", str(tmp_path / "records"))
    monkeypatch.setenv("SLEEP_SHORT", "0.1")
    monkeypatch.setenv("SLEEP_LONG", "0.1")
    rows = select_rows(suite_rows("paper"), ["Market1501/adaptive_l2_R152_rerank",
                                             "Market1501/adaptive_l2_R50"])
    with pytest.raises(RuntimeError, match="adaptive_l2_R152_rerank: evaluates .* run that row"):
        run_suite(rows, str(tmp_path / "runs"), [], 1, "launch", log=lambda m: None, gpus="3",
                  start_process=_fake_launcher(str(script)), poll_seconds=0.05)
    assert list(_records(tmp_path / "records")) == ["Market1501/adaptive_l2_R50"]


def test_gpu_slots_group_gpus_per_row_and_refuse_bad_lists():
    assert gpu_slots("0,1,2,3", 1) == ["0", "1", "2", "3"]
    assert gpu_slots("4,5,6,7", 2) == ["4,5", "6,7"]
    for bad, per_row in (("0,0", 1), ("0,x", 1), ("0,1,2", 2), ("", 1)):
        with pytest.raises(ValueError, match="--gpus"):
            gpu_slots(bad, per_row)


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


def test_median_of_timed_steps_skips_warmup_and_outliers():
    durations = iter([50.0, 40.0, 3.0, 1.0, 90.0, 2.0, 4.0, 80.0, 2.5])  # 2 warm-up, 7 timed
    now = [0.0]
    calls = []

    def step():
        calls.append(1)
        now[0] += next(durations)

    median = median_step_seconds(step, warmup=2, steps=7, clock=lambda: now[0])
    assert median == 3.0  # median of 3, 1, 90, 2, 4, 80, 2.5; the fastest (1) would say 1.0
    assert len(calls) == 9
    with pytest.raises(ValueError, match="steps >= 1"):
        median_step_seconds(step, warmup=0, steps=0)


def test_cost_is_timed_on_the_trainers_own_step(monkeypatch):
    """The dry run's step is Trainer.build_train_step's (AT included), and it trains."""
    tiny = ["MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64,32]", "MODEL.HEADS.NUM_CLASSES", "8",
            "MODEL.REG.AT.ENABLED", "True"]
    cfg = load_config(os.path.join(REPO, "configs", "Synthetic", "baseline.yml"), tiny)
    torch.manual_seed(0)
    step = reproduce.fixed_batch_train_step(cfg, 4)
    assert type(step) is Trainer.train_step_class and step.adversarial is not None
    before = [p.detach().clone() for p in step.model.parameters()]
    seconds = reproduce.time_train_step(step, "cpu", warmup=0, steps=1)
    assert 0 < seconds < 60
    assert all(not torch.equal(a, p) for a, p in zip(before, step.model.parameters())
               if p.requires_grad and p.dim() > 1)

    timed = []
    monkeypatch.setattr(reproduce, "time_train_step",
                        lambda step, device, warmup, steps: timed.append((step, warmup, steps)) or 2.0)
    row = reproduce.Row("Synthetic", "at", os.path.join(REPO, "configs", "Synthetic", "at.yml"))
    per_iteration = reproduce.measure_seconds_per_iteration(row, tiny[2:4], "cpu", 2, 5)
    assert per_iteration == 2.0 / 4 * cfg.SOLVER.IMS_PER_BATCH  # probe batch 4 on a CPU, scaled
    assert timed[0][1:] == (2, 5) and timed[0][0].adversarial is not None


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


# Stands in for a training run: 300 lines of chatter, and a metrics.json record per "iteration".
CHATTY_TRAIN = r'''
import json, os, sys, time
args = sys.argv[1:]
out = args[len(args) - 1 - args[::-1].index("OUTPUT_DIR") + 1]
os.makedirs(out, exist_ok=True)
for line in range(300):
    print("config and log line", line)
with open(os.path.join(out, "metrics.json"), "a") as handle:
    for iteration in range(6):
        handle.write(json.dumps({"iteration": iteration, "total_loss": 1.0}) + "\n")
        handle.flush()
        time.sleep(0.15)
with open(os.path.join(out, "final_results.json"), "w") as handle:
    json.dump({"mAP": 50.0, "Rank-1": 60.0}, handle)
'''


def test_rows_print_one_line_each_with_eta_and_their_output_goes_to_their_folder(tmp_path):
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY_TRAIN)
    root = str(tmp_path / "runs")
    rows = select_rows(suite_rows("synthetic"), ["baseline", "adaptive_l2"])
    messages, progress = [], []
    ran = run_suite(rows, root, ["SOLVER.MAX_EPOCH", "2", "SOLVER.ITERS_PER_EPOCH", "3"], 1, "launch",
                    log=messages.append, start_process=_fake_launcher(str(script)),
                    poll_seconds=0.05, progress=progress.append)
    assert ran == ["Synthetic/baseline", "Synthetic/adaptive_l2"]
    assert len(messages) == 4  # a start line and an end line per row, nothing of the children's
    assert messages[0].startswith("[reproduce] Synthetic/baseline: training (6 iterations)")
    assert "ETA" not in messages[0] and "ETA ~" in messages[2]  # the first row sets the pace
    assert messages[1].startswith("[reproduce] Synthetic/baseline: done in")
    assert any("Synthetic/adaptive_l2: it 6/6, ETA 0m00s" in p for p in progress)
    console = open(os.path.join(root, "Synthetic", "baseline", "console.txt")).read()
    assert console.startswith("$ ") and "-m adaptive_l2.cli.train" in console.splitlines()[0]
    assert "config and log line 299" in console


# Stands in for a training run of --seeds: the row's mAP / Rank-1 depend on its row and SEED.
SEEDED_TRAIN = r'''
import json, os, sys
args = sys.argv[1:]
def last(key):
    return args[len(args) - 1 - args[::-1].index(key) + 1]
out, seed = last("OUTPUT_DIR"), int(last("SEED"))
os.makedirs(out, exist_ok=True)
with open(os.path.join(os.environ["RECORDS"], out.replace(os.sep, "_")), "w") as handle:
    handle.write(str(seed))
gain = 0.0 if "baseline" in out else 1.0 + 0.5 * (seed % 2)
with open(os.path.join(out, "eval_history.jsonl"), "w") as handle:
    handle.write(json.dumps({"epoch": 2, "mAP": 50.0 + seed + gain, "Rank-1": 60.0 - seed}) + "\n")
with open(os.path.join(out, "final_results.json"), "w") as handle:
    json.dump({"mAP": 50.0 + seed + gain, "Rank-1": 60.0 - seed}, handle)
'''


def test_seeds_run_each_row_per_seed_once_and_report_paired_intervals(tmp_path, monkeypatch):
    script = tmp_path / "seeded.py"
    script.write_text(SEEDED_TRAIN)
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("RECORDS", str(records))
    root = str(tmp_path / "runs")
    rows = select_rows(suite_rows("synthetic"), ["baseline", "adaptive_l2"])
    opts = ["SOLVER.MAX_EPOCH", "2", "SOLVER.ITERS_PER_EPOCH", "3", "SEED", "99"]
    runs = reproduce.seeded_rows(rows, reproduce.parse_seeds("0,1,2"))
    ran = run_suite(runs, root, opts, 1, "launch", log=lambda line: None,
                    start_process=_fake_launcher(str(script)), poll_seconds=0.02)
    assert ran == [f"Synthetic/{name}/seed{s}" for s in (0, 1, 2) for name in ("baseline",
                                                                               "adaptive_l2")]
    for seed in (0, 1, 2):  # each in its own folder, trained with its own SEED (not opts' 99)
        folder = os.path.join(root, "Synthetic", "adaptive_l2", f"seed{seed}")
        assert open(records / folder.replace(os.sep, "_")).read() == str(seed)
    # finished row+seed runs are kept; a new seed runs alone
    more = reproduce.seeded_rows(rows, [0, 1, 2, 3])
    assert run_suite(more, root, opts, 1, "launch", log=lambda line: None,
                     start_process=_fake_launcher(str(script)), poll_seconds=0.02) == \
        ["Synthetic/baseline/seed3", "Synthetic/adaptive_l2/seed3"]

    table, paths = reproduce.collect_seeds_and_write(rows, [0, 1, 2], root, "baseline", opts)
    assert [os.path.basename(p) for p in paths] == ["results_seeds.md", "results_seeds.csv"]
    lines = table.splitlines()
    assert lines[0].startswith("| dataset | row | seeds | mAP (mean ± 95 % CI)")
    # baseline mAP 50, 51, 52: mean 51, sd 1, t(0.975, 2) = 4.303 -> 51.0 +/- 2.5
    assert lines[2] == ("| Synthetic | baseline | 3/3 | 51.0 ± 2.5 | 59.0 ± 2.5 | reference | "
                        "reference |")
    # adaptive - baseline per seed: 1, 1.5, 1 -> mean 1.17, se 1/6, t = 7.0 (p 0.0198), +/- 0.72;
    # Rank-1 is the same in both rows: difference 0 with width 0 (p 1)
    assert lines[3] == ("| Synthetic | adaptive_l2 | 3/3 | 52.2 ± 2.6 | 59.0 ± 2.5 | "
                        "+1.2 ± 0.7 (p 0.02) | +0.0 ± 0.0 (p 1) |")
    csv_lines = open(paths[1]).read().splitlines()
    assert csv_lines[2].startswith("Synthetic,adaptive_l2,baseline,3,3,51;52.5;53,52.1667,")
    assert ",1.16667,0.449558,1.88378,0.0198039," in csv_lines[2]


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
