"""Adam with Keras's single global step count (`SOLVER.ADAM_GLOBAL_STEP True`).

The original code (Keras 2.2 / tf.keras of TF 2.2) corrects Adam's bias with ONE iteration counter t
shared by every variable, and keeps the same optimizer when the backbone is unfrozen (phase B):

    t += 1 (once per step)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g ** 2
    p -= lr * sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (sqrt(v) + eps)

torch's Adam counts steps per tensor and adds eps to the bias-corrected sqrt(v). The two agree for
a tensor trained from the first step (up to where eps sits), but a tensor that starts training at
global step 4001 (its moments zero, t past 4000, so no bias correction) takes first steps several
times larger under Keras: with a constant gradient m / sqrt(v) is about 3.2 at its first step and
about 6.5 after ten, where torch gives 1.

The counter lives in the optimizer's state_dict (key "global_step"), so a resumed run continues it.
Per-tensor moments use torch's names ("exp_avg", "exp_avg_sq"). Multi-tensor (`torch._foreach_*`)
over each parameter group, as torch's foreach Adam.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

GLOBAL_STEP = "global_step"


class KerasAdam(torch.optim.Optimizer):
    """Adam whose bias correction uses one step count for all tensors, as Keras's Adam.

    ``weight_decay`` is coupled (added to the gradient, as torch's Adam and a Keras l2 regularizer);
    the project switches it off when an L2 penalty is configured.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"KerasAdam: lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"KerasAdam: betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"KerasAdam: eps (SOLVER.ADAM_EPS) must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"KerasAdam: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.global_step = 0

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus the global step count."""
        state = super().state_dict()
        state[GLOBAL_STEP] = self.global_step
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore moments and the global step count (the caller's dict is not modified).

        A state dict of torch's Adam has no global count: its largest per-tensor step is taken.
        """
        state_dict = dict(state_dict)
        global_step = state_dict.pop(GLOBAL_STEP, None)
        if global_step is None:
            steps = [float(s["step"]) for s in state_dict.get("state", {}).values() if "step" in s]
            global_step = int(max(steps, default=0))
        super().load_state_dict(state_dict)
        for tensor_state in self.state.values():
            tensor_state.pop("step", None)
        self.global_step = int(global_step)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One update of every tensor that has a gradient; the global count advances once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_step += 1
        for group in self.param_groups:
            self._update_group(group, self.global_step)
        return loss

    def _update_group(self, group: Dict[str, Any], step: int) -> None:
        params: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        exp_avgs: List[torch.Tensor] = []
        exp_avg_sqs: List[torch.Tensor] = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("KerasAdam does not support sparse gradients")
            state = self.state[param]
            if not state:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-step_size)
