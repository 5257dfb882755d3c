"""How the backbone uses the previous segment depending on how it is laid out (issue 17; a design input, no training).

A decoder that keeps the previous segment's own keys and values (Transformer-XL style, quality.md "What would change
the picture") would give each token of segment c the tokens of segment c-1 in its own self-attention. Today every
decoder chunk starts with BOS at position 0 (docs/design.md#boot-segment, #logits-convention), which for SmolLM2 is
`<|endoftext|>`, the token it saw *between documents*, and the last token of segment c-1 is never a decoder input.
This script scores the L tokens of segment c with the pretrained backbone (no Memformer involved) given:

  * local:      [BOS, s_c[:-1]]                      what a warm start computes at initialisation today
  * stream:     [BOS, s_{c-1}, s_c[:-1]]             the previous segment in the true token stream
  * bos_mid:    [BOS, s_{c-1}[:-1], BOS, s_c[:-1]]   keeping today's chunk layout (BOS at every chunk's position 0)
  * bos_mid_1:  [s_{c-1}[:-1], BOS, s_c[:-1]]        the same without the previous chunk's BOS

on random segments (c >= 2) of the test books of >= 4,096 tokens. CPU, ~6 minutes for 48 segments on 2 cores.

    python benchmarks/previous_segment_context.py --gguf_parts .device_carry/warm_start/smollm2.gguf.part0,\\
        .device_carry/warm_start/smollm2.gguf.part1 --tokens .device_carry/warm_start/tokens.npz
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from common import write_results
from warm_start import SMOLLM2_BOS, load_gguf_backbone, resolve_gguf, unpack_tokens

LAYOUTS = ("local", "stream", "bos_mid", "bos_mid_1")


def layout(name: str, prev: list[int], cur: list[int], bos: int) -> tuple[list[int], int]:
    """The input ids of layout `name` and the position whose logits predict cur[0]."""
    if name == "local":
        return [bos] + cur[:-1], 0
    if name == "stream":
        return [bos] + prev + cur[:-1], len(prev)
    if name == "bos_mid":
        return [bos] + prev[:-1] + [bos] + cur[:-1], len(prev)
    if name == "bos_mid_1":
        return prev[:-1] + [bos] + cur[:-1], len(prev) - 1
    raise ValueError(name)


@torch.no_grad()
def score(model, docs: list[list[int]], L: int, segments: int, bos: int, seed: int) -> dict[str, float]:
    """Perplexity of the picked segments' tokens under each layout (the same tokens are scored in every layout)."""
    rng = np.random.default_rng(seed)
    nll, n = dict.fromkeys(LAYOUTS, 0.0), 0
    for d in rng.choice(len(docs), segments):
        doc = docs[d]
        c = int(rng.integers(2, len(doc) // L))
        prev, cur = doc[(c - 1) * L: c * L], doc[c * L: (c + 1) * L]
        target = torch.tensor(cur)[:, None]
        for name in LAYOUTS:
            ids, first = layout(name, prev, cur, bos)
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, first: first + L].double(), -1)
            nll[name] -= float(logp.gather(1, target).sum())
        n += L
    return {name: math.exp(v / n) for name, v in nll.items()} | {"tokens": n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--gguf_parts", default=None, help="comma-separated parts (warm_start.py --pack_for_device)")
    p.add_argument("--tokens", required=True, help="tokens.npz written by warm_start.py --pack_for_device")
    p.add_argument("--segment_length", type=int, default=128)
    p.add_argument("--segments", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/previous_segment_context.md")
    args = p.parse_args(argv)
    model = load_gguf_backbone(resolve_gguf(args)).eval()
    blob = np.load(args.tokens)
    docs = [d for d in unpack_tokens(blob["test_flat"], blob["test_offsets"]) if len(d) >= 4096]
    res = score(model, docs, args.segment_length, args.segments, SMOLLM2_BOS, args.seed)
    rows = "\n".join(f"| {name} | `{' '.join(map(str, layout(name, ['p'] * 3, ['c'] * 3, 'BOS')[0]))}` | "
                     f"{res[name]:.2f} |" for name in LAYOUTS)
    body = (f"SmolLM2-135M-Instruct (dequantized GGUF), {args.segments} random segments of L = {args.segment_length} "
            f"from the {len(docs)} test books of >= 4,096 tokens ({res['tokens']:,} scored tokens, the same in every "
            "row); BOS = `<|endoftext|>` (id 0). Layout shown for L = 3 (p: previous segment, c: current).\n\n"
            "| layout | input (L = 3) | perplexity of segment c |\n|---|---|---:|\n" + rows)
    print(body)
    print("wrote", write_results("previous_segment_context", "The previous segment's layout and the backbone",
                                 body, args.out))
    return res


if __name__ == "__main__":
    main()
