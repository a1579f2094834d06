"""Adaptive L2 regularization and stochastic gradient perturbation for fast-reid.

Importing this package first patches fast-reid 1.4.0 for Python 3.11 / torch 2 / NumPy 2
(`adaptive_l2.compat`), then registers the project's datasets and models with fast-reid's
registries (on import, as fast-reid's own registrations).
"""
from adaptive_l2 import compat as _compat

_compat.apply_all()

from adaptive_l2 import data, modeling  # noqa: E402,F401  (registers datasets and models)
from adaptive_l2.data import paper_datasets  # noqa: E402,F401
from adaptive_l2.config import add_reg_config, check_config  # noqa: E402
from adaptive_l2.trainer import Trainer  # noqa: E402

__all__ = ["Trainer", "add_reg_config", "check_config"]
