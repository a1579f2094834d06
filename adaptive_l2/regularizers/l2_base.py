"""What every L2 penalty over all trainable tensors of a model shares: the tensors it covers, their
squared norms, the weight gradient (through autograd or claimed by an optimizer), the decoupled
decay, the model attribute it lives in and the hook that logs its factors. The terms themselves
are `adaptive_l2.regularizers.adaptive` (the paper's) and `adaptive_l2.regularizers.conventional`;
`adaptive_l2.regularizers.build.attach_l2_penalty` attaches the one the config names.

Both are modules attached to the fast-reid model they regularize (`attach_l2_penalty`), so their
parameters (the adaptive thetas) live in the model: the optimizer, DDP, GradScaler, checkpoints and
resume carry them without further work. The penalty is added to the model's loss dict in training
by a forward hook, so fast-reid sums and logs it with the other losses.

The penalty is complete with any optimizer: its value is differentiable w.r.t. the thetas and
the weights, so autograd gives dPenalty/dW_n = 2 * lambda_n * W_n to a plain `torch.optim.SGD`, to
fast-reid's optimizer or to a user's own loop. The squared norms ||W_n||^2 come from one
multi-tensor kernel in fp32 whatever the parameters' dtype.

Hot path. Through autograd the weight gradient costs a new gradient-sized tensor per weight and an
extra accumulation pass. `adaptive_l2.optim`'s optimizer therefore claims it
(`claim_weight_gradient`): from then on the backward gives the weights nothing and the optimizer
adds 2 * lambda_n * W_n in place, in one multi-tensor pass first thing in its step (after
GradScaler's unscale and DDP's all-reduce; the same values, as torch's coupled weight decay adds
them). Whether autograd or the owner adds it is decided at backward time, so it is applied once.
Every tensor the penalty keeps (thetas, amplitudes, factors, signature) lives on the regularized
tensors' device, and no step reads a device value on the host.

MODEL.REG.DECOUPLED: the weights get nothing from the value; the owner's step decays them instead,
W_n *= 1 - lr * 2 * lambda_n before its update (as AdamW applies weight decay).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from fastreid.engine.train_loop import HookBase
from fastreid.utils import comm
from torch import nn

from adaptive_l2.hooks import keep_records_until, read_json_lines
from adaptive_l2.run_files import FACTORS_FILE

logger = logging.getLogger(__name__)

KINDS = ("kernel", "bias", "norm_weight", "norm_bias")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class RegularizedTensor:
    name: str  # parameter name in the model, e.g. "backbone.layer1.0.conv1.weight"
    kind: str  # one of KINDS


def regularized_tensors(model: nn.Module) -> List[Tuple[RegularizedTensor, nn.Parameter]]:
    """Every trainable tensor of `model` (each once, in registration order) with its kind."""
    seen = set()
    found = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_norm = isinstance(module, _NORM_TYPES)
            is_bias = param_name == "bias"
            kind = ("norm_bias" if is_bias else "norm_weight") if is_norm else (
                "bias" if is_bias else "kernel")
            full = f"{module_name}.{param_name}" if module_name else param_name
            found.append((RegularizedTensor(full, kind), param))
    return found


def squared_norms(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 vector of the squared L2 norms ||W_n||^2 (one multi-tensor kernel, no autograd)."""
    device_type = weights[0].device.type
    no_autocast = torch.autocast(device_type=device_type, enabled=False) \
        if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext()
    with torch.no_grad(), no_autocast:
        return torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32)).square()


def _signature(names: Sequence[str]) -> int:
    return zlib.crc32("\n".join(names).encode())


class _SquaredNormsWithWeightGradient(torch.autograd.Function):
    """`squared_norms`, differentiable w.r.t. the weights: d||W_n||^2/dW_n = 2 * W_n.

    The backward asks the penalty whether an optimizer has claimed the weight gradient; if so it
    gives the weights nothing (the owner adds the same values in its step), else 2 * g_n * W_n.
    """

    @staticmethod
    def forward(ctx, penalty: "L2PenaltyBase", *weights: torch.Tensor) -> torch.Tensor:
        ctx.penalty = penalty
        ctx.save_for_backward(*weights)
        return squared_norms(weights)

    @staticmethod
    def backward(ctx, grad_norms: torch.Tensor):
        grads: List[Optional[torch.Tensor]] = [None] * (len(ctx.needs_input_grad) - 1)
        if ctx.penalty.weight_gradient_owner is not None:
            return (None, *grads)  # the owner's step adds it
        weights = ctx.saved_tensors
        needed = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        scales = (2.0 * grad_norms).unbind()  # 0-d tensors on the device: no host sync
        products = torch._foreach_mul([weights[i] for i in needed],
                                      [scales[i].to(weights[i].dtype) for i in needed])
        for i, product in zip(needed, products):
            grads[i] = product
        return (None, *grads)


ADD_SCALED_ROUTES = ("auto", "per_tensor", "flat")


@torch.no_grad()
def add_scaled(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
               scales: torch.Tensor, indices: Sequence[int],
               layouts: Optional[Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]]] = None,
               route: str = "auto") -> None:
    """targets[i] += sources[i] * scales[indices[i]] in place, for every i (one device; `scales` a
    vector on that device, taken in each target's dtype: no host sync). `layouts` caches the
    flat route's index tensors per layout (the caller keeps it).

    Why two routes: torch's fused multi-tensor kernels on CUDA need the tensors at each position
    of their lists to have equal shapes, so a per-tensor 0-d scale sends them down a loop of one
    launch per tensor (about 400 for the two-branch model). The "flat" route spreads the scales
    over one flat copy of the sources (repeat_interleave), multiplies once, and adds the pieces
    with one foreach call whose pairs have equal shapes and strides (the fused route): a constant
    number of launches. A CPU has no launches to save and the per-tensor loop moves less memory,
    so "auto" takes it there. Both give the same values (up to one rounding, where a
    multiply-add is fused). Used by the L2 terms' weight gradient and decay, and by SGP-P.
    """
    if route not in ADD_SCALED_ROUTES:
        raise ValueError(f"route must be one of {ADD_SCALED_ROUTES}, got {route!r}")
    by_dtype: Dict[torch.dtype, Tuple[List[torch.Tensor], List[torch.Tensor], List[int]]] = {}
    for target, source, index in zip(targets, sources, indices):
        group = by_dtype.setdefault(target.dtype, ([], [], []))
        group[0].append(target)
        group[1].append(source)
        group[2].append(index)
    for dtype, (group_targets, group_sources, group_indices) in by_dtype.items():
        _add_scaled_one_dtype(group_targets, group_sources, scales.to(dtype), group_indices,
                              {} if layouts is None else layouts, route)


def _add_scaled_one_dtype(targets: List[torch.Tensor], sources: List[torch.Tensor],
                          scales: torch.Tensor, indices: List[int],
                          layouts: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]],
                          route: str) -> None:
    device = targets[0].device
    if route == "per_tensor" or (route == "auto" and device.type == "cpu"):
        per_tensor = scales.unbind()  # 0-d views on the device
        torch._foreach_addcmul_(targets, sources, [per_tensor[i] for i in indices])
        return
    numels = [source.numel() for source in sources]
    key = (tuple(indices), tuple(numels), str(device))
    if key not in layouts:  # built once per layout: a host-to-device copy every step would wait
        layouts[key] = (torch.tensor(indices, dtype=torch.long).to(device),
                        torch.tensor(numels, dtype=torch.long).to(device))
    index_vector, counts = layouts[key]
    spread = torch.repeat_interleave(scales.index_select(0, index_vector), counts,
                                     output_size=sum(numels))
    products = torch.cat([source.reshape(-1) for source in sources]).mul_(spread)
    pieces = [piece.view(target.shape) for piece, target in zip(products.split(numels), targets)]
    torch._foreach_add_(targets, pieces)


class L2PenaltyBase(nn.Module):
    """Holds references to the regularized tensors (not owned: not in this module's state)."""

    loss_name = "loss_l2"

    def __init__(self, targets: List[Tuple[RegularizedTensor, nn.Parameter]]):
        super().__init__()
        if not targets:
            raise ValueError("the model has no trainable tensor to regularize")
        self.entries = [entry for entry, _ in targets]
        self._weights = [param for _, param in targets]
        self._weight_gradient_owner: Optional[weakref.ReferenceType] = None
        self._index_of = {id(param): index for index, param in enumerate(self._weights)}
        # add_scaled's per-layout index tensors on the device, built once per layout
        self._layouts: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        # True: the weights get no gradient from the value; the owner decays them in its step
        self.decoupled = False
        # Identifies which tensors the thetas belong to, so a checkpoint of another model is refused.
        # On the weights' device: DDP broadcasts every buffer, and NCCL has no CPU backend.
        self.register_buffer(
            "target_signature",
            torch.tensor([_signature(self.names)], device=self.device), persistent=True)
        self._register_load_state_dict_pre_hook(self._check_signature)

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    @property
    def device(self) -> torch.device:
        """The regularized tensors' device, where the penalty keeps all its state."""
        return self._weights[0].device

    def _check_signature(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "target_signature"
        # compared with the names, not with this module's buffer: no read of a device value
        if key in state_dict and int(state_dict[key].item()) != _signature(self.names):
            raise ValueError(
                f"checkpoint entry '{key}' belongs to a model with a different set of regularized "
                f"tensors than this one ({len(self.entries)} tensors, first "
                f"'{self.entries[0].name}'): it was saved from another model or config "
                "(MODEL.META_ARCHITECTURE / MODEL.BACKBONE)."
            )

    def __getstate__(self) -> Dict[str, Any]:
        # a copy (deepcopy, pickle) is a new penalty: no optimizer has claimed its weight gradient
        state = dict(self.__dict__)
        state["_weight_gradient_owner"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # the copy holds copies of the weights: index them by their own ids (the decoupled decay
        # looks its tensors up by id), and drop index tensors built for the original's layout
        super().__setstate__(state)
        self._index_of = {id(param): index for index, param in enumerate(self._weights)}
        self._layouts = {}

    @property
    def weight_gradient_owner(self) -> Optional[object]:
        """The optimizer that adds the weight gradient in its step; None: autograd adds it."""
        return None if self._weight_gradient_owner is None else self._weight_gradient_owner()

    def claim_weight_gradient(self, owner: object) -> None:
        """`owner` (an optimizer) adds 2 * lambda_n * W_n itself from now on, with
        `add_weight_gradients(owner)` in each step; autograd stops adding it, so it counts once.

        A second owner is refused while the first is alive: the gradient would be added twice.
        """
        current = self.weight_gradient_owner
        if current is not None and current is not owner:
            raise RuntimeError(
                f"the L2 penalty's weight gradient is already added by another optimizer "
                f"({type(current).__name__} at {id(current):#x}); build one project optimizer per "
                "model, or call release_weight_gradient(old_optimizer) first")
        self._weight_gradient_owner = weakref.ref(owner)

    def release_weight_gradient(self, owner: object) -> None:
        """Hand the weight gradient back to autograd, for the values computed from now on (call it
        after `owner`'s last step, not between a forward and its step)."""
        if self.weight_gradient_owner is owner:
            self._weight_gradient_owner = None

    def squared_norms(self) -> torch.Tensor:
        """fp32 ||W_n||^2 of every regularized tensor; carries the weight gradient unless an
        optimizer has claimed it (no graph edge to each weight then: ~4 us a tensor saved)."""
        if self.weight_gradient_owner is None and torch.is_grad_enabled() and any(
                w.requires_grad for w in self._weights):
            if self.decoupled:
                raise RuntimeError(
                    "MODEL.REG.DECOUPLED is True: the decay is applied by adaptive_l2's optimizer "
                    "in its step (adaptive_l2.optim.build_optimizer / adaptive_l2.Trainer), and "
                    "no such optimizer has claimed this penalty: another optimizer would train "
                    "without it")
            return _SquaredNormsWithWeightGradient.apply(self, *self._weights)
        return squared_norms(self._weights)

    def penalty(self) -> torch.Tensor:
        """The value added to the loss, differentiable w.r.t. the thetas and the weights."""
        raise NotImplementedError

    def factors(self) -> torch.Tensor:
        """lambda_n of every tensor (fp32, on the device, detached)."""
        raise NotImplementedError

    def theta_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters behind the factors, in the order of `entries` (none: the
        factors are constants)."""
        return []

    def logged_thetas(self) -> Optional[torch.Tensor]:
        """The trainable parameters behind the factors, on the CPU, for the factor log (None: the
        factors are constants)."""
        return None

    def dead_factors_warning(self, thetas: torch.Tensor) -> Optional[str]:
        """A warning for the log when factors can never move again (None: nothing to say)."""
        return None

    def _grouped_gradients(self) -> Dict[torch.dtype, Tuple[List[int], List[torch.Tensor],
                                                             List[torch.Tensor]]]:
        """(indices, grads, weights) of the trainable tensors, per dtype. A tensor the data loss
        left without a gradient gets a zero one: autograd would give it the penalty's."""
        groups: Dict[torch.dtype, Tuple[List[int], List[torch.Tensor], List[torch.Tensor]]] = {}
        for index, weight in enumerate(self._weights):
            if weight.grad is None and weight.requires_grad:
                weight.grad = torch.zeros_like(weight)
            if weight.grad is not None:
                indices, grads, weights = groups.setdefault(weight.grad.dtype, ([], [], []))
                indices.append(index)
                grads.append(weight.grad)
                weights.append(weight)
        return groups

    def _check_owner(self, owner: object) -> None:
        if owner is None or self.weight_gradient_owner is not owner:
            raise RuntimeError(
                "add_weight_gradients(owner) is for the optimizer that claimed the weight gradient "
                "(claim_weight_gradient): without a claim autograd adds it already, and adding it "
                "here too would count it twice")

    @torch.no_grad()
    def add_weight_gradients(self, owner: object) -> None:
        """W_n.grad += 2 * lambda_n * W_n for every trainable tensor (`add_scaled`: a constant
        number of kernels on an accelerator; the factors stay on the device)."""
        self._check_owner(owner)
        doubled = 2.0 * self.factors()
        for indices, grads, weights in self._grouped_gradients().values():
            add_scaled(grads, weights, doubled, indices, self._layouts)

    @torch.no_grad()
    def apply_decoupled_decay(self, owner: object,
                              groups: Sequence[Tuple[float, Sequence[torch.Tensor]]]) -> None:
        """W_n -= lr * 2 * lambda_n * W_n, with the lr of W_n's group, for the regularized tensors
        of `groups` ((lr, params) pairs): the decay outside the optimizer's normalisation, as
        AdamW's. Run before the optimizer's update (as AdamW), factors on the device."""
        self._check_owner(owner)
        doubled = 2.0 * self.factors()
        for lr, params in groups:
            chosen = [self._index_of[id(p)] for p in params
                      if id(p) in self._index_of and p.requires_grad]
            if not chosen:
                continue
            weights = [self._weights[i] for i in chosen]
            add_scaled(weights, weights, -lr * doubled, chosen, self._layouts)


PENALTY_ATTRIBUTE = "l2_penalty"


def find_l2_penalty(model: nn.Module) -> Optional[L2PenaltyBase]:
    model = getattr(model, "module", model)  # through DDP
    return getattr(model, PENALTY_ATTRIBUTE, None)


class L2FactorLogger(HookBase):
    """Every `period` epochs: factor statistics to the event storage (console, metrics.json,
    tensorboard), every factor lambda_n to OUTPUT_DIR/l2_factors.jsonl with the thetas behind
    them when the penalty has some (`logged_thetas`), and a histogram of the factors and thetas
    of each kind of tensor to tensorboard (an events file of its own in OUTPUT_DIR: fast-reid's
    writer sends scalars only).

    With thetas, each record also holds every theta's summed learning rate so far
    ("theta_lr_sum": the steps its group took, none while it was frozen), from which the plot
    draws the prediction theta_0 - sum(lr) (under Adam a theta falls by about its learning rate
    each step); the thetas' current learning rate goes to the event storage as l2_theta_lr.
    Both are read from the optimizer's groups on the host: no device sync (so under AMP a step
    that GradScaler skips on an fp16 overflow still counts: knowing would cost a sync a step).
    The sums are saved in every checkpoint, so a resumed run continues them exactly."""

    def __init__(self, penalty: L2PenaltyBase, period_epochs: int, output_dir: str):
        self.penalty = penalty
        self.period = max(1, int(period_epochs))
        self.path = os.path.join(output_dir, FACTORS_FILE) if output_dir else ""
        self.output_dir = output_dir
        self._warned_dead = False
        self._tensorboard = None
        self._theta_lr_sum: List[float] = []
        self._theta_groups: List[tuple] = []  # (param group, indices of its thetas)
        self._step_lr: Optional[float] = None
        self._resumed_sums: Optional[List[float]] = None  # from the checkpoint (load_state_dict)

    def state_dict(self) -> Dict[str, Any]:
        """The summed learning rates, saved in every checkpoint (a checkpointable of the trainer):
        a resumed run continues them exactly, whatever LOG_PERIOD is."""
        return {"theta_lr_sum": list(self._theta_lr_sum)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resumed_sums = [float(value) for value in state.get("theta_lr_sum", [])]

    def before_train(self):
        keep_records_until(self.path, self.trainer.iter)
        if self.penalty.theta_parameters():
            self._prepare_theta_lr_sums()
        if self.trainer.iter == 0:
            self._record(epoch=-1)

    def _prepare_theta_lr_sums(self) -> None:
        thetas = self.penalty.theta_parameters()
        index = {id(theta): i for i, theta in enumerate(thetas)}
        groups = [(group, [index[id(p)] for p in group["params"] if id(p) in index])
                  for group in self.trainer.optimizer.param_groups]
        self._theta_groups = [(group, ids) for group, ids in groups if ids]
        self._theta_lr_sum = [0.0] * len(thetas)
        start = self.trainer.iter
        if start > 0 and self._resumed_sums and len(self._resumed_sums) == len(thetas):
            self._theta_lr_sum = list(self._resumed_sums)  # the checkpoint's: exact
        elif start > 0 and self.path and os.path.isfile(self.path):  # older checkpoint: the log
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
        from adaptive_l2.optim import FREEZE  # the optimizer module imports this one

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
        thetas = self.penalty.logged_thetas()
        storage = self.trainer.storage
        storage.put_scalars(
            l2_factor_min=float(factors.min()), l2_factor_median=float(factors.median()),
            l2_factor_max=float(factors.max()), l2_factors_zero=float((factors == 0).sum()),
            smoothing_hint=False)
        warning = None if thetas is None else self.penalty.dead_factors_warning(thetas)
        if warning and not self._warned_dead:
            logger.warning(warning)
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

    def _write_histograms(self, factors: torch.Tensor, thetas: Optional[torch.Tensor]) -> None:
        """One histogram per kind of tensor (factors, and thetas where the penalty has some)."""
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
