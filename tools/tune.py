#!/usr/bin/env python3
"""An Optuna study over the regularizer settings (`adaptive-l2-tune`); see adaptive_l2/cli/tune.py
or `--help` for the options."""
import sys

from adaptive_l2.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
