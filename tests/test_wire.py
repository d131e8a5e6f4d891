import json

import pytest
import torch

from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedavg.wire import Download, Reply
from fedtune.wire import MessageError, TensorSpec, encode_tensors

TENSORS = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
           "b.bias": torch.tensor([0.5, -1.0])}
SPEC = TensorSpec.of(TENSORS)


def test_download_round_trip_and_size():
    data = Download(3, TENSORS).encode()
    back = Download.decode(data, SPEC)
    assert back.round == 3
    assert all(torch.equal(back.tensors[k], v) for k, v in TENSORS.items())
    # 8 float32 values = 32 bytes of payload plus the header
    assert 32 < len(data) < 32 + 300


def test_reply_round_trip():
    data = Reply(2, 17, 1.25, TENSORS).encode()
    back = Reply.decode(data, SPEC, expect_round=2)
    assert (back.round, back.num_samples, back.train_loss) == (2, 17, 1.25)
    assert all(torch.equal(back.tensors[k], v) for k, v in TENSORS.items())


def reply_with(**changes):
    tensors = dict(TENSORS)
    tensors.update(changes.pop("tensors", {}))
    for k in changes.pop("drop", []):
        tensors.pop(k)
    meta = {"kind": "fedavg.reply", "round": 2, "num_samples": 5, "train_loss": 1.0}
    meta.update(changes)
    return encode_tensors(meta, tensors)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (reply_with(round=1), "outside"),                       # a round from the past
        (reply_with(round=3), "outside"),                       # from the future
        (reply_with(num_samples=0), "num_samples"),
        (reply_with(num_samples="many"), "not an integer"),
        (reply_with(train_loss="nan"), "not finite"),
        (reply_with(kind="fedavg.download"), "kind"),
        (reply_with(tensors={"a.weight": torch.zeros(3, 2)}), "shape"),
        (reply_with(tensors={"a.weight": torch.zeros(2, 3, dtype=torch.float64)}), "dtype"),
        (reply_with(tensors={"b.bias": torch.tensor([float("inf"), 0.0])}), "non-finite"),
        (reply_with(tensors={"extra": torch.zeros(1)}), "unexpected"),
        (reply_with(drop=["b.bias"]), "missing"),
        (b"", "too short"),
        (b"\xff" * 16, "exceeds the payload"),
        ((10).to_bytes(8, "little") + b"not json!!", "malformed"),
    ],
)
def test_malformed_replies_are_rejected(data, reason):
    with pytest.raises(MessageError, match=reason):
        Reply.decode(data, SPEC, expect_round=2)


def test_oversize_payload_rejected_before_parsing():
    header = json.dumps({"__metadata__": {"kind": "fedavg.reply"}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * (2 << 20)
    with pytest.raises(MessageError, match="exceeds the limit"):
        Reply.decode(data, SPEC, expect_round=2)


def test_rejected_reply_never_touches_global_state():
    server = FedAvgServer("fedavg", TENSORS)
    server.begin_round(1)
    good = Reply(1, 3, 0.5, {k: v + 1 for k, v in TENSORS.items()}).encode()
    bad = Reply(1, 1000, 0.5, {"a.weight": torch.full((2, 3), 1e6),
                               "b.bias": torch.tensor([float("nan"), 0.0])}).encode()
    with pytest.raises(MessageError):
        server.accept(bad)
    server.accept(good)
    server.end_round()
    assert all(torch.equal(server.theta[k], v + 1) for k, v in TENSORS.items())


def test_round_with_no_valid_reply_keeps_the_model():
    server = FedAvgServer("fedavg", TENSORS)
    server.begin_round(1)
    server.end_round()
    assert all(torch.equal(server.theta[k], v) for k, v in TENSORS.items())


def test_server_aggregates_sample_weighted():
    server = FedAvgServer("fedavg", {"w": torch.zeros(2)})
    server.begin_round(1)
    server.accept(Reply(1, 1, 0.0, {"w": torch.tensor([4.0, 0.0])}).encode())
    server.accept(Reply(1, 3, 0.0, {"w": torch.tensor([0.0, 8.0])}).encode())
    server.end_round()
    assert torch.equal(server.theta["w"], torch.tensor([1.0, 6.0]))


# -- hostile but well-formed, or crafted to crash the decoder -------------------------------------


def test_a_header_nested_1000_deep_is_refused_not_a_crash():
    header = ("[" * 1000 + "]" * 1000).encode()
    data = len(header).to_bytes(8, "little") + header
    with pytest.raises(MessageError, match="malformed header"):
        Reply.decode(data, SPEC, expect_round=1)


@pytest.mark.parametrize("loss", [1e308, -1.0, 1e5])
def test_an_impossible_train_loss_is_refused(loss):
    data = Reply(1, 3, loss, TENSORS).encode()
    with pytest.raises(MessageError, match="train_loss"):
        Reply.decode(data, SPEC, expect_round=1)


def test_fedkseed_reply_with_an_impossible_train_loss_is_refused():
    from fedtune.algorithms.fedkseed.wire import Reply as FKSReply

    good = FKSReply(1, 3, 2.5, torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]))
    FKSReply.decode(good.encode(16), 16, False, 1.0, expect_round=1)
    bad = FKSReply(1, 3, 1e30, torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]))
    with pytest.raises(MessageError, match="train_loss"):
        FKSReply.decode(bad.encode(16), 16, False, 1.0, expect_round=1)


def test_a_reply_that_is_not_bytes_or_crashes_the_decoder_is_counted_and_the_round_goes_on():
    from fedtune.federation.engine import RoundResult

    class Exploding:
        name = "test"

        def accept(self, payload):
            raise RecursionError("a decoder bug a hostile payload found")

    server = FedAvgServer("fedavg", TENSORS)
    server.begin_round(1)
    res = RoundResult(1, [0, 1, 2])
    res.fold_reply(server, 0, None)  # type: ignore[arg-type]
    res.fold_reply(Exploding(), 1, b"x")  # type: ignore[arg-type]
    res.fold_reply(server, 2, Reply(1, 3, 0.5, TENSORS).encode())
    assert (res.rejected, len(res.losses)) == (2, 1)
    assert res.train_loss == 0.5
    server.end_round()
    assert all(torch.equal(server.theta[k], v) for k, v in TENSORS.items())


def test_a_fedavg_round_whose_aggregate_is_not_finite_is_refused_whole():
    """Finite float32 replies whose weighted mean overflows float32: the round is refused and
    the previous global model kept."""
    server = FedAvgServer("fedavg", TENSORS)
    server.begin_round(1)
    huge = {k: torch.full_like(v, 3e38) for k, v in TENSORS.items()}
    server.accept(Reply(1, 1, 0.5, huge).encode())
    server.accept(Reply(1, 1, 0.5, huge).encode())
    delta = FedAvgServer("fedzo", TENSORS, delta=True)
    delta.begin_round(1)
    delta.accept(Reply(1, 1, 0.5, huge).encode())
    for s in (server, delta):
        s.end_round()
    delta.begin_round(2)
    delta.accept(Reply(2, 1, 0.5, huge).encode())
    delta.end_round()  # theta 3e38 + 3e38 overflows: refused
    for s in (server, delta):
        assert all(bool(torch.isfinite(v).all()) for v in s.theta.values())
    assert all(torch.equal(server.theta[k], torch.full_like(v, 3e38).to(v.dtype))
               for k, v in TENSORS.items())
