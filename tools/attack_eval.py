#!/usr/bin/env python3
"""Evaluate a checkpoint clean and under FGSM / PGD-10 metric attacks on the query images.

`tools/attack_eval.py --config-file CFG MODEL.WEIGHTS run/model_final.pth [KEY VALUE ...]`
"""
from adaptive_l2.attack_cli import main_from_command_line

if __name__ == "__main__":
    main_from_command_line()
