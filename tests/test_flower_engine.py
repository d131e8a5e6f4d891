"""The Flower adapter in process (LocalGrid: no Ray, no network, real Flower records).

The ServerApp's ``serve`` drives the real ClientApp through LocalGrid; every algorithm must end
with the model the in-process engine gives for the same config, bit for bit. Faults: a reply that
fails validation is dropped (never aggregated), a silent node makes the round complete with the
others after the timeout, too few replies stop the run and a second ``serve`` resumes it.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import tomli_w  # noqa: E402
from conftest import comparable, model_hash  # noqa: E402
from flower_helpers import LocalGrid  # noqa: E402
from flwr.app import Message  # noqa: E402

from fedtune import runner  # noqa: E402
from fedtune.algorithms.fedkseed.device import FedKSeedDevice  # noqa: E402
from fedtune.config import load_config  # noqa: E402
from fedtune.federation.flower import APP_DIR  # noqa: E402
from fedtune.federation.flower import messages as wire  # noqa: E402
from fedtune.federation.flower.client_app import app as client_app  # noqa: E402
from fedtune.federation.flower.engine import RoundFailed  # noqa: E402
from fedtune.federation.flower.node import NodeConfigError, NodeSettings  # noqa: E402
from fedtune.federation.flower.server_app import serve  # noqa: E402
from fedtune.seeds import client_seed  # noqa: E402
from fedtune.wire import MessageError  # noqa: E402

SMALL = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=2",
    "data.generated_per_family=6", "algorithm.fedkseed.tau=3", "algorithm.fedkseed.k_seeds=16",
    "algorithm.local_steps=2", "algorithm.batch_size=2", "evaluation.max_examples=4",
    "evaluation.max_new_tokens=4", "model.path=tiny", "evaluation.loss_interval=1",
    "model.tiny_vocab_size=300",
    "output.plots=false",
    "federation.node_wait_s=5", "federation.reply_timeout_s=5",
    # one fixed thread count: the free-cores default changes with the load between the two runs
    # a test compares, and another count rounds a matmul differently (FedPT's eval loss moved in
    # its 7th digit on a loaded machine)
    "model.threads=1",
]


def config(*extra: str):
    return load_config(None, SMALL + list(extra))


def run_config(cfg, run_dir: Path) -> dict:
    return {"fedtune-config": tomli_w.dumps(cfg.to_dict()), "run-dir": str(run_dir)}


def failing_client(monkeypatch, dropped: set[int]) -> None:
    """In process: the clients whose seed is in ``dropped`` raise (a device that stops)."""
    real = FedKSeedDevice.round

    def round_(self, model, payload, examples, round_, seed):
        if seed in dropped:
            raise RuntimeError("device stopped")
        return real(self, model, payload, examples, round_, seed)

    monkeypatch.setattr(FedKSeedDevice, "round", round_)


def test_tasks_go_to_their_partitions_node_and_the_config_once(tmp_path):
    """(Equality with the in-process engine for every method: tests/test_method_contract.py.)"""
    cfg = config("algorithm.name=fedkseed")
    runner.run(cfg, tmp_path / "inprocess", progress=False)
    grid = LocalGrid(client_app, 2, tmp_path / "nodes")
    serve(grid, run_config(config("algorithm.name=fedkseed"), tmp_path / "flower"))
    assert model_hash(tmp_path / "inprocess") == model_hash(tmp_path / "flower")
    trains = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert len(trains) == 4  # 2 rounds x 2 clients, each to the node of its partition
    for m in trains:
        task = wire.Task.read(m)
        assert grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] == task.client_id
        assert bool(task.config) == (task.round == 1)  # the config once, then its hash


def _round_of(msg: Message) -> int:
    """The round of a train task (0 for the partition query)."""
    return wire.Task.read(msg).round if msg.metadata.message_type == "train" else 0


def test_reply_failing_validation_is_dropped(tmp_path, monkeypatch):
    def corrupt(reply: Message) -> Message:
        if (reply.metadata.src_node_id == 1002 and reply.metadata.message_type == "train"
                and not reply.has_error()):
            got = wire.Reply.read(reply)
            reply.content = wire.Reply(got.round, got.client_id, b"XXXX" + got.payload[4:]
                                       ).content()
        return reply

    grid = LocalGrid(client_app, 2, tmp_path / "nodes", tamper=corrupt)
    serve(grid, run_config(config("algorithm.name=fedkseed"), tmp_path / "flower"))
    rows = comparable(tmp_path / "flower")
    assert [(r["accepted"], r["rejected"]) for r in rows[1:]] == [(1, 1), (1, 1)]

    # the global model is the one of a run in which client 1 never replied
    failing_client(monkeypatch, {client_seed(0, r, 1) for r in (1, 2)})
    runner.run(config("algorithm.name=fedkseed"), tmp_path / "inprocess", progress=False)
    assert model_hash(tmp_path / "inprocess") == model_hash(tmp_path / "flower")


def test_silent_node_round_completes_with_the_others(tmp_path, monkeypatch):
    cfg = ("algorithm.name=fedkseed", "federation.rounds=3", "federation.reply_timeout_s=0.5")
    grid = LocalGrid(client_app, 2, tmp_path / "nodes",
                     silent=lambda m: m.metadata.dst_node_id == 1002 and _round_of(m) == 2)
    serve(grid, run_config(config(*cfg), tmp_path / "flower"))
    rows = comparable(tmp_path / "flower")
    assert [(r["accepted"], r["failed"]) for r in rows[1:]] == [(2, 0), (1, 1), (2, 0)]

    failing_client(monkeypatch, {client_seed(0, 2, 1)})
    runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
    assert comparable(tmp_path / "inprocess") == rows
    assert model_hash(tmp_path / "inprocess") == model_hash(tmp_path / "flower")


def test_too_few_replies_stop_the_run_and_serve_resumes_it(tmp_path):
    cfg = ("algorithm.name=fedkseed", "federation.rounds=3", "federation.reply_timeout_s=0.5",
           "federation.min_replies=2")
    out = tmp_path / "flower"
    broken = LocalGrid(client_app, 2, tmp_path / "nodes",
                       silent=lambda m: m.metadata.dst_node_id == 1002 and _round_of(m) == 2)
    with pytest.raises(RoundFailed, match="min_replies = 2"):
        serve(broken, run_config(config(*cfg), out))
    assert [r["round"] for r in comparable(out)] == [0, 1]
    assert json.loads((out / "checkpoint" / "engine.json").read_text())["round"] == 1

    # the ServerApp starts again (nodes back): it resumes after round 1
    serve(LocalGrid(client_app, 2, tmp_path / "nodes"), run_config(config(*cfg), out))
    runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
    assert comparable(tmp_path / "inprocess") == comparable(out)
    assert model_hash(tmp_path / "inprocess") == model_hash(out)


def test_node_without_partition_or_with_wrong_task(tmp_path):
    with pytest.raises(NodeConfigError, match="partition-id"):
        NodeSettings.from_node_config({})
    with pytest.raises(NodeConfigError, match="integer"):
        NodeSettings.from_node_config({"partition-id": "x"})
    s = NodeSettings.from_node_config({"partition-id": 3, "cache-dir": str(tmp_path)})
    assert s.partition_id == 3 and s.cache == tmp_path

    from fedtune.federation.flower.node import config_sha256, node_round

    text = tomli_w.dumps(config().to_dict())
    with pytest.raises(NodeConfigError, match="partition 3"):
        node_round(s, config_sha256(text), text, 1, 0, 0, b"")
    with pytest.raises(NodeConfigError, match="holds no run config"):
        node_round(s, config_sha256(text + " "), "", 1, 3, 0, b"")
    with pytest.raises(NodeConfigError, match="does not match"):
        node_round(s, config_sha256(text + " "), text, 1, 3, 0, b"")


def test_message_layout_round_trip_and_refusals():
    task = wire.Task(2, 1, 2**32 - 1, "ab" * 32, "x = 1", bytes(range(256)))
    msg = Message(task.content(), dst_node_id=5, message_type="train")
    assert wire.Task.read(msg) == task
    empty = Message(wire.partition_query(), dst_node_id=5, message_type="query")
    with pytest.raises(MessageError):
        wire.Task.read(empty)
    with pytest.raises(MessageError):
        wire.unpack(empty.content)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec, inside flwr's builder
def test_app_project_builds_a_fab():
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(APP_DIR)
    assert 0 < len(fab) < 100_000  # config and license only: the code is the installed package


def test_delta_downloads_catch_up_a_node_that_missed_a_round(tmp_path, monkeypatch):
    """FedKSeed with federation.delta_downloads: nodes keep their round model in the node cache
    and get only ΔA since then; node 1, silent in round 3, catches up over two rounds by replay.
    Equal to the in-process run (full rebuilds) up to float32 rounding: eval losses to 1e-4,
    the accumulators to 1e-2 (measured: at most 0.4 % apart)."""
    from fedtune.algorithms.fedkseed.wire import Download

    cfg = ("algorithm.name=fedkseed", "federation.rounds=4", "federation.reply_timeout_s=0.5",
           "federation.delta_downloads=true")
    grid = LocalGrid(client_app, 2, tmp_path / "nodes",
                     silent=lambda m: m.metadata.dst_node_id == 1002 and _round_of(m) == 3)
    serve(grid, run_config(config(*cfg), tmp_path / "flower"))
    since = {}
    for m in grid.pushed:
        if m.metadata.message_type == "train":
            task = wire.Task.read(m)
            down = Download.decode(task.payload, 16, False, expect_round=task.round)
            since[task.round, task.client_id] = down.since
    # round r trains from the global model of round r - 1; node 1 missed round 3
    assert since == {(1, 0): 0, (1, 1): 0, (2, 0): 0, (2, 1): 0, (3, 0): 1, (3, 1): 1,
                     (4, 0): 2, (4, 1): 1}
    held = sorted(p.name for p in (tmp_path / "nodes" / "node-1").rglob("fedkseed-round-*"))
    assert held == ["fedkseed-round-000001.safetensors", "fedkseed-round-000003.safetensors"]

    failing_client(monkeypatch, {client_seed(0, 3, 1)})
    runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
    flower, inproc = comparable(tmp_path / "flower"), comparable(tmp_path / "inprocess")
    assert [r.get("failed") for r in flower] == [r.get("failed") for r in inproc]
    assert [r["bytes_down"] for r in flower[3:]] < [r["bytes_down"] for r in inproc[3:]]
    for a, b in zip(flower, inproc, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    acc = [json.loads((d / "fedkseed_seeds.json").read_text())["accumulators"]
           for d in (tmp_path / "flower", tmp_path / "inprocess")]
    # the two-point estimate (L+ - L-) / 2eps turns float32 rounding of the model into ~1e-3 of g
    assert acc[0] == pytest.approx(acc[1], rel=1e-2, abs=1e-2)


def test_node_refuses_remote_code_unless_its_config_allows_it(tmp_path):
    from fedtune.federation.flower.node import config_sha256, node_round

    text = tomli_w.dumps(config("model.trust_remote_code=true").to_dict())
    s = NodeSettings.from_node_config({"partition-id": 0, "cache-dir": str(tmp_path)})
    with pytest.raises(NodeConfigError, match="trust-remote-code"):
        node_round(s, config_sha256(text), text, 1, 0, 0, b"")
    with pytest.raises(NodeConfigError, match="true or false"):
        NodeSettings.from_node_config({"partition-id": 0, "trust-remote-code": "yes"})


@pytest.mark.slow  # the large model's distillation runs on the server (about a minute)
def test_fedpt_devices_run_their_device_trainer(tmp_path):
    """FedPT over Flower: devices run the device trainer (FedIT here); the large model and the
    distillation stay on the server. Same model and metrics as in process."""
    root = Path(__file__).resolve().parents[1] / "fedtune" / "base_models"
    cfg = ("algorithm.name=fedpt", f"model.path={json.dumps(str(root / 'small'))}",
           f"algorithm.fedpt.large_model={json.dumps(str(root / 'large'))}",
           "algorithm.fedpt.large_access=in-process", "federation.rounds=1",
           "data.max_length=128", "algorithm.fedpt.distill_prompts=4",
           "algorithm.fedpt.distill_steps=2", "algorithm.fedpt.distill_max_new_tokens=6")
    runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
    serve(LocalGrid(client_app, 2, tmp_path / "nodes"), run_config(config(*cfg),
                                                                    tmp_path / "flower"))
    assert comparable(tmp_path / "inprocess") == comparable(tmp_path / "flower")
    assert model_hash(tmp_path / "inprocess") == model_hash(tmp_path / "flower")


@pytest.mark.slow  # three rounds of FedPT, each with the server's distillation, twice
def test_fedpt_fedkseed_devices_catch_up_on_the_servers_distillation(tmp_path):
    """FedPT with FedKSeed devices and delta downloads: the server's zeroth-order distillation
    lives in the accumulators, so a node that replays only ΔA since the model it holds lands on
    the distilled model: equal to the in-process run (full rebuilds) up to float32 rounding."""
    root = Path(__file__).resolve().parents[1] / "fedtune" / "base_models"
    cfg = ("algorithm.name=fedpt", f"model.path={json.dumps(str(root / 'small'))}",
           f"algorithm.fedpt.large_model={json.dumps(str(root / 'large'))}",
           "algorithm.fedpt.large_access=in-process", "algorithm.fedpt.device_trainer=fedkseed",
           "federation.rounds=3", "federation.delta_downloads=true", "data.max_length=128",
           "algorithm.fedpt.distill_prompts=4", "algorithm.fedpt.distill_zo_steps=6",
           "algorithm.fedpt.distill_max_new_tokens=6", "algorithm.fedpt.eval_small=false")
    from fedtune.algorithms.fedkseed.wire import Download

    runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
    grid = LocalGrid(client_app, 2, tmp_path / "nodes")
    serve(grid, run_config(config(*cfg), tmp_path / "flower"))
    since = {}
    for m in grid.pushed:
        if m.metadata.message_type == "train":
            task = wire.Task.read(m)
            since[task.round] = Download.decode(task.payload, 16, False,
                                                expect_round=task.round).since
    assert since == {1: 0, 2: 0, 3: 1}  # round 3: only ΔA since round 1's distilled model
    flower, inproc = comparable(tmp_path / "flower"), comparable(tmp_path / "inprocess")
    for a, b in zip(flower, inproc, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    acc = [json.loads((d / "fedkseed_seeds.json").read_text())["accumulators"]
           for d in (tmp_path / "flower", tmp_path / "inprocess")]
    assert acc[0] == pytest.approx(acc[1], rel=1e-2, abs=1e-2)
    logs = [json.loads((d / "fedpt_distill.json").read_text())
            for d in (tmp_path / "flower", tmp_path / "inprocess")]
    assert [x["round"] for x in logs[0]] == [1, 2, 3]
