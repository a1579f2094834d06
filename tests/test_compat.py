"""Each patch of fast-reid in adaptive_l2.compat, proven by behaviour that fails without it."""
import subprocess
import sys
import warnings

import pytest
import torch

import adaptive_l2
from adaptive_l2 import compat


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_patches_applied_on_this_stack():
    assert {"torch_six_shim", "collections_mapping_alias", "dataloader_without_cuda",
            "rank_evaluator_no_runtime_compile", "read_image_names_file", "jaccard_on_cpu",
            "out_of_place_normalization"} <= set(compat.APPLIED)


def test_fastreid_and_torchvision_import_after_the_patches():
    result = _python("import adaptive_l2, torchvision.transforms, fastreid.data.build, "
                     "fastreid.evaluation.testing; print('imported')")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imported" in result.stdout


def test_fastreid_data_does_not_import_without_the_patches():
    """Documents the breakage the shims fix (torch._six, collections.Mapping)."""
    result = _python("import importlib.util\n"
                     f"spec = importlib.util.spec_from_file_location('c', {compat.imports.__file__!r})\n"
                     "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
                     "c.patch_torchvision_op_schemas()\n"  # torchvision only, not the name shims
                     "import fastreid.data.build")
    assert result.returncode != 0
    assert "torch._six" in result.stderr or "Mapping" in result.stderr


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


def test_evaluator_without_cython_warns_instead_of_exiting(monkeypatch):
    from fastreid.config import get_cfg
    from fastreid.evaluation import reid_evaluation

    monkeypatch.setitem(sys.modules, "fastreid.evaluation.rank_cylib.rank_cy", None)
    with pytest.raises(RuntimeError, match="make install"):
        reid_evaluation.compile_helper()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        evaluator = reid_evaluation.ReidEvaluator(get_cfg(), num_query=2)
    assert evaluator is not None


def test_rank_evaluator_was_built_at_install_time():
    from adaptive_l2.build_rank_evaluator import is_built

    assert is_built()


def test_models_leave_the_callers_images_untouched():
    from fastreid.config import get_cfg
    from fastreid.modeling.meta_arch import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = "18x"
    cfg.MODEL.BACKBONE.FEAT_DIM = 512
    cfg.MODEL.HEADS.NUM_CLASSES = 2
    model = build_model(cfg).eval()
    images = torch.rand(2, 3, 64, 32) * 255
    original = images.clone()
    with torch.no_grad():
        model({"images": images})
    assert torch.equal(images, original)


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
