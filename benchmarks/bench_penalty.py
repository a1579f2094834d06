#!/usr/bin/env python3
"""Cost of the adaptive L2 term, measured side by side in one run.

1. Step time (forward + backward + Adam step) of fast-reid's Baseline with the term on vs off,
   same model and batch, runs interleaved (on, off, on, off, ...), median of each.
2. The penalty's forward + backward alone (value, theta gradients, and the weight gradients added
   to the existing gradients) vs a memory-bandwidth floor (one pass that reads every regularized
   tensor and writes a gradient-sized tensor: `torch._foreach_copy_`) and vs the naive per-tensor
   Python loop (one small kernel per tensor, autograd through each).

CPU default: R50, batch 16, 256x128. `--device cuda` (where a GPU exists): R50, batch 64, 384x128,
AMP. Prints ratios against the named baselines; exits 0 (a benchmark reports, it does not judge).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import adaptive_l2  # noqa: F401
from adaptive_l2.cli import load_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.regularizers.l2 import find_l2_penalty, hard_sigmoid_keras
from adaptive_l2.trainer import Trainer


def build(adaptive: bool, args):
    opts = ["MODEL.DEVICE", args.device, "MODEL.BACKBONE.DEPTH", args.depth,
            "MODEL.HEADS.NUM_CLASSES", "751", "MODEL.REG.ADAPTIVE", str(adaptive),
            "SOLVER.AMP.ENABLED", str(args.amp), "SEED", "0"]
    cfg = load_config("configs/Base-ReID.yml", opts)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    return model, optimizer


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model, optimizer, batch, steps: int, args) -> list:
    from fastreid.utils.events import EventStorage

    scaler = torch.amp.GradScaler("cuda") if args.amp else None
    times = []
    with EventStorage(0):
        for _ in range(steps):
            synchronize(args.device)
            start = time.perf_counter()
            with torch.autocast("cuda", enabled=args.amp):
                loss = sum(model(batch).values())
            optimizer.zero_grad()
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
    return times


def step_time_ratio(args) -> None:
    height, width = args.size
    gen = torch.Generator().manual_seed(0)
    batch = {"images": (torch.rand(args.batch, 3, height, width, generator=gen) * 255).to(args.device),
             "targets": (torch.arange(args.batch) % (args.batch // 4)).to(args.device)}
    on = build(True, args)
    off = build(False, args)
    time_steps(*on, batch, args.warmup, args)
    time_steps(*off, batch, args.warmup, args)
    times_on, times_off = [], []
    for _ in range(args.rounds):
        times_on += time_steps(*on, batch, 1, args)
        times_off += time_steps(*off, batch, 1, args)
    median_on, median_off = statistics.median(times_on), statistics.median(times_off)
    print(f"step time, {args.depth} batch {args.batch} {height}x{width} {args.device}"
          f"{' AMP' if args.amp else ''}: term on {median_on:.4f} s, off {median_off:.4f} s "
          f"(median of {args.rounds} interleaved) -> ratio on/off {median_on / median_off:.4f} "
          "(target <= 1.02)")


def penalty_alone(args) -> None:
    model, _ = build(True, args)
    penalty = find_l2_penalty(model)
    weights = list(penalty._weights)
    thetas = list(penalty.thetas)
    grads = [torch.empty_like(w) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    data_grads = [torch.zeros_like(w) for w in weights]

    def clear():
        # as in training: the data loss has already left a gradient on every weight
        for weight, grad in zip(weights, data_grads):
            weight.grad = grad
        for theta in thetas:
            theta.grad = None

    def ours():
        penalty.penalty().backward()  # value and theta gradients (autograd)
        penalty.add_weight_gradients()  # what the optimizer's step adds first
    def naive():
        total = 0.0
        for amplitude, theta, weight in zip(penalty.amplitudes, thetas, weights):
            total = total + amplitude * hard_sigmoid_keras(theta) * (weight * weight).sum()
        total.backward()

    def floor():
        torch._foreach_copy_(grads, weights)

    def timed(fn):
        samples = []
        for _ in range(args.penalty_repeats):
            clear()
            synchronize(args.device)
            start = time.perf_counter()
            fn()
            synchronize(args.device)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[2:])

    results = {}
    for _ in range(2):  # interleave the three, twice, keep the better median of each
        for name, fn in (("floor", floor), ("foreach", ours), ("naive", naive)):
            value = timed(fn)
            results[name] = min(results.get(name, value), value)
    print(f"penalty fwd+bwd over {len(weights)} tensors ({nbytes / 2**20:.1f} MiB): "
          f"foreach {results['foreach'] * 1e3:.2f} ms, naive per-tensor loop "
          f"{results['naive'] * 1e3:.2f} ms, bandwidth floor {results['floor'] * 1e3:.2f} ms")
    print(f"  ratio foreach / floor {results['foreach'] / results['floor']:.2f} (target <= 3), "
          f"foreach / naive {results['foreach'] / results['naive']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", default="50x")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved on/off step pairs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--penalty-repeats", type=int, default=20)
    parser.add_argument("--skip-steps", action="store_true", help="only the penalty-alone part")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.amp = gpu
    args.batch = args.batch or (64 if gpu else 16)
    args.size = args.size or ([384, 128] if gpu else [256, 128])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    penalty_alone(args)
    if not args.skip_steps:
        step_time_ratio(args)


if __name__ == "__main__":
    main()
