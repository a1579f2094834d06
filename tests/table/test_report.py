"""The table tool's report with several seeds: each row once per seed, mean +/- 95 % CI and
paired differences to the reference row, in markdown and CSV."""
import os

from fake_runs import fake_launcher

from adaptive_l2.table.report import collect_seeds_and_write
from adaptive_l2.table.runner import run_suite
from adaptive_l2.table.suite import parse_seeds, seeded_rows, select_rows, suite_rows

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
    runs = seeded_rows(rows, parse_seeds("0,1,2"))
    ran = run_suite(runs, root, opts, 1, "launch", log=lambda line: None,
                    start_process=fake_launcher(str(script)), poll_seconds=0.02)
    assert ran == [f"Synthetic/{name}/seed{s}" for s in (0, 1, 2) for name in ("baseline",
                                                                               "adaptive_l2")]
    for seed in (0, 1, 2):  # each in its own folder, trained with its own SEED (not opts' 99)
        folder = os.path.join(root, "Synthetic", "adaptive_l2", f"seed{seed}")
        assert open(records / folder.replace(os.sep, "_")).read() == str(seed)
    # finished row+seed runs are kept; a new seed runs alone
    more = seeded_rows(rows, [0, 1, 2, 3])
    assert run_suite(more, root, opts, 1, "launch", log=lambda line: None,
                     start_process=fake_launcher(str(script)), poll_seconds=0.02) == \
        ["Synthetic/baseline/seed3", "Synthetic/adaptive_l2/seed3"]

    table, paths = collect_seeds_and_write(rows, [0, 1, 2], root, "baseline", opts)
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
