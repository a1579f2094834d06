"""Statistics over the global batch when several processes train one model.

Each process holds 1/k of the global batch (see `data.samplers`). With per-process statistics,
batch-hard triplet mining and BatchNorm would see only that share: P x K = 16 x 4 becomes 4 x 4 on
4 processes, and on 16 each holds one identity and the triplet loss is exactly 0. So by default
(`DISTRIBUTED.PER_PROCESS_STATISTICS False`):

- BatchNorm layers normalise with the mean and variance of the global batch
  (`GlobalBatchNorm`, differentiable all-reduces; works with gloo on CPUs and NCCL on GPUs;
  torch's SyncBatchNorm refuses CPU tensors);
- metric losses mine over the global batch: each process's anchors against every process's
  embeddings (`gather_with_gradient`).

DDP averages gradients over processes, so each process's loss must be the mean over its own
anchors: the average of those is the global mean, as one process computes it. The gathered
embeddings' backward sums every process's gradient into the owner's slice.
"""
from __future__ import annotations

import logging
from typing import Callable, Tuple

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def distributed_world() -> int:
    """Processes in the default group, 1 outside torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_process_share(process_share: Tuple[int, int]) -> Tuple[int, int]:
    """(rank, world size) as ints, or a clear error."""
    rank, world = (int(value) for value in process_share)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"process_share must be (rank, world_size) with 0 <= rank < world_size, "
                         f"got {tuple(process_share)!r}")
    return rank, world


def draw_for_share(draw: Callable[[Tuple[int, ...]], torch.Tensor], local_rows: int,
                   process_share: Tuple[int, int], blocks: int = 1) -> torch.Tensor:
    """This process's rows of a per-sample random draw made for the GLOBAL batch.

    Why: every process seeds the stream alike and draws for all processes' samples, then keeps
    its own, so each sample gets the noise it gets in a one-process run (SGP-F's noise, AT's
    random start): k processes are the same experiment, sample for sample. Each process draws k
    times its share (cheap next to a forward pass on a GPU).

    `draw(leading_shape)` returns a tensor of shape leading_shape + per-sample shape. The local
    rows are `blocks` equal consecutive blocks (AT's [clean, adversarial] batch is 2), each this
    process's share of the matching global block; the processes hold equal consecutive shares,
    as the project's samplers split each global batch. With one process the draw is the same
    stream whatever `blocks` is.
    """
    rank, world = check_process_share(process_share)
    if blocks < 1 or local_rows % blocks:
        raise ValueError(f"{local_rows} rows cannot be split into {blocks} equal blocks of "
                         "samples (the batch seen at this point is not a whole number of the "
                         "process's data batches)")
    per_block = local_rows // blocks
    full = draw((blocks, world, per_block))
    return full[:, rank].reshape(local_rows, *full.shape[3:])


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every process's loss depends on every process's rows: sum their gradients, keep ours
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        start = dist.get_rank() * ctx.rows
        return total[start:start + ctx.rows]


def gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's `tensor` (equal shapes) in rank order; differentiable."""
    if distributed_world() <= 1:
        return tensor
    return _GatherWithGradient.apply(tensor)


def gather_targets(targets: torch.Tensor) -> torch.Tensor:
    if distributed_world() <= 1:
        return targets
    parts = [torch.empty_like(targets) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, targets.contiguous())
    return torch.cat(parts, dim=0)


_per_process_statistics = False


def use_per_process_statistics(enabled: bool) -> None:
    """DISTRIBUTED.PER_PROCESS_STATISTICS: metric losses mine only the process's own share."""
    global _per_process_statistics
    _per_process_statistics = bool(enabled)


def metric_loss_candidates(embedding: torch.Tensor, targets: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and targets a metric loss mines its positives and negatives among, for
    this process's anchors `embedding`: the global batch, or the process's own share when
    per-process statistics are chosen (or one process trains)."""
    if _per_process_statistics or distributed_world() <= 1:
        return embedding, targets
    return gather_with_gradient(embedding), gather_targets(targets)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes (any input rank >= 2).

    Two passes (mean, then centred second moment) like a single process's BatchNorm, so the
    result equals one process's up to float rounding. Outside training, or with one process,
    it is plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if not use_batch or distributed_world() <= 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        # a fill on the device, not a copy from the host (which would wait for the GPU)
        local_count = input.new_full((1,), input.numel() // input.shape[1], dtype=torch.float32)
        count = all_reduce_sum(local_count)
        mean = all_reduce_sum(input.float().sum(dim=dims)) / count
        centred = input.float() - mean.view(shape)
        var = all_reduce_sum(centred.square().sum(dim=dims)) / count
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` becomes a GlobalBatchNorm holding the same parameters and
    buffers (the same Parameter objects: optimizer groups and penalties built on them stay
    valid; names and state-dict keys are unchanged). Returns the (possibly new) module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats)
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        for hook_name in ("_forward_hooks", "_forward_pre_hooks"):
            getattr(converted, hook_name).update(getattr(module, hook_name))
        return converted
    for name, child in module.named_children():
        replacement = convert_to_global_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
