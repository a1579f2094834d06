#!/usr/bin/env python3
"""SGP (reconstructed from the abstract) and adversarial training: cost and robustness.

1. `--part cost`: step time of the project's train step (forward + backward + Adam step) with
   SGP-F, SGP-P and AT (FGSM, PGD-3) against the same step without them: same model, same batch,
   runs interleaved, medians. Targets: SGP / none <= 1.05; AT costs what it costs (about 2-3x).
2. `--part robustness`: trains the synthetic suite's baseline, adaptive L2, SGP, adaptive L2 + SGP
   and AT rows (tools/reproduce_table.py --suite synthetic --with-sgp, reusing finished runs), then
   evaluates each final model clean and under FGSM / PGD-10 at eps 2, 4, 8 (query images attacked,
   gallery clean) and prints one table. About 25 minutes on 2 CPU cores.
3. `--part syncs`: host syncs per training step (ops that copy a tensor value to Python:
   `aten._local_scalar_dense`, `item`, `is_nonzero`; each stalls a GPU until its queue drains) of
   Baseline and TwoBranchReID with adaptive L2, SGP-F / SGP-P / AT, counted with a
   TorchDispatchMode over steps 1-3 (step 0 builds the optimizer state), grouped by source line.
   Adam's step counters are excluded: torch keeps them on the host, so reading them waits for no
   device. Uses only public APIs, so it also measures an older checkout (PYTHONPATH=that tree).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import time
import traceback

import torch

import adaptive_l2  # noqa: F401
from adaptive_l2.config import load_config
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


def timed(function, device: str) -> float:
    """Seconds `function()` takes, the device's queue drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
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
        steps = {name: build_step(VARIANTS[name], args, batch) for name in args.variants}
        times = {name: [] for name in steps}
        for step in steps.values():
            for _ in range(args.warmup):
                timed(step.run_step, args.device)
        draws = []
        parameters = sum(p.numel() for p in next(iter(steps.values())).model.parameters())
        generator = torch.Generator(device=args.device).manual_seed(0)
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(timed(step.run_step, args.device))
            # the floor of SGP-P's cost: one gaussian value per parameter, as its step draws
            draws.append(timed(lambda: torch.randn(parameters, generator=generator,
                                                   device=args.device), args.device))
    base = statistics.median(times["none"])
    print(f"train step, {args.depth} batch {args.batch} {height}x{width} on {args.device}, "
          f"median of {args.rounds} interleaved rounds")
    for name, samples in times.items():
        median = statistics.median(samples)
        target = " (target <= 1.05)" if name.startswith("SGP") else ""
        print(f"  {name:9s} {median:.4f} s  ratio to none {median / base:.3f}{target}")
    if "SGP-F" in times and "SGP-P" in times:
        feature, parameter = (statistics.median(times[n]) / base - 1 for n in ("SGP-F", "SGP-P"))
        print(f"  overhead over none: SGP-F {100 * feature:+.1f} %, SGP-P {100 * parameter:+.1f} % "
              f"(target: SGP-P <= SGP-F + 2 points)")
        draw = statistics.median(draws) / base
        print(f"  SGP-P's gaussian draw alone ({parameters / 1e6:.1f} M values, one per parameter): "
              f"{100 * draw:.1f} % of the step; SGP-P beyond its draw: "
              f"{100 * (parameter - draw):+.1f} %")


def robustness(args) -> None:
    from adaptive_l2.cli.attack import attack_evaluation
    from adaptive_l2.table.runner import run_suite
    from adaptive_l2.table.suite import output_dir, suite_rows
    from adaptive_l2.evaluation.robustness import STANDARD_ATTACKS

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


SYNC_VARIANTS = {
    "Baseline + SGP-F": ("Base-ReID.yml", ["MODEL.REG.SGP.ENABLED", "True"]),
    "Baseline + AT": ("Base-ReID.yml", ["MODEL.REG.AT.ENABLED", "True"]),
    "TwoBranchReID + SGP-P": ("Paper/Base-Paper.yml", [
        "MODEL.REG.SGP.ENABLED", "True", "MODEL.REG.SGP.MODE", "parameter"]),
}


def count_syncs(args) -> None:
    from fastreid.utils.events import EventStorage
    from torch.utils._python_dispatch import TorchDispatchMode

    sync_ops = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                torch.ops.aten.is_nonzero.default}
    host_only = os.sep + os.path.join("torch", "optim") + os.sep

    class SyncCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sources = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in sync_ops:
                frames = traceback.extract_stack()[:-1]
                if not any(host_only in frame.filename for frame in frames):
                    frame = next(f for f in reversed(frames) if f.filename != __file__
                                 and os.sep + "torch" + os.sep not in f.filename)
                    where = frame.filename.split("site-packages" + os.sep)[-1]
                    self.sources[f"{where}:{frame.lineno} {frame.line}"] += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(8, 3, 64, 32, generator=gen) * 255,
             "targets": torch.arange(8) // 4, "camids": torch.zeros(8, dtype=torch.long)}
    steps = 3
    for name, (config, extra) in SYNC_VARIANTS.items():
        cfg = load_config(os.path.join("configs", config), [
            "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
            "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.HEADS.NUM_CLASSES", "2",
            "MODEL.TWO_BRANCH.REGIONAL_DIM", "32", "MODEL.FREEZE_LAYERS", "[]",
            "MODEL.REG.NAME", "adaptive", "SOLVER.AMP.ENABLED", "False", "SEED", "0", *extra])
        torch.manual_seed(0)
        model = Trainer.build_model(cfg)
        optimizer, _ = Trainer.build_optimizer(cfg, model)
        step = Trainer.build_train_step(cfg, model, itertools.repeat(batch), optimizer)
        counter = SyncCounter()
        with EventStorage(0) as storage:
            for iteration in range(steps + 1):
                storage.iter = step.iter = iteration
                if iteration == 0:
                    step.run_step()
                    continue
                with counter:
                    step.run_step()
        print(f"{name}: {sum(counter.sources.values()) / steps:g} host syncs per step")
        for source, count in counter.sources.most_common():
            print(f"  {count / steps:g} x {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "robustness", "syncs", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", default="50x")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants of --part cost ('none' is always timed, as the reference)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output-root", default=os.path.join("logs", "synthetic"))
    args = parser.parse_args()
    args.variants = ["none"] + [name for name in args.variants if name != "none"]
    if args.part in ("cost", "all"):
        cost(args)
    if args.part in ("robustness", "all"):
        robustness(args)
    if args.part in ("syncs", "all"):
        count_syncs(args)


if __name__ == "__main__":
    main()
