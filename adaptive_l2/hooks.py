"""Training hooks: layer freezing that survives a resume, the evaluation history, logs cut back to
the resumed iteration, and a stop on divergence. (The L2 factor log is the penalty's own:
`adaptive_l2.regularizers.l2_base.L2FactorLogger`.)"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Dict, List

from fastreid.engine import hooks as fastreid_hooks
from fastreid.engine.train_loop import HookBase
from fastreid.utils import comm
from fastreid.evaluation.testing import flatten_results_dict

from adaptive_l2.run_files import EVAL_HISTORY_FILE, METRICS_FILE

logger = logging.getLogger(__name__)


def read_json_lines(path: str, drop_torn_tail: bool = False) -> List[Dict]:
    """The records of a JSON-lines log. A line that is not JSON raises a ValueError naming the file
    and the line; with `drop_torn_tail`, a bad last line (a run killed while writing it) is dropped
    with a warning instead."""
    with open(path) as handle:
        lines = [line for line in handle if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if drop_torn_tail and number == len(lines):
                logger.warning("%s: dropped its last line, cut while being written (%s)", path,
                               error)
                break
            raise ValueError(f"{path}, line {number} of {len(lines)}: not a JSON record ({error}); "
                             "the file was cut or edited (a run killed while writing it?)") from error
    return records


def _keep_records(path: str, keep: Callable[[Dict], bool]) -> None:
    """Rewrite a JSON-lines log in place with the records `keep` accepts (in place, not renamed:
    a writer may hold it open in append mode)."""
    if not path or not os.path.isfile(path) or not comm.is_main_process():
        return
    with open(path) as handle:
        count = sum(1 for line in handle if line.strip())
    kept = [record for record in read_json_lines(path, drop_torn_tail=True) if keep(record)]
    if len(kept) != count:
        with open(path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)


def keep_records_until(path: str, iteration: int) -> None:
    """Drop the records of a JSON-lines log written after `iteration`: the epochs a crashed run
    lived through after its last checkpoint, which its resumed run lives through again. A run
    starting at iteration 0 keeps none."""
    _keep_records(path, lambda record: iteration > 0 and record.get("iteration", 0) <= iteration)


class ResumableLayerFreeze(fastreid_hooks.LayerFreeze):
    """fast-reid's LayerFreeze (frozen children in eval mode, kept so after every evaluation),
    plus the optimizer's freeze switch driven by the trainer's iteration, which a resumed run
    restores (fast-reid's optimizer wrapper counts its own steps from 0 again after a resume)."""

    def __init__(self, model, optimizer, freeze_layers, freeze_iters):
        super().__init__(model, freeze_layers, freeze_iters)
        self.optimizer = optimizer

    def before_step(self):
        super().before_step()
        frozen = self.trainer.iter < self.freeze_iters
        self.optimizer.freeze_active = frozen
        if frozen:
            # an evaluation's inference_context ends with model.train(), which wakes the frozen
            # children (their BN would use batch statistics); fast-reid's hook never re-freezes
            for name, module in self.model.named_children():
                if name in self.freeze_layers and module.training:
                    module.eval()


class EvalHistory(HookBase):
    """Appends every evaluation's metrics, with its epoch, to OUTPUT_DIR/eval_history.jsonl, so a
    run's final model and its best evaluation ("selected on test") can both be reported."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, EVAL_HISTORY_FILE) if output_dir else ""
        self._last = None

    def _record(self) -> None:
        results = getattr(self.trainer, "_last_eval_results", None)
        if results is None or results is self._last:
            return
        self._last = results
        if self.path and comm.is_main_process():
            metrics = {k: float(v) for k, v in flatten_results_dict(results).items()
                       if not isinstance(v, str)}
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"epoch": int(self.trainer.epoch) + 1,
                                         "iteration": int(self.trainer.iter), **metrics}) + "\n")

    def before_train(self):
        keep_records_until(self.path, self.trainer.iter)

    def after_epoch(self):
        self._record()

    def after_train(self):
        self._record()


class ResumedMetricsLog(HookBase):
    """Cuts fast-reid's metrics.json back to the iterations before the (resumed) start, so a
    resumed run does not log the iterations it lives through again twice (fast-reid appends)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, METRICS_FILE) if output_dir else ""

    def before_train(self):
        start = self.trainer.iter  # a step's scalars are logged under the step's own iteration
        _keep_records(self.path, lambda record: record.get("iteration", start) < start)


class DivergenceGuard(HookBase):
    """Stops training when the loss is not finite or grows past `factor` times its early value (the
    smallest total loss among the run's first `early_iters` iterations, checked from the second
    iteration on), instead of training on exploding losses and reporting the result as a success.

    It reads the logged losses every `period` iterations (SOLVER.LOG_PERIOD) and at each epoch's
    end, every iteration since its last look: reading them every step would make the host wait
    for the device at every step."""

    def __init__(self, factor: float, early_iters: int, period: int = 1):
        self.factor = float(factor)
        self.early_iters = max(1, int(early_iters))
        self.period = max(1, int(period))
        self._early: List[float] = []
        self._checked = -1

    def after_step(self):
        if (self.trainer.iter + 1) % self.period == 0:
            self._check_new_losses()

    def after_epoch(self):
        self._check_new_losses()

    def _check_new_losses(self) -> None:
        history = self.trainer.storage.histories().get("total_loss")
        if history is None:
            return  # not the main process (only it holds the reduced losses)
        for loss, iteration in history.values():
            if iteration > self._checked:
                self._check(float(loss), int(iteration))
                self._checked = int(iteration)

    def _check(self, loss: float, iteration: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training diverged at iteration {iteration}: total_loss is {loss}. "
                "Lower SOLVER.BASE_LR (or check the data and the loss weights).")
        reference = min(self._early) if self._early else math.inf
        if len(self._early) < self.early_iters:
            self._early.append(loss)  # the early value is known from the first iteration on
        if loss > self.factor * reference:
            raise FloatingPointError(
                f"training diverged at iteration {iteration}: total_loss {loss:.4g} is more "
                f"than SOLVER.DIVERGENCE.FACTOR ({self.factor:g}) x its early value {reference:.4g} "
                f"(the smallest of the first {self.early_iters} iterations). Lower SOLVER.BASE_LR, "
                "or raise SOLVER.DIVERGENCE.FACTOR / set SOLVER.DIVERGENCE.ENABLED False.")
