"""Long stream: a tiny Memformer reads 1,000,000 tokens with carried memory (no gradient). Checks that the memory
stays finite with every slot at unit norm, and records the process memory and the cache size as the stream grows
(they must stay flat). A benchmark, not a timed test.

    python benchmarks/long_stream.py                        # CPU is fine; writes results/long_stream.md
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from common import write_results

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.modeling_memformer import CACHE_KWARG


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MemformerConfig(vocab_size=512, hidden_size=32, encoder_layers=1, decoder_layers=1, num_attention_heads=2,
                          intermediate_size=64, segment_length=64, num_memory_slots=8, initializer_range=0.3,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = MemformerForCausalLM(cfg).to(args.device).eval()
    cache, rows, consumed, t0 = None, [], 0, time.time()
    report_every = max(1, args.tokens // args.chunk // 10)
    with torch.no_grad():
        for i in range(-(-args.tokens // args.chunk)):
            n = min(args.chunk, args.tokens - consumed)
            ids = torch.randint(2, cfg.vocab_size, (1, n), device=args.device)
            if i == 0:
                ids[0, 0] = cfg.bos_token_id
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out[CACHE_KWARG]
            consumed += n
            mem = cache.memory
            norms = mem.norm(dim=-1)
            ok = bool(torch.isfinite(mem).all()) and bool(torch.isfinite(out.logits).all())
            dev = float((norms - 1).abs().max())
            if not ok or dev > 1e-5:
                raise SystemExit(f"memory broke after {consumed} tokens: finite={ok}, max |norm-1|={dev:.2e}")
            if i % report_every == 0 or consumed == args.tokens:
                cache_bytes = sum(t.numel() * t.element_size() for t in cache._all_tensors() if t is not None)
                rows.append((consumed, dev, cache_bytes, rss_mb(), time.time() - t0))
                print(rows[-1], flush=True)
    lines = [f"Tiny Memformer (d 32, 1+1 layers, L 64, K 8, vocab 512, float32, {args.device}) reading "
             f"{args.tokens:,} random tokens in chunks of {args.chunk} with the cache carried (no gradient). After "
             "every chunk: memory and logits finite, every slot's L2 norm within 1e-5 of 1 (else the run stops).",
             "", "| tokens consumed | max abs(slot norm - 1) | cache bytes | process RSS MB | seconds |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {c:,} | {d:.1e} | {b:,} | {r:.0f} | {s:.0f} |" for c, d, b, r, s in rows]
    lines += ["", f"Cache size constant: {len({b for _, _, b, _, _ in rows}) == 1}; RSS from the first to the last "
              f"row: {rows[0][3]:.0f} → {rows[-1][3]:.0f} MB."]
    table = "\n".join(lines)
    print(table)
    write_results("long_stream", "Long stream: 1M tokens with carried memory", table, args.output)


if __name__ == "__main__":
    main()
