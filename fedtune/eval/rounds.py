"""A run's global model after an earlier round, rebuilt from a kept checkpoint.

``fedtune eval RUN_DIR --round N`` scores it. The model is built as the run built it (the base
model, the method's ``prepare``), the method's server loads round N's checkpointed state and puts
its global model into it: bit for bit what the run evaluated after round N.
Rounds are kept with ``output.keep_checkpoints``; the last round's checkpoint is always there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtune.config import RunConfig


def model_at_round(run_dir: Path, cfg: RunConfig, round_: int) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of ``run_dir``'s global model after ``round_``."""
    from fedtune.algorithms import METHODS, MethodContext
    from fedtune.federation.checkpoint import kept_rounds, load_checkpoint
    from fedtune.models.loading import load_model_and_tokenizer
    from fedtune.runner import base_model_path

    if cfg.algorithm.name == "fedpt":
        raise ValueError("--round rebuilds a plain model; FedPT's product needs the large model "
                         "(score its last round with `fedtune eval RUN_DIR`)")
    ckpt = load_checkpoint(run_dir, round_)
    if ckpt is None:
        kept = sorted(kept_rounds(run_dir))
        last = load_checkpoint(run_dir)
        have = kept + ([last[0]] if last is not None and last[0] not in kept else [])
        raise FileNotFoundError(f"{run_dir} keeps no checkpoint of round {round_} (rounds "
                                f"kept: {have or 'none'}; set output.keep_checkpoints)")
    _, state, _ = ckpt
    if cfg.model.path == "tiny" and not (run_dir / "base_model" / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}/base_model is missing (the run's tiny base model)")
    model, tokenizer = load_model_and_tokenizer(
        base_model_path(cfg, run_dir, []), cfg.model.dtype, cfg.model.device,
        cache_dir=cfg.model.cache_dir or None)
    method = METHODS[cfg.algorithm.name]
    ctx = MethodContext(cfg.algorithm, int(tokenizer.pad_token_id), tokenizer)
    prepared = method.prepare(ctx, model)
    server = method.server(ctx, prepared)
    try:
        server.load_state_dict(state)
        server.load_global(prepared)
    finally:
        server.close()
    prepared.eval()
    return prepared, tokenizer
