#!/usr/bin/env python3
"""Cost of the adaptive L2 term, measured side by side in one run.

1. Step time (forward + backward + Adam step) of fast-reid's Baseline with the term on vs off,
   same model and batch, runs interleaved (on, off, on, off, ...), median of each.
2. The penalty's forward + backward alone (value, theta gradients, and the weight gradients added
   to the existing gradients), as the project's optimizer runs it ("fused": the optimizer claims
   the weight gradient and adds it in one multi-tensor pass) and as any other optimizer gets it
   ("autograd"), vs a memory-bandwidth floor (one pass that reads every regularized tensor and
   writes a gradient-sized tensor: `torch._foreach_copy_`) and vs the naive per-tensor Python
   loop (one small kernel per tensor, autograd through each). Interleaved rounds; each ratio is
   the median over rounds of the time against the floor of the same round.

CPU default: R50, batch 16, 256x128. `--device cuda` (where a GPU exists): R50, batch 64, 384x128,
AMP. Prints ratios against the named baselines; exits 0 (a benchmark reports, it does not judge).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import adaptive_l2  # noqa: F401
from adaptive_l2.config import load_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.regularizers import find_l2_penalty, hard_sigmoid_keras
from adaptive_l2.trainer import Trainer


def build(adaptive: bool, args):
    opts = ["MODEL.DEVICE", args.device, "MODEL.BACKBONE.DEPTH", args.depth,
            "MODEL.HEADS.NUM_CLASSES", "751", "MODEL.REG.NAME", "adaptive" if adaptive else "none",
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
    model, optimizer = build(True, args)
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

    def fused():
        # a step's penalty work with the project's optimizer, which claims the weight gradient
        penalty.penalty().backward()  # value and theta gradients (autograd)
        optimizer.before_step(optimizer)  # the fused weight-gradient pass its step runs first

    def autograd():
        # the same with any other optimizer: autograd gives the weights 2 * lambda * W
        penalty.release_weight_gradient(optimizer)
        try:
            penalty.penalty().backward()
        finally:
            penalty.claim_weight_gradient(optimizer)

    def naive():
        total = 0.0
        for amplitude, theta, weight in zip(penalty.amplitudes, thetas, weights):
            total = total + amplitude * hard_sigmoid_keras(theta) * (weight * weight).sum()
        total.backward()

    def floor():
        torch._foreach_copy_(grads, weights)

    def timed(fn):
        clear()
        synchronize(args.device)
        start = time.perf_counter()
        fn()
        synchronize(args.device)
        return time.perf_counter() - start

    candidates = {"floor": floor, "fused": fused, "autograd": autograd, "naive": naive}
    samples = {name: [] for name in candidates}
    for round_index in range(args.penalty_repeats + 2):  # interleaved; the first 2 warm up
        for name, fn in candidates.items():
            elapsed = timed(fn)
            if round_index >= 2:
                samples[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in samples.items()}

    def ratio(name):
        # per round against the floor of the same round (a shared machine's load drifts)
        return statistics.median(a / b for a, b in zip(samples[name], samples["floor"]))

    print(f"penalty fwd+bwd over {len(weights)} tensors ({nbytes / 2**20:.1f} MiB), median of "
          f"{args.penalty_repeats} interleaved rounds: fused {median['fused'] * 1e3:.2f} ms, "
          f"autograd {median['autograd'] * 1e3:.2f} ms, naive per-tensor loop "
          f"{median['naive'] * 1e3:.2f} ms, bandwidth floor {median['floor'] * 1e3:.2f} ms")
    print(f"  ratio fused / floor {ratio('fused'):.2f} (target <= 1.5), autograd / floor "
          f"{ratio('autograd'):.2f}, naive / floor {ratio('naive'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", default="50x")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved on/off step pairs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--penalty-repeats", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 steadies a shared machine")
    parser.add_argument("--skip-steps", action="store_true", help="only the penalty-alone part")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
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
