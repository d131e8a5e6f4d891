import pytest
import torch

from fedtune.algorithms.aggregate import WeightedMean, weighted_mean
from fedtune.seeds import client_seed, sample_clients


def test_weighted_mean_by_hand():
    # (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5]
    out = weighted_mean([torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], [1, 3])
    assert torch.equal(out, torch.tensor([4.0, 5.0]))


def test_weighted_mean_is_a_mean_not_a_sum():
    x = torch.tensor([2.0])
    assert torch.equal(weighted_mean([x, x, x], [5, 5, 5]), x)


def test_streaming_equals_batch():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g) for _ in range(5)]
    ws = [3, 1, 4, 1, 5]
    agg = WeightedMean()
    for x, w in zip(xs, ws, strict=True):
        agg.add({"w": x}, w)
    assert torch.equal(agg.result()["w"], weighted_mean(xs, ws))


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([torch.ones(1)], [0])
    with pytest.raises(ValueError):
        WeightedMean().add({"w": torch.ones(1)}, -1)
    with pytest.raises(ValueError):
        WeightedMean().result()


def test_client_sampling_is_seeded_and_distinct():
    a = sample_clients(200, 10, seed=1, round_=3)
    assert a == sample_clients(200, 10, seed=1, round_=3)
    assert a != sample_clients(200, 10, seed=1, round_=4)
    assert len(set(a)) == 10 and a == sorted(a) and all(0 <= i < 200 for i in a)
    assert sample_clients(5, 5, 0, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_clients(3, 4, 0, 1)


def test_client_seed_depends_on_every_part():
    s = client_seed(0, 1, 2)
    assert s == client_seed(0, 1, 2)
    assert len({s, client_seed(1, 1, 2), client_seed(0, 2, 2), client_seed(0, 1, 3)}) == 4


def test_reply_weight_by_hand():
    from fedtune.algorithms.aggregate import reply_weight

    assert reply_weight(70) == 70.0
    assert reply_weight(10**9, "samples", cap=1000) == 1000.0
    assert reply_weight(12, "samples", cap=1000) == 12.0
    assert reply_weight(10**9, "equal") == 1.0
    with pytest.raises(ValueError, match="weighting"):
        reply_weight(3, "loudest")


@pytest.mark.parametrize("weighting, cap, want", [
    ("samples", 0, [1e9 / (1e9 + 4)]),  # the papers' weighting: the claim wins
    ("samples", 100, [100 / 104]),
    ("equal", 0, [0.5]),
])
def test_a_client_claiming_a_billion_samples(weighting, cap, want):
    """FedAvg's global model after one honest reply (4 samples, theta 0) and one claiming 10^9
    samples (theta 1): the share of the claim under each weighting."""
    from fedtune.algorithms.aggregate import Rules
    from fedtune.algorithms.fedavg.server import FedAvgServer
    from fedtune.algorithms.fedavg.wire import Reply

    server = FedAvgServer("fedavg", {"w": torch.zeros(1)}, rules=Rules(weighting, cap))
    server.begin_round(1)
    server.accept(Reply(1, 4, 1.0, {"w": torch.zeros(1)}).encode())
    server.accept(Reply(1, 10**9, 1.0, {"w": torch.ones(1)}).encode())
    server.end_round()
    assert server.theta["w"].tolist() == pytest.approx(want, rel=1e-6)
