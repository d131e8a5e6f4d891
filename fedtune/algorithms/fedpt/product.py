"""The run's product: the proxy-tuned large model, as a directory ``fedtune eval/generate`` load.

``RUN_DIR/proxy/fedpt.json`` names the three parts and α; the tuned small model is the run's
ordinary export (``RUN_DIR/model``, a plain HF model directory) and the anti-expert is saved
beside the JSON (``proxy/anti_expert``). The large model is referenced, never copied: by its path
or hub id, and by the URL of its logits service when the run used one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.algorithms.fedpt.proxy import ProxyModel
from fedtune.logits import LocalLogits, LogitsSource
from fedtune.logits.remote import remote_from_env
from fedtune.logits.service import ServiceProcess, spawn_service

FORMAT = "fedtune-proxy-tuned/1"
MANIFEST = "fedpt.json"


def manifest_path(path: Path) -> Path | None:
    """The manifest of a FedPT run directory or product directory, if ``path`` holds one."""
    for p in (path / "proxy" / MANIFEST, path / MANIFEST):
        if p.is_file():
            return p
    return None


def save_manifest(proxy_dir: Path, *, large_model: str, large_url: str, alpha: float,
                  plausibility: float = 0.0, tuned: str, anti_expert: str, tokenizer_hash: str,
                  vocab_size: int) -> Path:
    proxy_dir.mkdir(parents=True, exist_ok=True)
    large = large_model if not Path(large_model).exists() else str(Path(large_model).resolve())
    doc = {"format": FORMAT, "large_model": large, "large_url": large_url, "alpha": alpha,
           "plausibility": plausibility, "tuned": tuned, "anti_expert": anti_expert,
           "tokenizer_hash": tokenizer_hash,
           "vocab_size": vocab_size,
           "formula": "logits = large + alpha * (tuned - anti_expert), each cut to vocab_size "
                      "columns, at every decoding step; with plausibility = beta > 0 the offset "
                      "acts only on tokens with p_large >= beta * max p_large (the others keep "
                      "log p_large)"}
    out = proxy_dir / MANIFEST
    out.write_text(json.dumps(doc, indent=1))
    return out


@dataclass
class LoadedProxy:
    proxy: ProxyModel
    tokenizer: Any
    service: ServiceProcess | None

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()


def load_proxy(path: Path, *, large_url: str = "", large_access: str = "", device: str = "auto",
               dtype: str = "float32", alpha: float | None = None,
               plausibility: float | None = None) -> LoadedProxy:
    """Load the proxy-tuned model of a run or product directory.

    The large model is reached at ``large_url`` (or the manifest's URL, which never holds a
    credential: the token and CA come from the ``FEDTUNE_LOGITS_*`` variables,
    :func:`fedtune.logits.remote.remote_from_env`); ``large_access = 'spawn'`` starts a service
    for it; otherwise it is loaded in this process. ``alpha`` and ``plausibility``, when given,
    replace the manifest's (the same tuned pair, decoded another way: no retraining).
    """
    from fedtune.models.loading import load_model_and_tokenizer

    mpath = manifest_path(path)
    if mpath is None:
        raise FileNotFoundError(f"{path} holds no {MANIFEST}: not a FedPT run")
    doc = json.loads(mpath.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unknown format {doc.get('format')!r}")
    tuned, tok = load_model_and_tokenizer(str(mpath.parent / doc["tuned"]), dtype, device)
    anti, _ = load_model_and_tokenizer(str(mpath.parent / doc["anti_expert"]), dtype, device)
    url = large_url or doc.get("large_url", "")
    service = None
    large: LogitsSource
    if url and large_access != "in-process":
        large = remote_from_env(url)
    elif large_access == "spawn":
        service = spawn_service(doc["large_model"], dtype=dtype)
        large = service.client()
    else:
        model, ltok = load_model_and_tokenizer(doc["large_model"], dtype, device)
        large = LocalLogits(model, ltok, name=doc["large_model"])
    try:
        proxy = ProxyModel(large, LocalLogits(tuned, tok), LocalLogits(anti, tok),
                           alpha=float(doc["alpha"] if alpha is None else alpha),
                           plausibility=float(doc.get("plausibility", 0.0)
                                              if plausibility is None else plausibility))
    except Exception:
        if service is not None:
            service.stop()
        raise
    return LoadedProxy(proxy, tok, service)


def evaluate_product(path: Path, records: Any, cfg: Any, *, large_url: str = "",
                     alpha: float | None = None,
                     plausibility: float | None = None) -> dict[str, float]:
    """``fedtune eval`` of a FedPT run: Rouge-L and eval loss of the proxy-tuned large model."""
    from fedtune.algorithms.fedpt.evaluate import evaluate_proxy

    loaded = load_proxy(path, large_url=large_url, device=cfg.model.device, dtype=cfg.model.dtype,
                        alpha=alpha, plausibility=plausibility)
    try:
        ev = cfg.evaluation
        return evaluate_proxy(loaded.proxy, loaded.tokenizer, records,
                              max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                              max_length=cfg.data.max_length, template=cfg.data.template,
                              scorer=ev.rouge)
    finally:
        loaded.close()


def generate_product(path: Path, prompt: str, *, max_new_tokens: int, large_url: str = "",
                     alpha: float | None = None, plausibility: float | None = None) -> str:
    """``fedtune generate`` of a FedPT run: greedy decoding under the proxy-tuned logits."""
    from fedtune.algorithms.fedpt.proxy import proxy_generate_ids
    from fedtune.eval.generation import encode_prompt

    loaded = load_proxy(path, large_url=large_url, alpha=alpha, plausibility=plausibility)
    try:
        tok = loaded.tokenizer
        ids = proxy_generate_ids(loaded.proxy, [encode_prompt(tok, prompt)],
                                 max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                                 pad_id=int(tok.pad_token_id))
        return str(tok.decode(ids[0], skip_special_tokens=True)).strip()
    finally:
        loaded.close()
