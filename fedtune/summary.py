"""The run's closing record, ``summary.json``, from its metrics rows and counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedtune.algorithms.privacy import Accountant
from fedtune.config import RunConfig


def build_summary(cfg: RunConfig, rows: list[dict[str, Any]], num_clients: int, per_round: int,
                  counters: dict[str, Any], run_dir: Path, model_dir: Path | None,
                  plots: list[str], device: torch.device,
                  accountant: Accountant | None = None) -> dict[str, Any]:
    """``summary.json``: what ran, before and after, the cost, where things are (and the
    privacy spent, with an accountant)."""
    base = rows[0] if rows and rows[0]["round"] == 0 else {}
    final = rows[-1]
    trained = [r for r in rows if r["round"] > 0]
    summary = {
        "algorithm": cfg.algorithm.name,
        "rounds": cfg.federation.rounds,
        "rounds_run": final["round"],
        "num_clients": num_clients,
        "clients_per_round": per_round,
        "base": _scores(base),
        "final": _scores(final),
        "bytes": {
            "up_per_client_round": sum(r["bytes_up_per_client"] for r in trained)
            / max(1, len(trained)),
            "down_per_client_round": sum(r["bytes_down_per_client"] for r in trained)
            / max(1, len(trained)),
            "total": counters["cum_bytes_up"] + counters["cum_bytes_down"],
        },
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "wall_s": counters["wall_s"],
        "run_dir": str(run_dir),
        "model_dir": str(model_dir) if model_dir else None,
        "product": _product(run_dir) if model_dir else None,
        "plots": plots,
    }
    if accountant is not None:
        dp = cfg.algorithm.dp
        summary["privacy"] = {"epsilon": final.get("epsilon"), "delta": accountant.delta,
                              "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm,
                              "target_epsilon": dp.target_epsilon or None,
                              "accountant": "dp_accounting RDP, sampling without replacement, "
                                            "replace-one (client level)"}
    return summary


def _scores(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row's evaluation for summary.json: Rouge-L, eval loss, the share of answers in a
    repetition loop, and the damage guard's (``guard``: eval_loss, rougeL, repetition_share)."""
    out: dict[str, Any] = {"rougeL": row.get("rougeL"), "eval_loss": row.get("eval_loss"),
                           "repetition_share": row.get("repetition")}
    if any(k.startswith("guard_") for k in row):
        out["guard"] = {"eval_loss": row.get("guard_eval_loss"), "rougeL": row.get("guard_rougeL"),
                        "repetition_share": row.get("guard_repetition")}
    return out


def _product(run_dir: Path) -> str | None:
    """FedPT's product is the proxy-tuned large model: its manifest (model/ is the tuned small
    model it steers the large one with)."""
    from fedtune.algorithms.fedpt.product import manifest_path

    manifest = manifest_path(run_dir)
    return str(manifest) if manifest is not None else None
