"""The table tool's runner: rows side by side on GPU slots (a dagger row after its R152 row), a
failed row reported while the others go on, resumable runs, one line per row with its ETA."""
import json
import os

import pytest
from fake_runs import fake_launcher

from adaptive_l2.table.runner import gpu_slots, run_suite
from adaptive_l2.table.suite import select_rows, suite_rows

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
                  gpus="0,1", start_process=fake_launcher(str(script)), poll_seconds=0.05)
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
                          start_process=fake_launcher(str(script)), poll_seconds=0.05)
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
                  start_process=fake_launcher(str(script)), poll_seconds=0.05)
    assert list(_records(tmp_path / "records")) == ["Market1501/adaptive_l2_R50"]


def test_gpu_slots_group_gpus_per_row_and_refuse_bad_lists():
    assert gpu_slots("0,1,2,3", 1) == ["0", "1", "2", "3"]
    assert gpu_slots("4,5,6,7", 2) == ["4,5", "6,7"]
    for bad, per_row in (("0,0", 1), ("0,x", 1), ("0,1,2", 2), ("", 1)):
        with pytest.raises(ValueError, match="--gpus"):
            gpu_slots(bad, per_row)


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
                    log=messages.append, start_process=fake_launcher(str(script)),
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
