"""The penalty's weight-gradient pass: per-tensor route on a CPU, flat route (torch's fused
multi-tensor path on CUDA) elsewhere, same values; and on the meta device (standing in for CUDA)
the flat route's foreach call only gets pairs of equal shape, stride and dtype."""
import pytest
import torch
from torch import nn

from adaptive_l2.regularizers import l2_base as l2_module
from adaptive_l2.regularizers.l2_base import add_scaled


def _tensors(device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 1, 1), (5, 16), (5,), ()]
    sources = [torch.randn(s, generator=generator).to(device) for s in shapes]
    targets = [torch.randn(s, generator=generator).to(device) for s in shapes]
    return targets, sources


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_and_per_tensor_routes_give_the_same_values(dtype):
    targets, sources = _tensors()
    targets = [t.to(dtype) for t in targets]
    sources = [s.to(dtype) for s in sources]
    scales = torch.linspace(-3.0, 2.0, 11, dtype=dtype)
    indices = [10, 0, 3, 7, 7, 1, 5]
    expected = [t + s * scales[i] for t, s, i in zip(targets, sources, indices)]
    flat = [t.clone() for t in targets]
    per_tensor = [t.clone() for t in targets]
    add_scaled(flat, sources, scales, indices, route="flat")
    add_scaled(per_tensor, sources, scales, indices, route="per_tensor")
    for a, b, e in zip(flat, per_tensor, expected):
        # the CPU's addcmul may fuse the multiply-add (one rounding less): equal to an ulp or two
        assert torch.allclose(a, b, rtol=4 * torch.finfo(dtype).eps, atol=0)
        assert torch.allclose(a, e, rtol=0, atol=1e-6)
    # the sources are read, never written
    assert torch.equal(sources[0], _tensors()[1][0].to(dtype))


def test_in_place_decay_targets_equal_sources():
    """apply_decoupled_decay passes the weights as both: the flat route copies first."""
    _, sources = _tensors()
    scales = torch.tensor([0.5, -0.25])
    indices = [0, 1, 0, 1, 0, 1, 0]
    expected = [s * (1 + scales[i]) for s, i in zip(sources, indices)]
    add_scaled(sources, sources, scales, indices, route="flat")
    for got, want in zip(sources, expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_auto_route_off_the_cpu_uses_equal_shape_pairs(monkeypatch):
    """On the meta device (not the CPU) 'auto' takes the flat route: one foreach add whose pairs
    match in shape, stride and dtype (the conditions of torch's fused CUDA route), and a number of
    dispatched ops that does not grow with the number of tensors."""
    calls = []
    real = torch._foreach_add_

    def recording(targets, pieces, *args, **kwargs):
        calls.append((list(targets), list(pieces)))
        return real(targets, pieces, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", recording)
    monkeypatch.setattr(torch, "_foreach_addcmul_", lambda *a, **k: pytest.fail("per-tensor route"))
    targets, sources = _tensors("meta")
    add_scaled(targets, sources, torch.ones(7, device="meta"), list(range(7)))
    assert len(calls) == 1
    for target, piece in zip(*calls[0]):
        assert target.shape == piece.shape and target.stride() == piece.stride()
        assert target.dtype == piece.dtype and piece.is_contiguous()


def _count_ops(function):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        function()
    return Counter.count


def test_flat_route_op_count_does_not_grow_with_tensor_count():
    def run(n):
        targets = [torch.zeros(3, 2) for _ in range(n)]
        sources = [torch.ones(3, 2) for _ in range(n)]
        scales = torch.arange(float(n))
        layouts = {}
        add_scaled(targets, sources, scales, list(range(n)), layouts, route="flat")  # builds layout
        return _count_ops(lambda: add_scaled(targets, sources, scales, list(range(n)), layouts,
                                             route="flat"))

    small, large = run(4), run(64)
    # the flattening views are one op per tensor (no kernel); the kernels are constant in number
    assert large - small <= 2 * (64 - 4)
    per_tensor_large = _count_ops(lambda: add_scaled(
        [torch.zeros(3, 2) for _ in range(64)], [torch.ones(3, 2) for _ in range(64)],
        torch.arange(64.0), list(range(64)), route="per_tensor"))
    assert per_tensor_large >= 64


def test_penalty_weight_gradient_pass_same_on_both_routes(monkeypatch):
    """The adaptive penalty's add_weight_gradients gives the same gradients whichever route."""
    from adaptive_l2.regularizers.adaptive import AdaptiveL2Penalty
    from adaptive_l2.regularizers.l2_base import regularized_tensors

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        model(torch.zeros(1, 3, 5, 5))
        penalty = AdaptiveL2Penalty(regularized_tensors(model),
                                    {"kernel": 0.01, "bias": 0.02, "norm_weight": 0.03,
                                     "norm_bias": 0.04})
        with torch.no_grad():
            for i, theta in enumerate(penalty.thetas):
                theta.fill_(0.1 * i - 0.3)
        owner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        penalty.claim_weight_gradient(owner)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        return model, penalty, owner

    results = []
    real = l2_module.add_scaled
    for route in ("per_tensor", "flat"):
        model, penalty, owner = build()
        monkeypatch.setattr(l2_module, "add_scaled",
                            lambda *a, _r=route, _f=real, **k: _f(*a, route=_r, **k))
        penalty.add_weight_gradients(owner)
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert not torch.equal(results[0][0], torch.full_like(results[0][0], 0.5))


def test_unknown_route_is_refused():
    with pytest.raises(ValueError, match="route"):
        add_scaled([torch.zeros(1)], [torch.zeros(1)], torch.zeros(1), [0], route="fast")


@pytest.mark.parametrize("route", ["per_tensor", "flat"])
def test_mixed_dtypes_each_take_the_scales_in_their_own_dtype(route):
    """One call over fp32 and fp64 targets (the decoupled decay passes any mix): each dtype is
    its own pass, with the scales cast to it."""
    targets = [torch.ones(3, dtype=torch.float64), torch.ones(2), torch.ones(4, dtype=torch.float64)]
    sources = [torch.full_like(t, 2.0) for t in targets]
    scales = torch.tensor([0.5, 0.25, -1.0])
    add_scaled(targets, sources, scales, [2, 0, 1], route=route)
    assert [t.dtype for t in targets] == [torch.float64, torch.float32, torch.float64]
    assert torch.equal(targets[0], torch.full((3,), -1.0, dtype=torch.float64))
    assert torch.equal(targets[1], torch.full((2,), 2.0))
    assert torch.equal(targets[2], torch.full((4,), 1.5, dtype=torch.float64))
