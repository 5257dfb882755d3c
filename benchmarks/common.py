"""Shared pieces of the benchmark scripts: matched models, timing, environment line and results files."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import transformers

from memformer_hf import MemformerConfig, MemformerForCausalLM

VOCAB = 32768


def memformer(preset: str = "v1-lm", vocab: int = VOCAB, **overrides) -> MemformerForCausalLM:
    cfg = MemformerConfig.from_preset(preset, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                      **overrides)
    return MemformerForCausalLM(cfg)


def llama(layers: int = 16, vocab: int = VOCAB, sliding_window: int | None = None):
    """Same-size baselines (docs/design.md#baselines): d 512, 8 heads, intermediate 1408, tied embeddings, RoPE;
    with a sliding window it is the Mistral-style Transformer-XL stand-in."""
    common = dict(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=2**21,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if sliding_window is None:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=sliding_window, **common))


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameters, counting tied weights once."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total, total - emb


def time_cuda(fn: Callable[[], None], warmup: int = 3, repeat: int = 20) -> list[float]:
    """Per-call milliseconds with CUDA events (or perf_counter on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def environment() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return (f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {gpu}; "
            f"torch {torch.__version__}; transformers {transformers.__version__}; python {platform.python_version()}")


def write_results(name: str, title: str, body: str, output: str | None = None) -> str:
    """Write `benchmarks/results/<name>.md` (or `output`) with date, device, versions and the exact command."""
    path = output or os.path.join(os.path.dirname(__file__), "results", f"{name}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    text = f"# {title}\n\n- Environment: {environment()}\n- Command: `{command}`\n\n{body}\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_variants_in_parallel(variants: list[str], out_dir: str) -> dict[str, dict]:
    """Run this script once per variant, all at the same time, and return each variant's JSON row.

    The benchmark models are tiny, so one of them leaves a GPU mostly idle (its step is bound by kernel launches);
    several processes share it at close to one process's wall time (with several GPUs, round robin). Each child gets this process's arguments plus
    `--variants <one> --row_json <out_dir>/<one>.json --parallel 0`; its output goes to `<out_dir>/<one>.log`."""
    import json
    import subprocess

    os.makedirs(out_dir, exist_ok=True)
    gpus = torch.cuda.device_count()
    procs = {}
    for i, v in enumerate(variants):
        argv = [sys.executable, sys.argv[0], *sys.argv[1:], "--variants", v, "--parallel", "0",
                "--row_json", os.path.join(out_dir, f"{v}.json")]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else None  # spread over the GPUs
        procs[v] = subprocess.Popen(argv, stdout=open(os.path.join(out_dir, f"{v}.log"), "w"),
                                    stderr=subprocess.STDOUT, env=env)
    rows = {}
    for v, proc in procs.items():
        if proc.wait() != 0:
            print(f"variant {v} failed (exit {proc.returncode}); log: {os.path.join(out_dir, v + '.log')}", flush=True)
            continue
        with open(os.path.join(out_dir, f"{v}.json")) as f:
            rows[v] = json.load(f)
    return rows
