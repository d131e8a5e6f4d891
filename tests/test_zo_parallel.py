"""fedtune.zo speed paths: parallel and chunked draws, fused replay and keep-z steps must give
exactly (bitwise) the results of the plain sequential definitions."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.zo.perturb import (
    CHUNK,
    chunk_bounds,
    chunked_draws_exact,
    fill_z_,
    new_z_buffer,
    param_seed,
    perturb_,
    replay_,
    z_for,
)
from fedtune.zo.step import KeptZ, zo_step

# shapes that cross chunk boundaries: a tail merged into the last chunk (< 16), a long odd tail,
# an exact multiple, and small ones under one chunk
SHAPES = [(2 * CHUNK + 5,), (3, CHUNK // 2 + 21), (CHUNK // 16, 32), (7, 5), (1,), (17,)]


def params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def assert_bitwise(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


def test_chunk_bounds_cover_and_merge_short_tails():
    assert chunk_bounds(10) == [(0, 10)]
    assert chunk_bounds(CHUNK) == [(0, CHUNK)]
    assert chunk_bounds(CHUNK + 15) == [(0, CHUNK + 15)]
    assert chunk_bounds(CHUNK + 16) == [(0, CHUNK), (CHUNK, CHUNK + 16)]
    for n in (1, 100, 3 * CHUNK - 1, 5 * CHUNK + 7):
        b = chunk_bounds(n)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(x[1] == y[0] for x, y in zip(b, b[1:], strict=False))
        assert all((e - s) % 16 == 0 for s, e in b[:-1])
        assert len(b) == 1 or b[-1][1] - b[-1][0] >= 16
    with pytest.raises(ValueError):
        chunk_bounds(100, 40)


def test_chunked_draws_equal_one_whole_draw():
    assert chunked_draws_exact()  # the speed path is active on this torch
    for n in (16, 47, 48 * 3 + 1, 48 * 3 + 15, 48 * 3 + 16, 48 * 3 + 29, 1000):
        gen = torch.Generator().manual_seed(param_seed(3, 1))
        out = torch.empty(n)
        for a, b in chunk_bounds(n, 48):
            out[a:b].normal_(generator=gen)
        assert torch.equal(out, z_for(3, 1, (n,), 1)), n


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_perturb_is_bitwise_the_definition(workers, version):
    ps = params()
    ref = [p.clone().add_(z_for(77, i, p.shape, version), alpha=1.5e-3)
           for i, p in enumerate(ps)]
    perturb_(ps, 77, 1.5e-3, workers=workers, version=version)
    assert_bitwise(ps, ref)


def test_parallel_perturb_and_restore_equal_sequential():
    a, b = params(1), params(1)
    for ps, w in ((a, 1), (b, 2)):
        perturb_(ps, 5, 1e-3, workers=w)
        perturb_(ps, 5, -2e-3, workers=w)
        perturb_(ps, 5, 1e-3 - 0.1 * -3.25, workers=w)  # the step's fused restore and update
    assert_bitwise(a, b)


def test_parameter_requiring_grad_is_perturbed_in_worker_threads():
    # grad mode is per thread: the worker threads must switch autograd off themselves
    ps = [torch.nn.Parameter(p) for p in params(2)]
    ref = [p.detach().clone().add_(z_for(9, i, p.shape), alpha=0.5) for i, p in enumerate(ps)]
    perturb_(ps, 9, 0.5, workers=2)
    assert_bitwise([p.detach() for p in ps], ref)


def test_non_contiguous_parameter_takes_the_whole_draw_path():
    base = torch.randn(40, 30)
    p = base.t()  # (30, 40), not contiguous
    ref = p.clone().add_(z_for(4, 0, (30, 40)), alpha=2.0)
    perturb_([p], 4, 2.0)
    assert torch.equal(p, ref)


def naive_fused_replay(ps, coeffs):
    """The previous replay_: whole-parameter accumulator, seeds ascending, then one add."""
    seeds = sorted(s for s, c in coeffs.items() if c != 0.0)
    for i, p in enumerate(ps):
        acc = torch.zeros(p.shape)
        for s in seeds:
            acc.add_(z_for(s, i, p.shape), alpha=float(coeffs[s]))
        p.add_(acc)


def test_replay_parallel_chunked_is_bitwise_the_whole_accumulator():
    coeffs = {1000 + 13 * i: (-1) ** i * 1e-3 * (i + 1) for i in range(9)} | {5: 0.0}
    ref = params(3)
    naive_fused_replay(ref, coeffs)
    for w in (1, 2, 3):
        ps = params(3)
        replay_(ps, coeffs, workers=w)
        assert_bitwise(ps, ref)


def test_fill_z_is_bitwise_z_for():
    ps = params(4)
    for w in (1, 2):
        z = new_z_buffer(ps)
        fill_z_(z, 31, workers=w)
        assert_bitwise(z, [z_for(31, i, p.shape) for i, p in enumerate(ps)])


# -- keep-z step ---------------------------------------------------------------------------------


def tiny_model():
    cfg = LlamaConfig(vocab_size=1100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def batch(seed, bad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1100, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.full_like(ids, -100) if bad else ids}


def run_steps(mode, workers):
    model = tiny_model()
    ps = [p for p in model.parameters() if p.requires_grad]
    assert max(p.numel() for p in ps) > CHUNK  # the embedding crosses chunk boundaries
    buf = new_z_buffer(ps) if mode == "buffer" else None
    kept = KeptZ(ps) if mode == "kept" else None
    gs, losses = [], []
    for step, seed in enumerate([11, 2**62 + 3, 11, 404, 7]):
        kw = {"keep_z": mode not in ("default", "kept"), "z_buffer": buf, "workers": workers,
              "kept": kept}
        taken = zo_step(model, ps, batch(step, bad=step == 3), seed, 1e-3, 1e-2, **kw)
        gs.append(None if taken is None else taken.g)
        if taken is not None:
            losses.append(taken.loss)
    if kept is not None:
        kept.settle()
    return [p.detach().clone() for p in ps], gs, losses


def test_keep_z_step_is_bitwise_the_default_step():
    ref, gs, losses = run_steps("default", 1)
    assert gs[3] is None  # all labels masked: a non-finite loss, the step skipped and restored
    assert all(math.isfinite(g) for i, g in enumerate(gs) if i != 3) and len(losses) == 4
    for mode, workers in (("default", 2), ("keep", 1), ("keep", 2), ("buffer", 2), ("kept", 1),
                          ("kept", 2)):
        ps, gs2, losses2 = run_steps(mode, workers)
        assert gs2 == gs and losses2 == losses, (mode, workers)
        assert_bitwise(ps, ref)


def test_z_buffer_of_the_wrong_shape_is_refused():
    model = tiny_model()
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="z_buffer"):
        zo_step(model, ps, batch(0), 1, 1e-3, 1e-2, z_buffer=new_z_buffer(ps[:-1]))


def test_a_kept_z_defers_the_last_move_until_settled():
    model = tiny_model()
    ps = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in ps]
    kept = KeptZ(ps)
    taken = zo_step(model, ps, batch(0), 5, 1e-3, 1e-2, kept=kept)
    assert taken is not None and kept.pending == pytest.approx(1e-3 - 1e-2 * taken.g)
    # until settled the parameters sit at θ0 − εz: the deferred move is still to make
    assert torch.allclose(ps[0], before[0].add(kept.z[0], alpha=-1e-3), rtol=0, atol=1e-6)
    settled = [p.detach().clone().add_(z, alpha=kept.pending)
               for p, z in zip(ps, kept.z, strict=True)]
    kept.settle()
    assert kept.pending == 0.0
    assert all(torch.equal(a, b) for a, b in zip(ps, settled, strict=True))
    with pytest.raises(ValueError, match="other parameters"):
        zo_step(model, ps[:-1], batch(0), 5, 1e-3, 1e-2, kept=kept)
