"""compat.data: fast-reid's loaders without CUDA, and CPU batches for CPU runs on a GPU machine."""
from adaptive_l2 import compat


def test_test_loader_iterates_without_cuda(tmp_path):
    from fastreid.data.build import build_reid_test_loader
    from fastreid.data.common import CommDataset
    from PIL import Image

    items = []
    for i in range(3):
        path = tmp_path / f"{i:04d}_c1s1_000000_00.jpg"
        Image.new("RGB", (32, 64), (i * 40, 0, 0)).save(path)
        items.append((str(path), i, 0))
    import torchvision.transforms as T

    loader, _ = build_reid_test_loader(test_set=CommDataset(items, T.ToTensor(), relabel=False),
                                       test_batch_size=2, num_query=1, num_workers=0)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [2, 1]


def test_cpu_runs_get_cpu_batches_on_a_gpu_machine(monkeypatch, tmp_path):
    """fast-reid's DataLoaderX would move every batch to cuda:local_rank."""
    import fastreid.data.build as data_build
    from torch.utils.data import DataLoader

    created = []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("fastreid.data.data_utils.DataLoaderX.__init__",
                        lambda self, *a, **k: created.append("DataLoaderX"))
    with compat.batches_on("cpu"):
        loader = data_build.DataLoaderX(0, dataset=[1, 2, 3], batch_size=2)
    assert type(loader) is DataLoader and created == []
    with compat.batches_on("cuda"):
        data_build.DataLoaderX(0, dataset=[1, 2, 3], batch_size=2)
    assert created == ["DataLoaderX"]
