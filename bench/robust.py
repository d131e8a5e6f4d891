"""Robustness benchmark: the final eval loss under each aggregation rule while a share of the
clients send hostile (well-formed) replies, against the attack-free run.

    python -m bench.robust                       FedKSeed and FedIT on the 2.1M ``small`` model
    python -m bench.robust --method fedkseed --model smollm2-135m --fractions 0 0.25 \\
        --clients 4 --rounds 3 --attacks huge sign-flip
                                                 a reduced grid on the real model
    python -m bench.robust --quick               a smoke test (seconds)

Every client is sampled every round, so a fraction f of the clients is exactly a fraction f of
each round's replies; the attackers are clients 0 .. f N - 1. An attacker trains honestly, then
turns its reply into one of the attacks of issue 13 (decoded, changed, re-encoded: the server sees
well-formed bytes):

* ``huge``: FedKSeed: sum g = 1e30 on one seed; FedIT: every adapter value moved by 1e6;
* ``many-seeds`` (FedKSeed): sum g = 1e4 on tau seeds (as many as tau steps can touch);
* ``scaled``: the honest update times 50;
* ``sign-flip``: the honest update times -5;
* ``claim``: the sign-flipped update (times -5) claiming 10^9 samples.

Rules: ``mean`` (the papers': sample-weighted, with fedtune's default checks off: no
``g_max``, no ``max_change_over_median``), ``default`` (fedtune's defaults: the mean with
FedKSeed's per-reply check under ``g_max`` and the tensor methods' ``max_change_over_median``),
``clip`` (the mean of updates clipped to twice the median norm of the honest updates, measured
in the attack-free run), ``trimmed-mean`` (0.2 each side) and ``median``. A run whose model
turns non-finite is impossible here: such a round is refused; the table shows the final eval
loss (lower is better).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch

DOLLY = (Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly"
         / "databricks-dolly-15k.jsonl.gz")
ATTACKS = ("huge", "many-seeds", "scaled", "sign-flip", "claim")
RULES = ("mean", "default", "clip", "trimmed-mean", "median")


class Hostile:
    """A device half whose attackers' replies are rewritten (see the module docstring)."""

    def __init__(self, device: Any, method: str, attack: str, attackers: set[int],
                 fed_seed: int, k_seeds: int, tau: int) -> None:
        self.device, self.method, self.attack = device, method, attack
        self.attackers, self.fed_seed = attackers, fed_seed
        self.k_seeds, self.tau = k_seeds, tau
        self.honest_norms: list[float] = []
        self.kept_round = device.kept_round

    def round(self, model: torch.nn.Module, payload: bytes, examples: Sequence[Any],
              round_: int, seed: int) -> bytes:
        from fedtune.seeds import client_seed

        up = self.device.round(model, payload, examples, round_, seed)
        hostile = seed in {client_seed(self.fed_seed, round_, a) for a in self.attackers}
        if self.method.startswith("fedkseed"):
            return self._fedkseed(up, round_, hostile)
        return self._tensors(up, payload, round_, hostile)

    def _fedkseed(self, up: bytes, round_: int, hostile: bool) -> bytes:
        from fedtune.algorithms.fedkseed.wire import Reply

        r = Reply.decode(up, self.k_seeds, False, 1e30, expect_round=round_)
        if not hostile:
            self.honest_norms.append(float(r.sum_g.double().norm()))
            return up
        a = self.attack
        if a == "huge":
            r.index, r.sum_g = torch.tensor([0], dtype=torch.int32), torch.tensor([1e30])
        elif a == "many-seeds":
            r.index = torch.arange(self.tau, dtype=torch.int32)
            r.sum_g = torch.full((self.tau,), 1e4)
        else:
            r.sum_g = r.sum_g * (50.0 if a == "scaled" else -5.0)
            if a == "claim":
                r.num_samples = 10**9
        return r.encode(self.k_seeds)

    def _tensors(self, up: bytes, down: bytes, round_: int, hostile: bool) -> bytes:
        from safetensors.torch import load

        from fedtune.algorithms.fedavg.wire import Reply
        from fedtune.wire import MessageError, TensorSpec

        theta = load(down)  # the download is a safetensors payload of the global tensors
        spec = TensorSpec.of(theta)
        try:
            r = Reply.decode(up, spec, expect_round=round_)
        except MessageError:  # e.g. NaN from training a model an attack broke: the server
            return up  # refuses it as it would any client's

        update = {k: r.tensors[k] - theta[k] for k in theta}
        if not hostile:
            self.honest_norms.append(sum(float(u.double().pow(2).sum())
                                         for u in update.values()) ** 0.5)
            return up
        a = self.attack
        if a in ("huge", "many-seeds"):
            r.tensors = {k: t + 1e6 for k, t in r.tensors.items()}
        else:
            scale = 50.0 if a == "scaled" else -5.0
            r.tensors = {k: theta[k] + scale * u for k, u in update.items()}
            if a == "claim":
                r.num_samples = 10**9
        return r.encode()


def settings(method: str, model: str, clients: int, rounds: int, quick: bool,
             threads: int = 0) -> list[str]:
    sets = [f"algorithm.name={method}", f"model.path={model}", f"data.num_clients={clients}",
            f"federation.clients_per_round={clients}", f"federation.rounds={rounds}",
            "evaluation.rouge_interval=0", "evaluation.loss_interval=0",
            "evaluation.evaluate_base=true", f"evaluation.max_examples={16 if quick else 48}",
            "evaluation.max_new_tokens=1",  # the table is eval loss; Rouge-L would cost minutes
            "output.plots=false", "output.save_model=false", "output.checkpoint=false",
            f"model.threads={threads}",
            # the rules alone: no per-reply check, no round check against the median size
            "algorithm.fedkseed.g_max=0", "algorithm.robust.max_change_over_median=0",
            f"algorithm.local_steps={2 if quick else 10}",
            f"algorithm.fedkseed.tau={4 if quick else 10}"]
    sets += ["data.max_length=128"]
    if model == "small":
        sets += ["algorithm.fedkseed.lr=2e-4"]
    if DOLLY.is_file() and not quick:  # English the books models can learn (generated tasks
        # start above ln(vocab), so a destroyed, uniform model would look like progress)
        sets += ["data.format=dolly", f"data.path={dolly_subset()}", "data.partition=iid"]
    if quick:
        sets += ["data.generated_per_family=4"]
    return sets


def dolly_subset(every: int = 10) -> Path:
    """Every ``every``-th Dolly record (1,501 of 15,011) in a temporary JSONL file, so a run's
    partition and tokenisation take seconds, not a minute."""
    import gzip

    out = Path(tempfile.gettempdir()) / f"fedtune-bench-dolly-every-{every}.jsonl"
    if not out.is_file():
        with gzip.open(DOLLY, "rt") as f:
            lines = [line for i, line in enumerate(f) if i % every == 0]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(out)
    return out


def rule_settings(rule: str, clip: float) -> list[str]:
    from fedtune.algorithms.config import RobustConfig
    from fedtune.algorithms.fedkseed.config import FedKSeedConfig

    if rule == "default":
        return [f"algorithm.fedkseed.g_max={FedKSeedConfig().g_max:g}",
                "algorithm.robust.max_change_over_median="
                f"{RobustConfig().max_change_over_median:g}"]
    if rule == "clip":
        return [f"algorithm.robust.max_update_norm={clip:.6g}"]
    if rule == "mean":
        return []
    return [f"algorithm.robust.aggregation={rule}"]


def one_run(sets: list[str], attack: str, attackers: set[int]) -> tuple[dict[str, Any], Hostile]:
    from fedtune import runner
    from fedtune.config import load_config
    from fedtune.federation.simulation import InProcessEngine

    cfg = load_config(None, sets)
    box: list[Hostile] = []

    def engine(server, device, model, clients, fed):  # noqa: ANN001, ANN202
        a = cfg.algorithm
        box.append(Hostile(device, a.name, attack, attackers, fed.seed, a.fedkseed.k_seeds,
                           a.fedkseed.tau))
        return InProcessEngine(server, box[0], model, clients, fed)

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output.dir = tmp
        try:
            summary = runner.run(cfg, Path(tmp), progress=False, engine=engine)
        except RuntimeError as e:  # the attack stopped the federation: that is the result
            if "every client failed" not in str(e):
                raise
            summary = {"base": {}, "final": {"eval_loss": None}, "stopped": str(e)}
    return summary, box[0]


def bench(method: str, model: str, clients: int, rounds: int, fractions: Sequence[float],
          attacks: Sequence[str], rules: Sequence[str], quick: bool,
          threads: int = 0, extra: Sequence[str] = ()) -> dict[str, Any]:
    base = settings(method, model, clients, rounds, quick, threads) + list(extra)
    t0 = time.perf_counter()
    clean, dev = one_run(base, "none", set())
    clip = 2 * statistics.median(dev.honest_norms)
    out: dict[str, Any] = {
        "method": method, "model": model, "clients": clients, "rounds": rounds,
        "base_eval_loss": clean["base"]["eval_loss"], "clip": clip,
        "clean": {"mean": clean["final"]["eval_loss"]}, "attacked": {}}
    for rule in rules:
        if rule != "mean":
            s, _ = one_run(base + rule_settings(rule, clip), "none", set())
            out["clean"][rule] = s["final"]["eval_loss"]
        print(f"  {method} {rule:>12} no attack: {out['clean'][rule]:.4f}", file=sys.stderr)
    for attack in attacks:
        if attack == "many-seeds" and not method.startswith("fedkseed"):
            continue
        for f in fractions:
            n = round(f * clients)
            if n == 0:
                continue
            for rule in rules:
                s, _ = one_run(base + rule_settings(rule, clip), attack, set(range(n)))
                loss = s["final"]["eval_loss"]
                out["attacked"][f"{attack}|{f:g}|{rule}"] = loss
                print(f"  {method} {rule:>12} {attack:>10} {f:4.0%}: {_loss(loss)}",
                      file=sys.stderr)
    out["wall_s"] = time.perf_counter() - t0
    return out


def table(res: dict[str, Any], fractions: Sequence[float], rules: Sequence[str]) -> str:
    rows = [f"{res['method']} on {res['model']} ({res['clients']} clients, all sampled, "
            f"{res['rounds']} rounds): base eval loss {res['base_eval_loss']:.4f}; clip bound "
            f"{res['clip']:.4g} (2x the median honest update norm)", "",
            "| attack | hostile | " + " | ".join(rules) + " |",
            "| --- | --- | " + " | ".join("---" for _ in rules) + " |",
            "| none | 0 % | " + " | ".join(f"{res['clean'][r]:.4f}" for r in rules) + " |"]
    seen = sorted({k.split("|")[0] for k in res["attacked"]}, key=ATTACKS.index)
    for attack in seen:
        for f in fractions:
            keys = [f"{attack}|{f:g}|{r}" for r in rules]
            if keys[0] in res["attacked"]:
                cells = [_loss(res["attacked"][k]) for k in keys]
                rows.append(f"| {attack} | {f:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _loss(v: float | None) -> str:
    return "stopped" if v is None else (f"{v:.4f}" if v < 100 else f"{v:.3g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=["fedkseed", "fedit"])
    p.add_argument("--model", default="small")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--threads", type=int, default=0,
                   help="model.threads of every run (0: the free cores, measured per run)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides after the bench's own, e.g. algorithm.local_steps=5 "
                   "(recorded in the JSON)")
    p.add_argument("--quick", action="store_true", help="tiny settings, a smoke test")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per run is noise here
    if a.quick:
        a.clients, a.rounds, a.fractions = 4, 1, [0.25]
    results = []
    for method in a.method:
        res = bench(method, a.model, a.clients, a.rounds, a.fractions, a.attacks, a.rules,
                    a.quick, a.threads, a.set)
        res["set"] = a.set
        results.append(res)
        print(table(res, a.fractions, a.rules) + f"\n\n({res['wall_s']:.0f} s)\n")
    save_results(a.json, results)
    return 0


def save_results(path: Path | None, results: list[dict[str, Any]]) -> None:
    """The figures as JSON (with the date and the command's arguments), when asked for."""
    if path is not None:
        path.write_text(json.dumps({"date": date.today().isoformat(), "argv": sys.argv[1:],
                                    "results": results}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
