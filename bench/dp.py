"""Differential-privacy benchmark: utility against epsilon, DP-FedKSeed beside DP-FedIT.

    python -m bench.dp --model smollm2-135m          the real model (minutes per run)
    python -m bench.dp --quick                       a smoke test on the 2.1M ``small`` model

N clients, m sampled per round, R rounds; for each method, first a short calibration run without
noise measures the honest clients' update norms (FedKSeed: the K-vector of per-seed sums of g;
FedIT: the change of the LoRA tensors) and the clip bound C is their median (a common choice: about
half the updates are clipped). Then one run per noise multiplier z (equal weights, each update
clipped to C, noise N(0, (z C)^2) on the sum; z = 0 clips without noise, epsilon = infinity). The
table gives epsilon (dp_accounting RDP, sampling without replacement, replace-one, client level),
the final eval loss and Rouge-L, and the noise-to-signal ratio of one round's mean,
z C sqrt(d) / (m C) = z sqrt(d) / m, with d the dimension of the update: K for FedKSeed, the
number of LoRA parameters for FedIT. That ratio is why FedKSeed needs less noise at equal epsilon.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.robust import DOLLY, Hostile, dolly_subset, save_results


def settings(method: str, model: str, clients: int, per_round: int, rounds: int,
             quick: bool) -> list[str]:
    sets = [f"algorithm.name={method}", f"model.path={model}", f"data.num_clients={clients}",
            f"federation.clients_per_round={per_round}", f"federation.rounds={rounds}",
            "evaluation.rouge_interval=0", "evaluation.loss_interval=0",
            f"evaluation.max_examples={8 if quick else 32}", "output.plots=false",
            "output.save_model=false", "output.checkpoint=false", "algorithm.weighting=equal",
            f"algorithm.local_steps={2 if quick else 10}",
            f"algorithm.fedkseed.tau={4 if quick else 10}"]
    sets += ["data.max_length=128"]
    if model == "small":
        sets += ["algorithm.fedkseed.lr=2e-4"]
    if DOLLY.is_file() and not quick:  # the Dolly protocol (and English the books model learns)
        sets += ["data.format=dolly", f"data.path={dolly_subset()}", "data.partition=iid"]
    if quick:
        sets += ["data.generated_per_family=4", "evaluation.max_new_tokens=8"]
    return sets


def run(sets: list[str]) -> tuple[dict[str, Any], Hostile, int]:
    """One run; its summary, the device wrapper (honest update norms) and the update size d."""
    from fedtune import runner
    from fedtune.algorithms.params import trainable
    from fedtune.config import load_config
    from fedtune.federation.simulation import InProcessEngine

    cfg = load_config(None, sets)
    box: list[Hostile] = []
    dims: list[int] = []

    def engine(server, device, model, clients, fed):  # noqa: ANN001, ANN202
        a = cfg.algorithm
        box.append(Hostile(device, a.name, "none", set(), fed.seed, a.fedkseed.k_seeds,
                           a.fedkseed.tau))
        dims.append(a.fedkseed.k_seeds if a.name == "fedkseed" else
                    sum(p.numel() for p in trainable(model).values()))
        return InProcessEngine(server, box[0], model, clients, fed)

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output.dir = tmp
        summary = runner.run(cfg, Path(tmp), progress=False, engine=engine)
    return summary, box[0], dims[0]


def bench(method: str, a: argparse.Namespace) -> dict[str, Any]:
    base = settings(method, a.model, a.clients, a.per_round, a.rounds, a.quick)
    base += [f"model.threads={a.threads}", *a.set]
    t0 = time.perf_counter()
    _, dev, dim = run(base + ["federation.rounds=1", "evaluation.evaluate_base=false",
                              "evaluation.max_examples=1"])
    clip = statistics.median(dev.honest_norms)
    out: dict[str, Any] = {"method": method, "model": a.model, "clients": a.clients,
                           "per_round": a.per_round, "rounds": a.rounds, "clip": clip,
                           "dim": dim, "runs": []}
    for i, z in enumerate(a.noise):
        sets = base + [f"evaluation.evaluate_base={'true' if i == 0 else 'false'}"]
        sets += ([f"algorithm.dp.noise_multiplier={z}", f"algorithm.dp.clip_norm={clip:.6g}"]
                 if z > 0 else [f"algorithm.robust.max_update_norm={clip:.6g}"])
        s, _, _ = run(sets)
        if i == 0:
            out["base"] = s["base"]
        row = {"z": z, "epsilon": (s.get("privacy") or {}).get("epsilon"),
               "delta": (s.get("privacy") or {}).get("delta"),
               "eval_loss": s["final"]["eval_loss"], "rougeL": s["final"]["rougeL"],
               "noise_to_signal": z * dim ** 0.5 / a.per_round}
        out["runs"].append(row)
        print(f"  {method} z={z:g}: {row}", file=sys.stderr)
    out["wall_s"] = time.perf_counter() - t0
    return out


def table(res: dict[str, Any]) -> str:
    b = res["base"]
    lines = [f"{res['method']} on {res['model']}: N = {res['clients']}, m = {res['per_round']}, "
             f"R = {res['rounds']}, clip C = {res['clip']:.4g}, update dimension d = "
             f"{res['dim']:,}; base eval loss {b['eval_loss']:.4f}, Rouge-L {b['rougeL']:.4f}",
             "", "| z | epsilon | eval loss | Rouge-L | noise / signal of a round's mean |",
             "| --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        eps = "inf (clip only)" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        lines.append(f"| {r['z']:g} | {eps} | {r['eval_loss']:.4f} | {r['rougeL']:.4f} | "
                     f"{r['noise_to_signal']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=["fedkseed", "fedit"])
    p.add_argument("--model", default="small")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument("--threads", type=int, default=0,
                   help="model.threads of every run (0: the free cores, measured per run)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides after the bench's own (recorded in the JSON)")
    p.add_argument("--quick", action="store_true", help="tiny settings, a smoke test")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if a.quick:
        a.model, a.clients, a.per_round, a.rounds, a.noise = "small", 10, 2, 2, [0.0, 1.0]
    results = []
    for method in a.method:
        res = bench(method, a)
        results.append(res)
        print(table(res) + f"\n\n({res['wall_s']:.0f} s)\n")
    save_results(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
