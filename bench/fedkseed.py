"""FedKSeed benchmark: step time, replay throughput, peak memory and bytes on the wire.

    python -m bench.fedkseed            a readable table
    python -m bench.fedkseed --json     the figures as one JSON object
    python -m bench.fedkseed --quick    a small model and few repeats (smoke test, seconds)
    python -m bench.fedkseed --model smollm2-135m --json
                                        the real model (SmolLM2-135M-Instruct): steps at batch
                                        1 x 128 and 8 x 128, replay of 1024 seeds, memory

Every section compares z's generators side by side (fedtune.zo): version 1 (torch's CPU
generator per (seed, parameter)), version 2 (Philox4x32-10, the default) and low-rank seeded
perturbations (generator 2, ranks ``--ranks``); the generator section also times writing the
same floats (the memory-bandwidth floor of any generator).

Model: a Llama-style model of ~10.5M parameters (d 256, 8 layers, 8 heads, FFN 688, vocab 8192,
untied embeddings; random weights), batch 8 x 128 tokens, float32, ``eval()``. Timings are taken
side by side in one process, the variants interleaved within every repeat, and reported as
medians; a ratio is the median over repeats of the ratio of the two times taken in that repeat
(robust to a machine whose load changes during the run). Peak memory is measured per operation in
a fresh subprocess (see :func:`memory_peak`).

Targets (the issues'): ZO step <= 1.25 x two forward passes (1.1 the aim); replay >= 0.8 x the raw
throughput of the generator alone; a low-rank rebuild of 1024 seeds in seconds; ZO step peak
memory <= 1.15 x an inference forward; <= 17,988 bytes per client per round at K=4096, tau=200.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGET_STEP = 1.25
TARGET_REPLAY = 0.8
TARGET_MEMORY = 1.15
PAPER_BYTES = 4 * 4096 + 8 * 200 + 4  # 17,988
BASE_SMALL = Path(__file__).resolve().parents[1] / "fedtune" / "base_models" / "small"


@dataclass(frozen=True)
class Setup:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    batch: int
    seq: int
    repeats: int
    replay_seeds: int  # seeds in a throughput measurement (repeated)
    replay_pool: int  # seeds of the one fused-vs-naive replay (1024 in the issue)
    model: str = ""  # a fedtune model path ('smollm2-135m'): real weights instead of random ones
    step_batches: tuple[int, ...] = ()  # batch sizes of the step section (default: batch)
    pool_naive: bool = True  # also time the naive replays of the pool (minutes on a real model)
    ranks: tuple[int, ...] = (1, 4, 16)  # low-rank perturbations timed beside the dense ones


FULL = Setup("10.5M Llama", 8192, 256, 8, 8, 688, 8, 128, 7, 16, 1024)
QUICK = Setup("quick 0.3M Llama", 1024, 64, 2, 4, 172, 2, 32, 3, 4, 16)


# -- model and batch ------------------------------------------------------------------------------

def build_model(s: Setup) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    if s.model:
        from fedtune.models.loading import load_model

        return load_model(s.model, "float32", "cpu").eval()

    from fedtune.models.tiny import tiny_llama_config

    cfg = tiny_llama_config(s.vocab, hidden_size=s.hidden, num_layers=s.layers,
                            num_heads=s.heads, max_positions=max(512, s.seq), pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    cfg.intermediate_size = s.ffn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def real_setup(model: str) -> Setup:
    """The step/replay/memory setup on a real model: the issue's batch 1 x 128 and 8 x 128."""
    from fedtune.models.loading import load_model

    cfg = load_model(model, "float32", "cpu").config
    return Setup(model, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers,
                 cfg.num_attention_heads, cfg.intermediate_size, 8, 128, 5, 16, 1024,
                 model=model, step_batches=(1, 8), pool_naive=False)


def make_batch(s: Setup, batch: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, s.vocab, (batch or s.batch, s.seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(cases: Mapping[str, Callable[[], object]], repeats: int
                 ) -> dict[str, list[float]]:
    for fn in cases.values():  # warm-up (lazy init, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(_timed(fn))
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


# -- 1. step time ---------------------------------------------------------------------------------

def bench_step(s: Setup, model: torch.nn.Module | None = None, batch_size: int | None = None
               ) -> dict[str, Any]:
    from fedtune.zo import KeptZ, ZSpec, zo_loss, zo_step

    model = build_model(s) if model is None else model
    batch = make_batch(s, batch_size)
    params = trainable(model)
    kept = KeptZ(params)  # as a FedKSeed device with keep_z: z kept, the last move deferred
    seeds = iter(range(10**9))

    def step(**kw: Any) -> Callable[[], object]:
        return lambda: zo_step(model, params, batch, next(seeds), 5e-4, 1e-7, **kw)

    cases = {
        "two_forwards": lambda: (zo_loss(model, batch), zo_loss(model, batch)),
        "zo_step_keep_z_v1": step(kept=kept, spec=ZSpec(1)),
        "zo_step_keep_z_v2": step(kept=kept, spec=ZSpec(2)),
        "zo_step_default_v1": step(spec=ZSpec(1)),
        "zo_step_default_v2": step(spec=ZSpec(2)),
        **{f"zo_step_lowrank_r{r}": step(spec=ZSpec(2, "lowrank", r)) for r in s.ranks},
    }
    times = _interleaved(cases, s.repeats)
    out: dict[str, Any] = {"median_s": {k: statistics.median(v) for k, v in times.items()}}
    out["ratio_vs_two_forwards"] = {k: _ratio(times, k, "two_forwards")
                                    for k in cases if k != "two_forwards"}
    out["target"] = TARGET_STEP
    return out


# -- 2. replay ------------------------------------------------------------------------------------

def _raw_generation(params: list[torch.Tensor], seeds: list[int], workers: int,
                    version: int = 1) -> None:
    """The generator alone: every z(s)_i drawn into a preallocated buffer, nothing applied
    (version 1 parallel over parameters, version 2 over pieces of every parameter)."""
    from fedtune.zo import fill_z_
    from fedtune.zo.perturb import param_seed

    if version == 2:
        bufs = [torch.empty(p.shape) for p in params]
        for s in seeds:
            fill_z_(bufs, s, workers=workers, version=2)
        return

    def one(i: int, shape: torch.Size) -> None:
        buf = torch.empty(shape)
        for s in seeds:
            buf.normal_(generator=torch.Generator().manual_seed(param_seed(s, i)))

    tasks = sorted(enumerate(p.shape for p in params), key=lambda t: -t[1].numel())
    if workers == 1:
        for i, shape in tasks:
            one(i, shape)
    else:
        with ThreadPoolExecutor(workers) as ex:
            for f in [ex.submit(one, i, shape) for i, shape in tasks]:
                f.result()


def bench_generator(s: Setup, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Draw throughput of z's generators 1 and 2 (one seed over every parameter, into buffers
    held across repeats) against writing the same floats (``fill_``), on 1 thread and all."""
    from fedtune.zo import fill_z_

    model = build_model(s) if model is None else model
    params = trainable(model)
    n = sum(p.numel() for p in params)
    bufs = [torch.empty(p.shape) for p in params]
    workers = torch.get_num_threads()
    seeds = iter(range(10**9))

    def write() -> None:
        for b in bufs:
            b.fill_(1.0)

    cases: dict[str, Callable[[], object]] = {"write_same_floats": write}
    for w in sorted({1, workers}):
        for v in (1, 2):
            cases[f"v{v}_{w}_thread{'s' if w > 1 else ''}"] = (
                lambda v=v, w=w: fill_z_(bufs, next(seeds), workers=w, version=v))
    times = _interleaved(cases, s.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"values": n, "median_s": med,
            "throughput_mvalues_per_s": {k: n / t / 1e6 for k, t in med.items()},
            "ns_per_value_per_thread": {
                k: t / n * 1e9 * (1 if k == "write_same_floats" else int(k.split("_")[1]))
                for k, t in med.items()},
            "v2_vs_v1": {f"{w}": _ratio(times, f"v1_{w}_thread{'s' if w > 1 else ''}",
                                        f"v2_{w}_thread{'s' if w > 1 else ''}")
                         for w in sorted({1, workers})}}


def _naive_replay(params: list[torch.Tensor], coeffs: dict[int, float]) -> None:
    """Seed by seed: generate z over all parameters and add it (perturb_ per seed, v1)."""
    from fedtune.zo import perturb_

    for s in sorted(coeffs):
        perturb_(params, s, coeffs[s], version=1)


def _naive_replay_v0(params: list[torch.Tensor], coeffs: dict[int, float]) -> None:
    """Seed by seed with the previous perturb_: a fresh z tensor per parameter, sequential."""
    from fedtune.zo import z_for

    with torch.no_grad():
        for s in sorted(coeffs):
            for i, p in enumerate(params):
                p.add_(z_for(s, i, p.shape, 1), alpha=coeffs[s])


def bench_replay(s: Setup, model: torch.nn.Module | None = None) -> dict[str, Any]:
    from fedtune.algorithms.fedkseed.replay import seed_pool
    from fedtune.zo import ZSpec, replay_, replay_z_

    model = build_model(s) if model is None else model
    params = trainable(model)
    n = sum(p.numel() for p in params)
    workers = torch.get_num_threads()
    pool = seed_pool(0, 4096)
    rng = np.random.default_rng(0)

    def coeffs(k: int) -> dict[int, float]:
        return {pool[j]: float(c) for j, c in zip(range(k), 1e-7 * rng.standard_normal(k),
                                                   strict=True)}

    few = coeffs(s.replay_seeds)
    seeds = sorted(few)
    cases = {
        "raw_generator_v1_parallel": lambda: _raw_generation(params, seeds, workers),
        "raw_generator_v1_1_thread": lambda: _raw_generation(params, seeds, 1),
        "raw_generator_v2_parallel": lambda: _raw_generation(params, seeds, workers, 2),
        "replay_fused_v1_parallel": lambda: replay_(params, few, version=1),
        "replay_fused_v1_1_worker": lambda: replay_(params, few, workers=1, version=1),
        "replay_fused_v2_parallel": lambda: replay_(params, few, version=2),
    }
    times = _interleaved(cases, s.repeats)
    values = n * len(few)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "values_per_run": values,
        "throughput_mvalues_per_s": {k: values / t / 1e6 for k, t in med.items()},
        "replay_vs_raw_parallel": 1 / _ratio(times, "replay_fused_v1_parallel",
                                             "raw_generator_v1_parallel"),
        "replay_vs_raw_1_thread": 1 / _ratio(times, "replay_fused_v1_parallel",
                                             "raw_generator_v1_1_thread"),
        "replay_1_worker_vs_raw_1_thread": 1 / _ratio(times, "replay_fused_v1_1_worker",
                                                      "raw_generator_v1_1_thread"),
        "replay_v2_vs_raw_v2_parallel": 1 / _ratio(times, "replay_fused_v2_parallel",
                                                   "raw_generator_v2_parallel"),
        "target": TARGET_REPLAY,
    }
    if s.replay_pool <= 0:
        return out
    # one rebuild of the whole pool: dense v1 and v2 against the raw draw of as many seeds (the
    # median above, scaled), and low-rank at each rank (each once: minutes on the real model)
    big = coeffs(s.replay_pool)
    per_seed = {v: med[f"raw_generator_v{v}_parallel"] / len(few) for v in (1, 2)}
    pool_out: dict[str, Any] = {"seeds": len(big)}
    for v in (2, 1):
        t = _timed(lambda v=v: replay_(params, big, version=v))
        pool_out[f"dense_v{v}_s"] = t
        pool_out[f"dense_v{v}_s_per_seed"] = t / len(big)
        pool_out[f"raw_draw_v{v}_s"] = per_seed[v] * len(big)
    for r in s.ranks:
        pool_out[f"lowrank_r{r}_s"] = _timed(
            lambda r=r: replay_z_(params, big, ZSpec(2, "lowrank", r)))
    out["pool"] = pool_out
    if not s.pool_naive:
        return out
    t_naive = _timed(lambda: _naive_replay(params, big))
    t_v0 = _timed(lambda: _naive_replay_v0(params, big))
    t_fused = pool_out["dense_v1_s"]
    pool_out |= {"fused_s": t_fused, "naive_perturb_per_seed_s": t_naive,
                 "naive_v0_sequential_s": t_v0, "speedup_vs_naive": t_naive / t_fused,
                 "speedup_vs_naive_v0": t_v0 / t_fused}
    return out


# -- 3. peak memory -------------------------------------------------------------------------------

MEMORY_OPS = ("inference_forward", "zo_step_default", "zo_step_keep_z", "zo_step_lowrank",
              "fedit_lora_step",
              "fedavg_full_step", "device_round", "device_round_keep_z",
              "device_round_w0_in_memory")
DEVICE_SEEDS = 64  # non-zero accumulators the device's rebuild replays (a few rounds in)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_worker(s: Setup, op: str) -> dict[str, int]:
    """Run ``op`` twice (warm-up, then measured) in this fresh process; bytes above the runtime.

    Peak = VmHWM during the measured run (reset through /proc/self/clear_refs) minus the RSS of
    the process before the model was built (after a micro model's forward and backward warmed up
    the libraries), so it counts weights, activations, buffers, grads and optimizer state, not
    the Python/torch runtime. The parent sets MALLOC_MMAP_THRESHOLD_ so
    freed tensors go back to the OS and RSS follows live memory.
    """
    from fedtune.algorithms.local import backprop_step, lm_loss, make_optimizer, run_steps
    from fedtune.data.prompts import TokenizedExample, collate
    from fedtune.zo import ZSpec, new_z_buffer, zo_loss, zo_step

    if op == "fedit_lora_step":
        import peft  # noqa: F401  (library import and init are runtime, not the step's memory)
    micro = Setup("micro", 64, 16, 1, 2, 32, 2, 8, 1, 1, 1)
    warm = build_model(micro).train()
    warm(**make_batch(micro)).loss.backward()  # lazy library init (BLAS, oneDNN, autograd)
    del warm
    from fedtune.zo import philox

    philox.fill_(torch.empty(16), 1, 0)  # load numba and z's compiled kernel: runtime too
    model_dir = _model_dir_on_disk(s) if op.startswith("device_round") else None
    _release()
    base = _status("VmRSS")
    model, batch = build_model(s), make_batch(s)
    run: Callable[[], object]
    if op.startswith("device_round"):
        run = _device_round(op, model, batch, model_dir)
    elif op == "inference_forward":
        def run() -> object:
            return zo_loss(model, batch)
    elif op.startswith("zo_step"):
        params = trainable(model)
        zbuf = new_z_buffer(params) if op == "zo_step_keep_z" else None
        spec = ZSpec(2, "lowrank", max(s.ranks)) if op == "zo_step_lowrank" else ZSpec()

        def run() -> object:
            return zo_step(model, params, batch, 3, 5e-4, 1e-7, z_buffer=zbuf, spec=spec)
    else:
        if op == "fedit_lora_step":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                     target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        examples = [TokenizedExample(row.tolist(), row.tolist()) for row in batch["input_ids"]]
        bparams = [p for p in model.parameters() if p.requires_grad]

        def run() -> object:  # FedAvg's / FedIT's local backprop: one step, a fresh AdamW
            opt = make_optimizer(bparams, "adamw", 1e-3, 0.0)
            return run_steps(model, examples, steps=1, batch_size=s.batch, seed=0,
                             collate=lambda b: collate(b, 0),
                             step=backprop_step(bparams, opt, 1.0, lm_loss(model)),
                             train_mode=True)
    run()
    _release()
    rss_before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    run()
    peak = _status("VmHWM")
    return {"peak_bytes": peak - base, "resident_before_bytes": rss_before - base,
            "increment_bytes": peak - rss_before}


def _model_dir_on_disk(s: Setup) -> Path:
    """The directory the device loads its model from (and may read w0 from)."""
    if s.model:
        from fedtune.models.loading import resolve_model_source

        return Path(resolve_model_source(s.model))
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="bench-fedkseed-"))
    build_model(s).save_pretrained(out)  # type: ignore[operator]
    return out


def _device_round(op: str, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  model_dir: Path | None) -> Callable[[], object]:
    """One FedKSeed client round as a Flower node runs it: decode a download whose accumulators
    touch DEVICE_SEEDS seeds, rebuild the round model, 2 steps, encode the reply.
    ``device_round``: w0 read from the model files and no copy of the round model (what a node
    does now); ``_keep_z``: the same with z kept during a step; ``_w0_in_memory``: w0 as a
    second copy in memory plus the round-model copy (what a node did before)."""
    from fedtune.algorithms import METHODS, DeviceEnv, MethodContext
    from fedtune.algorithms.config import AlgorithmConfig
    from fedtune.algorithms.fedkseed.config import FedKSeedConfig
    from fedtune.algorithms.fedkseed.wire import Download
    from fedtune.data.prompts import TokenizedExample

    k = 1024
    cfg = AlgorithmConfig(name="fedkseed")
    cfg.fedkseed = FedKSeedConfig(k_seeds=k, tau=2, batch_size=int(batch["input_ids"].shape[0]),
                                  lr=1e-7, keep_z=op == "device_round_keep_z")
    method = METHODS["fedkseed"]
    ctx = MethodContext(cfg, pad_id=0)
    model = method.prepare(ctx, model)
    # only the device half (no server half in a node's process): a real device, one client per
    # process (w0 from the model files, no round-model copy), or the in-process device of
    # before (w0 cloned in memory and the round model cached)
    env = (DeviceEnv() if op == "device_round_w0_in_memory"
           else DeviceEnv(one_client=True, w0_dir=model_dir))
    device = method.device(ctx, model, env)
    acc = torch.zeros(k)
    acc[torch.arange(DEVICE_SEEDS) * (k // DEVICE_SEEDS)] = torch.linspace(-50, 50, DEVICE_SEEDS)
    examples = [TokenizedExample(row.tolist(), row.tolist()) for row in batch["input_ids"]]
    rounds = iter(range(2, 10**6))

    def run() -> object:
        r = next(rounds)
        moved = torch.where(acc != 0, acc + r, acc)  # a new A every round, the same seeds
        payload = Download(round=r, accumulators=moved).encode()
        return device.round(model, payload, examples, r, 7)
    return run


def memory_peak(s: Setup, quick: bool) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res: dict[str, Any] = {}
    for op in MEMORY_OPS:
        cmd = [sys.executable, "-m", "bench.fedkseed", "--memory-worker", op]
        if quick:
            cmd.append("--quick")
        if s.model:
            cmd += ["--model", s.model]
        cmd += ["--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        res[op] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = res["inference_forward"]["peak_bytes"]
    return {"ops": res,
            "ratio_vs_inference_forward": {op: res[op]["peak_bytes"] / ref
                                           for op in MEMORY_OPS if op != "inference_forward"},
            "target": TARGET_MEMORY}


# -- 4. bytes on the wire -------------------------------------------------------------------------

def measure_bytes(k: int = 4096, tau: int = 200, seed: int = 0) -> dict[str, int]:
    """Bytes of one client's round, from the encoded FedKSeed messages (fedkseed.wire).

    Download: the full accumulator vector, K float32. Upload: τ seed draws from the pool of K,
    Σ g per distinct seed. Kept self-contained: adapt it here when the wire API changes.
    """
    from fedtune.algorithms.fedkseed.wire import Download, Reply

    rng = np.random.default_rng(seed)
    accumulators = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
    down = Download(round=12, accumulators=accumulators).encode()
    sums: dict[int, float] = {}
    for j, g in zip(rng.integers(0, k, size=tau), rng.standard_normal(tau) * 50, strict=True):
        sums[int(j)] = sums.get(int(j), 0.0) + float(g)
    idx = sorted(sums)
    reply = Reply(12, num_samples=75, train_loss=2.3456789,
                  index=torch.tensor(idx, dtype=torch.int32),
                  sum_g=torch.tensor([sums[j] for j in idx], dtype=torch.float32))
    # the compact wire format needs K (it fixes the index width); the safetensors one did not
    up = reply.encode(k) if "k_seeds" in inspect.signature(reply.encode).parameters \
        else reply.encode()  # type: ignore[call-arg]
    return {"k": k, "tau": tau, "distinct_seeds": len(idx), "download_bytes": len(down),
            "upload_bytes": len(up), "total_bytes": len(down) + len(up),
            "paper_bytes": 4 * k + 8 * tau + 4}


# -- driver ---------------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_all(quick: bool, sections: list[str], s: Setup | None = None) -> dict[str, Any]:
    s = s or (QUICK if quick else FULL)
    res: dict[str, Any] = {"date": date.today().isoformat(), "machine": _machine(),
                           "load_avg_start": os.getloadavg(), "setup": dict(s.__dict__)}
    model = build_model(s)
    res["setup"]["params"] = sum(p.numel() for p in model.parameters())
    if "step" in sections:
        if s.step_batches:
            res["steps"] = {f"{b}x{s.seq}": bench_step(s, model, b) for b in s.step_batches}
        else:
            res["step"] = bench_step(s, model)
    if "generator" in sections:
        res["generator"] = bench_generator(s, model)
    if "replay" in sections:
        res["replay"] = bench_replay(s, model)
    del model
    if "memory" in sections:
        res["memory"] = memory_peak(s, quick)
    if "bytes" in sections:
        b = measure_bytes(4096, 200)
        res["bytes"] = b | {"ratio_vs_paper": b["total_bytes"] / PAPER_BYTES}
    if "quality" in sections and not s.model:
        from bench.quality import DOLLY, quality

        res["quality"] = (quality(str(BASE_SMALL), rounds=2 if quick else 5, clients_per_round=5,
                                  eval_examples=10 if quick else 50, max_new_tokens=64)
                          if DOLLY.is_file() else {"skipped": f"{DOLLY} is missing"})
    res["load_avg_end"] = os.getloadavg()
    return res


def _table(r: dict[str, Any]) -> str:
    lines = [f"FedKSeed benchmark, {r['date']}, {r['setup']['name']} "
             f"({r['setup']['params'] / 1e6:.2f}M params), batch {r['setup']['batch']} x "
             f"{r['setup']['seq']}; {r['machine']['cpu']}, {r['machine']['torch_threads']} "
             f"threads; load avg {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f}", ""]
    steps = r.get("steps") or ({f"{r['setup']['batch']}x{r['setup']['seq']}": r["step"]}
                               if "step" in r else {})
    for shape, st in steps.items():
        lines.append(f"{'step at batch ' + shape:32s} {'median s':>10s} {'x 2 fwd':>8s}  "
                     f"(target <= {TARGET_STEP})")
        for k, v in st["median_s"].items():
            ratio = st["ratio_vs_two_forwards"].get(k)
            lines.append(f"  {k:30s} {v:10.3f} {'' if ratio is None else f'{ratio:8.2f}'}")
    if "generator" in r:
        g = r["generator"]
        lines += ["", f"generator ({g['values'] / 1e6:.1f}M values)   s   Mvalues/s  "
                      "ns/value/thread"]
        for k, t in g["median_s"].items():
            lines.append(f"  {k:24s} {t:8.3f} {g['throughput_mvalues_per_s'][k]:9.0f} "
                         f"{g['ns_per_value_per_thread'][k]:8.2f}")
    if "replay" in r:
        rp = r["replay"]
        lines += ["", f"replay ({rp['values_per_run'] / 1e6:.0f}M values per run)   Mvalues/s"]
        for k, v in rp["throughput_mvalues_per_s"].items():
            lines.append(f"  {k:30s} {v:10.1f}")
        lines.append(f"  replay / raw generator (parallel) {rp['replay_vs_raw_parallel']:.2f}"
                     f"   / raw 1 thread {rp['replay_vs_raw_1_thread']:.2f}"
                     f"  (target >= {TARGET_REPLAY})")
        p = rp.get("pool")
        if p is not None:
            lines.append(f"  rebuild of {p['seeds']} seeds: " + ", ".join(
                f"{k.removesuffix('_s')} {v:.1f} s" for k, v in p.items()
                if k.endswith("_s") and not k.startswith(("fused", "naive"))))
        if p is not None and "speedup_vs_naive" in p:
            lines.append(f"  {p['seeds']} seeds: fused {p['fused_s']:.1f} s, naive perturb_ per "
                         f"seed {p['naive_perturb_per_seed_s']:.1f} s "
                         f"({p['speedup_vs_naive']:.2f}x), previous sequential "
                         f"{p['naive_v0_sequential_s']:.1f} s ({p['speedup_vs_naive_v0']:.2f}x)")
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"{'peak memory (above runtime)':32s} {'MiB':>8s} {'x fwd':>7s}"
                      f"  (target <= {TARGET_MEMORY})"]
        for op, v in m["ops"].items():
            ratio = m["ratio_vs_inference_forward"].get(op)
            lines.append(f"  {op:30s} {v['peak_bytes'] / 2**20:8.1f} "
                         f"{'' if ratio is None else f'{ratio:7.2f}'}")
    if "bytes" in r:
        b = r["bytes"]
        lines += ["", f"bytes per client per round, K={b['k']}, tau={b['tau']}: "
                      f"{b['download_bytes']} down + {b['upload_bytes']} up = {b['total_bytes']} "
                      f"({b['distinct_seeds']} distinct seeds); paper {b['paper_bytes']} "
                      f"({b['ratio_vs_paper']:.3f}x)"]
    if "quality" in r and "methods" in r["quality"]:
        lines += ["", "quality at equal rounds (Dolly, summarization held out): "
                      "Rouge-L / eval loss"]
        for name, q in r["quality"]["methods"].items():
            lines.append(f"  {name:14s} {q['rougeL_before']:.4f} -> {q['rougeL_after']:.4f}   "
                         f"{q['eval_loss_before']:.4f} -> {q['eval_loss_after']:.4f}   "
                         f"{q['bytes_per_client_round']:.0f} B/client/round")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fedkseed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small model, few repeats")
    ap.add_argument("--sections", default="step,generator,replay,memory,bytes,quality",
                    help="comma-separated subset of step,generator,replay,memory,bytes,quality "
                         "(quality: Rouge-L at equal rounds on Dolly, see bench/quality.py)")
    ap.add_argument("--ranks", default="1,4,16",
                    help="ranks of the low-rank perturbations timed beside the dense ones")
    ap.add_argument("--repeats", type=int, help="override the number of timed repeats")
    ap.add_argument("--replay-pool", type=int,
                    help="seeds of the fused-vs-naive replay (0: skip it)")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads first (default: torch's; the zo pool follows)")
    ap.add_argument("--model", default="",
                    help="a fedtune model path (e.g. smollm2-135m): its real weights, batch 1 x "
                         "128 and 8 x 128, replay of 1024 seeds (quality is skipped)")
    ap.add_argument("--memory-worker", choices=MEMORY_OPS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global FULL, QUICK
    over = {k: v for k, v in (("repeats", args.repeats), ("replay_pool", args.replay_pool),
                              ("ranks", tuple(int(r) for r in args.ranks.split(","))))
            if v is not None}
    FULL, QUICK = (Setup(**(x.__dict__ | over)) for x in (FULL, QUICK))
    real = Setup(**(real_setup(args.model).__dict__ | over)) if args.model else None
    if args.memory_worker:
        print(json.dumps(memory_worker(real or (QUICK if args.quick else FULL),
                                       args.memory_worker)))
        return 0
    res = run_all(args.quick, args.sections.split(","), real)
    print(json.dumps(res, indent=1) if args.json else _table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
