"""Loading a causal LM and its tokenizer from a local directory or a hub id.

Everything goes through ``AutoTokenizer`` / ``AutoModelForCausalLM``, so the tiny model fedtune
builds itself (:mod:`fedtune.models.tiny`) and downloaded checkpoints load the same way. Batched
training and generation need a pad token, which many causal LMs lack; :func:`ensure_pad_token`
supplies one and reports what it did so the caller can log it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.models.gguf import EMBEDDED_GGUF, convert_gguf, embedded_gguf_path, is_gguf_path

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# "name" or "owner/name" made of letters, digits, '-', '_' and '.', as on the Hugging Face hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")

log = logging.getLogger(__name__)

# The embedded base models (one tokenizer, one vocabulary; BENCHMARKS.md has the commands): a
# model path of exactly 'small' or 'large' names them, unless a local directory of that name exists.
BASE_MODELS_DIR = Path(__file__).resolve().parents[1] / "base_models"
# fedtune's own books pair, and FedPT's small partner of smollm2-135m (its tokenizer, distilled
# from its logits through the service: base_models/smollm2-partner/README.md)
BASE_MODELS = ("small", "large", "smollm2-partner")

PAD_PRESENT = "present"
PAD_REUSED_EOS = "reused eos"
PAD_ADDED = "added"


def resolve_device(name: str) -> torch.device:
    """The torch device for a config value: 'auto' is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a config value ('float32', 'float16' or 'bfloat16')."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(DTYPES)}") from None


def is_plausible_hub_id(name: str) -> bool:
    """Whether ``name`` could be a hub id ('gpt2', 'org/model') rather than a filesystem path."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def base_model_path(name: str) -> Path:
    """The directory of an embedded base model (:data:`BASE_MODELS`); loads offline as it is."""
    if name not in BASE_MODELS:
        raise ValueError(f"unknown base model {name!r}; expected one of {list(BASE_MODELS)}")
    return BASE_MODELS_DIR / name


def resolve_model_source(path_or_id: str | Path, cache_dir: str | Path | None = None) -> str:
    """Return the string to pass to ``from_pretrained``; a missing local path fails clearly.

    A ``.gguf`` file is converted once into a cached model directory (:mod:`fedtune.models.gguf`,
    under ``cache_dir``) and that directory is returned; any other existing path is used as a
    local directory; 'small', 'large' and 'smollm2-partner' (when no such directory exists) are
    the embedded base models, 'smollm2-135m' the embedded real model (a GGUF inside an installed
    package). Anything else must look like a hub id, so a mistyped local path gives a
    :class:`FileNotFoundError` naming it instead of a hub error.
    """
    name = str(path_or_id)
    if Path(name).expanduser().exists():
        if is_gguf_path(name) and Path(name).expanduser().is_file():
            return str(convert_gguf(name, cache_dir))
        return str(Path(name).expanduser())
    if isinstance(path_or_id, str) and name in BASE_MODELS:
        return str(base_model_path(name))
    if isinstance(path_or_id, str) and name in EMBEDDED_GGUF:
        return str(convert_gguf(embedded_gguf_path(name), cache_dir))
    if is_gguf_path(name):
        raise FileNotFoundError(f"GGUF file {name!r} does not exist")
    if isinstance(path_or_id, Path) or not is_plausible_hub_id(name):
        raise FileNotFoundError(f"model path {name!r} does not exist (and is not a hub id)")
    return name


class ModelNotFound(FileNotFoundError):
    """A model name that is no local path, no built-in name and no loadable hub id."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _not_found(name: str) -> ModelNotFound:
    builtin = ", ".join(["tiny", *BASE_MODELS, *EMBEDDED_GGUF])
    where = ("not in the local Hugging Face cache (HF_HUB_OFFLINE=1: the hub is not asked)"
             if _offline() else "not loadable from the Hugging Face hub")
    return ModelNotFound(f"model {name!r} is not a local path, not a built-in name ({builtin}) "
                         f"and {where}")


def check_model_source(path_or_id: str | Path, cache_dir: str | Path | None = None) -> None:
    """Fail fast, in one line, on a model that cannot load (before a run does any work).

    Local paths, built-in names and GGUF files resolve as the loader would; a hub id is checked
    against the local Hugging Face cache when offline (online, the loader asks the hub).
    """
    if str(path_or_id) == "tiny":
        return
    source = resolve_model_source(path_or_id, cache_dir)
    if Path(source).exists() or not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(source, "config.json"), str):
        raise _not_found(source)


def _from_pretrained(factory: Any, source: str, **kwargs: Any) -> Any:
    """Call ``factory.from_pretrained``; a hub id that cannot be fetched names itself clearly."""
    try:
        return factory.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).exists():
            raise
        raise _not_found(source) from err


def load_tokenizer(path_or_id: str | Path, *, trust_remote_code: bool = False,
                   cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model directory or a hub id with ``AutoTokenizer``."""
    source = resolve_model_source(path_or_id, cache_dir)
    tokenizer: PreTrainedTokenizerBase = _from_pretrained(
        AutoTokenizer, source, trust_remote_code=trust_remote_code
    )
    return tokenizer


def load_model(
    path_or_id: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    *,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM`` in ``dtype`` and move it to ``device``."""
    source = resolve_model_source(path_or_id, cache_dir)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    model: PreTrainedModel = _from_pretrained(
        AutoModelForCausalLM, source, dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    model.to(target)  # type: ignore[arg-type]  # nn.Module.to moves in place
    return model


def _embedding_rows(model: PreTrainedModel) -> int:
    """Number of rows of the model's input embedding matrix."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"unexpected input embedding weight of type {type(weight).__name__}")
    return int(weight.shape[0])


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> str:
    """Make sure ``tokenizer`` has a pad token and ``model`` knows its id; say what was done.

    Returns 'present' (the tokenizer already had one), 'reused eos' (EOS doubles as pad; padded
    positions are masked by the attention mask and by -100 labels, so this is safe) or 'added'
    (a new ``<pad>`` token; the model's embeddings are resized to cover it, new rows initialised
    deterministically without touching the global RNG). Sets ``model.config.pad_token_id`` and
    the generation config's ``pad_token_id`` in every case.
    """
    action = PAD_PRESENT
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            action = PAD_REUSED_EOS
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            action = PAD_ADDED
            if len(tokenizer) > _embedding_rows(model):
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    model.resize_token_embeddings(len(tokenizer))
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
    return action


def load_model_and_tokenizer(
    path_or_id: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    *,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer, make sure a pad token exists, and put the model in eval mode.

    A peft adapter directory (``adapter_config.json``, no ``config.json``: the export of the
    prompt-tuning methods) loads its base model (``base_model_name_or_path``) with the adapter.
    """
    adapter = Path(path_or_id)
    if (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
        import json

        from peft import PeftModel

        base = json.loads((adapter / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter}/adapter_config.json names no base model")
        if not Path(base).is_absolute() and (adapter / base).exists():
            base = str(adapter / base)  # fedtune's exports name a local base relative to here
        base_model, _ = load_model_and_tokenizer(base, dtype, device,
                                                 trust_remote_code=trust_remote_code,
                                                 cache_dir=cache_dir)
        tokenizer = load_tokenizer(adapter)
        ensure_pad_token(tokenizer, base_model)
        peft_model: Any = PeftModel.from_pretrained(base_model, str(adapter))
        return peft_model.eval(), tokenizer
    tokenizer = load_tokenizer(path_or_id, trust_remote_code=trust_remote_code,
                               cache_dir=cache_dir)
    model = load_model(path_or_id, dtype, device, trust_remote_code=trust_remote_code,
                       cache_dir=cache_dir)
    action = ensure_pad_token(tokenizer, model)
    if action != PAD_PRESENT:
        log.info("pad token of %s: %s (id %s)", path_or_id, action, tokenizer.pad_token_id)
    model.eval()
    return model, tokenizer
