"""Rebuild the paper's results table (and the same table on the embedded synthetic dataset).

A suite is a list of rows, each a config file. `run_suite` trains the rows that have not finished
(a row is finished when its OUTPUT_DIR holds final_results.json; an interrupted row resumes from
its last checkpoint), one after the other, with tools/train_net.py in a child process, on one or
several GPUs (fast-reid's launch or torchrun) or on the CPU. `collect` reads every row's evaluation
history and lays the results out beside the paper's numbers: the final model, and the best
evaluation of the second phase, labelled "selected on test" as the original code selected it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from adaptive_l2.cli import RESULTS_FILE, load_config
from adaptive_l2.hooks import EVAL_HISTORY_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

# Ni et al. 2020, results table (mAP, Rank-1); None where the paper has no such row.
PAPER_NUMBERS = {
    ("Market1501", "conventional_l2_R50"): (87.2, 94.6),
    ("Market1501", "adaptive_l2_R50"): (88.3, 95.3),
    ("Market1501", "adaptive_l2_R101"): (88.6, 94.8),
    ("Market1501", "adaptive_l2_R152"): (88.9, 95.6),
    ("Market1501", "adaptive_l2_R152_rerank"): (94.4, 96.0),
    ("DukeMTMC", "conventional_l2_R50"): (78.9, 88.0),
    ("DukeMTMC", "adaptive_l2_R50"): (79.9, 88.9),
    ("DukeMTMC", "adaptive_l2_R101"): (80.6, 89.2),
    ("DukeMTMC", "adaptive_l2_R152"): (81.0, 90.2),
    ("DukeMTMC", "adaptive_l2_R152_rerank"): (90.7, 92.2),
    ("MSMT17", "conventional_l2_R50"): (57.7, 79.1),
    ("MSMT17", "adaptive_l2_R50"): (59.4, 79.6),
    ("MSMT17", "adaptive_l2_R101"): (61.9, 81.3),
    ("MSMT17", "adaptive_l2_R152"): (62.2, 81.7),
    ("MSMT17", "adaptive_l2_R152_rerank"): (76.7, 84.9),
}
PAPER_ROWS = ("conventional_l2_R50", "adaptive_l2_R50", "adaptive_l2_R101", "adaptive_l2_R152",
              "adaptive_l2_R152_rerank")
RERANK_SUFFIX = "_rerank"
SYNTHETIC_ROWS = ("baseline", "conventional_l2", "adaptive_l2")
SYNTHETIC_SGP_ROWS = ("sgp", "adaptive_l2_sgp", "at")


@dataclass(frozen=True)
class Row:
    dataset: str
    name: str
    config: str
    # a row that trains nothing: it evaluates this row's final checkpoint with its own config
    # (the dagger row: k-reciprocal re-ranking of the R152 model, as in the paper)
    evaluates: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"


def suite_rows(suite: str, with_sgp: bool = False) -> List[Row]:
    if suite == "paper":
        names = PAPER_ROWS + (("sgp_R50", "adaptive_l2_sgp_R50", "at_R50") if with_sgp else ())
        return [Row(ds, name, os.path.join(REPO, "configs", "Paper", ds, f"{name}.yml"),
                    evaluates=name[: -len(RERANK_SUFFIX)] if name.endswith(RERANK_SUFFIX) else None)
                for ds in ("Market1501", "DukeMTMC", "MSMT17") for name in names]
    if suite == "synthetic":
        names = SYNTHETIC_ROWS + (SYNTHETIC_SGP_ROWS if with_sgp else ())
        return [Row("Synthetic", name, os.path.join(REPO, "configs", "Synthetic", f"{name}.yml"))
                for name in names]
    raise ValueError(f"--suite must be 'paper' or 'synthetic', got '{suite}'")


def select_rows(rows: Sequence[Row], only: Sequence[str]) -> List[Row]:
    if not only:
        return list(rows)
    chosen = [r for r in rows if r.key in only or r.name in only or r.dataset in only]
    if not chosen:
        raise ValueError(f"--rows {list(only)} match none of {[r.key for r in rows]}")
    return chosen


def output_dir(row: Row, output_root: str) -> str:
    """Relative roots are taken from the repository root, where the runs execute."""
    return os.path.join(os.path.join(REPO, output_root), row.dataset, row.name)


def row_status(directory: str) -> str:
    if os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        return "done"
    if os.path.isfile(os.path.join(directory, "last_checkpoint")):
        return "interrupted"
    return "todo"


def _short(path: str) -> str:
    """Paths under the repository as relative ones: commands run from the repository root."""
    relative = os.path.relpath(path, REPO)
    return path if relative.startswith("..") else relative


def evaluated_checkpoint(row: Row, output_root: str) -> str:
    base = Row(row.dataset, row.evaluates, row.config)
    return os.path.join(output_dir(base, output_root), "model_final.pth")


def train_command(row: Row, output_root: str, opts: Sequence[str], num_gpus: int,
                  launcher: str, resume: bool) -> List[str]:
    args = ["--config-file", _short(row.config)]
    tail = ["OUTPUT_DIR", _short(output_dir(row, output_root)), *opts]
    if row.evaluates:
        args.append("--eval-only")
        tail = ["MODEL.WEIGHTS", _short(evaluated_checkpoint(row, output_root)), *tail]
    elif resume:
        args.append("--resume")
    if launcher == "torchrun":
        return [_short(sys.executable), "-m", "torch.distributed.run",
                f"--nproc_per_node={num_gpus}", _short(TRAIN_NET), *args, *tail]
    if num_gpus > 1:
        args += ["--num-gpus", str(num_gpus)]
    return [_short(sys.executable), _short(TRAIN_NET), *args, *tail]


def iterations_of(row: Row, opts: Sequence[str]) -> int:
    cfg = load_config(row.config, ["MODEL.DEVICE", "cpu", *opts] if "MODEL.DEVICE" not in opts
                      else list(opts))
    per_epoch = cfg.SOLVER.ITERS_PER_EPOCH
    if per_epoch <= 0:
        syn = cfg.DATASETS.SYNTHETIC
        images = syn.NUM_TRAIN_IDS * syn.IMAGES_PER_ID
        per_epoch = max(1, images // cfg.SOLVER.IMS_PER_BATCH)
    return cfg.SOLVER.MAX_EPOCH * per_epoch


def measure_seconds_per_iteration(row: Row, opts: Sequence[str], device: str,
                                  probe_batch: int = 4, steps: int = 2) -> float:
    """Time a few training steps of the row's model on this machine at a small batch, scaled to
    the configured batch (linear in the batch: an estimate, labelled as one)."""
    import torch
    from fastreid.utils.events import EventStorage

    from adaptive_l2.optim import build_optimizer
    from adaptive_l2.trainer import Trainer

    cfg = load_config(row.config, [*opts, "MODEL.DEVICE", device, "MODEL.BACKBONE.PRETRAIN",
                                   "False", "MODEL.HEADS.NUM_CLASSES", "8"])
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    height, width = cfg.INPUT.SIZE_TRAIN
    batch = {"images": torch.rand(probe_batch, 3, height, width, device=device) * 255,
             "targets": torch.arange(probe_batch, device=device) % (probe_batch // 2)}
    amp = cfg.SOLVER.AMP.ENABLED and device.startswith("cuda")
    times = []
    with EventStorage(0):
        for _ in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cuda", enabled=amp):
                loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    per_image = min(times[1:]) / probe_batch
    factor = 1.0
    if cfg.MODEL.REG.AT.ENABLED:
        # clean + adversarial batch and the attack's passes: fitted to benchmarks/bench_sgp.py's
        # measured step ratios (FGSM 3.97x, PGD-3 5.27x on R50)
        factor = 3.3 + 0.65 * cfg.MODEL.REG.AT.STEPS
    return per_image * cfg.SOLVER.IMS_PER_BATCH * factor


def dry_run(rows: Sequence[Row], output_root: str, opts: Sequence[str], num_gpus: int,
            launcher: str, device: str, measure: bool = True) -> str:
    cache: Dict[tuple, float] = {}
    lines = []
    for row in rows:
        directory = output_dir(row, output_root)
        status = row_status(directory)
        command = train_command(row, output_root, opts, num_gpus, launcher,
                                resume=status == "interrupted")
        iterations = iterations_of(row, opts)
        cost = ""
        if row.evaluates:
            cost = f"  evaluation of {row.dataset}/{row.evaluates}'s final model (run that first)"
        elif measure:
            cfg = load_config(row.config, ["MODEL.DEVICE", "cpu", *opts])
            key = (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.DEPTH,
                   tuple(cfg.INPUT.SIZE_TRAIN), cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.REG.AT.ENABLED)
            if key not in cache:
                cache[key] = measure_seconds_per_iteration(row, opts, device)
            seconds = cache[key] * iterations / max(1, num_gpus)
            cost = (f"  ~{iterations} it x {cache[key]:.2f} s/it on this {device} "
                    f"= {seconds / 3600:.1f} h (estimate{' / ' + str(num_gpus) + ' GPUs' if num_gpus > 1 else ''})")
        lines.append(f"# {row.key} [{status}]{cost}\n{shlex.join(command)}")
    return "\n".join(lines)


def run_suite(rows: Sequence[Row], output_root: str, opts: Sequence[str], num_gpus: int,
              launcher: str, log=print) -> None:
    for row in rows:
        directory = output_dir(row, output_root)
        status = row_status(directory)
        if status == "done":
            log(f"[reproduce] {row.key}: finished before, kept")
            continue
        if row.evaluates and not os.path.isfile(evaluated_checkpoint(row, output_root)):
            raise RuntimeError(f"row {row.key} evaluates {row.dataset}/{row.evaluates}, which has "
                               "not finished: run that row first")
        command = train_command(row, output_root, opts, num_gpus, launcher,
                                resume=status == "interrupted")
        log(f"[reproduce] {row.key}: {'resuming' if status == 'interrupted' else 'training'}\n"
            f"  {shlex.join(command)}")
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO)
        if result.returncode != 0:
            raise RuntimeError(f"row {row.key} failed (exit {result.returncode}); its log is in "
                               f"{directory}/log.txt. Run the same command again to resume.")
        log(f"[reproduce] {row.key}: done in {time.perf_counter() - start:.0f} s")


def read_history(directory: str) -> List[dict]:
    path = os.path.join(directory, EVAL_HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def row_results(row: Row, output_root: str, opts: Sequence[str] = ()) -> dict:
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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0].keys()))
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def write_table(results: Sequence[dict], output_root: str) -> List[str]:
    output_root = os.path.join(REPO, output_root)
    os.makedirs(output_root, exist_ok=True)
    markdown = os.path.join(output_root, "results.md")
    table = os.path.join(output_root, "results.csv")
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
        from adaptive_l2.hooks import FACTORS_FILE

        for row in rows:
            directory = output_dir(row, output_root)
            if os.path.isfile(os.path.join(directory, FACTORS_FILE)):
                paths += plot_factors(directory)
    return format_table(results), paths
