"""Flower's deployment engine on loopback: real flower-superlink / flower-supernode processes.

Each test starts its own SuperLink and SuperNodes on free ports (LocalFederation) and stops them
by process id when it ends, pass or fail; every wait is bounded (start-up, the run, each round).
The same FedKSeed config is run in process; the deployment must end with the same model (bit for
bit), the same per-round metrics (wall time and memory aside) and the same bytes.
"""

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import tomli_w  # noqa: E402
from conftest import comparable, model_hash, rows  # noqa: E402

from fedtune import runner  # noqa: E402
from fedtune.algorithms.fedkseed.device import FedKSeedDevice  # noqa: E402
from fedtune.config import load_config  # noqa: E402
from fedtune.federation.flower.certs import make_certs  # noqa: E402
from fedtune.federation.flower.local import LocalFederation, free_port  # noqa: E402
from fedtune.seeds import client_seed  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=2",
    "data.generated_per_family=6", "algorithm.name=fedkseed", "algorithm.fedkseed.tau=3",
    "algorithm.fedkseed.k_seeds=16", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "model.path=tiny", "evaluation.loss_interval=1",
    "model.tiny_vocab_size=300", "federation.node_wait_s=60",
    "federation.reply_timeout_s=120",
]
RUN_TIMEOUT = 600  # seconds for a whole 2-3 round run (60-120 s on 2 busy cores)


def config(*extra: str):
    return load_config(None, SMALL + list(extra))


def deploy(fed: LocalFederation, cfg, run_dir: Path) -> None:
    rc = fed.submit(tomli_w.dumps(cfg.to_dict()), run_dir, timeout=RUN_TIMEOUT)
    assert rc == 0, f"flwr run exited with {rc}; logs in {fed.work / 'logs'}"
    assert (run_dir / "summary.json").is_file(), "the ServerApp did not finish the run"


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inprocess")
    runner.run(config(), out, progress=False)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable(a) == comparable(b)
    assert model_hash(a) == model_hash(b)
    seeds = [json.loads((d / "fedkseed_seeds.json").read_text())["accumulators"] for d in (a, b)]
    assert seeds[0] == seeds[1] and any(seeds[0])


def test_loopback_two_supernodes_match_inprocess(tmp_path, inprocess):
    with LocalFederation(tmp_path / "fed", 2) as fed:
        deploy(fed, config(), tmp_path / "run")
    assert_same_run(inprocess, tmp_path / "run")
    r = rows(tmp_path / "run")
    assert [x["accepted"] for x in r[1:]] == [2, 2]
    assert all(x["bytes_up_per_client"] > 0 and x["bytes_down_per_client"] > 0 for x in r[1:])


def test_tls_and_node_authentication(tmp_path, inprocess):
    certs = make_certs(tmp_path / "certs", nodes=3)
    with LocalFederation(tmp_path / "fed", 2, certs=certs) as fed:
        deploy(fed, config(), tmp_path / "run")
        # a SuperNode whose key was never registered is refused
        fed.node_ports.append(free_port())
        fed.start_node(2)
        proc = fed.procs["node-2"]
        try:
            code = proc.wait(timeout=60)
        finally:
            fed.stop_node(2)
        assert code != 0
    assert_same_run(inprocess, tmp_path / "run")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_supernode_stopped_mid_round(tmp_path, monkeypatch):
    """Node 1 is stopped while it trains in round 2 and restarted at once: round 2 completes with
    node 0's reply after the timeout, round 3 has both nodes again, and the model equals an
    in-process run in which client 1 failed in round 2."""
    extra = ("federation.rounds=3", "federation.reply_timeout_s=30")
    with LocalFederation(tmp_path / "fed", 2) as fed:
        run_dir = tmp_path / "run"
        result: dict[str, int] = {}
        worker = threading.Thread(target=lambda: result.update(  # the run, in the background
            rc=fed.submit(tomli_w.dumps(config(*extra).to_dict()), run_dir,
                          timeout=RUN_TIMEOUT)))
        worker.start()
        node_log = fed.work / "logs" / "node-1.log"

        def second_task_received() -> bool:
            return node_log.read_text(errors="replace").count("Receiving: train message") >= 2

        try:
            _wait_for(second_task_received, RUN_TIMEOUT, "node 1 never got its round-2 task")
            fed.stop_node(1)  # mid-round: its ClientApp is still importing / training
            fed.start_node(1)
        finally:
            worker.join(timeout=RUN_TIMEOUT)
        assert not worker.is_alive() and result.get("rc") == 0
    r = rows(run_dir)
    assert [(x["round"], x["accepted"], x["failed"]) for x in r[1:]] == [(1, 2, 0), (2, 1, 1),
                                                                         (3, 2, 0)]

    real = FedKSeedDevice.round
    dropped = client_seed(0, 2, 1)

    def device_stops(self, model, payload, examples, round_, seed):
        if seed == dropped:
            raise RuntimeError("device stopped")
        return real(self, model, payload, examples, round_, seed)

    monkeypatch.setattr(FedKSeedDevice, "round", device_stops)
    same = tmp_path / "inprocess"
    runner.run(config(*extra), same, progress=False)
    assert comparable(same) == comparable(run_dir)
    assert model_hash(same) == model_hash(run_dir)


def test_simulation_engine_matches_inprocess(tmp_path, inprocess):
    """Flower's simulation engine (a SuperLink with --simulation, virtual SuperNodes on Ray)."""
    with LocalFederation(tmp_path / "fed", 2, simulation=True) as fed:
        deploy(fed, config(), tmp_path / "run")
    assert_same_run(inprocess, tmp_path / "run")


def test_superlink_restart_resumes_from_last_completed_round(tmp_path):
    """The SuperLink (and with it the ServerApp) is stopped after round 1 and started again;
    the same submission resumes after round 1 and ends with the straight run's model."""
    extra = ("federation.rounds=3",)
    straight = tmp_path / "straight"
    runner.run(config(*extra), straight, progress=False)
    run_dir = tmp_path / "run"
    text = tomli_w.dumps(config(*extra).to_dict())
    with LocalFederation(tmp_path / "fed", 2) as fed:
        worker = threading.Thread(target=fed.submit, args=(text, run_dir),
                                  kwargs={"timeout": RUN_TIMEOUT})
        worker.start()
        ckpt = run_dir / "checkpoint" / "engine.json"
        try:
            _wait_for(ckpt.is_file, RUN_TIMEOUT, "round 1 never completed")
            fed.stop_link()
        finally:
            worker.join(timeout=RUN_TIMEOUT)
        assert not (run_dir / "summary.json").exists()
        done = json.loads(ckpt.read_text())["round"]
        assert done < 3
        fed.start_link()
        deploy(fed, config(*extra), run_dir)
    assert "resuming" in (run_dir / "run.log").read_text()
    assert comparable(straight) == comparable(run_dir)
    assert model_hash(straight) == model_hash(run_dir)


def test_secure_aggregation_over_real_superlink_and_supernodes(tmp_path):
    """SecAgg+ between real processes (the mod's state lives in each node's context between
    Flower's four messages): the same accumulators as in process within the quantisation."""
    from fedtune.federation.secagg import params_of

    plain = config("algorithm.weighting=equal")
    runner.run(plain, tmp_path / "inprocess", progress=False)
    cfg = config("algorithm.weighting=equal", "federation.secure_aggregation=true")
    with LocalFederation(tmp_path / "fed", 2) as fed:
        deploy(fed, cfg, tmp_path / "run")
    r = rows(tmp_path / "run")
    assert [x["accepted"] for x in r[1:]] == [2, 2]
    want, got = (json.loads((d / "fedkseed_seeds.json").read_text())["accumulators"]
                 for d in (tmp_path / "inprocess", tmp_path / "run"))
    # round 1 within the quantisation; round 2's devices start from a model that differs by it
    bound = 2 * params_of(cfg).error([1, 1])
    assert any(got) and max(abs(a - b) for a, b in zip(want, got, strict=True)) <= bound
