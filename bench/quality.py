"""The quality harness: every arm over several seeds, with spread, paired per-example tests
against the base model and between arms, and the damage guard.

    python -m bench.quality [--json] [--rounds 5] [--model fedtune/base_models/small]
    python -m bench.quality --model smollm2-135m --seeds 3 --methods fedkseed,fedit --json
    python -m bench.quality --data quickstart --seeds 3 --methods default   # the quick start

Seeds: seed i runs with ``federation.seed = i`` (client sampling, every client's batch order)
and ``algorithm.fedkseed.seed = i`` (the pool of K seeds, so every z) together; the data, its
partition and the eval subset stay fixed, so every seed answers the same eval examples and the
base model's answers are the same. Per arm the harness reports the mean, sample standard
deviation, minimum and maximum over seeds of Rouge-L, its gain, the eval loss and the damage
guard (eval loss and the share of looping answers on general instructions no run trains on,
``fedtune.eval.guard``), and a paired comparison of the answers (``fedtune.eval.stats.paired``:
wins / losses / ties and the two-sided sign-test p-value) against the base model for each seed
and for each example's mean over seeds, and between every two arms the same way. Its JSON holds
every seed's figures and per-example scores. Rouge-L by ``evaluation.rouge`` (``--set
evaluation.rouge=fedkseed`` for the FedKSeed paper's scorer).

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
from itertools import combinations
from pathlib import Path
from typing import Any

from fedtune.config import load_config
from fedtune.eval.stats import paired, spread
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
# the quick start's own data and settings (configs/quickstart.toml), method "default" = as shipped
PROTOCOL_QUICKSTART = ["output.plots=false", "output.checkpoint=false"]
PROTOCOLS = {"dolly": "dolly-15k, summarization held out, 200 clients, Dirichlet 0.5",
             "quickstart": "the quick start's generated suite and settings "
                           "(configs/quickstart.toml)",
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


def seed_overrides(seed: int) -> list[str]:
    """Seed ``seed`` of an arm: client sampling, batch order and the K-seed pool (so z) together."""
    return [f"federation.seed={seed}", f"algorithm.fedkseed.seed={seed}"]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def one_run(cfg_overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Run one arm at one seed through ``fedtune.runner.run``; its figures and per-example
    scores (eval set and guard, before and after)."""
    cfg = load_config(None, cfg_overrides)
    t0 = time.perf_counter()
    s = run(cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    rows = _jsonl(run_dir / "metrics.jsonl")
    trained = [r for r in rows if r["round"] > 0]
    answers = _jsonl(run_dir / "answers.jsonl")
    guard = _jsonl(run_dir / "guard_answers.jsonl")
    b, f = s["base"], s["final"]
    gb, gf = b.get("guard") or {}, f.get("guard") or {}
    return {
        "rougeL_before": b["rougeL"], "rougeL_after": f["rougeL"],
        "gain": f["rougeL"] - b["rougeL"] if None not in (b["rougeL"], f["rougeL"]) else None,
        "eval_loss_before": b["eval_loss"], "eval_loss_after": f["eval_loss"],
        "repetition_before": b.get("repetition_share"),
        "repetition_after": f.get("repetition_share"),
        "guard_loss_before": gb.get("eval_loss"), "guard_loss_after": gf.get("eval_loss"),
        "guard_rougeL_before": gb.get("rougeL"), "guard_rougeL_after": gf.get("rougeL"),
        "guard_repetition_before": gb.get("repetition_share"),
        "guard_repetition_after": gf.get("repetition_share"),
        "answers_up": sum(a["rougeL_after"] > a["rougeL_before"] for a in answers),
        "answers_down": sum(a["rougeL_after"] < a["rougeL_before"] for a in answers),
        "bytes_up_per_client_round": s["bytes"]["up_per_client_round"],
        "bytes_down_per_client_round": s["bytes"]["down_per_client_round"],
        "round_wall_s": sum(r["wall_s"] for r in trained) / max(1, len(trained)),
        "run_wall_s": s["wall_s"], "wall_s": wall, "peak_memory_mb": s["peak_memory_mb"],
        "scores_before": [a["rougeL_before"] for a in answers],
        "scores_after": [a["rougeL_after"] for a in answers],
        "guard_scores_after": [a["rougeL_after"] for a in guard],
    }


SPREAD_KEYS = ("rougeL_after", "gain", "eval_loss_after", "guard_loss_after", "guard_loss_delta",
               "guard_repetition_after", "repetition_after", "answers_up", "answers_down",
               "run_wall_s")


def _mean_scores(seeds: list[dict[str, Any]], key: str) -> list[float]:
    """Each example's score averaged over the seeds."""
    cols = [s[key] for s in seeds]
    return [sum(xs) / len(xs) for xs in zip(*cols, strict=True)] if cols and cols[0] else []


def summarise(arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Spread over seeds and the paired tests of every arm (against the base model) and of every
    two arms, per seed and on each example's mean over seeds."""
    out: dict[str, Any] = {"arms": {}, "between": {}}
    for name, seeds in arms.items():
        for s in seeds:
            s["guard_loss_delta"] = (None if None in (s["guard_loss_after"], s["guard_loss_before"])
                                     else s["guard_loss_after"] - s["guard_loss_before"])
        sp = {k: spread([s[k] for s in seeds]) for k in SPREAD_KEYS
              if all(s.get(k) is not None for s in seeds)}
        base = seeds[0]["scores_before"]
        out["arms"][name] = {
            "spread": sp,
            "vs_base": {"per_seed": [paired(s["scores_before"], s["scores_after"]) for s in seeds],
                        "seed_mean": paired(base, _mean_scores(seeds, "scores_after"))
                        if base else None},
            "seeds": seeds,
        }
    for a, b in combinations(arms, 2):
        sa, sb = arms[a], arms[b]
        out["between"][f"{b} vs {a}"] = {
            "per_seed": [paired(x["scores_after"], y["scores_after"])
                         for x, y in zip(sa, sb, strict=False)],
            "seed_mean": paired(_mean_scores(sa, "scores_after"),
                                _mean_scores(sb, "scores_after")),
        }
    return out


def quality(model: str, rounds: int, clients_per_round: int, eval_examples: int,
            max_new_tokens: int, methods: list[str] | None = None,
            extra: list[str] | None = None, progress: bool = False,
            data: str = "dolly", seeds: int = 1, keep: Path | None = None) -> dict[str, Any]:
    """Run every arm at ``seeds`` seeds on the protocol; spread and paired tests
    (:func:`summarise`) with every seed's figures."""
    if data == "quickstart":
        common = PROTOCOL_QUICKSTART + (extra or [])
        table: dict[str, list[str]] = {"default": [], **REAL}
    else:
        source = DOLLY if data == "dolly" else NI
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: the quality benchmark needs it")
        protocol = (PROTOCOL + [f"data.path={json.dumps(str(DOLLY))}"] if data == "dolly"
                    else PROTOCOL_NI)
        common = protocol + [
            f"model.path={json.dumps(model)}",
            f"federation.rounds={rounds}", f"federation.clients_per_round={clients_per_round}",
            f"evaluation.max_examples={eval_examples}",
            f"evaluation.max_new_tokens={max_new_tokens}",
        ] + (extra or [])
        table = REAL if model == "smollm2-135m" else METHODS
    arms: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = keep or Path(tmp)
        for name in methods or list(table):
            arms[name] = []
            for seed in range(seeds):
                run_dir = root / name / f"seed{seed}"
                res = one_run(common + table[name] + seed_overrides(seed), run_dir)
                arms[name].append({"seed": seed, **res})
                if progress:
                    print(f"{name} seed {seed}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in res.items()
                        if isinstance(v, float | int)), file=sys.stderr, flush=True)
    return {"protocol": {"data": PROTOCOLS[data], "extra": extra or [], "model": model,
                         "rounds": rounds, "clients_per_round": clients_per_round,
                         "eval_examples": eval_examples, "max_new_tokens": max_new_tokens,
                         "seeds": seeds, "seeded": "federation.seed = algorithm.fedkseed.seed = "
                                                   "seed (client sampling, batch order, z)",
                         "settings": {n: common + table[n] for n in arms}},
            **summarise(arms)}


def _pm(sp: dict[str, Any], key: str, spec: str = ".4f") -> str:
    s = sp.get(key)
    return "-" if s is None else f"{s['mean']:{spec}} ± {s['std']:{spec}}"


def _pair(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    return f"{p['wins']}/{p['losses']}/{p['ties']} p={p['sign_p']:.2g}"


def text_report(r: dict[str, Any]) -> str:
    """The harness's result as aligned text: mean ± std over seeds, then the paired tests."""
    n = r["protocol"]["seeds"]
    out = [f"{r['protocol']['data']}; {n} seed(s); mean ± sample std over seeds",
           f"{'arm':<22} {'Rouge-L after':>17} {'gain':>17} {'eval loss':>17} "
           f"{'guard loss +':>17} {'guard loops':>13} {'up/down':>9} {'wall s':>7}"]
    for name, a in r["arms"].items():
        sp = a["spread"]
        out.append(f"{name:<22} {_pm(sp, 'rougeL_after'):>17} {_pm(sp, 'gain'):>17} "
                   f"{_pm(sp, 'eval_loss_after'):>17} {_pm(sp, 'guard_loss_delta'):>17} "
                   f"{_pm(sp, 'guard_repetition_after', '.2f'):>13} "
                   f"{_pm(sp, 'answers_up', '.0f') + '/' + _pm(sp, 'answers_down', '.0f'):>9} "
                   f"{_pm(sp, 'run_wall_s', '.0f'):>7}")
    out.append("paired per-example Rouge-L (wins/losses/ties, two-sided sign test):")
    for name, a in r["arms"].items():
        per = "; ".join(_pair(p) for p in a["vs_base"]["per_seed"])
        out.append(f"  {name} vs base: per seed {per}; seed mean "
                   f"{_pair(a['vs_base']['seed_mean'])}")
    for name, b in r["between"].items():
        per = "; ".join(_pair(p) for p in b["per_seed"])
        out.append(f"  {name}: per seed {per}; seed mean {_pair(b['seed_mean'])}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--model", default=str(ROOT / "fedtune" / "base_models" / "small"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients-per-round", type=int, default=5)
    ap.add_argument("--eval-examples", type=int, default=100,
                    help="eval examples (the same for every arm and seed)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (0, 1, ...)")
    ap.add_argument("--methods", default="",
                    help="comma-separated arms (default: every arm of the model's table; "
                         "'default' with --data quickstart is the quick start as shipped)")
    ap.add_argument("--data", choices=sorted(PROTOCOLS), default="dolly",
                    help="the protocol: Dolly-15k (default), Natural Instructions, or the quick "
                         "start's own data and settings (--model, --rounds, ... then ignored)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every arm (e.g. data.max_length=512)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep every run directory as KEEP/ARM/seedN (answers, metrics, models)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = quality(args.model, args.rounds, args.clients_per_round, args.eval_examples,
                args.max_new_tokens, args.methods.split(",") if args.methods else None,
                args.extra, progress=True, data=args.data, seeds=args.seeds, keep=args.keep)
    print(json.dumps(r, indent=1) if args.json else text_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
