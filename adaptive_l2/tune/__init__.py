"""Optuna studies over the regularizer settings (`adaptive-l2-tune`): search spaces and studies."""
from adaptive_l2.tune.space import PRESETS, Param, load_space, parse_space
from adaptive_l2.tune.study import StudySettings, open_study, run_worker, write_report

__all__ = ["PRESETS", "Param", "StudySettings", "load_space", "open_study", "parse_space",
           "run_worker", "write_report"]
