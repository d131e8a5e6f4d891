"""GGUF checkpoints out: a fine-tuned Llama-family model as a file llama.cpp-style runtimes load.

``write_gguf(model, tokenizer, out, quant, source=...)`` writes the model's weights with the
``gguf`` package's writer and quantisers:

* **metadata**: copied from ``source``, the GGUF the run started from (architecture,
  hyper-parameters, tokenizer, chat template, licence), with only the file type changed; without
  a source (a model of fedtune's own, or a hub model) it is built from the model config and a
  byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``); anything else is refused;
* **names**: Hugging Face names map to GGUF names through ``gguf``'s own ``TensorNameMap``
  (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
* **rotary layout**: Hugging Face Llama checkpoints order each q/k head's rows as two halves
  (``rotate_half``); llama.cpp pairs rows (0, 1), (2, 3), ... So a head's rows [h0 | h1] are
  interleaved: ``W.reshape(heads, 2, d/2, cols).transpose(1, 2)`` with ``heads`` the query heads
  for q and the key/value heads for k. transformers undoes exactly this when it loads a GGUF;
* **types**: 1-D tensors (norms) stay float32, as llama.cpp keeps them; matrices are ``f16``
  (IEEE half) or ``q8_0`` (blocks of 32 int8 with one f16 scale), or ``f32``.

The file is written next to ``out`` and renamed into place, so a crash leaves no half file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.models.gguf import GGUFError, read_gguf

QUANTS = ("f16", "q8_0", "f32")
_ARCHS = {"llama": "LLAMA"}  # Hugging Face model_type -> gguf.MODEL_ARCH member
_SKIP_FIELDS = ("GGUF.", "general.architecture", "general.file_type",
                "general.quantization_version")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split q/k rows of each head -> llama.cpp's interleaved pairs."""
    rows, cols = weight.shape
    if rows % (2 * heads):
        raise GGUFError(f"a q/k projection of {rows} rows cannot split into {heads} heads")
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, as float32 arrays in llama.cpp's layout."""
    import gguf

    arch = _arch(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _ARCHS[arch]),
                                     config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"no GGUF name for tensor {key!r} of a {arch} model")
        array = value.detach().to(torch.float32).cpu().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            array = rope_permute(array, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = rope_permute(array, kv_heads)
        out[name] = array  # get_name keeps the suffix: 'blk.3.attn_q.weight'
    return out


def _arch(config: Any) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in _ARCHS:
        raise GGUFError(f"GGUF export supports {sorted(_ARCHS)} models, not {arch!r}")
    return str(arch)


def _copy_metadata(writer: Any, source: Path) -> None:
    """Every metadata field of ``source`` except those the writer sets itself."""
    reader: Any = read_gguf(source)
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_FIELDS):
            continue
        kind = field.types[0]
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError("GGUF export needs a fast (tokenizers) tokenizer")
    data: dict[str, Any] = json.loads(backend.to_str())
    return data


def _is_byte_level(spec: Mapping[str, Any] | None) -> bool:
    if not spec:
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(s) for s in spec.get("pretokenizers", []) or [])


def _write_metadata(writer: Any, config: Any, tokenizer: Any, name: str) -> None:
    """Metadata built from the config and a byte-level BPE tokenizer (no source GGUF)."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise GGUFError("GGUF export without a source GGUF supports byte-level BPE tokenizers "
                        f"only (this one: {model.get('type')!r}); start the run from a .gguf "
                        "model to export its own tokenizer metadata")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope: Any = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") \
        or getattr(config, "rope_theta", None) or 10000.0
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))

    vocab: dict[str, int] = dict(model["vocab"])
    specials = {int(t["id"]): t["content"] for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()} | specials
    tokens, types = [], []
    for i in range(config.vocab_size):  # rows the tokenizer does not use get a placeholder
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(3 if i in specials else (1 if i in by_id else 5))  # control/normal/unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id),
                      ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    adds_bos = tokenizer.bos_token_id is not None and \
        tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(adds_bos))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: Any, tokenizer: Any, out: str | Path, quant: str = "f16", *,
               source: str | Path | None = None, name: str = "fedtune model") -> Path:
    """Write ``model`` as a GGUF file at ``out`` (see the module docstring); returns the path."""
    import gguf

    if quant not in QUANTS:
        raise GGUFError(f"unknown quantisation {quant!r}; expected one of {list(QUANTS)}")
    config = model.config
    arch = _arch(config)
    tensors = gguf_tensors(model.state_dict(), config)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "f32": gguf.GGMLQuantizationType.F32}[quant]
    if quant == "q8_0":
        bad = [k for k, v in tensors.items() if v.ndim == 2 and v.shape[1] % 32]
        if bad:
            raise GGUFError(f"q8_0 needs rows that are a multiple of 32 values; {bad[0]} has "
                            f"{tensors[bad[0]].shape[1]}")
    if source is not None:
        names_in_source = {t.name for t in read_gguf(Path(source)).tensors}  # type: ignore[attr-defined]
        if set(tensors) != names_in_source:
            raise GGUFError(f"the model's tensors do not match those of {source}: missing "
                            f"{sorted(names_in_source - set(tensors))[:3]}, extra "
                            f"{sorted(set(tensors) - names_in_source)[:3]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        if source is not None:
            _copy_metadata(writer, Path(source))
        else:
            _write_metadata(writer, config, tokenizer, name)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "f32": gguf.LlamaFileType.ALL_F32}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, array in tensors.items():
            if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tname, array.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tname, array.astype(np.float16))
            else:
                writer.add_tensor(tname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
