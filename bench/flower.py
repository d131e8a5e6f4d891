"""Flower benchmark: the same config in process and on Flower's engines, side by side.

    python -m bench.flower            a readable table
    python -m bench.flower --json     the figures as one JSON object
    python -m bench.flower --quick    one algorithm, 2 rounds (smoke test, about 2 minutes)

For each algorithm (FedKSeed K=1024, tau=20; FedIT LoRA r=8) on the embedded small base model
(2.1M parameters), generated data, 3 clients, all 3 sampled every round, 3 rounds, it runs:

* ``inprocess``: :func:`fedtune.runner.run` with the in-process engine;
* ``deployment``: one ``flower-superlink`` and 3 ``flower-supernode`` processes on 127.0.0.1
  (insecure), :class:`fedtune.federation.flower.local.LocalFederation`;
* ``simulation`` (FedKSeed only): Flower's simulation engine (a ``--simulation`` SuperLink, Ray).

Reported per run: the start-up of the local federation (``startup_s``: SuperLink listening and
SuperNode processes spawned; ``nodes_online_s``: until the SuperLink lists every SuperNode as
online, measured with ``flwr supernode list``, whose own call takes a second or two), per-round wall
time (round 1, which includes each node building its cache, and the median of the later rounds),
the whole ``flwr run`` submission, the algorithm's payload bytes per client per round (up and
down; they must be equal across engines), whether the final model is the same file, and the size
of a Flower task message around a payload (Flower's framing plus fedtune's metadata).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

BASE_SMALL = Path(__file__).resolve().parents[1] / "fedtune" / "base_models" / "small"


def overrides(algorithm: str, rounds: int) -> list[str]:
    common = [f"federation.rounds={rounds}", "federation.clients_per_round=3",
              "data.num_clients=3", "data.generated_per_family=20", f"model.path={BASE_SMALL}",
              "evaluation.max_examples=8", "evaluation.max_new_tokens=8",
              "evaluation.rouge_interval=0", "evaluation.loss_interval=1",
              "output.plots=false", "federation.node_wait_s=120",
              "federation.reply_timeout_s=600", f"algorithm.name={algorithm}"]
    if algorithm == "fedkseed":
        common += ["algorithm.fedkseed.k_seeds=1024", "algorithm.fedkseed.tau=20"]
    return common


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_hash(run_dir: Path) -> str:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def summarise(run_dir: Path) -> dict[str, Any]:
    r = [x for x in rows(run_dir) if x["round"] > 0]
    return {
        "round1_s": r[0]["wall_s"],
        "later_rounds_median_s": statistics.median(x["wall_s"] for x in r[1:]) if r[1:] else None,
        "bytes_up_per_client": [x["bytes_up_per_client"] for x in r],
        "bytes_down_per_client": [x["bytes_down_per_client"] for x in r],
        "train_loss": [x["train_loss"] for x in r],
        "model_sha256": model_hash(run_dir)[:16],
    }


def framing(payload_bytes: int, config_text: str) -> dict[str, int]:
    """Serialized size of a train task around a payload: with the config, then with its hash."""
    from flwr.common.serde import recorddict_to_proto

    from fedtune.federation.flower.messages import Task
    from fedtune.federation.flower.node import config_sha256

    def size(text: str) -> int:
        task = Task(2, 1, 123456789, config_sha256(config_text), text, bytes(payload_bytes))
        return int(recorddict_to_proto(task.content()).ByteSize())

    return {"payload": payload_bytes, "task_with_config": size(config_text),
            "task_with_hash": size("")}


def run_engine(engine: str, algorithm: str, rounds: int, work: Path) -> dict[str, Any]:
    import tomli_w

    from fedtune import runner
    from fedtune.config import load_config
    from fedtune.federation.flower.local import LocalFederation

    cfg = load_config(None, overrides(algorithm, rounds))
    run_dir = work / f"{algorithm}-{engine}"
    t0 = time.perf_counter()
    out: dict[str, Any] = {"engine": engine, "algorithm": algorithm}
    if engine == "inprocess":
        runner.run(cfg, run_dir, progress=False)
    else:
        text = tomli_w.dumps(cfg.to_dict())
        with LocalFederation(work / f"{algorithm}-{engine}-fed", 3,
                             simulation=engine == "simulation") as fed:
            out["startup_s"] = fed.startup_s
            if engine == "deployment":
                out["nodes_online_s"] = fed.wait_online()
            t1 = time.perf_counter()
            rc = fed.submit(text, run_dir, timeout=1800)
            out["submit_s"] = time.perf_counter() - t1
        if rc != 0 or not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"{engine} run of {algorithm} failed (rc {rc}); see {fed.work}")
        out["framing"] = framing(int(rows(run_dir)[-1]["bytes_down_per_client"]), text)
    out["total_s"] = time.perf_counter() - t0
    out.update(summarise(run_dir))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="FedKSeed only, 2 rounds")
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rounds = 2 if args.quick else 3
    plan = [("fedkseed", e) for e in ("inprocess", "deployment", "simulation")]
    if not args.quick:
        plan += [("fedit", e) for e in ("inprocess", "deployment")]
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        results = [run_engine(engine, alg, rounds, work) for alg, engine in plan]
    for alg in {r["algorithm"] for r in results}:
        mine = [r for r in results if r["algorithm"] == alg]
        for key in ("bytes_up_per_client", "bytes_down_per_client", "model_sha256"):
            if len({json.dumps(r[key]) for r in mine}) != 1:
                print(f"bench.flower: {alg}: {key} differs between engines", file=sys.stderr)
    report = {"date": date.today().isoformat(), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "rounds": rounds, "clients": 3,
              "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'algorithm':<9} {'engine':<11} {'start-up':>8} {'round 1':>8} {'later':>7} "
          f"{'run':>7} {'up B/client':>11} {'down B/client':>13} model")
    for r in results:
        later, whole = r["later_rounds_median_s"] or 0, r.get("submit_s", r["total_s"])
        print(f"{r['algorithm']:<9} {r['engine']:<11} {r.get('startup_s', 0):>7.1f}s "
              f"{r['round1_s']:>7.1f}s {later:>6.1f}s {whole:>6.1f}s "
              f"{r['bytes_up_per_client'][0]:>11,.0f} {r['bytes_down_per_client'][0]:>13,.0f} "
              f"{r['model_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
