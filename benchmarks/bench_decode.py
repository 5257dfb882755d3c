"""Decoding speed and memory vs context length: Memformer vs a same-size Llama (full KV) vs a Mistral-style
sliding-window model (the Transformer-XL stand-in), bf16, random weights, one GPU, same run.

Memformer states are real: the context is prefilled through the model at batch 1 and repeated across rows (equal
prompts, so all rows reach segment boundaries together). Baseline KV caches are filled with random keys/values of
the context's length (decode cost depends on the cache length, not its values), so no O(n²) prefill is needed.
Memformer "eager" is the static decoder without graphs, "graphs" replays CUDA graphs of the step, "compiled"
fuses the step with torch.compile and replays CUDA graphs of the fused kernels. Baseline "eager" is the HF
forward with a DynamicCache; "compiled" is `torch.compile(mode="reduce-overhead")` with a StaticCache, run at the
contexts in `--compiled_contexts` only (each context recompiles).

    python benchmarks/bench_decode.py                       # full sweep on a GPU, writes results/decode.md
    python benchmarks/bench_decode.py --device cpu --contexts 256,1024 --batches 1 --steps 8 --output /tmp/d.md
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from common import is_oom, llama, median, memformer, param_counts, time_cuda, write_results

from memformer_hf.fast_decode import StaticDecoder
from memformer_hf.modeling_memformer import CACHE_KWARG


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,4096,16384,65536,262144,1048576")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--models", default="memformer,llama,mistral")
    p.add_argument("--modes", default="eager,graphs,compiled",
                   help="Memformer: eager / CUDA graphs / torch.compile + CUDA graphs; baselines: eager / compiled")
    p.add_argument("--memformer_compiled_contexts", default="65536", help="contexts at which Memformer is compiled")
    p.add_argument("--compiled_contexts", default="4096,65536", help="contexts at which baselines are compiled")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed per configuration (≥ 2 segments)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--preset", default="v1-lm", help="Memformer size preset (baselines are matched to v1-lm)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", default=None)
    p.add_argument("--json", default=None, help="also write raw rows as JSON here")
    return p.parse_args()


def memformer_state(model, context: int, device: str):
    """A real Memformer state after `context` tokens (batch 1)."""
    ids = torch.randint(2, model.config.vocab_size, (1, context), device=device)
    ids[:, 0] = model.config.bos_token_id
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)[CACHE_KWARG]


@torch.no_grad()
def bench_memformer(model, cache1, batch: int, mode: str, steps: int, device: str) -> dict:
    import copy

    cache = copy.deepcopy(cache1)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    decoder = StaticDecoder(model, cache, cuda_graphs=(mode != "eager"), compile=(mode == "compiled"))
    tokens = torch.randint(2, model.config.vocab_size, (batch,), device=device)
    for _ in range(2 * model.config.segment_length):  # warm-up incl. capture of both graphs
        tokens = decoder.step(tokens).argmax(-1)
    per_step = time_cuda(lambda: decoder.step(tokens), warmup=0, repeat=steps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    state_bytes = sum(b.numel() * b.element_size() for b in decoder.state.buffers())
    return dict(per_step=per_step, peak=peak, state_bytes=state_bytes, extra=peak - base)


def fill_dynamic(model, batch: int, context: int, device: str):
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, context, cfg.hidden_size // cfg.num_attention_heads)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(shape, dtype=torch.bfloat16, device=device)
        cache.update(k, torch.randn_like(k), i)
    return cache


@torch.no_grad()
def bench_baseline(model, batch: int, context: int, mode: str, steps: int, device: str) -> dict:
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    cfg = model.config
    tokens = torch.randint(2, cfg.vocab_size, (batch, 1), device=device)
    if mode == "eager":
        cache = fill_dynamic(model, batch, context, device)
        pos = [context]

        def step():
            out = model(tokens, past_key_values=cache, use_cache=True,
                        position_ids=torch.full((batch, 1), pos[0], device=device))
            pos[0] += 1
            return out.logits

        per_step = time_cuda(step, warmup=2, repeat=min(steps, 32))
    else:
        from transformers import StaticCache

        cache = StaticCache(config=cfg, max_cache_len=context + steps + 16)
        shape = (batch, cfg.num_key_value_heads, context, cfg.hidden_size // cfg.num_attention_heads)
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(shape, dtype=torch.bfloat16, device=device)
            cache.update(k, torch.randn_like(k), i)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        position = torch.full((batch, 1), context, device=device)

        def step():
            out = forward(input_ids=tokens, past_key_values=cache, use_cache=True, position_ids=position.clone())
            position.add_(1)
            return out.logits

        per_step = time_cuda(step, warmup=3, repeat=min(steps, 32))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return dict(per_step=per_step, peak=peak, state_bytes=None, extra=None)


def main() -> None:
    args = parse()
    device = args.device
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    models = args.models.split(",")
    modes = args.modes.split(",")
    compiled_contexts = {int(x) for x in args.compiled_contexts.split(",") if x}
    memformer_compiled = {int(x) for x in args.memformer_compiled_contexts.split(",") if x}
    torch.manual_seed(0)
    rows, counts = [], {}
    for name in models:
        if name == "memformer":
            model = memformer(args.preset)
        elif name == "llama":
            model = llama()
        else:
            model = llama(sliding_window=args.window)
        model = model.to(device=device, dtype=torch.bfloat16).eval()
        counts[name] = param_counts(model)
        states = {}
        for context in contexts:
            if name == "memformer":
                try:
                    states[context] = memformer_state(model, context, device)
                except Exception as err:  # noqa: BLE001
                    if not is_oom(err):
                        raise
                    states[context] = None
            for batch in batches:
                for mode in modes:
                    if name != "memformer" and mode == "graphs":
                        continue
                    if name != "memformer" and mode == "compiled" and context not in compiled_contexts:
                        continue
                    if name == "memformer" and mode == "compiled" and context not in memformer_compiled:
                        continue
                    row = dict(model=name, batch=batch, context=context, mode=mode)
                    try:
                        if name == "memformer":
                            r = bench_memformer(model, states[context], batch, mode, args.steps, device)
                        else:
                            r = bench_baseline(model, batch, context, mode, args.steps, device)
                        ms = r["per_step"]
                        row.update(ms_per_step=median(ms), p99=sorted(ms)[int(0.99 * (len(ms) - 1))],
                                   mean=sum(ms) / len(ms), tok_s=batch * 1e3 / (sum(ms) / len(ms)),
                                   peak_gb=r["peak"] / 2**30, state_mb=(r["state_bytes"] or 0) / 2**20)
                    except Exception as err:  # noqa: BLE001
                        if not is_oom(err):
                            row.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
                        else:
                            row.update(error="OOM")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    gc.collect()
                    torch.cuda.empty_cache() if device == "cuda" else None
        del model, states
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, params=counts), f)

    lines = ["Parameters (total / non-embedding, tied embeddings counted once): " + "; ".join(
        f"{k} {t / 1e6:.2f}M / {n / 1e6:.2f}M" for k, (t, n) in counts.items()), "",
        f"Decode, bf16, {args.steps} timed steps after warm-up (Memformer: random prompt of the given context, "
        "equal prompts across rows; baselines: random KV of the context's length). tok/s = batch / mean step time; "
        "ms/token p50 and p99 over steps (Memformer's boundary steps, one per 64 tokens, are the p99). "
        "Peak = `max_memory_allocated` including weights.", "",
        "| model | mode | batch | context | ms/step p50 | p99 | tok/s | peak GB | state MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['context']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.3f} | "
                         f"{r['p99']:.3f} | {r['tok_s']:,.0f} | {r['peak_gb']:.2f} | {r['state_mb']:.1f} |")
    table = "\n".join(lines)
    print(table)
    write_results("decode", "Decoding throughput and memory vs context", table, args.output)


if __name__ == "__main__":
    main()
