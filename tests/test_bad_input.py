"""Bad input gets a clear error naming the key, file or value."""
import os

import pytest
from conftest import SYNTHETIC_BASE, run_train_net, tiny_cfg, tiny_opts

from adaptive_l2.cli import load_config
from adaptive_l2.compat import CorruptImageError


def test_unknown_config_key_names_the_key_and_file(tmp_path):
    bad = tmp_path / "typo.yml"
    bad.write_text("_BASE_: %s\nMODEL:\n  REG:\n    ADAPTIV: True\n" % SYNTHETIC_BASE)
    with pytest.raises(KeyError, match="typo.yml.*MODEL.REG.ADAPTIV"):
        load_config(str(bad))
    with pytest.raises(KeyError, match="MODEL.REG.ADAPTIV"):
        load_config(SYNTHETIC_BASE, ["MODEL.REG.ADAPTIV", "True"])


def test_both_l2_terms_at_once_are_refused():
    with pytest.raises(ValueError, match="MODEL.REG.ADAPTIVE and MODEL.REG.CONVENTIONAL.ENABLED"):
        load_config(SYNTHETIC_BASE, ["MODEL.REG.ADAPTIVE", "True",
                                     "MODEL.REG.CONVENTIONAL.ENABLED", "True"])


def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="MODEL.DEVICE is 'cuda'.*MODEL.DEVICE cpu"):
        load_config(SYNTHETIC_BASE, ["MODEL.DEVICE", "cuda"])


def test_missing_dataset_folder_says_where_the_data_must_go(tmp_path):
    result = run_train_net(["--config-file", SYNTHETIC_BASE,
                            *tiny_opts(str(tmp_path / "nowhere"), tmp_path / "out",
                                       "DATASETS.NAMES", '("Market1501",)',
                                       "DATASETS.TESTS", '("Market1501",)')], check=False)
    assert result.returncode != 0
    assert "FileNotFoundError: dataset 'Market1501' not found under DATASETS.ROOT" in result.stderr
    assert "Market-1501-v15.09.15" in result.stderr


def test_corrupt_image_is_named(dataset_root, tmp_path):
    from adaptive_l2.data.build import build_dataset
    from fastreid.data.common import CommDataset

    cfg = tiny_cfg(dataset_root, tmp_path)
    data = build_dataset(cfg, "SyntheticReID")
    victim = tmp_path / "broken_0001_c1s1_000001_00.jpg"
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = CommDataset([(str(victim), data.train[0][1], data.train[0][2])], None, relabel=True)
    with pytest.raises(CorruptImageError, match="broken_0001_c1s1_000001_00.jpg"):
        dataset[0]


def test_checkpoint_of_another_model_is_refused_for_evaluation(dataset_root, tmp_path):
    import torch

    from adaptive_l2.checkpoint import load_for_evaluation
    from adaptive_l2.trainer import Trainer

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    other = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                     "MODEL.BACKBONE.DEPTH", "34x")
    path = str(tmp_path / "r34.pth")
    torch.save({"model": Trainer.build_model(other).state_dict()}, path)
    with pytest.raises(ValueError, match="does not match the configured model"):
        load_for_evaluation(Trainer.build_model(cfg), path)
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS"):
        load_for_evaluation(Trainer.build_model(cfg), os.path.join(str(tmp_path), "none.pth"))


def test_pretraining_without_a_local_file_is_refused_instead_of_downloading(dataset_root, tmp_path):
    from adaptive_l2.trainer import Trainer

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                   "MODEL.BACKBONE.PRETRAIN", "True")
    with pytest.raises(ValueError, match="never downloads"):
        Trainer.build_model(cfg)


def test_missing_msmt17_names_its_layout(tmp_path):
    from adaptive_l2.data.build import build_dataset

    cfg = load_config(SYNTHETIC_BASE, ["DATASETS.ROOT", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="MSMT17_V2"):
        build_dataset(cfg, "MSMT17TrainVal")


def test_adversarial_weight_with_an_l2_term_is_refused():
    with pytest.raises(ValueError, match="MODEL.REG.AT.WEIGHT"):
        load_config(SYNTHETIC_BASE, ["MODEL.REG.ADAPTIVE", "True", "MODEL.REG.AT.ENABLED", "True",
                                     "MODEL.REG.AT.WEIGHT", "0.5"])
