"""The ServerApp: fedtune's run recipe (:func:`fedtune.runner.run`) with the Flower engine.

Run config (``flwr run APP --run-config FILE.toml``, written by ``fedtune flower``):

``fedtune-config``  the run's TOML config, as text
``run-dir``         the run directory on the SuperLink's machine (absolute)

Everything the in-process run writes is written here too (``metrics.jsonl``, a checkpoint per
round, the exported model, ``summary.json``). If ``run-dir`` already holds a checkpoint, the run
resumes from its last completed round (with the saved config): that is how a run continues after
the SuperLink or the ServerApp was restarted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune import runner
from fedtune.algorithms.base import Device, Server
from fedtune.config import load_config
from fedtune.federation.config import FederationConfig
from fedtune.federation.flower.engine import FlowerEngine
from fedtune.federation.secagg import params_of
from fedtune.logsetup import configure_logging

log = logging.getLogger(__name__)
app = ServerApp()


def _settings(run_config: dict[str, Any]) -> tuple[str, Path]:
    text, run_dir = run_config.get("fedtune-config", ""), run_config.get("run-dir", "")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("run config 'fedtune-config' is empty: start runs with `fedtune flower "
                         "run` / `fedtune flower local`, or pass the config's TOML text in it")
    if not isinstance(run_dir, str) or not run_dir:
        raise ValueError("run config 'run-dir' is empty: name the run directory")
    return text, Path(run_dir)


def _resolved(text: str, run_dir: Path) -> dict[str, Any]:
    """A config text as the run directory would hold it (for comparing two of them)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text)
        cfg = load_config(path)
    cfg.output.dir = str(run_dir)
    return cfg.to_dict()


def serve(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the configured federation over ``grid``; return the run summary."""
    text, run_dir = _settings(run_config)
    resuming = (run_dir / "checkpoint" / "engine.json").is_file()
    if not resuming and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"{run_dir} holds a run without a checkpoint to resume from")

    def make_engine(server: Server, device: Device, model: torch.nn.Module, clients: Any,
                    fed: FederationConfig) -> FlowerEngine:
        # what the nodes get: the config exactly as saved in the run directory
        saved = (run_dir / runner.CONFIG_NAME).read_text()
        secagg = (params_of(load_config(run_dir / runner.CONFIG_NAME))
                  if fed.secure_aggregation else None)
        engine = FlowerEngine(grid, server, len(clients), fed, saved, secagg)
        engine.wait_for_nodes()
        return engine

    if resuming:
        log.info("%s holds a checkpoint: resuming from its last completed round", run_dir)
        if _resolved(text, run_dir) != _resolved((run_dir / runner.CONFIG_NAME).read_text(),
                                                 run_dir):
            log.warning("the submitted config differs from the one saved in %s; the saved one "
                        "is used", run_dir)
        return runner.resume(run_dir, progress=False, engine=make_engine)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "submitted-config.toml"
    cfg_file.write_text(text)
    cfg = load_config(cfg_file)
    cfg.output.dir = str(run_dir)
    return runner.run(cfg, run_dir, progress=False, engine=make_engine)


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging()
    summary = serve(grid, dict(context.run_config))
    log.info("fedtune run finished: %s", summary.get("run_dir"))
