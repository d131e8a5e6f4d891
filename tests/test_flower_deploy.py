"""Flower's deployment engine on loopback: real flower-superlink / flower-supernode processes.

The tests that only submit runs (one of them stops and restarts a SuperNode) share one insecure
SuperLink with two SuperNodes for the module, as a deployment serves run after run (their configs
differ, so no node finds another run's cache); TLS, the simulation engine and the SuperLink restart
start their own. LocalFederation starts them on free ports and stops them by process id when the
module or the test ends, pass or fail; every wait is bounded (start-up, the run, each round).
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
    "model.threads=1",  # compared runs must not round differently as the load changes
]
RUN_TIMEOUT = 600  # seconds for a whole 2-3 round run (60-120 s on 2 busy cores)
ONE_ROUND = "federation.rounds=1"


def config(*extra: str):
    return load_config(None, SMALL + list(extra))


def deploy(fed: LocalFederation, cfg, run_dir: Path) -> None:
    rc = fed.submit(tomli_w.dumps(cfg.to_dict()), run_dir, timeout=RUN_TIMEOUT)
    assert rc == 0, f"flwr run exited with {rc}; logs in {fed.work / 'logs'}"
    assert (run_dir / "summary.json").is_file(), "the ServerApp did not finish the run"


@pytest.fixture(scope="module")
def shared_federation(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("shared") / "fed", 2) as fed:
        yield fed


@pytest.fixture
def federation(shared_federation) -> LocalFederation:
    """The shared SuperLink and its two SuperNodes, each running (a process that an earlier
    test left stopped is started again)."""
    fed = shared_federation
    link = fed.procs.get("superlink")
    if link is None or link.poll() is not None:
        fed.stop_link()
        fed.start_link()
    for i in range(fed.nodes):
        node = fed.procs.get(f"node-{i}")
        if node is None or node.poll() is not None:
            fed.stop_node(i)
            fed.start_node(i)
    return fed


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


def test_loopback_two_supernodes_match_inprocess(tmp_path, inprocess, federation):
    deploy(federation, config(), tmp_path / "run")
    assert_same_run(inprocess, tmp_path / "run")
    r = rows(tmp_path / "run")
    assert [x["accepted"] for x in r[1:]] == [2, 2]
    assert all(x["bytes_up_per_client"] > 0 and x["bytes_down_per_client"] > 0 for x in r[1:])


def test_tls_and_node_authentication(tmp_path):
    """Over TLS, with SuperNode authentication, a run ends as in process (one round: the insecure
    test compares two); a SuperNode whose key was never registered is refused."""
    certs = make_certs(tmp_path / "certs", nodes=3)
    runner.run(config(ONE_ROUND), tmp_path / "inprocess", progress=False)
    with LocalFederation(tmp_path / "fed", 2, certs=certs) as fed:
        # the unregistered SuperNode starts with the run (a node let in would join it and keep
        # running: the wait below would time out)
        fed.node_ports.append(free_port())
        fed.start_node(2)
        proc = fed.procs["node-2"]
        try:
            deploy(fed, config(ONE_ROUND), tmp_path / "run")
            code = proc.wait(timeout=60)
        finally:
            fed.stop_node(2)
        assert code != 0
    assert_same_run(tmp_path / "inprocess", tmp_path / "run")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_supernode_stopped_mid_round(tmp_path, monkeypatch, federation):
    """Node 1 is stopped while it trains in round 2 and restarted at once: round 2 completes with
    node 0's reply alone (Flower reports node 1 unavailable on its heartbeat, within the reply
    time-out), round 3 has both nodes again, and the model equals an in-process run in which
    client 1 failed in round 2."""
    fed = federation
    extra = ("federation.rounds=3", "federation.reply_timeout_s=30")
    run_dir = tmp_path / "run"
    result: dict[str, int] = {}
    node_log = fed.work / "logs" / "node-1.log"  # appended to by every run on the federation
    before = node_log.stat().st_size if node_log.is_file() else 0

    def second_task_received() -> bool:
        with node_log.open("rb") as f:
            f.seek(before)
            return f.read().count(b"Receiving: train message") >= 2

    worker = threading.Thread(target=lambda: result.update(  # the run, in the background
        rc=fed.submit(tomli_w.dumps(config(*extra).to_dict()), run_dir, timeout=RUN_TIMEOUT)))
    worker.start()
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
    """The SuperLink (and with it the ServerApp) is stopped after round 1 of 2 and started again;
    the same submission resumes after round 1 and ends with the straight run's model."""
    extra = ("federation.rounds=2",)
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
        assert done < 2
        fed.start_link()
        deploy(fed, config(*extra), run_dir)
    assert "resuming" in (run_dir / "run.log").read_text()
    assert comparable(straight) == comparable(run_dir)
    assert model_hash(straight) == model_hash(run_dir)


def test_secure_aggregation_over_real_superlink_and_supernodes(tmp_path, federation):
    """SecAgg+ between real processes (the mod's state lives in each node's context between
    Flower's four messages): the same accumulators as in process within the quantisation.
    One round (each is four messages, each a ClientApp process per node); tests/test_secagg.py
    runs the same apps for two rounds over an in-process grid."""
    import numpy as np

    from fedtune.federation.secagg import params_of

    plain = config(ONE_ROUND, "algorithm.weighting=equal")
    runner.run(plain, tmp_path / "inprocess", progress=False)
    cfg = config(ONE_ROUND, "algorithm.weighting=equal", "federation.secure_aggregation=true")
    deploy(federation, cfg, tmp_path / "run")
    r = rows(tmp_path / "run")
    assert [x["accepted"] for x in r[1:]] == [2]
    want, got = (json.loads((d / "fedkseed_seeds.json").read_text())["accumulators"]
                 for d in (tmp_path / "inprocess", tmp_path / "run"))
    # the same replies, quantised (stochastic rounding: never exactly the plain mean)
    error = params_of(cfg).error([1, 1])
    ulp = 2 * float(np.finfo(np.float32).eps) * max(abs(a) for a in want)
    diff = max(abs(a - b) for a, b in zip(want, got, strict=True))
    assert any(got) and 0 < diff <= error + ulp, (diff, error)


def test_fedpt_with_the_logits_service_as_its_own_process(tmp_path, monkeypatch):
    """FedPT on the deployment engine: SuperLink and SuperNodes as processes, the large model
    behind `fedtune serve-logits` as a third kind of process with its own token, which only the
    SuperLink's environment holds (the ServerApp reads FEDTUNE_LOGITS_TOKEN; the nodes never see
    the large model). The run ends with the same proxy as in process against the same service."""
    from fedtune.logits.remote import TOKEN_ENV, LogitsServiceError
    from fedtune.logits.service import spawn_service

    root = Path(__file__).resolve().parents[1] / "fedtune" / "base_models"
    svc = spawn_service(str(root / "large"), device="cpu", threads=1, timeout=120)
    try:
        cfg = (ONE_ROUND, "algorithm.name=fedpt", "algorithm.local_steps=2",
               f"model.path={json.dumps(str(root / 'small'))}", "data.max_length=128",
               "algorithm.fedpt.large_access=url", f"algorithm.fedpt.large_url={svc.url}",
               "algorithm.fedpt.distill_prompts=4", "algorithm.fedpt.distill_steps=2",
               "algorithm.fedpt.distill_max_new_tokens=6", "algorithm.fedpt.eval_small=false")
        # without the token the FedPT server cannot start (the service refuses it)
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(LogitsServiceError) as refused:
            runner.run(config(*cfg), tmp_path / "refused", progress=False)
        assert refused.value.status == 401
        monkeypatch.setenv(TOKEN_ENV, svc.token)
        runner.run(config(*cfg), tmp_path / "inprocess", progress=False)
        with LocalFederation(tmp_path / "fed", 2) as fed:  # started with the token in its env
            deploy(fed, config(*cfg), tmp_path / "run")
    finally:
        svc.stop()
    assert svc.process.poll() is not None
    assert comparable(tmp_path / "inprocess") == comparable(tmp_path / "run")
    assert model_hash(tmp_path / "inprocess") == model_hash(tmp_path / "run")
    proxy = [json.loads((d / "proxy" / "fedpt.json").read_text())
             for d in (tmp_path / "inprocess", tmp_path / "run")]
    assert proxy[0] == proxy[1] and proxy[0]["large_url"] == svc.url
    anti = Path("proxy") / "anti_expert" / "model.safetensors"
    assert (tmp_path / "inprocess" / anti).read_bytes() == (tmp_path / "run" / anti).read_bytes()
