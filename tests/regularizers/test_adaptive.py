"""The adaptive L2 term: its formula, gradients, parameters, optimizer groups, freezing,
checkpoints."""
import pytest
import torch
from conftest import tiny_cfg
from fastreid.utils.events import EventStorage
from torch import nn

from adaptive_l2.config import load_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.regularizers.adaptive import AdaptiveL2Penalty, hard_sigmoid_keras
from adaptive_l2.regularizers.conventional import ConventionalL2Penalty
from adaptive_l2.regularizers.l2_base import regularized_tensors, squared_norms
from adaptive_l2.trainer import Trainer

A = 0.005


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2, bias=False)


def _penalty(model, amplitude=A):
    return AdaptiveL2Penalty(regularized_tensors(model), {k: amplitude for k in
                                                          ("kernel", "bias", "norm_weight", "norm_bias")})


def test_hard_sigmoid_is_old_keras_not_torch():
    theta = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
    expected = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.0])
    assert torch.allclose(hard_sigmoid_keras(theta), expected)


class Owner:
    """Stands for the optimizer that claims the weight gradient."""


def _set_thetas(penalty, values):
    with torch.no_grad():
        for theta, value in zip(penalty.thetas, values):
            theta.fill_(value)


@pytest.mark.parametrize("claimed", [False, True])
def test_penalty_and_gradients_equal_hand_computation(claimed):
    """Unclaimed, autograd gives the weights 2 * lambda * W; claimed, the backward gives them
    nothing and `add_weight_gradients(owner)` adds the same values."""
    torch.manual_seed(0)
    model = Small()
    penalty = _penalty(model)
    kinds = [e.kind for e in penalty.entries]
    assert kinds == ["kernel", "bias", "norm_weight", "norm_bias", "kernel"]
    thetas = [0.0, -1.0, 1.5, -3.0, 3.0]  # linear range x3, saturated at 0 and at 1
    _set_thetas(penalty, thetas)
    weights = [p for _, p in regularized_tensors(model)]
    owner = Owner()
    if claimed:
        penalty.claim_weight_gradient(owner)
    value = penalty.penalty()
    value.backward()
    if claimed:
        assert all(w.grad is None for w in weights)
        for w in weights:
            w.grad = torch.zeros_like(w)
        penalty.add_weight_gradients(owner)  # as the optimizer's step adds them first
    f = [min(max(0.2 * t + 0.5, 0.0), 1.0) for t in thetas]
    expected = sum(A * fn * float((w.detach().double() ** 2).sum()) for fn, w in zip(f, weights))
    assert abs(float(value.detach()) - expected) < 1e-6 * max(1.0, expected)
    for fn, t, w, theta in zip(f, thetas, weights, penalty.thetas):
        assert torch.allclose(w.grad, 2 * A * fn * w.detach(), atol=1e-8)
        inside = -2.5 < t < 2.5
        want = 0.2 * A * float((w.detach() ** 2).sum()) if inside else 0.0
        assert abs(float(theta.grad) - want) < 1e-7


def test_weight_gradient_is_added_by_its_owner_only():
    torch.manual_seed(0)
    model = Small()
    penalty = _penalty(model)
    with pytest.raises(RuntimeError, match="count it twice"):
        penalty.add_weight_gradients(Owner())  # unclaimed: autograd adds it
    first, second = Owner(), Owner()
    penalty.claim_weight_gradient(first)
    penalty.claim_weight_gradient(first)  # the same owner again is fine
    with pytest.raises(RuntimeError, match="already added by another optimizer"):
        penalty.claim_weight_gradient(second)
    with pytest.raises(RuntimeError, match="count it twice"):
        penalty.add_weight_gradients(second)
    del first  # a dropped owner hands it back
    penalty.claim_weight_gradient(second)
    penalty.release_weight_gradient(second)
    assert penalty.weight_gradient_owner is None
    import copy

    penalty.claim_weight_gradient(second)
    assert copy.deepcopy(model.conv) is not None
    assert copy.deepcopy(penalty).weight_gradient_owner is None  # a copy is a new penalty


def test_conventional_penalty_is_a_constant_factor():
    torch.manual_seed(0)
    model = Small()
    penalty = ConventionalL2Penalty(regularized_tensors(model), 0.005)
    owner = Owner()
    penalty.claim_weight_gradient(owner)
    for _, w in regularized_tensors(model):
        w.grad = torch.zeros_like(w)
    penalty.add_weight_gradients(owner)
    for _, w in regularized_tensors(model):
        assert torch.allclose(w.grad, 0.01 * w.detach())  # Keras l2(0.005) == weight decay 0.01
    assert torch.equal(penalty.factors(), torch.full((5,), 0.005))


def test_squared_norms_accumulate_in_fp32_for_half_weights():
    big = torch.full((1000,), 10.0, dtype=torch.float16)  # sum of squares 1e5 > fp16 max
    assert torch.isinf((big ** 2).sum())  # fp16 accumulation overflows
    sq = squared_norms([big])
    assert sq.dtype == torch.float32
    assert float(sq[0]) == pytest.approx(1e5)
    model = nn.Linear(1000, 1, bias=False).half()
    with torch.no_grad():
        model.weight.fill_(10.0)
    penalty = _penalty(model)
    value = penalty.penalty().detach()
    assert torch.isfinite(value) and float(value) == pytest.approx(A * 0.5 * 1e5)
    penalty.penalty().backward()  # autograd: the weight gradient in the weight's dtype
    assert model.weight.grad.dtype == torch.float16
    assert torch.allclose(model.weight.grad.float(), torch.full((1, 1000), 2 * A * 0.5 * 10.0), rtol=1e-3)
    owner = Owner()
    penalty.claim_weight_gradient(owner)
    model.weight.grad = torch.zeros_like(model.weight)
    penalty.add_weight_gradients(owner)
    assert model.weight.grad.dtype == torch.float16
    assert torch.allclose(model.weight.grad.float(), torch.full((1, 1000), 2 * A * 0.5 * 10.0), rtol=1e-3)


def test_optimizer_step_applies_the_weight_gradient_once(dataset_root, tmp_path):
    """SGD, lr 1, no data gradient: one step scales every tensor by 1 - 2 * 0.005 (once, also when
    plain optimizers of the same classes were created before: torch then hooks their step too)."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                   "MODEL.REG.NAME", "conventional", "SOLVER.OPT", "SGD",
                   "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0")
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] * (1 - 0.01), atol=1e-7), name


@pytest.mark.parametrize("extra", [
    ("MODEL.META_ARCHITECTURE", "Baseline"),
    ("MODEL.META_ARCHITECTURE", "MGN", "MODEL.BACKBONE.DEPTH", "50x",
     "MODEL.BACKBONE.FEAT_DIM", "2048"),
])
def test_one_theta_per_trainable_tensor(dataset_root, tmp_path, extra):
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                   "MODEL.REG.NAME", "adaptive", *extra)
    model = Trainer.build_model(cfg)
    penalty = model.l2_penalty
    theta_ids = {id(t) for t in penalty.thetas}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in theta_ids]
    assert len(penalty.thetas) == len(others) > 50
    with EventStorage(0):
        losses = model({"images": torch.rand(8, 3, 96, 32) * 255, "targets": torch.arange(8) % 2})
    assert "loss_adaptive_l2" in losses and float(losses["loss_adaptive_l2"].detach()) > 0
    model.eval()
    with torch.no_grad():
        feats = model({"images": torch.rand(2, 3, 96, 32) * 255})
    assert isinstance(feats, torch.Tensor)  # evaluation output untouched


@pytest.mark.parametrize("term", ["adaptive", "conventional"])
def test_every_group_has_zero_weight_decay_with_a_term_on(dataset_root, tmp_path, term):
    from fastreid.config import get_cfg

    assert get_cfg().SOLVER.WEIGHT_DECAY == 0.0005  # fast-reid's default would penalize twice
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME", term,
                   "SOLVER.WEIGHT_DECAY", "0.0005", "SOLVER.WEIGHT_DECAY_NORM", "0.0005",
                   "SOLVER.WEIGHT_DECAY_BIAS", "0.0005")
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0] * len(optimizer.param_groups)
    off = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                   "SOLVER.WEIGHT_DECAY", "0.0005")
    optimizer_off, _ = build_optimizer(off, Trainer.build_model(off))
    assert any(g["weight_decay"] > 0 for g in optimizer_off.param_groups)


def test_frozen_tensor_keeps_its_theta_until_unfrozen(dataset_root, tmp_path):
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                   "MODEL.REG.NAME", "adaptive", "MODEL.FREEZE_LAYERS", '["backbone"]',
                   "SOLVER.FREEZE_ITERS", "2")
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    penalty = model.l2_penalty
    backbone = [i for i, e in enumerate(penalty.entries) if e.name.startswith("backbone.")]
    heads = [i for i, e in enumerate(penalty.entries) if e.name.startswith("heads.")]
    assert backbone and heads

    def step():
        with EventStorage(0):
            loss = sum(model({"images": torch.rand(8, 3, 64, 32) * 255,
                              "targets": torch.arange(8) % 2}).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    optimizer.freeze_active = True
    for _ in range(2):
        step()
    thetas = penalty.theta_vector().detach()
    assert torch.all(thetas[backbone] == 0)
    assert torch.all(thetas[heads] < 0)
    optimizer.freeze_active = False
    step()
    # BN shifts start at exactly 0, so sum(W^2) = 0 gives their theta no gradient in the first step
    nonzero = [i for i in backbone if penalty.entries[i].kind != "norm_bias"]
    assert len(nonzero) > 20
    assert torch.all(penalty.theta_vector().detach()[nonzero] < 0)


def test_checkpoint_restores_thetas_and_optimizer_state(dataset_root, tmp_path):
    from fastreid.utils.checkpoint import Checkpointer

    from adaptive_l2.checkpoint import load_for_evaluation

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME", "adaptive")
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    with EventStorage(0):
        for _ in range(2):
            loss = sum(model({"images": torch.rand(8, 3, 64, 32) * 255,
                              "targets": torch.arange(8) % 2}).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("ckpt")
    restored = Trainer.build_model(cfg)
    restored_optimizer, _ = build_optimizer(cfg, restored)
    Checkpointer(restored, str(tmp_path), optimizer=restored_optimizer).load(str(tmp_path / "ckpt.pth"))
    assert torch.equal(restored.l2_penalty.theta_vector(), model.l2_penalty.theta_vector())
    assert torch.any(model.l2_penalty.theta_vector() != 0)
    for theta, theta_restored in zip(model.l2_penalty.thetas, restored.l2_penalty.thetas):
        a, b = optimizer.state[theta], restored_optimizer.state[theta_restored]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # a checkpoint without thetas (trained with no penalty) loads for evaluation
    plain_cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    torch.save({"model": Trainer.build_model(plain_cfg).state_dict()}, tmp_path / "plain.pth")
    load_for_evaluation(Trainer.build_model(cfg), str(tmp_path / "plain.pth"))
    # a checkpoint whose thetas belong to another model is refused
    other_cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4",
                         "MODEL.REG.NAME", "adaptive", "MODEL.BACKBONE.DEPTH", "34x")
    torch.save({"model": Trainer.build_model(other_cfg).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ValueError):
        load_for_evaluation(Trainer.build_model(cfg), str(tmp_path / "other.pth"))


def test_amplitude_per_kind_overrides_the_default(dataset_root, tmp_path):
    cfg = load_config("", ["MODEL.REG.NAME", "adaptive", "MODEL.DEVICE", "cpu",
                           "MODEL.REG.AMPLITUDE_PER_KIND.NORM_WEIGHT", "0.001"])
    from adaptive_l2.regularizers.adaptive import amplitudes_from_config

    assert amplitudes_from_config(cfg.MODEL.REG) == {
        "kernel": 0.005, "bias": 0.005, "norm_weight": 0.001, "norm_bias": 0.005}


def _one_step_deltas(dataset_root, tmp_path, scale, *extra):
    """(theta deltas, weight deltas) of one optimizer step on one real batch, seeded alike."""
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME",
                   "adaptive", "MODEL.REG.THETA_LR_SCALE", str(float(scale)), *extra)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    thetas = model.l2_penalty.theta_vector().detach().clone()
    weights = [w.detach().clone() for w in model.l2_penalty._weights]
    gen = torch.Generator().manual_seed(1)
    batch = {"images": torch.rand(8, 3, 64, 32, generator=gen) * 255,
             "targets": torch.arange(8) % 2}
    with EventStorage(0):
        loss = sum(model(batch).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    theta_delta = model.l2_penalty.theta_vector().detach() - thetas
    weight_delta = [w.detach() - old for w, old in zip(model.l2_penalty._weights, weights)]
    return theta_delta, weight_delta


@pytest.mark.parametrize("optimizer", [("SOLVER.OPT", "SGD", "SOLVER.MOMENTUM", "0.0"),
                                       ("SOLVER.OPT", "Adam", "SOLVER.ADAM_GLOBAL_STEP", "True")])
def test_theta_lr_scale_scales_the_thetas_step_only(dataset_root, tmp_path, optimizer):
    base_thetas, base_weights = _one_step_deltas(dataset_root, tmp_path, 1, *optimizer)
    thetas, weights = _one_step_deltas(dataset_root, tmp_path, 4, *optimizer)
    assert (base_thetas < 0).sum() > 20  # the penalty's theta gradient is >= 0: thetas fall
    assert torch.allclose(thetas, 4 * base_thetas, rtol=1e-4, atol=1e-9)
    for a, b in zip(weights, base_weights):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_theta_lr_scale_survives_the_schedule_and_bad_values_are_refused(dataset_root, tmp_path):
    from adaptive_l2.solver import build_lr_scheduler

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME",
                   "adaptive", "MODEL.REG.THETA_LR_SCALE", "8.0", "SOLVER.WARMUP_ITERS", "3")
    optimizer, _ = build_optimizer(cfg, Trainer.build_model(cfg))
    scheduler = build_lr_scheduler(cfg, optimizer, 2)["lr_sched"]
    for _ in range(5):  # through warm-up and the step at SOLVER.STEPS
        theta_lr = {g["lr"] for g in optimizer.param_groups if g.get("is_theta")}
        weight_lr = {g["lr"] for g in optimizer.param_groups if not g.get("is_theta")}
        assert len(theta_lr) == 1 and max(weight_lr) > 0
        assert theta_lr.pop() == pytest.approx(8 * max(weight_lr))
        scheduler.step()
    for bad in ("0.0", "-1.0", "'fast'"):
        with pytest.raises(ValueError, match="MODEL.REG.THETA_LR_SCALE"):
            tiny_cfg(dataset_root, tmp_path, "MODEL.REG.THETA_LR_SCALE", bad)
