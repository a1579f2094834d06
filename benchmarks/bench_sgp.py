#!/usr/bin/env python3
"""SGP (reconstructed from the abstract) and adversarial training: cost and robustness.

1. `--part cost`: step time of the project's train step (forward + backward + Adam step) with
   SGP-F, SGP-P and AT (FGSM, PGD-3) against the same step without them: same model, same batch,
   runs interleaved, medians. Targets: SGP / none <= 1.05; AT costs what it costs (about 2-3x).
2. `--part robustness`: trains the synthetic suite's baseline, adaptive L2, SGP, adaptive L2 + SGP
   and AT rows (tools/reproduce_table.py --suite synthetic --with-sgp, reusing finished runs), then
   evaluates each final model clean and under FGSM / PGD-10 at eps 2, 4, 8 (query images attacked,
   gallery clean) and prints one table. About 25 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch

import adaptive_l2  # noqa: F401
from adaptive_l2.cli import load_config
from adaptive_l2.trainer import Trainer

VARIANTS = {
    "none": [],
    "SGP-F": ["MODEL.REG.SGP.ENABLED", "True", "MODEL.REG.SGP.MODE", "feature"],
    "SGP-P": ["MODEL.REG.SGP.ENABLED", "True", "MODEL.REG.SGP.MODE", "parameter"],
    "AT FGSM": ["MODEL.REG.AT.ENABLED", "True", "MODEL.REG.AT.STEPS", "1"],
    "AT PGD-3": ["MODEL.REG.AT.ENABLED", "True", "MODEL.REG.AT.STEPS", "3"],
}


def build_step(extra, args, batch):
    cfg = load_config("configs/Base-ReID.yml", [
        "MODEL.DEVICE", args.device, "MODEL.BACKBONE.DEPTH", args.depth,
        "MODEL.BACKBONE.FEAT_DIM", "512" if args.depth in ("18x", "34x") else "2048",
        "MODEL.HEADS.NUM_CLASSES", str(args.batch // 4), "SOLVER.AMP.ENABLED",
        str(args.device.startswith("cuda")), "SEED", "0", *extra])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    step = Trainer.build_train_step(cfg, model, itertools.repeat(batch), optimizer)
    step.iter = 0
    return step


def timed_step(step, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step.run_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cost(args) -> None:
    from fastreid.utils.events import EventStorage

    height, width = args.size
    gen = torch.Generator().manual_seed(0)
    batch = {"images": (torch.rand(args.batch, 3, height, width, generator=gen) * 255).to(args.device),
             "targets": (torch.arange(args.batch) % (args.batch // 4)).to(args.device),
             "camids": torch.zeros(args.batch, dtype=torch.long).to(args.device)}
    with EventStorage(0):
        steps = {name: build_step(extra, args, batch) for name, extra in VARIANTS.items()}
        times = {name: [] for name in steps}
        for step in steps.values():
            for _ in range(args.warmup):
                timed_step(step, args.device)
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(timed_step(step, args.device))
    base = statistics.median(times["none"])
    print(f"train step, {args.depth} batch {args.batch} {height}x{width} on {args.device}, "
          f"median of {args.rounds} interleaved rounds")
    for name, samples in times.items():
        median = statistics.median(samples)
        target = " (target <= 1.05)" if name.startswith("SGP") else ""
        print(f"  {name:9s} {median:.4f} s  ratio to none {median / base:.3f}{target}")


def robustness(args) -> None:
    from adaptive_l2.attack_cli import attack_evaluation
    from adaptive_l2.reproduce import output_dir, run_suite, suite_rows
    from adaptive_l2.sgp.robustness import STANDARD_ATTACKS

    root = args.output_root
    wanted = ("baseline", "adaptive_l2", "sgp", "adaptive_l2_sgp", "at")
    rows = [r for r in suite_rows("synthetic", with_sgp=True) if r.name in wanted]
    run_suite(rows, root, [], 1, "launch")
    table = {}
    for row in rows:
        directory = output_dir(row, root)
        report = attack_evaluation(row.config, [
            "MODEL.WEIGHTS", os.path.join(directory, "model_final.pth"),
            "OUTPUT_DIR", os.path.join(directory, "robustness")], list(STANDARD_ATTACKS))
        table[row.name] = next(iter(report.values()))
    labels = list(next(iter(table.values())).keys())
    print("\nSynthetic suite, final models; SGP is reconstructed from the abstract. "
          "Rank-1 / mAP (%), query attacked, gallery clean:")
    print("| attack | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for label in labels:
        cells = [f"{table[m][label]['Rank-1']:.1f} / {table[m][label]['mAP']:.1f}" for m in table]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "robustness", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", default="50x")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output-root", default=os.path.join("logs", "synthetic"))
    args = parser.parse_args()
    if args.part in ("cost", "all"):
        cost(args)
    if args.part in ("robustness", "all"):
        robustness(args)


if __name__ == "__main__":
    main()
