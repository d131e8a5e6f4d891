"""Shared test helpers (import them with ``from conftest import ...``) and fixtures."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NOT_COMPARED = {"wall_s", "peak_memory_mb"}  # metrics that differ between two equal runs


def tiny_model(dtype: torch.dtype = torch.float32):
    """A one-layer Llama over 40 tokens, the same weights every call (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).to(dtype)


def examples(client: int, n: int = 4):
    """``n`` random examples of 4-8 tokens for ``client`` (seeded by it), first 2 masked."""
    from fedtune.data.prompts import TokenizedExample

    rng = np.random.default_rng(client)
    out = []
    for _ in range(n):
        ids = rng.integers(3, 40, size=int(rng.integers(4, 9))).tolist()
        out.append(TokenizedExample(ids, [-100, -100] + ids[2:]))
    return out


def build(cfg, model, *, pad_id: int = 0, tokenizer=None, env=None):
    """A method's halves from its registry row, as the runner builds them in process:
    ``(server, device, prepared model)``."""
    from fedtune.algorithms import METHODS, DeviceEnv, MethodContext

    method = METHODS[cfg.name]
    ctx = MethodContext(cfg, pad_id, tokenizer)
    model = method.prepare(ctx, model)
    server = method.server(ctx, model)
    device = method.device(ctx, model, env or DeviceEnv(shared=server.device_share))
    return server, device, model


def play_round(server, device, model, round_, clients, *, seed=lambda cid: 100 + cid,
               after_client=None):
    """One round in process: each client's download, device round and reply, then end_round."""
    server.begin_round(round_)
    for cid in clients:
        up = device.round(model, server.download(round_, cid), examples(cid), round_, seed(cid))
        if after_client is not None:
            after_client(cid)
        server.accept(up)
    server.end_round()


def run_cli(out: Path, *sets: str) -> int:
    """``fedtune run --quiet --out OUT --set S ...``; the exit code."""
    from fedtune.cli import main

    args = ["run", "--quiet", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return main(args)


def rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(run_dir: Path) -> list[dict]:
    """The metrics rows without what differs between two equal runs (time, memory)."""
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows(run_dir)]


def model_hash(path: Path) -> str:
    """SHA-256 of the exported weights: of a model directory, or of a run directory's model/
    (or adapter/, the prompt methods' export)."""
    for d in (path, path / "model", path / "adapter"):
        files = sorted(d.glob("*.safetensors"))
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(f.read_bytes())
            return h.hexdigest()
    raise FileNotFoundError(f"no safetensors under {path}")


@pytest.fixture
def interrupt_at_round(monkeypatch):
    """``interrupt_at_round(n)``: the in-process engine raises KeyboardInterrupt (a Ctrl-C) when
    round ``n`` starts, as a crash mid-run; ``interrupt_at_round(None)`` undoes it."""
    from fedtune.federation.simulation import InProcessEngine

    real = InProcessEngine.run_round

    def interrupt(n):
        if n is None:
            monkeypatch.setattr(InProcessEngine, "run_round", real)
            return

        def interrupted(self, round_, on_client=None):
            if round_ == n:
                raise KeyboardInterrupt
            return real(self, round_, on_client)

        monkeypatch.setattr(InProcessEngine, "run_round", interrupted)

    return interrupt
