"""Synthetic memory tasks whose answer lies many segments back (issue 7, docs/design.md#memory-tasks).

Associative recall: segment 0 writes P key–value pairs (`k1 v1 k2 v2 ...`, padded with filler), then D segments of
random filler follow, then a query segment ends with `QUERY key`; the target is that key's value, the first token of
the next segment. The pairs are D+1 segments before the query, so only a model that carries information across
segments can beat chance (1/values).

Models (same data, same steps, same tokens):
* Memformer trained with MRBP, window T=16 cells (gradient through the memory across the whole episode),
* Memformer with window T=1 (no gradient through memory: truncation),
* Memformer without memory (memory reset at every segment, in training and evaluation),
* a Mistral-style sliding-window transformer of similar size (window = 2 segments),
* Memformer with 1 / 4 / 32 slots (T=16), for accuracy vs slots.

One model per variant is trained on distances drawn uniformly from 1..D_max and evaluated at every distance.

    python benchmarks/memory_tasks.py                      # GPU, a few minutes; writes results/memory_tasks.md
    python benchmarks/memory_tasks.py --device cpu --steps 30 --distances 1,2 --output /tmp/mt.md   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import transformers
from common import run_variants_in_parallel, write_results

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.data_streams import document_cells
from memformer_hf.mrbp import cells_backward

PAD, BOS, QUERY = 0, 1, 2
N_SPECIAL = 3


class RecallTask:
    """Token layout: specials | keys | values | filler."""

    def __init__(self, segment_length: int, pairs: int, n_keys: int = 32, n_values: int = 32, n_filler: int = 64):
        self.L, self.P = segment_length, pairs
        self.keys = torch.arange(N_SPECIAL, N_SPECIAL + n_keys)
        self.values = torch.arange(N_SPECIAL + n_keys, N_SPECIAL + n_keys + n_values)
        self.filler_lo = N_SPECIAL + n_keys + n_values
        self.vocab = self.filler_lo + n_filler
        self.n_values = n_values
        if 2 * pairs > segment_length:
            raise ValueError("pairs must fit in one segment")

    def sample(self, batch: int, distance: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Documents [batch, (distance + 3) · L] (no BOS) and the answer values [batch].

        Segment 0 holds the pairs, segments 1..D filler, segment D+1 ends with `QUERY key`, and the answer is the
        first token of segment D+2 (so the encoder that sees the key also reads the memory)."""
        L = self.L
        docs = torch.randint(self.filler_lo, self.vocab, (batch, (distance + 3) * L), generator=gen)
        keys = torch.stack([self.keys[torch.randperm(len(self.keys), generator=gen)[: self.P]] for _ in range(batch)])
        vals = self.values[torch.randint(0, len(self.values), (batch, self.P), generator=gen)]
        docs[:, 0: 2 * self.P: 2] = keys
        docs[:, 1: 2 * self.P: 2] = vals
        which = torch.randint(0, self.P, (batch,), generator=gen)
        q = (distance + 2) * L
        docs[:, q - 2] = QUERY
        docs[:, q - 1] = keys[torch.arange(batch), which]
        answer = vals[torch.arange(batch), which]
        docs[:, q] = answer
        return docs, answer


def memformer_cells(docs: torch.Tensor, L: int) -> dict[str, torch.Tensor]:
    """Cells of equal-length documents with the loss only on the answer (first token of the last segment)."""
    per_doc = [document_cells(d.tolist(), L, BOS, PAD) for d in docs]
    cells = {k: torch.stack([c[k] for c in per_doc]) for k in per_doc[0]}  # [B, n_cells, L]
    labels = torch.full_like(cells["shift_labels"], -100)
    labels[:, -1, 0] = cells["shift_labels"][:, -1, 0]
    B, T, _ = labels.shape
    cells["shift_labels"] = labels.reshape(B, T * L)
    return cells


def window(cells: dict[str, torch.Tensor], start: int, size: int) -> dict[str, torch.Tensor]:
    L = cells["encoder_input_ids"].shape[-1]
    out = {k: v[:, start: start + size] for k, v in cells.items() if k != "shift_labels"}
    out["shift_labels"] = cells["shift_labels"][:, start * L: (start + size) * L].contiguous()
    return out


def train_memformer(args, task: RecallTask, slots: int, mrbp_window: int, no_memory: bool, gen) -> dict[int, float]:
    cfg = MemformerConfig(vocab_size=task.vocab, hidden_size=args.hidden, encoder_layers=2, decoder_layers=2,
                          num_attention_heads=4, intermediate_size=4 * args.hidden, segment_length=task.L,
                          num_memory_slots=slots, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD,
                          normalize_memory_kv=bool(args.normalize_memory_kv),
                          memory_write_temperature=args.temperature, forget_bias_init_scale=args.forget_scale,
                          decoder_reads_memory=bool(args.decoder_reads_memory),
                          **({} if args.self_bias == "default" else
                             {"memory_write_self_bias": None if args.self_bias == "none" else float(args.self_bias)}))
    model = MemformerForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.device == "cuda" else None
    distances = args.distance_list
    for step in range(args.steps):
        choices = distances
        if args.curriculum:  # grow the largest allowed distance linearly over the first `curriculum` steps
            reach = min(distances) + (max(distances) - min(distances)) * min(1.0, step / args.curriculum)
            choices = [x for x in distances if x <= reach]
        d = choices[torch.randint(0, len(choices), (1,), generator=gen).item()] if args.mixed else max(choices)
        docs, _ = task.sample(args.batch, d, gen)
        cells = {k: v.to(args.device) for k, v in memformer_cells(docs, task.L).items()}
        if no_memory:
            cells["memory_reset"] = torch.ones_like(cells["memory_reset"])
        n_cells = cells["encoder_input_ids"].shape[1]
        memory, loss = None, 0.0
        n_items = (cells["shift_labels"] != -100).sum()
        for start in range(0, n_cells, mrbp_window):
            part, memory = cells_backward(model, window(cells, start, mrbp_window), memory,
                                          num_items_in_batch=n_items, context=autocast)
            loss = loss + part
        if step % 100 == 0 or step == args.steps - 1:
            print(json.dumps({"step": step, "distance": d, "loss": round(float(loss), 4)}), flush=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return evaluate_memformer(args, model, task, no_memory, gen)


@torch.no_grad()
def evaluate_memformer(args, model, task, no_memory, gen) -> dict[int, float]:
    model.eval()
    acc = {}
    for d in args.eval_distances:
        docs, answer = task.sample(args.eval_batch, d, gen)
        cells = {k: v.to(args.device) for k, v in memformer_cells(docs, task.L).items()}
        if no_memory:
            cells["memory_reset"] = torch.ones_like(cells["memory_reset"])
        memory = None
        n_cells = cells["encoder_input_ids"].shape[1]
        for t in range(n_cells):
            cell = window(cells, t, 1)
            out = model(encoder_input_ids=cell["encoder_input_ids"][:, 0],
                        encoder_attention_mask=cell["encoder_attention_mask"][:, 0],
                        decoder_input_ids=cell["decoder_input_ids"][:, 0],
                        decoder_attention_mask=cell["decoder_attention_mask"][:, 0],
                        memory_reset=cell["memory_reset"][:, 0], memory=memory)
            memory = out.memory
        pred = out.logits[:, 0].argmax(-1).cpu()
        acc[d] = float((pred == answer).float().mean())
    return acc


def train_sliding(args, task: RecallTask, gen) -> dict[int, float]:
    """A Mistral-style sliding-window decoder of similar size, window = 2 segments, trained on the same episodes."""
    cfg = transformers.MistralConfig(vocab_size=task.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                     sliding_window=2 * task.L, max_position_embeddings=4096, bos_token_id=BOS,
                                     eos_token_id=BOS, pad_token_id=PAD, tie_word_embeddings=True)
    model = transformers.MistralForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    for _ in range(args.steps):
        d = args.distance_list[torch.randint(0, len(args.distance_list), (1,), generator=gen).item()] \
            if args.mixed else max(args.distance_list)
        docs, answer = task.sample(args.batch, d, gen)
        # [BOS] + docs up to and including the answer (docs[(d + 2) L]): the last input is the key
        ids = torch.cat([torch.full((args.batch, 1), BOS), docs], 1)[:, : (d + 2) * task.L + 2].to(args.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
            logits = model(ids[:, :-1]).logits[:, -1]
        loss = F.cross_entropy(logits.float(), ids[:, -1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    acc = {}
    with torch.no_grad():
        for d in args.eval_distances:
            docs, answer = task.sample(args.eval_batch, d, gen)
            ids = torch.cat([torch.full((args.eval_batch, 1), BOS), docs], 1)[:, : (d + 2) * task.L + 2]
            assert torch.equal(ids[:, -1], answer)
            pred = model(ids[:, :-1].to(args.device)).logits[:, -1].argmax(-1).cpu()
            acc[d] = float((pred == answer).float().mean())
    return acc


def plot_accuracy(curves: dict[str, dict[int, float]], chance: float, path: str) -> None:
    """Accuracy vs distance in segments, one line per model, with the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, acc in curves.items():
        ds = sorted(acc)
        ax.plot(ds, [100 * acc[d] for d in ds], marker="o", label=name)
    ax.axhline(100 * chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("filler segments between the pair and the query (D)")
    ax.set_ylabel("recall accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--segment_length", type=int, default=16)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--distances", default="1,2,4,8,12,16", help="training distances (segments of filler)")
    p.add_argument("--eval_distances", default=None, help="default: the training distances")
    p.add_argument("--mixed", type=int, default=1, help="sample a training distance per batch (else the max)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--normalize_memory_kv", type=int, default=1, help="LayerNorm the memory before the reader")
    p.add_argument("--curriculum", type=int, default=0, help="steps over which the training distance grows (0: off)")
    p.add_argument("--temperature", type=float, default=0.5, help="memory_write_temperature")
    p.add_argument("--self_bias", default="default", help="memory_write_self_bias: a number, 'none' or 'default'")
    p.add_argument("--forget_scale", type=float, default=1.0, help="forget_bias_init_scale")
    p.add_argument("--decoder_reads_memory", type=int, default=0, help="1: the decoder also cross-attends to the memory")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval_batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", default="mrbp16,mrbp1,nomem,sliding,slots1,slots4,slots32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None)
    p.add_argument("--parallel", type=int, default=int(torch.cuda.is_available()),
                   help="train the variants in parallel processes (default on a GPU)")
    p.add_argument("--row_json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default="/tmp/memory_tasks", help="logs of the parallel variants")
    args = p.parse_args()
    args.distance_list = [int(x) for x in args.distances.split(",")]
    args.eval_distances = [int(x) for x in (args.eval_distances or args.distances).split(",")]
    torch.manual_seed(args.seed)
    task = RecallTask(args.segment_length, args.pairs)
    names = {"mrbp16": f"Memformer K={args.slots}, MRBP T=16", "mrbp1": f"Memformer K={args.slots}, T=1 (truncated)",
             "nomem": f"Memformer K={args.slots}, memory reset every segment", "sliding":
             f"Mistral sliding window {2 * args.segment_length} tokens (4 layers)", "slots1": "Memformer K=1, T=16",
             "slots4": "Memformer K=4, T=16", "slots32": "Memformer K=32, T=16"}
    variants = args.variants.split(",")
    results = {}
    if args.parallel and len(variants) > 1:
        rows = run_variants_in_parallel(variants, args.work)  # JSON keys are strings: distances back to int
        results = {v: dict(acc={int(d): a for d, a in r["acc"].items()}, seconds=r["seconds"]) for v, r in rows.items()}
    else:
        for v in variants:
            gen = torch.Generator().manual_seed(args.seed)
            t0 = time.time()
            if v == "sliding":
                acc = train_sliding(args, task, gen)
            else:
                slots = {"slots1": 1, "slots4": 4, "slots32": 32}.get(v, args.slots)
                acc = train_memformer(args, task, slots, 1 if v == "mrbp1" else 16, v == "nomem", gen)
            results[v] = dict(acc=acc, seconds=time.time() - t0)
            print(json.dumps({"variant": v, **results[v]}), flush=True)
            if args.row_json:
                with open(args.row_json, "w") as f:
                    json.dump(results[v], f)
                return
    chance = 1.0 / task.n_values
    lines = [f"Associative recall: {args.pairs} key–value pairs in segment 0, D filler segments, then the query; "
             f"segment length {args.segment_length}, answer chance {chance:.1%}. d={args.hidden}, 2+2 layers "
             f"(Mistral: 4 layers), {args.steps} steps × batch {args.batch}, training distances "
             f"{args.distance_list} ({'mixed' if args.mixed else 'max'}), bf16 autocast, seed {args.seed}; accuracy "
             f"on {args.eval_batch} fresh episodes per distance.", "",
             "| model | " + " | ".join(f"D={d}" for d in args.eval_distances) + " | train s |",
             "|---|" + "---:|" * (len(args.eval_distances) + 1)]
    for v, r in results.items():
        lines.append(f"| {names[v]} | " + " | ".join(f"{r['acc'][d]:.1%}" for d in args.eval_distances)
                     + f" | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    path = write_results("memory_tasks", "Memory tasks: associative recall across segments", table, args.output)
    plot_accuracy({names[v]: r["acc"] for v, r in results.items()}, chance, path.replace(".md", ".png"))
    if not math.isfinite(chance):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
