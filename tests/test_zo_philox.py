"""z's generator 2 (fedtune.zo.philox) against a plain scalar reference of its documented
algorithm, its speed paths against each other, low-rank perturbations, and the version that
travels with seed logs, checkpoints and FedKSeed messages."""

import json
import math

import numpy as np
import pytest
import torch

from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.replay import rebuild_, rebuild_from_log, seed_pool
from fedtune.algorithms.fedkseed.server import FedKSeedServer
from fedtune.algorithms.fedkseed.wire import Download, Reply
from fedtune.configbase import ConfigError
from fedtune.wire import MessageError
from fedtune.zo import (
    ZSpec,
    fill_z_,
    lowrank,
    new_z_buffer,
    perturb_,
    replay_z_,
    z_for,
    zo_step_on,
)
from fedtune.zo import philox as P

F = np.float32
M32 = 0xFFFFFFFF


# -- the plain reference: the module doc's text, one value at a time ------------------------------

def ref_philox(ctr, key):
    c, k = list(ctr), list(key)
    for _ in range(10):
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & M32, (p0 >> 32) ^ c[3] ^ k[1], p0 & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def ref_pair(a, c):
    w = 2 * (a >> 9) + 1
    e = w.bit_length() - 1
    m = F(w) / F(2.0**e)
    if m > F(math.sqrt(2)):
        m, e = m / F(2), e + 1
    q = (m - F(1)) / (m + F(1))
    q2 = q * q
    p = (((F(1 / 9) * q2 + F(1 / 7)) * q2 + F(1 / 5)) * q2 + F(1 / 3)) * q2 + F(1)
    r = np.sqrt(F(-2) * ((F(2) * q) * p + F(e - 24) * F(math.log(2))))
    j = ((c >> 9) + (1 << 20)) % (1 << 23)
    x = F(j % (1 << 21) - (1 << 20)) * F(2 * math.pi / 2**23)
    x2 = x * x
    s = x + (x * x2) * (((F(1 / 362880) * x2 - F(1 / 5040)) * x2 + F(1 / 120)) * x2 - F(1 / 6))
    co = F(1) + x2 * ((((F(-1 / 3628800) * x2 + F(1 / 40320)) * x2 - F(1 / 720)) * x2
                       + F(1 / 24)) * x2 - F(0.5))
    sin, cos = {0: (s, co), 1: (co, -s), 2: (-s, -co), 3: (-co, s)}[j >> 21]
    return r * cos, r * sin


def ref_values(seed, index, stream, start, n):
    out = []
    for v in range(start, start + n):
        b = v // 4
        x = ref_philox([b & M32, b >> 32, index, stream], [seed & M32, seed >> 32])
        out.append((ref_pair(x[0], x[1]) + ref_pair(x[2], x[3]))[v % 4])
    return np.array(out, dtype=np.float32)


def bits(t):
    return np.asarray(t, dtype=np.float32).view(np.uint32)


# hand-picked counters: block 0, a block past 2^32 (c1 != 0), a 64-bit seed, streams 1 and 2
CASES = [(0, 0, 0, 0, 13), (123456789012345, 7, 0, 40, 9), (2**63 + 977, 271, 1, 4 * 2**32, 8),
         (5, 1, 2, 4 * (2**32 - 1), 8), (2**32 - 1, 2**32 - 1, 0, 1024, 6)]


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10
    kat = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
           ([M32] * 4, [M32, M32], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
           ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for ctr, key, want in kat:
        assert ref_philox(ctr, key) == want
        b = torch.tensor([ctr[0] | (ctr[1] << 32)], dtype=torch.int64) if ctr[1] < 2**31 \
            else torch.tensor([(ctr[0] | (ctr[1] << 32)) - 2**64], dtype=torch.int64)
        got = P._philox_torch(b, key[0], key[1], ctr[2], ctr[3])
        assert [int(x) & M32 for x in got] == want


@pytest.mark.parametrize("case", CASES)
def test_draws_equal_the_plain_reference_bit_for_bit(case):
    seed, index, stream, start, n = case
    want = ref_values(seed, index, stream, start, n)
    assert (bits(P.draw_torch(n, seed, index, stream, start)) == bits(want)).all()
    out = torch.empty(n)
    P.fill_(out, seed, index, stream, start)  # the compiled kernel
    assert (bits(out) == bits(want)).all()


def test_the_compiled_kernel_is_in_use():
    assert P.compiled()  # numba is a dependency: the CPU path is the fast one


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1023, 4 * P.PAGE_BLOCKS + 3, 70001])
def test_kernel_torch_and_chunks_agree(n):
    whole = torch.empty(n)
    P.fill_(whole, 99, 3)
    assert torch.equal(whole, P.draw_torch(n, 99, 3))
    for cut in (4, 4 * P.PAGE_BLOCKS, 4 * 977):
        if cut < n:
            a, b = torch.empty(cut), torch.empty(n - cut)
            P.fill_(a, 99, 3)
            P.fill_(b, 99, 3, offset=cut)
            assert torch.equal(torch.cat([a, b]), whole)
    with pytest.raises(ValueError, match="multiple of 4"):
        P.fill_(torch.empty(8), 99, 3, offset=2)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_version_2_is_the_same_for_any_thread_count(workers):
    shapes = [(3, 100_003), (P.PAGE_BLOCKS * 4 + 1,), (7,), (2**18 + 5,)]
    z = new_z_buffer([torch.empty(s) for s in shapes])
    fill_z_(z, 4242, workers=workers, version=2)
    for i, (t, s) in enumerate(zip(z, shapes, strict=True)):
        assert torch.equal(t, z_for(4242, i, s, 2))


def test_values_look_standard_normal():
    z = z_for(2024, 0, (1 << 20,), 2).double()
    assert abs(float(z.mean())) < 5e-3 and abs(float(z.var()) - 1) < 5e-3
    assert abs(float((z**4).mean()) - 3) < 0.05  # the normal's kurtosis
    assert float(z.abs().max()) <= 5.65  # sqrt(-2 ln 2^-24)
    assert not torch.equal(z_for(2024, 0, (8,), 2), z_for(2024, 1, (8,), 2))


def test_version_1_is_kept_and_unknown_versions_refused():
    assert not torch.equal(z_for(3, 0, (8,), 1), z_for(3, 0, (8,), 2))
    with pytest.raises(ValueError, match="version"):
        z_for(3, 0, (8,), 3)
    with pytest.raises(ValueError, match="generator 2"):
        ZSpec(1, "lowrank", 4)
    with pytest.raises(ValueError, match="rank"):
        ZSpec(2, "lowrank", 0)


# -- low-rank ----------------------------------------------------------------------------------

def test_lowrank_z_is_u_v_transposed_from_the_seed():
    p = torch.zeros(6, 5)
    u = torch.from_numpy(ref_values(31, 2, 1, 0, 6 * 3)).view(6, 3)
    v = torch.from_numpy(ref_values(31, 2, 2, 0, 5 * 3)).view(5, 3)
    assert torch.allclose(lowrank.z_lowrank(31, 2, p, 3), u @ v.T / math.sqrt(3), atol=1e-6)
    vec = torch.zeros(9)
    assert torch.equal(lowrank.z_lowrank(31, 4, vec, 3), z_for(31, 4, (9,), 2))
    big = torch.cat([lowrank.z_lowrank(s, 0, torch.zeros(64, 64), 4).flatten()
                     for s in range(20)]).double()
    assert abs(float(big.var()) - 1) < 0.1  # unit variance per entry, as a dense z


def test_lowrank_perturb_then_restore_is_identity_within_rounding():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(40, 30, generator=g), torch.randn(30, generator=g)]
    before = [p.clone() for p in ps]
    for scale in (1e-3, -2e-3, 1e-3):
        lowrank.perturb_(ps, 77, scale, 4)
    for a, b in zip(ps, before, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 8)


def test_lowrank_replay_of_the_steps_equals_the_trained_model():
    """τ low-rank ZO steps, then w0 replayed with −lr Σ g per seed: the same model up to
    float32 rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    model.eval()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    spec, lr = ZSpec(2, "lowrank", 2), 0.05
    x, y = torch.randn(16, 12), torch.randn(16, 3)

    def objective() -> float:
        return float(((model(x) - y) ** 2).mean())

    sums: dict[int, float] = {}
    for step, seed in enumerate([11, 12, 11, 13, 14, 12]):
        taken = zo_step_on(objective, params, seed, 1e-3, lr, spec=spec)
        assert taken is not None, step
        sums[seed] = sums.get(seed, 0.0) + taken.g
    trained = [p.detach().clone() for p in params]
    replayed = [p.clone() for p in w0]
    replay_z_(replayed, {s: -lr * g for s, g in sums.items()}, spec)
    moved = max(float((a - b).abs().max()) for a, b in zip(trained, w0, strict=True))
    assert moved > 1e-4
    for a, b in zip(trained, replayed, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank,inner", [(1, 3), (3, 6), (2, 1000)])
def test_lowrank_replay_in_groups_equals_the_sum_of_the_seeds(monkeypatch, rank, inner):
    """The rebuild's stacked products, cut into groups of ``INNER // rank`` seeds (one seed per
    group, several, all in one), equal Σ_s c_s z(s) within float32 rounding."""
    monkeypatch.setattr(lowrank, "INNER", inner)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randn(10, 7, generator=g), torch.randn(5, generator=g),
          torch.randn(3, 2, 2, generator=g)]
    coeffs = {s: float(c) for s, c in zip([9, 2**63 + 5, 4, 17, 33], torch.randn(5).tolist(),
                                          strict=True)}
    coeffs[8] = 0.0  # skipped
    want = [p.clone() for p in ps]
    for s, c in coeffs.items():
        for i, p in enumerate(want):
            p.add_(lowrank.z_lowrank(s, i, p, rank), alpha=c)
    lowrank.replay_(ps, coeffs, rank)
    for a, b in zip(ps, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_filling_z_can_make_the_first_move_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(300, 17, generator=g), torch.randn(7, generator=g),
          torch.randn(40, 9, generator=g).T]  # the last one not contiguous: filled, then added
    z, fused = new_z_buffer(ps), [p.clone() for p in ps]
    fill_z_(z, 2**40 + 3, workers=2, add_to=fused, scale=1e-3)
    want = [p.clone() for p in ps]
    for p, zi in zip(want, z, strict=True):
        p.add_(zi, alpha=1e-3)
    for i, (a, b) in enumerate(zip(fused, want, strict=True)):
        assert torch.equal(a, b), i
        assert torch.equal(z[i], z_for(2**40 + 3, i, ps[i].shape, 2))
    with pytest.raises(ValueError, match="add_to"):
        fill_z_(z, 1, add_to=ps[:2], scale=1.0)


def test_shares_cover_every_value_once_cut_on_blocks():
    from fedtune.zo.perturb import _shares
    sizes = [10, 3, 1001, 0, 64, 7]
    for n in (1, 2, 3, 8, 50):
        shares = _shares(sizes, n)
        assert 1 <= len(shares) <= n
        seen = [[] for _ in sizes]
        for share in shares:
            for i, a, b in share:
                assert a % 4 == 0 and a < b <= sizes[i]
                seen[i].append((a, b))
        for i, size in enumerate(sizes):
            spans = sorted(seen[i])
            assert sum(b - a for a, b in spans) == size
            assert all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))
    total = sum(sizes)
    assert max(sum(b - a for _, a, b in s) for s in _shares(sizes, 4)) <= total // 4 + 8


# -- the version travels ------------------------------------------------------------------------

def test_wire_carries_the_z_and_refuses_another():
    v1, v2, low = ZSpec(1), ZSpec(2), ZSpec(2, "lowrank", 4)
    a = torch.zeros(16)
    a[3] = 1.5
    for z in (v1, v2, low):
        data = Download(2, a, z=z).encode()
        assert Download.decode(data, 16, False, expect_round=2, z=z).z == z
        for other in {v1, v2, low} - {z}:
            with pytest.raises(MessageError, match="generator"):
                Download.decode(data, 16, False, expect_round=2, z=other)
        up = Reply(2, 5, 1.0, torch.tensor([3], dtype=torch.int32), torch.tensor([0.5]),
                   z=z).encode(16)
        assert Reply.decode(up, 16, False, 1000.0, expect_round=2, z=z).z == z
        with pytest.raises(MessageError, match="this side uses"):
            Reply.decode(up, 16, False, 1000.0, expect_round=2,
                         z=v1 if z != v1 else v2)
    # a message from before the field (flags 0 in bits 4-6) is generator 1, dense
    old = bytearray(Download(2, a, z=v1).encode())
    assert old[4] & 0x70 == 0
    assert Download.decode(bytes(old), 16, False, expect_round=2, z=v1).z == v1


def test_checkpoint_of_another_z_is_refused():
    model = torch.nn.Linear(4, 3)
    server = FedKSeedServer(FedKSeedConfig(k_seeds=8, generator=1), False, model)
    state = server.state_dict()
    other = FedKSeedServer(FedKSeedConfig(k_seeds=8), False, model)
    with pytest.raises(ValueError, match="generator 1"):
        other.load_state_dict(state)
    state.pop("z_spec")  # a checkpoint from before versions: generator 1
    server.load_state_dict(state)
    with pytest.raises(ValueError, match="generator 1"):
        other.load_state_dict(state)


def test_config_checks_the_z():
    with pytest.raises(ConfigError, match="generator"):
        FedKSeedConfig(generator=3).validate("algorithm.fedkseed")
    with pytest.raises(ConfigError, match="perturbation"):
        FedKSeedConfig(perturbation="sparse").validate("algorithm.fedkseed")
    with pytest.raises(ConfigError, match="generator = 2"):
        FedKSeedConfig(generator=1, perturbation="lowrank").validate("algorithm.fedkseed")
    assert FedKSeedConfig(perturbation="lowrank", rank=8).spec == ZSpec(2, "lowrank", 8)


@pytest.mark.parametrize("spec", [ZSpec(1), ZSpec(2), ZSpec(2, "lowrank", 2)])
def test_a_seed_log_replays_with_the_z_it_was_made_with(spec):
    torch.manual_seed(1)
    params = [torch.randn(7, 5), torch.randn(5)]
    w0 = [p.clone() for p in params]
    pool = seed_pool(3, 8)
    acc = torch.tensor([0.0, 1.5, 0, -2.0, 0, 0, 0.25, 0])
    rebuild_(params, w0, pool, acc, 1e-2, spec)
    log = {"seed_pool": pool, "accumulators": acc.tolist(), "lr": 1e-2, **spec.describe()}
    log = json.loads(json.dumps(log))
    if spec == ZSpec(1):
        del log["generator_version"], log["perturbation"]  # as logs from before versions
    got = [torch.empty_like(p) for p in params]
    rebuild_from_log(got, w0, log)
    for a, b in zip(got, params, strict=True):
        assert torch.equal(a, b)
    wrong = [torch.empty_like(p) for p in params]
    rebuild_(wrong, w0, pool, acc, 1e-2, ZSpec(2) if spec != ZSpec(2) else ZSpec(1))
    assert not torch.equal(wrong[0], params[0])


def test_version_2_perturb_draws_on_the_device_of_the_parameter():
    # a parameter that is not a contiguous CPU tensor takes the whole-tensor torch path:
    # the same values as the kernel's
    base = torch.zeros(6, 10)
    view = base.t()  # not contiguous
    perturb_([view], 5, 1.0, version=2)
    assert torch.equal(view, z_for(5, 0, (10, 6), 2))


def test_draw_can_add_as_it_draws():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(4 * P.PAGE_BLOCKS * 2 + 7, generator=g)
    z = P.fill_(torch.empty_like(theta), 8, 2, offset=16)
    want = theta.clone().add_(z, alpha=1e-3)  # torch's add_: one fused multiply-add
    mine = theta.clone()
    P.axpy_(mine, z, 1e-3)
    assert torch.equal(mine, want)
    added, both, out = theta.clone(), theta.clone(), torch.empty_like(theta)
    P.draw_(8, 2, add_to=added, scale=1e-3, offset=16)
    P.draw_(8, 2, out=out, add_to=both, scale=1e-3, offset=16)
    assert torch.equal(added, want) and torch.equal(both, want) and torch.equal(out, z)
    rows = P.fill_rows_(torch.empty(3, 10), [5, 2**40, 7], 4, P.U_STREAM)
    for row, seed in zip(rows, [5, 2**40, 7], strict=True):
        assert torch.equal(row, P.fill_(torch.empty(10), seed, 4, P.U_STREAM))
