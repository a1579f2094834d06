"""Training hooks: the per-tensor L2 factors, layer freezing that survives a resume, logs cut back
to the resumed iteration, and a stop on divergence."""
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

from adaptive_l2.optim import FREEZE
from adaptive_l2.regularizers.l2 import THETA_DEAD, AdaptiveL2Penalty, L2PenaltyBase
from adaptive_l2.run_files import EVAL_HISTORY_FILE, FACTORS_FILE, METRICS_FILE

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


class L2FactorLogger(HookBase):
    """Every `period` epochs: factor statistics to the event storage (console, metrics.json,
    tensorboard), every factor lambda_n = A_n * f(theta_n) to OUTPUT_DIR/l2_factors.jsonl, and a
    histogram of the factors and thetas of each kind of tensor to tensorboard (an events file of
    its own in OUTPUT_DIR: fast-reid's writer sends scalars only).

    For the adaptive term, each record also holds every theta's summed learning rate so far
    ("theta_lr_sum": the steps its group took, none while it was frozen), from which the plot
    draws the prediction theta_0 - sum(lr) (under Adam a theta falls by about its learning rate
    each step); the thetas' current learning rate goes to the event storage as l2_theta_lr.
    Both are read from the optimizer's groups on the host: no device sync."""

    def __init__(self, penalty: L2PenaltyBase, period_epochs: int, output_dir: str):
        self.penalty = penalty
        self.period = max(1, int(period_epochs))
        self.path = os.path.join(output_dir, FACTORS_FILE) if output_dir else ""
        self.output_dir = output_dir
        self._warned_dead = False
        self._tensorboard = None
        self._theta_lr_sum: List[float] = []
        self._theta_groups: List[tuple] = []  # (param group, indices of its thetas)
        self._step_lr = None

    def before_train(self):
        keep_records_until(self.path, self.trainer.iter)
        if isinstance(self.penalty, AdaptiveL2Penalty):
            self._prepare_theta_lr_sums()
        if self.trainer.iter == 0:
            self._record(epoch=-1)

    def _prepare_theta_lr_sums(self) -> None:
        index = {id(theta): i for i, theta in enumerate(self.penalty.thetas)}
        self._theta_groups = [
            (group, [index[id(p)] for p in group["params"] if id(p) in index])
            for group in self.trainer.optimizer.param_groups]
        self._theta_groups = [(g, ids) for g, ids in self._theta_groups if ids]
        self._theta_lr_sum = [0.0] * len(self.penalty.thetas)
        start = self.trainer.iter
        if start > 0 and self.path and os.path.isfile(self.path):  # resumed: continue the sums
            records = read_json_lines(self.path)
            last = records[-1] if records else {}
            if last.get("theta_lr_sum") and len(last["theta_lr_sum"]) == len(self._theta_lr_sum):
                self._theta_lr_sum = list(last["theta_lr_sum"])
                if last["iteration"] != start:  # a record's iteration = the steps taken
                    logger.warning("%s: theta_lr_sum misses iterations %d-%d (after its last "
                                   "record, before the resumed checkpoint)", self.path,
                                   last["iteration"], start - 1)

    def before_step(self):
        """Add this step's learning rate to the sum of every theta its group will move (after the
        scheduler and the freeze switch have set the step's lr and frozen groups)."""
        frozen = getattr(self.trainer.optimizer, "freeze_active", False)
        self._step_lr = None
        for group, indices in self._theta_groups:
            if frozen and group.get("freeze_status") == FREEZE:
                continue
            lr = float(group["lr"])
            for i in indices:
                self._theta_lr_sum[i] += lr
            self._step_lr = lr

    def after_step(self):
        if self._step_lr is not None:
            self.trainer.storage.put_scalar("l2_theta_lr", self._step_lr, smoothing_hint=False)

    def after_epoch(self):
        epoch = self.trainer.epoch
        if (epoch + 1) % self.period == 0 or epoch + 1 >= self.trainer.max_epoch:
            self._record(epoch)

    def after_train(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def _record(self, epoch: int) -> None:
        factors = self.penalty.factors().float().cpu()
        thetas = None
        dead = 0
        if isinstance(self.penalty, AdaptiveL2Penalty):
            thetas = self.penalty.theta_vector().detach().cpu()
            dead = int((thetas <= THETA_DEAD).sum())
        storage = self.trainer.storage
        storage.put_scalars(
            l2_factor_min=float(factors.min()), l2_factor_median=float(factors.median()),
            l2_factor_max=float(factors.max()), l2_factors_zero=float((factors == 0).sum()),
            smoothing_hint=False)
        if dead and not self._warned_dead:
            logger.warning("%d of %d adaptive L2 factors reached 0 for good (theta <= %.1f)",
                           dead, len(factors), THETA_DEAD)
            self._warned_dead = True
        if self.path and comm.is_main_process():
            record = {
                "iteration": int(self.trainer.iter), "epoch": epoch,
                "penalty": type(self.penalty).__name__,
                "names": self.penalty.names, "kinds": [e.kind for e in self.penalty.entries],
                "factors": factors.tolist(),
                "thetas": None if thetas is None else thetas.tolist(),
                "theta_lr_sum": list(self._theta_lr_sum) if thetas is not None else None,
            }
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.output_dir and comm.is_main_process():
            self._write_histograms(factors, thetas)

    def _write_histograms(self, factors, thetas) -> None:
        """One histogram per kind of tensor (factors, and thetas for the adaptive term)."""
        import torch
        from torch.utils.tensorboard import SummaryWriter

        if self._tensorboard is None:
            self._tensorboard = SummaryWriter(self.output_dir, filename_suffix=".l2_factors")
        kinds = [e.kind for e in self.penalty.entries]
        step = int(self.trainer.iter)
        for kind in dict.fromkeys(kinds):
            chosen = torch.tensor([k == kind for k in kinds])
            self._tensorboard.add_histogram(f"l2_factors/{kind}", factors[chosen], step)
            if thetas is not None:
                self._tensorboard.add_histogram(f"l2_thetas/{kind}", thetas[chosen], step)
        self._tensorboard.flush()


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
