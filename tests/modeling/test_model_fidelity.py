"""The original Keras code's optimizer, backbone and pixel preprocessing, as options of the paper
rows: Keras's Adam step count, backbone BatchNorm momentum / eps, ResNet v1 strides, BGR input."""
from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SYNTHETIC_BASE, run_train_net, tiny_opts
from fastreid.utils.events import EventStorage

from adaptive_l2.config import load_config
from adaptive_l2.keras_adam import KerasAdam
from adaptive_l2.optim import FREEZE, build_optimizer, with_layer_freeze
from adaptive_l2.trainer import Trainer

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-7
PHASE_A_STEPS = 4000
PAPER_R50 = os.path.join(REPO, "configs", "Paper", "Market1501", "adaptive_l2_R50.yml")
CAFFE_MEAN = [103.939, 116.779, 123.68]  # ImageNet mean in BGR order (Keras's caffe mode)
TINY_TWO_BRANCH = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False",
                   "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.TWO_BRANCH.REGIONAL_DIM", "16"]


# --- Adam with Keras's global step count ---------------------------------------------------------

def keras_adam_by_hand(value: float, grads, first_step: int) -> float:
    """Keras 2.2's Adam on one scalar, in Python floats: global step t, eps added to sqrt(v)."""
    m = v = 0.0
    for offset, grad in enumerate(grads):
        t = first_step + offset
        m = BETA1 * m + (1 - BETA1) * grad
        v = BETA2 * v + (1 - BETA2) * grad * grad
        value -= LR * math.sqrt(1 - BETA2 ** t) / (1 - BETA1 ** t) * m / (math.sqrt(v) + EPS)
    return value


def grad_early(step: int) -> float:
    return 0.3 * math.sin(0.01 * step) + 0.1


def two_phase_optimizer(optimizer_class):
    """One tensor trained from step 1, one frozen (grad withheld) for PHASE_A_STEPS steps."""
    early = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    late = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    optimizer = with_layer_freeze(optimizer_class)(
        [{"params": [early], "freeze_status": "normal"},
         {"params": [late], "freeze_status": FREEZE}], lr=LR, betas=(BETA1, BETA2), eps=EPS)
    optimizer.freeze_active = True
    for step in range(1, PHASE_A_STEPS + 1):
        early.grad = torch.tensor([grad_early(step)], dtype=torch.float64)
        late.grad = torch.tensor([0.5], dtype=torch.float64)  # withheld by the freeze wrapper
        optimizer.step()
    optimizer.freeze_active = False
    return optimizer, early, late


@pytest.fixture(scope="module")
def phase_a():
    return two_phase_optimizer(KerasAdam)


def test_tensor_trained_from_step_one_follows_keras_adam(phase_a):
    optimizer, early, late = phase_a
    expected = keras_adam_by_hand(1.0, [grad_early(s) for s in range(1, PHASE_A_STEPS + 1)], 1)
    assert early.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert early.item() < 0.0  # it moved by about 4000 * lr * sign of the (positive) gradient
    assert late.item() == 2.0 and late not in optimizer.state  # frozen: no update, no state
    assert optimizer.state_dict()["global_step"] == PHASE_A_STEPS


def test_first_keras_step_is_lr_for_a_fresh_optimizer():
    param = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    optimizer = KerasAdam([param], lr=LR, betas=(BETA1, BETA2), eps=EPS)
    param.grad = torch.tensor([0.5], dtype=torch.float64)
    optimizer.step()
    # lr * sqrt(1 - 0.999) / (1 - 0.9) * 0.05 / (sqrt(0.00025) + 1e-7) = 9.99994e-4
    assert param.item() == pytest.approx(-9.99994e-4, rel=1e-6)


def test_tensor_unfrozen_at_step_4001_takes_keras_sized_steps():
    """Zero moments but t past 4000: the first steps are ~3.16 lr, then ~6.5 lr after ten (with a
    constant gradient), where torch's per-tensor count gives ~lr."""
    keras, _, late = two_phase_optimizer(KerasAdam)
    torch_adam, _, late_torch = two_phase_optimizer(torch.optim.Adam)
    keras_moves, torch_moves = [], []
    for _ in range(10):
        for optimizer, param, moves in ((keras, late, keras_moves),
                                        (torch_adam, late_torch, torch_moves)):
            before = param.item()
            param.grad = torch.tensor([0.5], dtype=torch.float64)
            optimizer.step()
            moves.append((before - param.item()) / LR)
    expected = keras_adam_by_hand(2.0, [0.5] * 10, PHASE_A_STEPS + 1)
    assert late.item() == pytest.approx(expected, rel=1e-12)
    # m / sqrt(v) = 0.1 / sqrt(0.001) = 3.162 at the first step, 0.6513 / sqrt(0.009955) = 6.527 at
    # the tenth, times sqrt(1 - 0.999 ** t) = 0.9908 (t = 4001..4010: beta2 ** t is still 0.018)
    assert keras_moves[0] == pytest.approx(3.1333, rel=1e-4)
    assert keras_moves[9] == pytest.approx(6.4685, rel=1e-4)
    assert torch_moves[0] == pytest.approx(1.0, rel=1e-3)
    assert keras.state_dict()["global_step"] == PHASE_A_STEPS + 10


def test_resumed_optimizer_continues_the_global_step(phase_a):
    optimizer, early, late = phase_a
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    params = [early.detach().clone().requires_grad_(), late.detach().clone().requires_grad_()]
    resumed = with_layer_freeze(KerasAdam)(
        [{"params": [params[0]], "freeze_status": "normal"},
         {"params": [params[1]], "freeze_status": FREEZE}], lr=LR, betas=(BETA1, BETA2), eps=EPS)
    resumed.load_state_dict(saved)
    assert resumed.global_step == PHASE_A_STEPS and "global_step" in saved  # caller's dict kept
    continued = [early.detach().clone().requires_grad_(), late.detach().clone().requires_grad_()]
    original = with_layer_freeze(KerasAdam)(
        [{"params": [continued[0]], "freeze_status": "normal"},
         {"params": [continued[1]], "freeze_status": FREEZE}], lr=LR, betas=(BETA1, BETA2), eps=EPS)
    original.load_state_dict(optimizer.state_dict())
    for step in range(3):
        for opt, (a, b) in ((resumed, params), (original, continued)):
            a.grad = torch.tensor([grad_early(PHASE_A_STEPS + step + 1)], dtype=torch.float64)
            b.grad = torch.tensor([0.5], dtype=torch.float64)
            opt.step()
    assert [p.item() for p in params] == [p.item() for p in continued]
    # the unfrozen tensor's first step is Keras-sized (t = 4001), not a fresh optimizer's lr
    assert (2.0 - params[1].item()) / LR > 3.0


def synthetic_cfg(*opts):
    return load_config(SYNTHETIC_BASE, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False",
                                        "MODEL.HEADS.NUM_CLASSES", "4", *opts])


def test_build_optimizer_wraps_keras_adam_with_clipping_freeze_and_penalty():
    cfg = synthetic_cfg("SOLVER.OPT", "Adam", "SOLVER.ADAM_GLOBAL_STEP", "True",
                        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "MODEL.REG.NAME", "adaptive")
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    assert isinstance(optimizer, KerasAdam)
    assert "GradientClip" in "".join(cls.__name__ for cls in type(optimizer).__mro__)
    assert optimizer.before_step is not None  # the adaptive penalty's weight gradient
    thetas = [p for n, p in model.named_parameters() if "theta" in n]
    assert thetas
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(8) % 2}
    with EventStorage(0):
        losses = model(batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    # every tensor with a gradient moved (a theta's gradient, 0.2 A sum(W^2), is filled in by
    # before_step: it is 0 only for the BN betas, which start at 0)
    with_gradient = [(old, p) for old, p in zip(before, params) if p.grad.abs().sum() > 0]
    assert len(with_gradient) > len(params) * 0.8
    assert all(not torch.equal(old, p) for old, p in with_gradient)
    assert sum(t.item() < 0 for t in thetas) > len(thetas) // 2
    assert optimizer.global_step == 1


def test_adam_global_step_needs_adam():
    cfg = synthetic_cfg("SOLVER.OPT", "SGD", "SOLVER.ADAM_GLOBAL_STEP", "True")
    with pytest.raises(ValueError, match="SOLVER.ADAM_GLOBAL_STEP"):
        build_optimizer(cfg, torch.nn.Linear(2, 2))


# --- backbone BatchNorm and ResNet v1 strides ----------------------------------------------------

def two_branch_cfg(*opts):
    return load_config(PAPER_R50, [*TINY_TWO_BRANCH, *opts])


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return Trainer.build_model(two_branch_cfg())


def backbone_bns(model):
    return [m for part in (model.backbone, model.global_conv5, model.regional_conv5)
            for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_paper_config_builds_fp32_with_the_originals_values(paper_model):
    cfg = two_branch_cfg()
    assert cfg.SOLVER.AMP.ENABLED is False
    assert cfg.SOLVER.ADAM_GLOBAL_STEP is True and cfg.SOLVER.ADAM_EPS == 1e-7
    assert (cfg.MODEL.BACKBONE.NORM_MOMENTUM, cfg.MODEL.BACKBONE.NORM_EPS) == (0.01, 1.001e-5)
    assert cfg.MODEL.BACKBONE.STRIDE_IN_1X1 is True and cfg.MODEL.PIXEL_FORMAT == "RGB"
    assert isinstance(build_optimizer(cfg, paper_model)[0], KerasAdam)
    bns = backbone_bns(paper_model)
    # stem + 3 per block of conv2..conv4 and their 3 downsamples + twice conv5 (3 blocks, 1 down)
    assert len(bns) == 1 + 3 * (3 + 4 + 6) + 3 + 2 * (3 * 3 + 1)
    assert all(bn.momentum == 0.01 and bn.eps == 1.001e-5 for bn in bns)
    assert paper_model.pixel_format == "RGB"


def test_bn_options_reach_both_conv5_copies_but_not_the_heads():
    torch.manual_seed(0)
    model = Trainer.build_model(two_branch_cfg("MODEL.BACKBONE.NORM_MOMENTUM", "0.3",
                                               "MODEL.BACKBONE.NORM_EPS", "0.5"))
    for part in (model.global_conv5, model.regional_conv5):
        assert part[0].bn1.momentum == 0.3 and part[-1].bn3.eps == 0.5
    assert all(bn.momentum == 0.01 and bn.eps == 2e-5 for bn in model.heads.bottlenecks)
    # the momentum is really used: one training forward moves the running mean 30% of the way
    bn = model.regional_conv5[0].bn1
    seen = {}
    bn.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].detach()))
    with EventStorage(0):
        model({"images": torch.rand(4, 3, 64, 32) * 255, "targets": torch.tensor([0, 0, 1, 1])})
    assert torch.allclose(bn.running_mean, 0.3 * seen["x"].mean(dim=(0, 2, 3)), atol=1e-6)


def test_host_defaults_keep_fast_reids_bn_and_strides():
    torch.manual_seed(0)
    model = Trainer.build_model(two_branch_cfg("MODEL.BACKBONE.NORM_MOMENTUM", "-1.0",
                                               "MODEL.BACKBONE.NORM_EPS", "-1.0",
                                               "MODEL.BACKBONE.STRIDE_IN_1X1", "False"))
    assert all(bn.momentum == 0.1 and bn.eps == 1e-5 for bn in backbone_bns(model))
    assert model.backbone.layer2[0].conv2.stride == (2, 2)
    assert model.backbone.layer2[0].conv1.stride == (1, 1)


def test_stride_in_1x1_moves_strides_keeps_shapes_and_loads_the_other_layout(paper_model):
    torch.manual_seed(1)
    v15 = Trainer.build_model(two_branch_cfg("MODEL.BACKBONE.STRIDE_IN_1X1", "False"))
    for model, strided, plain in ((paper_model, "conv1", "conv2"), (v15, "conv2", "conv1")):
        for name in ("layer2", "layer3"):
            block = getattr(model.backbone, name)[0]
            assert getattr(block, strided).stride == (2, 2)
            assert getattr(block, plain).stride == (1, 1)
            assert block.downsample[0].stride == (2, 2)
        assert model.global_conv5[0].conv1.stride == model.global_conv5[0].conv2.stride == (1, 1)
    paper_model.load_state_dict(v15.state_dict())  # strict: same names and shapes
    images = torch.rand(2, 3, 64, 32) * 255
    paper_model.eval(), v15.eval()
    with torch.no_grad():
        v1_features, v15_features = paper_model(images), v15(images)
        # a strided 1x1 conv is the unstrided one subsampled
        block = paper_model.backbone.layer2[0]
        x = torch.rand(1, block.conv1.in_channels, 16, 8)
        assert torch.allclose(block.conv1(x), F.conv2d(x, block.conv1.weight)[:, :, ::2, ::2],
                              atol=1e-5)
    assert v1_features.shape == v15_features.shape == (2, 2048 + 2 * 16)
    assert not torch.allclose(v1_features, v15_features)
    paper_model.train()


def test_stride_in_1x1_refuses_a_backbone_without_bottlenecks():
    cfg = synthetic_cfg("MODEL.BACKBONE.STRIDE_IN_1X1", "True")
    assert cfg.MODEL.BACKBONE.DEPTH == "18x"
    with pytest.raises(ValueError, match="STRIDE_IN_1X1"):
        Trainer.build_model(cfg)


# --- pixel preprocessing -------------------------------------------------------------------------

def constant_rgb_image(red: float, green: float, blue: float) -> torch.Tensor:
    return torch.tensor([red, green, blue]).view(1, 3, 1, 1).expand(2, 3, 64, 32).clone()


BGR_OPTS = ["MODEL.PIXEL_FORMAT", "BGR", "MODEL.PIXEL_MEAN", str(CAFFE_MEAN),
            "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]


@pytest.mark.parametrize("which", ["Baseline", "TwoBranchReID"])
def test_bgr_preprocessing_equals_caffe_by_hand(which):
    cfg = (synthetic_cfg(*BGR_OPTS) if which == "Baseline"
           else two_branch_cfg(*BGR_OPTS, "MODEL.BACKBONE.STRIDE_IN_1X1", "False"))
    model = Trainer.build_model(cfg)
    assert type(model).__name__ == which
    images = constant_rgb_image(10.0, 20.0, 30.0)
    raw = images.clone()
    normalized = model.preprocess_image({"images": images})
    # caffe: channel 0 is blue minus the blue mean, then green, then red
    expected = [30.0 - 103.939, 20.0 - 116.779, 10.0 - 123.68]
    for channel, value in enumerate(expected):
        assert torch.allclose(normalized[:, channel], torch.full((2, 64, 32), value))
    assert torch.equal(images, raw)  # the caller's batch is not touched


def test_rgb_default_normalizes_with_mean_and_std():
    model = Trainer.build_model(synthetic_cfg())
    normalized = model.preprocess_image(constant_rgb_image(10.0, 20.0, 30.0))
    mean, std = [0.485 * 255, 0.456 * 255, 0.406 * 255], [0.229 * 255, 0.224 * 255, 0.225 * 255]
    for channel, value in enumerate((10.0, 20.0, 30.0)):
        assert normalized[0, channel, 0, 0].item() == pytest.approx(
            (value - mean[channel]) / std[channel], rel=1e-5)


def test_unknown_pixel_format_is_refused_by_name():
    with pytest.raises(ValueError, match="MODEL.PIXEL_FORMAT"):
        Trainer.build_model(synthetic_cfg("MODEL.PIXEL_FORMAT", "bgr"))


# --- end to end: the global step in a real run and its resume ------------------------------------

def test_training_run_saves_and_resumes_the_global_step(dataset_root, tmp_path):
    keras_adam = ["SOLVER.OPT", "Adam", "SOLVER.ADAM_GLOBAL_STEP", "True", "TEST.EVAL_PERIOD", "10"]
    run_train_net(["--config-file", SYNTHETIC_BASE,
                   *tiny_opts(dataset_root, tmp_path, *keras_adam)])
    first = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert first["optimizer"]["global_step"] == 4  # 2 epochs x 2 iterations
    run_train_net(["--config-file", SYNTHETIC_BASE, "--resume",
                   *tiny_opts(dataset_root, tmp_path, *keras_adam, "SOLVER.MAX_EPOCH", "3")])
    resumed = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert resumed["optimizer"]["global_step"] == 6  # continued, not restarted at 0
