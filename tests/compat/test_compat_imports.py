"""compat.imports: fast-reid and torchvision import after the patches, and not without them; the
patches this stack needed are recorded."""
import subprocess
import sys

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
