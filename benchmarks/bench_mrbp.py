"""Training memory and speed of MRBP vs full BPTT vs activation checkpointing (docs/design.md#mrbp-cost, the
paper's Table 3).

One optimizer micro-step over a window of T cells for B stream rows (the `StreamBatches` layout,
docs/design.md#stream-batching), random weights and random tokens, per mode and window length T:

* `bptt`: one graph through all T cells, one backward (`cells_backward(mode="bptt")`);
* `checkpointing`: the same with `model.gradient_checkpointing_enable()` (encoder and decoder layers recomputed);
* `mrbp`: memory replay back-propagation (`cells_backward(mode="mrbp")`): one cell graph alive at a time.

Reported: peak allocated memory (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, whole step
including weights, gradients and the batch; "n/a" on CPU), the part of it above the step's starting allocation,
median step time (CUDA events, or perf_counter on CPU, after warm-up), target tokens/s, and both ratios relative to
BPTT at the same T. A configuration that runs out of memory is recorded as "OOM". bf16 runs a float32 model under
`torch.autocast` (passed to `cells_backward` through `context=`).

    python benchmarks/bench_mrbp.py                                     # paper size on a GPU → results/mrbp.md
    python benchmarks/bench_mrbp.py --device cpu --preset tiny --windows 1,2 --steps 2 --output /tmp/mrbp.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import transformers

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.data_streams import StreamBatches
from memformer_hf.mrbp import cells_backward

BOS, PAD = 1, 0
PRESETS = {
    # docs/design.md#mrbp-cost: d 512, 4 + 8 layers (the 12-layer proxy of the paper's decoder), 8 heads, K 32, L 64
    "paper": dict(hidden_size=512, encoder_layers=4, decoder_layers=8, num_attention_heads=8, intermediate_size=2048,
                  num_memory_slots=32, segment_length=64, vocab_size=32768),
    "small": dict(hidden_size=256, encoder_layers=2, decoder_layers=4, num_attention_heads=4, intermediate_size=1024,
                  num_memory_slots=16, segment_length=64, vocab_size=16384),
    "tiny": dict(hidden_size=64, encoder_layers=2, decoder_layers=2, num_attention_heads=4, intermediate_size=256,
                 num_memory_slots=8, segment_length=16, vocab_size=512),
}
MODES = ("mrbp", "bptt", "checkpointing")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=16, help="stream rows B")
    p.add_argument("--windows", default="1,4,16,32", help="window lengths T (cells per step), comma separated")
    p.add_argument("--modes", default="mrbp,bptt,checkpointing")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="markdown file (default benchmarks/results/mrbp.md)")
    args = p.parse_args()
    args.windows = [int(x) for x in args.windows.split(",") if x]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def build_model(args) -> MemformerForCausalLM:
    torch.manual_seed(args.seed)
    cfg = MemformerConfig(**PRESETS[args.preset], bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD,
                          attn_implementation=args.attn)
    # float32 weights in both modes: bf16 is autocast (mixed precision), as TrainingArguments(bf16=True) does
    return MemformerForCausalLM(cfg).to(args.device).train()


def window_batch(cfg: MemformerConfig, batch_size: int, T: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """One window of T cells for B rows, built by `StreamBatches` from random documents of T·L tokens (a fresh
    document per row: reset on cell 0, then T-1 continuation cells with full segments)."""
    L = cfg.segment_length
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, cfg.vocab_size, (T * L,), generator=gen) for _ in range(batch_size)]
    ds = StreamBatches(docs, segment_length=L, window=T, batch_size=batch_size, bos_token_id=BOS, pad_token_id=PAD,
                       seed=seed)
    batch = ds[0]
    return {k: v.to(device) for k, v in batch.items() if k not in ("stream_ids", "window_index")}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of the encoder/decoder layers (`activation_checkpointing_*` from transformers 5.23,
    `gradient_checkpointing_*` before; the old names warn in newer versions)."""
    new_api = hasattr(model, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}
        if new_api:
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_api:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def run_config(model, args, mode: str, T: int) -> dict:
    """Warm-up, then `args.steps` timed steps of one mode at window T. Returns a result row."""
    cfg = model.config
    device = args.device
    cells = window_batch(cfg, args.batch_size, T, device, args.seed + T)
    n_tokens = int((cells["shift_labels"] != -100).sum())
    memory = model.model.initial_memory(args.batch_size).detach().clone()  # the carried memory of the rows
    if args.dtype == "bf16":
        def context():
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
    else:
        context = contextlib.nullcontext
    set_checkpointing(model, mode == "checkpointing")
    cb_mode = "mrbp" if mode == "mrbp" else "bptt"

    def step():
        model.zero_grad(set_to_none=False)
        loss, _ = cells_backward(model, cells, memory, mode=cb_mode, context=context)
        return loss

    row = dict(mode=mode, T=T, tokens=n_tokens)
    try:
        for _ in range(args.warmup):
            step()
        sync(device)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start_alloc = torch.cuda.memory_allocated()
        times, loss = [], None
        for _ in range(args.steps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_mb=peak / 2**20, above_start_mb=(peak - start_alloc) / 2**20)
        sec = statistics.median(times)
        row.update(sec=sec, tok_s=n_tokens / sec, loss=float(loss))
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        row.update(oom=True)
    finally:
        set_checkpointing(model, False)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt_mb(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def table(rows: list[dict]) -> str:
    base = {r["T"]: r for r in rows if r["mode"] == "bptt" and not r.get("oom")}
    lines = ["| T | mode | peak MB | above start MB | peak vs BPTT | step ms | tokens/s | speed vs BPTT | loss |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['T']} | {r['mode']} | OOM | OOM | – | – | – | – | – |")
            continue
        b = base.get(r["T"])
        mem_ratio = (f"{r['peak_mb'] / b['peak_mb']:.2f}×" if b and r.get("peak_mb") and b.get("peak_mb")
                     else "n/a")
        speed_ratio = f"{b['sec'] / r['sec']:.2f}×" if b else "n/a"
        lines.append(f"| {r['T']} | {r['mode']} | {fmt_mb(r.get('peak_mb'))} | {fmt_mb(r.get('above_start_mb'))} | "
                     f"{mem_ratio} | {r['sec'] * 1e3:.1f} | {r['tok_s']:,.0f} | {speed_ratio} | {r['loss']:.4f} |")
    return "\n".join(lines)


def environment(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return (f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {name}; "
            f"torch {torch.__version__}; transformers {transformers.__version__}; python {platform.python_version()}")


def main() -> None:
    args = parse()
    model = build_model(args)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    setting = (f"preset `{args.preset}` (d {cfg.hidden_size}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, "
               f"{cfg.num_attention_heads} heads, K {cfg.num_memory_slots}, L {cfg.segment_length}, "
               f"V {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters), B {args.batch_size}, dtype {args.dtype} "
               f"(float32 weights{', bf16 autocast' if args.dtype == 'bf16' else ''}), attention {args.attn}, "
               f"{args.warmup} warm-up + {args.steps} timed steps (median), no torch.compile")
    print(f"# {environment(args.device)}\n# {setting}", flush=True)
    rows = []
    for T in args.windows:
        for mode in args.modes:
            row = run_config(model, args, mode, T)
            rows.append(row)
            print(row, flush=True)
    body = table(rows)
    print(body)
    path = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mrbp.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    notes = ("Memory: `max_memory_allocated` over the timed steps (weights, fp32 gradients, batch and activations); "
             "\"above start\" subtracts what was allocated when the timed steps began (weights + gradients + "
             "batch). Ratios are against BPTT at the same T. tokens/s counts target tokens (B·T·L). The paper's "
             "Table 3 (12-layer decoder-only model, T = 4): BPTT 16,177 MB ×1.00, checkpointing 9,885 MB ×0.48, "
             "MRBP 7,229 MB ×0.90 — compare ratios, not MB (docs/design.md#mrbp-cost).")
    with open(path, "w") as f:
        f.write(f"# MRBP vs BPTT vs activation checkpointing: training memory and speed\n\n"
                f"- Date, device, versions: {environment(args.device)}\n- Setting: {setting}\n"
                f"- Command: `{command}`\n\n{body}\n\n{notes}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
