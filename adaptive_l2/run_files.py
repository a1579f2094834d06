"""The names of the files a run writes in its OUTPUT_DIR (and the table tool in its root), in one
place: the trainer, its hooks, the tools and the table tool all read and write them through here.
"""
# Written by fast-reid itself (its names, listed so the project's readers use the same ones).
CONFIG_FILE = "config.yaml"  # the run's full config (fast-reid's default_setup; prepare_run)
LOG_FILE = "log.txt"  # console messages of fast-reid and the project (setup_logger)
METRICS_FILE = "metrics.json"  # fast-reid's JSONWriter: one JSON record per line
LAST_CHECKPOINT = "last_checkpoint"  # the name of the newest checkpoint (fast-reid's Checkpointer)
FINAL_MODEL = "model_final.pth"  # the last checkpoint of a finished training
BEST_MODEL = "model_best"  # the best evaluation's checkpoint, without ".pth" (a checkpoint name)

# Written by the project.
RESULTS_FILE = "final_results.json"  # final metrics: a run holding it has finished
RUN_LOCK_FILE = "run.lock"  # one run per OUTPUT_DIR (adaptive_l2.run_lock)
EVAL_HISTORY_FILE = "eval_history.jsonl"  # every evaluation's metrics with its epoch
FACTORS_FILE = "l2_factors.jsonl"  # every factor lambda_n of the L2 term, per logged epoch
RANK_FINGERPRINTS = "rank_fingerprints.json"  # several processes: each rank's parameter sums
ROBUSTNESS_FILE = "robustness.json"  # adaptive-l2-attack: metrics clean and under attack
CONSOLE_FILE = "console.txt"  # the table tool: a row's command, stdout and stderr
FACTOR_HISTOGRAM = "factor_histogram.png"  # adaptive-l2-plot: final factors per kind
FACTOR_TRAJECTORIES = "factor_trajectories.png"  # adaptive-l2-plot: every factor per epoch

# Written by the table tool in its output root.
TABLE_MARKDOWN = "results.md"
TABLE_CSV = "results.csv"

# Written by the tuner (adaptive-l2-tune) in its output folder.
TRIALS_TABLE = "trials.csv"  # one row per trial: state, value, parameters, folder, error
BEST_TRIAL_FILE = "best.json"  # best parameters, validation value, the test-set evaluation
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
