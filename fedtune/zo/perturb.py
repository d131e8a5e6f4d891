"""The perturbation z(s) of zeroth-order training, and the in-place maths built on it.

Two generators; the version travels with every seed log, checkpoint and FedKSeed message, and a
log replays with the version it was made with.

Version 2 (the default): Philox4x32-10 counters and an exact-operation Box-Muller, documented
bit for bit in :mod:`fedtune.zo.philox`. Every value is a function of (seed, parameter index,
position), so :func:`perturb_`, :func:`replay_` and :func:`fill_z_` cut the values of all CPU
parameters into ``SHARES_PER_WORKER`` near-equal shares per thread, cutting inside a tensor
where a share ends (the tied embedding, a fifth of SmolLM2, no longer falls to one thread), and
a parameter on another device (CUDA) is drawn there, with torch operations, in one piece. The
compiled kernel draws a page at a time in cache and adds it to θ (or to a replay's
accumulator) there, as torch's ``add_`` adds: one fused multiply-add, so every path gives the
same bits. The same values whatever the shares, chunks and threads (tested).

Version 1 (runs made before version 2; changing it changes every such model ever replayed):

    ps(s, i) = SeedSequence([s, i]).generate_state(1, uint64)[0] >> 1      (a 63-bit integer)
    z(s)_i   = torch.randn(shape_i, generator=torch.Generator("cpu").manual_seed(ps(s, i)),
                           dtype=torch.float32)

where ``i`` is the index of the parameter in the list of trainable parameters (the order of
``model.named_parameters()``, tied weights once). z(s) is therefore a pure function of the seed:
the draw always happens on the CPU in float32 with its own generator, and is only then moved and
cast to the parameter's device and dtype, so a CPU and a GPU device, any thread count, any batch
size and any other parameter's shape agree on it. One stream per (seed, parameter) means z for
parameter 3 never needs the draws of parameters 0..2.

Glossary: s a seed of the pool, z(s) the standard-normal direction over all trainable parameters,
eps (ε) the perturbation scale, g the projected gradient, lr the learning rate.

Precision: the ±εz perturb/restore is exact only up to rounding, and at ZO learning rates (1e-7)
most single updates vanish in fp16/bf16. Every master weight these functions change must be
float32; the functions refuse anything else rather than silently drift.

Speed of version 1 (none of this changes a single bit of the result):

* **Parallel over parameters.** The streams of different parameters are independent, so
  :func:`perturb_`, :func:`replay_` and :func:`fill_z_` hand one
  task per parameter to a small thread pool (``workers``, default ``torch.get_num_threads()``;
  torch releases the GIL inside ``normal_`` / ``add_``). Each parameter is still computed by
  exactly the same sequence of operations as sequentially, so the result is bitwise the same for
  any number of workers.
* **Chunked, cache-resident draws.** On CPU a parameter's stream is drawn ``CHUNK`` values at a
  time into a small per-thread scratch buffer and added at once, so z never exists in full and
  never travels through main memory. torch's CPU ``normal_`` fills a float32 tensor of n >= 16
  values from n uniforms in blocks of 16 (redrawing the last 16 when n is not a multiple of 16),
  so consecutive draws of sizes that are multiples of 16 (the last one >= 16) consume the
  generator exactly as one draw of the whole does and give the same values. This is checked once
  per process on a small case (:func:`chunked_draws_exact`); if a torch version ever broke it,
  the functions fall back to whole-parameter draws. ``CHUNK`` < torch's intra-op grain size
  (32768), so the per-chunk ``add_`` never spawns intra-op threads from inside a pool thread.
* **Replay** keeps, per parameter, one generator per seed and walks the parameter chunk by chunk:
  acc = Σ_s c_s z(s) (seeds ascending) is built for one chunk in cache, then added to θ. Same
  additions in the same order as a whole-parameter accumulator, without the full-size buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import numpy as np
import torch

from fedtune.zo import philox

GENERATOR_VERSION = 2  # what new runs use
GENERATORS = (1, 2)
MIN_PARALLEL = 1 << 20  # values: fewer are drawn in the calling thread (see run_tasks)
SHARES_PER_WORKER = 4  # version-2 tasks per thread: near equal shares of all the values
CHUNK = 32752  # a multiple of 16; CHUNK + 15 <= 32768, torch's intra-op grain size
_MIN_TAIL = 16  # a chunk shorter than this would take normal_'s scalar path: merge it


@lru_cache(maxsize=1 << 18)
def param_seed(seed: int, index: int) -> int:
    """The 63-bit seed of the stream of parameter ``index`` under pool seed ``seed``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(param_seed(seed, index))


def check_version(version: int) -> int:
    if version not in GENERATORS:
        raise ValueError(f"unknown z generator version {version!r}; known: {GENERATORS}")
    return version


def z_for(seed: int, index: int, shape: Sequence[int] | torch.Size,
          version: int = GENERATOR_VERSION) -> torch.Tensor:
    """z(seed) restricted to parameter ``index``: float32 on the CPU, of ``shape``."""
    if check_version(version) == 2:
        return philox.fill_(torch.empty(tuple(shape), dtype=torch.float32), seed, index)
    return torch.randn(tuple(shape), generator=_generator(seed, index), dtype=torch.float32)


# -- execution helpers -------------------------------------------------------------------------

def chunk_bounds(n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """[start, end) ranges covering 0..n: ``chunk`` long, the last merged if shorter than 16."""
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16, got {chunk}")
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < _MIN_TAIL:
        (a, _), (_, b) = bounds[-2], bounds.pop()
        bounds[-1] = (a, b)
    return bounds


@lru_cache(maxsize=1)
def chunked_draws_exact() -> bool:
    """Whether chunked ``normal_`` draws equal one whole draw on this torch (checked once)."""
    for n in (3 * 48 + 5, 2 * 48 + 21, 64, 20):  # a merged tail, a long odd tail, even, one
        whole = z_for(12345, 6, (n,), 1)
        gen, part = _generator(12345, 6), torch.empty(n)
        for a, b in chunk_bounds(n, 48):
            part[a:b].normal_(generator=gen)
        if not torch.equal(whole, part):
            return False
    return True


_local = threading.local()


def _scratch(n: int, slot: int = 0) -> torch.Tensor:
    """A per-thread float32 buffer of at least ``n`` values (slot 0: z, slot 1: accumulator)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(max(n, CHUNK + _MIN_TAIL), dtype=torch.float32)
    return buf[:n]


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads (one per size asked for, never shut down)."""
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fedtune-zo")
        return pool


def run_tasks(tasks: Sequence[tuple[int, Callable[[], object]]], workers: int | None) -> None:
    """Run (size, task) pairs: sequentially, or on ``workers`` threads, largest first. Tasks of
    fewer than ``MIN_PARALLEL`` values in all run in the calling thread: handing work to the
    pool and back costs 0.3-1 ms (measured on 2 cores), more than drawing that much."""
    n = torch.get_num_threads() if workers is None else workers
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    if n == 1 or len(tasks) <= 1 or sum(size for size, _ in tasks) < MIN_PARALLEL:
        for _, task in tasks:
            task()
        return
    ordered = sorted(tasks, key=lambda t: -t[0])  # longest first: balanced finish
    futures = [_executor(n).submit(task) for _, task in ordered]
    for f in futures:
        f.result()  # re-raises a task's exception


def _check_fp32(params: Sequence[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {i} is {p.dtype}; zeroth-order master weights must be "
                            "float32 (see fedtune.zo.perturb)")


def _chunkable(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.is_contiguous() and chunked_draws_exact()


# -- the in-place operations --------------------------------------------------------------------

def _shares(sizes: Sequence[int], n: int) -> list[list[tuple[int, int, int]]]:
    """The values of tensors of ``sizes``, in order, cut into at most ``n`` shares of near
    equal size: each a list of (tensor index, start, end) segments, every cut inside a tensor
    at a multiple of 4 (a version-2 draw starts on a block)."""
    target = max(4, -(-sum(sizes) // n))
    shares: list[list[tuple[int, int, int]]] = [[]]
    room = target
    for i, size in enumerate(sizes):
        a = 0
        while a < size:
            b = size if len(shares) == n else min(size, a + room)
            b = min(size, b + (-b) % 4)
            shares[-1].append((i, a, b))
            room -= b - a
            a = b
            if room <= 0 and len(shares) < n:
                shares.append([])
                room = target
    return [share for share in shares if share]


def _v2_tasks(params: Sequence[torch.Tensor], one: Callable[..., None], *args: object,
              workers: int | None = None) -> list[tuple[int, Callable[[], None]]]:
    """Version-2 tasks: the CPU parameters' values cut into ``SHARES_PER_WORKER`` shares per
    worker, a task calling ``one(p_flat, index, start, end, *args)`` on each segment of its
    share; one task for a whole parameter elsewhere (a CUDA tensor: drawn on its device).
    A few large tasks rather than many pieces: each hand-over to the pool costs ~0.1 ms."""
    n = torch.get_num_threads() if workers is None else workers
    tasks: list[tuple[int, Callable[[], None]]] = []
    cpu = [i for i, p in enumerate(params) if p.device.type == "cpu" and p.is_contiguous()]
    on_cpu = set(cpu)
    for i, p in enumerate(params):
        if i not in on_cpu:
            tasks.append((p.numel(), partial(one, p, i, 0, p.numel(), *args)))
    for share in _shares([params[i].numel() for i in cpu], max(1, n) * SHARES_PER_WORKER):
        segments = [(params[cpu[j]].view(-1), cpu[j], a, b) for j, a, b in share]
        tasks.append((sum(b - a for _, a, b in share),
                      partial(_run_segments, one, segments, args)))
    return tasks


def _run_segments(one: Callable[..., None], segments: Sequence[tuple[torch.Tensor, int, int, int]],
                  args: Sequence[object]) -> None:
    for flat, i, a, b in segments:
        one(flat, i, a, b, *args)


def _whole(p: torch.Tensor) -> bool:
    """Whether a version-2 task covers a whole non-CPU or non-contiguous parameter."""
    return not (p.device.type == "cpu" and p.dim() == 1 and p.is_contiguous())


@torch.no_grad()
def _perturb_v2(p: torch.Tensor, index: int, a: int, b: int, seed: int, scale: float) -> None:
    if _whole(p):
        p.add_(philox.draw_torch(p.numel(), seed, index, device=p.device).view(p.shape),
               alpha=scale)
        return
    # drawn a page at a time in cache and added as torch's add_ adds (one fused multiply-add)
    philox.draw_(seed, index, add_to=p[a:b], scale=scale, offset=a)


def chunk_bounds_v2(a: int, b: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """[start, end) chunks of the segment [a, b): starts stay multiples of 4."""
    return [(c, min(c + chunk, b)) for c in range(a, b, chunk)]


@torch.no_grad()  # grad mode is per thread: set it in the worker
def _perturb_one(p: torch.Tensor, seed: int, index: int, scale: float) -> None:
    if not _chunkable(p):
        p.add_(z_for(seed, index, p.shape, 1).to(p.device), alpha=scale)
        return
    gen, flat = _generator(seed, index), p.view(-1)
    for a, b in chunk_bounds(flat.numel()):
        z = _scratch(b - a)
        z.normal_(generator=gen)
        flat[a:b].add_(z, alpha=scale)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, *,
             workers: int | None = None, version: int = GENERATOR_VERSION) -> None:
    """θ ← θ + scale · z(seed), in place, in parallel (bitwise as sequential).

    z is drawn a chunk at a time into a per-thread scratch buffer: no full-size z in memory.
    Version 1 parallelises over parameters, version 2 over shares of all the values.
    """
    _check_fp32(params)
    if check_version(version) == 2:
        run_tasks(_v2_tasks(params, _perturb_v2, seed, scale, workers=workers), workers)
        return
    run_tasks([(p.numel(), partial(_perturb_one, p, seed, i, scale))
          for i, p in enumerate(params)], workers)


@torch.no_grad()
def _replay_v2(p: torch.Tensor, index: int, a: int, b: int, keys: np.ndarray,
               coeffs: np.ndarray) -> None:
    if _whole(p):
        acc = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for s, c in zip(keys, coeffs, strict=True):
            acc.add_(philox.draw_torch(p.numel(), int(s), index, device=p.device).view(p.shape),
                     alpha=float(c))
        p.add_(acc)
        return
    for c0, e in chunk_bounds_v2(a, b):
        acc = _scratch(e - c0, 1)
        acc.zero_()
        philox.accumulate_(acc, keys, coeffs, index, offset=c0)  # acc += c z(s), seed by seed
        p[c0:e].add_(acc)


@torch.no_grad()  # grad mode is per thread: set it in the worker
def _replay_one(p: torch.Tensor, index: int, seeds: Sequence[int],
                coeffs: Sequence[float]) -> None:
    if not _chunkable(p):
        acc = torch.zeros(p.shape, dtype=torch.float32)
        for s, c in zip(seeds, coeffs, strict=True):
            acc.add_(z_for(s, index, p.shape, 1), alpha=c)
        p.add_(acc.to(p.device))
        return
    gens = [_generator(s, index) for s in seeds]
    flat = p.view(-1)
    for a, b in chunk_bounds(flat.numel()):
        z, acc = _scratch(b - a, 0), _scratch(b - a, 1)
        acc.zero_()
        for gen, c in zip(gens, coeffs, strict=True):
            z.normal_(generator=gen)
            acc.add_(z, alpha=c)
        flat[a:b].add_(acc)


@torch.no_grad()
def replay_(params: Sequence[torch.Tensor], coeffs: Mapping[int, float], *,
            workers: int | None = None, version: int = GENERATOR_VERSION) -> None:
    """θ ← θ + Σ_s coeffs[s] · z(s), fused per parameter (share), in parallel.

    For each parameter, acc = Σ_s c_s z(s)_i is accumulated in float32 over the seeds in
    ascending order (so the result does not depend on the mapping's order: two replays of the
    same coefficients are bitwise equal, whatever ``workers``), then added to θ once. Seeds with
    a zero coefficient are skipped (they add exactly nothing). FedKSeed calls this with
    c_j = −lr · A_j. Memory: two chunk-sized buffers (and, version 1, one generator per seed) per
    thread.
    """
    _check_fp32(params)
    seeds = sorted(s for s, c in coeffs.items() if c != 0.0)
    if not seeds:
        return
    cs = [float(coeffs[s]) for s in seeds]
    if check_version(version) == 2:
        run_tasks(_v2_tasks(params, _replay_v2, philox.seed_array(seeds),
                             np.asarray(cs, dtype=np.float32), workers=workers), workers)
        return
    run_tasks([(p.numel(), partial(_replay_one, p, i, seeds, cs))
          for i, p in enumerate(params)], workers)


# -- keep-z mode: z drawn once, applied several times ---------------------------------------------

def new_z_buffer(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised float32 buffers shaped like ``params`` (on their devices), for z(s)."""
    return [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in params]


@torch.no_grad()  # grad mode is per thread: set it in the worker
def _fill_one(buf: torch.Tensor, seed: int, index: int) -> None:
    if buf.device.type == "cpu" and buf.is_contiguous():
        buf.normal_(generator=_generator(seed, index))  # exactly torch.randn(shape, generator)
    else:
        buf.copy_(z_for(seed, index, buf.shape, 1))


@torch.no_grad()
def _fill_v2(buf: torch.Tensor, index: int, a: int, b: int, seed: int,
             add_to: Sequence[torch.Tensor] | None, scale: float, carry: float) -> None:
    theta = None if add_to is None else add_to[index]
    if _whole(buf):  # a CUDA or non-contiguous tensor: drawn there in one piece with torch
        if theta is not None and carry:
            theta.add_(buf, alpha=carry)
        z = philox.draw_torch(buf.numel(), seed, index, device=buf.device).view(buf.shape)
        buf.copy_(z)
        if theta is not None:
            theta.add_(z, alpha=scale)
    else:
        philox.draw_(seed, index, out=buf[a:b], scale=scale, offset=a, carry=carry,
                     add_to=None if theta is None else theta.view(-1)[a:b])


@torch.no_grad()
def fill_z_(buffers: Sequence[torch.Tensor], seed: int, *, workers: int | None = None,
            version: int = GENERATOR_VERSION, add_to: Sequence[torch.Tensor] | None = None,
            scale: float = 0.0, carry: float = 0.0) -> None:
    """buffers[i] ← z(seed)_i (bitwise :func:`z_for`), in parallel. With ``add_to`` (the
    parameters): first add_to[i] ← add_to[i] + carry · buffers[i] (the z the buffers held: a
    step's deferred last move), then add_to[i] ← add_to[i] + scale · z(seed)_i. Version 2 does
    both as it draws, a page at a time in cache; the result is bitwise :func:`add_z_` with
    ``carry``, the fill, then :func:`add_z_` with ``scale``."""
    _check_fp32(buffers)
    if add_to is not None:
        _check_fp32(add_to)
        if len(add_to) != len(buffers) or any(
                t.shape != z.shape for t, z in zip(add_to, buffers, strict=True)):
            raise ValueError("add_to must hold one tensor shaped like each buffer")
    elif carry:
        raise ValueError("carry needs add_to")
    fused = add_to is not None and version == 2 and all(
        t.is_contiguous() == z.is_contiguous() and t.device == z.device
        for t, z in zip(add_to, buffers, strict=True))
    if add_to is not None and carry and not fused:
        add_z_(add_to, buffers, carry)
    if check_version(version) == 2:
        run_tasks(_v2_tasks(buffers, _fill_v2, seed, add_to if fused else None, scale,
                            carry if fused else 0.0, workers=workers), workers)
    else:
        run_tasks([(b.numel(), partial(_fill_one, b, seed, i)) for i, b in enumerate(buffers)],
                  workers)
    if add_to is not None and not fused:
        add_z_(add_to, buffers, scale)


@torch.no_grad()
def add_z_(params: Sequence[torch.Tensor], z: Sequence[torch.Tensor], scale: float) -> None:
    """θ ← θ + scale · z for a z held in memory (bitwise as :func:`perturb_` with its seed:
    both add with torch's ``add_``, whose vectorised loop fuses the multiply and the add)."""
    _check_fp32(params)
    for p, zi in zip(params, z, strict=True):
        p.add_(zi, alpha=scale)
