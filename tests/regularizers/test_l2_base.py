"""The L2 penalty is complete with any optimizer, counts once with the project's, and keeps its
state on the model's device without host syncs (the `meta` device stands in for CUDA)."""
import copy

import pytest
import torch
from conftest import tiny_cfg
from test_adaptive import Owner, Small
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaptive_l2.config import load_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.regularizers import hard_sigmoid_keras
from adaptive_l2.regularizers.build import attach_l2_penalty
from adaptive_l2.trainer import Trainer

THETAS = (0.0, -1.0, 1.5, -3.0, 3.0)  # linear range, and saturated at factor 0 and factor 1


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside, with the devices of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), {t.device.type for t in tensors}))
        return out

    def host_syncs(self):
        return [name for name, _ in self.calls if "_local_scalar_dense" in name]


def _reg_cfg(*extra):
    return load_config("", ["MODEL.DEVICE", "cpu", *extra])


def _penalty_step(penalty, owner=None):
    """One training step's penalty work: value, backward, the owner's fused weight gradient."""
    value = penalty.penalty()
    if value.requires_grad:  # a claimed constant term has nothing for autograd
        value.backward()
    if owner is not None:
        penalty.add_weight_gradients(owner)


@pytest.mark.parametrize("term", ["adaptive", "conventional"])
def test_penalty_state_lives_on_the_models_device_and_never_leaves_it(term):
    with torch.device("meta"):
        model = Small()
    penalty = attach_l2_penalty(model, _reg_cfg("MODEL.REG.NAME", term))
    state = list(penalty.parameters()) + list(penalty.buffers())
    assert len(state) >= 2 and {t.device.type for t in state} == {"meta"}
    assert penalty.factors().device.type == "meta"
    for claimed in (False, True):
        owner = Owner() if claimed else None
        if claimed:
            penalty.claim_weight_gradient(owner)
            # off the CPU the claimed pass builds its index tensors once per layout (one copy to
            # the device, like any buffer); every step after that stays on the device
            _penalty_step(penalty, owner)
            for weight in penalty._weights:
                weight.grad = None
        with OpRecorder() as recorder:
            _penalty_step(penalty, owner)
        assert recorder.calls
        off_device = [(name, devices) for name, devices in recorder.calls if devices != {"meta"}]
        assert off_device == [] and recorder.host_syncs() == []
        assert all(w.grad is not None and w.grad.device.type == "meta" for w in penalty._weights)
        for weight in penalty._weights:
            weight.grad = None


@pytest.mark.parametrize("claimed", [False, True])
def test_penalty_step_has_no_host_sync_on_cpu(claimed):
    model = Small()
    penalty = attach_l2_penalty(model, _reg_cfg("MODEL.REG.NAME", "adaptive"))
    owner = Owner() if claimed else None
    if claimed:
        penalty.claim_weight_gradient(owner)
    with OpRecorder() as recorder:
        _penalty_step(penalty, owner)
    assert len(recorder.calls) > 5 and recorder.host_syncs() == []


def _model_and_cfg(dataset_root, tmp_path):
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME",
                   "adaptive", "SOLVER.OPT", "SGD", "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0",
                   "SOLVER.BIAS_LR_FACTOR", "1.0", "SOLVER.HEADS_LR_FACTOR", "1.0")
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    penalty = model.l2_penalty
    with torch.no_grad():
        for index, theta in enumerate(penalty.thetas):
            theta.fill_(THETAS[index % len(THETAS)])
    return model, cfg


def _expected_after_one_step(model):
    """SGD, lr 1, penalty alone: W -= 2 * lambda * W and theta -= 0.2 * A * ||W||^2 inside
    (-2.5, 2.5), computed by hand in float64."""
    penalty = model.l2_penalty
    weights, thetas = [], []
    for index, weight in enumerate(penalty._weights):
        theta = float(penalty.thetas[index].detach())
        amplitude = float(penalty.amplitudes[index])
        factor = amplitude * float(hard_sigmoid_keras(torch.tensor(theta)))
        w = weight.detach().double()
        weights.append(w - 2 * factor * w)
        inside = -2.5 < theta < 2.5
        thetas.append(theta - (0.2 * amplitude * float((w ** 2).sum()) if inside else 0.0))
    return weights, thetas


def _assert_moved_as_expected(model, expected):
    weights, thetas = expected
    penalty = model.l2_penalty
    for weight, want in zip(penalty._weights, weights):
        assert torch.allclose(weight.detach().double(), want, rtol=0, atol=1e-6)
    for theta, want in zip(penalty.thetas, thetas):
        # torch's CPU _foreach_norm sums in fp32: ~7e-5 relative over a 2.4M-element kernel
        assert float(theta.detach()) == pytest.approx(want, rel=2e-4, abs=1e-7)


def test_plain_torch_sgd_applies_the_whole_penalty(dataset_root, tmp_path):
    model, _ = _model_and_cfg(dataset_root, tmp_path)
    expected = _expected_after_one_step(model)
    assert any(f > 0 for f in model.l2_penalty.factors().tolist())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer.zero_grad()
    model.l2_penalty.penalty().backward()
    optimizer.step()
    _assert_moved_as_expected(model, expected)


def test_project_optimizer_adds_the_same_update_once(dataset_root, tmp_path):
    model, cfg = _model_and_cfg(dataset_root, tmp_path)
    expected = _expected_after_one_step(model)
    optimizer, _ = build_optimizer(cfg, model)
    assert model.l2_penalty.weight_gradient_owner is optimizer
    optimizer.zero_grad()
    model.l2_penalty.penalty().backward()
    assert all(w.grad is None for w in model.l2_penalty._weights)  # left to the fused pass
    optimizer.step()
    _assert_moved_as_expected(model, expected)


def test_second_project_optimizer_on_one_model_is_refused(dataset_root, tmp_path):
    model, cfg = _model_and_cfg(dataset_root, tmp_path)
    first, _ = build_optimizer(cfg, model)
    with pytest.raises(RuntimeError, match="already added by another optimizer"):
        build_optimizer(cfg, model)
    model.l2_penalty.release_weight_gradient(first)
    second, _ = build_optimizer(cfg, model)
    assert model.l2_penalty.weight_gradient_owner is second
    clone = copy.deepcopy(model)  # a copy is not claimed: autograd gives it the whole term
    assert clone.l2_penalty.weight_gradient_owner is None


def test_stock_default_trainer_refuses_an_l2_term(dataset_root, tmp_path):
    from fastreid.engine.defaults import DefaultTrainer

    for term in ("MODEL.REG.ADAPTIVE", "MODEL.REG.CONVENTIONAL.ENABLED"):
        cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", term, "True")
        with pytest.raises(ValueError, match=rf"{term}.*adaptive_l2\.Trainer"):
            DefaultTrainer.build_model(cfg)

        class UsersTrainer(DefaultTrainer):
            pass

        with pytest.raises(ValueError, match="adaptive_l2.Trainer"):
            UsersTrainer.build_model(cfg)
    plain = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    assert not hasattr(DefaultTrainer.build_model(plain), "l2_penalty")  # no term: as before


def _decoupled_model(dataset_root, tmp_path, optimizer_name, lr, decoupled):
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4", "MODEL.REG.NAME",
                   "adaptive", "MODEL.REG.DECOUPLED", str(decoupled), "SOLVER.OPT", optimizer_name,
                   "SOLVER.BASE_LR", str(lr), "SOLVER.MOMENTUM", "0.0",
                   "SOLVER.BIAS_LR_FACTOR", "1.0", "SOLVER.HEADS_LR_FACTOR", "1.0")
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    with torch.no_grad():
        for index, theta in enumerate(model.l2_penalty.thetas):
            theta.fill_(THETAS[index % len(THETAS)])
    optimizer, _ = build_optimizer(cfg, model)
    return model, optimizer


def test_decoupled_adam_step_moves_each_tensor_by_lr_2_lambda_w(dataset_root, tmp_path):
    lr = 0.01
    runs = {}
    for decoupled in (True, False):
        model, optimizer = _decoupled_model(dataset_root, tmp_path, "Adam", lr, decoupled)
        penalty = model.l2_penalty
        before = [w.detach().clone() for w in penalty._weights]
        factors = penalty.factors().tolist()
        thetas_before = penalty.theta_vector().detach().clone()
        optimizer.zero_grad()
        penalty.penalty().backward()
        optimizer.step()
        runs[decoupled] = [w.detach().clone() for w in penalty._weights]
        if decoupled:
            assert any(f > 0 for f in factors) and any(f == 0 for f in factors)
            for weight, old, factor in zip(penalty._weights, before, factors):
                want = old.double() - lr * 2 * factor * old.double()  # exact, up to fp32 rounding
                assert torch.allclose(weight.detach().double(), want, rtol=1e-6, atol=1e-12)
            # the thetas still learn from the value: Adam's first step moves them by ~lr
            moved = (thetas_before - penalty.theta_vector().detach()).abs()
            # BN shifts start at 0: sum(W^2) = 0 gives their theta no gradient
            nonzero = torch.tensor([bool(w.abs().sum() > 0) for w in before])
            learns = (thetas_before > -2.5) & (thetas_before < 2.5) & nonzero
            assert learns.sum() > 10
            assert torch.all(moved[learns] > 0.5 * lr) and torch.all(moved[~learns] == 0)
    differ = [not torch.allclose(a, b) for a, b in zip(runs[True], runs[False])]
    assert sum(differ) > len(differ) // 2  # Adam normalizes the coupled term: not the same


def test_decoupled_equals_coupled_with_plain_sgd(dataset_root, tmp_path):
    from fastreid.utils.events import EventStorage

    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(8, 3, 64, 32, generator=gen) * 255,
             "targets": torch.arange(8) % 2}
    results = []
    for decoupled in (True, False):
        model, optimizer = _decoupled_model(dataset_root, tmp_path, "SGD", 0.1, decoupled)
        with EventStorage(0):
            loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_decoupled_penalty_refuses_an_optimizer_that_cannot_apply_it():
    model = Small()
    penalty = attach_l2_penalty(model, _reg_cfg("MODEL.REG.NAME", "adaptive",
                                                "MODEL.REG.DECOUPLED", "True"))
    with pytest.raises(RuntimeError, match="MODEL.REG.DECOUPLED"):
        penalty.penalty()


def test_a_copied_penalty_decays_its_own_weights():
    """deepcopy gives the copy new weight tensors: the decoupled decay (which finds its tensors
    by id) must find the copy's, not the original's (it used to decay nothing, silently)."""
    from torch import nn

    from adaptive_l2.regularizers.conventional import ConventionalL2Penalty
    from adaptive_l2.regularizers.l2_base import regularized_tensors

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.add_module("l2_penalty", ConventionalL2Penalty(regularized_tensors(model), 0.25))
    clone = copy.deepcopy(model)
    owner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    clone.l2_penalty.claim_weight_gradient(owner)
    before = clone.weight.detach().clone()
    clone.l2_penalty.apply_decoupled_decay(owner, [(1.0, list(clone.parameters()))])
    torch.testing.assert_close(clone.weight.detach(), before * (1 - 2 * 0.25))
    assert not torch.equal(model.weight.detach(), clone.weight.detach())
