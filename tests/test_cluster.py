"""Jobs of submitit's local executor see the GPUs of the process that submitted them: submitit
sets CUDA_VISIBLE_DEVICES from gpus_per_node ('' for 0), which would hide every GPU from a row
whose MODEL.DEVICE is cuda."""
import os

import pytest

from adaptive_l2.cluster import UNSET_DEVICES, call_with_devices, make_executor, parent_devices


@pytest.mark.parametrize("parent", ["3,5", None])
def test_local_jobs_keep_the_parents_visible_devices(tmp_path, monkeypatch, parent):
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    executor = make_executor("local", str(tmp_path), job_name="devices", gpus_per_job=0)
    key = "CUDA_VISIBLE_DEVICES"
    hidden = executor.submit(os.getenv, key, UNSET_DEVICES).result()
    assert hidden == ""  # what submitit alone does
    kept = executor.submit(call_with_devices, parent_devices(executor), os.getenv, key,
                           UNSET_DEVICES).result()
    assert kept == (UNSET_DEVICES if parent is None else parent)


def test_the_slurm_hint_collects_the_same_selection():
    """After submitting without --wait, the printed --collect command must name the same rows,
    seeds and overrides, or it would read other folders (unseeded ones) and find nothing."""
    import argparse

    from adaptive_l2.cli.table import collect_command

    args = argparse.Namespace(suite="study", rows=["Study/adaptive", "none"], seeds="0,1,2",
                              with_sgp=True, opts=["SOLVER.MAX_EPOCH", "2"])
    assert collect_command(args, "logs/s") == [
        "adaptive-l2-table", "--suite", "study", "--output-root", "logs/s", "--collect",
        "--rows", "Study/adaptive,none", "--seeds", "0,1,2", "--with-sgp", "SOLVER.MAX_EPOCH", "2"]
