"""Bounded influence, robust aggregation and differential privacy: the maths by hand, then the
attacks of issue 13 against the servers (the federation survives, the state stays finite and
within bound, later rounds keep working), then the accountant against independent bounds."""

import math

import pytest
import torch
from conftest import build, examples, play_round, tiny_model

from fedtune.algorithms import MethodContext
from fedtune.algorithms.aggregate import (
    Aggregator,
    Rules,
    clip_l2,
    coordinate_median,
    lower_median,
    outlier_refusal,
    refusal,
    trimmed_mean,
)
from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedavg.wire import Reply as FedAvgReply
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.wire import Reply
from fedtune.algorithms.privacy import Accountant
from fedtune.configbase import ConfigError

# -- the maths, by hand ---------------------------------------------------------------------------


def test_trimmed_mean_by_hand():
    stack = torch.tensor([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]])
    # trim 0.2 of 5 = 1 each side: column 0 {2, 3, 4} -> 3; column 1 {10, 20, 30} -> 20
    assert trimmed_mean(stack, 0.2).tolist() == [3.0, 20.0]
    assert trimmed_mean(stack, 0.0).tolist() == pytest.approx([22.0, 10.0])  # the plain mean
    assert trimmed_mean(stack[:2], 0.4).tolist() == [1.5, -20.0]  # nothing left to trim


def test_coordinate_median_by_hand():
    odd = torch.tensor([[1.0, 9.0], [5.0, -1.0], [3.0, 4.0]])
    assert coordinate_median(odd).tolist() == [3.0, 4.0]
    even = torch.tensor([[1.0], [2.0], [10.0], [1e30]])
    assert coordinate_median(even).tolist() == [6.0]  # (2 + 10) / 2, not the lower middle
    with pytest.raises(ValueError):
        trimmed_mean(odd, 0.5)


def test_clip_l2_scales_all_tensors_together():
    t = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}  # norm 5
    out, was = clip_l2(t, 1.0)
    assert was and out["a"].item() == pytest.approx(0.6) and out["b"].item() == pytest.approx(0.8)
    same, was = clip_l2(t, 5.0)
    assert not was and same["a"].item() == 3.0
    with pytest.raises(ValueError, match="non-finite"):
        clip_l2({"a": torch.tensor([math.inf])}, 1.0)


def test_refusal_names_the_move_and_non_finite():
    assert refusal({"g": torch.tensor([3.0, 4.0])}, 5.0) is None
    assert "5 (L2), more than the bound 4" in refusal({"g": torch.tensor([3.0, 4.0])}, 4.0)
    assert refusal({"g": torch.tensor([math.nan])}, 0.0) == "the aggregate is not finite"
    assert refusal({"g": torch.tensor([1e30])}, 0.0) is None  # no bound configured


def test_outlier_refusal_against_the_lower_median_by_hand():
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([1.0, 1e30]) == 1.0  # of two, the smaller: one outlier cannot raise it
    assert outlier_refusal(20.0, [1.0, 2.0, 1e6], 10.0) is None  # 20 <= 10 x 2
    assert outlier_refusal(20.1, [1.0, 2.0, 1e6], 10.0) == (
        "it would move the global state by 20.1 (L2), more than 10 x 2, the median L2 size of "
        "its 3 updates")
    assert outlier_refusal(1e9, [1.0], 0.0) is None  # off
    assert outlier_refusal(1e9, [], 10.0) is None  # nothing seen (a secure mean)


def test_aggregator_rules_by_hand():
    ups = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([30.0, 40.0])]
    got = {}
    for rule in ("mean", "median", "trimmed-mean"):
        agg = Aggregator(rule, trim=0.34)
        for u in ups:
            agg.add({"x": u})
        got[rule] = agg.result()["x"].tolist()
    assert got["mean"] == pytest.approx([11.0, 40 / 3])
    assert got["median"] == [2.0, 0.0]
    assert got["trimmed-mean"] == [2.0, 0.0]  # one of three dropped at each end
    clipped = Aggregator("mean", clip=5.0)
    for u in ups:
        clipped.add({"x": u})
    assert clipped.clipped == 1  # (30, 40) -> (3, 4)
    assert clipped.result()["x"].tolist() == pytest.approx([2.0, 4 / 3])


def test_noise_is_added_to_the_sum_from_its_own_stream():
    def noisy(seed: int) -> torch.Tensor:
        agg = Rules(weighting="equal", clip=1.0, noise_std=0.5, noise_seed=seed).aggregator(3)
        for _ in range(4):
            agg.add({"x": torch.zeros(20000)}, 1.0)
        return agg.result()["x"]

    a, b, c = noisy(7), noisy(7), noisy(8)
    assert torch.equal(a, b) and not torch.equal(a, c)  # reproducible, seed-dependent
    assert float(a.std()) == pytest.approx(0.5 / 4, rel=0.03)  # N(0, 0.5^2) on the sum, / 4
    with pytest.raises(ValueError, match="noise"):
        Aggregator("median", noise_std=1.0, generator=torch.Generator())


# -- attacks against FedKSeed -----------------------------------------------------------------


def fedkseed_cfg(**robust) -> AlgorithmConfig:
    cfg = AlgorithmConfig(name="fedkseed")
    # g_max off: the per-reply check would refuse these attacks before any rule saw them
    cfg.fedkseed = FedKSeedConfig(k_seeds=16, tau=6, lr=1e-3, g_max=0.0)
    for k, v in robust.items():
        setattr(cfg.robust, k, v)
    cfg.validate()
    return cfg


def seeds_reply(index, sum_g, round_=1, n=4) -> bytes:
    return Reply(round_, n, 2.0, torch.tensor(index, dtype=torch.int32),
                 torch.tensor(sum_g, dtype=torch.float32)).encode(16)


@pytest.mark.parametrize("attack", [
    ((0,), (1e30,)),  # one seed pushed to 1e30
    ((0,), (3.4e38,)),  # float32 max
    (tuple(range(6)), (1e4,) * 6),  # every seed tau allows, far out
])
@pytest.mark.parametrize("robust", [
    {"max_update_norm": 10.0}, {"aggregation": "median"}, {"aggregation": "trimmed-mean"}])
def test_a_hostile_fedkseed_client_cannot_move_the_state_past_the_bound(attack, robust):
    server, device, model = build(fedkseed_cfg(**robust), tiny_model())
    for round_ in (1, 2, 3):  # two honest clients and one attacker, three rounds
        server.begin_round(round_)
        for cid in (0, 1):
            server.accept(device.round(model, server.download(round_, cid), examples(cid),
                                       round_, 100 + cid))
        server.accept(seeds_reply(*attack, round_=round_))
        before = server.accumulators.clone()
        server.end_round()
        move = float((server.accumulators - before).double().norm())
        assert torch.isfinite(server.accumulators).all()
        # clip 10: the attacker's third of the mean moves A by at most 10 / 3 (+ honest part)
        assert move < 10.0
    play_round(server, device, model, 4, [0, 1])  # the federation goes on
    assert torch.isfinite(server.accumulators).all()


def test_median_ignores_a_minority_exactly():
    server, _, _ = build(fedkseed_cfg(aggregation="median"), tiny_model())
    server.begin_round(1)
    server.accept(seeds_reply((2,), (1.0,)))
    server.accept(seeds_reply((2,), (3.0,)))
    server.accept(seeds_reply((0, 2), (1e30, -1e30)))
    server.end_round()
    a = server.accumulators.tolist()
    assert a[0] == 0.0 and a[2] == 1.0  # seed 0: median(0, 0, 1e30); seed 2: median(1, 3, -1e30)


def test_a_round_moving_past_max_round_change_is_refused_whole_and_the_next_commits():
    server, _, _ = build(fedkseed_cfg(max_round_change=1.0), tiny_model())
    server.begin_round(1)
    server.accept(seeds_reply((0,), (5.0,)))  # mean move 5 > 1
    server.end_round()
    assert float(server.accumulators.abs().sum()) == 0.0
    server.begin_round(2)
    server.accept(seeds_reply((0,), (0.5,), round_=2))
    server.end_round()
    assert server.accumulators[0].item() == pytest.approx(0.5)


# -- attacks against FedAvg / FedIT -----------------------------------------------------------


@pytest.mark.parametrize("rules", [
    Rules(clip=1.0), Rules(aggregation="median"), Rules(aggregation="trimmed-mean", trim=0.34)])
def test_scaled_and_billion_sample_fedavg_replies_are_bounded(rules):
    theta = {"w": torch.zeros(4)}
    server = FedAvgServer("fedavg", theta, rules=rules)
    for round_ in (1, 2):
        server.begin_round(round_)
        honest = {"w": torch.full((4,), 0.1)}
        server.accept(FedAvgReply(round_, 4, 1.0, honest).encode())
        server.accept(FedAvgReply(round_, 4, 1.0, honest).encode())
        evil = {"w": torch.full((4,), 0.1 * 50 + 1e6)}  # scaled by 50 and pushed far
        server.accept(FedAvgReply(round_, 10**9, 1.0, evil).encode())
        old = server.theta["w"].clone()
        server.end_round()
        move = float((server.theta["w"] - old).norm())
        assert torch.isfinite(server.theta["w"]).all() and move <= 1.0


def test_the_default_refuses_a_round_one_huge_reply_would_poison_and_keeps_the_mean_exact():
    """The papers' mean with the default ``max_change_over_median``: a reply of 1e6 on every
    value (and 10^9 samples) is refused with its round; honest rounds commit the plain mean,
    bit for bit what the mean without the check gives."""
    rules = MethodContext(AlgorithmConfig(name="fedit"), 0).rules()
    assert rules.plain and rules.watches_sizes
    theta = {"w": torch.linspace(-1, 1, 6)}
    watched, unwatched = (FedAvgServer("fedit", theta, rules=r)
                          for r in (rules, Rules()))
    honest = [{"w": theta["w"] + 0.01 * (i + 1)} for i in range(3)]
    for server in (watched, unwatched):
        server.begin_round(1)
        for h in honest:
            server.accept(FedAvgReply(1, 4, 1.0, h).encode())
        server.end_round()
    assert torch.equal(watched.theta["w"], unwatched.theta["w"])
    assert watched.theta["w"][0].item() == pytest.approx(-1 + 0.02)
    before = watched.theta["w"].clone()
    watched.begin_round(2)
    for _ in range(2):
        watched.accept(FedAvgReply(2, 4, 1.0, {"w": before + 0.01}).encode())
    watched.accept(FedAvgReply(2, 10**9, 1.0, {"w": before + 1e6}).encode())
    watched.end_round()
    assert torch.equal(watched.theta["w"], before)  # refused whole
    watched.begin_round(3)
    for _ in range(2):
        watched.accept(FedAvgReply(3, 4, 1.0, {"w": before + 0.01}).encode())
    watched.end_round()
    assert watched.theta["w"].tolist() == pytest.approx((before + 0.01).tolist())


def test_one_huge_fedit_client_cannot_stop_the_federation():
    """FedIT on the tiny model, default config: a client adding 1e6 to every adapter value
    each round. Under the plain mean its first round made every later honest update
    non-finite (all refused: the federation learned nothing more); now its rounds are refused,
    the adapters stay finite and honest rounds keep committing."""
    cfg = AlgorithmConfig(name="fedit")
    cfg.local_steps = 2
    cfg.validate()
    server, device, model = build(cfg, tiny_model())
    start = {k: v.clone() for k, v in server.theta.items()}
    for round_ in (1, 2):
        server.begin_round(round_)
        for cid in (0, 1, 2):
            up = device.round(model, server.download(round_, cid), examples(cid), round_,
                              100 + cid)
            if cid == 2:
                r = FedAvgReply.decode(up, server.spec, expect_round=round_)
                up = FedAvgReply(round_, r.num_samples, r.train_loss,
                                 {k: t + 1e6 for k, t in r.tensors.items()}).encode()
            server.accept(up)
        server.end_round()
        assert all(torch.equal(server.theta[k], start[k]) for k in start)
    play_round(server, device, model, 3, [0, 1, 2])  # honest: commits
    assert all(bool(torch.isfinite(v).all()) for v in server.theta.values())
    assert any(not torch.equal(server.theta[k], start[k]) for k in start)


def test_fedavg_max_round_change_refuses_the_round_whole():
    server = FedAvgServer("fedit", {"w": torch.zeros(2)}, rules=Rules(max_change=0.5))
    server.begin_round(1)
    server.accept(FedAvgReply(1, 4, 1.0, {"w": torch.tensor([3.0, 4.0])}).encode())
    server.end_round()
    assert server.theta["w"].tolist() == [0.0, 0.0]
    server.begin_round(2)
    server.accept(FedAvgReply(2, 4, 1.0, {"w": torch.tensor([0.24, 0.32])}).encode())
    server.end_round()
    assert server.theta["w"].tolist() == pytest.approx([0.24, 0.32])


# -- differential privacy -------------------------------------------------------------------


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a mu-GDP mechanism (Dong, Roth & Su 2019; Balle & Wang 2018)."""
    return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)


@pytest.mark.parametrize("z, rounds", [(1.0, 10), (4.0, 50), (0.8, 3)])
def test_accountant_against_independent_bounds_with_every_client_sampled(z, rounds):
    """With m = N every round is the full Gaussian mechanism; replace-one sensitivity 2C with
    noise z C composes to mu-GDP with mu = 2 sqrt(T) / z. The exact epsilon at delta is a lower
    bound of what an RDP accountant may report; the classic RDP conversion
    min_a T a (2/z)^2 / 2 + log(1/delta) / (a - 1) an upper bound."""
    delta = 1e-5
    eps = Accountant(z, 10, 10, delta).epsilon(rounds)
    mu = 2 * math.sqrt(rounds) / z
    lo, hi = 0.0, 1000.0  # exact epsilon: the root of delta(eps) = delta
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _exact_gaussian_delta(mid, mu) > delta else (lo, mid)
    exact = hi
    classic = min(rounds * a * (2 / z) ** 2 / 2 + math.log(1 / delta) / (a - 1)
                  for a in [1 + i / 100 for i in range(1, 20000)])
    assert exact <= eps <= classic * (1 + 1e-6)
    assert eps < 1.3 * exact  # and not uselessly loose


def test_accountant_grows_with_rounds_and_shrinks_with_sampling_and_noise():
    a = Accountant(1.0, 100, 10, 1e-5)
    e = [a.epsilon(t) for t in (0, 1, 5, 20)]
    assert e[0] == 0.0 and e[1] < e[2] < e[3]
    assert Accountant(1.0, 100, 100, 1e-5).epsilon(5) > e[2]  # sampling amplifies privacy
    assert Accountant(2.0, 100, 10, 1e-5).epsilon(5) < e[2]
    assert Accountant(1.0, 50, 5).delta == pytest.approx(50 ** -1.1)


def test_dp_config_refuses_sample_weights_robust_rules_and_pro():
    def cfg(**kw):
        c = AlgorithmConfig(name=kw.pop("name", "fedkseed"), weighting=kw.pop("w", "equal"))
        c.dp.noise_multiplier = 1.0
        for k, v in kw.items():
            setattr(c.robust, k, v)
        return c

    cfg().validate()
    with pytest.raises(ConfigError, match="algorithm.weighting"):
        cfg(w="samples").validate()
    with pytest.raises(ConfigError, match="algorithm.robust.aggregation"):
        cfg(aggregation="median").validate()
    with pytest.raises(ConfigError, match="algorithm.name"):
        cfg(name="fedkseed-pro").validate()


def test_a_dp_fedkseed_device_clips_its_own_k_vector():
    cfg = fedkseed_cfg()
    cfg.weighting = "equal"
    cfg.dp.noise_multiplier, cfg.dp.clip_norm = 1.0, 1e-3
    cfg.validate()
    server, device, model = build(cfg, tiny_model())
    server.begin_round(1)
    up = Reply.decode(device.round(model, server.download(1, 0), examples(0), 1, 5), 16, False,
                      1000.0, expect_round=1)
    assert float(up.sum_g.double().norm()) <= 1e-3 * (1 + 1e-6)


# -- a private run, end to end ------------------------------------------------------------------

DP_RUN = [
    "federation.rounds=3", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "evaluation.rouge_interval=0", "model.path=tiny", "model.tiny_vocab_size=300",
    "algorithm.fedkseed.k_seeds=16", "algorithm.fedkseed.tau=4", "output.plots=false",
    "model.tiny_hidden_size=32", "model.tiny_layers=1", "evaluation.evaluate_base=false",
    "evaluation.loss_interval=0", "algorithm.weighting=equal",
    "algorithm.dp.noise_multiplier=2.0", "algorithm.dp.clip_norm=0.5",
]


def test_a_private_run_reports_epsilon_every_round_and_stops_at_its_target(tmp_path):
    import json

    from conftest import rows, run_cli

    assert run_cli(tmp_path / "full", *DP_RUN) == 0
    eps = [r["epsilon"] for r in rows(tmp_path / "full")[1:]]
    want = Accountant(2.0, 4, 2).epsilon
    assert eps == pytest.approx([want(1), want(2), want(3)])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(want(3))
    assert summary["privacy"]["delta"] == pytest.approx(4 ** -1.1)

    target = (want(1) + want(2)) / 2  # room for one round, not two
    assert run_cli(tmp_path / "capped", *DP_RUN, f"algorithm.dp.target_epsilon={target}") == 0
    capped = rows(tmp_path / "capped")
    assert [r["round"] for r in capped] == [0, 1] and capped[-1]["epsilon"] <= target
    summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert summary["rounds_run"] == 1 and (tmp_path / "capped" / "model").is_dir()


def test_a_target_epsilon_no_round_can_meet_is_refused_naming_the_key(tmp_path, capsys):
    from conftest import run_cli

    assert run_cli(tmp_path / "r", *DP_RUN, "algorithm.dp.target_epsilon=0.01") != 0
    assert "algorithm.dp.target_epsilon" in capsys.readouterr().err

