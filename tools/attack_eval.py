#!/usr/bin/env python3
"""Evaluate a checkpoint clean and under FGSM / PGD-10 metric attacks (`adaptive-l2-attack`).

`tools/attack_eval.py --config-file CFG MODEL.WEIGHTS run/model_final.pth [KEY VALUE ...]`
"""
import sys

from adaptive_l2.cli.attack import main

if __name__ == "__main__":
    sys.exit(main())
