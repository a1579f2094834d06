"""L2 penalties over every trainable tensor of a model: adaptive (Ni et al. 2020) and constant.

Both are modules attached to the fast-reid model they regularize (`attach_l2_penalty`), so their
parameters (the adaptive thetas) live in the model: the optimizer, DDP, GradScaler, checkpoints and
resume carry them without further work. The penalty is added to the model's loss dict in training
by a forward hook, so fast-reid sums and logs it with the other losses.

Hot path. The penalty's value and its theta gradients come from autograd, over squared norms
computed by one multi-tensor kernel in fp32 whatever the parameters' dtype. Its weight gradient
dPenalty/dW_n = 2 * lambda_n * W_n is added to the gradients in one multi-tensor pass first thing in
the step of `adaptive_l2.optim`'s optimizer (after GradScaler's unscale and DDP's all-reduce; the
same values as autograd would give, as torch's coupled weight decay adds them): through autograd it
would cost a new gradient-sized tensor and an extra accumulation pass over every parameter.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("kernel", "bias", "norm_weight", "norm_bias")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

# Hard-sigmoid of old Keras (slope 0.2, saturating at theta = -2.5 and 2.5). Not torch's
# `hardsigmoid`, whose slope is 1/6.
HARD_SIGMOID_SLOPE = 0.2
THETA_DEAD = -2.5  # at or below this theta the factor is 0 and its gradient 0: it never moves again


def hard_sigmoid_keras(theta: torch.Tensor) -> torch.Tensor:
    return torch.clamp(HARD_SIGMOID_SLOPE * theta + 0.5, 0.0, 1.0)


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
    with torch.no_grad(), torch.autocast(device_type=weights[0].device.type, enabled=False):
        return torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32)).square()


def _signature(names: Sequence[str]) -> int:
    return zlib.crc32("\n".join(names).encode())


class L2PenaltyBase(nn.Module):
    """Holds references to the regularized tensors (not owned: not in this module's state)."""

    loss_name = "loss_l2"

    def __init__(self, targets: List[Tuple[RegularizedTensor, nn.Parameter]]):
        super().__init__()
        if not targets:
            raise ValueError("the model has no trainable tensor to regularize")
        self.entries = [entry for entry, _ in targets]
        self._weights = [param for _, param in targets]
        # Identifies which tensors the thetas belong to, so a checkpoint of another model is refused.
        self.register_buffer(
            "target_signature", torch.tensor([_signature([e.name for e in self.entries])]),
            persistent=True)
        self._register_load_state_dict_pre_hook(self._check_signature)

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    def _check_signature(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "target_signature"
        if key in state_dict and int(state_dict[key].item()) != int(self.target_signature.item()):
            raise ValueError(
                f"checkpoint entry '{key}' belongs to a model with a different set of regularized "
                f"tensors than this one ({len(self.entries)} tensors, first "
                f"'{self.entries[0].name}'): it was saved from another model or config "
                "(MODEL.META_ARCHITECTURE / MODEL.BACKBONE)."
            )

    def penalty(self) -> torch.Tensor:
        """The value added to the loss; differentiable w.r.t. the thetas only (see module doc)."""
        raise NotImplementedError

    def weight_gradient_factors(self) -> torch.Tensor:
        """fp32 vector of 2 * lambda_n: dPenalty/dW_n = 2 * lambda_n * W_n."""
        return 2.0 * self.factors().float()

    @torch.no_grad()
    def add_weight_gradients(self) -> None:
        """W_n.grad += 2 * lambda_n * W_n for every tensor that has a gradient this step."""
        factors = self.weight_gradient_factors().to(self._weights[0].device)
        grads, weights, scales = [], [], []
        for weight, factor in zip(self._weights, factors.unbind()):
            if weight.grad is not None:
                grads.append(weight.grad)
                weights.append(weight)
                scales.append(factor.reshape(1).to(weight.grad.dtype))
        if grads:
            torch._foreach_addcmul_(grads, weights, scales)


class AdaptiveL2Penalty(L2PenaltyBase):
    """sum_n A_n * hard_sigmoid(theta_n) * ||W_n||^2 with one trainable theta_n (init 0) per tensor."""

    loss_name = "loss_adaptive_l2"

    def __init__(self, targets, amplitudes: Dict[str, float]):
        super().__init__(targets)
        missing = set(KINDS) - set(amplitudes)
        if missing:
            raise ValueError(f"amplitudes lack the kinds {sorted(missing)}")
        device = self._weights[0].device
        self.thetas = nn.ParameterList(
            [nn.Parameter(torch.zeros((), device=device)) for _ in self.entries])
        self.register_buffer(
            "amplitudes",
            torch.tensor([float(amplitudes[e.kind]) for e in self.entries], device=device),
            persistent=False)

    def theta_vector(self) -> torch.Tensor:
        return torch.stack(list(self.thetas)).float()

    def factors(self) -> torch.Tensor:
        """lambda_n = A_n * hard_sigmoid(theta_n), detached, fp32."""
        with torch.no_grad():
            return self.amplitudes * hard_sigmoid_keras(self.theta_vector())

    def penalty(self) -> torch.Tensor:
        weighted = self.amplitudes * hard_sigmoid_keras(self.theta_vector())
        return torch.dot(weighted, squared_norms(self._weights))  # theta-differentiable


class ConventionalL2Penalty(L2PenaltyBase):
    """factor * sum_n ||W_n||^2: the paper's "Conventional L2" row (Keras l2(0.005))."""

    loss_name = "loss_l2"

    def __init__(self, targets, factor: float):
        super().__init__(targets)
        self.factor = float(factor)

    def factors(self) -> torch.Tensor:
        return torch.full((len(self.entries),), self.factor)

    def penalty(self) -> torch.Tensor:
        return self.factor * squared_norms(self._weights).sum()  # constant for autograd


PENALTY_ATTRIBUTE = "l2_penalty"


def _add_penalty_to_losses(module: nn.Module, inputs, output):
    if not module.training or not isinstance(output, dict):
        return output
    penalty_module = getattr(module, PENALTY_ATTRIBUTE)
    losses = dict(output)
    losses[penalty_module.loss_name] = penalty_module.penalty()
    return losses


def amplitudes_from_config(reg_cfg) -> Dict[str, float]:
    per_kind = reg_cfg.AMPLITUDE_PER_KIND
    chosen = {
        "kernel": per_kind.KERNEL, "bias": per_kind.BIAS,
        "norm_weight": per_kind.NORM_WEIGHT, "norm_bias": per_kind.NORM_BIAS,
    }
    return {kind: (value if value >= 0 else reg_cfg.AMPLITUDE) for kind, value in chosen.items()}


def attach_l2_penalty(model: nn.Module, cfg) -> Optional[L2PenaltyBase]:
    """Attach the penalty the config asks for to `model` (as `model.l2_penalty`); None if off.

    The model's training forward then returns its loss dict plus the penalty's entry.
    """
    reg = cfg.MODEL.REG
    if not (reg.ADAPTIVE or reg.CONVENTIONAL.ENABLED):
        return None
    if hasattr(model, PENALTY_ATTRIBUTE):
        raise ValueError("the model already carries an L2 penalty")
    targets = regularized_tensors(model)
    if reg.ADAPTIVE:
        penalty = AdaptiveL2Penalty(targets, amplitudes_from_config(reg))
    else:
        penalty = ConventionalL2Penalty(targets, reg.CONVENTIONAL.FACTOR)
    model.add_module(PENALTY_ATTRIBUTE, penalty)
    model.register_forward_hook(_add_penalty_to_losses)
    logger.info("%s on %d tensors", type(penalty).__name__, len(penalty.entries))
    return penalty


def find_l2_penalty(model: nn.Module) -> Optional[L2PenaltyBase]:
    model = getattr(model, "module", model)  # through DDP
    return getattr(model, PENALTY_ATTRIBUTE, None)
