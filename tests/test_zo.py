"""fedtune.zo: the seeded perturbation z(s), perturb / restore / replay, and the two-point step."""

from types import SimpleNamespace

import pytest
import torch

from fedtune.zo.perturb import param_seed, perturb_, replay_, z_for
from fedtune.zo.step import zo_step


def params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_generator_golden_values():
    # pins generator version 1: changing it would change every FedKSeed model ever replayed
    assert param_seed(0, 0) == 7896617691693857887
    assert z_for(0, 0, (4,), 1).tolist() == pytest.approx(
        [0.9956191182136536, 0.2642376720905304, 1.5361659526824951, 1.3092256784439087])
    assert z_for(7, 3, (2, 2), 1).flatten().tolist() == pytest.approx(
        [0.5187588930130005, 2.42089581489563, -1.1791136264801025, -1.3524894714355469])
    assert 0 <= param_seed(2**62, 10**6) < 2**63


def test_z_same_for_one_and_two_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = z_for(123, 3, (257, 129))
        torch.set_num_threads(2)
        two = z_for(123, 3, (257, 129))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert one.dtype == torch.float32 and one.device.type == "cpu"


def test_z_of_a_parameter_does_not_depend_on_the_others():
    a = [torch.zeros(s) for s in [(3, 5), (7,), (2, 2), (4, 6)]]
    b = [torch.zeros(s) for s in [(11,), (1,), (9, 9), (4, 6)]]
    perturb_(a, 42, 1.0)
    perturb_(b, 42, 1.0)
    assert torch.equal(a[3], b[3])
    assert torch.equal(a[3], z_for(42, 3, (4, 6)))  # param 3 drawn directly, 0..2 never needed
    assert not torch.equal(z_for(42, 0, (4, 6)), z_for(42, 3, (4, 6)))
    assert not torch.equal(z_for(41, 3, (4, 6)), z_for(42, 3, (4, 6)))


def test_perturb_then_restore_is_identity_up_to_fp32_rounding():
    ps = params((8, 16), (5,))
    orig = [p.clone() for p in ps]
    perturb_(ps, 9, 1e-3)
    assert not torch.equal(ps[0], orig[0])
    perturb_(ps, 9, -1e-3)
    for p, o in zip(ps, orig, strict=True):
        torch.testing.assert_close(p, o, rtol=0, atol=1e-6)


def test_replay_equals_sequential_application():
    coeffs = {11: 0.5, 3: -1.25, 7: 2.0, 99: 0.0}
    fused = params((4, 3), (6,))
    seq = [p.clone() for p in fused]
    replay_(fused, coeffs)
    for s, c in coeffs.items():
        perturb_(seq, s, c)
    for a, b in zip(fused, seq, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_replay_is_bitwise_independent_of_the_mapping_order():
    items = [(1000 + 7 * i, (-1) ** i * 1e-3 * (i + 1)) for i in range(20)]
    a, b = params((33, 17), (9,)), params((33, 17), (9,))
    replay_(a, dict(items))
    replay_(b, dict(reversed(items)))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_half_precision_master_weights_refused():
    with pytest.raises(TypeError, match="float32"):
        perturb_([torch.zeros(3, dtype=torch.float16)], 1, 1.0)
    with pytest.raises(TypeError, match="float32"):
        replay_([torch.zeros(3, dtype=torch.bfloat16)], {1: 1.0})


class Quadratic(torch.nn.Module):
    """loss = 0.5 ||w - t||^2: the central difference is exact, g = z . (w - t)."""

    def __init__(self, w, t):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.t = t

    def forward(self, x):
        return SimpleNamespace(loss=0.5 * ((self.w - self.t) ** 2).sum() * x)


def test_zo_step_projected_gradient_and_update():
    w, t = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 2.0])
    m = Quadratic(w, t).eval()
    taken = zo_step(m, [m.w], {"x": torch.tensor(1.0)}, seed=17, eps=1e-2, lr=0.1)
    assert taken is not None
    g, loss = taken
    z = z_for(17, 0, (3,))
    assert g == pytest.approx(float(z @ (w - t)), rel=1e-4)
    torch.testing.assert_close(m.w.detach(), w - 0.1 * g * z, rtol=0, atol=1e-5)
    assert loss == pytest.approx(0.5 * float(((w - t) ** 2).sum()), rel=1e-3)


def test_zo_step_skips_a_non_finite_loss_and_restores():
    w = torch.tensor([1.0, -2.0, 0.5])
    m = Quadratic(w, torch.zeros(3)).eval()
    assert zo_step(m, [m.w], {"x": torch.tensor(float("nan"))}, 3, 1e-3, 0.1) is None
    torch.testing.assert_close(m.w.detach(), w, rtol=0, atol=1e-6)


def test_zo_step_needs_eval_mode():
    m = Quadratic(torch.zeros(2), torch.zeros(2)).train()
    with pytest.raises(RuntimeError, match="eval"):
        zo_step(m, [m.w], {"x": torch.tensor(1.0)}, 1, 1e-3, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_z_is_the_same_on_cuda_and_cpu():
    from fedtune.zo.perturb import perturb_

    cpu = [torch.zeros(5, 7), torch.zeros(300)]
    gpu = [t.clone().cuda() for t in cpu]
    perturb_(cpu, 12345, 1.0)
    perturb_(gpu, 12345, 1.0)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())
