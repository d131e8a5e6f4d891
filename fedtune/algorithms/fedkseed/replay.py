"""The seed pool and the model it defines: w = w0 − lr · Σ_j A_j z(s_j).

Both sides derive the K pool seeds from the run seed, so they never travel. Server and client
rebuild the model with the same function, :func:`rebuild_`, from the same float32 accumulators
(those the download carries), so a client's model equals the server's global model bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.seeds import seed_pool
from fedtune.zo.spec import DEFAULT_Z, ZSpec, replay_z_

__all__ = ["FileWeights", "RoundModel", "catch_up_", "rebuild_", "rebuild_from_log",
           "replay_coefficients", "seed_pool"]


def replay_coefficients(pool: Sequence[int], accumulators: torch.Tensor, lr: float
                        ) -> dict[int, float]:
    """{s_j: −lr · A_j} for the seeds with A_j ≠ 0 (A as float32, the values on the wire)."""
    a = accumulators.to(torch.float32).tolist()
    return {pool[j]: -lr * float(a_j) for j, a_j in enumerate(a) if a_j != 0.0}


@torch.no_grad()
def catch_up_(params: Sequence[torch.Tensor], pool: Sequence[int], delta: torch.Tensor,
              lr: float, z: ZSpec = DEFAULT_Z) -> None:
    """Move a cached model of round r0 to round r: θ ← θ − lr · Σ_j ΔA_j z(s_j), ΔA = A_r − A_r0.

    The paper's incremental rebuild: it costs one generation of z per seed whose accumulator
    changed since r0, instead of one per non-zero seed. It equals :func:`rebuild_` up to float32
    rounding (the two add the same terms in a different grouping), not bit for bit; a device that
    needs the server's exact bits rebuilds from w0.
    """
    replay_z_(params, replay_coefficients(pool, delta, lr), z)


@torch.no_grad()
def rebuild_(params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor], pool: Sequence[int],
             accumulators: torch.Tensor, lr: float, z: ZSpec = DEFAULT_Z) -> None:
    """Set ``params`` to w0 − lr · Σ_j A_j z(s_j): copy w0, then one fused replay of every seed.

    Costs at most K generations of z whatever the number of rounds (dense), or one matrix
    product per matrix (low-rank).
    """
    for p, p0 in zip(params, w0, strict=True):
        p.copy_(p0)
    catch_up_(params, pool, accumulators, lr, z)


@torch.no_grad()
def rebuild_from_log(params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor],
                     log: Mapping[str, Any]) -> None:
    """Set ``params`` to the model a seed log (``fedkseed_seeds.json``) defines, with the z it
    was made with (a log without a version: generator 1, dense). ``params`` and ``w0`` are the
    parameters the log's ``param_names`` lists, in that order (the tuned ones: without the
    embeddings unless ``algorithm.fedkseed.tune_embeddings``)."""
    rebuild_(params, w0, log["seed_pool"], torch.tensor(log["accumulators"],
                                                        dtype=torch.float32),
             float(log["lr"]), ZSpec.from_log(log))


class FileWeights(Sequence[torch.Tensor]):
    """w0 read from a model directory's safetensors files, one tensor at a time.

    A device rebuilds w0 − lr · Σ A_j z(s_j) once per round; holding w0 as a second float32 copy
    of the model doubles its memory (538 MB for a 135M model). This sequence reads each
    parameter from the file when :func:`rebuild_` reaches it (safetensors memory-maps the file),
    cast to float32 exactly as loading did, so the rebuilt model is bitwise the same.
    """

    def __init__(self, model_dir: str | Path, names: Sequence[str]) -> None:
        from safetensors import safe_open

        self.names = list(names)
        self._where: dict[str, Path] = {}
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  # safe_open has keys(), not __iter__
                    self._where.setdefault(key, file)
        missing = [n for n in self.names if n not in self._where]
        if missing:
            raise KeyError(f"{model_dir} holds no tensor {missing[0]!r} (and {len(missing) - 1} "
                           "more): not the directory the model was loaded from")

    def __len__(self) -> int:
        return len(self.names)

    def _load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name).to(torch.float32)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self._load(self.names[index])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for name in self.names:
            yield self._load(name)


class RoundModel:
    """w0 and the model it defines with given accumulators, rebuilt at most once per distinct A.

    The rebuild is deterministic, so in process (many simulated devices and the server in one
    process) it is done once per distinct A and a copy restored for every later client: bit for
    bit the model each device would rebuild itself, at the cost of one more float32 copy of the
    trainable parameters instead of one K-seed replay per client. ``cache=False`` (a real device,
    one client per process) keeps no copy. The server half owns one; a simulated device in the
    same process shares it (:class:`fedtune.algorithms.base.DeviceEnv` ``colocated``).
    """

    def __init__(self, w0: Sequence[torch.Tensor], pool: Sequence[int], lr: float,
                 cache: bool = True, z: ZSpec = DEFAULT_Z) -> None:
        self.w0, self.pool, self.lr, self.cache, self.z = w0, pool, lr, cache, z
        self._cached: list[torch.Tensor] = []
        self._cached_acc: torch.Tensor | None = None

    @torch.no_grad()
    def set_(self, params: Sequence[torch.Tensor], acc: torch.Tensor) -> None:
        """Set ``params`` to w0 − lr · Σ_j A_j z(s_j) for ``acc`` = A."""
        if not self.cache:
            rebuild_(params, self.w0, self.pool, acc, self.lr, self.z)
            return
        if self._cached_acc is None or not torch.equal(self._cached_acc, acc):
            rebuild_(params, self.w0, self.pool, acc, self.lr, self.z)
            self._cached = [p.detach().clone() for p in params]
            self._cached_acc = acc.clone()
            return
        for p, cached in zip(params, self._cached, strict=True):
            p.copy_(cached)
