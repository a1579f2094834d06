"""Optuna studies over the regularizer settings, each trial a normal training run.

The paper's author advises tuning the amplitude A by hyper-parameter optimisation. Here a study
samples the settings of a search space (`adaptive_l2.tune.space`), trains each trial as any run in
DIR/trial_NNNN (run lock, checkpoints, resume), with the validation split carved from the training
identities ON (`DATASETS.VALIDATION`): the objective never sees the test set. Every evaluation
reports its metric to Optuna (`TrialReporter`), and the pruner stops hopeless trials (state
PRUNED, run folder kept, resumable). A failing trial is marked FAIL with its error and the study
goes on. When the trials are done, `write_report` evaluates the best trial's final model ONCE on
the test set and writes best.json, trials.csv and two PNGs.

Workers share one study through its storage (SQLite in DIR by default; any SQLAlchemy URL); a
second call with the same storage and study name continues the study. A trial whose worker died
(no heartbeat) is retried by the next worker in the dead trial's folder, from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from fastreid.engine.train_loop import HookBase

from adaptive_l2.config import load_config
from adaptive_l2.data.validation import validation_enabled
from adaptive_l2.run_files import (BEST_TRIAL_FILE, FINAL_MODEL, HISTORY_PLOT, IMPORTANCE_PLOT,
                                   LAST_CHECKPOINT, RESULTS_FILE, TRIALS_TABLE)
from adaptive_l2.seeds import derived_seed
from adaptive_l2.tune.space import Param, as_opts, parse_space, suggest

logger = logging.getLogger(__name__)

TRIAL_FOLDER = "trial_{:04d}"
TEST_FOLDER = "test_of_trial_{:04d}"  # the best trial's single test-set evaluation
DEFAULT_VALIDATION_FRACTION = 0.2  # held-out training identities when the config sets none
HEARTBEAT_SECONDS = 60  # a RUNNING trial without a heartbeat for 3 x this is retried

@dataclass
class StudySettings:
    """Everything a worker needs to run trials of one study (picklable for submitit)."""
    config_file: str
    opts: List[str]
    output_dir: str
    study_name: str
    storage: str
    space: Dict = field(default_factory=dict)
    space_source: str = "search space"
    metric: str = "mAP"
    direction: str = "maximize"
    pruner: str = "median"
    sampler_seed: Optional[int] = None  # None: Optuna's sampler draws unseeded proposals

    def base_opts(self) -> List[str]:
        """The user's overrides plus what every trial shares: the validation split on (the
        config's, or DEFAULT_VALIDATION_FRACTION of the training identities), a fixed SEED."""
        cfg = load_config(self.config_file, self.opts)
        extra = []
        if not validation_enabled(cfg):
            extra += ["DATASETS.VALIDATION.FRACTION", str(DEFAULT_VALIDATION_FRACTION)]
        if cfg.SEED < 0:
            extra += ["SEED", "0"]  # the same data stream and initialisation for every trial
        return [*self.opts, *extra]

    def params(self) -> List[Param]:
        return parse_space(self.space, load_config(self.config_file, self.base_opts()),
                           self.space_source)


def default_storage(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "study.db"))


def build_pruner(name: str):
    """`median` (MedianPruner: stop a trial below the median of the others at the same
    evaluation, after 2 finished trials), `none`, or `threshold:X` (stop below X)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name.startswith("threshold:"):
        try:
            lower = float(name.split(":", 1)[1])
        except ValueError as error:
            raise ValueError(f"--pruner '{name}': expected threshold:NUMBER") from error
        return optuna.pruners.ThresholdPruner(lower=lower)
    raise ValueError(f"--pruner must be median, none or threshold:X, got '{name}'")


def open_study(settings: StudySettings, create: bool = False):
    """The study in its storage (created when `create`), with heartbeats so that a trial whose
    worker died is retried (in its own folder, from its last checkpoint)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            settings.storage, heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=3 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    pruner = build_pruner(settings.pruner)
    if create:
        study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                    direction=settings.direction, load_if_exists=True,
                                    pruner=pruner)
    else:
        study = optuna.load_study(storage=storage, study_name=settings.study_name, pruner=pruner)
    seed = settings.sampler_seed
    if seed is not None:
        # keyed by the trials so far: a continued study does not repeat its first proposals
        seed = derived_seed([seed, len(study.trials)], bits=32)
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def metric_value(results: Mapping, metric: str) -> float:
    """The objective from fast-reid's results (a flat dict for one evaluated set)."""
    if metric not in results:
        raise KeyError(f"--metric '{metric}' is not in the evaluation results "
                       f"{sorted(k for k in results if not isinstance(results[k], str))}")
    return float(results[metric])


class _StopPrunedRun(BaseException):
    """Raised by TrialReporter inside fast-reid's loop: a BaseException so the loop's
    `except Exception` does not log it as a crash; its `finally` still ends the run cleanly."""


class TrialReporter(HookBase):
    """After each evaluation: its metric to the Optuna trial (step = epoch), and a stop when the
    pruner says so (not at the last epoch: the run is complete then). Registered last, after the
    checkpointer and the writers, so a pruned run's folder holds its last epoch."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.metric = metric
        self._last = None

    def after_epoch(self):
        results = getattr(self.trainer, "_last_eval_results", None)
        if results is None or results is self._last:
            return
        self._last = results
        epoch = int(self.trainer.epoch) + 1
        value = metric_value(results, self.metric)
        self.trial.report(value, step=epoch)
        if epoch < self.trainer.max_epoch and self.trial.should_prune():
            raise _StopPrunedRun(f"pruned at epoch {epoch}: {self.metric} {value:.4g}")


@contextlib.contextmanager
def run_loggers() -> Iterator[None]:
    """fast-reid's setup_logger adds console and log.txt handlers per OUTPUT_DIR; several runs in
    one process would write each later run's messages into every earlier run's log.txt. The
    handlers a run adds are removed when it ends."""
    loggers = [logging.getLogger(name) for name in ("fastreid", "adaptive_l2", "fvcore")]
    before = {id(lg): list(lg.handlers) for lg in loggers}
    try:
        yield
    finally:
        for lg in loggers:
            for handler in [h for h in lg.handlers if h not in before[id(lg)]]:
                lg.removeHandler(handler)


def trial_folder(settings: StudySettings, trial) -> Tuple[str, bool]:
    """The trial's run folder and whether to resume it: a retried trial (its worker died; Optuna
    copies the dead trial's attributes to its retry) continues in the dead trial's folder."""
    previous = trial.user_attrs.get("output_dir")
    if previous and os.path.isfile(os.path.join(previous, LAST_CHECKPOINT)):
        return previous, True
    return os.path.join(settings.output_dir, TRIAL_FOLDER.format(trial.number)), False


def run_trial(trial, settings: StudySettings, params: Sequence[Param]) -> float:
    """One trial: a normal training run with the trial's settings on the validation split."""
    import optuna

    from adaptive_l2.run_lock import claim_output_dir
    from adaptive_l2.trainer import Trainer

    values = suggest(trial, params)
    directory, resume = trial_folder(settings, trial)
    trial.set_user_attr("output_dir", directory)
    opts = [*settings.base_opts(), *as_opts(values), "OUTPUT_DIR", directory]
    try:
        cfg = load_config(settings.config_file, opts)
        cfg.freeze()
        lock = claim_output_dir(directory, resume=resume,
                                command=["adaptive-l2-tune", f"trial {trial.number}"])
        try:
            with run_loggers():
                logger.info("trial %d: %s in %s", trial.number, values, directory)
                trainer = Trainer(cfg)
                trainer.register_hooks([TrialReporter(trial, settings.metric)])
                trainer.resume_or_load(resume=resume)
                try:
                    results = trainer.train()
                except _StopPrunedRun as stop:
                    trial.set_user_attr("pruned", str(stop))
                    raise optuna.TrialPruned(str(stop)) from None
        finally:
            lock.release()
        return metric_value(results, settings.metric)
    except optuna.TrialPruned:
        raise
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
        raise


def run_worker(settings: StudySettings, n_trials: int) -> int:
    """Run `n_trials` trials of the study (one worker; several may run at once); returns how
    many trials the study gained meanwhile. A failing trial is recorded as FAIL and the next one
    starts."""
    params = settings.params()  # refused here, before a trial starts, if the space is wrong
    study = open_study(settings)
    before = len(study.trials)
    study.optimize(lambda trial: run_trial(trial, settings, params), n_trials=n_trials,
                   catch=(Exception,), gc_after_trial=True)
    return len(study.trials) - before


def split_trials(total: int, workers: int) -> List[int]:
    """`total` trials over `workers` workers, as evenly as possible (none empty)."""
    workers = max(1, min(workers, total)) if total else 0
    return [total // workers + (index < total % workers) for index in range(workers)]


# -- after the trials -------------------------------------------------------------------------

def test_best_trial(settings: StudySettings, study) -> Optional[Dict]:
    """The best trial's final model evaluated once on the test set (validation off), in
    DIR/test_of_trial_NNNN; kept when done before."""
    from adaptive_l2.cli.train import main as train_main

    best = study.best_trial
    trial_dir = best.user_attrs.get("output_dir", "")
    weights = os.path.join(trial_dir, FINAL_MODEL)
    if not os.path.isfile(weights):
        logger.warning("best trial %d has no %s: not evaluated on the test set", best.number,
                       weights)
        return None
    test_dir = os.path.join(settings.output_dir, TEST_FOLDER.format(best.number))
    results_path = os.path.join(test_dir, RESULTS_FILE)
    if not os.path.isfile(results_path):
        opts = [*settings.base_opts(), *as_opts(best.params), "DATASETS.VALIDATION.IDENTITIES",
                "0", "DATASETS.VALIDATION.FRACTION", "0.0", "MODEL.WEIGHTS", weights,
                "OUTPUT_DIR", test_dir]
        with run_loggers():
            train_main(["--config-file", settings.config_file, "--eval-only", *opts])
    with open(results_path) as handle:
        return json.load(handle)


def write_trials_table(study, path: str) -> None:
    """One row per trial: number, state, value, parameters, duration, folder, error."""
    keys = sorted({key for trial in study.trials for key in trial.params})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", *keys, "seconds", "output_dir", "note"])
        for trial in study.trials:
            seconds = trial.duration.total_seconds() if trial.duration else ""
            note = trial.user_attrs.get("error") or trial.user_attrs.get("pruned", "")
            writer.writerow([trial.number, trial.state.name,
                             "" if trial.value is None else trial.value,
                             *[trial.params.get(key, "") for key in keys],
                             seconds if seconds == "" else round(seconds, 1),
                             trial.user_attrs.get("output_dir", ""), note])


def write_plots(study, output_dir: str) -> List[str]:
    """The optimisation history and the parameter importances (fANOVA, needs 2+ complete
    trials and scikit-learn, a dependency of the project) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plots = [(HISTORY_PLOT, lambda: optuna_plots.plot_optimization_history(study))]
        distinct = len({t.value for t in complete})
        if distinct >= 2:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            plots.append((IMPORTANCE_PLOT, lambda: optuna_plots.plot_param_importances(
                study, evaluator=evaluator)))
        else:  # fANOVA raises on a target without variance ("zero total variance in all trees")
            logger.warning("parameter importances need 2 complete trials with different values "
                           "(%d complete, %d distinct values): not drawn", len(complete), distinct)
        for name, draw in plots:
            axes = draw()
            figure = axes.figure
            figure.set_size_inches(6.4, 4.0)
            figure.tight_layout()
            path = os.path.join(output_dir, name)
            figure.savefig(path, dpi=80)
            plt.close(figure)
            written.append(path)
    return written


def write_report(settings: StudySettings) -> Dict:
    """best.json (best parameters, validation value, test-set results), trials.csv, PNGs."""
    import optuna

    study = open_study(settings)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    path = os.path.join(settings.output_dir, TRIALS_TABLE)
    write_trials_table(study, path)
    report = {"study": settings.study_name, "storage": settings.storage,
              "metric": settings.metric, "direction": settings.direction,
              "trials": {state.name: sum(t.state == state for t in study.trials)
                         for state in optuna.trial.TrialState},
              "trials_table": path}
    if complete:
        best = study.best_trial
        test = test_best_trial(settings, study)
        report.update({
            "best_trial": best.number, "params": best.params,
            f"validation_{settings.metric}": best.value,
            "best_trial_dir": best.user_attrs.get("output_dir"),
            "test": test,
            f"test_{settings.metric}": None if test is None else test.get(settings.metric),
            "test_dir": os.path.join(settings.output_dir, TEST_FOLDER.format(best.number)),
        })
    report["plots"] = write_plots(study, settings.output_dir)
    with open(os.path.join(settings.output_dir, BEST_TRIAL_FILE), "w") as handle:
        json.dump(report, handle, indent=2, default=float)
    return report

