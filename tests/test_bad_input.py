"""Bad input gets a clear error naming the key, file or value."""
import os

import pytest
from conftest import SYNTHETIC_BASE, market_folder as _market, run_train_net, tiny_cfg, tiny_opts

from adaptive_l2.config import load_config
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


# -- bad input that used to hang, crash obscurely, or run something else: named, in seconds -----

MARKET = ["DATASETS.NAMES", '("Market1501",)', "DATASETS.TESTS", '("Market1501",)']


@pytest.mark.parametrize("extra, message", [
    (["SOLVER.IMS_PER_BATCH", "15", "DATALOADER.NUM_INSTANCE", "4"],
     r"SOLVER.IMS_PER_BATCH \(15, 15 per process\) must be a multiple of "
     r"DATALOADER.NUM_INSTANCE \(4\): NaiveIdentitySampler"),
    (["SOLVER.IMS_PER_BATCH", "64", "DATALOADER.SAMPLER_TRAIN", "BalancedIdentitySampler"],
     r"BalancedIdentitySampler needs SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = 64 / 4 = "
     r"16 identities per batch, but the training set \(SyntheticReID\) has 8"),
])
def test_a_batch_the_sampler_cannot_form_is_refused(dataset_root, tmp_path, extra, message):
    from adaptive_l2.data.build import build_train_loader

    with pytest.raises(ValueError, match=message):
        build_train_loader(tiny_cfg(dataset_root, tmp_path, "DATALOADER.SAMPLER_TRAIN",
                                    "NaiveIdentitySampler", *extra))


def test_one_identity_market_ends_in_seconds_with_the_counts(tmp_path):
    """fast-reid's NaiveIdentitySampler looped for ever here: a subprocess with a timeout, so a
    regression fails instead of hanging the suite."""
    root = _market(tmp_path / "data", identities=1)
    result = run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(root, tmp_path / "out",
                                                                        *MARKET)],
                           timeout=60, check=False)
    assert result.returncode != 0
    assert ("ValueError: NaiveIdentitySampler needs SOLVER.IMS_PER_BATCH / "
            "DATALOADER.NUM_INSTANCE = 16 / 4 = 4 identities per batch, but the training set "
            "(Market1501) has 1") in result.stderr, result.stderr[-2000:]


def test_empty_market_folders_and_a_badly_named_file_are_named(tmp_path):
    from adaptive_l2.data.build import build_dataset, build_train_loader

    empty = _market(tmp_path / "empty", identities=0)
    with pytest.raises(ValueError, match="dataset 'Market1501' has no training images: .*"
                                         "Market-1501-v15.09.15/bounding_box_train"):
        build_train_loader(tiny_cfg(empty, tmp_path, *MARKET))
    stray = _market(tmp_path / "stray", identities=2, bad_name="Thumbs.jpg")
    with pytest.raises(ValueError, match="bounding_box_train/Thumbs.jpg: not a Market-1501 style "
                                         "name"):
        build_dataset(tiny_cfg(stray, tmp_path, *MARKET), "Market1501")


def test_a_text_file_as_weights_names_the_file(dataset_root, tmp_path):
    from adaptive_l2.checkpoint import CheckpointReadError, load_for_evaluation
    from adaptive_l2.trainer import Trainer

    text = tmp_path / "notes.pth"
    text.write_text("epoch 3: mAP 44.5\n" * 20)
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    with pytest.raises(ValueError, match=f"MODEL.WEIGHTS: checkpoint {text} cannot be read"):
        load_for_evaluation(Trainer.build_model(cfg), str(text))
    from adaptive_l2.checkpoint import SafeCheckpointer

    with pytest.raises(CheckpointReadError, match=f"checkpoint {text} cannot be read"):
        SafeCheckpointer(Trainer.build_model(cfg)).resume_or_load(str(text), resume=False)


def test_a_binary_config_and_a_missing_config_are_refused(tmp_path):
    from adaptive_l2.cli.train import main as main_from_command_line

    binary = tmp_path / "weights.yml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="--config-file '.*weights.yml' is not a YAML config"):
        load_config(str(binary))
    with pytest.raises(ValueError, match="--config-file is required"):
        main_from_command_line(["OUTPUT_DIR", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_cut_factor_log_names_the_file(tmp_path, caplog):
    import logging

    from adaptive_l2.hooks import keep_records_until
    from adaptive_l2.run_files import FACTORS_FILE
    from adaptive_l2.plotting import read_factor_log

    log = tmp_path / FACTORS_FILE
    log.write_text('{"iteration": 2, "epoch": 0}\n{"iteration": 4, "epoch": 1}\n{"iterati')
    with pytest.raises(ValueError, match=f"{log}, line 3 of 3: not a JSON record"):
        read_factor_log(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="adaptive_l2.hooks"):
        keep_records_until(str(log), 4)  # a resumed run drops the torn line, with a warning
    assert "dropped its last line" in caplog.text and str(log) in caplog.text
    assert len(read_factor_log(str(tmp_path))) == 2


def test_eval_only_needs_no_imagenet_weights(dataset_root, tmp_path):
    from adaptive_l2.cli.train import evaluation_config
    from adaptive_l2.trainer import Trainer

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.BACKBONE.PRETRAIN", "True",
                   "MODEL.BACKBONE.PRETRAIN_PATH", "", "MODEL.HEADS.NUM_CLASSES", "4")
    with pytest.raises(ValueError, match="never downloads"):
        Trainer.build_model(cfg)  # training does need them
    model = Trainer.build_model(evaluation_config(cfg))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.MODEL.BACKBONE.PRETRAIN  # the caller's config is untouched
