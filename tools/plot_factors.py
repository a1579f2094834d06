#!/usr/bin/env python3
"""Draw the L2 factors of a finished run: `tools/plot_factors.py RUN_DIR [--out DIR]`
(`adaptive-l2-plot`)."""
import sys

from adaptive_l2.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
