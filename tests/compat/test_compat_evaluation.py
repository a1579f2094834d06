"""compat.evaluation: no compilation or sys.exit inside an evaluation."""
import sys
import warnings

import pytest


def test_evaluator_without_cython_warns_instead_of_exiting(monkeypatch):
    from fastreid.config import get_cfg
    from fastreid.evaluation import reid_evaluation

    monkeypatch.setitem(sys.modules, "fastreid.evaluation.rank_cylib.rank_cy", None)
    with pytest.raises(RuntimeError, match="make install"):
        reid_evaluation.compile_helper()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        evaluator = reid_evaluation.ReidEvaluator(get_cfg(), num_query=2)
    assert evaluator is not None


def test_rank_evaluator_was_built_at_install_time():
    from adaptive_l2.build_rank_evaluator import is_built

    assert is_built()
