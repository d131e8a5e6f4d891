"""What a run's export carries so it travels: the configured dtype, a portable base, a model card.

After a method's server exports (``model/``, and ``adapter/`` for the LoRA and prompt methods),
:func:`finish_export`

* casts the weights of ``model/`` to ``model.dtype``: FedKSeed keeps fp32 master weights (the
  per-seed updates are far below bf16's resolution) and FedIT merges its adapter into a model
  of the configured dtype, so without the cast one config gave two dtypes;
* names the adapter's base model (``base_model_name_or_path``) portably, never by a path of the
  machine that trained it: the hub id or built-in name as configured (``small``, ``large``,
  ``smollm2-135m``: ``fedtune eval`` and ``generate`` resolve these), else the base model's path
  relative to the adapter directory (``../base_model`` for a ``tiny`` run, whose base model lives
  in the run directory); fedtune's loader resolves a relative base against the adapter
  directory, plain peft against the current directory;
* writes a ``README.md`` model card (base model, method, data, rounds, metrics before and after,
  bytes) in place of peft's empty template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedtune.config import RunConfig
from fedtune.models.loading import DTYPES
from fedtune.report import human_bytes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast_weights(model_dir: Path, dtype: str) -> bool:
    """Cast the floating tensors of ``model_dir``'s safetensors files to ``dtype`` and record it
    in ``config.json``; whether anything changed."""
    target = DTYPES[dtype]
    changed = False
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(f))
        if all(not t.is_floating_point() or t.dtype == target for t in tensors.values()):
            continue
        save_file({k: t.to(target).contiguous() if t.is_floating_point() else t
                   for k, t in tensors.items()}, str(f), metadata={"format": "pt"})
        changed = True
    config = model_dir / "config.json"
    if config.is_file():
        doc = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in doc and doc[key] != _dtype_name(target):
                doc[key] = _dtype_name(target)
                changed = True
        config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return changed


def portable_base(cfg: RunConfig, run_dir: Path, adapter_dir: Path) -> str:
    """The base model as an adapter should name it (see the module docstring)."""
    name = cfg.model.path
    if name == "tiny":
        local: Path | None = run_dir / "base_model"
    else:
        local = Path(name).expanduser() if Path(name).expanduser().exists() else None
    if local is None:  # a hub id or a built-in name: the same on every machine
        return name
    return os.path.relpath(local.resolve(), adapter_dir.resolve())


def _metric(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def model_card(cfg: RunConfig, summary: dict[str, Any], base: str, kind: str) -> str:
    """A short README.md for an exported model or adapter, from the run's config and summary."""
    from fedtune.algorithms import METHODS

    method = METHODS[cfg.algorithm.name]
    by, b, f = summary["bytes"], summary["base"], summary["final"]
    data = cfg.data.format + (f" ({cfg.data.path})" if cfg.data.path else "")
    load = ("from peft import AutoPeftModelForCausalLM\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"adapter\")  # base: see above"
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(\"model\")")
    library = "peft" if kind == "adapter" else "transformers"
    weights = (f"an adapter over the base model in {cfg.model.dtype}" if kind == "adapter"
               else cfg.model.dtype)
    return f"""---
library_name: {library}
base_model: {base}
tags: [fedtune, federated-learning, {cfg.algorithm.name}]
---
# {cfg.run_name}: {cfg.algorithm.name} federated fine-tune of `{base}`

{method.summary}. Trained with fedtune over {summary['rounds_run']} rounds,
{summary['clients_per_round']} of {summary['num_clients']} clients per round; what travelled:
{method.traffic}.

- base model: `{base}` (config `model.path = "{cfg.model.path}"`; a relative path is relative
  to this directory)
- weights: {weights}
- data: {data}, partition `{cfg.data.partition}` over {cfg.data.num_clients} clients, prompt
  template `{cfg.data.template}`, at most {cfg.data.max_length} tokens
- evaluation: {cfg.evaluation.max_examples or 'all'} held-out records, greedy answers of at most
  {cfg.evaluation.max_new_tokens} tokens

| metric | before (base) | after |
| --- | --- | --- |
| eval loss (nats/token) | {_metric(b.get('eval_loss'))} | {_metric(f.get('eval_loss'))} |
| Rouge-L F | {_metric(b.get('rougeL'))} | {_metric(f.get('rougeL'))} |

Bytes per client per round: up {human_bytes(by['up_per_client_round'])}, down
{human_bytes(by['down_per_client_round'])}; {human_bytes(by['total'])} in all. Wall time
{summary['wall_s']:.0f} s, peak memory {summary['peak_memory_mb']:.0f} MB.

```python
{load}
```

Written by `fedtune run`; the run directory's `config.toml` reproduces it.
"""


def finish_export(model_dir: Path, cfg: RunConfig, summary: dict[str, Any]) -> None:
    """Cast, re-point and document the export of a run (``model_dir`` and a sibling
    ``adapter/``)."""
    run_dir = Path(summary["run_dir"])
    for d in dict.fromkeys([model_dir, run_dir / "model", run_dir / "adapter"]):
        if (d / "config.json").is_file():
            cast_weights(d, cfg.model.dtype)
            base, kind = portable_base(cfg, run_dir, d), "model"
        elif (d / "adapter_config.json").is_file():
            base, kind = portable_base(cfg, run_dir, d), "adapter"
            doc = json.loads((d / "adapter_config.json").read_text())
            doc["base_model_name_or_path"] = base
            (d / "adapter_config.json").write_text(json.dumps(doc, indent=2, sort_keys=True)
                                                   + "\n")
        else:
            continue
        (d / "README.md").write_text(model_card(cfg, summary, base, kind))
