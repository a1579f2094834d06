"""Tests of the two-branch model (Ni et al. 2020), its triplet loss and pretrained loading."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.modeling import (
    TwoBranchReID,
    add_two_branch_config,
    check_pretrain_config,
    load_pretrained_backbone,
    soft_margin_batch_hard_triplet,
)
from adaptive_l2.modeling import losses as two_branch_losses
from adaptive_l2.modeling import two_branch
from adaptive_l2.modeling.two_branch import build_resnet
from fastreid.config import get_cfg
from fastreid.engine.hooks import LayerFreeze
from fastreid.modeling.meta_arch import build_model
from fastreid.solver.build import get_default_optimizer_params

NUM_CLASSES = 5
REGIONAL_DIM = 32  # small stripe convs keep the R18 tests fast
LOSS_KEYS = {
    "loss_global_ce", "loss_global_triplet",
    "loss_stripe1_ce", "loss_stripe1_triplet",
    "loss_stripe2_ce", "loss_stripe2_triplet",
}
PHASE_A_FROZEN = ["backbone", "global_conv5", "regional_conv5"]


def make_cfg(depth: str = "18x", regional_dim: int = REGIONAL_DIM):
    cfg = get_cfg()
    add_two_branch_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "TwoBranchReID"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.BACKBONE.DEPTH = depth
    cfg.MODEL.HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.TWO_BRANCH.REGIONAL_DIM = regional_dim
    return cfg


def make_batch(batch: int = 8) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand(batch, 3, 64, 32, generator=generator) * 255,
        "targets": torch.arange(batch) // 4,  # P=2 identities x K=4 images
    }


@pytest.fixture(scope="module")
def r18_cfg():
    return make_cfg()


@pytest.fixture()
def model(r18_cfg):
    torch.manual_seed(0)
    return build_model(r18_cfg)


def torchvision_state(cfg) -> dict:
    """A torchvision-format ResNet state dict (with an fc layer) of a freshly built ResNet."""
    state = dict(build_resnet(cfg).state_dict())
    last_conv = next(
        value for key, value in reversed(state.items())
        if key.startswith("layer4") and value.dim() == 4
    )
    channels = last_conv.shape[0]
    state["fc.weight"] = torch.randn(1000, channels)
    state["fc.bias"] = torch.randn(1000)
    return state


# --- structure -----------------------------------------------------------------------------------


def test_registered_and_built_by_fastreid(model):
    assert isinstance(model, TwoBranchReID)
    assert [name for name, _ in model.named_children()] == [
        "backbone", "global_conv5", "regional_conv5", "heads",
    ]


def test_branch_output_shapes(model):
    model.eval()
    images = model.preprocess_image(make_batch(4)["images"])
    with torch.no_grad():
        pooled = model.pooled_features(images)
    conv5_channels = model.global_conv5[-1].conv2.out_channels  # R18 BasicBlock: 512
    assert [tuple(feature.shape) for feature in pooled] == [
        (4, conv5_channels), (4, REGIONAL_DIM), (4, REGIONAL_DIM),
    ]
    with torch.no_grad():
        test_feature = model(make_batch(4)["images"])
    assert test_feature.shape == (4, conv5_channels + 2 * REGIONAL_DIM)


def test_r50_test_feature_is_4096_dims_and_parameter_count():
    torch.manual_seed(0)
    model = build_model(make_cfg("50x", regional_dim=1024)).eval()
    with torch.no_grad():
        features = model(make_batch(2)["images"])
    assert features.shape == (2, 2048 + 2 * 1024)
    # stem..conv4 (129) + 2 x conv5 (2 x 30) + 2 stripe convs (4) + 3 BN1d (6) + 3 classifiers (3)
    assert len([p for p in model.parameters() if p.requires_grad]) == 202


def test_resnet152_depth_is_available():
    resnet = build_resnet(make_cfg("152x"))
    assert [len(resnet.layer1), len(resnet.layer2), len(resnet.layer3), len(resnet.layer4)] == [
        3, 8, 36, 3,
    ]


def test_conv5_copies_start_equal_and_are_distinct(model):
    global_params = dict(model.global_conv5.named_parameters())
    regional_params = dict(model.regional_conv5.named_parameters())
    assert global_params.keys() == regional_params.keys()
    for name, value in global_params.items():
        assert value is not regional_params[name]
        assert value.data_ptr() != regional_params[name].data_ptr()
        assert torch.equal(value, regional_params[name]), name
    for name, value in model.global_conv5.named_buffers():
        assert torch.equal(value, dict(model.regional_conv5.named_buffers())[name]), name


def test_head_hyperparameters(model, r18_cfg):
    options = r18_cfg.MODEL.TWO_BRANCH
    for bottleneck in model.heads.bottlenecks:
        assert bottleneck.eps == options.BN_EPS and bottleneck.momentum == options.BN_MOMENTUM
        assert bottleneck.weight.requires_grad and bottleneck.bias.requires_grad
    for classifier in model.heads.classifiers:
        assert classifier.bias is None and classifier.out_features == NUM_CLASSES
        assert classifier.weight.std().item() == pytest.approx(options.CLS_INIT_STD, rel=0.2)
    for block in model.heads.stripe_convs:
        conv = block[0]
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None


# --- training forward ----------------------------------------------------------------------------


def test_six_finite_losses_with_gradients(model):
    model.train()
    losses = model(make_batch())
    assert set(losses) == LOSS_KEYS
    for name, value in losses.items():
        assert value.dim() == 0 and math.isfinite(value.item()) and value.requires_grad, name
    sum(losses.values()).backward()
    for child in ("backbone", "global_conv5", "regional_conv5", "heads"):
        grads = [p.grad for p in getattr(model, child).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), child


def test_precise_bn_targets_give_finite_losses(model):
    """fast-reid's PreciseBN hook runs training forwards with every target set to -1."""
    batch = make_batch()
    batch["targets"] = torch.full_like(batch["targets"], -1)
    losses = model.train()(batch)
    assert all(math.isfinite(value.item()) for value in losses.values())


def test_clipping_happens_before_both_losses(model, monkeypatch):
    # Make conv5 activations large so the unclipped pooled features leave [0, 1].
    with torch.no_grad():
        for conv5 in (model.global_conv5, model.regional_conv5):
            conv5[-1].bn2.weight.mul_(100.0)
            conv5[-1].bn2.bias.fill_(5.0)
    batch = make_batch()
    images = model.preprocess_image(batch["images"])
    model.eval()
    with torch.no_grad():
        unclipped = model.pooled_features(images)
    assert unclipped[0].max() > 1.0

    triplet_inputs, bn_inputs = [], []

    def recording_triplet(features, targets):
        triplet_inputs.append(features.detach().clone())
        return soft_margin_batch_hard_triplet(features, targets)

    monkeypatch.setattr(two_branch, "soft_margin_batch_hard_triplet", recording_triplet)
    hooks = [
        bottleneck.register_forward_pre_hook(lambda _, args: bn_inputs.append(args[0].detach()))
        for bottleneck in model.heads.bottlenecks
    ]
    model.train()
    # BN in eval keeps conv5 outputs identical to the reference computed above.
    for module in (model.backbone, model.global_conv5, model.regional_conv5):
        module.eval()
    model(batch)
    for hook in hooks:
        hook.remove()
    assert len(triplet_inputs) == len(bn_inputs) == 3
    for reference, to_triplet, to_bn in zip(unclipped, triplet_inputs, bn_inputs):
        expected = reference.clamp(0.0, 1.0)
        assert torch.allclose(to_triplet, expected, atol=1e-5)
        assert torch.allclose(to_bn, expected, atol=1e-5)
        assert to_triplet.min() >= 0.0 and to_triplet.max() <= 1.0


def test_eval_does_not_modify_input_images(model):
    """fast-reid's evaluator flips inputs["images"] after the first pass: it must stay raw."""
    batch = make_batch(2)
    original = batch["images"].clone()
    with torch.no_grad():
        model.eval()(batch)
    assert torch.equal(batch["images"], original)


def test_training_without_targets_is_a_clear_error(model):
    with pytest.raises(ValueError, match="targets"):
        model.train()({"images": make_batch(2)["images"]})


# --- triplet loss --------------------------------------------------------------------------------


def test_triplet_loss_matches_hand_computation():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([0, 0, 1, 1])
    # Distances: d01=5, d02=1, d03=2, d12=sqrt(20), d13=sqrt(13), d23=sqrt(5).
    # anchor 0: hardest positive 5 (sample 1), hardest negative min(1, 2) = 1
    # anchor 1: positive 5, negative min(sqrt 20, sqrt 13) = sqrt 13
    # anchor 2: positive sqrt 5, negative min(1, sqrt 20) = 1
    # anchor 3: positive sqrt 5, negative min(2, sqrt 13) = 2
    gaps = [5 - 1, 5 - math.sqrt(13), math.sqrt(5) - 1, math.sqrt(5) - 2]
    expected = sum(math.log1p(math.exp(gap)) for gap in gaps) / 4
    loss = soft_margin_batch_hard_triplet(features, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_loss_gradient_is_finite_with_duplicates_and_one_identity():
    features = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]], requires_grad=True)
    loss = soft_margin_batch_hard_triplet(features, torch.tensor([0, 0, 1]))
    loss.backward()
    assert torch.isfinite(features.grad).all()
    single = soft_margin_batch_hard_triplet(features, torch.zeros(3, dtype=torch.long))
    assert single.item() == 0.0


def hardest_indices(distances: torch.Tensor, targets: torch.Tensor):
    same = targets[:, None] == targets[None, :]
    positive = distances.masked_fill(~same, float("-inf")).argmax(dim=1)
    negative = distances.masked_fill(same, float("inf")).argmin(dim=1)
    return positive, negative


def test_triplet_distances_are_fp32_under_fp16_autocast():
    # CPU autocast float16 stands in for CUDA AMP: an fp16 Gram matrix of 512 features in [0, 1]
    # (squared norms ~170) gives self-distances of several tenths and other hardest samples.
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(32, 512, generator=generator)
    targets = torch.arange(32) // 4
    reference = two_branch_losses.pairwise_euclidean(features)
    with torch.autocast("cpu", dtype=torch.float16):
        distances = two_branch_losses.pairwise_euclidean(features)
        loss = soft_margin_batch_hard_triplet(features, targets)
    assert distances.dtype == torch.float32
    torch.testing.assert_close(distances, reference, rtol=1e-5, atol=1e-5)
    assert distances.diagonal().max().item() < 0.05  # fp32 cancellation; fp16 gives 0.35
    for under_amp, fp32 in zip(hardest_indices(distances, targets),
                               hardest_indices(reference, targets)):
        assert torch.equal(under_amp, fp32)
    assert loss.item() == pytest.approx(soft_margin_batch_hard_triplet(features, targets).item(),
                                        rel=1e-6)


def test_cross_entropy_uses_label_smoothing(model):
    features = [torch.rand(8, d) for d in (512, REGIONAL_DIM, REGIONAL_DIM)]
    targets = make_batch()["targets"]
    model.eval()  # BN with running stats: logits are a fixed function of the features
    losses = model.losses(features, targets)
    logits = model.heads.logits(features)
    expected = F.cross_entropy(logits[0], targets, label_smoothing=0.1)
    assert torch.allclose(losses["loss_global_ce"], expected)
    assert not torch.allclose(losses["loss_global_ce"], F.cross_entropy(logits[0], targets))


# --- freezing ------------------------------------------------------------------------------------


def test_freeze_layers_cover_exactly_backbone_and_both_conv5(model):
    groups = get_default_optimizer_params(model, base_lr=0.1, freeze_layers=PHASE_A_FROZEN)
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {names[id(g["params"][0])] for g in groups if g["freeze_status"] == "freeze"}
    trained = {names[id(g["params"][0])] for g in groups if g["freeze_status"] == "normal"}
    assert trained == {n for n, _ in model.heads.named_parameters(prefix="heads")}
    assert frozen == {n for n, _ in model.named_parameters()} - trained
    assert all(n.split(".")[0] in PHASE_A_FROZEN for n in frozen)

    hook = LayerFreeze(model.train(), PHASE_A_FROZEN, freeze_iters=10)
    hook.freeze_specific_layer()
    assert not any(getattr(model, name).training for name in PHASE_A_FROZEN)
    assert model.heads.training


# --- pretrained weights --------------------------------------------------------------------------


def assert_backbone_equals_file(model, state):
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    for conv5 in (model.global_conv5, model.regional_conv5):
        for key, value in conv5.state_dict().items():
            assert torch.equal(value, state[f"layer4.{key}"]), key


def test_load_torchvision_format_file(tmp_path, r18_cfg):
    torch.manual_seed(1)
    state = torchvision_state(r18_cfg)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    cfg = r18_cfg.clone()
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    torch.manual_seed(2)
    model = build_model(cfg)
    assert_backbone_equals_file(model, state)
    # The copies are independent modules after loading.
    assert model.global_conv5[0].conv1.weight is not model.regional_conv5[0].conv1.weight


def test_load_fastreid_checkpoint_format(tmp_path, r18_cfg):
    torch.manual_seed(1)
    state = dict(build_resnet(r18_cfg).state_dict())
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]  # old torchvision files lack BN step counters
    checkpoint = {
        "model": {f"backbone.{k}": v for k, v in state.items()},
        "iteration": 7,
    }
    checkpoint["model"]["heads.weight"] = torch.zeros(3)
    path = tmp_path / "model_final.pth"
    torch.save(checkpoint, path)
    resnet = build_resnet(r18_cfg)
    load_pretrained_backbone(resnet, str(path))
    for key, value in state.items():
        assert torch.equal(resnet.state_dict()[key], value), key


def test_r18_file_into_r50_model_names_the_keys(tmp_path, r18_cfg):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state(r18_cfg), path)
    cfg = make_cfg("50x")
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight") as error:
        build_model(cfg)
    assert "shapes differ" in str(error.value) and "resnet18.pth" in str(error.value)


def test_wrong_shape_names_the_key(tmp_path, r18_cfg):
    state = torchvision_state(r18_cfg)
    state["layer2.1.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer2\.1\.conv1\.weight \(file \(1, 1, 3, 3\)"):
        load_pretrained_backbone(build_resnet(r18_cfg), str(path))


def test_missing_file_names_the_config_key(tmp_path, r18_cfg):
    cfg = r18_cfg.clone()
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="MODEL.BACKBONE.PRETRAIN_PATH"):
        build_model(cfg)
    with pytest.raises(FileNotFoundError, match="MODEL.BACKBONE.PRETRAIN_PATH"):
        load_pretrained_backbone(build_resnet(r18_cfg), str(tmp_path / "absent.pth"))


def test_pretrain_without_path_refuses_to_download(r18_cfg):
    cfg = r18_cfg.clone()
    cfg.MODEL.BACKBONE.PRETRAIN = True
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = ""
    with pytest.raises(ValueError, match="never downloads"):
        build_model(cfg)
    with pytest.raises(ValueError, match="MODEL.BACKBONE.PRETRAIN_PATH is empty"):
        check_pretrain_config(cfg)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    check_pretrain_config(cfg)  # random init needs no file
