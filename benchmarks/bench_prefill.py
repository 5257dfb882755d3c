"""Prefill throughput vs prompt length: Memformer vs same-size Llama (full attention) vs Mistral sliding window,
bf16, random weights, one GPU, same run. Each model reads the whole prompt in one forward with
`logits_to_keep=1` and `use_cache=True` (what `generate()` does); Memformer walks the prompt segment by segment
(critical path: encoder + writer per segment, then the decoder over the last partial segment).

    python benchmarks/bench_prefill.py                      # writes results/prefill.md
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from common import is_oom, llama, median, memformer, time_cuda, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384,65536")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", default="memformer,llama,mistral")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--preset", default="v1-lm", help="Memformer size preset (baselines are matched to v1-lm)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        window = args.window if name == "mistral" else None
        model = memformer(args.preset) if name == "memformer" else llama(sliding_window=window)
        model = model.to(device=device, dtype=torch.bfloat16).eval()
        for n in [int(x) for x in args.lengths.split(",")]:
            ids = torch.randint(2, model.config.vocab_size, (args.batch, n), device=device)
            ids[:, 0] = 0
            row = dict(model=name, batch=args.batch, length=n)
            try:
                torch.cuda.reset_peak_memory_stats() if device == "cuda" else None

                def run(model=model, ids=ids):
                    with torch.no_grad():
                        model(ids, use_cache=True, logits_to_keep=1)

                ms = median(time_cuda(run, warmup=1, repeat=args.repeat))
                row.update(ms=ms, tok_s=args.batch * n * 1e3 / ms,
                           peak_gb=(torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else 0.0)
            except Exception as err:  # noqa: BLE001
                row.update(error="OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:100]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
        del model
    lines = [f"Prefill, bf16, batch {args.batch}, median of {args.repeat} after one warm-up; tokenization not timed.",
             "", "| model | prompt tokens | ms | tokens/s | peak GB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['length']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['length']} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {r['peak_gb']:.2f} |")
    table = "\n".join(lines)
    print(table)
    write_results("prefill", "Prefill throughput vs prompt length", table, args.output)


if __name__ == "__main__":
    main()
