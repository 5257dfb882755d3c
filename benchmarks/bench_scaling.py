"""Data-parallel scaling of MRBP training (issue 9): the same global batch on 1 GPU and on N GPUs.

`MemformerTrainer` trains the `small` preset (d 256, 2 + 4 layers, K 16, L 64) with MRBP (window T = 4) and bf16 on
real text (the shared corpus, BPE-tokenized by `--prepare`), once as a plain process on one GPU and once with
`torchrun --nproc_per_node=N` (DDP, per-GPU batch = global batch / N). Streams are dealt globally, so both runs see the same
windows in the same order and start from the same weights: their loss curves should agree up to bf16 / reduction
order. Per step: the logged loss (the token-weighted mean over all ranks), wall time between optimizer steps and the
number of target tokens. tokens/s excludes the first `--warmup` steps. Writes `benchmarks/results/scaling.md` and
`scaling.png` (both loss curves and their difference).

    python benchmarks/bench_scaling.py --prepare DATA_DIR     # once, on a machine with shared/data/corpora (CPU)
    python benchmarks/bench_scaling.py --data DATA_DIR        # on the GPU box: 1 vs 2 GPUs, then the report
    python benchmarks/bench_scaling.py --device cpu --tiny    # smoke test: 1 vs 2 CPU processes (gloo), tiny model
    python benchmarks/bench_scaling.py --report WORK_DIR      # re-render the report from the runs' JSON files

Without `--data` the tokens are synthetic (random documents): fine for throughput, meaningless for the loss curve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "shared" / "data" / "corpora"
RESULTS = HERE / "results"
TINY = dict(hidden_size=32, encoder_layers=1, decoder_layers=1, num_attention_heads=2, intermediate_size=64,
            num_memory_slots=4, segment_length=16)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", metavar="DIR", help="tokenize the corpus into DIR (tokenizer + train.pt) and exit")
    p.add_argument("--corpus", default=str(CORPUS), help="folder with train.jsonl.gz (for --prepare)")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary for --prepare (the CLI's default)")
    p.add_argument("--data", metavar="DIR", help="a --prepare folder (default: synthetic tokens)")
    p.add_argument("--report", metavar="WORK_DIR", help="only write the report from WORK_DIR/gpus*.json")
    p.add_argument("--preset", default="small", help="a memformer_hf.PRESETS name ('cpu-small': the CLI's default)")
    p.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run (compared with 1)")
    p.add_argument("--global_batch", type=int, default=128, help="streams per optimizer step, over all GPUs")
    p.add_argument("--window", type=int, default=4, help="MRBP window T (segments per stream per step)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of tokens/s")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_train_seconds", type=float, default=110.0, help="per run; stops earlier (all ranks)")
    p.add_argument("--dataloader_num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--no_bf16", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--tiny", action="store_true", help="tiny model, batch and step count (smoke test)")
    p.add_argument("--fsdp", action="store_true", help="the N-GPU run with FSDP2 (accelerate launch with "
                                                       "examples/accelerate/fsdp.yaml) instead of DDP (torchrun)")
    p.add_argument("--work", default="/tmp/bench_scaling", help="per-run JSON files and Trainer output")
    p.add_argument("--output", default=str(RESULTS / "scaling.md"))
    p.add_argument("--worker", metavar="RUN_JSON", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.global_batch, args.window, args.steps, args.warmup = 4, 2, 12, 4
        args.dataloader_num_workers = 0
    if args.global_batch % args.gpus:
        p.error(f"--global_batch {args.global_batch} is not divisible by --gpus {args.gpus}")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


# ================================================================================================ data
def prepare(args: argparse.Namespace) -> None:
    """Train the CLI's byte-level BPE on the train split and save its token ids (no `datasets` needed later)."""
    from memformer_hf.cli.corpus import prepare_documents, train_bpe_tokenizer
    from memformer_hf.data_streams import load_documents

    out = Path(args.prepare)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    texts = load_documents(os.path.join(args.corpus, "train.jsonl.gz"))
    tokenizer = train_bpe_tokenizer(texts, args.vocab)
    tokenizer.save_pretrained(out / "tokenizer")
    docs = prepare_documents(texts, tokenizer)
    lengths = torch.tensor([len(d) for d in docs])
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
    torch.save({"flat": flat.to(torch.int16) if len(tokenizer) <= 32767 else flat,
                "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "source": f"{args.corpus}/train.jsonl.gz, byte-level BPE {len(tokenizer)}"}, out / "train.pt")
    print(f"{len(docs)} documents, {len(flat):,} tokens -> {out}/train.pt ({time.time() - t0:.0f} s)")


def load_data(args: argparse.Namespace) -> tuple[list[list[int]], dict]:
    """Token-id documents and their special ids: from `--data`, or synthetic."""
    if args.data:
        blob = torch.load(os.path.join(args.data, "train.pt"))
        flat, off = blob["flat"].to(torch.long), blob["offsets"]
        docs = [flat[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
        return docs, {k: blob[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "source")}
    vocab = 256 if args.tiny else 4096
    gen = torch.Generator().manual_seed(1234)
    n_docs, lo, hi = (16, 40, 300) if args.tiny else (400, 2_000, 40_000)
    lengths = torch.randint(lo, hi, (n_docs,), generator=gen).tolist()
    docs = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]
    return docs, dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                      source=f"synthetic: {n_docs} random documents")


# ================================================================================================ one run
def worker(args: argparse.Namespace) -> None:
    """One training run (a torchrun process); rank 0 writes the run's JSON."""
    import accelerate
    import transformers
    from transformers import TrainerCallback

    from memformer_hf import MemformerConfig, MemformerForCausalLM
    from memformer_hf.configuration_memformer import PRESETS
    from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = args.device == "cpu"
    if cpu:
        torch.set_num_threads(1)
    docs, ids = load_data(args)
    base = TINY if args.tiny else PRESETS[args.preset]
    vocab = -(-ids["vocab_size"] // 128) * 128
    config = MemformerConfig(**base, vocab_size=vocab, bos_token_id=ids["bos_token_id"],
                             eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    torch.manual_seed(args.seed)
    model = MemformerForCausalLM(config)

    class Recorder(TrainerCallback):
        """Wall time at each optimizer step's end (after a device sync), and a shared time budget."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.start = 0.0

        def _now(self) -> float:
            if torch.cuda.is_available() and not cpu:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args_, state, control, **kwargs):
            self.start = self._now()

        def on_step_end(self, args_, state, control, **kwargs):
            self.ends.append(self._now())
            if state.global_step % 10 == 0:  # the same decision on every rank
                stop = torch.tensor([float(self.ends[-1] - self.start > args.max_train_seconds)],
                                    device=args_.device)
                if torch.distributed.is_initialized():
                    torch.distributed.broadcast(stop, 0)
                if stop.item():
                    control.should_training_stop = True

    class Trainer(MemformerTrainer):
        """Also keeps each step's global target-token count (`num_items_in_batch`, gathered over ranks)."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.step_tokens: list[torch.Tensor] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens.append(torch.as_tensor(num_items_in_batch).detach())
            return super().training_step(model, inputs, num_items_in_batch)

    targs = MemformerTrainingArguments(
        output_dir=os.path.join(args.work, f"trainer-gpus{world}"),
        per_device_train_batch_size=args.global_batch // world, mrbp_window=args.window, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0,
        bf16=not args.no_bf16, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, seed=args.seed, data_seed=args.seed, use_cpu=cpu,
        ddp_backend="gloo" if cpu and world > 1 else None, dataloader_num_workers=args.dataloader_num_workers,
        # every parameter gets a gradient in the synchronising backward of a window of T >= 2
        # (docs/design.md#distributed)
        ddp_find_unused_parameters=False if args.window > 1 else None)
    recorder = Recorder()
    trainer = Trainer(model=model, args=targs, train_dataset=docs, callbacks=[recorder])
    if torch.cuda.is_available() and not cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}
    tokens = [int(t) for t in torch.stack(trainer.step_tokens).cpu()] if trainer.step_tokens else []
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else f"CPU ({platform.machine()})"
    record = dict(
        world=world, per_device_batch=args.global_batch // world, steps=len(recorder.ends),
        losses=[losses.get(s + 1) for s in range(len(recorder.ends))], tokens=tokens,
        step_end_seconds=[t - recorder.start for t in recorder.ends],
        peak_memory_mb=(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and not cpu else None),
        params=sum(p.numel() for p in model.parameters()), config={k: getattr(config, k) for k in base},
        vocab_size=vocab, data=ids["source"], n_documents=len(docs), device=gpu,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      accelerate=accelerate.__version__, python=platform.python_version()),
        precision="fp32" if args.no_bf16 else "bf16 autocast", args=vars(args),
        command=os.environ.get("BENCH_SCALING_COMMAND", ""))
    Path(args.worker).write_text(json.dumps(record, indent=1))


# ================================================================================================ report
def throughput(run: dict, warmup: int) -> tuple[float, float]:
    """(target tokens/s, median step ms) over the steps after `warmup`."""
    ends, tokens = run["step_end_seconds"], run["tokens"]
    w = min(warmup, len(ends) - 2)
    seconds = ends[-1] - ends[w - 1] if w > 0 else ends[-1]
    steps = [b - a for a, b in zip(ends[w - 1:-1], ends[w:])] if w > 0 else [ends[0]]
    return sum(tokens[w:len(ends)]) / seconds, 1e3 * sorted(steps)[len(steps) // 2]


def report(work: Path, output: Path, command: str) -> str:
    """Write the markdown table and the loss-curve PNG next to it from WORK_DIR/gpus*.json."""
    runs = sorted((json.loads(p.read_text()) for p in work.glob("gpus*.json")), key=lambda r: r["world"])
    if len(runs) < 2:
        raise SystemExit(f"need two runs in {work} (gpus1.json and gpusN.json), found {len(runs)}")
    one, many = runs[0], runs[-1]
    warmup = one["args"]["warmup"]
    n = min(one["steps"], many["steps"])
    diffs = [abs(a - b) for a, b in zip(one["losses"][:n], many["losses"][:n]) if a is not None and b is not None]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    tps = {r["world"]: throughput(r, warmup) for r in runs}
    cfg, a = one["config"], one["args"]
    rows = []
    for r in runs:
        tok_s, step_ms = tps[r["world"]]
        speedup = tok_s / tps[one["world"]][0]
        mem = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "n/a"
        rows.append(f"| {r['world']} | {r['per_device_batch']} | {tok_s:,.0f} | {step_ms:.1f} | {speedup:.2f}× | "
                    f"{100 * speedup / (r['world'] / one['world']):.0f}% | {mem} | {r['losses'][n - 1]:.4f} |")
    tokens_per_step = a["global_batch"] * a["window"] * cfg["segment_length"]
    png = output.with_suffix(".png")
    plotted = plot(one, many, n, png)
    v = one["versions"]
    unit = "CPU processes" if one["device"].startswith("CPU") else "GPUs"
    text = "\n".join([
        f"# Data-parallel scaling of MRBP training: 1 vs {many['world']} {unit}", "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {one['device']}; torch {v['torch']}; transformers {v['transformers']}; accelerate "
        f"{v['accelerate']}; python {v['python']}",
        f"- Command: `{one.get('command') or command}`",
        f"- Model: preset `{a['preset'] if not a['tiny'] else 'tiny (smoke test)'}` (d {cfg['hidden_size']}, "
        f"{cfg['encoder_layers']} + {cfg['decoder_layers']} layers, K {cfg['num_memory_slots']}, "
        f"L {cfg['segment_length']}, V {one['vocab_size']}, {one['params'] / 1e6:.1f}M parameters), "
        f"`MemformerTrainer` with MRBP window T {a['window']}, {one['precision']}, AdamW lr {a['lr']} cosine",
        f"- Data: {one['data']} ({one['n_documents']} documents); the same global batch of {a['global_batch']} "
        f"streams × {a['window']} segments × {cfg['segment_length']} tokens ({tokens_per_step:,} token slots) per "
        f"step in both runs; {n} steps, tokens/s over steps {min(warmup, n - 2) + 1}..{n} (target tokens, wall time "
        f"between optimizer steps including data loading and logging)",
        "- Multi-GPU: DDP via torchrun, or FSDP2 via `accelerate launch` with `--fsdp` (gradients synchronised once per optimizer step)", "",
        f"| {unit} | batch per GPU | tokens/s | step ms (median) | speedup | scaling efficiency | peak MB per GPU "
        "| loss at last step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Loss curves (logged loss of every step, the token-weighted mean over all ranks): max |Δ| = "
        f"{diffs[worst]:.2e} (step {worst + 1}), mean |Δ| = {sum(diffs) / len(diffs):.2e} over {len(diffs)} steps.",
        "",
        f"![loss curves]({png.name})" if plotted else "(matplotlib missing: no plot)", ""])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text


def plot(one: dict, many: dict, n: int, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, n + 1))
    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for run, style in ((one, "-"), (many, "--")):
        ax.plot(steps, run["losses"][:n], style, label=f"{run['world']} GPU{'s' if run['world'] > 1 else ''} "
                                                     f"(batch {run['per_device_batch']} per GPU)")
    ax.set_ylabel("training loss")
    ax.set_title("MRBP training, same global batch")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_d.plot(steps, [b - a for a, b in zip(one["losses"][:n], many["losses"][:n])], color="k")
    ax_d.set_ylabel("Δ loss")
    ax_d.set_xlabel("optimizer step")
    ax_d.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ================================================================================================ main
def main() -> None:
    args = parse()
    if args.prepare:
        return prepare(args)
    if args.worker:
        return worker(args)
    work = Path(args.report or args.work)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if not args.report:
        work.mkdir(parents=True, exist_ok=True)
        for old in work.glob("gpus*.json"):
            old.unlink()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false", "BENCH_SCALING_COMMAND": command, "PYTHONPATH": os.pathsep.join(
                   [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        for n in (1, args.gpus):
            t0 = time.time()
            # 1 GPU: a plain process on one visible GPU (torchrun with one process would wrap DDP of world size 1,
            # whose `no_sync` accelerate skips; more visible GPUs would make the Trainer use DataParallel)
            launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else [])
            if n > 1 and args.fsdp:
                launcher = ["-m", "accelerate.commands.launch", "--config_file",
                            str(HERE.parent / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", str(n)]
            argv = [sys.executable, *launcher, __file__, *sys.argv[1:], "--worker", str(work / f"gpus{n}.json")]
            print(f"== {n} process{'es' if n > 1 else ''}: {' '.join(shlex.quote(x) for x in argv)}", flush=True)
            subprocess.run(argv, env={**env, "CUDA_VISIBLE_DEVICES": first_gpu} if n == 1 else env, check=True)
            print(f"== {n}: {time.time() - t0:.0f} s", flush=True)
    print(report(work, Path(args.output), command))


if __name__ == "__main__":
    main()
