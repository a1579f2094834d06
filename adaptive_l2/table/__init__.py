"""The table tool (`adaptive-l2-table`, tools/reproduce_table.py): rebuild the paper's results
table, or the same table on the embedded synthetic dataset.

A suite is a list of rows, each a config file; a row is finished when its OUTPUT_DIR holds
final_results.json, and an interrupted row resumes from its last checkpoint. One module per step:

  suite.py   the rows: suites, the paper's numbers, reference rows, `select_rows` (--rows),
             `seeded_rows` (--seeds), a row's `output_dir` and `row_status`
  runner.py  `train_command` and `run_suite`: the unfinished rows in child processes, one after
             the other or one per GPU slot (`gpu_slots`), with per-row console.txt and ETA
             (adaptive_l2.cluster runs the same runner inside Slurm / submitit jobs)
  cost.py    `dry_run`: each row's command and cost, timed with the trainer's own training step
  report.py  `collect_and_write` (final model, and the best evaluation of the second phase,
             labelled "selected on test"), `collect_seeds_and_write` (mean +/- 95 % CI and paired
             differences to the suite's reference row; the statistics are in adaptive_l2.intervals)

Import from the modules themselves; this package re-exports nothing.
"""
