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
