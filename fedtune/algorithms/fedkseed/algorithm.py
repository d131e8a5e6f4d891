"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024, arXiv 2312.06353), engine-facing glue.

Federated full-parameter tuning by two-point zeroth-order SGD where every perturbation comes from
a pool of K seeds: clients send only (seed index, Σ g) pairs, the server keeps per-seed
accumulators A, and the global model is w = w0 − lr · Σ_j A_j z(s_j). FedKSeed-Pro samples seeds
with probabilities from their importance (:mod:`.pro`).

How the one shared model is handled. A real device holds w0 (the base model) and rebuilds the
round's model from the K accumulators it downloads; so does every simulated client here: on
``client_round`` the trainable parameters are reset to w0 and one fused replay of all seeds is
applied (:func:`.replay.rebuild_`), from the float32 A decoded from the download bytes. The
server's ``load_global`` runs the same function on its own A, so the model a client trains from
equals the global model bit for bit. Memory trade-off: one float32 copy of the trainable
parameters (w0) is kept, shared by the simulated devices and the server (a real server needs
none: it only ever stores K numbers, plus w0 on disk to export). Rebuilding costs at most K
generations of z per client per round; an incremental rebuild from a device's cached model is
possible (the paper's ΔA: :func:`.replay.catch_up_`, ``FedKSeedServer.download(round, since)``)
but is not what this engine's stateless clients do; a device with a ``device_cache`` folder (a
Flower SuperNode with ``federation.delta_downloads``) keeps the model it last trained from there
and applies only ΔA since then. Because the rebuild is deterministic, the
engine rebuilds once per round and restores that copy for each client (see ``_set_round_model``).

Master weights: the trainable parameters are kept in float32 (a model loaded in fp16/bf16 is
upcast in ``prepare``): ZO updates of ~lr · g are far below half-precision resolution.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedtune.algorithms.base import ReplyInfo
from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedkseed.client import local_zo_train
from fedtune.algorithms.fedkseed.replay import FileWeights, catch_up_, rebuild_, seed_pool
from fedtune.algorithms.fedkseed.server import FedKSeedServer
from fedtune.algorithms.fedkseed.wire import Download, Reply
from fedtune.data.prompts import TokenizedExample
from fedtune.wire import MessageError
from fedtune.zo.perturb import GENERATOR_VERSION

log = logging.getLogger(__name__)
SEED_LOG = "fedkseed_seeds.json"


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters in index order (``named_parameters``, tied weights once)."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


class FedKSeed:
    """The engine-facing algorithm (see :class:`fedtune.algorithms.base.Algorithm`)."""

    def __init__(self, cfg: AlgorithmConfig, pad_id: int, pro: bool) -> None:
        self.cfg = cfg.fedkseed
        self.pad_id = pad_id
        self.pro = pro
        self.name = "fedkseed-pro" if pro else "fedkseed"
        self.pool = seed_pool(self.cfg.seed, self.cfg.k_seeds)
        self.server = FedKSeedServer(self.cfg, pro)
        self.w0: Sequence[torch.Tensor] | None = None
        # A device (one client per process) sets these to hold about inference memory: w0 read
        # from the model's files instead of a copy in memory, and no copy of the round model.
        self.w0_dir: Path | None = None
        self.cache_round_model = True
        self._cached: list[torch.Tensor] = []
        self._cached_acc: torch.Tensor | None = None
        self.param_names: list[str] = []
        # a device that keeps its round model between rounds (Flower nodes, delta downloads)
        self.device_cache: Path | None = None

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if any(p.dtype != torch.float32 for p in model.parameters()):
            log.warning("%s: upcasting the model to float32 (ZO master weights must be fp32)",
                        self.name)
            model = model.to(torch.float32)
        for p in model.parameters():
            p.requires_grad_(True)  # full-parameter; no autograd graph is ever built
        model.eval()
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.w0_dir is not None:
            self.w0 = FileWeights(self.w0_dir, self.param_names)
        else:
            self.w0 = [p.detach().clone() for p in trainable(model)]
        return model

    def _w0(self) -> Sequence[torch.Tensor]:
        if self.w0 is None:
            raise RuntimeError("prepare() must run first")
        return self.w0

    # -- server side --------------------------------------------------------------------------
    def download(self, round_: int, client_id: int) -> bytes:
        return self.server.download(round_)

    def download_since(self, round_: int, since: int) -> bytes:
        """The download for a device holding the global model of round ``since`` (ΔA)."""
        return self.server.download(round_, since)

    def begin_round(self, round_: int) -> None:
        self.server.begin_round(round_)

    def accept(self, payload: bytes) -> ReplyInfo:
        return self.server.accept(payload)

    def end_round(self) -> None:
        self.server.end_round()

    def load_global(self, model: torch.nn.Module) -> None:
        self._set_round_model(trainable(model), self.server.accumulators)

    def _set_round_model(self, params: list[torch.nn.Parameter], acc: torch.Tensor) -> None:
        """Set ``params`` to w0 − lr · Σ_j A_j z(s_j) for ``acc`` = A.

        The rebuild is deterministic, so the in-process engine does it once per distinct A and
        restores a copy for every later client of the round: bit for bit the model each device
        would rebuild itself (whose download bytes are still counted), at the cost of one more
        float32 copy of the trainable parameters instead of one K-seed replay per client.
        """
        if not self.cache_round_model:
            rebuild_(params, self._w0(), self.pool, acc, self.cfg.lr)
            return
        if self._cached_acc is None or not torch.equal(self._cached_acc, acc):
            rebuild_(params, self._w0(), self.pool, acc, self.cfg.lr)
            self._cached = [p.detach().clone() for p in params]
            self._cached_acc = acc.clone()
            return
        with torch.no_grad():
            for p, cached in zip(params, self._cached, strict=True):
                p.copy_(cached)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.server.state_dict()
        state["seed_pool"] = torch.tensor(self.pool, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pool = state.get("seed_pool")
        if pool is None or pool.tolist() != self.pool:
            raise ValueError("checkpoint seed pool differs from this config's "
                             "(algorithm.fedkseed.seed / k_seeds changed?)")
        self.server.load_state_dict({k: v for k, v in state.items() if k != "seed_pool"})

    # -- device side --------------------------------------------------------------------------
    def client_round(self, model: torch.nn.Module, payload: bytes,
                     examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        c = self.cfg
        down = Download.decode(payload, c.k_seeds, self.pro, expect_round=round_)
        params = trainable(model)
        if down.since != 0:  # the cached model of round `since`, moved on by ΔA
            self._load_device_model(params, down.since)
            catch_up_(params, self.pool, down.accumulators, c.lr)
        else:  # the device's model of this round: w0 and the K accumulators, nothing else
            self._set_round_model(params, down.accumulators)
        if self.device_cache is not None:
            self._save_device_model(params, round_ - 1)
        probs = down.probs.double().numpy() if down.probs is not None else None
        stats, loss, _ = local_zo_train(
            model, params, self.pool, examples, tau=c.tau, batch_size=c.batch_size,
            eps=c.zo_eps, lr=c.lr, clip=c.clip, pad_id=self.pad_id, seed=seed, probs=probs,
            keep_z=c.keep_z)
        if not stats.count:
            raise RuntimeError("every ZO step had a non-finite loss")
        idx = sorted(stats.count)
        reply = Reply(round_, len(examples), loss,
                      torch.tensor(idx, dtype=torch.int32),
                      torch.tensor([stats.sum_g[j] for j in idx], dtype=torch.float32))
        if self.pro:
            reply.sum_abs_clip = torch.tensor([stats.sum_abs_clip[j] for j in idx],
                                              dtype=torch.float32)
            reply.count = torch.tensor([stats.count[j] for j in idx], dtype=torch.int32)
        if not torch.isfinite(reply.sum_g).all():
            raise MessageError("a seed's sum of g overflows float32")
        return reply.encode(c.k_seeds)

    def _device_model_file(self, round_: int) -> Path:
        if self.device_cache is None:
            raise MessageError("a download of the change since an earlier round needs a cached "
                               "model; this device holds only w0")
        return self.device_cache / f"fedkseed-round-{round_:06d}.safetensors"

    def _load_device_model(self, params: list[torch.nn.Parameter], since: int) -> None:
        path = self._device_model_file(since)
        if not path.is_file():
            raise MessageError(f"download of the change since round {since}, but this device "
                               f"does not hold that round's model ({path})")
        with safe_open(str(path), "pt") as f, torch.no_grad():
            for name, p in zip(self.param_names, params, strict=True):
                p.copy_(f.get_tensor(name))

    def _save_device_model(self, params: list[torch.nn.Parameter], round_: int) -> None:
        """Keep the model of ``round_`` (this round's start) for a later ΔA download.

        The previous one is kept too: the server only learns what a device holds from its
        reply, so after a reply that never arrived it still sends the change since the older.
        """
        path = self._device_model_file(round_)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: p.detach().contiguous() for n, p in zip(self.param_names, params,
                                                               strict=True)}, str(tmp))
        os.replace(tmp, path)
        held = sorted(path.parent.glob("fedkseed-round-*.safetensors"))
        for old in held[:-2]:
            old.unlink()

    # -- result -------------------------------------------------------------------------------
    def seed_log(self) -> dict[str, Any]:
        """Everything needed to rebuild the global model from w0 (float32 A as exact floats)."""
        return {"algorithm": self.name, "generator_version": GENERATOR_VERSION,
                "k_seeds": self.cfg.k_seeds, "lr": self.cfg.lr, "zo_eps": self.cfg.zo_eps,
                "run_seed": self.cfg.seed, "seed_pool": self.pool,
                "accumulators": [float(a) for a in self.server.accumulators.tolist()],
                "param_names": self.param_names,
                "formula": "w = w0 - lr * sum_j accumulators[j] * z(seed_pool[j]), "
                           "z from fedtune.zo.perturb"}

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Save the global model (save_pretrained) and the seed log next to it."""
        self.load_global(model)
        model_dir = out_dir / "model"
        model.save_pretrained(model_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(model_dir)
        (out_dir / SEED_LOG).write_text(json.dumps(self.seed_log()))
        return model_dir
