#!/usr/bin/env python3
"""Rebuild the paper's results table, or the synthetic demo (`adaptive-l2-table`); see
adaptive_l2/cli/table.py or `--help` for the options."""
import sys

from adaptive_l2.cli.table import main

if __name__ == "__main__":
    sys.exit(main())
