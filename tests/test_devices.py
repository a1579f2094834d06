"""GPU placement, proved without a GPU: `MODEL.DEVICE cuda:N` reaches the loaders, several
processes refuse one named GPU."""
import pytest
import torch
from conftest import tiny_cfg


class _RecordingLoader:
    """Stands in for fast-reid's CUDA DataLoaderX: records the GPU index it was built for."""

    built_for = []

    def __init__(self, local_rank, **kwargs):
        _RecordingLoader.built_for.append(local_rank)
        self.batch_sampler = kwargs.get("batch_sampler")
        self.dataset = kwargs.get("dataset")


@pytest.mark.parametrize("device, expected", [("cuda:3", 3), ("cuda", 0)])
def test_loaders_deliver_batches_to_the_configured_gpu(dataset_root, tmp_path, monkeypatch,
                                                       device, expected):
    import fastreid.data.data_utils as data_utils

    from adaptive_l2.data.build import build_test_loader, build_train_loader

    cfg = tiny_cfg(dataset_root, tmp_path)
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(data_utils, "DataLoaderX", _RecordingLoader)
    _RecordingLoader.built_for = []
    build_train_loader(cfg)
    build_test_loader(cfg, "SyntheticReID")
    # fast-reid sends every batch to cuda:local_rank (0 in one process) whatever MODEL.DEVICE says
    assert _RecordingLoader.built_for == [expected, expected]


def test_cpu_runs_get_plain_loaders_even_where_cuda_exists(dataset_root, tmp_path, monkeypatch):
    import fastreid.data.data_utils as data_utils

    from adaptive_l2.data.build import build_train_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(data_utils, "DataLoaderX", _RecordingLoader)
    _RecordingLoader.built_for = []
    loader = build_train_loader(tiny_cfg(dataset_root, tmp_path))
    assert _RecordingLoader.built_for == [] and isinstance(loader, torch.utils.data.DataLoader)


def test_one_named_gpu_for_several_processes_is_refused(dataset_root, tmp_path, monkeypatch):
    from fastreid.utils import comm

    from adaptive_l2.trainer import check_device_for_processes

    cfg = tiny_cfg(dataset_root, tmp_path)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda:1"
    check_device_for_processes(cfg)  # one process: fine
    monkeypatch.setattr(comm, "get_world_size", lambda: 4)
    with pytest.raises(ValueError, match="MODEL.DEVICE.*cuda:1.*4 processes"):
        check_device_for_processes(cfg)
    cfg.MODEL.DEVICE = "cuda"
    check_device_for_processes(cfg)


@pytest.mark.parametrize("meta_architecture, term", [("Baseline", "ADAPTIVE"),
                                                     ("TwoBranchReID", "CONVENTIONAL.ENABLED")])
def test_everything_the_project_adds_lives_on_the_models_device(dataset_root, tmp_path,
                                                                monkeypatch, meta_architecture,
                                                                term):
    """The `meta` device stands in for CUDA: a tensor the project creates on the CPU after
    fast-reid moved the model (the L2 signature did, and NCCL's broadcast refuses it) shows."""
    import adaptive_l2.trainer as trainer_module
    from fastreid.utils import comm

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.META_ARCHITECTURE", meta_architecture,
                   f"MODEL.REG.{term}", "True", "MODEL.HEADS.NUM_CLASSES", "4",
                   "MODEL.TWO_BRANCH.REGIONAL_DIM", "32")
    cfg.defrost()
    cfg.MODEL.DEVICE = "meta"
    monkeypatch.setattr(trainer_module, "check_config", lambda cfg: None)  # refuses non-CUDA/CPU
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)  # the global-batch conversion too
    model = trainer_module.Trainer.build_model(cfg)
    elsewhere = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                 if tensor.device.type != "meta"]
    assert elsewhere == []
    assert any(name.startswith("l2_penalty.") for name, _ in model.named_buffers())
    from adaptive_l2.global_batch import GlobalBatchNorm

    assert any(isinstance(module, GlobalBatchNorm) for module in model.modules())
