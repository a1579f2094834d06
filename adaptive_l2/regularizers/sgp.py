"""Stochastic Gradient Perturbation, SGP (reconstructed from the abstract).

Zhou et al. (TCSVT 2023) published only an abstract: SGP perturbs *gradients* with stochastic,
non-directional noise instead of perturbing inputs as adversarial training does. This module is the
project's reconstruction (see ``shared/reference/sgp.md``):

* :func:`perturb_gradient` -- per sample b, ``G_b + alpha * ||G_b|| * xi_b / sqrt(d)`` with
  ``xi_b`` of unit variance per element, so ``||G~_b - G_b|| / ||G_b||`` is about ``alpha``.
* :class:`FeatureGradientPerturbation` (SGP-F, the default) -- applies it to the gradient arriving
  at chosen feature sites (default: the backbone output) during backward. One forward and one
  backward: about the baseline's cost.
* :class:`ParameterGradientPerturbation` (SGP-P, an ablation) -- applies it to each parameter
  tensor's ``.grad`` after the gradients are synchronized across processes.

Both draw from their own ``torch.Generator``, never from the global RNG, so switching SGP on does
not change the data order or the initialisation of a run. In the trainer each runs as a step
regularizer (:class:`FeatureNoiseStep`, :class:`ParameterNoiseStep`): on from
``MODEL.REG.SGP.START_ITER``, its noise keyed by the iteration, its relative size logged as
``sgp_relative_perturbation``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from fastreid.utils import comm
from fastreid.utils.events import get_event_storage
from torch import Tensor, nn

from adaptive_l2.global_batch import check_process_share, draw_for_share
from adaptive_l2.modeling.model_state import unwrap_model
from adaptive_l2.regularizers.l2_base import add_scaled
from adaptive_l2.regularizers.step import StepRegularizer, iteration_seed

__all__ = [
    "NOISE_KINDS",
    "FeatureGradientPerturbation",
    "FeatureNoiseStep",
    "ParameterGradientPerturbation",
    "ParameterNoiseStep",
    "perturb_gradient",
]

NOISE_KINDS: Tuple[str, ...] = ("gaussian", "uniform", "rademacher")


def _check_hyper_parameters(alpha: float, prob: float, noise: str) -> None:
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"SGP alpha must be a finite number >= 0, got {alpha!r}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"SGP prob must be in [0, 1], got {prob!r}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"SGP noise must be one of {NOISE_KINDS}, got {noise!r}")


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    if generator.device.type != device.type:
        raise ValueError(
            f"SGP generator is on device '{generator.device}' but the gradient is on '{device}': "
            "use a generator of the gradient's device (torch.Generator(device=grad.device))"
        )


def _draw_noise(
    shape: Sequence[int], noise: str, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Zero-mean, unit-variance noise in fp32 (unit variance makes ``alpha`` the relative size)."""
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    if noise == "uniform":  # U(-sqrt(3), sqrt(3)) has variance 1
        return uniform.mul_(2.0 * math.sqrt(3.0)).sub_(math.sqrt(3.0))
    return torch.where(uniform < 0.5, -1.0, 1.0)  # rademacher


def _perturbation(
    grad: Tensor, alpha: float, prob: float, noise: str, generator: torch.Generator,
    process_share: Tuple[int, int] = (0, 1), samples_per_process: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """The additive perturbation (fp32, shape of ``grad``) and each row's relative size.

    Rows are the slices along dim 0 (a 0-d tensor is one row). The relative size of a row is
    ``||delta_b|| / ||G_b||``, 0 for rows left unperturbed or with a zero gradient. The mask and
    noise are drawn for the global batch and this process's rows kept (``draw_for_share``); rows
    that are several data batches (AT's clean + adversarial) are split by ``samples_per_process``.
    """
    num_rows = grad.shape[0] if grad.dim() > 0 else 1
    dim = grad.numel() // num_rows if num_rows > 0 else 0
    rows = grad.detach().reshape(num_rows, dim).float()
    blocks = 1  # one process: the same stream whatever the blocks
    if samples_per_process and process_share[1] > 1:
        blocks = max(num_rows // samples_per_process, 1)
    device = grad.device
    # Draw the Bernoulli mask first and always, so the stream advances the same way for any prob.
    applied = draw_for_share(lambda lead: torch.rand(lead, generator=generator, device=device),
                             num_rows, process_share, blocks) < prob
    xi = draw_for_share(lambda lead: _draw_noise((*lead, dim), noise, generator, device),
                        num_rows, process_share, blocks)
    norms = torch.linalg.vector_norm(rows, dim=1)
    scale = alpha * norms / math.sqrt(max(dim, 1)) * applied
    delta = xi * scale.unsqueeze(1)
    # ||delta_b|| / ||G_b|| = alpha * applied_b * ||xi_b|| / sqrt(d): no second pass over delta.
    relative = torch.where(
        norms > 0,
        alpha * applied * torch.linalg.vector_norm(xi, dim=1) / math.sqrt(max(dim, 1)),
        torch.zeros_like(norms),
    )
    return delta.reshape(grad.shape), relative


def perturb_gradient(
    grad: Tensor, alpha: float, prob: float, noise: str, generator: torch.Generator
) -> Tensor:
    """SGP (reconstructed from the abstract): add norm-scaled random noise to each sample's grad.

    For each sample b (slice along dim 0) with probability ``prob``:
    ``G_b + alpha * ||G_b|| * xi_b / sqrt(d)``, ``d = G_b.numel()``, ``xi_b`` gaussian N(0, I),
    uniform U(-sqrt 3, sqrt 3) or rademacher +-1 (all of unit variance), so the perturbation is
    non-directional, has mean zero and a size of about ``alpha * ||G_b||``.

    The mask and the noise come from ``generator``, which must live on ``grad``'s device (a CPU
    generator for CPU tensors, a CUDA generator for CUDA tensors); the noise is drawn in fp32 and
    cast to ``grad``'s dtype. ``alpha == 0`` returns ``grad`` itself, untouched and without drawing,
    so the baseline is reproduced bit for bit.
    """
    _check_hyper_parameters(alpha, prob, noise)
    if alpha == 0:
        return grad
    _check_generator(generator, grad.device)
    delta, _ = _perturbation(grad, alpha, prob, noise, generator)
    return grad + delta.to(grad.dtype)


def _flat_tensors(output: object) -> List[Tensor]:
    """Tensors of a module output (a tensor, or tensors inside a tuple / list / dict)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _flat_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _flat_tensors(v)]
    return []


class _GeneratorPool:
    """One ``torch.Generator`` per device, each seeded with ``seed`` when first needed, and
    re-seeded at each iteration by :meth:`start_iteration`."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._current_seed = self.seed
        self._generators: Dict[str, torch.Generator] = {}
        self._pending_states: Dict[str, Tensor] = {}

    def start_iteration(self, iteration: int) -> None:
        """Key every stream by (seed, iteration) from now on."""
        self._current_seed = iteration_seed(self.seed, iteration)
        self._pending_states.clear()
        for generator in self._generators.values():
            generator.manual_seed(self._current_seed)

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._current_seed)
            if key in self._pending_states:
                generator.set_state(self._pending_states.pop(key))
            self._generators[key] = generator
        return generator

    def state_dict(self) -> Dict[str, object]:
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update(self._pending_states)
        return {"seed": self.seed, "generator_states": states}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        self._pending_states = dict(state["generator_states"])


class _NoiseSource:
    """What SGP-F and SGP-P share: an on/off switch, and their generators (``_generators``, a
    :class:`_GeneratorPool`) keyed by (seed, iteration)."""

    enabled: bool
    _generators: _GeneratorPool

    def set_enabled(self, enabled: bool) -> None:
        """Switch the perturbation on or off (e.g. off during a warm-up)."""
        self.enabled = bool(enabled)

    def start_iteration(self, iteration: int) -> None:
        """Draw this iteration's noise from a stream keyed by (seed, iteration)."""
        self._generators.start_iteration(iteration)

    def state_dict(self) -> Dict[str, object]:
        """The generators' state, to resume a run with the same noise stream."""
        return self._generators.state_dict()

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore the generators' state saved by :meth:`state_dict`."""
        self._generators.load_state_dict(state)


class FeatureGradientPerturbation(_NoiseSource):
    """SGP-F, SGP (reconstructed from the abstract): perturb the gradient at feature sites.

    A forward hook on each site module registers, on every output tensor that requires grad, a
    tensor hook replacing the incoming gradient by :func:`perturb_gradient` of it. So the layers
    below a site train on perturbed gradients while the layers above it (the heads) are untouched.

    The hooks act only when SGP is enabled, the site module is in training mode and grad mode is on.
    Evaluation features, and input gradients taken in eval mode (adversarial attacks), are therefore
    untouched; and a site that fast-reid's ``LayerFreeze`` has put in eval mode (frozen) is skipped.

    Randomness comes from a private ``torch.Generator`` per device, seeded alike in every
    process and keyed by the iteration; each process draws the noise of the whole global batch
    and keeps its own rows (``rank`` of ``world_size`` equal consecutive shares), so a k-process
    run perturbs every sample as the one-process run does. The global RNG is never consumed, so
    data order and initialisation do not change when SGP is switched on.

    Args:
        model: the model (a DistributedDataParallel wrapper is looked through).
        sites: names of submodules as in ``model.named_modules()``, e.g. ``"backbone"``.
        alpha: relative size of the perturbation, ``||G~ - G|| / ||G||``; 0 reproduces the baseline.
        prob: probability that a sample's gradient is perturbed.
        noise: ``"gaussian"``, ``"uniform"`` or ``"rademacher"``.
        seed: seed of the private generator (the same in every process).
        rank, world_size: this process's share of the global batch.
        samples_per_process: the data batch of one process; a site output with a multiple of
            it in rows (AT's clean + adversarial batch) is that many blocks of samples.
        enabled: initial state of the switch (see :meth:`set_enabled`).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str] = ("backbone",),
        alpha: float = 0.1,
        prob: float = 1.0,
        noise: str = "gaussian",
        seed: int = 0,
        rank: int = 0,
        enabled: bool = True,
        world_size: int = 1,
        samples_per_process: Optional[int] = None,
    ) -> None:
        _check_hyper_parameters(alpha, prob, noise)
        # a bad share is refused now, not at the first backward
        self.process_share = check_process_share((rank, world_size))
        self.samples_per_process = samples_per_process
        if isinstance(sites, str):
            sites = (sites,)
        if not sites:
            raise ValueError("SGP sites is empty: name at least one module, e.g. ('backbone',)")
        self.alpha = float(alpha)
        self.prob = float(prob)
        self.noise = noise
        self.enabled = bool(enabled)
        self.sites: Tuple[str, ...] = tuple(sites)
        self._generators = _GeneratorPool(int(seed))
        self._relative: Dict[str, Tensor] = {}
        self._last_key: Optional[str] = None
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

        inner = unwrap_model(model)
        modules = dict(inner.named_modules())
        for site in self.sites:
            if site not in modules or site == "":
                available = [name for name, _ in inner.named_children()]
                raise ValueError(
                    f"SGP site {site!r} is not a submodule of {type(inner).__name__}; "
                    f"top-level modules are {available} (use dotted names for deeper ones)"
                )
        for site in self.sites:
            self._handles.append(modules[site].register_forward_hook(self._forward_hook_for(site)))

    def remove(self) -> None:
        """Detach the forward hooks; the model behaves as if SGP had never been installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def last_relative_perturbation(self) -> Optional[float]:
        """``||G~ - G|| / ||G||`` of the last perturbed gradient, mean over its samples.

        Unperturbed samples (probability ``1 - prob``) count as 0; samples with a zero gradient as
        0 too. None before the first perturbed backward. Read it only when logging: it synchronizes
        with the device.
        """
        if self._last_key is None:
            return None
        return float(self._relative[self._last_key])

    @property
    def last_relative_perturbation_tensor(self) -> Optional[Tensor]:
        """The same as a 0-d tensor on the device, for logging without waiting for it."""
        return None if self._last_key is None else self._relative[self._last_key]

    @property
    def relative_perturbations(self) -> Dict[str, float]:
        """The last relative perturbation per site output (``site`` or ``site[i]`` for tuples)."""
        return {key: float(value) for key, value in self._relative.items()}

    def _forward_hook_for(self, site: str) -> Callable[[nn.Module, object, object], None]:
        def forward_hook(module: nn.Module, inputs: object, output: object) -> None:
            if not (self.enabled and module.training and torch.is_grad_enabled()):
                return
            tensors = [t for t in _flat_tensors(output) if t.requires_grad]
            for index, tensor in enumerate(tensors):
                key = site if isinstance(output, Tensor) else f"{site}[{index}]"
                tensor.register_hook(self._gradient_hook_for(key))

        return forward_hook

    def _gradient_hook_for(self, key: str) -> Callable[[Tensor], Tensor]:
        def gradient_hook(grad: Tensor) -> Tensor:
            if self.alpha == 0:
                return grad
            generator = self._generators.get(grad.device)
            delta, relative = _perturbation(grad, self.alpha, self.prob, self.noise, generator,
                                            self.process_share, self.samples_per_process)
            self._relative[key] = relative.mean().detach()
            self._last_key = key
            return grad + delta.to(grad.dtype)

        return gradient_hook


class ParameterGradientPerturbation(_NoiseSource):
    """SGP-P, SGP (reconstructed from the abstract), an ablation: perturb parameter gradients.

    :meth:`apply` adds ``alpha * ||g|| / sqrt(n) * xi`` to each parameter tensor's ``.grad`` in
    place (probability ``prob`` per tensor). Call it between ``backward()`` (after DDP's gradient
    all-reduce) and ``optimizer.step()``. The generator is seeded with the same ``seed`` on every
    process and never with the rank, so all ranks add identical noise to their identical
    synchronized gradients and the replicas stay equal. That requires every rank to pass the same
    parameters in the same order with the same set of ``.grad`` tensors present (parameters whose
    ``.grad`` is None are skipped and draw nothing). The tensors of one device are perturbed
    together (one noise draw, torch._foreach_* kernels), not one by one.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        prob: float = 1.0,
        noise: str = "gaussian",
        seed: int = 0,
        enabled: bool = True,
    ) -> None:
        _check_hyper_parameters(alpha, prob, noise)
        self.alpha = float(alpha)
        self.prob = float(prob)
        self.noise = noise
        self.enabled = bool(enabled)
        self._generators = _GeneratorPool(int(seed))
        self._relative: Optional[Tensor] = None
        self._inverse_sqrts: Dict[Tuple[Tuple[int, ...], str], Tensor] = {}
        self._scale_layouts: Dict[Tuple, Tuple[Tensor, Tensor]] = {}  # add_scaled's

    @torch.no_grad()
    def apply(self, params: Iterable[nn.Parameter]) -> None:
        """Perturb ``p.grad`` of every parameter in ``params``, in their (deterministic) order."""
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                "SGP-P params must be an ordered iterable (a list, model.parameters()), got a set: "
                "its order differs between processes, so the ranks' noise would not match"
            )
        if not self.enabled or self.alpha == 0:
            return
        by_device: Dict[torch.device, List[Tensor]] = {}
        for param in params:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError(
                    f"SGP-P does not support sparse gradients (shape {tuple(grad.shape)})"
                )
            by_device.setdefault(grad.device, []).append(grad)
        relatives = [self._perturb_on_one_device(grads) for grads in by_device.values()]
        if relatives:
            device = relatives[0].device
            self._relative = torch.cat([r.to(device) for r in relatives]).mean()

    def _perturb_on_one_device(self, grads: List[Tensor]) -> Tensor:
        """Perturb ``grads`` (all on one device) in place; each tensor's relative size.

        A constant number of kernels whatever the number of tensors (one noise draw for all of
        them, torch._foreach_* norms, and the scaled add of ``add_scaled``, the L2 terms' too),
        instead of some twenty small kernels per tensor: SGP-P's overhead on a GPU is then that
        of one large elementwise pass, and nothing waits for the device.
        """
        device = grads[0].device
        generator = self._generators.get(device)
        numels = [grad.numel() for grad in grads]
        inverse_sqrt = self._inverse_sqrt(numels, device)
        # The Bernoulli mask first and always, so the stream advances the same way for any prob.
        applied = torch.rand(len(grads), generator=generator, device=device) < self.prob
        noise = _draw_noise((sum(numels),), self.noise, generator, device)
        pieces = [piece.view(grad.shape) for piece, grad in zip(noise.split(numels), grads)]
        noise_norms = torch.stack(torch._foreach_norm(pieces))
        grad_norms = torch.stack(torch._foreach_norm(grads)).float()
        scale = grad_norms * inverse_sqrt * applied * self.alpha
        add_scaled(grads, pieces, scale, range(len(grads)), self._scale_layouts)
        # ||delta|| / ||g|| = alpha * applied * ||xi|| / sqrt(n): no second pass over the noise.
        return torch.where(grad_norms > 0, noise_norms * inverse_sqrt * applied * self.alpha,
                           torch.zeros_like(grad_norms))

    def _inverse_sqrt(self, numels: List[int], device: torch.device) -> Tensor:
        """1 / sqrt(element count) of each tensor on ``device``, built once per layout (a
        host-to-device copy at every step would wait for the device)."""
        key = (tuple(numels), str(device))
        if key not in self._inverse_sqrts:
            counts = torch.tensor(numels, dtype=torch.long)
            self._inverse_sqrts[key] = counts.clamp(min=1).double().rsqrt().float().to(device)
        return self._inverse_sqrts[key]

    @property
    def last_relative_perturbation(self) -> Optional[float]:
        """``||g~ - g|| / ||g||`` of the last :meth:`apply`, mean over the perturbed tensors.

        Tensors left unperturbed (probability ``1 - prob``) count as 0. Read it only when logging.
        """
        return None if self._relative is None else float(self._relative)

    @property
    def last_relative_perturbation_tensor(self) -> Optional[Tensor]:
        """The same as a 0-d tensor on the device, for logging without waiting for it."""
        return self._relative


class _NoiseStep(StepRegularizer):
    """SGP in the training step: active from `start_iter`, its streams keyed by the iteration, and
    the relative size of its last perturbation logged (as a tensor: no wait for the device)."""

    def __init__(self, perturbation, start_iter: int) -> None:
        self.perturbation = perturbation
        self.start_iter = int(start_iter)
        self.active = False

    def before_step(self, iteration: int) -> None:
        self.active = iteration >= self.start_iter
        self.perturbation.start_iteration(iteration)

    def write_metrics(self) -> None:
        if not self.active or not comm.is_main_process():
            return
        relative = self.perturbation.last_relative_perturbation_tensor  # a float only when logged
        if relative is not None:
            get_event_storage().put_scalar("sgp_relative_perturbation", relative)


class FeatureNoiseStep(_NoiseStep):
    """SGP-F in the training step: the feature-site hooks switched on from `start_iter`."""

    def __init__(self, perturbation: FeatureGradientPerturbation, start_iter: int = 0) -> None:
        super().__init__(perturbation, start_iter)

    def before_step(self, iteration: int) -> None:
        super().before_step(iteration)
        self.perturbation.set_enabled(self.active)

    def after_backward(self, step) -> None:
        self.write_metrics()


class ParameterNoiseStep(_NoiseStep):
    """SGP-P in the training step: the synchronized, unscaled parameter gradients perturbed just
    before the optimizer step, from `start_iter` on."""

    def __init__(self, perturbation: ParameterGradientPerturbation, start_iter: int = 0) -> None:
        super().__init__(perturbation, start_iter)

    def after_backward(self, step) -> None:
        if self.active:
            step.unscale_gradients()
            self.perturbation.apply(
                [p for group in step.optimizer.param_groups for p in group["params"]])
        self.write_metrics()
