"""FedPT against tuning the large model directly: quality (gap closed) and device cost.

    python -m bench.fedpt [--json] [--quick] [--data dolly|generated] [--rounds 5]

Arms, on the same data, the same clients sampled each round (same federation seed), the same
eval subset and greedy decoding (Rouge-L F):

* ``direct``: FedIT (LoRA) on the large base model; its round 0 is the base large model;
* ``fedpt``: FedPT, FedIT devices on the small base model, the large one behind
  ``fedtune serve-logits`` (started by the run), distillation each round; scored as the
  proxy-tuned large model, plus the tuned small model alone (``small_rougeL``);
* ``fedpt-fedkseed``: FedPT with FedKSeed devices (no distillation: see the FedPT docs).

Gap closed = (Rouge-L of FedPT − base large) / (direct − base large). Device cost per client and
round: bytes up + down (from the runs), and one local round measured in a fresh process per arm
(``--device-cost ARM``): wall time of ``client_round`` and the peak RSS (VmHWM, reset just before
the model is loaded) above the RSS at that moment: the model, its training state, activations and
the allocator's working memory on CPU; imports and the data do not count.
Dolly needs ``../shared/data/dolly`` beside the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "databricks-dolly-15k.jsonl.gz"

DATA = {
    "dolly": ["data.format=dolly", f"data.path={json.dumps(str(DOLLY))}",
              "data.heldout_category=summarization", "data.partition=dirichlet",
              "data.num_clients=200", "data.alpha=0.5", "data.max_length=256"],
    "generated": ["data.format=generated", "data.generated_per_family=40",
                  "data.heldout_categories=[]", "data.partition=dirichlet",
                  "data.num_clients=20", "data.alpha=0.5", "data.max_length=128"],
}
COMMON = ["output.plots=false", "output.checkpoint=false", "evaluation.loss_interval=0",
          "evaluation.rouge_interval=0"]
FEDIT = ["algorithm.local_steps=10", "algorithm.batch_size=4", "algorithm.lr=1e-3",
         "algorithm.lora.r=8", "algorithm.lora.alpha=16"]
ARMS: dict[str, list[str]] = {
    "direct": ["algorithm.name=fedit", "model.path=large"] + FEDIT,
    "fedpt": ["algorithm.name=fedpt", "model.path=small", "algorithm.fedpt.large_model=large",
              "algorithm.fedpt.device_trainer=fedit", "algorithm.fedpt.distill_prompts=64",
              "algorithm.fedpt.distill_steps=16"] + FEDIT,
    "fedpt-fedkseed": ["algorithm.name=fedpt", "model.path=small",
                       "algorithm.fedpt.large_model=large",
                       "algorithm.fedpt.device_trainer=fedkseed",
                       "algorithm.fedkseed.k_seeds=1024", "algorithm.fedkseed.tau=50",
                       "algorithm.fedkseed.lr=1e-4", "algorithm.fedkseed.batch_size=1"],
}


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory figure (VmRSS, VmHWM: the peak RSS), MB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Start VmHWM over from the current RSS (Linux >= 4.0: ``clear_refs`` value 5), so the peak
    measured next belongs to what runs after this call, not to imports or data building."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def device_cost(arm: str, overrides: list[str]) -> dict[str, Any]:
    """One local round of ``arm``'s device side on client 0, in this (fresh) process."""
    import torch  # noqa: F401 (imports first: their memory is not the device's model)

    from fedtune.algorithms import build_algorithm
    from fedtune.config import load_config
    from fedtune.data.pipeline import build_federated_data
    from fedtune.data.prompts import tokenize_records
    from fedtune.models.loading import load_model_and_tokenizer

    cfg = load_config(None, overrides + ARMS[arm])
    data = build_federated_data(cfg.data)
    _reset_peak_rss()
    rss0 = _status_mb("VmRSS")
    model, tok = load_model_and_tokenizer(cfg.model.path, "float32", "cpu")
    acfg = cfg.algorithm
    if acfg.name == "fedpt":  # the device runs only the device trainer on the small model
        acfg = dataclasses.replace(acfg, name=acfg.fedpt.device_trainer)
    alg = build_algorithm(acfg, int(tok.pad_token_id))
    model = alg.prepare(model)
    examples = next(e for e in (tokenize_records(c, tok, cfg.data.max_length, quiet=True)
                                for c in data.clients) if e)
    alg.begin_round(1)
    down = alg.download(1, 0)
    t0 = time.perf_counter()
    up = alg.client_round(model, down, examples, 1, seed=0)
    wall = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"arm": arm, "local_round_s": wall, "peak_rss_mb": peak,
            "device_mb": peak - rss0, "bytes_down": len(down), "bytes_up": len(up),
            "model_params": params}


def _cost_in_subprocess(arm: str, overrides: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.fedpt", "--device-cost", arm,
                          "--overrides", json.dumps(overrides)], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def bench(data: str, rounds: int, clients_per_round: int, eval_examples: int,
          max_new_tokens: int, arms: list[str]) -> dict[str, Any]:
    from fedtune.config import load_config
    from fedtune.metrics import read_metrics
    from fedtune.runner import run

    if data == "dolly" and not DOLLY.is_file():
        raise FileNotFoundError(f"{DOLLY} is missing: the Dolly benchmark needs Dolly-15k")
    common = DATA[data] + COMMON + [
        f"federation.rounds={rounds}", f"federation.clients_per_round={clients_per_round}",
        f"evaluation.max_examples={eval_examples}", f"evaluation.max_new_tokens={max_new_tokens}"]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            cfg = load_config(None, common + ARMS[arm])
            t0 = time.perf_counter()
            s = run(cfg, Path(tmp) / arm, progress=False)
            rows = read_metrics(Path(tmp) / arm / "metrics.jsonl")
            distill_log = Path(tmp) / arm / "fedpt_distill.json"
            out[arm] = {
                "rougeL_round0": s["base"]["rougeL"], "rougeL_final": s["final"]["rougeL"],
                "small_rougeL_round0": rows[0].get("small_rougeL"),
                "small_rougeL_final": rows[-1].get("small_rougeL"),
                "bytes_up_per_client_round": s["bytes"]["up_per_client_round"],
                "bytes_down_per_client_round": s["bytes"]["down_per_client_round"],
                "run_wall_s": time.perf_counter() - t0,
                "distillation": json.loads(distill_log.read_text())
                if distill_log.is_file() else None,
                "settings": ARMS[arm]}
            out[arm]["device"] = _cost_in_subprocess(arm, common)
    return summarise({"data": data, "rounds": rounds, "clients_per_round": clients_per_round,
                      "eval_examples": eval_examples, "max_new_tokens": max_new_tokens}, out)


def summarise(protocol: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The arms' figures plus Rouge-L side by side and the share of the gap closed."""
    result: dict[str, Any] = {"protocol": protocol, "arms": out}
    if "direct" in out:
        base = out["direct"]["rougeL_round0"]
        direct = out["direct"]["rougeL_final"]
        result["rougeL"] = {"base_large": base, "direct_large_fedit": direct}
        for arm in ("fedpt", "fedpt-fedkseed"):
            if arm in out:
                got = out[arm]["rougeL_final"]
                result["rougeL"][arm] = got
                result["rougeL"][f"{arm}_small"] = out[arm]["small_rougeL_final"]
                result.setdefault("gap_closed", {})[arm] = (
                    (got - base) / (direct - base) if direct - base > 0 else None)
    return result


def _parallel(args: argparse.Namespace) -> dict[str, Any]:
    procs = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, "-m", "bench.fedpt", "--json", "--data", args.data, "--arms", arm,
               "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
               "--eval-examples", str(args.eval_examples),
               "--max-new-tokens", str(args.max_new_tokens)]
        procs[arm] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out: dict[str, Any] = {}
    protocol: dict[str, Any] = {}
    for arm, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"arm {arm} failed with exit status {proc.returncode}")
        part = json.loads(stdout)
        protocol = part["protocol"]
        out.update(part["arms"])
    return summarise(protocol, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fedpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: 2 rounds of 3 clients, 20 eval examples, 24 tokens")
    ap.add_argument("--data", choices=list(DATA), default="dolly")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients-per-round", type=int, default=5)
    ap.add_argument("--eval-examples", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--parallel", action="store_true",
                    help="run each arm in its own process at the same time (same figures; "
                         "the wall and device times then share the cores)")
    ap.add_argument("--device-cost", metavar="ARM", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device_cost:
        print(json.dumps(device_cost(args.device_cost, json.loads(args.overrides))))
        return 0
    if args.quick:
        args.rounds, args.clients_per_round, args.eval_examples, args.max_new_tokens = 2, 3, 20, 24
    if args.parallel:
        r = _parallel(args)
    else:
        r = bench(args.data, args.rounds, args.clients_per_round, args.eval_examples,
                  args.max_new_tokens, args.arms.split(","))
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    for name, v in r.get("rougeL", {}).items():
        print(f"Rouge-L {name:<22} {v if v is None else round(v, 4)}")
    for name, v in r.get("gap_closed", {}).items():
        print(f"gap closed {name:<19} {v if v is None else round(v, 3)}")
    for name, a in r["arms"].items():
        d = a["device"]
        print(f"{name:<15} up {a['bytes_up_per_client_round']:>10.0f} B  down "
              f"{a['bytes_down_per_client_round']:>10.0f} B  local round {d['local_round_s']:.2f}"
              f" s  device memory {d['device_mb']:.0f} MB  run {a['run_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
