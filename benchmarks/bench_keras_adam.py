#!/usr/bin/env python3
"""Step time of `KerasAdam` (SOLVER.ADAM_GLOBAL_STEP True) against torch's Adam.

Over the parameters of fast-reid's ResNet-50 (159 tensors, 23.5 M values) with random gradients:
torch's Adam as the project builds it (default implementation: a per-tensor loop on CPU, foreach
on CUDA), torch's Adam with foreach=True, and KerasAdam (foreach). Runs interleaved, per-step time
of the process (CPU time on a CPU, so other processes on a shared machine count less; wall time
with synchronisation on CUDA), median of the rounds. Exits 0: a benchmark reports, it does not
judge.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import adaptive_l2  # noqa: F401
from adaptive_l2.keras_adam import KerasAdam
from adaptive_l2.modeling.two_branch import build_resnet
from fastreid.config import get_cfg


def resnet50_parameters(device: str) -> List[torch.Tensor]:
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.DEPTH = "50x"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    return [p.detach().to(device) for p in build_resnet(cfg).parameters()]


def seconds_per_step(make: Callable, params: List[torch.Tensor], steps: int, device: str) -> float:
    params = [p.clone().requires_grad_() for p in params]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = make(params)
    for _ in range(2):
        optimizer.step()
    clock = time.process_time if device == "cpu" else time.perf_counter
    if device != "cpu":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        optimizer.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return (clock() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = resnet50_parameters(args.device)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f} M values, "
          f"{args.device}, {args.threads} thread(s)")
    makers: Dict[str, Callable] = {
        "torch Adam (default)": lambda ps: torch.optim.Adam(ps, lr=1e-4, eps=1e-7),
        "torch Adam foreach=True": lambda ps: torch.optim.Adam(ps, lr=1e-4, eps=1e-7, foreach=True),
        "KerasAdam": lambda ps: KerasAdam(ps, lr=1e-4, eps=1e-7),
    }
    times: Dict[str, List[float]] = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, make in makers.items():
            times[name].append(seconds_per_step(make, params, args.steps, args.device))
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1e3:.0f} ms/step "
              f"(rounds: {', '.join(f'{v * 1e3:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
