"""What could a memory read at the output be worth? Cache models beyond the decoder's window (issue 17).

The warm-started Memformer of issue 17 (L = 128, `decoder_previous_segment`) predicts each segment from the segment
before and its own prefix (windows of 2L advancing by L); its memory must add what lies further back. Six rounds of
memory designs added nothing over another document's memory. This script measures, without training a memory, how
much two classic *cache models* of the text beyond that window add to the backbone, mixed into its next-token
distribution with a fixed weight λ: p(y) = (1 − λ) p_LM(y | window) + λ p_cache(y).

* `global unigram`: the train split's unigram (no document information; the control for mere smoothing).
* `document unigram`: the counts of every token of the document before the window (a constant-size state: one count
  per vocabulary entry), `decayed` with a half-life in tokens.
* `neural cache` (Grave et al., 2017): the final hidden state h_i of each target is compared (cosine × θ) with the
  states h_j that predicted the tokens before the window, p_cache(y) = Σ_j softmax_j(θ cos(h_i, h_j)) [x_j = y]. An
  unbounded state (every past state): the value of copying from far back. Bounded versions keep only K past states
  (`STORE_SIZES`), the most recent before the window or the ones whose tokens surprised the model most when read: a
  constant-size state; K = 64 states of width d hold as many numbers as the Memformer's K = 64 slots.

Each target is scored once with the same window as the Memformer reset reference (the backbone with the previous
segment). λ (and θ) are picked on the even documents and reported on the odd ones ("held-out") and on all.
`--finetune_tokens N` repeats it after fine-tuning the backbone on N train tokens (windows of 2,048, the equal-token
control of `warm_start.py`), the model a trained Memformer's decoder is closer to.

    # CPU smoke run: a tiny random Llama on the first test documents, < 1 minute
    python benchmarks/cache_ceiling.py --tiny
    # CPU: what the bag-of-words target of `memory_prediction_loss` could reach (unigram vs ideal document cache)
    python benchmarks/cache_ceiling.py --bag_of_words
    # CPU, the real backbone on a subset (~15 min on 2 cores): 10 test books of >= 8,192 tokens, cut there
    python benchmarks/cache_ceiling.py --gguf_parts P0,P1 --max_eval_docs 10 --min_doc_tokens 8192 --max_doc_tokens 8192
    # device (the GGUF parts and tokens of benchmarks/warm_start.py --pack_for_device, see its docstring)
    PYTHONPATH=/tmp/site:$PWD python benchmarks/cache_ceiling.py --gguf_parts P0,P1 --tokens tokens.npz \\
        --finetune_tokens 4882432 --output_dir $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import write_results
from transformers import LlamaConfig, LlamaForCausalLM
from warm_start import SMOLLM2_BOS, eval_documents, join_parts, load_gguf_backbone, log, train_backbone, unpack_tokens

LAMBDAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
THETAS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
HALF_LIVES = (1024, 4096)
STORE_SIZES = (64, 256, 1024)  # bounded neural caches: K past states (K = 64: the floats of the Memformer's memory)
STORE_THETA = 40.0


@torch.no_grad()
def window_outputs(model, doc: list[int], L: int, bos: int, device: torch.device, batch: int = 64):
    """Per target position i of `doc`: log p_LM(doc[i]) and the final hidden state that predicts it, reading
    [BOS] + the previous segment + the current one up to i (windows of 2L advancing by L)."""
    n = len(doc)
    segs = list(range(0, n, L))
    lp = torch.empty(n, device=device)
    hid = torch.empty(n, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for k in range(0, len(segs), batch):
        starts = segs[k: k + batch]
        ids = torch.full((len(starts), 2 * L + 1), bos, dtype=torch.long)
        spans = []
        for r, s in enumerate(starts):
            begin, end = max(0, s - L), min(n, s + L)
            ids[r, 1: 1 + end - begin] = torch.tensor(doc[begin:end])
            spans.append((s - begin, end - s))  # offset of the segment inside the window, its length
        ids = ids.to(device)
        with autocast:
            h = model.model(ids[:, :-1]).last_hidden_state
            logits = model.lm_head(h)
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, (s, (off, length)) in enumerate(zip(starts, spans)):
            tgt = ids[r, 1 + off: 1 + off + length]
            lp[s: s + length] = logp[r, off: off + length].gather(-1, tgt[:, None])[:, 0]
            hid[s: s + length] = h[r, off: off + length].to(torch.bfloat16)
    return lp, hid


@torch.no_grad()
def cache_probs(doc: torch.Tensor, hid: torch.Tensor, lp: torch.Tensor, L: int, vocab: int, global_p: torch.Tensor
                ) -> dict:
    """p_cache(doc[i]) per position for every cache (each only from tokens before the window of i's segment). The
    bounded neural caches keep K past states: the K most recent before the window, or the K whose tokens were the
    most surprising to the model when read (−log p_LM, known causally)."""
    n = doc.numel()
    out = {"global unigram": global_p[doc]}
    counts = torch.zeros(vocab, device=doc.device)
    decayed = {h: torch.zeros(vocab, device=doc.device) for h in HALF_LIVES}
    doc_p = torch.zeros(n, device=doc.device)
    dec_p = {h: torch.zeros(n, device=doc.device) for h in HALF_LIVES}
    nc = {t: torch.zeros(n, device=doc.device) for t in THETAS}
    bounded = {(kind, k): torch.zeros(n, device=doc.device) for kind in ("recent", "surprising") for k in STORE_SIZES}
    hn = F.normalize(hid.float(), dim=-1)
    for s in range(0, n, L):
        seg = doc[s: s + L]
        ws = max(0, s - L)  # the window starts here; the caches hold doc[:ws]
        if ws > 0:
            doc_p[s: s + L] = counts[seg] / ws
            for h in HALF_LIVES:
                total = decayed[h].sum()
                dec_p[h][s: s + L] = decayed[h][seg] / total
            sim = hn[s: s + L] @ hn[:ws].T  # [l, ws]
            same = (seg[:, None] == doc[None, :ws]).float()
            for t in THETAS:
                nc[t][s: s + L] = (torch.softmax(t * sim, dim=-1) * same).sum(-1)
            for (kind, k), out_k in bounded.items():
                keep = (torch.arange(max(0, ws - k), ws, device=doc.device) if kind == "recent"
                        else (-lp[:ws]).topk(min(k, ws)).indices)
                out_k[s: s + L] = (torch.softmax(STORE_THETA * sim[:, keep], dim=-1) * same[:, keep]).sum(-1)
        # the segment that leaves the window next: doc[ws : ws + L] joins the caches for segment s + L
        leaving = doc[ws: ws + L] if s > 0 else doc[:0]
        counts += torch.bincount(leaving, minlength=vocab).float()
        for h in HALF_LIVES:
            decayed[h] = decayed[h] * 0.5 ** (leaving.numel() / h) + torch.bincount(leaving, minlength=vocab).float()
    out["document unigram"] = doc_p
    prior = 100.0  # Dirichlet prior: the document's counts smoothed towards the global unigram (a classic cache LM)
    starts = (torch.arange(n, device=doc.device) // L * L - L).clamp_min(0).float()
    out["document unigram, global prior (100 tokens)"] = (doc_p * starts + prior * global_p[doc]) / (starts + prior)
    for h in HALF_LIVES:
        out[f"document unigram, half-life {h}"] = dec_p[h]
    for t in THETAS:
        out[f"neural cache, θ={t:g}"] = nc[t]
    for (kind, k), out_k in bounded.items():
        out[f"neural cache of {k} states ({'most recent' if kind == 'recent' else 'most surprising'}), θ={STORE_THETA:g}"] = out_k
    return out


def probe(model, docs: list[list[int]], L: int, bos: int, device, global_p: torch.Tensor) -> dict:
    """Summed NLL per (cache, λ) over the even and the odd documents."""
    vocab = global_p.numel()
    sums: dict = {}
    base = [0.0, 0.0]
    tokens = [0, 0]
    for d, doc in enumerate(docs):
        half = d % 2
        lp, hid = window_outputs(model, doc, L, bos, device)
        doc_t = torch.tensor(doc, device=device)
        base[half] += float(-lp.sum())
        tokens[half] += len(doc)
        p_lm = lp.exp()
        for name, pc in cache_probs(doc_t, hid, lp, L, vocab, global_p).items():
            for lam in LAMBDAS:
                nll = float(-torch.log((1 - lam) * p_lm + lam * pc).sum())
                sums.setdefault(name, {}).setdefault(lam, [0.0, 0.0])[half] += nll
    return {"base": base, "tokens": tokens, "sums": sums}


def table(res: dict, what: str) -> tuple[str, dict]:
    """Markdown rows: perplexity without a cache and with each cache at the λ picked on the even documents."""
    base, tok = res["base"], res["tokens"]
    ppl = lambda nll, n: math.exp(nll / n)  # noqa: E731
    b_all, b_odd = ppl(sum(base), sum(tok)), ppl(base[1], tok[1])
    lines = [f"| {what}: window only (= the Memformer reset reference) | – | {b_odd:.2f} | – | {b_all:.2f} | – |"]
    summary = {"window_only": {"held_out": b_odd, "all": b_all}}
    for name, by_lam in res["sums"].items():
        lam = min(by_lam, key=lambda x: by_lam[x][0])  # picked on the even documents
        odd, all_ = ppl(by_lam[lam][1], tok[1]), ppl(sum(by_lam[lam]), sum(tok))
        lines.append(f"| {what}: + {name} | {lam:g} | {odd:.2f} | {100 * (1 - odd / b_odd):.2f}% | {all_:.2f} | "
                     f"{100 * (1 - all_ / b_all):.2f}% |")
        summary[name] = {"lambda": lam, "held_out": odd, "all": all_}
    return "\n".join(lines), summary


def train_unigram(flat: np.ndarray, vocab: int) -> np.ndarray:
    """The train split's unigram distribution (token counts + 0.1)."""
    g = np.bincount(flat, minlength=vocab) + 0.1
    return g / g.sum()


def bag_of_words_baselines(train: list[list[int]], vocab: int, L: int, docs: int = 60, seed: int = 0) -> str:
    """The targets of `memory_prediction_loss` (a segment's tokens as a bag of words) scored by the train split's
    unigram and by the ideal document cache (λ · counts of the document before the segment + (1 − λ) · unigram), in
    nats per token, on `docs` random train documents (first 16,384 tokens): what that loss's memory could reach."""
    g = train_unigram(np.concatenate([np.asarray(d, dtype=np.int64) for d in train]), vocab)
    lams = (0.0, 0.2, 0.4, 0.6, 0.8)
    nll = dict.fromkeys(lams, 0.0)
    n = 0
    for d in np.random.default_rng(seed).choice(len(train), min(docs, len(train)), replace=False):
        doc = np.asarray(train[d][:16384], dtype=np.int64)
        counts = np.zeros(vocab)
        for s in range(0, len(doc) - L, L):
            if s:
                seg = doc[s: s + L]
                for lam in lams:
                    nll[lam] -= np.log(lam * counts[seg] / counts.sum() + (1 - lam) * g[seg]).sum()
                n += len(seg)
            counts += np.bincount(doc[s: s + L], minlength=vocab)
    rows = [f"| train unigram | {nll[0.0] / n:.3f} |"] + [
        f"| document cache, λ = {lam} | {nll[lam] / n:.3f} |" for lam in lams[1:]]
    return "| bag-of-words target scored by | nats / token |\n|---|---:|\n" + "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on a few short test documents (CPU smoke)")
    p.add_argument("--gguf_parts", default=None)
    p.add_argument("--tokens", default=".device_carry/warm_start/tokens.npz")
    p.add_argument("--segment_length", type=int, default=128)
    p.add_argument("--min_doc_tokens", type=int, default=4096)
    p.add_argument("--max_doc_tokens", type=int, default=16384)
    p.add_argument("--max_eval_docs", type=int, default=0)
    p.add_argument("--finetune_tokens", type=int, default=0, help="also probe after fine-tuning on this many tokens")
    p.add_argument("--bos_token_id", type=int, default=SMOLLM2_BOS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--bag_of_words", action="store_true", help="only print bag_of_words_baselines (CPU, seconds)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    blob = np.load(args.tokens)
    if args.bag_of_words:
        print(bag_of_words_baselines(unpack_tokens(blob["train_flat"], blob["train_offsets"]), 49152,
                                     args.segment_length))
        return
    if args.tiny:
        args.min_doc_tokens, args.max_doc_tokens, args.max_eval_docs = 1024, 1024, args.max_eval_docs or 4
    docs = eval_documents(unpack_tokens(blob["test_flat"], blob["test_offsets"]), args)
    vocab = 49152
    global_p = torch.tensor(train_unigram(blob["train_flat"].astype(np.int64), vocab), dtype=torch.float32,
                            device=device)
    torch.manual_seed(args.seed)
    if args.tiny:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        model = load_gguf_backbone(join_parts(args.gguf_parts.split(",")))
    model.to(device).eval()
    log(f"{len(docs)} documents, {sum(map(len, docs)):,} tokens; L = {args.segment_length}")
    tic = time.time()
    rows, summary = [], {}
    res = probe(model, docs, args.segment_length, args.bos_token_id, device, global_p)
    text, summary["backbone"] = table(res, "backbone")
    rows.append(text)
    log(f"backbone probed in {time.time() - tic:.0f} s\n{text}")
    if args.finetune_tokens:
        train = unpack_tokens(blob["train_flat"], blob["train_offsets"])
        info = train_backbone(model, train, 2048, args.finetune_tokens, 16, 3e-5, args.bos_token_id, device,
                              args.seed, "control fine-tuning")
        res = probe(model, docs, args.segment_length, args.bos_token_id, device, global_p)
        text, summary["fine-tuned"] = table(res, f"fine-tuned ({info['tokens']:,} tokens)")
        rows.append(text)
        log(text)
    body = (f"{len(docs)} test documents (≥ {args.min_doc_tokens} tokens, cut at {args.max_doc_tokens}), "
            f"{sum(map(len, docs)):,} tokens; every target read with the previous segment and its own prefix "
            f"(L = {args.segment_length}); caches hold only the tokens before that window. λ picked on the even "
            f"documents; \"held-out\" = the odd documents.\n\n"
            "| model + cache beyond the window | λ | held-out ppl | gain | all ppl | gain |\n|---|---:|---:|---:|---:|---:|\n"
            + "\n".join(rows) + "\n")
    md = str(Path(args.output_dir, "cache_ceiling.md")) if args.output_dir else None
    out = write_results("cache_ceiling", "Cache models beyond the decoder's window (issue 17)", body, md)
    if args.output_dir:
        Path(args.output_dir, "cache_ceiling.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
