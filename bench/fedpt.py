"""FedPT against tuning the large model directly: quality (gap closed) and device cost.

    python -m bench.fedpt [--json] [--quick] [--parallel] [--data generated|dolly] [--arms ...]

Arms, on the same data, the same clients sampled each round (same federation seed), the same
eval subset and greedy decoding (Rouge-L F):

* ``direct``: FedIT (LoRA) on the large base model; its round 0 is the base large model;
* ``fedpt``: FedPT, FedIT devices on the small base model, the large one behind
  ``fedtune serve-logits`` (started by the run), distillation each round; scored as the
  proxy-tuned large model, plus the tuned small model alone (``small_rougeL``);
* ``fedpt-fedkseed``: FedPT with FedKSeed devices (zeroth-order distillation on the server);
* ``direct-fedavg`` and ``fedpt-fedavg``: the same pair with full fine-tuning (FedAvg) instead
  of LoRA, on the large model directly and as FedPT's device trainer;
* ``*-nodistill``: FedPT without the distillation step (the ablation).

Each FedPT arm is compared with the direct tuning by the same device trainer (FedKSeed devices
with direct FedIT). Gap closed = (Rouge-L of FedPT − base large) / (direct − base large); the
same on the eval loss. Device cost per client and round: bytes up + down (from the runs), and
one local round measured in a fresh process per arm (``--device-cost ARM``): wall time of the
device half's ``round`` and the peak RSS (VmHWM, reset just before the model is loaded) above
the RSS at that moment: the model, its training state, activations and the allocator's working
memory on CPU (the server half built beside it, as in process); imports and the data do not
count.
Dolly needs ``../shared/data/dolly`` beside the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "databricks-dolly-15k.jsonl.gz"
NI = ROOT.parent / "shared" / "data" / "natural-instructions"
log = logging.getLogger("bench.fedpt")

DATA = {
    "dolly": ["data.format=dolly", f"data.path={json.dumps(str(DOLLY))}",
              "data.heldout_category=summarization", "data.partition=dirichlet",
              "data.num_clients=200", "data.alpha=0.5", "data.max_length=256"],
    # Natural Instructions as configs/ni-fedit.toml splits it: a task per client, the held-out
    # tasks' test instances for evaluation
    "ni": ["data.format=natural-instructions", f"data.path={json.dumps(str(NI))}",
           "data.partition=natural", "data.max_length=256"],
    "generated": ["data.format=generated", "data.generated_per_family=40",
                  "data.heldout_categories=[]", "data.partition=dirichlet",
                  "data.num_clients=20", "data.alpha=0.5", "data.max_length=128"],
}
COMMON = ["output.plots=false", "output.checkpoint=false", "evaluation.loss_interval=0",
          "evaluation.rouge_interval=0"]
# Local training, the same for a device trainer whichever model it tunes. LoRA is wider than
# FedIT's q, v at r 8: on these 2-8M models that LoRA learns too slowly for 10 rounds (a probe
# of 5 rounds x 3 clients x 20 steps at lr 3e-3: eval loss 9.49 -> 5.57, Rouge-L 0), so every
# linear layer and the output head get r 32.
FEDIT = ["algorithm.local_steps=30", "algorithm.batch_size=4", "algorithm.lr=5e-3",
         "algorithm.lora.r=32", "algorithm.lora.alpha=64",
         'algorithm.lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj",'
         '"up_proj","down_proj","lm_head"]']
FEDAVG = ["algorithm.local_steps=30", "algorithm.batch_size=4", "algorithm.lr=1e-3"]
FEDKSEED = ["algorithm.fedkseed.k_seeds=1024", "algorithm.fedkseed.tau=75",
            "algorithm.fedkseed.batch_size=4", "algorithm.fedkseed.lr=2e-4",
            "algorithm.fedkseed.zo_eps=5e-4", "algorithm.fedkseed.keep_z=true"]
# the pairs: (small partner, black-box large model)
PAIRS = {"tiny": ("small", "large"), "real": ("smollm2-partner", "smollm2-135m")}
# On the real pair one setting per device trainer for both models, so that FedPT and the direct
# tuning it is measured against differ only in the model tuned: LoRA r 16 on every linear layer
# of the blocks (not the tied head), lr 1e-3; full tuning at lr 1e-5 (SmolLM2's own fine-tuning
# scale); FedKSeed at the quick start's settings.
REAL_TRAINING = {
    "fedit": ["algorithm.local_steps=10", "algorithm.batch_size=4", "algorithm.lr=1e-3",
              "algorithm.lora.r=16", "algorithm.lora.alpha=32",
              'algorithm.lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj",'
              '"up_proj","down_proj"]'],
    "fedavg": ["algorithm.local_steps=10", "algorithm.batch_size=4", "algorithm.lr=1e-5"],
    "fedkseed": ["algorithm.fedkseed.k_seeds=1024", "algorithm.fedkseed.tau=20",
                 "algorithm.fedkseed.batch_size=4", "algorithm.fedkseed.lr=3e-5",
                 "algorithm.fedkseed.zo_eps=5e-4", "algorithm.fedkseed.keep_z=true"],
}
TINY_TRAINING = {"fedit": FEDIT, "fedavg": FEDAVG, "fedkseed": FEDKSEED}
NO_DISTILL = ["algorithm.fedpt.distill=false"]
PAPER_ANTI = ["algorithm.fedpt.anti_expert=base"]  # the paper's: the base small model throughout
DISTILLED_ANTI = ["algorithm.fedpt.anti_expert=distilled"]


def arms(pair: str = "tiny") -> dict[str, list[str]]:
    """Each arm's settings on ``pair``."""
    small, large = PAIRS[pair]
    train = REAL_TRAINING if pair == "real" else TINY_TRAINING
    fedpt = ["algorithm.name=fedpt", f"model.path={small}",
             f"algorithm.fedpt.large_model={large}", "algorithm.fedpt.distill_prompts=64",
             "algorithm.fedpt.distill_steps=16"]

    def pt(trainer: str) -> list[str]:
        return fedpt + [f"algorithm.fedpt.device_trainer={trainer}"] + train[trainer]

    return {
        "direct": ["algorithm.name=fedit", f"model.path={large}"] + train["fedit"],
        "fedpt": pt("fedit"),
        "fedpt-nodistill": pt("fedit") + NO_DISTILL,
        "fedpt-paper": pt("fedit") + PAPER_ANTI,
        "fedpt-anti": pt("fedit") + DISTILLED_ANTI,
        "fedpt-fedkseed": pt("fedkseed"),
        "direct-fedavg": ["algorithm.name=fedavg", f"model.path={large}"] + train["fedavg"],
        "fedpt-fedavg": pt("fedavg"),
        "fedpt-fedavg-nodistill": pt("fedavg") + NO_DISTILL,
        "small": ["algorithm.name=fedit", f"model.path={small}"] + train["fedit"],
    }


ARMS = arms()
REAL_ARMS = ("direct", "fedpt-nodistill", "fedpt-paper", "fedpt-anti", "fedpt-fedavg",
             "fedpt-fedkseed")
# the direct tuning of the large model each FedPT arm is measured against
BASELINE = {"fedpt": "direct", "fedpt-nodistill": "direct", "fedpt-paper": "direct",
            "fedpt-anti": "direct", "small": "direct", "fedpt-fedkseed": "direct",
            "fedpt-fedavg": "direct-fedavg", "fedpt-fedavg-nodistill": "direct-fedavg"}


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


def device_cost(arm: str, overrides: list[str], pair: str = "tiny",
                extra: list[str] | None = None) -> dict[str, Any]:
    """One local round of ``arm``'s device side on client 0, in this (fresh) process."""
    import torch  # imports first: their memory is not the device's model

    from fedtune.algorithms import METHODS, DeviceEnv, MethodContext
    from fedtune.config import load_config
    from fedtune.data.pipeline import build_federated_data
    from fedtune.data.prompts import tokenize_records
    from fedtune.models.loading import load_model_and_tokenizer

    cfg = load_config(None, overrides + arms(pair)[arm] + (extra or []))  # as the run
    data = build_federated_data(cfg.data)
    _reset_peak_rss()
    rss0 = _status_mb("VmRSS")
    model: torch.nn.Module
    model, tok = load_model_and_tokenizer(cfg.model.path, "float32", "cpu")
    acfg = cfg.algorithm
    if acfg.name == "fedpt":  # the device runs only the device trainer on the small model
        acfg = dataclasses.replace(acfg, name=acfg.fedpt.device_trainer)
    method = METHODS[acfg.name]
    ctx = MethodContext(acfg, int(tok.pad_token_id), tok)
    model = method.prepare(ctx, model)
    # both halves in this process, as the in-process engine builds them (the server half's
    # state counts, as it always has: FedKSeed's w0 and round model are shared with the device)
    server = method.server(ctx, model)
    device = method.device(ctx, model, DeviceEnv(shared=server.device_share))
    examples = next(e for e in (tokenize_records(c, tok, cfg.data.max_length, quiet=True)
                                for c in data.clients) if e)
    server.begin_round(1)
    down = server.download(1, 0)
    t0 = time.perf_counter()
    up = device.round(model, down, examples, 1, seed=0)
    wall = time.perf_counter() - t0
    server.close()
    peak = _status_mb("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"arm": arm, "local_round_s": wall, "peak_rss_mb": peak,
            "device_mb": peak - rss0, "bytes_down": len(down), "bytes_up": len(up),
            "model_params": params}


def _cost_in_subprocess(arm: str, overrides: list[str], pair: str = "tiny",
                        extra: list[str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.fedpt", "--device-cost", arm,
                          "--pair", pair, "--overrides", json.dumps(overrides),
                          "--set", *(extra or [])],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _common(data: str, rounds: int, clients_per_round: int, eval_examples: int,
            max_new_tokens: int) -> list[str]:
    if data == "dolly" and not DOLLY.is_file():
        raise FileNotFoundError(f"{DOLLY} is missing: the Dolly benchmark needs Dolly-15k")
    if data == "ni" and not NI.is_dir():
        raise FileNotFoundError(f"{NI} is missing: the NI benchmark needs Natural Instructions")
    return DATA[data] + COMMON + [
        f"federation.rounds={rounds}", f"federation.clients_per_round={clients_per_round}",
        f"evaluation.max_examples={eval_examples}",
        f"evaluation.max_new_tokens={max_new_tokens}"]


def bench(data: str, rounds: int, clients_per_round: int, eval_examples: int,
          max_new_tokens: int, names: list[str], pair: str = "tiny",
          extra: list[str] | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Each arm a federated run; its run directory under ``keep`` (``keep/ARM``) if given, else
    in a temporary directory that goes when the benchmark ends."""
    from fedtune.config import load_config
    from fedtune.metrics import read_metrics
    from fedtune.runner import run

    common = _common(data, rounds, clients_per_round, eval_examples, max_new_tokens)
    settings = arms(pair)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = keep if keep is not None else Path(tmp)
        for arm in names:
            cfg = load_config(None, common + settings[arm] + (extra or []))
            t0 = time.perf_counter()
            s = run(cfg, root / arm, progress=False)
            rows = read_metrics(root / arm / "metrics.jsonl")
            distill_log = root / arm / "fedpt_distill.json"
            out[arm] = {
                "rougeL_round0": s["base"]["rougeL"], "rougeL_final": s["final"]["rougeL"],
                "eval_loss_round0": s["base"]["eval_loss"],
                "eval_loss_final": s["final"]["eval_loss"],
                "small_rougeL_round0": rows[0].get("small_rougeL"),
                "small_rougeL_final": rows[-1].get("small_rougeL"),
                "bytes_up_per_client_round": s["bytes"]["up_per_client_round"],
                "bytes_down_per_client_round": s["bytes"]["down_per_client_round"],
                "run_wall_s": time.perf_counter() - t0,
                "distillation": json.loads(distill_log.read_text())
                if distill_log.is_file() else None,
                "settings": settings[arm]}
            out[arm]["device"] = _cost_in_subprocess(arm, common, pair, extra)
            log.warning("arm %s: %s", arm, json.dumps({k: v for k, v in out[arm].items()
                                                       if k not in ("settings", "distillation")}))
    return summarise({"data": data, "pair": pair, "rounds": rounds,
                      "clients_per_round": clients_per_round, "eval_examples": eval_examples,
                      "max_new_tokens": max_new_tokens, "extra": extra or []}, out)


def summarise(protocol: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The arms' figures plus Rouge-L side by side and the share of the gap closed.

    gap_closed = (FedPT - base) / (direct - base) in Rouge-L (None where direct <= base);
    gap_closed_eval_loss the same on the eval loss (lower is better), which moves long before
    greedy outputs match a reference word for word.
    """
    result: dict[str, Any] = {"protocol": protocol, "arms": out, "rougeL": {},
                              "eval_loss": {}, "gap_closed": {}, "gap_closed_eval_loss": {}}
    for arm, a in out.items():
        result["rougeL"][arm] = a["rougeL_final"]
        result["eval_loss"][arm] = a["eval_loss_final"]
        if a.get("small_rougeL_final") is not None:
            result["rougeL"][f"{arm}_small"] = a["small_rougeL_final"]
    result["reference"] = {}
    for arm, ref in BASELINE.items():
        if arm in out and ref not in out and "direct" in out:
            ref = "direct"  # the upper reference: the large model tuned by FedIT
        if arm not in out or ref not in out:
            continue
        result["reference"][arm] = ref
        direct = out[ref]
        result["rougeL"]["base_large"] = direct["rougeL_round0"]
        result["eval_loss"]["base_large"] = direct["eval_loss_round0"]
        result["gap_closed"][arm] = _share(direct["rougeL_round0"], direct["rougeL_final"],
                                           out[arm]["rougeL_final"])
        result["gap_closed_eval_loss"][arm] = _share(
            -direct["eval_loss_round0"], -direct["eval_loss_final"], -out[arm]["eval_loss_final"])
    return result


def _share(base: float, direct: float, got: float) -> float | None:
    """(got - base) / (direct - base), None where direct tuning did not improve on the base."""
    return (got - base) / (direct - base) if direct - base > 0 else None


def _parallel(args: argparse.Namespace) -> dict[str, Any]:
    """Each arm in its own process, ``--jobs`` at a time, the cores split between them."""
    arms = args.arms.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    running: dict[str, subprocess.Popen[str]] = {}
    out: dict[str, Any] = {}
    protocol: dict[str, Any] = {}

    def collect(arm: str) -> None:
        stdout, _ = running[arm].communicate()
        if running.pop(arm).returncode != 0:
            raise RuntimeError(f"arm {arm} failed")
        part = json.loads(stdout)
        if args.keep:  # each arm's figures on disk as soon as it ends
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            (Path(args.keep) / f"{arm}.json").write_text(json.dumps(part, indent=1))
        protocol.update(part["protocol"])
        out.update(part["arms"])

    for arm in arms:
        while len(running) >= args.jobs:
            done = next((a for a, p in running.items() if p.poll() is not None), None)
            if done is None:
                time.sleep(1)
            else:
                collect(done)
        cmd = [sys.executable, "-m", "bench.fedpt", "--json", "--data", args.data, "--arms", arm,
               "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
               "--eval-examples", str(args.eval_examples),
               "--max-new-tokens", str(args.max_new_tokens), "--pair", args.pair,
               "--threads", str(args.threads), *(["--keep", args.keep] if args.keep else []),
               "--set", *args.set]
        running[arm] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                        env=env)
    for arm in list(running):
        collect(arm)
    return summarise(protocol, {arm: out[arm] for arm in arms})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fedpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: 2 rounds of 3 clients, 20 eval examples, 24 tokens")
    ap.add_argument("--data", choices=list(DATA), default="generated",
                    help="'generated' (default: fedtune's suite, where our base pair learns "
                         "within 10 rounds) or 'dolly' (../shared/data; our large base model is "
                         "no better than the small one there)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients-per-round", type=int, default=4)
    ap.add_argument("--eval-examples", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--pair", choices=list(PAIRS), default="tiny",
                    help="'tiny' (fedtune's books pair, 2.1M / 8.4M) or 'real' (smollm2-partner, "
                         "11.8M, under smollm2-135m, SmolLM2-135M-Instruct, behind the service)")
    ap.add_argument("--arms", default=None,
                    help=f"comma-separated, of: {', '.join(ARMS)} (default: all but 'small' on "
                         f"the tiny pair; {','.join(REAL_ARMS)} on the real one)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every arm, after the arm's own (recorded)")
    ap.add_argument("--threads", type=int, default=0,
                    help="model.threads of every run (default 0: the free cores)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the arms in their own processes, --jobs at a time (same figures; "
                         "the wall and device times then share the cores)")
    ap.add_argument("--jobs", type=int, default=2, help="with --parallel: arms at a time")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep each arm's run directory as DIR/ARM (answers.jsonl, metrics, "
                         "the exported model); with --parallel also each arm's JSON in "
                         "DIR/ARM.json as soon as it ends")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the device cost of one local round per arm, one arm at a time "
                         "(no federated runs): for timings on otherwise idle cores")
    ap.add_argument("--device-cost", metavar="ARM", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    extra = list(args.set) + ([f"model.threads={args.threads}"] if args.threads else [])
    if args.device_cost:
        print(json.dumps(device_cost(args.device_cost, json.loads(args.overrides), args.pair,
                                     extra)))
        return 0
    if args.arms is None:
        args.arms = ",".join(REAL_ARMS if args.pair == "real" else
                             [a for a in ARMS if a != "small"])
    if args.quick:
        args.rounds, args.clients_per_round, args.eval_examples, args.max_new_tokens = 2, 3, 20, 24
    if args.cost_only:
        common = _common(args.data, args.rounds, args.clients_per_round, args.eval_examples,
                         args.max_new_tokens)
        costs = {arm: _cost_in_subprocess(arm, common, args.pair, extra)
                 for arm in args.arms.split(",")}
        if args.json:
            print(json.dumps(costs, indent=1))
        else:
            for arm, d in costs.items():
                print(f"{arm:<24} local round {d['local_round_s']:6.2f} s  device memory "
                      f"{d['device_mb']:5.0f} MB  down {d['bytes_down']:>9} B  up "
                      f"{d['bytes_up']:>9} B  {d['model_params']:,} parameters")
        return 0
    if args.parallel:
        r = _parallel(args)
    else:
        r = bench(args.data, args.rounds, args.clients_per_round, args.eval_examples,
                  args.max_new_tokens, args.arms.split(","), args.pair, extra,
                  Path(args.keep) if args.keep else None)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    def fmt(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    print(f"{'arm':<24}{'Rouge-L':>9}{'small':>8}{'eval loss':>11}{'gap':>7}{'gap(loss)':>10}"
          f"{'up B':>10}{'down B':>10}{'round s':>9}{'dev MB':>8}")
    base = next((r["arms"][ref] for ref in ("direct", "direct-fedavg") if ref in r["arms"]), None)
    if base is not None:
        print(f"{'base large (round 0)':<24}{fmt(base['rougeL_round0'], 4):>9}{'':>8}"
              f"{fmt(base['eval_loss_round0'], 3):>11}")
    for name, a in r["arms"].items():
        d = a["device"]
        print(f"{name:<24}{fmt(a['rougeL_final'], 4):>9}{fmt(a.get('small_rougeL_final'), 4):>8}"
              f"{fmt(a['eval_loss_final'], 3):>11}{fmt(r['gap_closed'].get(name), 2):>7}"
              f"{fmt(r['gap_closed_eval_loss'].get(name), 2):>10}"
              f"{a['bytes_up_per_client_round']:>10.0f}{a['bytes_down_per_client_round']:>10.0f}"
              f"{d['local_round_s']:>9.2f}{d['device_mb']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
