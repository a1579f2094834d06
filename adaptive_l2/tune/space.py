"""Search spaces of a study: presets or a small YAML, checked against the config.

A space maps config keys to `{low, high[, log, step]}` (numbers; integers for an int key) or
`{choices: [...]}`. Any config key may be tuned; a key the config does not have, a field not in
SPEC_FIELDS, a bad range, or a key whose term the config leaves off (it would change nothing) is
refused naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from adaptive_l2.config import l2_term

_LOG = {"low": 1e-4, "high": 1e-1, "log": True}
KINDS = ("KERNEL", "BIAS", "NORM_WEIGHT", "NORM_BIAS")
PRESETS: Dict[str, Dict[str, Dict]] = {
    "amplitude": {"MODEL.REG.AMPLITUDE": dict(_LOG)},
    "amplitude_per_kind": {f"MODEL.REG.AMPLITUDE_PER_KIND.{kind}": dict(_LOG) for kind in KINDS},
    "sgp": {"MODEL.REG.SGP.ALPHA": {"low": 0.01, "high": 1.0, "log": True},
            "MODEL.REG.SGP.PROB": {"low": 0.1, "high": 1.0}},
    "conventional": {"MODEL.REG.CONVENTIONAL.FACTOR": {"low": 1e-5, "high": 1e-1, "log": True}},
}
PRESETS["adaptive_sgp"] = {**PRESETS["amplitude"], **PRESETS["sgp"]}
SPEC_FIELDS = ("low", "high", "log", "step", "choices")

# keys that change nothing unless the config switches their term on
_NEEDS = (("MODEL.REG.AMPLITUDE", lambda cfg: l2_term(cfg)[0] == "adaptive",
           "MODEL.REG.NAME adaptive"),
          ("MODEL.REG.CONVENTIONAL.", lambda cfg: l2_term(cfg)[0] == "conventional",
           "MODEL.REG.NAME conventional"),
          ("MODEL.REG.SGP.", lambda cfg: bool(cfg.MODEL.REG.SGP.ENABLED),
           "MODEL.REG.SGP.ENABLED True"))


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key and its range or choices."""
    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[Tuple] = None
    integer: bool = False


def _config_value(cfg, key: str, where: str):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(f"{where}: unknown config key '{key}'")
        node = node[part]
    return node


def parse_space(spec: Mapping, cfg, where: str = "search space") -> List[Param]:
    """Check a search space ({KEY: {low, high[, log, step]} or {choices: [...]}}) against the
    config: a key it does not have, a field not in SPEC_FIELDS, a bad range, or a key whose
    term the config leaves off are refused, naming the key."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{where}: expected a mapping of config keys to ranges, got {spec!r}")
    params = []
    for key, entry in spec.items():
        default = _config_value(cfg, str(key), where)
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: {key}: expected {{low, high[, log, step]}} or "
                             f"{{choices: [...]}}, got {entry!r}")
        unknown = [name for name in entry if name not in SPEC_FIELDS]
        if unknown:
            raise KeyError(f"{where}: {key}: unknown field(s) {unknown}; known: {list(SPEC_FIELDS)}")
        for prefix, needed, switch in _NEEDS:
            if str(key).startswith(prefix) and not needed(cfg):
                raise ValueError(f"{where}: {key} changes nothing unless the config sets {switch}")
        if "choices" in entry:
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: {key}: choices must be a non-empty list")
            params.append(Param(str(key), choices=tuple(choices)))
            continue
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ValueError(f"{where}: {key} is not numeric (default {default!r}): give choices")
        try:
            low, high = float(entry["low"]), float(entry["high"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: {key}: needs numeric low and high ({error})") from error
        log = bool(entry.get("log", False))
        if not low < high or (log and low <= 0):
            raise ValueError(f"{where}: {key}: needs low < high (and low > 0 with log), got "
                             f"{low}, {high}")
        step = entry.get("step")
        integer = isinstance(default, int)
        if log and step is not None and not (integer and float(step) == 1):
            # Optuna refuses these in every trial: each would fail and the study end empty
            raise ValueError(f"{where}: {key}: 'step' cannot be combined with 'log' (Optuna takes "
                             "a log scale without steps; an integer key's step may only be 1)")
        params.append(Param(str(key), low, high, log, None if step is None else float(step),
                            integer=integer))
    return params


def load_space(space_file: str = "", preset: str = "") -> Tuple[Dict, str]:
    """The search-space mapping of a YAML file or a preset, and where it came from."""
    if space_file and preset:
        raise ValueError("give --space or --space-preset, not both")
    if space_file:
        try:
            with open(space_file) as handle:
                return yaml.safe_load(handle), f"--space {space_file}"
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"--space {space_file}: cannot read it as YAML ({error})") from error
    preset = preset or "amplitude"
    if preset not in PRESETS:
        raise ValueError(f"--space-preset '{preset}' is unknown; presets: {sorted(PRESETS)}")
    return PRESETS[preset], f"--space-preset {preset}"


def suggest(trial, params: Sequence[Param]) -> Dict[str, object]:
    """The trial's value of every parameter, drawn by Optuna's sampler."""
    values = {}
    for param in params:
        if param.choices is not None:
            values[param.key] = trial.suggest_categorical(param.key, list(param.choices))
        elif param.integer:
            values[param.key] = trial.suggest_int(param.key, int(param.low), int(param.high),
                                                  step=int(param.step or 1), log=param.log)
        else:
            values[param.key] = trial.suggest_float(param.key, param.low, param.high,
                                                    step=param.step, log=param.log)
    return values


def as_opts(values: Mapping[str, object]) -> List[str]:
    """KEY VALUE overrides of a trial's parameters (repr keeps floats exact through yacs)."""
    return [item for key, value in values.items() for item in (key, repr(value))]


