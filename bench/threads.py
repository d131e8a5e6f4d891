"""Thread count against a competing load: why ``model.threads = 0`` sizes torch's team itself.

    python -m bench.threads                 a table (small and smollm2-135m)
    python -m bench.threads --json          the figures as one JSON object
    python -m bench.threads --models small  one model only

For each model and each thread setting (1, every usable core, and fedtune's auto policy,
:class:`fedtune.cpu.ThreadPolicy`), a fresh subprocess times a forward at batch 1 x 128 and a
greedy generation of 16 tokens after a 32-token prompt (medians of a few repeats after a warm-up),
on idle cores ("idle"), beside one busy-looping Python process per usable core ("busy"), and
beside another torch process running matrix products on a full thread team ("torch": two
OpenMP teams spin-waiting on the same cores, as when two runs, or a run and the tests, share a
machine). A fresh process per measurement means OpenMP's team is sized and initialised exactly
as in a run.
Run it on otherwise idle cores (check ``uptime``): the "idle" rows assume nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Any

SETTINGS = ("1", "all", "auto")
LOADS = ("idle", "busy", "torch")
TORCH_JOB = """
import torch
torch.set_num_threads({threads})
a = torch.randn(256, 256)
while True:
    a = torch.tanh(a @ a.T / 256)
"""


def worker(model_name: str, setting: str, repeats: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from fedtune.cpu import ThreadPolicy, usable_cpus
    from fedtune.models.loading import load_model_and_tokenizer

    threads = {"1": 1, "all": usable_cpus(), "auto": 0}[setting]
    policy = ThreadPolicy(threads)
    model, _ = load_model_and_tokenizer(model_name, "float32", "cpu")
    x = torch.randint(5, 1000, (1, 128), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def generate() -> None:
        with torch.inference_mode():
            model.generate(x[:, :32], max_new_tokens=16,  # type: ignore[operator]
                           min_new_tokens=16, do_sample=False, pad_token_id=0)

    out: dict[str, Any] = {"threads": policy.threads}
    for name, fn, n in (("forward_s", forward, 2 * repeats), ("generate16_s", generate, repeats)):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def measure(model_name: str, setting: str, repeats: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.threads", "--worker", model_name, setting,
           "--repeats", str(repeats)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"timed_out_s": timeout}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(models: list[str], repeats: int, timeout: float) -> dict[str, Any]:
    from fedtune.cpu import usable_cpus

    cores = usable_cpus()
    res: dict[str, Any] = {"date": date.today().isoformat(), "usable_cores": cores,
                           "load_avg_start": os.getloadavg(), "results": {}}
    for load in LOADS:
        if load == "busy":
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(cores)]
        elif load == "torch":
            hogs = [subprocess.Popen([sys.executable, "-c", TORCH_JOB.format(threads=cores)])]
        else:
            hogs = []
        try:
            time.sleep(3.0 if hogs else 0)  # (the torch job imports torch first)
            for m in models:
                for setting in SETTINGS:
                    res["results"][f"{m}/{load}/{setting}"] = measure(m, setting, repeats,
                                                                      timeout)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    res["load_avg_end"] = os.getloadavg()
    return res


def table(res: dict[str, Any]) -> str:
    lines = [f"threads under a competing load, {res['date']}, {res['usable_cores']} usable cores, "
             f"load avg at start {res['load_avg_start'][0]:.2f}; beside the measurement: "
             "nothing (idle), one busy loop per core (busy), a torch job on every core (torch)",
             "",
             f"{'model':14s} {'cores':7s} {'setting':8s} {'threads':>7s} {'forward s':>10s} "
             f"{'gen16 s':>9s}"]
    for key, r in res["results"].items():
        m, load, setting = key.split("/")
        if "timed_out_s" in r:
            lines.append(f"{m:14s} {load:7s} {setting:8s} {'-':>7s} timed out after "
                         f"{r['timed_out_s']:.0f} s")
            continue
        lines.append(f"{m:14s} {load:7s} {setting:8s} {r['threads']:7d} {r['forward_s']:10.4f} "
                     f"{r['generate16_s']:9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default="small,smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0,
                    help="seconds one measurement may take before it counts as a collapse")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.repeats)))
        return 0
    res = run(args.models.split(","), args.repeats, args.timeout)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
