"""Quality at equal rounds: Rouge-L before and after for FedKSeed, FedKSeed-Pro and the
baselines of the FedKSeed paper's comparison (FedMeZO, FedZO, FedIT, FedAvg, FedPrompt,
FedPTuning).

    python -m bench.quality [--json] [--rounds 5] [--model fedtune/base_models/small]
    python -m bench.quality --model smollm2-135m --json     the real model (settings: REAL)

The Dolly protocol of the FedKSeed paper, scaled to a 2-core CPU: summarization held out for
evaluation, the other categories over 200 clients by Dirichlet(0.5), the same clients sampled in
every method's round (same federation seed), the same eval subset, greedy decoding, Rouge-L F.
Every method runs through ``fedtune.runner.run`` exactly as ``fedtune run`` would, from the same
base model; the per-method settings are in ``METHODS`` below (the zeroth-order methods take
their paper's batch size 1 and many more, cheaper, steps than the backprop baseline). The
settings of FedZO, FedPrompt and FedPTuning are untuned first choices (see the comments).
Needs ``../shared/data/dolly`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.config import load_config
from fedtune.runner import run

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "databricks-dolly-15k.jsonl.gz"
NI = ROOT.parent / "shared" / "data" / "natural-instructions"

PROTOCOL = [
    "data.format=dolly", "data.heldout_category=summarization", "data.partition=dirichlet",
    "data.num_clients=200", "data.alpha=0.5", "data.max_length=256",
    "output.plots=false", "output.save_model=false", "output.checkpoint=false",
    "evaluation.loss_interval=0", "evaluation.rouge_interval=0",
]

# Natural Instructions as the paper samples it (configs/ni-fedkseed.toml): one client per train
# task present here (57), evaluation on the test tasks.
PROTOCOL_NI = [
    "data.format=natural-instructions", f"data.path={json.dumps(str(NI))}",
    "data.partition=natural", "data.num_clients=57", "data.max_length=512",
    "output.plots=false", "output.save_model=false", "output.checkpoint=false",
    "evaluation.loss_interval=0", "evaluation.rouge_interval=0",
]
PROTOCOLS = {"dolly": "dolly-15k, summarization held out, 200 clients, Dirichlet 0.5",
             "ni": "natural instructions (the part in ../shared/data), one client per train "
                   "task (57), the test tasks evaluated"}

METHODS: dict[str, list[str]] = {
    "fedkseed": ["algorithm.name=fedkseed", "algorithm.fedkseed.k_seeds=1024",
                 "algorithm.fedkseed.tau=50", "algorithm.fedkseed.lr=1e-4"],
    "fedkseed-pro": ["algorithm.name=fedkseed-pro", "algorithm.fedkseed.k_seeds=1024",
                     "algorithm.fedkseed.tau=50", "algorithm.fedkseed.lr=1e-4"],
    "fedmezo": ["algorithm.name=fedmezo", "algorithm.fedmezo.tau=50",
                "algorithm.fedmezo.batch_size=1"],
    # untuned: FedKSeed's steps and lr (both are full-parameter ZO-SGD), fresh seeds
    "fedzo": ["algorithm.name=fedzo", "algorithm.fedzo.tau=50", "algorithm.fedzo.batch_size=1",
              "algorithm.fedzo.lr=1e-4"],
    "fedit": ["algorithm.name=fedit", "algorithm.local_steps=10", "algorithm.batch_size=4",
              "algorithm.lr=3e-4"],
    "fedavg": ["algorithm.name=fedavg", "algorithm.local_steps=10", "algorithm.batch_size=4",
               "algorithm.lr=1e-4"],
    # untuned: 20 virtual tokens (the default), AdamW (the default optimizer) at the usual
    # prompt-tuning lr (peft's prompt-tuning example: 3e-2) and P-tuning's MLP encoder at 1e-3
    "fedprompt": ["algorithm.name=fedprompt", "algorithm.local_steps=10",
                  "algorithm.batch_size=4", "algorithm.optimizer=adamw", "algorithm.lr=3e-2"],
    "fedptuning": ["algorithm.name=fedptuning", "algorithm.local_steps=10",
                   "algorithm.batch_size=4", "algorithm.optimizer=adamw", "algorithm.lr=1e-3"],
}

# The real model (SmolLM2-135M-Instruct, a chat template): FedKSeed's lr from the quick start's
# search on the generated suite (BENCHMARKS.md: 1e-5 moved little, 3e-5 no better than 2e-5),
# batch 4 like the quick start; the backprop baselines at learning rates usual for a 135M model
# (LoRA 3e-4, full fine-tuning 1e-5); FedMeZO at MeZO's LoRA range. Untuned: FedZO at
# FedKSeed's steps, batch and lr (both full-parameter ZO-SGD; FedZO sends the full model both
# ways, ~540 MB per client and direction here), the prompt methods with AdamW at the usual
# prompt-tuning lr (soft prompt 3e-2, P-tuning's MLP encoder 1e-3), 20 virtual tokens.
REAL: dict[str, list[str]] = {
    "fedkseed": ["algorithm.name=fedkseed", "algorithm.fedkseed.k_seeds=1024",
                 "algorithm.fedkseed.tau=20", "algorithm.fedkseed.batch_size=4",
                 "algorithm.fedkseed.lr=2e-5"],
    "fedkseed-pro": ["algorithm.name=fedkseed-pro", "algorithm.fedkseed.k_seeds=1024",
                     "algorithm.fedkseed.tau=20", "algorithm.fedkseed.batch_size=4",
                     "algorithm.fedkseed.lr=2e-5"],
    "fedit": ["algorithm.name=fedit", "algorithm.local_steps=10", "algorithm.batch_size=4",
              "algorithm.lr=3e-4"],
    "fedavg": ["algorithm.name=fedavg", "algorithm.local_steps=10", "algorithm.batch_size=4",
               "algorithm.lr=1e-5"],
    # FedKSeed's other z at the same settings (bytes identical: seeds and scalars): generator 1
    # and low-rank perturbations U V^T / sqrt(r) (unit variance per entry, so the same lr)
    "fedkseed-v1": ["algorithm.name=fedkseed", "algorithm.fedkseed.k_seeds=1024",
                    "algorithm.fedkseed.tau=20", "algorithm.fedkseed.batch_size=4",
                    "algorithm.fedkseed.lr=2e-5", "algorithm.fedkseed.generator=1"],
    **{f"fedkseed-lowrank-r{r}": [
        "algorithm.name=fedkseed", "algorithm.fedkseed.k_seeds=1024", "algorithm.fedkseed.tau=20",
        "algorithm.fedkseed.batch_size=4", "algorithm.fedkseed.lr=2e-5",
        "algorithm.fedkseed.perturbation=lowrank", f"algorithm.fedkseed.rank={r}"]
       for r in (1, 4, 16)},
    "fedmezo": ["algorithm.name=fedmezo", "algorithm.fedmezo.tau=20",
                "algorithm.fedmezo.batch_size=4", "algorithm.fedmezo.lr=1e-3"],
    "fedzo": ["algorithm.name=fedzo", "algorithm.fedzo.tau=20", "algorithm.fedzo.batch_size=4",
              "algorithm.fedzo.lr=2e-5"],
    "fedprompt": ["algorithm.name=fedprompt", "algorithm.local_steps=10",
                  "algorithm.batch_size=4", "algorithm.optimizer=adamw", "algorithm.lr=3e-2"],
    "fedptuning": ["algorithm.name=fedptuning", "algorithm.local_steps=10",
                   "algorithm.batch_size=4", "algorithm.optimizer=adamw", "algorithm.lr=1e-3"],
}


def quality(model: str, rounds: int, clients_per_round: int, eval_examples: int,
            max_new_tokens: int, methods: list[str] | None = None,
            extra: list[str] | None = None, progress: bool = False,
            data: str = "dolly") -> dict[str, Any]:
    """Run every method on the protocol; {method: Rouge-L and eval loss before/after, bytes}."""
    source = DOLLY if data == "dolly" else NI
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: the quality benchmark needs it")
    protocol = (PROTOCOL + [f"data.path={json.dumps(str(DOLLY))}"] if data == "dolly"
                else PROTOCOL_NI)
    common = protocol + [
        f"model.path={json.dumps(model)}",
        f"federation.rounds={rounds}", f"federation.clients_per_round={clients_per_round}",
        f"evaluation.max_examples={eval_examples}", f"evaluation.max_new_tokens={max_new_tokens}",
    ] + (extra or [])
    out: dict[str, Any] = {}
    table = REAL if model == "smollm2-135m" else METHODS
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods or list(table):
            cfg = load_config(None, common + table[name])
            t0 = time.perf_counter()
            s = run(cfg, Path(tmp) / name, progress=False)
            rows = [json.loads(line) for line in
                    (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            trained = [r for r in rows if r["round"] > 0]
            out[name] = {"rougeL_before": s["base"]["rougeL"], "rougeL_after": s["final"]["rougeL"],
                         "eval_loss_before": s["base"]["eval_loss"],
                         "eval_loss_after": s["final"]["eval_loss"],
                         "bytes_per_client_round": s["bytes"]["up_per_client_round"]
                         + s["bytes"]["down_per_client_round"],
                         "bytes_up_per_client_round": s["bytes"]["up_per_client_round"],
                         "bytes_down_per_client_round": s["bytes"]["down_per_client_round"],
                         "round_wall_s": sum(r["wall_s"] for r in trained) / len(trained),
                         "peak_memory_mb": s["peak_memory_mb"],
                         "wall_s": time.perf_counter() - t0,
                         "settings": table[name]}
            if progress:
                print(f"{name}: {out[name]}", file=sys.stderr, flush=True)
    return {"protocol": {"data": PROTOCOLS[data], "extra": extra or [],
                         "model": model, "rounds": rounds, "clients_per_round": clients_per_round,
                         "eval_examples": eval_examples, "max_new_tokens": max_new_tokens},
            "methods": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--model", default=str(ROOT / "fedtune" / "base_models" / "small"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients-per-round", type=int, default=5)
    ap.add_argument("--eval-examples", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", default="",
                    help="comma-separated (default: every method of the model's table)")
    ap.add_argument("--data", choices=sorted(PROTOCOLS), default="dolly",
                    help="the protocol: Dolly-15k (default) or Natural Instructions")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every method (e.g. data.max_length=512)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = quality(args.model, args.rounds, args.clients_per_round, args.eval_examples,
                args.max_new_tokens, args.methods.split(",") if args.methods else None,
                args.extra, progress=True, data=args.data)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{'method':<14} {'Rouge-L before':>14} {'after':>8} {'loss before':>11} "
              f"{'after':>8} {'B/client/round':>14} {'wall s':>7}")
        for name, m in r["methods"].items():
            print(f"{name:<14} {m['rougeL_before']:>14.4f} {m['rougeL_after']:>8.4f} "
                  f"{m['eval_loss_before']:>11.4f} {m['eval_loss_after']:>8.4f} "
                  f"{m['bytes_per_client_round']:>14.0f} {m['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
