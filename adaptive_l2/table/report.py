"""The table's report: each row's results from its evaluation history beside the paper's numbers
(the final model, and the best evaluation of the second phase, labelled "selected on test" as the
original code selected it), written as markdown and CSV; with several seeds, mean +/- 95 % CI and
paired differences to the suite's reference row (the statistics are in adaptive_l2.intervals)."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from adaptive_l2.config import load_config
from adaptive_l2.run_files import (EVAL_HISTORY_FILE, FACTORS_FILE, RESULTS_FILE, TABLE_CSV,
                                   TABLE_MARKDOWN, TABLE_SEEDS_CSV, TABLE_SEEDS_MARKDOWN)
from adaptive_l2.table.suite import PAPER_NUMBERS, Row, output_dir, row_status, seeded_rows

def read_history(directory: str) -> List[dict]:
    """The run's evaluations (one per line of eval_history.jsonl); [] before the first."""
    path = os.path.join(directory, EVAL_HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def row_results(row: Row, output_root: str, opts: Sequence[str] = ()) -> dict:
    """The row's table cells: paper numbers, final evaluation, best of the second phase (after
    SOLVER.EPOCH_LR.RESTART_EPOCH, "selected on test"), and status; None where not run yet."""
    directory = output_dir(row, output_root)
    history = read_history(directory)
    if row.evaluates and os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        with open(os.path.join(directory, RESULTS_FILE)) as handle:
            evaluated = json.load(handle)
        history = [{"epoch": -1, "mAP": evaluated["mAP"], "Rank-1": evaluated["Rank-1"]}]
    paper = PAPER_NUMBERS.get((row.dataset, row.name))
    result = {"dataset": row.dataset, "row": row.name, "status": row_status(directory),
              "paper_mAP": paper[0] if paper else None, "paper_R1": paper[1] if paper else None,
              "final_mAP": None, "final_R1": None, "best_mAP": None, "best_R1": None,
              "best_epoch": None}
    if not history:
        return result
    cfg = load_config(row.config, ["MODEL.DEVICE", "cpu", *opts])
    restart = cfg.SOLVER.EPOCH_LR.RESTART_EPOCH
    final = history[-1]
    result.update(final_mAP=final["mAP"], final_R1=final["Rank-1"])
    if row.evaluates:  # one evaluation of the final model: no "selected on test" column
        return result
    phase_b = [h for h in history if h["epoch"] > restart] or history
    best = max(phase_b, key=lambda h: h["mAP"])
    result.update(best_mAP=best["mAP"], best_R1=best["Rank-1"], best_epoch=best["epoch"])
    return result


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: Sequence[dict]) -> str:
    """The results as a markdown table beside the paper's numbers (one decimal, "-" where none)."""
    header = ("| dataset | row | paper mAP / R1 | final mAP / R1 | best mAP / R1 (selected on test, "
              "epoch) | status |\n|---|---|---|---|---|---|")
    lines = [header]
    for r in results:
        best = f"{_cell(r['best_mAP'])} / {_cell(r['best_R1'])}"
        if r["best_epoch"] is not None:
            best += f" (ep {r['best_epoch']})"
        lines.append(f"| {r['dataset']} | {r['row']} | {_cell(r['paper_mAP'])} / "
                     f"{_cell(r['paper_R1'])} | {_cell(r['final_mAP'])} / {_cell(r['final_R1'])} | "
                     f"{best} | {r['status']} |")
    return "\n".join(lines)


def format_csv(results: Sequence[dict]) -> str:
    """The results as CSV, every field at full precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0].keys()))
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def write_table(results: Sequence[dict], output_root: str) -> List[str]:
    """results.md and results.csv under `output_root`; returns their paths."""
    os.makedirs(output_root, exist_ok=True)
    markdown = os.path.join(output_root, TABLE_MARKDOWN)
    table = os.path.join(output_root, TABLE_CSV)
    with open(markdown, "w") as handle:
        handle.write(format_table(results) + "\n")
    with open(table, "w") as handle:
        handle.write(format_csv(results))
    return [markdown, table]


def collect_and_write(rows: Sequence[Row], output_root: str, opts: Sequence[str] = (),
                      draw_factors: bool = False):
    """The table of every row (finished or not), written as results.md / results.csv; with
    `draw_factors`, the factor pictures of every run that logged factors."""
    results = [row_results(row, output_root, opts) for row in rows]
    paths = write_table(results, output_root)
    if draw_factors:
        from adaptive_l2.plotting import plot_factors

        for row in rows:
            directory = output_dir(row, output_root)
            if os.path.isfile(os.path.join(directory, FACTORS_FILE)):
                paths += plot_factors(directory)
    return format_table(results), paths


# ---- Several seeds per row (--seeds): mean +/- CI and paired differences to the reference row

SEED_METRICS = (("final_mAP", "mAP"), ("final_R1", "Rank-1"))  # (result key, column label)


def seed_summaries(rows: Sequence[Row], seeds: Sequence[int], output_root: str,
                   reference: str, opts: Sequence[str] = ()) -> List[dict]:
    """Per row: the finished seeds' values of each metric, their mean +/- 95 % CI, and the paired
    difference to the row `reference` of the same dataset over the seeds both finished."""
    from adaptive_l2.intervals import mean_interval, paired_difference

    values: Dict[str, Dict[str, Dict[int, float]]] = {}
    for row in rows:
        per_metric: Dict[str, Dict[int, float]] = {key: {} for key, _ in SEED_METRICS}
        for seed in seeds:
            result = row_results(dataclasses.replace(row, seed=seed), output_root, opts)
            if result["status"] != "done":
                continue
            for key, _ in SEED_METRICS:
                if result[key] is not None:
                    per_metric[key][seed] = result[key]
        values[row.key] = per_metric
    summaries = []
    for row in rows:
        reference_key = f"{row.dataset}/{reference}"
        summary = {"dataset": row.dataset, "row": row.name, "reference": reference,
                   "seeds_done": len(values[row.key][SEED_METRICS[0][0]]), "seeds": len(seeds)}
        for key, _ in SEED_METRICS:
            mine = values[row.key][key]
            summary[key] = mean_interval(list(mine.values())) if mine else None
            theirs = values.get(reference_key, {}).get(key, {})
            common = [s for s in seeds if s in mine and s in theirs]
            summary[f"{key}_values"] = [mine[s] for s in seeds if s in mine]
            summary[f"{key}_vs_reference"] = (
                None if row.name == reference or not common else
                paired_difference([mine[s] for s in common], [theirs[s] for s in common]))
        summaries.append(summary)
    return summaries


def _interval_cell(interval, signed: bool = False) -> str:
    if interval is None:
        return "-"
    cell = interval.format(1, signed)
    if interval.p_value is not None:
        cell += f" (p {interval.p_value:.2g})"
    return cell


def format_seed_table(summaries: Sequence[dict]) -> str:
    """Markdown: mean +/- 95 % CI (Student t, n - 1 dof) per metric, then each row's paired
    difference to the reference row (paired t over the seeds both finished, two-sided p)."""
    if not summaries:
        return "(no rows)"
    reference = summaries[0]["reference"]
    labels = [label for _, label in SEED_METRICS]
    header = (["dataset", "row", "seeds"] + [f"{label} (mean ± 95 % CI)" for label in labels]
              + [f"Δ {label} vs {reference} (paired)" for label in labels])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s["dataset"], s["row"], f"{s['seeds_done']}/{s['seeds']}"]
        cells += [_interval_cell(s[key]) for key, _ in SEED_METRICS]
        cells += ["reference" if s["row"] == reference else
                  _interval_cell(s[f"{key}_vs_reference"], signed=True) for key, _ in SEED_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_csv(summaries: Sequence[dict]) -> str:
    """One line per row: per metric its seeds' values, mean, CI bounds, and the paired difference
    to the reference row with its CI and p-value (empty where undefined)."""
    def number(value):
        return "" if value is None else f"{value:.6g}"

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["dataset", "row", "reference", "seeds_done", "seeds"]
    for key, _ in SEED_METRICS:
        header += [f"{key}_values", f"{key}_mean", f"{key}_ci_low", f"{key}_ci_high",
                   f"{key}_diff_mean", f"{key}_diff_ci_low", f"{key}_diff_ci_high", f"{key}_diff_p"]
    writer.writerow(header)
    for s in summaries:
        line = [s["dataset"], s["row"], s["reference"], s["seeds_done"], s["seeds"]]
        for key, _ in SEED_METRICS:
            own, diff = s[key], s[f"{key}_vs_reference"]
            line += [";".join(f"{v:.6g}" for v in s[f"{key}_values"])]
            line += [number(own.mean if own else None), number(own.low if own else None),
                     number(own.high if own else None)]
            line += [number(diff.mean if diff else None), number(diff.low if diff else None),
                     number(diff.high if diff else None), number(diff.p_value if diff else None)]
        writer.writerow(line)
    return buffer.getvalue()


def collect_seeds_and_write(rows: Sequence[Row], seeds: Sequence[int], output_root: str,
                            reference: str, opts: Sequence[str] = (),
                            draw_factors: bool = False) -> Tuple[str, List[str]]:
    """The multi-seed table of `rows` (unseeded) written as results_seeds.md / .csv in the root;
    with `draw_factors`, the factor pictures of every seed's run that logged factors."""
    summaries = seed_summaries(rows, seeds, output_root, reference, opts)
    os.makedirs(output_root, exist_ok=True)
    table = format_seed_table(summaries)
    markdown = os.path.join(output_root, TABLE_SEEDS_MARKDOWN)
    comma = os.path.join(output_root, TABLE_SEEDS_CSV)
    with open(markdown, "w") as handle:
        handle.write(table + "\n")
    with open(comma, "w") as handle:
        handle.write(format_seed_csv(summaries))
    paths = [markdown, comma]
    if draw_factors:
        from adaptive_l2.plotting import plot_factors

        for row in seeded_rows(rows, seeds):
            directory = output_dir(row, output_root)
            if os.path.isfile(os.path.join(directory, FACTORS_FILE)):
                paths += plot_factors(directory)
    return table, paths
