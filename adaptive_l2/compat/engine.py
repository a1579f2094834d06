"""Patches of fast-reid's engine: its event storage and console writer, its stock trainer, and
the host state its process-group helpers and hooks keep."""
from __future__ import annotations

from typing import List

import torch


def patch_metric_printer_same_iteration() -> List[str]:
    """Let fast-reid's console writer run twice at one iteration.

    `CommonMetricPrinter.write` estimates the ETA from the iterations since its last write until
    the iteration timer has samples (its first 3 iterations are warm-up). `PeriodicWriter` writes
    after a step and again after the epoch: when an epoch ends on a write period within the first
    iterations, the estimate divides by zero and training dies with ZeroDivisionError.
    """
    from fastreid.utils.events import CommonMetricPrinter, get_event_storage

    host_write = CommonMetricPrinter.write

    def write(self):
        last = getattr(self, "_last_write", None)
        if last is not None and last[0] == get_event_storage().iter:
            self._last_write = None  # nothing elapsed since: no estimate, no division by zero
        return host_write(self)

    CommonMetricPrinter.write = write
    return ["metric_printer_same_iteration"]


# More deferred records than this are turned into floats at the next put: bounds the memory held
# when nothing reads the storage for a long time.
_MAX_DEFERRED_RECORDS = 4096


class _DeferredScalars:
    """Values put as a tensor at one iteration, and how to put them as floats later."""

    __slots__ = ("values", "write", "iteration", "prefix")

    def __init__(self, values, write, iteration: int, prefix: str) -> None:
        self.values = values
        self.write = write
        self.iteration = iteration
        self.prefix = prefix


def put_deferred_scalars(storage, values: torch.Tensor, write) -> None:
    """Keep ``values`` (a tensor, on any device) until ``storage`` is read, then call
    ``write(list_of_floats)`` at the iteration and name scope of this call.

    ``write`` puts the floats with ``storage.put_scalar`` as it would have done at once; nothing
    waits for the device now. Needs :func:`patch_deferred_tensor_scalars`.
    """
    records = storage.__dict__.setdefault("_deferred_scalars", [])
    records.append(_DeferredScalars(values.detach().reshape(-1), write, storage.iter,
                                    storage._current_prefix))
    if len(records) > _MAX_DEFERRED_RECORDS:
        resolve_deferred_scalars(storage)


def resolve_deferred_scalars(storage) -> None:
    """Put every deferred record as floats, in the order they were put (one transfer per device)."""
    records = storage.__dict__.get("_deferred_scalars")
    if not records:
        return
    storage._deferred_scalars = []
    floats = {}
    devices = {}
    for record in records:
        devices.setdefault(record.values.device, []).append(record)
    for group in devices.values():
        flat = torch.cat([r.values.to(torch.float64) for r in group]).tolist()
        start = 0
        for record in group:
            floats[id(record)] = flat[start:start + record.values.numel()]
            start += record.values.numel()
    iteration, prefix = storage.iter, storage._current_prefix
    try:
        for record in records:
            storage.iter, storage._current_prefix = record.iteration, record.prefix
            record.write(floats[id(record)])
    finally:
        storage.iter, storage._current_prefix = iteration, prefix


def patch_deferred_tensor_scalars() -> List[str]:
    """Let fast-reid's EventStorage take tensors without waiting for the device.

    `EventStorage.put_scalar` calls `float(value)`: fast-reid's `log_accuracy` puts a tensor at
    every step, which stalls the GPU until the step's kernels have run. A tensor value is now
    kept with its iteration and name scope, and all kept values become floats together when the
    storage is next read (`history`, `histories`, `latest`, `latest_with_smoothing_hint`,
    `smoothing_hints`: what the writers and hooks call at their period). Histories, latest values
    and smoothing hints are the same as with immediate puts; a name must not be put both as a
    tensor and as a float.
    """
    from fastreid.utils.events import EventStorage

    host_put_scalar = EventStorage.put_scalar

    def put_scalar(self, name, value, smoothing_hint=True):
        if not isinstance(value, torch.Tensor):
            return host_put_scalar(self, name, value, smoothing_hint)
        if value.numel() != 1:
            raise ValueError(f"EventStorage.put_scalar('{name}'): a tensor value must have one "
                             f"element, got shape {tuple(value.shape)}")
        put_deferred_scalars(self, value, lambda floats: host_put_scalar(
            self, name, floats[0], smoothing_hint))

    def resolving(host_method):
        def method(self, *args, **kwargs):
            resolve_deferred_scalars(self)
            return host_method(self, *args, **kwargs)

        method.host = host_method
        method.__name__ = host_method.__name__
        method.__doc__ = host_method.__doc__
        return method

    put_scalar.host = host_put_scalar
    EventStorage.put_scalar = put_scalar
    for name in ("history", "histories", "latest", "latest_with_smoothing_hint",
                 "smoothing_hints"):
        setattr(EventStorage, name, resolving(getattr(EventStorage, name)))
    return ["deferred_tensor_scalars"]


def patch_default_trainer_refuses_l2_terms() -> List[str]:
    """Make fast-reid's stock `DefaultTrainer` refuse a config that asks for an L2 term.

    The term is attached by `adaptive_l2.Trainer.build_model`; the stock trainer builds the bare
    model, so with MODEL.REG.NAME adaptive / conventional it trains without any term, and
    says nothing (its contiguous optimizer does not train on torch 2 either, see
    `adaptive_l2.optim`). Its `build_model` now raises, naming the key and the trainer to use.
    """
    from fastreid.engine.defaults import DefaultTrainer

    host_build_model = DefaultTrainer.__dict__["build_model"].__func__

    def build_model(cls, cfg):
        from adaptive_l2.config import l2_term
        from adaptive_l2.trainer import Trainer

        term, key = l2_term(cfg) if hasattr(cfg.MODEL, "REG") else ("none", "")
        if term != "none" and not issubclass(cls, Trainer):
            raise ValueError(
                f"{key} asks for the {term} L2 term but {cls.__name__} is fast-reid's "
                "DefaultTrainer, which builds the model without it (it would train silently "
                "without it): train with adaptive_l2.Trainer (adaptive-l2-train), or set "
                "MODEL.REG.NAME none.")
        return host_build_model(cls, cfg)

    DefaultTrainer.build_model = classmethod(build_model)
    return ["default_trainer_refuses_l2_terms"]


def create_local_group(world_size: int, local_size: int, machine_rank: int) -> None:
    """The per-machine group fast-reid's comm.get_local_rank()/get_local_size() rely on.

    fast-reid creates `comm._LOCAL_PROCESS_GROUP` only inside its own CUDA launch worker: the
    project's gloo processes and a torchrun job have none, and `comm.get_local_rank()` asserts.
    Every process calls this with the same arguments (new_group is collective)."""
    import torch.distributed as dist
    from fastreid.utils import comm

    for machine in range(world_size // local_size):
        ranks = list(range(machine * local_size, (machine + 1) * local_size))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def set_writer_period(writer, period: int) -> None:
    """Write the console / metrics.json / tensorboard every `period` iterations (SOLVER.LOG_PERIOD).

    fast-reid's DefaultTrainer builds its PeriodicWriter with a hard-coded period of 200 iterations
    and no argument to change it; the period is the hook's private `_period`."""
    writer._period = int(period)
