"""Graphed == eager on CUDA: the fixed-shape steps replayed as CUDA graphs give the same numbers as the same steps
run eagerly (bf16 weights), for prefill (stream forward), greedy generate() and an MRBP training window.

    python benchmarks/check_graphs.py [--preset v1-lm] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import copy

import torch

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.mrbp import memory_replay_backward


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="v1-lm")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MemformerConfig.from_preset(args.preset, vocab_size=32768, bos_token_id=0, eos_token_id=None, pad_token_id=1)
    model = MemformerForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(2, cfg.vocab_size, (4, args.tokens), device="cuda")
    ids[:, 0] = 0
    runs = {}
    for graphs in (True, False):
        model.model.use_cuda_graphs = graphs
        with torch.no_grad():
            out = model(ids, use_cache=True)
        seq = model.generate(ids[:, :1000], attention_mask=torch.ones_like(ids[:, :1000]), max_new_tokens=200,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
        train = copy.deepcopy(model).float().train()
        train.model.use_cuda_graphs = graphs
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = memory_replay_backward(train, ids[:, : 4 * cfg.segment_length + 1])
        grad = torch.cat([q.grad.flatten().float() for q in train.parameters() if q.grad is not None])
        runs[graphs] = (out.logits.float(), out.past_key_values.memory, seq.sequences, torch.stack(seq.logits).float(),
                        float(loss), grad)
    (lg, mg, sg, gg, lossg, gradg), (le, me, se, ge, losse, grade) = runs[True], runs[False]
    print(f"prefill {tuple(ids.shape)}: max|logits graphed - eager| {(lg - le).abs().max().item():.3e} "
          f"(logit std {le.std().item():.3f}); max|memory diff| {(mg - me).abs().max().item():.3e}")
    print(f"generate 4x200 greedy: tokens equal {torch.equal(sg, se)} ({(sg == se).float().mean().item():.1%}); "
          f"max|logits diff| {(gg - ge).abs().max().item():.3e}")
    print(f"memory_replay_backward T=4 (bf16 autocast): loss {lossg:.6f} vs {losse:.6f}; grad rel diff "
          f"{((gradg - grade).norm() / grade.norm()).item():.3e}")


if __name__ == "__main__":
    main()
