"""compat.engine: fast-reid's event storage takes tensors without a sync; its console writer runs
twice at one iteration."""
from __future__ import annotations

import pytest
import torch

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from fastreid.utils.events import EventStorage

from step_helpers import SyncCounter


def test_tensor_scalars_are_put_without_a_sync_and_read_as_the_hosts_floats():
    values = torch.linspace(0.1, 2.0, 12, dtype=torch.float32).reshape(6, 2).sqrt()
    deferred, immediate = EventStorage(5), EventStorage(5)
    counter = SyncCounter()
    for row in values:
        with counter, deferred.name_scope("scope"):
            deferred.put_scalar("a", row[0])
            deferred.put_scalars(b=row[1], smoothing_hint=False)
        with immediate.name_scope("scope"):
            immediate.put_scalar("a", float(row[0]))
            immediate.put_scalars(b=float(row[1]), smoothing_hint=False)
        deferred.step()
        immediate.step()
    assert counter.syncs == []
    assert deferred.latest() == immediate.latest()
    assert deferred.latest_with_smoothing_hint(3) == immediate.latest_with_smoothing_hint(3)
    assert deferred.smoothing_hints() == immediate.smoothing_hints()
    assert {k: v.values() for k, v in deferred.histories().items()} == \
        {k: v.values() for k, v in immediate.histories().items()}
    assert deferred.iter == 11
    with pytest.raises(ValueError, match="'c'"):
        deferred.put_scalar("c", torch.zeros(2))


def test_console_writer_survives_two_writes_at_one_iteration():
    from fastreid.utils.events import CommonMetricPrinter, EventStorage

    printer = CommonMetricPrinter(max_iter=10)
    with EventStorage(0) as storage:
        storage.epoch = 0
        storage.put_scalar("total_loss", 1.0)
        storage.iter = 1
        printer.write()
        printer.write()  # fast-reid divides by (iteration - last iteration) == 0 here
        storage.iter = 2
        printer.write()
