"""The command-line tools, each a console entry point of the package and a thin tools/*.py:

* `adaptive-l2-train`  (`train.py`)  -- train or evaluate one config (fast-reid's train_net);
* `adaptive-l2-table`  (`table.py`)  -- the paper's table, or the synthetic demo, row by row;
* `adaptive-l2-attack` (`attack.py`) -- a checkpoint clean and under metric attacks;
* `adaptive-l2-plot`   (`plot.py`)   -- the L2 factors of a finished run.

Paths on the command line (configs, OUTPUT_DIR, --output-root) are taken from the current folder;
a config not found there is looked up among the shipped ones (`adaptive_l2/configs`).
"""
