"""Secure aggregation with Flower's SecAgg+ (``federation.secure_aggregation``).

The real ServerApp and ClientApp over the in-process LocalGrid (every message through Flower's
protobuf serialisation): a secure run gives the plain run's global model within the stated
quantisation error, the server half never sees one reply (``accept`` is never called, every
update on the wire is a masked int64 vector), a device lost while training is left out of the
mean, and the configs SecAgg+ cannot serve are refused naming the key. The server halves'
``accept_mean`` is checked without Flower against the per-reply path.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rows

from fedtune.algorithms.aggregate import Rules
from fedtune.algorithms.base import ReplyInfo
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedavg.wire import Reply
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.server import FedKSeedServer
from fedtune.config import load_config
from fedtune.configbase import ConfigError
from fedtune.federation.secagg import params_of
from fedtune.wire import MessageError

SMALL = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=2",
    "data.generated_per_family=6", "algorithm.fedkseed.tau=3", "algorithm.fedkseed.k_seeds=16",
    "algorithm.fedkseed.g_max=20", "algorithm.local_steps=2", "algorithm.batch_size=2",
    "algorithm.weighting='equal'", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "model.path=tiny", "evaluation.loss_interval=1", "model.tiny_vocab_size=300",
    "output.plots=false", "model.threads=1", "federation.node_wait_s=5",
    "federation.reply_timeout_s=5",
]
SECURE = "federation.secure_aggregation=true"


def config(*extra: str):
    return load_config(None, SMALL + list(extra))


class Spy:
    """The server half's state after each round, and every reply it accepted one by one."""

    def __init__(self, monkeypatch) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.accepted = 0
        for cls in (FedKSeedServer, FedAvgServer):
            end, accept = cls.end_round, cls.accept

            def end_round(server, end=end):
                end(server)
                self.states.append({k: v.clone() for k, v in server.state_dict().items()})

            def accept_one(server, payload, accept=accept):
                self.accepted += 1
                return accept(server, payload)

            monkeypatch.setattr(cls, "end_round", end_round)
            monkeypatch.setattr(cls, "accept", accept_one)


def flower_run(cfg, run_dir: Path, num_nodes: int, *, silent=None, tamper=None):
    """Serve ``cfg`` over a LocalGrid of ``num_nodes``; return the SecAgg+ stage of every train
    message sent ('' for fedtune's own) and every reply the server received (after
    ``tamper``)."""
    pytest.importorskip("flwr")
    import tomli_w
    from flower_helpers import LocalGrid
    from flwr.app import Error, Message

    from fedtune.federation.flower.client_app import app as client_app
    from fedtune.federation.flower.server_app import serve

    stages, seen = [], []

    def push(msg):  # (the mod pops the stage from the message it handles)
        if msg.metadata.message_type == "train":
            stages.append(stage(msg))
        return silent is not None and silent(msg)

    def observe(reply):
        seen.append(tamper(reply) if tamper is not None else reply)
        return seen[-1]

    def app(msg, context):  # as Flower's runtime does: an exception becomes an error reply
        try:
            return client_app(msg, context)
        except Exception as e:  # noqa: BLE001
            return Message(Error(2, f"{type(e).__name__}: {e}"), reply_to=msg)

    grid = LocalGrid(app, num_nodes, run_dir.parent / f"{run_dir.name}-nodes", silent=push,
                     tamper=observe)
    serve(grid, {"fedtune-config": tomli_w.dumps(cfg.to_dict()), "run-dir": str(run_dir)})
    return stages, seen


def stage(msg) -> str:
    """The SecAgg+ stage of a message the server sent ('' for fedtune's own)."""
    record = msg.content.config_records.get("secaggplus_configs")
    return "" if record is None else str(record.get("stage", ""))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def check_masked(seen) -> int:
    """Every reply carrying an update is SecAgg+'s masked vector; return how many there were."""
    from flwr.common import bytes_to_ndarray

    masked = 0
    for reply in seen:
        content = reply.content
        assert all(len(r) == 0 for r in content.array_records.values()), "an array in clear"
        configs = content.config_records.get("secaggplus_configs")
        if configs is None or "masked_params" not in configs:
            continue
        masked += 1
        vectors = [bytes_to_ndarray(b) for b in configs["masked_params"]]
        assert all(v.dtype == np.int64 and (v >= 0).all() and (v < 2**32).all()
                   for v in vectors)
        metrics = content.config_records["fitres.metrics"]  # the clear part
        assert metrics["num-samples"] >= 1 and metrics["train-loss"] > 0
    return masked


@pytest.mark.parametrize("method", ["fedkseed", "fedit"])
def test_secure_run_equals_plain_within_the_quantisation_error(method, tmp_path, monkeypatch):
    plain_spy = Spy(monkeypatch)
    flower_run(config(f"algorithm.name={method}"), tmp_path / "plain", 2)
    secure_spy = Spy(monkeypatch)
    cfg = config(f"algorithm.name={method}", SECURE)
    stages, seen = flower_run(cfg, tmp_path / "secure", 2)

    assert plain_spy.accepted == 4 and secure_spy.accepted == 0  # the server saw no reply
    assert check_masked(seen) == 4  # 2 rounds x 2 devices, each a masked vector
    assert stages.count("collect_masked_vectors") == 4 and "" not in stages

    keys = ["accumulators"] if method == "fedkseed" else list(plain_spy.states[0])
    want, got = plain_spy.states[0], secure_spy.states[0]
    error = params_of(cfg).error([1.0, 1.0])  # equal weights: 1.5 quantisation steps
    ulp = 2 * torch.finfo(torch.float32).eps * max(float(want[k].abs().max()) for k in keys)
    diff = max_diff(want, got, keys)
    # round 1: the same replies, quantised (stochastic rounding: never exactly the same)
    assert 0 < diff <= error + ulp, (diff, error)
    # round 2 trains from slightly different models; float32 losses make FedKSeed's g and
    # Adam's near-zero steps sensitive to that, so only the outcome is compared
    plain_rows, secure_rows = rows(tmp_path / "plain"), rows(tmp_path / "secure")
    assert secure_rows[1]["train_loss"] == plain_rows[1]["train_loss"]  # in clear, as sent
    assert secure_rows[-1]["eval_loss"] == pytest.approx(plain_rows[-1]["eval_loss"], rel=1e-4)


def test_a_device_lost_while_training_is_left_out_of_the_mean(tmp_path, monkeypatch):
    """Node 1003 never answers its training task: the mean covers the other two, as the plain
    path's does when that node is silent."""
    pytest.importorskip("flwr")
    three = ["federation.rounds=1", "data.num_clients=3", "federation.clients_per_round=3",
             "federation.reply_timeout_s=0.5"]  # (the plain path waits for the silent node)

    def plain_silent(msg):
        return msg.metadata.dst_node_id == 1003 and msg.metadata.message_type == "train"

    def secure_silent(msg):
        return msg.metadata.dst_node_id == 1003 and stage(msg) == "collect_masked_vectors"

    plain_spy = Spy(monkeypatch)
    flower_run(config(*three), tmp_path / "plain", 3, silent=plain_silent)
    secure_spy = Spy(monkeypatch)
    cfg = config(*three, SECURE)
    flower_run(cfg, tmp_path / "secure", 3, silent=secure_silent)
    diff = max_diff(plain_spy.states[0], secure_spy.states[0], ["accumulators"])
    assert diff <= params_of(cfg).error([1.0, 1.0]) + 1e-6
    assert rows(tmp_path / "secure")[1]["failed"] == rows(tmp_path / "plain")[1]["failed"] == 1


def test_a_device_lost_during_the_key_stages_halts_the_round(tmp_path, caplog):
    """flwr 1.41: node 1003 never answers the setup stage. The others still train, then are
    asked for key shares of 1003 they never got (their mod raises), so the server cannot
    unmask: the round has no mean and fails (the run resumes from its last checkpoint)."""
    pytest.importorskip("flwr")
    from fedtune.federation.flower.engine import RoundFailed

    stages = []

    def silent(msg):
        stages.append(stage(msg))
        return msg.metadata.dst_node_id == 1003 and stages[-1] == "setup"

    with pytest.raises(RoundFailed):
        flower_run(config("federation.rounds=1", "data.num_clients=3",
                          "federation.clients_per_round=3", SECURE), tmp_path / "run", 3,
                   silent=silent)
    assert "SecAgg+ halted" in caplog.text
    assert stages.count("collect_masked_vectors") == 2  # the other two trained for nothing
    assert "Not enough shares" in caplog.text


def lie_about_the_round(reply):
    metrics = reply.content.config_records.get("fitres.metrics")
    if metrics is not None and reply.metadata.src_node_id == 1001:
        metrics["round"] = 7
    return reply


def send_garbage(reply):
    """A hostile device's masked vector: uniform noise modulo 2^32 (it cannot be unmasked into
    anything, and no one reply can be taken out of the sum)."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    configs = reply.content.config_records.get("secaggplus_configs")
    if configs is not None and "masked_params" in configs and reply.metadata.src_node_id == 1001:
        rng = np.random.default_rng(0)
        configs["masked_params"] = [
            ndarray_to_bytes(rng.integers(0, 2**32, bytes_to_ndarray(b).shape, dtype=np.int64))
            for b in configs["masked_params"]]
    return reply


@pytest.mark.parametrize("tamper, why", [(lie_about_the_round, "round 7"),
                                         (send_garbage, "outside the clipping range")])
def test_a_bad_reply_refuses_the_whole_mean(tamper, why, tmp_path, monkeypatch, caplog):
    """One reply's clear part lies, or its masked vector is garbage: its update is already in
    the sum, so the server refuses the mean whole and the round fails before it commits."""
    from fedtune.federation.flower.engine import RoundFailed

    spy = Spy(monkeypatch)
    cfg = config("federation.rounds=1", "algorithm.name=fedit", SECURE)
    with pytest.raises(RoundFailed):
        flower_run(cfg, tmp_path / "run", 2, tamper=tamper)
    assert spy.states == [] and spy.accepted == 0
    assert "refused whole" in caplog.text and why in caplog.text


# -- configs SecAgg+ cannot serve ---------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [
    (["algorithm.name='fedkseed-pro'"], "algorithm.name"),
    (["algorithm.name='fedmezo'"], "algorithm.name"),
    (["algorithm.robust.aggregation='median'"], "algorithm.robust.aggregation"),
    (["algorithm.weighting='samples'"], "algorithm.max_sample_weight"),
    (["algorithm.fedkseed.g_max=0"], "algorithm.fedkseed.g_max"),
    (["federation.clients_per_round=1"], "federation.clients_per_round"),
    (["federation.secagg_quantization_range=2147483647", "data.num_clients=3",
      "federation.clients_per_round=3"], "federation.secagg_quantization_range"),
    (["federation.secagg_num_shares=1.5"], "federation.secagg_num_shares"),
])
def test_configs_it_cannot_honour_are_refused_naming_the_key(extra, key):
    with pytest.raises(ConfigError) as e:
        config(SECURE, *extra)
    assert e.value.key == key


def test_the_in_process_engine_refuses_secure_aggregation(tmp_path):
    from fedtune import runner

    with pytest.raises(ConfigError) as e:
        runner.run(config(SECURE), tmp_path / "run", progress=False)
    assert e.value.key == "federation.secure_aggregation"
    assert not (tmp_path / "run").exists()


# -- the server halves, without Flower ----------------------------------------------------------

def test_fedavg_accept_mean_equals_accepting_the_replies():
    """theta = 0; trained [4, 0] (1 sample) and [0, 8] (3 samples): the mean is [1, 6] either
    way, from the trained tensors or from theta plus the mean of their changes."""
    rules = Rules(max_sample_weight=10)
    plain = FedAvgServer("fedavg", {"w": torch.zeros(2)}, rules=rules)
    plain.begin_round(1)
    plain.accept(Reply(1, 1, 0.5, {"w": torch.tensor([4.0, 0.0])}).encode())
    plain.accept(Reply(1, 3, 0.5, {"w": torch.tensor([0.0, 8.0])}).encode())
    plain.end_round()
    secure = FedAvgServer("fedavg", {"w": torch.zeros(2)}, rules=rules)
    secure.begin_round(1)
    infos = [ReplyInfo(1, 0.5), ReplyInfo(3, 0.5)]
    secure.accept_mean({"w": torch.tensor([1.0, 6.0], dtype=torch.float64)}, 4.0, infos)
    secure.end_round()
    assert torch.equal(plain.theta["w"], torch.tensor([1.0, 6.0]))
    assert torch.equal(secure.theta["w"], plain.theta["w"])


def test_fedkseed_accept_mean_checks_what_a_mean_of_valid_replies_satisfies():
    cfg = FedKSeedConfig(k_seeds=4, tau=2, g_max=1.0)  # |mean_j| and sum_j |mean_j| <= 2
    server = FedKSeedServer(cfg, False, rules=Rules(weighting="equal"))
    infos = [ReplyInfo(5, 1.0), ReplyInfo(7, 1.0)]
    server.begin_round(1)
    bad = {
        "beyond tau * g_max": ({"g": torch.tensor([2.5, 0.0, 0.0, 0.0])}, 2.0),
        "L1 beyond tau * g_max": ({"g": torch.tensor([1.0, 1.0, 1.0, 0.0])}, 2.0),
        "not finite": ({"g": torch.tensor([float("nan"), 0.0, 0.0, 0.0])}, 2.0),
        "wrong shape": ({"g": torch.zeros(5)}, 2.0),
        "weight of 3 replies": ({"g": torch.zeros(4)}, 3.0),
    }
    for case, (mean, total) in bad.items():
        with pytest.raises(MessageError):
            server.accept_mean(mean, total, infos)
            pytest.fail(case)
    server.accept_mean({"g": torch.tensor([1.0, -0.5, 0.0, 0.5])}, 2.0, infos)
    server.end_round()
    assert server.accumulators.tolist() == [1.0, -0.5, 0.0, 0.5]
    assert FedKSeedServer(cfg, True).accept_mean is None  # Pro needs each reply


def test_a_device_clips_its_update_to_the_range_itself(caplog):
    from fedtune.federation.secagg import device_update

    cfg = config(SECURE, "federation.secagg_clipping_range=1.0")
    update = {"b": torch.tensor([0.5, -3.0]), "a": torch.tensor([2.0])}
    out = device_update(update, ReplyInfo(9, 1.0), params_of(cfg))
    assert out.names == ["a", "b"] and out.weight == 1
    assert [a.tolist() for a in out.arrays] == [[1.0], [0.5, -1.0]]
    assert "2 of 3 values" in caplog.text
    assert json.dumps(out.names)  # travels in clear as JSON


def test_a_node_sends_a_secure_runs_update_only_through_secagg(tmp_path):
    """A plain task for a secure run (or the reverse) is refused before any training."""
    pytest.importorskip("flwr")
    import tomli_w

    from fedtune.federation.flower.node import (
        NodeConfigError,
        NodeSettings,
        config_sha256,
        node_round,
        secure_node_round,
    )

    node = NodeSettings(partition_id=0, cache_dir=tmp_path)
    for cfg, play, why in ((config(SECURE), node_round, "only through SecAgg"),
                           (config(), secure_node_round, "without federation.secure_agg")):
        text = tomli_w.dumps(cfg.to_dict())
        with pytest.raises(NodeConfigError, match=why):
            play(node, config_sha256(text), text, 1, 0, 0, b"")


def test_a_secure_replys_clear_part_is_validated():
    pytest.importorskip("flwr")
    from flwr.common import Code, FitRes, Parameters, Status

    from fedtune.federation.flower.messages import SecureReply

    good = SecureReply(3, 1, -1, 12, 2.5, 10, ["a", "b"])
    fields = good.content([np.zeros(1), np.zeros(2)]).config_records["fitres.metrics"]

    def fit_res(weight=10, **change):
        return FitRes(Status(Code.OK, ""), Parameters([], ""), weight, {**fields, **change})

    assert SecureReply.read(fit_res()) == good
    for weight, change in [(10, {"train-loss": float("nan")}), (10, {"train-loss": 3}),
                           (10, {"update-names": "not json"}), (10, {"num-samples": 0}),
                           (0, {}), (10, {"round": "3"})]:
        with pytest.raises(MessageError):
            SecureReply.read(fit_res(weight, **change))
            pytest.fail(f"accepted {weight}, {change}")
