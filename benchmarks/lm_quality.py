"""Real-text perplexity: Memformer vs its no-memory ablation vs same-size sliding-window (Mistral) and full-context
(Llama) transformers, plus Memformer ablations (issue 7), at small scale on the shared long-document corpus.

All models use the same byte-level BPE (trained on the train split), the same number of training tokens and
roughly matched non-embedding parameters. Memformer variants train with `MemformerTrainer` (MRBP over contiguous
document streams) and are evaluated on the test split with the memory carried through whole documents
(`evaluate_documents`, which also reports perplexity by position and with the memory reset every segment).
Baselines train on contiguous `--context`-token chunks of the same streams and are evaluated on non-overlapping
`--context`-token chunks of every test document (each token predicted from at most `--context` previous tokens).

    python benchmarks/lm_quality.py --prepare DATA_DIR         # CPU: tokenizer + token arrays (run once)
    python benchmarks/lm_quality.py --data DATA_DIR            # GPU: trains every variant, writes results/quality.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import torch
import transformers
from common import param_counts, run_variants_in_parallel, write_results

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.cli.report import plot_writer_attention, writer_self_weights
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "corpora")
RESULTS = os.path.join(os.path.dirname(__file__), "results")
BOS, PAD = 0, 1

VARIANTS = {
    "memformer": {},
    "no_memory": {"_reset_every_segment": True},
    "no_kv_norm": {"normalize_memory_kv": False},
    "retain_init": {"memory_write_self_bias": 2.0, "forget_bias_init_scale": 0.1},
    "simplified_rpe": {"position_embedding_type": "simplified_rpe"},
    "bmn_off": {"use_forget_bias": False},
    "tau_1": {"memory_write_temperature": 1.0},
    "slots_1": {"num_memory_slots": 1},
    "slots_8": {"num_memory_slots": 8},
    "slots_128": {"num_memory_slots": 128},
    "window_1": {"_window": 1},
    "window_16": {"_window": 16},
}


def prepare(out: str, vocab: int) -> None:
    """Train the BPE on train, tokenize all splits, save uint16 token arrays + document offsets."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(out, exist_ok=True)
    docs = {s: [json.loads(x)["text"] for x in gzip.open(os.path.join(CORPUS, f"{s}.jsonl.gz"), "rt")]
            for s in ("train", "valid", "test")}
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(docs["train"], vocab_size=vocab, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    tok.save(os.path.join(out, "tokenizer.json"))
    for split, texts in docs.items():
        ids = [e.ids for e in tok.encode_batch(texts)]
        flat = torch.tensor([t for d in ids for t in d], dtype=torch.int32)
        offsets = torch.tensor([0] + list(torch.tensor([len(d) for d in ids]).cumsum(0).tolist()), dtype=torch.long)
        torch.save({"flat": flat.to(torch.int16) if vocab <= 32767 else flat, "offsets": offsets},
                   os.path.join(out, f"{split}.pt"))
        print(split, len(ids), "documents", len(flat), "tokens", flush=True)


def load(data: str, split: str) -> list[list[int]]:
    blob = torch.load(os.path.join(data, f"{split}.pt"))
    flat, off = blob["flat"].to(torch.long), blob["offsets"]
    return [flat[off[i]: off[i + 1]].tolist() for i in range(len(off) - 1)]


class _ResetEverySegment(torch.utils.data.Dataset):
    """A stream dataset whose every cell restarts from m₀ (the trained 'w/o memory' model)."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        batch = dict(self.base[i])
        batch["memory_reset"] = torch.ones_like(batch["memory_reset"])
        return batch


def run_memformer(name: str, overrides: dict, args, train, valid, test) -> dict:
    overrides = dict(overrides)
    window = overrides.pop("_window", args.window)
    reset_all = overrides.pop("_reset_every_segment", False)
    cfg = MemformerConfig(vocab_size=args.vocab, hidden_size=args.hidden, encoder_layers=args.enc_layers,
                          decoder_layers=args.dec_layers, num_attention_heads=args.heads,
                          intermediate_size=4 * args.hidden, segment_length=args.segment_length,
                          bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD, **{"num_memory_slots": 32, **overrides})
    torch.manual_seed(args.seed)
    model = MemformerForCausalLM(cfg)
    tokens_per_step = args.batch * window * args.segment_length
    steps = max(1, args.train_tokens // tokens_per_step)
    targs = MemformerTrainingArguments(
        output_dir=os.path.join(args.work, name), per_device_train_batch_size=args.batch, mrbp_window=window,
        max_steps=steps, learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="cosine", weight_decay=0.01,
        max_grad_norm=1.0, bf16=torch.cuda.is_available(), logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], per_device_eval_batch_size=16, eval_window=16, eval_no_memory=not reset_all,
        seed=args.seed, disable_tqdm=True)
    trainer = MemformerTrainer(model=model, args=targs, train_dataset=train)
    if reset_all:
        trainer.train_dataset = _ResetEverySegment(trainer.train_dataset)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    if reset_all:  # evaluate exactly as trained: memory reset every segment
        trainer.args.eval_no_memory = True
        valid_m = trainer.evaluate_documents(valid, "valid")
        test_m = trainer.evaluate_documents(test, "test")
        valid_ppl, test_ppl = valid_m["valid_ppl_no_memory"], test_m["test_ppl_no_memory"]
        valid_ppl = valid_ppl if name in args.valid_for else float("nan")
        test_m = {k.replace("_no_memory", ""): v for k, v in test_m.items() if "_no_memory" in k}
    else:
        trainer.args.eval_no_memory = name == "memformer"  # the reset-every-segment diagnostic for the main model
        valid_ppl = trainer.evaluate_documents(valid, "valid")["valid_ppl"] if name in args.valid_for else float("nan")
        test_m = trainer.evaluate_documents(test, "test")
        test_ppl = test_m["test_ppl"]
    # the writer analysis (paper Fig. 6): each slot's attention on itself over 128 segments of the first test book
    weights = writer_self_weights(trainer.model, test[0], 128)
    png = os.path.join(os.path.dirname(args.output) if args.output else RESULTS,
                       f"{args.results_name}_writer_{name}.png")
    test_m.update(plot_writer_attention(weights, Path(png), f"{name}: writer attention of each slot on itself, "
                                                            f"{weights.shape[1]} segments of a test book"))
    total, non_emb = param_counts(model)
    return dict(name=name, params=total, non_embedding=non_emb, steps=steps, tokens=steps * tokens_per_step,
                seconds=seconds, valid_ppl=valid_ppl, test_ppl=test_ppl, metrics=test_m)


def chunks(docs: list[list[int]], context: int) -> list[list[int]]:
    out = []
    for d in docs:
        for i in range(0, len(d), context):
            c = d[i: i + context]
            if len(c) > 1:
                out.append([BOS] + c)
    return out


def run_baseline(name: str, args, train, valid, test) -> dict:
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.baseline_intermediate,
                  num_hidden_layers=args.baseline_layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads, tie_word_embeddings=True, max_position_embeddings=4 * args.context,
                  bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)
    torch.manual_seed(args.seed)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=args.sliding_window,
                                                                           **common))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    data = chunks(train, args.context)
    g = torch.Generator().manual_seed(args.seed)
    batch = max(1, args.batch * args.window * args.segment_length // args.context)
    steps = max(1, args.train_tokens // (batch * args.context))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = transformers.get_cosine_schedule_with_warmup(opt, int(0.05 * steps), steps)
    t0 = time.time()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        width = max(len(data[i]) for i in idx)
        ids = torch.full((batch, width), PAD)
        for r, i in enumerate(idx):
            ids[r, : len(data[i])] = torch.tensor(data[i])
        ids = ids.to(device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(data[i]) for i in idx],
                                                                       device=device)[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    total, non_emb = param_counts(model)
    return dict(name=name, params=total, non_embedding=non_emb, steps=steps, tokens=steps * batch * args.context,
                seconds=seconds, valid_ppl=eval_baseline(model, valid, args, device),
                test_ppl=eval_baseline(model, test, args, device))


@torch.no_grad()
def eval_baseline(model, docs, args, device) -> float:
    model.eval()
    nll, count = 0.0, 0
    for c in chunks(docs, args.context):
        ids = torch.tensor([c], device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", default=None, help="write tokenizer + token arrays to this folder and exit")
    p.add_argument("--data", default=None)
    p.add_argument("--work", default="/tmp/lm_quality")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--enc_layers", type=int, default=2)
    p.add_argument("--dec_layers", type=int, default=4)
    p.add_argument("--baseline_layers", type=int, default=6)
    p.add_argument("--baseline_intermediate", type=int, default=1024)
    p.add_argument("--segment_length", type=int, default=64)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--valid_for", default="memformer,no_memory", help="variants also evaluated on valid (slow: whole "
                                                                       "books with carried memory)")
    p.add_argument("--context", type=int, default=512, help="baselines' training/eval context")
    p.add_argument("--sliding_window", type=int, default=128)
    p.add_argument("--train_tokens", type=int, default=4_000_000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(list(VARIANTS) + ["mistral", "llama"]))
    p.add_argument("--max_eval_documents", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--results_name", default="quality", help="results/<name>.md")
    p.add_argument("--parallel", type=int, default=0, help="train the variants in parallel processes on one GPU")
    p.add_argument("--row_json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.valid_for = set(args.valid_for.split(","))
    if args.prepare:
        prepare(args.prepare, args.vocab)
        return
    names = args.variants.split(",")
    if args.parallel and len(names) > 1:
        rows = list(run_variants_in_parallel(names, os.path.join(args.work, "variants")).values())
        return report(rows, args)
    train, valid, test = (load(args.data, s) for s in ("train", "valid", "test"))
    if args.max_eval_documents:  # smoke runs: the last (short) documents of each split
        valid, test = valid[-args.max_eval_documents:], test[-args.max_eval_documents:]
    rows = []
    for name in names:
        if name in ("llama", "mistral"):
            row = run_baseline(name, args, train, valid, test)
        else:
            row = run_memformer(name, VARIANTS[name], args, train, valid, test)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.row_json:
            with open(args.row_json, "w") as f:
                json.dump(row, f)
            return
    report(rows, args)


def report(rows: list[dict], args) -> None:
    sizes = {s: int(torch.load(os.path.join(args.data, f"{s}.pt"))["offsets"][-1]) for s in ("train", "valid", "test")}
    lines = [f"Corpus: shared/data/corpora (train {sizes['train']:,} / valid {sizes['valid']:,} / test "
             f"{sizes['test']:,} BPE tokens, vocab {args.vocab}). Memformer d={args.hidden}, "
             f"{args.enc_layers}+{args.dec_layers} layers, L={args.segment_length}, K=32, MRBP T={args.window}, "
             f"batch {args.batch} streams; baselines {args.baseline_layers} layers, d={args.hidden}, context "
             f"{args.context} (Mistral sliding window {args.sliding_window}). ~{args.train_tokens:,} training tokens "
             f"each, AdamW lr {args.lr} cosine, bf16, seed {args.seed}. Test perplexity is per BPE token; Memformer "
             "carries memory through whole documents.", "",
             "| model | params (non-emb) | train tokens | train s | valid ppl | test ppl | test ppl, memory reset "
             "each segment | test ppl by position 0-64 / 64-512 / 512-4k / 4k-32k / 32k+ | writer: mean self weight "
             "/ retaining slots |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        m = r.get("metrics", {})
        pos = " / ".join(f"{m[k]:.1f}" if k in m else "–" for k in
                         ("test_ppl_pos_0-64", "test_ppl_pos_64-512", "test_ppl_pos_512-4096",
                          "test_ppl_pos_4096-32768", "test_ppl_pos_32768+"))
        nomem = f"{m['test_ppl_no_memory']:.2f}" if "test_ppl_no_memory" in m else "–"
        writer = (f"{m['writer_self_weight_mean']:.2f} / {m['writer_retain_fraction']:.0%}"
                  if "writer_self_weight_mean" in m else "–")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M ({r['non_embedding'] / 1e6:.2f}M) | "
                     f"{r['tokens']:,} | {r['seconds']:.0f} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {nomem} | "
                     f"{pos} | {writer} |")
    table = "\n".join(lines)
    print(table)
    write_results(args.results_name, "Real-text perplexity: Memformer, ablations and baselines", table, args.output)


if __name__ == "__main__":
    main()
