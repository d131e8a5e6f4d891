"""A layer-pruned copy of a decoder: FedPT's *comparison* partner, never its default.

FedPT's small partner must be built without the large model's weights (the large model is a
black box: ``smollm2-partner`` learns from its logits only). To show what the proxy does with a
partner that *is* a competent model of the same family, the benchmarks add one labelled row with
a partner cut out of the large model itself: some of its decoder blocks, its embedding, final
norm and head, then healed by distillation from the large model's logits (``fedtune pretrain
--init DIR --teacher ...``). An operator of a real black box could not build it.

    python -m fedtune.models.prune smollm2-135m --keep 0,6,12,18,24,29 --out /tmp/pruned

``keep_layers`` is the pure part (tested on fedtune's tiny Llama): the kept blocks in order,
``num_hidden_layers`` and the per-layer config lists cut to match, each attention's
``layer_idx`` renumbered for the KV cache. The card written beside the weights says where they
came from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

CARD = """---
tags: [fedtune, fedpt, comparison-only]
---
# {name}: a layer-pruned copy of {source} (comparison only)

**Not a FedPT partner an operator could build**: its weights are {source}'s own (decoder blocks
{keep} of {total}, the embedding, the final norm and the head). fedtune's benchmarks use it as
one labelled comparison row, to show what the proxy does with a partner of the large model's
family; the default partner, `smollm2-partner`, is trained from the large model's logits only.

Made by `python -m fedtune.models.prune {source} --keep {keep_arg} --out DIR`
({params:,} parameters, {blocks} decoder blocks).
"""


def parse_keep(spec: str, total: int) -> list[int]:
    """'0,1,2,29' as sorted unique block indices in [0, total); a clear error otherwise."""
    try:
        keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--keep {spec!r}: expected comma-separated block indices") from None
    if not keep:
        raise ValueError(f"--keep {spec!r}: keep at least one block")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ValueError(f"--keep {spec!r}: blocks {bad} are outside 0..{total - 1}")
    return keep


def keep_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """Keep only the decoder blocks ``keep`` (in that order) of a Llama-style model, in place."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder.layers to prune")
    keep = parse_keep(",".join(str(i) for i in keep), len(layers))
    decoder.layers = nn.ModuleList(layers[i] for i in keep)
    for new, block in enumerate(decoder.layers):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
    config = model.config
    total = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from fedtune.models.loading import load_model_and_tokenizer

    p = argparse.ArgumentParser(
        prog="python -m fedtune.models.prune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the model to cut (a directory, a hub id or an embedded name)")
    p.add_argument("--keep", required=True,
                   help="comma-separated decoder blocks to keep, e.g. 0,1,2,3,4,29")
    p.add_argument("--out", required=True, type=Path, help="where to save the pruned model")
    args = p.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model, "float32", "cpu")
    total = model.config.num_hidden_layers
    try:
        keep = parse_keep(args.keep, total)
    except ValueError as e:
        p.error(str(e))
    keep_layers(model, keep)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(t.numel() for t in model.parameters())
    (args.out / "README.md").write_text(CARD.format(
        name=args.out.name, source=args.model, keep=keep, total=total, keep_arg=args.keep,
        params=params, blocks=len(keep)))
    (args.out / "pruned.json").write_text(json.dumps(
        {"source": args.model, "kept_blocks": keep, "of": total, "parameters": params}) + "\n")
    print(f"{args.out}: blocks {keep} of {total}, {params:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
