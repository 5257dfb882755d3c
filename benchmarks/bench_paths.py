"""Every user path of issue 14, side by side in one process: Memformer vs a same-size `LlamaForCausalLM`.

Same HF entry points (Trainer / `generate()` / forward), same tokens, same GPU, bf16, random weights. Sections
(`--sections`, comma separated, run in this order):

* `train`: steady-state step time and tokens/s of `MemformerTrainer` (MRBP, `mrbp_window` 4, bf16) at the `small`
  and `v1-lm` presets vs the matched Llama trained on the same tokens per step (B rows of T·L = 256 tokens) through
  `transformers.Trainer` with the same `TrainingArguments` (default optimizer, bf16 autocast); MFU; optionally the
  Memformer row with `torch_compile=True` (`--torch_compile`).
* `mrbp`: `memory_replay_backward` vs `model(ids, labels=ids).loss.backward()` at v1-lm, batch 16, T = 1, 4, 32
  segments: step time, speed ratio, peak memory, peak(T=32)/peak(T=1), and the gradient / loss agreement.
* `prefill`: `model(ids, use_cache=True, logits_to_keep=1)` of 32k tokens at batch 1 (small preset) vs Llama (sdpa);
  numerics: last logits vs the same weights in float32 on the GPU (32k) and on the CPU (eager, `--check_tokens`).
* `generate`: plain `model.generate(ids, max_new_tokens=N, do_sample=False)` at batch 1 (1k / 4k / 32k contexts) and
  batch 16 (4k); decode tokens/s = batch · (N − 1) / (t(N new) − t(1 new)) (prefill excluded); ms/token across
  contexts (and a 1M-token stream with `--long`); numerics: every generated token vs a float32 CPU teacher-forced
  forward of the generated sequence (its logit gap to the argmax).
* `eval`: `MemformerTrainer.evaluate_documents` tokens/s (small preset, 64 documents × 4k tokens, eval batch 64,
  memory + no-memory passes); numerics: eval loss vs a float32 CPU stream forward of the same documents.

Writes a markdown report (`--out`, default `benchmarks/results/paths.md`) and the raw numbers as JSON (`--json`,
default: the same name with `.json`), rewritten after every section, so a run cut short keeps what it measured.
`--time_budget` skips the remaining measurements once that many seconds have passed.

    python benchmarks/bench_paths.py                                   # all sections on one GPU (~4 min today)
    python benchmarks/bench_paths.py --sections prefill,generate       # a subset
    python benchmarks/bench_paths.py --quick --out /tmp/paths.md       # CPU smoke run with tiny sizes (< 1 min)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import warnings

os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also for compile workers
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from common import environment, median, memformer, param_counts, time_cuda  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from memformer_hf.cli.arguments import CliError, parse_config_overrides  # noqa: E402
from memformer_hf.modeling_memformer import CACHE_KWARG  # noqa: E402
from memformer_hf.mrbp import memory_replay_backward  # noqa: E402
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments  # noqa: E402

transformers.logging.set_verbosity_error()
torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)  # graph-break warnings
transformers.utils.logging.disable_progress_bar()

BOS, PAD = 0, 1
PEAK_FLOPS = 989e12  # H200 (SXM) bf16 dense peak
SECTIONS = ("train", "mrbp", "prefill", "generate", "eval")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16 = CUDA  # bf16 weights / autocast / Trainer bf16; --dtype overrides (e.g. bf16 on the CPU to test those paths)
T0 = time.perf_counter()


# ============================================================================================ helpers
def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated subset of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run, < 1 min)")
    p.add_argument("--out", default=None, help="markdown report (default benchmarks/results/paths.md)")
    p.add_argument("--json", default=None, help="raw numbers (default: --out with .json)")
    p.add_argument("--time_budget", type=float, default=430.0,
                   help="seconds after start beyond which remaining measurements are skipped (results kept)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--memformer_options", default="",
                   help="MemformerConfig overrides of every Memformer row, e.g. decoder_previous_segment=true,cross_attention_rope=true")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    # train
    p.add_argument("--train_presets", default="small,v1-lm")
    p.add_argument("--train_batch", default="small=128,v1-lm=64", help="per-device batch per preset: name=B,...")
    p.add_argument("--mrbp_window", type=int, default=4)
    p.add_argument("--train_warmup", type=int, default=3, help="untimed optimizer steps")
    p.add_argument("--train_steps", type=int, default=5, help="timed optimizer steps (median)")
    p.add_argument("--torch_compile", action="store_true", help="also Memformer training with torch_compile=True")
    p.add_argument("--compile_presets", default="small", help="presets of the torch_compile rows")
    p.add_argument("--compile_warmup", type=int, default=4)
    # mrbp
    p.add_argument("--mrbp_preset", default="v1-lm")
    p.add_argument("--mrbp_batch", type=int, default=16)
    p.add_argument("--mrbp_T", default="1,4,32", help="segments per call")
    p.add_argument("--mrbp_repeat", type=int, default=3)
    # prefill
    p.add_argument("--prefill_preset", default="small")
    p.add_argument("--prefill_tokens", type=int, default=32768)
    p.add_argument("--prefill_repeat", type=int, default=3)
    p.add_argument("--check_tokens", type=int, default=4096, help="prompt length of the CPU float32 check")
    # generate
    p.add_argument("--gen_preset", default="v1-lm")
    p.add_argument("--gen_rows", default="1x1024,1x4096,1x32768,16x4096", help="batch x context, comma separated")
    p.add_argument("--new_tokens", type=int, default=256, help="N")
    p.add_argument("--gen_repeat", type=int, default=2)
    p.add_argument("--gen_check_row", default="1x1024", help="the row whose output is checked on the CPU")
    p.add_argument("--long", action="store_true", help="also a 1M-token Memformer stream (chunked prefill, decode)")
    p.add_argument("--long_tokens", type=int, default=1 << 20)
    p.add_argument("--long_chunk", type=int, default=65536)
    # eval
    p.add_argument("--eval_preset", default="small")
    p.add_argument("--eval_docs", type=int, default=64)
    p.add_argument("--eval_doc_tokens", type=int, default=4096)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--eval_dtype", default="bf16", choices=("bf16", "fp32"), help="model weights for evaluation")
    p.add_argument("--eval_repeat", type=int, default=1)
    p.add_argument("--eval_check_docs", type=int, default=4, help="documents re-scored on the CPU in float32")
    args = p.parse_args()
    if args.quick:
        args.vocab = 512
        args.train_presets, args.train_batch, args.train_warmup, args.train_steps = "tiny", "tiny=4", 1, 2
        args.compile_presets, args.compile_warmup = "tiny", 1
        args.mrbp_preset, args.mrbp_batch, args.mrbp_T, args.mrbp_repeat = "tiny", 2, "1,4", 1
        args.prefill_preset, args.prefill_tokens, args.prefill_repeat, args.check_tokens = "tiny", 512, 1, 128
        args.gen_preset, args.gen_rows, args.new_tokens, args.gen_repeat = "tiny", "1x64,1x256,2x128", 32, 1
        args.gen_check_row, args.long_tokens, args.long_chunk = "1x64", 2048, 512
        args.eval_preset, args.eval_docs, args.eval_doc_tokens, args.eval_batch = "tiny", 4, 256, 4
        args.eval_check_docs = 1
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:  # typed like the command line's --config_overrides
        MEMFORMER_OPTIONS.update(parse_config_overrides(args.memformer_options))
    except CliError as e:
        p.error(f"--memformer_options: {e}")
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {SECTIONS}")
    args.train_presets = [x for x in args.train_presets.split(",") if x]
    args.compile_presets = [x for x in args.compile_presets.split(",") if x]
    args.train_batch = {k: int(v) for k, v in (kv.split("=") for kv in args.train_batch.split(",") if kv)}
    args.mrbp_T = [int(x) for x in args.mrbp_T.split(",") if x]
    args.gen_rows = [tuple(int(v) for v in r.split("x")) for r in args.gen_rows.split(",") if r]
    args.gen_check_row = tuple(int(v) for v in args.gen_check_row.split("x")) if args.gen_check_row else None
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paths.md")
    args.json = args.json or os.path.splitext(args.out)[0] + ".json"
    return args


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def over_budget(args) -> bool:
    return time.perf_counter() - T0 > args.time_budget


def elapsed() -> str:
    return f"{time.perf_counter() - T0:6.1f}s"


def log(section: str, msg: str) -> None:
    print(f"[{elapsed()}] {section:8s} {msg}", flush=True)


def err_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "OOM"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def peak_reset() -> int:
    if not CUDA:
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_mb(start: int) -> tuple[float | None, float | None]:
    """(peak allocated MB, peak above `start` MB); None on CPU."""
    if not CUDA:
        return None, None
    sync()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - start) / 2**20


def autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=BF16)


def random_ids(batch: int, n: int, vocab: int, seed: int, bos: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, n), generator=g)
    if bos:
        ids[:, 0] = BOS
    return ids


MEMFORMER_OPTIONS: dict = {}  # --memformer_options, applied to every Memformer row


def model_memformer(preset: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    model = memformer(preset, vocab, **MEMFORMER_OPTIONS)
    model.generation_config.eos_token_id = None  # random weights: never stop early, N tokens are always generated
    return model


def nonemb(model) -> int:
    return param_counts(model)[1]


def model_llama(mem_model, seed: int = 0):
    """`LlamaForCausalLM` with the Memformer's width, heads and vocabulary, tied embeddings, sdpa attention, and depth
    and intermediate size chosen so that the non-embedding parameter count matches the Memformer's."""
    cfg = mem_model.config
    d, heads, target = cfg.hidden_size, cfg.num_attention_heads, nonemb(mem_model)

    def per_layer(ffn: int) -> int:
        return 4 * d * d + 3 * d * ffn + 2 * d

    ffn0 = max(32, round(2.75 * d / 32) * 32)
    layers = max(1, round((target - d) / per_layer(ffn0)))
    ffn = max(32, round(((target - d) / layers - 4 * d * d - 2 * d) / (3 * d) / 32) * 32)
    lcfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=ffn,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                    tie_word_embeddings=True, max_position_embeddings=2**21, bos_token_id=BOS,
                                    eos_token_id=None, pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(lcfg)
    model.generation_config.eos_token_id = None
    return model


def describe(model) -> dict:
    total, ne = param_counts(model)
    c = model.config
    if c.model_type == "llama":
        shape = f"d {c.hidden_size}, {c.num_hidden_layers} layers, ffn {c.intermediate_size}, {c.num_attention_heads} heads"
    else:
        shape = (f"d {c.hidden_size}, {c.encoder_layers}+{c.decoder_layers} layers, ffn {c.intermediate_size}, "
                 f"{c.num_attention_heads} heads, K {c.num_memory_slots}, L {c.segment_length}")
        shape += "".join(f", {k}={v}" for k, v in MEMFORMER_OPTIONS.items())
    return dict(total=total, nonemb=ne, shape=shape, flops_params=ne + c.vocab_size * c.hidden_size)


class Report:
    """Rows per section, printed compactly, saved as JSON + markdown after every section."""

    def __init__(self, args) -> None:
        self.args = args
        self.data: dict = dict(environment=environment(), command=command(), device=DEVICE,
                               models={}, sections={}, errors={}, section_seconds={})

    def row(self, section: str, **row) -> dict:
        self.data["sections"].setdefault(section, []).append(row)
        return row

    def error(self, section: str, where: str, e: BaseException) -> None:
        self.data["errors"].setdefault(section, []).append(f"{where}: {err_text(e)}")
        log(section, f"{where}: ERROR {err_text(e)}")

    def models(self, key: str, **info) -> None:
        self.data["models"][key] = info

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        with open(self.args.json, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(self.args.out, "w") as f:
            f.write(markdown(self.data, self.args))


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


# ============================================================================================ 1. train
class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised at each step end): step i = end_i − end_{i−1}, so data
    loading, the optimizer and the Trainer's bookkeeping are included."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.ends.append(time.perf_counter())

    def step_ms(self, warmup: int) -> list[float]:
        ends = [self.start] + self.ends
        return [(ends[i + 1] - ends[i]) * 1e3 for i in range(warmup, len(ends) - 1)]


def train_args(cls, out_dir: str, batch: int, steps: int, compile_: bool = False, **extra):
    return cls(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
               bf16=BF16, use_cpu=not CUDA, torch_compile=compile_, report_to="none", save_strategy="no",
               logging_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
               **extra)


def run_trainer(trainer, warmup: int) -> tuple[list[float], float, float]:
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no end-of-training metrics dict
    peak_reset()
    out = trainer.train()
    ms = timer.step_ms(warmup)
    peak = torch.cuda.max_memory_allocated() / 2**20 if CUDA else None
    return ms, float(out.training_loss), peak


def train_row(rep: Report, args, preset: str, kind: str, tmp: str, compile_: bool = False) -> None:
    B, T = args.train_batch.get(preset, 16), args.mrbp_window
    mem = model_memformer(preset, args.vocab)
    L = mem.config.segment_length
    warmup = args.compile_warmup if compile_ else args.train_warmup
    steps = warmup + args.train_steps
    tokens = B * T * L
    name = f"{kind} {preset}" + (" torch_compile" if compile_ else "")
    if kind == "memformer":
        model = mem
        docs = random_ids(B, steps * T * L, args.vocab, seed=1, bos=False).tolist()
        targs = train_args(MemformerTrainingArguments, tmp, B, steps, compile_, mrbp_window=T)
        trainer = MemformerTrainer(model=model, args=targs, train_dataset=docs)
        how = f"MemformerTrainer, MRBP window {T}, {B} streams × {T}×{L} tokens"
    else:
        model = model_llama(mem)
        del mem
        model.config.use_cache = False
        ids = random_ids(B * steps, T * L, args.vocab, seed=1, bos=False)
        data = [dict(input_ids=r, labels=r) for r in ids]
        trainer = Trainer(model=model, args=train_args(TrainingArguments, tmp, B, steps, dataloader_drop_last=True),
                          train_dataset=data)
        how = f"transformers.Trainer, {B} rows × {T * L} tokens"
    info = describe(model)
    log("train", f"{name}: {info['shape']}, {info['total'] / 1e6:.2f}M parameters, {info['nonemb'] / 1e6:.2f}M "
                 "non-embedding")
    ms, loss, peak = run_trainer(trainer, warmup)
    step = median(ms)
    tok_s = tokens * 1e3 / step
    mfu = 6 * info["flops_params"] * tok_s / PEAK_FLOPS if CUDA else None
    r = rep.row("train", model=kind, preset=preset, compiled=compile_, batch=B, tokens_per_step=tokens,
                step_ms=step, step_ms_all=ms, tok_s=tok_s, mfu=mfu, train_loss=loss, peak_mb=peak, how=how,
                optim=getattr(trainer.args.optim, "value", str(trainer.args.optim)), nonemb=info["nonemb"], flops_params=info["flops_params"])
    log("train", f"{name:28s} B={B:<4d} {step:8.1f} ms/step {tok_s:11,.0f} tok/s"
        + (f" MFU {mfu:.1%}" if mfu is not None else "") + f" loss {loss:.3f}")
    rep.models(f"train:{kind}:{preset}", **info)
    trainer.accelerator.free_memory()
    del trainer, model, r
    if compile_:
        torch._dynamo.reset()
    free()


def section_train(rep: Report, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.train_presets:
            for kind in ("memformer", "llama"):
                if over_budget(args):
                    return log("train", "time budget reached: skipping the rest")
                try:
                    train_row(rep, args, preset, kind, tmp)
                except Exception as e:  # noqa: BLE001
                    rep.error("train", f"{kind} {preset}", e)
                    free()
        if args.torch_compile:
            for preset in args.compile_presets:
                if over_budget(args):
                    return log("train", "time budget reached: skipping the rest")
                try:
                    train_row(rep, args, preset, "memformer", tmp, compile_=True)
                except Exception as e:  # noqa: BLE001  (refused with a reason, or failed)
                    rep.error("train", f"memformer {preset} torch_compile", e)
                    torch._dynamo.reset()
                    free()


# ============================================================================================ 2. mrbp
def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in model.parameters()])


def section_mrbp(rep: Report, args) -> None:
    model = model_memformer(args.mrbp_preset, args.vocab).to(DEVICE).train()
    rep.models(f"mrbp:memformer:{args.mrbp_preset}", **describe(model))
    L, B = model.config.segment_length, args.mrbp_batch
    for T in args.mrbp_T:
        if over_budget(args):
            return log("mrbp", "time budget reached: skipping the rest")
        ids = random_ids(B, T * L + 1, args.vocab, seed=T).to(DEVICE)  # BOS boot + T full segments
        losses = {}

        def plain(ids=ids, model=model, losses=losses):
            model.zero_grad(set_to_none=False)
            with autocast():
                loss = model(ids, labels=ids).loss
            loss.backward()
            losses["plain"] = loss.detach()

        def mrbp(ids=ids, model=model, losses=losses):
            model.zero_grad(set_to_none=False)
            with autocast():
                loss, _ = memory_replay_backward(model, ids, labels=ids)
            losses["mrbp"] = loss.detach()

        row = dict(T=T, batch=B, tokens=B * T * L)
        try:
            plain()  # warm-up, also the gradient check
            g_plain = flat_grads(model)
            mrbp()
            g_mrbp = flat_grads(model)
            row.update(grad_rel_diff=float((g_plain - g_mrbp).norm() / g_plain.norm().clamp_min(1e-30)),
                       loss_abs_diff=abs(float(losses["plain"]) - float(losses["mrbp"])), loss=float(losses["plain"]))
            del g_plain, g_mrbp
            for name, fn in (("plain", plain), ("mrbp", mrbp)):
                free()
                start = peak_reset()
                fn()
                peak, above = peak_mb(start)
                ms = median(time_cuda(fn, warmup=0, repeat=args.mrbp_repeat))
                row.update({f"{name}_ms": ms, f"{name}_peak_mb": peak, f"{name}_above_start_mb": above})
            row["speed_ratio"] = row["plain_ms"] / row["mrbp_ms"]
        except Exception as e:  # noqa: BLE001
            rep.error("mrbp", f"T={T}", e)
            free()
            continue
        rep.row("mrbp", **row)
        mem = "" if row["mrbp_peak_mb"] is None else (
            f" peak MB plain {row['plain_peak_mb']:,.0f} mrbp {row['mrbp_peak_mb']:,.0f}")
        log("mrbp", f"T={T:<3d} B={B} plain {row['plain_ms']:8.1f} ms  mrbp {row['mrbp_ms']:8.1f} ms  "
                    f"speed {row['speed_ratio']:.2f}x{mem}  grad rel diff {row['grad_rel_diff']:.1e}")
    rows = rep.data["sections"].get("mrbp", [])
    by_t = {r["T"]: r for r in rows}
    if CUDA and len(by_t) >= 2:
        lo, hi = by_t[min(by_t)], by_t[max(by_t)]
        rep.data["mrbp_peak_ratio"] = dict(T_lo=lo["T"], T_hi=hi["T"],
                                           peak=hi["mrbp_peak_mb"] / lo["mrbp_peak_mb"],
                                           above_start=hi["mrbp_above_start_mb"] / lo["mrbp_above_start_mb"],
                                           plain_peak=hi["plain_peak_mb"] / lo["plain_peak_mb"])
        pr = rep.data["mrbp_peak_ratio"]
        log("mrbp", f"peak(T={hi['T']})/peak(T={lo['T']}): mrbp {pr['peak']:.2f}x (above start {pr['above_start']:.2f}x)"
                    f", plain {pr['plain_peak']:.2f}x")
    del model
    free()


# ============================================================================================ 3. prefill
@torch.no_grad()
def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].float()


def section_prefill(rep: Report, args) -> None:
    dtype = torch.bfloat16 if BF16 else torch.float32
    n = args.prefill_tokens
    ids = random_ids(1, n, args.vocab, seed=3).to(DEVICE)
    mem = model_memformer(args.prefill_preset, args.vocab)
    for kind in ("memformer", "llama"):
        if over_budget(args):
            return log("prefill", "time budget reached: skipping the rest")
        model = (mem if kind == "memformer" else model_llama(mem)).eval()
        rep.models(f"prefill:{kind}:{args.prefill_preset}", **describe(model))
        ref32 = copy.deepcopy(model).float().to(DEVICE)  # same weights in float32 (also bf16-rounded: see below)
        model = model.to(device=DEVICE, dtype=dtype)
        ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # exactly the tested weights
        row = dict(model=kind, preset=args.prefill_preset, batch=1, tokens=n)
        try:
            def run(model=model):
                with torch.no_grad():
                    model(ids, use_cache=True, logits_to_keep=1)

            start = peak_reset()
            ms = time_cuda(run, warmup=1, repeat=args.prefill_repeat)
            row.update(ms=median(ms), ms_all=ms, tok_s=n * 1e3 / median(ms), peak_mb=peak_mb(start)[0])
            got = last_logits(model, ids)
            want = last_logits(ref32, ids)
            row.update(fp32_gpu_max_abs_diff=float((got - want).abs().max()), logit_std=float(want.std()))
            if kind == "memformer":  # eager float32 on the CPU (no CUDA graphs possible) at a shorter prompt
                short = ids[:, :args.check_tokens]
                cpu = copy.deepcopy(ref32).cpu()
                row.update(check_tokens=short.shape[1], fp32_cpu_max_abs_diff=float(
                    (last_logits(model, short).cpu() - last_logits(cpu, short.cpu())).abs().max()))
                del cpu
        except Exception as e:  # noqa: BLE001
            rep.error("prefill", kind, e)
        else:
            rep.row("prefill", **row)
            cpu_txt = f" | vs fp32 CPU@{row['check_tokens']}: {row['fp32_cpu_max_abs_diff']:.2e}" \
                if "fp32_cpu_max_abs_diff" in row else ""
            log("prefill", f"{kind:9s} {n} tok B=1 {row['ms']:9.1f} ms {row['tok_s']:11,.0f} tok/s | last logits vs "
                           f"fp32 max|d| {row['fp32_gpu_max_abs_diff']:.2e} (std {row['logit_std']:.2f}){cpu_txt}")
        del model, ref32
        free()
    del mem
    free()


# ============================================================================================ 4. generate
def timed_generate(model, ids: torch.Tensor, n: int, **kw) -> tuple[float, torch.Tensor]:
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, do_sample=False, **kw)
    sync()
    return time.perf_counter() - t0, out


def decode_rate(model, ids: torch.Tensor, n: int, repeat: int, seg: int, **kw) -> tuple[dict, torch.Tensor]:
    """Warm up (prefill + 2 segments of decoding), then median t(1 new) and t(N new), alternating."""
    cache = kw.pop("cache", None)

    def kwargs():
        return {} if cache is None else {"past_key_values": copy.deepcopy(cache)}

    timed_generate(model, ids, min(n, 2 * seg + 2), **kwargs())
    t1s, tns, out = [], [], None
    for _ in range(repeat):
        t1s.append(timed_generate(model, ids, 1, **kwargs())[0])
        t, out = timed_generate(model, ids, n, **kwargs())
        tns.append(t)
    t1, tn = median(t1s), median(tns)
    b = ids.shape[0]
    new = out.shape[1] - ids.shape[1]
    if tn <= t1:  # only on a noisy CPU with tiny N: no meaningful decode time
        return dict(t1_s=t1, tN_s=tn, new_tokens=new, complete=new == n, ms_per_token=None, tok_s=None), out
    step = (tn - t1) / (n - 1)
    return dict(t1_s=t1, tN_s=tn, new_tokens=new, complete=new == n, ms_per_token=step * 1e3,
                tok_s=b / step), out


@torch.no_grad()
def greedy_gap(ref_cpu, seq: torch.Tensor, prompt_len: int) -> dict:
    """Teacher-forced float32 CPU forward of the generated sequence: for each generated token, the gap between the
    best logit and the generated token's logit (0 when the choice is the float32 argmax)."""
    logits = ref_cpu(seq.cpu()).logits[:, prompt_len - 1:-1].float()
    gen = seq[:, prompt_len:].cpu()
    chosen = logits.gather(-1, gen[..., None])[..., 0]
    gap = logits.max(-1).values - chosen
    return dict(check_gap_max=float(gap.max()), check_argmax_match=float((gap == 0).float().mean()),
                check_logit_std=float(logits.std()))


def section_generate(rep: Report, args) -> None:
    dtype = torch.bfloat16 if BF16 else torch.float32
    n = args.new_tokens
    mem = model_memformer(args.gen_preset, args.vocab)
    seg = mem.config.segment_length
    for kind in ("memformer", "llama"):
        model = (mem if kind == "memformer" else model_llama(mem)).eval()
        rep.models(f"generate:{kind}:{args.gen_preset}", **describe(model))
        ref_cpu = copy.deepcopy(model).float().cpu().eval() if args.gen_check_row else None
        model = model.to(device=DEVICE, dtype=dtype)
        if ref_cpu is not None:
            ref_cpu.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
        for batch, context in args.gen_rows:
            if over_budget(args):
                log("generate", "time budget reached: skipping the rest")
                break
            ids = random_ids(batch, context, args.vocab, seed=context + batch).to(DEVICE)
            row = dict(model=kind, preset=args.gen_preset, batch=batch, context=context, N=n)
            try:
                r, out = decode_rate(model, ids, n, args.gen_repeat, seg)
                row.update(r)
                if ref_cpu is not None and (batch, context) == args.gen_check_row:
                    row.update(greedy_gap(ref_cpu, out, context))
            except Exception as e:  # noqa: BLE001
                rep.error("generate", f"{kind} B={batch} ctx={context}", e)
                free()
                continue
            rep.row("generate", **row)
            chk = (f" | fp32 CPU check: argmax match {row['check_argmax_match']:.0%}, max gap "
                   f"{row['check_gap_max']:.2e} (logit std {row['check_logit_std']:.2f})") if "check_gap_max" in row else ""
            log("generate", f"{kind:9s} B={batch:<3d} ctx={context:<7d} {fmt(row['tok_s'], '10,.0f')} tok/s "
                            f"{fmt(row['ms_per_token'], '7.2f')} ms/token (t1 {row['t1_s']:.2f}s tN {row['tN_s']:.2f}s)"
                            + ("" if row["complete"] else f" INCOMPLETE {row['new_tokens']}/{n}") + chk)
            free()
        if kind == "memformer" and args.long and not over_budget(args):
            try:
                long_stream(rep, args, model, n, seg)
            except Exception as e:  # noqa: BLE001
                rep.error("generate", "memformer long stream", e)
        del model, ref_cpu
        free()
    del mem
    free()


@torch.no_grad()
def long_stream(rep: Report, args, model, n: int, seg: int) -> None:
    """A stream of `long_tokens` tokens: prefill of all but the last token in chunks through the forward with the
    cache, then `generate` continuing from (a copy of) that cache."""
    total = args.long_tokens
    ids = random_ids(1, total, args.vocab, seed=7).to(DEVICE)
    cache, t0 = None, time.perf_counter()
    for s in range(0, total - 1, args.long_chunk):
        kw = {} if cache is None else {"past_key_values": cache}
        cache = model(ids[:, s:min(s + args.long_chunk, total - 1)], use_cache=True, logits_to_keep=1,
                      **kw)[CACHE_KWARG]
    sync()
    prefill_s = time.perf_counter() - t0
    r, _ = decode_rate(model, ids, n, args.gen_repeat, seg, cache=cache)
    row = rep.row("generate", model="memformer", preset=args.gen_preset, batch=1, context=total, N=n, long=True,
                  prefill_s=prefill_s, prefill_tok_s=(total - 1) / prefill_s, **r)
    log("generate", f"memformer B=1   ctx={total:<7d} {fmt(row['tok_s'], '10,.0f')} tok/s "
                    f"{fmt(row['ms_per_token'], '7.2f')} "
                    f"ms/token (chunked prefill {prefill_s:.1f}s, {row['prefill_tok_s']:,.0f} tok/s)")


# ============================================================================================ 5. eval
@torch.no_grad()
def stream_eval_loss(model, docs: list[list[int]]) -> tuple[float, int]:
    """Token-weighted NLL with the memory carried through each whole document: [BOS] + doc through the stream
    forward (the reference for `evaluate_documents`' carried-memory loss)."""
    nll, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[BOS] + list(doc)])
        out = model(ids, labels=ids)
        k = len(doc)
        nll += float(out.loss) * k
        count += k
    return nll / count, count


def section_eval(rep: Report, args) -> None:
    dtype = torch.bfloat16 if (BF16 and args.eval_dtype == "bf16") else torch.float32
    model = model_memformer(args.eval_preset, args.vocab).eval()
    rep.models(f"eval:memformer:{args.eval_preset}", **describe(model))
    model = model.to(device=DEVICE, dtype=dtype)
    docs = random_ids(args.eval_docs, args.eval_doc_tokens, args.vocab, seed=5, bos=False).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        targs = MemformerTrainingArguments(output_dir=tmp, per_device_eval_batch_size=args.eval_batch,
                                           eval_no_memory=True, bf16=BF16, use_cpu=not CUDA, report_to="none",
                                           disable_tqdm=True)
        trainer = MemformerTrainer(model=model, args=targs)
        try:
            L = model.config.segment_length
            warm = [d[:targs.eval_window * L] for d in docs]
            trainer.evaluate_documents(warm)  # warm-up on the same batch shape
            times, metrics = [], {}
            for _ in range(args.eval_repeat):
                sync()
                t0 = time.perf_counter()
                metrics = trainer.evaluate_documents(docs)
                sync()
                times.append(time.perf_counter() - t0)
            sec = median(times)
            tokens = int(metrics["eval_tokens"])
            row = dict(preset=args.eval_preset, docs=args.eval_docs, doc_tokens=args.eval_doc_tokens,
                       eval_batch=args.eval_batch, weights=str(dtype).replace("torch.", ""), tokens=tokens, s=sec,
                       tok_s=tokens / sec, eval_loss=metrics["eval_loss"],
                       eval_loss_no_memory=metrics.get("eval_loss_no_memory"))
            k = args.eval_check_docs
            if k:  # numerics: the same documents, float32 CPU stream forward vs evaluate_documents here
                sub = trainer.evaluate_documents(docs[:k])
                cpu = copy.deepcopy(model).float().cpu()
                ref, count = stream_eval_loss(cpu, docs[:k])
                row.update(check_docs=k, check_loss=sub["eval_loss"], check_ref_loss_fp32_cpu=ref,
                           check_abs_diff=abs(sub["eval_loss"] - ref), check_tokens_match=count == sub["eval_tokens"])
                del cpu
        except Exception as e:  # noqa: BLE001
            rep.error("eval", "evaluate_documents", e)
        else:
            rep.row("eval", **row)
            chk = (f" | {k} docs vs fp32 CPU stream forward: |dloss| {row['check_abs_diff']:.2e}"
                   f"{'' if row['check_tokens_match'] else ' (token counts differ)'}") if k else ""
            log("eval", f"memformer {args.eval_preset} {args.eval_docs}x{args.eval_doc_tokens} B={args.eval_batch} "
                        f"{sec:7.2f} s {row['tok_s']:11,.0f} tok/s (memory + no-memory passes){chk}")
        del trainer
    del model
    free()


# ============================================================================================ report
def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def f0(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


def markdown(d: dict, args) -> str:
    S = d["sections"]
    out = ["# Issue 14: every user path, Memformer vs same-size Llama, one process\n",
           f"- Environment: {d['environment']}", f"- Command: `{d['command']}`",
           f"- Sections run: {', '.join(args.sections)}; time per section (s): "
           + ", ".join(f"{k} {v:.0f}" for k, v in d["section_seconds"].items()),
           "- Random weights and random tokens; " + ("bf16" if BF16 else "float32") + ". Llama: `LlamaForCausalLM` with the "
           "Memformer's width, heads and vocabulary, tied embeddings, sdpa, depth/FFN chosen to match the "
           "non-embedding parameter count.", ""]
    if d["models"]:
        out += ["## Models", "", "Parameters counted with tied embeddings once; N (MFU) = non-embedding + vocab · d.", "",
                "| use | model | shape | parameters | non-embedding | vs Memformer | N (MFU) |",
                "|---|---|---|---:|---:|---:|---:|"]
        for k, m in d["models"].items():
            sec, kind, preset = k.split(":")
            ref = d["models"].get(f"{sec}:memformer:{preset}")
            ratio = f"{m['nonemb'] / ref['nonemb']:.3f}×" if ref and kind != "memformer" else "–"
            out.append(f"| {sec} ({preset}) | {kind} | {m['shape']} | {m['total'] / 1e6:.2f}M | "
                       f"{m['nonemb'] / 1e6:.2f}M | {ratio} | {m['flops_params'] / 1e6:.2f}M |")
        out.append("")
    out += summary(d)
    if S.get("train"):
        out += ["## 1. Training", "",
                "Steady state: median over the timed optimizer steps of (end of step i − end of step i−1), "
                "synchronised, after the warm-up steps (data loading, optimizer and Trainer bookkeeping included). "
                "tokens/s = batch · T · L / step time (Llama: batch · 256 tokens per step, same count). Both "
                "through a Trainer with the same `TrainingArguments` (bf16=True: float32 weights, bf16 autocast; "
                "the default optimizer, below); Llama with `use_cache=False`. MFU = 6 · N · tokens/s / 989e12 "
                "(H200 bf16 dense peak), N = non-embedding parameters + vocab · d (the LM head's matmul); attention "
                "score FLOPs and MRBP's recomputation are not counted.", "",
                "| model | preset | compile | batch | tokens/step | ms/step | tokens/s | MFU | peak MB | loss | optim |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in S["train"]:
            mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%}"
            out.append(f"| {r['model']} | {r['preset']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | "
                       f"{r['tokens_per_step']:,} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {mfu} | "
                       f"{f0(r['peak_mb'])} | {r['train_loss']:.3f} | {r['optim']} |")
        out.append("")
    if S.get("mrbp"):
        out += ["## 2. memory_replay_backward vs whole-sequence backward", "",
                "Input: [BOS] + T·L random tokens per row (the BOS is the boot segment), `labels=input_ids`; float32 "
                "weights under bf16 autocast (as the Trainer). Plain: `model(ids, labels=ids).loss.backward()`. "
                "Peak: `max_memory_allocated` during one call after `reset_peak_memory_stats` (weights, grads, "
                "batch included); above start: minus what was allocated before the call. Gradient check: "
                "‖g_plain − g_mrbp‖ / ‖g_plain‖ in the same dtype setting.", "",
                "| T | batch | plain ms | MRBP ms | speed (plain/MRBP) | plain peak MB | MRBP peak MB | "
                "MRBP above start MB | grad rel diff | loss diff |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in S["mrbp"]:
            out.append(f"| {r['T']} | {r['batch']} | {r['plain_ms']:.1f} | {r['mrbp_ms']:.1f} | "
                       f"{r['speed_ratio']:.2f}× | {f0(r['plain_peak_mb'])} | {f0(r['mrbp_peak_mb'])} | "
                       f"{f0(r['mrbp_above_start_mb'])} | {r['grad_rel_diff']:.1e} | {r['loss_abs_diff']:.1e} |")
        if "mrbp_peak_ratio" in d:
            pr = d["mrbp_peak_ratio"]
            out += ["", f"peak(T={pr['T_hi']}) / peak(T={pr['T_lo']}): MRBP {pr['peak']:.2f}× (above start "
                        f"{pr['above_start']:.2f}×); plain backward {pr['plain_peak']:.2f}×."]
        out.append("")
    if S.get("prefill"):
        out += ["## 3. Prefill", "",
                "`model(ids, use_cache=True, logits_to_keep=1)` under `torch.no_grad`, batch 1, bf16 weights, median "
                "after one warm-up. Numerics: max |Δ| of the last logits vs the same (bf16-valued) weights in float32 "
                "on the GPU at the full length, and (Memformer) in float32 eager on the CPU at a shorter prompt.", "",
                "| model | tokens | ms | tokens/s | peak MB | max abs Δ vs fp32 (same device) | vs fp32 CPU eager | logit std |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in S["prefill"]:
            cpu = f"{r['fp32_cpu_max_abs_diff']:.2e} (@{r['check_tokens']})" if "fp32_cpu_max_abs_diff" in r else "–"
            out.append(f"| {r['model']} | {r['tokens']:,} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {f0(r['peak_mb'])} | "
                       f"{r['fp32_gpu_max_abs_diff']:.2e} | {cpu} | {r['logit_std']:.2f} |")
        out.append("")
    if S.get("generate"):
        out += ["## 4. Plain generate()", "",
                "`model.generate(ids, max_new_tokens=N, do_sample=False)`, no other flags (eos disabled in the "
                "generation config so that N tokens are always produced), bf16 weights; Llama gets its default "
                "DynamicCache. Decode tokens/s = batch · (N − 1) / (t(N new) − t(1 new)), medians after one warm-up "
                "(prefill excluded); ms/token = the per-step time. Check: the generated tokens teacher-forced "
                "through the float32 CPU model: share that are its argmax, and the largest logit gap.", "",
                "| model | batch | context | N | decode tokens/s | ms/token | t(1 new) s | t(N new) s | "
                "check: argmax match | max gap |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in S["generate"]:
            chk = (f"{r['check_argmax_match']:.0%} | {r['check_gap_max']:.2e}" if "check_gap_max" in r else "– | –")
            ctx = f"{r['context']:,}" + (" (chunked prefill)" if r.get("long") else "")
            out.append(f"| {r['model']} | {r['batch']} | {ctx} | {r['N']} | {fmt(r['tok_s'], ',.0f')} | "
                       f"{fmt(r['ms_per_token'], '.2f')} | {r['t1_s']:.2f} | {r['tN_s']:.2f} | {chk} |")
        out.append("")
    if S.get("eval"):
        out += ["## 5. evaluate_documents", "",
                "`MemformerTrainer.evaluate_documents(documents)` with `eval_no_memory=True` (two passes: memory "
                "carried, memory reset every segment); tokens/s counts the documents' tokens once. Check: eval loss "
                "of the first documents vs a float32 CPU stream forward ([BOS] + document, `labels`).", "",
                "| docs × tokens | eval batch | weights | s | tokens/s | eval loss | no-memory loss | check |Δ loss| |",
                "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in S["eval"]:
            chk = f"{r['check_abs_diff']:.1e}" if "check_abs_diff" in r else "–"
            out.append(f"| {r['docs']} × {r['doc_tokens']} | {r['eval_batch']} | {r['weights']} | {r['s']:.2f} | "
                       f"{r['tok_s']:,.0f} | {r['eval_loss']:.4f} | {r['eval_loss_no_memory']:.4f} | {chk} |")
        out.append("")
    if d["errors"]:
        out += ["## Errors / skipped", ""] + [f"- {s}: {e}" for s, es in d["errors"].items() for e in es] + [""]
    return "\n".join(out)


def summary(d: dict) -> list[str]:
    """Issue 14's targets with the measured values."""
    S, rows = d["sections"], []

    def add(path, mem, base, ratio, target, ok):
        rows.append(f"| {path} | {mem} | {base} | {ratio} | {target} | {'–' if ok is None else ('yes' if ok else 'no')} |")

    tr = {(r["model"], r["preset"], r["compiled"]): r for r in S.get("train", [])}
    for (kind, preset, compiled), r in tr.items():
        if kind != "memformer":
            continue
        if compiled:
            plain = tr.get(("memformer", preset, False))
            ratio = r["tok_s"] / plain["tok_s"] if plain else None
            add(f"train {preset}, torch_compile=True", f"{r['tok_s']:,.0f} tok/s", "(vs uncompiled)",
                "–" if ratio is None else f"{ratio:.2f}×", "> 1× uncompiled (or refused)",
                None if ratio is None else ratio > 1)
            continue
        base = tr.get(("llama", preset, False))
        ratio = r["tok_s"] / base["tok_s"] if base else None
        add(f"train {preset} (B={r['batch']})", f"{r['tok_s']:,.0f} tok/s", f"{base['tok_s']:,.0f} tok/s" if base else "–",
            "–" if ratio is None else f"{ratio:.2f}×", "≥ 1.0× Llama", None if ratio is None else ratio >= 1.0)
        if preset == "v1-lm" and r["mfu"] is not None:
            add("train v1-lm MFU", f"{r['mfu']:.1%}", f"{base['mfu']:.1%}" if base else "–", "–", "≥ 30%",
                r["mfu"] >= 0.30)
    mr = {r["T"]: r for r in S.get("mrbp", [])}
    if 4 in mr:
        add("memory_replay_backward speed, T=4", f"{mr[4]['mrbp_ms']:.1f} ms", f"{mr[4]['plain_ms']:.1f} ms (whole)",
            f"{mr[4]['speed_ratio']:.2f}×", "≥ 0.9×", mr[4]["speed_ratio"] >= 0.9)
    if "mrbp_peak_ratio" in d:
        pr = d["mrbp_peak_ratio"]
        add(f"memory_replay_backward peak T={pr['T_hi']} / T={pr['T_lo']}", f"{pr['peak']:.2f}×",
            f"{pr['plain_peak']:.2f}× (whole)", "–", "≤ 1.15×", pr["peak"] <= 1.15)
    pf = {r["model"]: r for r in S.get("prefill", [])}
    if "memformer" in pf:
        r, b = pf["memformer"], pf.get("llama")
        add(f"prefill {r['tokens']:,} tokens, B=1", f"{r['ms'] / 1e3:.3f} s", f"{b['ms'] / 1e3:.3f} s" if b else "–",
            f"{b['ms'] / r['ms']:.2f}×" if b else "–", "≤ 0.25 s (at 32k)", r["ms"] <= 250 if r["tokens"] >= 32768 else None)
    gen = {(r["model"], r["batch"], r["context"]): r for r in S.get("generate", [])}
    gen = {k: r for k, r in gen.items() if r["tok_s"] is not None}
    for (kind, batch, ctx), r in gen.items():
        if kind != "memformer":
            continue
        b = gen.get(("llama", batch, ctx))
        ratio = r["tok_s"] / b["tok_s"] if b else None
        target, ok = ("≥ 1,000 tok/s", r["tok_s"] >= 1000) if batch == 1 else ("≥ 20,000 tok/s", r["tok_s"] >= 20000)
        if batch == 1 and ctx >= 32768 and b:
            target, ok = "≥ 1,000 tok/s and ≥ 5× Llama", r["tok_s"] >= 1000 and ratio >= 5
        add(f"generate B={batch}, context {ctx:,}", f"{r['tok_s']:,.0f} tok/s", f"{b['tok_s']:,.0f} tok/s" if b else "–",
            "–" if ratio is None else f"{ratio:.2f}×", target, ok)
    ctxs = sorted(c for (k, bt, c) in gen if k == "memformer" and bt == 1)
    flat = [gen[("memformer", 1, c)]["ms_per_token"] for c in ctxs]
    if len(flat) >= 2:
        spread = max(flat) / min(flat)
        add(f"generate ms/token B=1, contexts {ctxs[0]:,}–{ctxs[-1]:,}",
            f"{min(flat):.2f}–{max(flat):.2f} ms", "–", f"max/min {spread:.2f}", "flat (max/min ≤ 1.2)", spread <= 1.2)
    for r in S.get("eval", []):
        add(f"evaluate_documents ({r['preset']}, {r['docs']}×{r['doc_tokens']})", f"{r['tok_s']:,.0f} tok/s", "–",
            f"{r['tok_s'] / 28e3:.1f}× issue's 28k", "≥ 10× (280k tok/s)", r["tok_s"] >= 280e3)
    if not rows:
        return []
    return ["## Summary against issue 14's targets", "",
            "| path | Memformer | same-size Llama | ratio | target | met |", "|---|---:|---:|---:|---|---|",
            *rows, ""]


def main() -> None:
    global BF16
    args = parse()
    if args.dtype != "auto":
        BF16 = args.dtype == "bf16"
    if args.quick and not CUDA:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: no thread-pool stalls
    print(f"# {environment()}\n# {command()}", flush=True)
    rep = Report(args)
    funcs = dict(train=section_train, mrbp=section_mrbp, prefill=section_prefill, generate=section_generate,
                 eval=section_eval)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if over_budget(args):
            rep.data["errors"].setdefault(name, []).append("skipped: time budget reached")
            log(name, "skipped: time budget reached")
            continue
        sync()
        t = time.perf_counter()
        try:
            funcs[name](rep, args)
        except Exception as e:  # noqa: BLE001
            rep.error(name, "section", e)
        free()
        rep.data["section_seconds"][name] = time.perf_counter() - t
        rep.save()
    rep.save()
    print("\n".join(summary(rep.data)))
    print(f"wrote {args.out} and {args.json} ({elapsed()} total)")


if __name__ == "__main__":
    main()
