"""FedKSeed / FedKSeed-Pro: seed probabilities, aggregation by hand, message validation, the
bit-exact client rebuild, and whole runs through the CLI."""

import json
import math
import struct

import numpy as np
import pytest
import torch
from conftest import build, examples, model_hash, play_round, run_cli, tiny_model
from transformers import AutoModelForCausalLM

from fedtune.algorithms.base import DeviceEnv
from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedkseed import pro
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.device import draw_seed_indices
from fedtune.algorithms.fedkseed.replay import rebuild_, seed_pool
from fedtune.algorithms.fedkseed.server import SEED_LOG, FedKSeedServer
from fedtune.algorithms.fedkseed.wire import Download, Reply
from fedtune.algorithms.params import trainable
from fedtune.cli import main
from fedtune.configbase import ConfigError
from fedtune.wire import MessageError

# -- FedKSeed-Pro probabilities ------------------------------------------------------------------


def test_pro_probabilities_by_hand():
    # seed 0 never reported: history [0] -> psi 0; seed 1: history [0, 2, -4] -> psi 6/3 = 2;
    # seed 2: history [0, 3000] -> clip -> 1000 / 2 = 500. Normalised: 0, 0.004, 1.
    sum_abs = np.array([0.0, pro.clipped_abs(2, 1000) + pro.clipped_abs(-4, 1000),
                        pro.clipped_abs(3000, 1000)])
    count = np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(pro.importance(sum_abs, count), [0.0, 2.0, 500.0])
    e = np.exp([0.0, 0.004, 1.0])
    np.testing.assert_allclose(pro.seed_probabilities(sum_abs, count), e / e.sum(), rtol=1e-12)
    e2 = np.exp([0.0, 0.002, 0.5])  # temperature 2 flattens
    np.testing.assert_allclose(pro.seed_probabilities(sum_abs, count, 2.0), e2 / e2.sum())


def test_pro_all_equal_importance_is_uniform():
    s, _, c = pro.initial_stats(5)
    assert c.tolist() == [1.0] * 5 and s.tolist() == [0.0] * 5
    np.testing.assert_allclose(pro.seed_probabilities(s, c), np.full(5, 0.2))
    with pytest.raises(ValueError):
        pro.importance(np.zeros(2), np.zeros(2))


def test_seed_pool_and_seed_draws_are_pure_functions_of_their_seeds():
    pool = seed_pool(0, 16)
    assert pool == seed_pool(0, 16) and len(set(pool)) == 16 and pool != seed_pool(1, 16)
    assert all(0 <= s < 2**63 for s in pool)
    a = draw_seed_indices(16, 50, seed=3)
    assert a == draw_seed_indices(16, 50, seed=3) and a != draw_seed_indices(16, 50, seed=4)
    p = np.zeros(16)
    p[[2, 5]] = 0.5
    assert set(draw_seed_indices(16, 50, seed=3, probs=p)) == {2, 5}


def test_config_validation_names_key_and_value():
    cfg = AlgorithmConfig(name="fedkseed")
    cfg.fedkseed.k_seeds = 0
    with pytest.raises(ConfigError, match=r"algorithm\.fedkseed\.k_seeds.*0"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"algorithm\.fedkseed\.temperature"):
        FedKSeedConfig(temperature=-1.0).validate("algorithm.fedkseed")


# -- server aggregation --------------------------------------------------------------------------


def reply(round_=1, n=1, index=(0,), sum_g=(1.0,), abs_clip=None, count=None, loss=2.0):
    return Reply(round_, n, loss, torch.tensor(index, dtype=torch.int32),
                 torch.tensor(sum_g, dtype=torch.float32),
                 None if abs_clip is None else torch.tensor(abs_clip, dtype=torch.float32),
                 None if count is None else torch.tensor(count, dtype=torch.int32))


def test_server_weighted_mean_of_per_seed_sums_by_hand():
    srv = FedKSeedServer(FedKSeedConfig(k_seeds=4), pro=True)
    srv.begin_round(1)
    # client A: 1 sample, seeds 0 and 2; client B: 3 samples, seeds 2 and 3
    a = reply(n=1, index=(0, 2), sum_g=(2.0, 4.0), abs_clip=(2.0, 5.0), count=(1, 2))
    b = reply(n=3, index=(3, 2), sum_g=(8.0, -4.0), abs_clip=(8.0, 4.0), count=(1, 1))
    srv.accept(a.encode(K))
    srv.accept(b.encode(K))
    srv.end_round()
    # A_0 = 1*2/4, A_2 = (1*4 + 3*(-4))/4, A_3 = 3*8/4: a weighted mean, not a sum
    assert srv.accumulators.tolist() == [0.5, 0.0, -2.0, 6.0]
    assert srv.count.tolist() == [2.0, 1.0, 4.0, 2.0]  # the initial 0.0 entry counts once
    assert srv.sum_abs_clip.tolist() == [2.0, 0.0, 9.0, 8.0]
    assert srv.sum_g.tolist() == [2.0, 0.0, 0.0, 8.0]
    # cumulative: round 2 adds to A; a round with no valid reply changes nothing
    srv.begin_round(2)
    srv.accept(
        reply(round_=2, n=2, index=(1,), sum_g=(1.0,), abs_clip=(1.0,), count=(1,)).encode(K))
    srv.end_round()
    assert srv.accumulators.tolist() == [0.5, 1.0, -2.0, 6.0]
    srv.begin_round(3)
    srv.end_round()
    assert srv.accumulators.tolist() == [0.5, 1.0, -2.0, 6.0]
    np.testing.assert_allclose(srv.probabilities(), pro.seed_probabilities(
        np.array([2.0, 1.0, 9.0, 8.0]), np.array([2.0, 2.0, 4.0, 2.0])))
    fresh = FedKSeedServer(FedKSeedConfig(k_seeds=4), pro=True)
    fresh.load_state_dict(srv.state_dict())
    assert torch.equal(fresh.accumulators, srv.accumulators)
    assert fresh.count.tolist() == srv.count.tolist()


def test_download_round_trip_and_byte_count():
    k = 1024
    a = torch.randn(k)
    data = Download(3, a).encode()
    assert len(data) == 21 + 4 * k  # the 21-byte header and K float32
    back = Download.decode(data, k, pro=False, expect_round=3)
    assert torch.equal(back.accumulators, a) and back.probs is None and back.since == 0
    p = torch.full((k,), 1.0 / k)
    data = Download(3, a, p).encode()
    assert len(data) == 21 + 8 * k
    assert torch.equal(Download.decode(data, k, pro=True, expect_round=3).probs, p)


def test_sparse_delta_download_round_trip():
    k = 4096
    delta = torch.zeros(k)
    delta[[3, 70, 4095]] = torch.tensor([0.5, -2.0, 7.0])
    data = Download(5, delta, since=4).encode()
    assert len(data) == 21 + 3 * (2 + 4)  # uint16 index + float32 value per changed seed
    back = Download.decode(data, k, pro=False, expect_round=5)
    assert torch.equal(back.accumulators, delta) and back.since == 4


def test_reply_byte_count_meets_the_paper():
    n = 200
    plain = reply(index=range(n), sum_g=[0.5] * n).encode(4096)
    assert len(plain) == 21 + 6 * n
    full = reply(index=range(n), sum_g=[0.5] * n, abs_clip=[0.5] * n, count=[1] * n)
    assert len(full.encode(4096)) == 21 + 12 * n
    # the paper's 4K + 8 tau + 4 = 17,988 B at K = 4096, tau = 200, with every seed distinct
    assert len(Download(1, torch.randn(4096)).encode()) + len(plain) <= 17_988
    # pools above 65536 seeds need uint32 indices
    assert len(reply(index=(70_000,), sum_g=(1.0,)).encode(100_000)) == 21 + 8


K = 8
BAD_REPLIES = {
    "index out of range": reply(index=(K,)),
    "negative index": reply(index=(-1,)),
    "duplicate index": reply(index=(2, 2), sum_g=(1.0, 1.0)),
    "nan sum_g": reply(sum_g=(float("nan"),)),
    "inf sum_g": reply(sum_g=(float("inf"),)),
    "wrong round": reply(round_=2),
    "no samples": reply(n=0),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_malformed_replies_rejected(case):
    srv = FedKSeedServer(FedKSeedConfig(k_seeds=K), pro=False)
    srv.begin_round(1)
    with pytest.raises(MessageError):
        srv.accept(BAD_REPLIES[case].encode(K))
    srv.end_round()
    assert srv.accumulators.abs().sum() == 0  # nothing reached the global state


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    """``data`` with the header field at ``offset`` (struct ``fmt``) replaced by ``value``."""
    return data[:offset] + struct.pack("<" + fmt, value) + data[offset + struct.calcsize(fmt):]


def test_malformed_reply_bytes_rejected():
    srv = FedKSeedServer(FedKSeedConfig(k_seeds=K), pro=False)
    srv.begin_round(1)
    good = reply(index=(1, 4), sum_g=(1.0, 2.0)).encode(K)
    # header: magic 0:4, flags 4, round 5:9, num_samples 9:13, train_loss 13:17, n 17:21
    bad = {
        "n says 3, the arrays hold 2": _patch(good, 17, "I", 3),
        "more seeds than the pool": _patch(good, 17, "I", K + 1),
        "no seeds": _patch(good, 17, "I", 0),
        "a download's magic": b"FKS\x01" + good[4:],
        "unknown flags": _patch(good, 4, "B", 0x80),
        "Pro flag without Pro stats": _patch(good, 4, "B", 1),
        "nan train loss": _patch(good, 13, "f", float("nan")),
        "oversize": good + b"\0" * 4096,
        "truncated": good[:-1],
        "garbage": b"garbage",
        "not bytes": "a string",  # type: ignore[dict-item]
        "Pro stats to a plain server":
            reply(index=(1,), sum_g=(1.0,), abs_clip=(1.0,), count=(1,)).encode(K),
    }
    for case, data in bad.items():
        with pytest.raises(MessageError):
            srv.accept(data)
            pytest.fail(f"bad reply accepted: {case}")
    srv.accept(good)  # the good one still passes
    srv.end_round()
    assert srv.accumulators.tolist() == [0, 1.0, 0, 0, 2.0, 0, 0, 0]


def test_malformed_pro_replies_rejected():
    srv = FedKSeedServer(FedKSeedConfig(k_seeds=K, clip=10.0), pro=True)
    srv.begin_round(1)
    for bad in [reply(),  # Pro stats missing
                reply(abs_clip=(1.0,), count=(0,)),
                reply(abs_clip=(-1.0,), count=(1,)),
                reply(abs_clip=(25.0,), count=(2,))]:  # above clip * count
        with pytest.raises(MessageError):
            srv.accept(bad.encode(K))
    srv.accept(reply(abs_clip=(20.0,), count=(2,)).encode(K))


def test_malformed_downloads_rejected():
    a = torch.zeros(K)
    p = torch.full((K,), 1.0 / K)
    with pytest.raises(MessageError, match="round"):
        Download.decode(Download(2, a).encode(), K, False, expect_round=1)
    good = Download(1, a).encode()
    for data, is_pro in [(Download(1, torch.zeros(K + 1)).encode(), False),
                         (Download(1, a).encode(), True),  # probabilities missing
                         (Download(1, a, p).encode(), False),  # probabilities unexpected
                         (Download(1, torch.full((K,), float("nan"))).encode(), False),
                         (Download(1, a, p * 2).encode(), True),
                         (Download(1, a, -p).encode(), True),
                         (Download(1, a, since=1).encode(), False),  # "since" not in the past
                         (good + b"\0\0\0\0", False),  # oversize
                         (good[:-4], False),  # truncated
                         (_patch(good, 4, "B", 0x40), False),  # unknown flag
                         (b"FKS\x02" + good[4:], False)]:  # an upload's magic
        with pytest.raises(MessageError):
            Download.decode(data, K, is_pro, expect_round=1)
    sparse = Download(2, torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 3.0]), since=1).encode()
    # indices at 21:23 and 23:25; swapping them breaks the ascending order
    swapped = sparse[:21] + sparse[23:25] + sparse[21:23] + sparse[25:]
    for data in (swapped, _patch(sparse, 23, "H", K)):
        with pytest.raises(MessageError, match="seed ind"):
            Download.decode(data, K, False, expect_round=2)


# -- the algorithm on a tiny model ---------------------------------------------------------------


def config(name="fedkseed", **kw) -> AlgorithmConfig:
    cfg = AlgorithmConfig(name=name)
    cfg.fedkseed = FedKSeedConfig(k_seeds=16, tau=6, lr=1e-3, **kw)
    cfg.validate()
    return cfg


def make(name="fedkseed", **kw):
    """(server, device, model) of a FedKSeed run in process."""
    return build(config(name, **kw), tiny_model())


def params_of(model) -> list[torch.Tensor]:
    return list(trainable(model).values())


@pytest.mark.parametrize("name", ["fedkseed", "fedkseed-pro"])
def test_client_starts_from_the_global_model_bit_for_bit(name, monkeypatch):
    import fedtune.algorithms.fedkseed.device as mod

    server, device, model = make(name)
    play_round(server, device, model, 1, [0, 1])
    play_round(server, device, model, 2, [1, 2])
    assert server.accumulators.abs().sum() > 0
    starts = []
    original = mod.local_zo_train

    def spy(model, params, *args, **kwargs):
        starts.append([p.detach().clone() for p in params])
        return original(model, params, *args, **kwargs)

    monkeypatch.setattr(mod, "local_zo_train", spy)
    expected = tiny_model()  # a separate model: round 2's global model, as the server defines it
    server.load_global(expected)
    play_round(server, device, model, 3, [0])
    named = dict(expected.named_parameters())
    for a, b in zip(starts[0], [named[n] for n in server.param_names], strict=True):
        assert torch.equal(a, b)  # the client trained from exactly that
    # a fresh device rebuilding from w0 and the (JSON) seed log gets the global model exactly
    server.load_global(model)
    log = json.loads(json.dumps(server.seed_log()))
    fresh = tiny_model()
    named = dict(fresh.named_parameters())
    params = [named[n] for n in log["param_names"]]  # the tuned ones, in z's index order
    rebuild_(params, [p.detach().clone() for p in params], log["seed_pool"],
             torch.tensor(log["accumulators"], dtype=torch.float32), log["lr"])
    for a, b in zip(params, params_of(model), strict=True):
        assert torch.equal(a, b)


def test_aggregate_equals_fedavg_of_the_local_models():
    # constant lr, no weight decay: w0 - lr sum_j A_j z_j is the sample-weighted mean of the
    # clients' local models (up to fp32 rounding)
    server, device, model = make()
    snaps: list = []
    play_round(server, device, model, 1, [0, 1, 2], after_client=lambda cid: snaps.append(
        (len(examples(cid)), [p.detach().clone() for p in params_of(model)])))
    total = sum(n for n, _ in snaps)
    server.load_global(model)
    for i, p in enumerate(params_of(model)):
        mean = sum(n * ps[i].double() for n, ps in snaps) / total
        torch.testing.assert_close(p.double(), mean, rtol=0, atol=1e-6)


def test_pro_clients_draw_from_the_server_probabilities():
    server, device, model = make("fedkseed-pro")
    play_round(server, device, model, 1, [0, 1])
    p = server.probabilities()
    assert p.max() / p.min() <= math.e + 1e-9 and p.max() > p.min()
    server.begin_round(2)
    down = Download.decode(server.download(2, 0), 16, True, expect_round=2)
    np.testing.assert_allclose(down.probs.numpy(), p, rtol=1e-6)


def test_checkpoint_refuses_another_seed_pool():
    server, _, _ = make()
    other, _, _ = make(seed=1)
    with pytest.raises(ValueError, match="seed pool"):
        other.load_state_dict(server.state_dict())
    other2, _, _ = make()
    other2.load_state_dict(server.state_dict())


# -- whole runs through the CLI ------------------------------------------------------------------

SMALL = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "evaluation.rouge_interval=0", "model.path=tiny", "model.tiny_vocab_size=300",
    "algorithm.fedkseed.k_seeds=16",
    "algorithm.fedkseed.tau=4", "output.plots=false", "model.tiny_hidden_size=32",
    "model.tiny_layers=1", "evaluation.evaluate_base=false", "evaluation.loss_interval=0",
]


def run(out, *extra: str) -> int:
    return run_cli(out, *SMALL, *extra)


def test_two_rounds_through_the_cli_are_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "algorithm.name=fedkseed") == 0
    assert run(b, "algorithm.name=fedkseed") == 0
    assert model_hash(a / "model") == model_hash(b / "model")
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["accepted"] == 2 and r["rejected"] == 0 and r["failed"] == 0
        # A as K float32, or as sparse (index, value) pairs while few seeds are non-zero
        assert 21 <= r["bytes_down_per_client"] <= 21 + 4 * 16
        assert r["bytes_up_per_client"] <= 21 + 6 * 4  # at most tau (index, sum g) pairs


def test_pro_resume_and_export_equal_the_replayed_seed_log(tmp_path, interrupt_at_round):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(straight, "algorithm.name=fedkseed-pro") == 0
    interrupt_at_round(2)
    assert run(broken, "algorithm.name=fedkseed-pro") == 130
    interrupt_at_round(None)
    assert main(["run", "--quiet", "--resume", str(broken)]) == 0
    assert model_hash(straight / "model") == model_hash(broken / "model")
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        # K probabilities + A (dense or sparse: never more than K float32)
        assert 21 + 4 * 16 <= r["bytes_down_per_client"] <= 21 + 8 * 16
    # the exported model is w0 replayed with the seed log, bit for bit
    log = json.loads((straight / SEED_LOG).read_text())
    assert log["algorithm"] == "fedkseed-pro" and any(x != 0 for x in log["accumulators"])
    base = AutoModelForCausalLM.from_pretrained(straight / "base_model")
    exported = AutoModelForCausalLM.from_pretrained(straight / "model")
    named = dict(base.named_parameters())
    params = [named[n] for n in log["param_names"]]  # the tuned ones, in z's index order
    rebuild_(params, [p.detach().clone() for p in params], log["seed_pool"],
             torch.tensor(log["accumulators"], dtype=torch.float32), log["lr"])
    for (name, p), q in zip(base.named_parameters(), exported.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_incremental_catch_up_matches_the_full_rebuild():
    """A device holding round 1's model applies only the change since round 1 (the paper's ΔA)."""
    from fedtune.algorithms.fedkseed.replay import catch_up_

    server, device, model = make("fedkseed")
    play_round(server, device, model, 1, [0, 1])
    server.load_global(model)
    cached = [p.detach().clone() for p in params_of(model)]  # the device's model of round 1
    play_round(server, device, model, 2, [2, 3])
    server.begin_round(3)
    assert server.download_since is not None
    full = Download.decode(server.download(3, 0), 16, False, expect_round=3)
    delta = Download.decode(server.download_since(3, 1), 16, False, expect_round=3)
    assert delta.since == 1 and full.since == 0
    assert torch.equal(delta.accumulators, server.history[2] - server.history[1])
    # a stateless in-process device refuses a change it has no cached model for
    with pytest.raises(MessageError, match="cached model"):
        device.round(model, server.download_since(3, 1), examples(0), 3, 1)

    lr = server.cfg.lr
    rebuilt = [p.detach().clone() for p in params_of(model)]
    rebuild_(rebuilt, server.round_model.w0, server.pool, full.accumulators, lr)
    caught_up = [c.clone() for c in cached]
    catch_up_(caught_up, server.pool, delta.accumulators, lr)
    again = [c.clone() for c in cached]
    catch_up_(again, server.pool, delta.accumulators, lr)
    for a, b, c in zip(rebuilt, caught_up, again, strict=True):
        assert torch.equal(b, c)  # the same path gives the same bits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # equal up to float32 rounding
    assert any(not torch.equal(a, c) for a, c in zip(rebuilt, cached, strict=True))


def test_unknown_since_round_gets_the_full_download():
    server, device, model = make("fedkseed")
    play_round(server, device, model, 1, [0])
    server.begin_round(2)
    assert server.download_since is not None
    assert server.download_since(2, 7) == server.download(2, 0)


def test_keep_z_gives_the_same_round_bit_for_bit():
    results = []
    for keep in (False, True):
        server, device, model = make("fedkseed", keep_z=keep)
        play_round(server, device, model, 1, [0, 1])
        results.append(server.accumulators.clone())
    assert torch.equal(results[0], results[1])


def test_a_device_reading_w0_from_its_files_rebuilds_the_same_bits(tmp_path):
    """A Flower node reads w0 from the model directory (no second copy in memory) and keeps no
    round-model copy; its rebuilt model and its reply equal the in-memory path's bit for bit."""
    from fedtune.algorithms.fedkseed.replay import FileWeights

    server, device, model = make("fedkseed")
    play_round(server, device, model, 1, [0, 1])
    base = tiny_model()
    base.save_pretrained(tmp_path)  # the directory the device loaded its model from
    server.begin_round(2)
    payload = server.download(2, 3)
    replies, params = [], []
    for from_files in (False, True):
        env = DeviceEnv(one_client=True, w0_dir=tmp_path) if from_files else DeviceEnv()
        _, dev, m = build(config(), tiny_model(), env=env)
        assert isinstance(dev.round_model.w0, FileWeights) == from_files
        replies.append(dev.round(m, payload, examples(3), 2, 7))
        dev.round_model.set_(params_of(m), server.accumulators)
        params.append([p.detach().clone() for p in params_of(m)])
        assert dev.round_model._cached == [] or not from_files
    assert replies[0] == replies[1]
    for a, b in zip(*params, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="holds no tensor"):
        FileWeights(tmp_path, ["not.a.parameter"])


# -- hostile but well-formed replies ------------------------------------------------------------


def test_more_seeds_than_tau_steps_is_refused():
    server, device, model = make()  # tau 6
    server.begin_round(1)
    many = reply(index=tuple(range(7)), sum_g=(1e4,) * 7).encode(16)
    with pytest.raises(MessageError, match="touches 7 seeds"):
        server.accept(many)
    server.accept(reply(index=tuple(range(6)), sum_g=(1.0,) * 6).encode(16))  # tau is fine


def test_g_max_clips_on_the_device_and_bounds_what_the_server_accepts():
    server, device, model = make(g_max=1e-3)
    server.begin_round(1)
    up = device.round(model, server.download(1, 0), examples(0), 1, 3)
    got = Reply.decode(up, 16, False, 1000.0, expect_round=1)
    assert float(got.sum_g.abs().sum()) <= 6 * 1e-3 * (1 + 1e-6)  # tau clipped steps
    server.accept(up)
    with pytest.raises(MessageError, match="exceed"):
        server.accept(reply(sum_g=(1e30,)).encode(16))
    with pytest.raises(MessageError, match="exceed"):
        server.accept(reply(index=(0, 1), sum_g=(4e-3, 4e-3)).encode(16))  # 8e-3 > 6e-3
    server.end_round()
    assert torch.isfinite(server.accumulators).all()


def test_a_round_that_would_make_the_state_non_finite_is_refused_whole():
    server, _, _ = make(g_max=0.0)  # no clip: only the finiteness check stands in the way
    for round_ in (1, 2):  # float32-finite sums whose total overflows in the second round
        server.begin_round(round_)
        server.accept(reply(round_=round_, sum_g=(3e38,)).encode(16))
        server.end_round()
    assert torch.isfinite(server.accumulators).all()
    assert float(server.accumulators[0]) == pytest.approx(3e38, rel=1e-6)  # round 2 refused


def test_equal_weighting_gives_each_reply_one_vote():
    cfg = config()
    cfg.weighting = "equal"
    server, _, _ = build(cfg, tiny_model())
    server.begin_round(1)
    server.accept(reply(n=4, sum_g=(2.0,)).encode(16))
    server.accept(reply(n=60000, index=(1,), sum_g=(4.0,)).encode(16))
    server.end_round()
    assert server.accumulators[:2].tolist() == pytest.approx([1.0, 2.0])  # (2 + 0) / 2, 4 / 2


def test_frozen_embeddings_stay_the_base_models_and_leave_the_seed_log(tmp_path):
    out = tmp_path / "frozen"
    assert run(out, "algorithm.name=fedkseed", "algorithm.fedkseed.tune_embeddings=false") == 0
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    emb = base.get_input_embeddings().weight
    assert torch.equal(emb, tuned.get_input_embeddings().weight)
    assert torch.equal(base.get_output_embeddings().weight, tuned.get_output_embeddings().weight)
    moved = [n for (n, p), q in zip(base.named_parameters(), tuned.parameters(), strict=True)
             if not torch.equal(p, q)]
    assert moved and not any("embed" in n or "lm_head" in n for n in moved)
    names = json.loads((out / SEED_LOG).read_text())["param_names"]
    assert names and not any("embed" in n or "lm_head" in n for n in names)
