#!/usr/bin/env python3
"""Sum of squared parameters (BN running statistics and the thetas excluded) of the final model of
every seed of the multi-seed study's rows: does the L2 term shrink the weights?

  python benchmarks/study_weight_norms.py logs/study
"""
from __future__ import annotations

import glob
import os
import statistics
import sys
from typing import List, Optional

import torch

ROWS = ("none", "conventional", "adaptive", "adaptive_decoupled")
SKIPPED = ("l2_penalty", "running_", "num_batches_tracked")


def squared_norm(checkpoint: str) -> float:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    return sum(float((value.double() ** 2).sum()) for key, value in state.items()
               if value.is_floating_point() and not any(s in key for s in SKIPPED))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: study_weight_norms.py OUTPUT_ROOT (e.g. logs/study)")
    for row in ROWS:
        paths = sorted(glob.glob(os.path.join(argv[0], "Study", row, "seed*", "model_final.pth")))
        values = [squared_norm(p) for p in paths]
        mean = f"{statistics.mean(values):.0f}" if values else "-"
        print(f"{row}: {len(values)} seeds, mean {mean}, per seed {[round(v) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
