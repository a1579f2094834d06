"""MODEL.REG.NAME chooses the L2 term; the old switches still work, with a deprecation warning,
and contradictions or unknown names are refused naming the key."""
import glob
import os
import warnings

import pytest
from conftest import SYNTHETIC_BASE

from adaptive_l2.config import l2_term, load_config, shipped_configs_dir
from adaptive_l2.regularizers import AdaptiveL2Penalty, ConventionalL2Penalty
from adaptive_l2.trainer import Trainer

SMALL = ["MODEL.HEADS.NUM_CLASSES", "4", "MODEL.BACKBONE.DEPTH", "18x"]


def test_name_chooses_the_term_and_defaults_to_none():
    assert l2_term(load_config(SYNTHETIC_BASE)) == ("none", "MODEL.REG.NAME")
    adaptive = Trainer.build_model(load_config(SYNTHETIC_BASE, [*SMALL, "MODEL.REG.NAME",
                                                                "adaptive"]))
    conventional = Trainer.build_model(load_config(SYNTHETIC_BASE, [*SMALL, "MODEL.REG.NAME",
                                                                    "conventional"]))
    assert isinstance(adaptive.l2_penalty, AdaptiveL2Penalty)
    assert isinstance(conventional.l2_penalty, ConventionalL2Penalty)
    assert not hasattr(Trainer.build_model(load_config(SYNTHETIC_BASE, SMALL)), "l2_penalty")


@pytest.mark.parametrize("old,term", [("MODEL.REG.ADAPTIVE", "adaptive"),
                                      ("MODEL.REG.CONVENTIONAL.ENABLED", "conventional")])
def test_old_switch_gives_the_same_term_with_a_deprecation_warning(old, term):
    with pytest.warns(FutureWarning, match=rf"{old} is deprecated: set MODEL.REG.NAME {term}"):
        cfg = load_config(SYNTHETIC_BASE, [*SMALL, old, "True"])
        assert l2_term(cfg) == (term, old)
    with pytest.warns(FutureWarning):
        old_model = Trainer.build_model(cfg)
    new_model = Trainer.build_model(load_config(SYNTHETIC_BASE, [*SMALL, "MODEL.REG.NAME", term]))
    assert type(old_model.l2_penalty) is type(new_model.l2_penalty)
    assert old_model.l2_penalty.names == new_model.l2_penalty.names
    # the same name twice is accepted (a config moved halfway); another name is a contradiction
    with pytest.warns(FutureWarning):
        load_config(SYNTHETIC_BASE, [old, "True", "MODEL.REG.NAME", term])
    other = "conventional" if term == "adaptive" else "adaptive"
    with pytest.raises(ValueError, match=rf"MODEL.REG.NAME is '{other}' but the deprecated {old}"):
        load_config(SYNTHETIC_BASE, [old, "True", "MODEL.REG.NAME", other])


def test_unknown_name_is_refused_naming_the_key_and_value():
    with pytest.raises(ValueError, match="MODEL.REG.NAME must be one of adaptive, conventional, "
                                         "none, got 'adaptiv'"):
        load_config(SYNTHETIC_BASE, ["MODEL.REG.NAME", "adaptiv"])


def test_shipped_configs_use_the_name_not_the_old_switches():
    paths = glob.glob(os.path.join(shipped_configs_dir(), "**", "*.yml"), recursive=True)
    assert len(paths) == 38  # 33 + configs/Study (5)
    names = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for path in paths:
            names.add(l2_term(load_config(path, ["MODEL.DEVICE", "cpu"]))[0])
    assert names == {"adaptive", "conventional", "none"}
