#!/usr/bin/env python3
"""Train or evaluate a fast-reid model with the project's regularizers (`adaptive-l2-train`).

fast-reid's conventions: --config-file, --eval-only, --resume, --num-gpus, --num-machines,
--machine-rank, --dist-url, then KEY VALUE config overrides. See adaptive_l2/cli/train.py.
"""
import sys

from adaptive_l2.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
