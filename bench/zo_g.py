"""The honest projected gradients |g| of FedKSeed steps: what ``algorithm.fedkseed.g_max`` must
leave alone.

    python -m bench.zo_g smollm2-135m          the quick start's settings, 2 rounds (minutes)
    python -m bench.zo_g small --set algorithm.fedkseed.lr=2e-4

Runs a short federation (2 rounds of 2 clients, the embedded defaults otherwise) with the clip
off and records every step's g as the device folds it into its per-seed statistics; prints the
median, 90th and 99th percentiles and the maximum of |g|.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def measure(model: str, sets: list[str]) -> dict[str, float]:
    import fedtune.algorithms.fedkseed.device as device
    from fedtune import runner
    from fedtune.config import load_config

    seen: list[float] = []
    fold = device.SeedStats.add

    def add(self: device.SeedStats, j: int, g: float, clip: float) -> None:
        seen.append(float(g))
        fold(self, j, g, clip)

    device.SeedStats.add = add  # type: ignore[method-assign]
    try:
        cfg = load_config(None, [
            f"model.path={model}", "federation.rounds=2", "federation.clients_per_round=2",
            "algorithm.fedkseed.g_max=0", "evaluation.max_examples=1",
            "evaluation.evaluate_base=false", "output.save_model=false", "output.plots=false",
            "output.checkpoint=false", *sets])
        with tempfile.TemporaryDirectory() as tmp:
            runner.run(cfg, Path(tmp), progress=False)
    finally:
        device.SeedStats.add = fold  # type: ignore[method-assign]
    a = np.abs(np.array(seen))
    return {"steps": len(a), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model.path (smollm2-135m, small, a directory...)")
    p.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE")
    a = p.parse_args(argv)
    print(json.dumps({"model": a.model, "sets": a.set, **measure(a.model, a.set)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
