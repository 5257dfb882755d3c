"""MRBP (docs/design.md#mrbp): memory replay back-propagation must leave exactly the gradient of full BPTT over the
window.

Everything runs on tiny, sharp float64 models (docs/design.md#testing), where "equal" means a per-tensor error
``max|Δ| <= RTOL * max(max|g_ref|, FLOOR)``. The absolute floor matters: attention key-projection biases receive
~1e-17 gradients (softmax is shift-invariant, so their true gradient is 0) and a purely relative metric explodes
there.

Covered:
* `cells_backward`: mrbp == bptt == an independent hand-written BPTT loop (dropout with replayed seeds, padding,
  inactive cells, resets at the first / a middle / the last cell, carried memory, "bos" and "empty" boots,
  T ∈ {1, 2, 5}); loss weightings; truncated mode; fp16-style loss scaling and non-finite memory gradients;
  gradient accumulation; 2-rank DDP (gloo) == single process.
* `memory_replay_backward` (stream API) == `model(ids, labels=ids).loss.backward()`, fresh and continuing from a
  cache (which must stay untouched), with `memory_reset`; the returned cache equals a plain forward's.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import BOS, CELL_KEYS, PAD, L, build_tiny_memformer, cache_tensors, gloo_group, left_pad, spawn_workers
from helpers import TINY_MEMFORMER as TINY

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.data_streams import StreamBatches, document_cells
from memformer_hf.modeling_memformer import CACHE_KWARG
from memformer_hf.mrbp import cells_backward, memory_replay_backward

RTOL = 1e-6
FLOOR = 1e-8


# ============================================================================================== helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead (and oversubscribe a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_model(seed: int = 0, dropout: float = 0.0, boot: str = "bos", attn: str = "sdpa",
                **overrides) -> MemformerForCausalLM:
    """A tiny sharp float64 model; biases and LayerNorm affines randomised (their init 0 / 1 would hide bugs).

    Train mode when dropout > 0, eval mode otherwise. SDPA attention: the eager path is not float64-exact (see
    test_eager_float64_fully_masked_rows_stay_finite)."""
    return build_tiny_memformer(seed, attn=attn, train=dropout > 0, attention_dropout=dropout, hidden_dropout=dropout,
                                first_segment_context=boot, **overrides)


def rand_doc(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(3, TINY["vocab_size"], (n,), generator=gen).tolist()


def inactive_cells(n: int, boot: str) -> dict[str, torch.Tensor]:
    """Padding cells at the end of a stream (docs/design.md#inactive-cells): reset, all-pad encoder input, no
    targets."""
    return {
        "encoder_input_ids": torch.full((n, L), PAD), "encoder_attention_mask": torch.zeros(n, L, dtype=torch.bool),
        "decoder_input_ids": torch.full((n, L), PAD), "decoder_attention_mask": torch.zeros(n, L, dtype=torch.bool),
        "shift_labels": torch.full((n, L), -100), "memory_reset": torch.ones(n, dtype=torch.bool),
    }


def stream_window(rows: list[tuple[list[int], int]], T: int, boot: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A [B, T, L] window batch (the `StreamBatches` layout) from explicit streams.

    rows: per row, (document lengths, first cell of the window). Each stream is its documents' cells
    (`document_cells`) followed by inactive cells; the window is cells [start, start + T)."""
    gen = torch.Generator().manual_seed(seed)
    per_row = []
    for lengths, start in rows:
        parts = [document_cells(rand_doc(n, gen), L, BOS, PAD, boot) for n in lengths]
        n_cells = sum(p["memory_reset"].shape[0] for p in parts)
        parts.append(inactive_cells(max(start + T - n_cells, 0), boot))
        row = {k: torch.cat([p[k].to(parts[0][k].dtype) for p in parts])[start:start + T] for k in parts[0]}
        per_row.append(row)
    cells = {k: torch.stack([r[k] for r in per_row]) for k in per_row[0]}
    cells["shift_labels"] = cells["shift_labels"].reshape(len(rows), T * L).contiguous()
    cells["memory_reset"] = cells["memory_reset"].bool()
    for k in ("encoder_attention_mask", "decoder_attention_mask"):
        cells[k] = cells[k].bool()
    return cells


def carry_memory(model, batch: int, seed: int = 7) -> torch.Tensor:
    """A random carried memory (unit-norm slots, like BMN output) in the model's memory dtype."""
    cfg = model.config
    m = torch.randn(batch, cfg.num_memory_slots, cfg.hidden_size, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    return m / m.norm(dim=-1, keepdim=True)


# Windows for T ∈ {1, 2, 5}: per row (document lengths, window start). Together they put resets at the first cell,
# in the middle and at the last cell, carried (non-reset) first cells, short last segments and inactive cells.
LAYOUTS = {
    1: [([4], 0), ([9], 2), ([2], 1)],  # reset | continuation with a short segment | inactive
    2: [([3, 6], 0), ([12], 1), ([2], 0)],  # reset at first and last | continuation | active then inactive
    5: [([10, 7], 0),  # resets at cells 0 and 3 (middle); the second document ends on a short segment
        ([8, 8, 3, 9], 1),  # carried first cell, resets at cells 1, 3 (one-cell doc) and 4 (last)
        ([5], 0)],  # 2 active cells, then 3 inactive
}


def grads(model) -> dict[str, torch.Tensor]:
    """Parameter name → gradient (zeros where None), cloned."""
    m = model.module if hasattr(model, "module") else model
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in m.named_parameters()}


def max_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Worst per-tensor max|Δ| / max(max|g_ref|, FLOOR) over all parameters."""
    assert got.keys() == ref.keys()
    worst = 0.0
    for n in ref:
        assert torch.isfinite(got[n]).all(), f"non-finite gradient in {n}"
        scale = max(float(ref[n].abs().max()), FLOOR)
        worst = max(worst, float((got[n] - ref[n]).abs().max()) / scale)
    return worst


def significant_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Like `max_error`, over the tensors whose reference gradient is not (mathematically) zero: max|g_ref| above
    1e-9 of the largest. For reporting: near the floor the ratio only measures float64 round-off of zeros."""
    top = max(float(g.abs().max()) for g in ref.values())
    keep = [n for n in ref if float(ref[n].abs().max()) > 1e-9 * top]
    return max_error({n: got[n] for n in keep}, {n: ref[n] for n in keep})


def assert_grads_close(got, ref, rtol: float = RTOL, what: str = "") -> float:
    err = max_error(got, ref)
    bad = {n: float((got[n] - ref[n]).abs().max()) for n in ref
           if float((got[n] - ref[n]).abs().max()) > rtol * max(float(ref[n].abs().max()), FLOOR)}
    assert not bad, f"{what}: gradients differ (max rel error {err:.3g}) in {sorted(bad)[:6]}"
    nonzero = sum(1 for g in ref.values() if float(g.abs().max()) > FLOOR)
    assert nonzero > len(ref) // 2, f"{what}: reference gradient is mostly zero ({nonzero}/{len(ref)} tensors)"
    sig = significant_error(got, ref)
    print(f"[{what}] max error {err:.3g} (with floor {FLOOR:g}); {sig:.3g} over non-zero tensors")
    return err


def run_cells(model, cells, memory, **kwargs):
    model.zero_grad(set_to_none=True)
    loss, mem = cells_backward(model, cells, memory, **kwargs)
    return loss, mem, grads(model)


@contextlib.contextmanager
def seeded(seed: int | None):
    """Written here on purpose (not imported): what docs/design.md#rng-replay asks of the RNG replay, on CPU."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def reference_bptt(model, cells, memory, seeds=None, weighting="token_mean", num_items=None):
    """Independent BPTT: call the model cell by cell with grad through the carried memory, compute the loss from the
    logits here, one backward. Returns (loss, final memory, grads, per-cell mean losses)."""
    B, T = cells["encoder_input_ids"].shape[:2]
    labels = cells["shift_labels"].view(B, T, L)
    n_total = int((labels != -100).sum()) if num_items is None else num_items
    model.zero_grad(set_to_none=True)
    mem, total, cell_means = memory, 0.0, []
    for t in range(T):
        with seeded(None if seeds is None else seeds[t]):
            out = model(**{k: cells[k][:, t] for k in CELL_KEYS}, memory=mem, memory_reset=cells["memory_reset"][:, t])
        tgt = labels[:, t]
        nll = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                              reduction="sum")
        n_t = int((tgt != -100).sum())
        cell_mean = nll / max(n_t, 1)
        cell_means.append(float(cell_mean.detach()))
        if weighting == "token_mean":
            total = total + nll / n_total
        elif weighting == "exponential":
            total = total + cell_mean * 2.0 ** (t + 1) / sum(2.0 ** j for j in range(1, T + 1))
        else:
            total = total + cell_mean
        mem = out.memory
    total.backward()
    return total.detach(), mem.detach(), grads(model), cell_means


# ============================================================================================== cells_backward
@pytest.mark.parametrize("boot", ["bos", "empty"])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_mrbp_equals_bptt_with_dropout_resets_padding(T, boot):
    model = build_model(seed=T, dropout=0.2, boot=boot)
    cells = stream_window(LAYOUTS[T], T, boot, seed=T)
    B = cells["encoder_input_ids"].shape[0]
    assert B >= 2
    memory = carry_memory(model, B)
    seeds = [1000 + 17 * t for t in range(T)]
    loss_b, mem_b, g_b = run_cells(model, cells, memory, mode="bptt", seeds=seeds)
    loss_m, mem_m, g_m = run_cells(model, cells, memory, mode="mrbp", seeds=seeds)
    assert_grads_close(g_m, g_b, what=f"mrbp vs bptt T={T} {boot}")
    torch.testing.assert_close(loss_m, loss_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(mem_m, mem_b, rtol=1e-12, atol=1e-14)
    # the same seeds really replay: different seeds give a different loss (dropout is on)
    loss_x, _, _ = run_cells(model, cells, memory, mode="mrbp", seeds=[s + 1 for s in seeds])
    assert abs(float(loss_x) - float(loss_b)) > 1e-8


@pytest.mark.parametrize("boot", ["bos", "empty"])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_mrbp_equals_independent_bptt_loop(T, boot):
    model = build_model(seed=10 + T, dropout=0.15, boot=boot)
    cells = stream_window(LAYOUTS[T], T, boot, seed=20 + T)
    memory = carry_memory(model, cells["encoder_input_ids"].shape[0])
    seeds = [4242 + t for t in range(T)]
    loss_r, mem_r, g_r, _ = reference_bptt(model, cells, memory, seeds=seeds)
    loss_m, mem_m, g_m = run_cells(model, cells, memory, mode="mrbp", seeds=seeds)
    assert_grads_close(g_m, g_r, what=f"mrbp vs independent loop T={T} {boot}")
    torch.testing.assert_close(loss_m, loss_r, rtol=1e-12, atol=0)
    torch.testing.assert_close(mem_m, mem_r, rtol=1e-12, atol=1e-14)


def test_memory_gradient_flows_through_window():
    """Sanity of the property itself: without gradient through memory (truncated) the gradients differ."""
    model = build_model(seed=3)
    cells = stream_window(LAYOUTS[5], 5, "bos", seed=3)
    memory = carry_memory(model, 3)
    _, _, g_m = run_cells(model, cells, memory, mode="mrbp")
    _, _, g_t = run_cells(model, cells, memory, mode="truncated")
    assert max_error(g_t, g_m) > 1e-3


def test_stream_batches_window_mrbp_equals_bptt():
    """A window straight out of `StreamBatches` (second window, carried memory from the first)."""
    gen = torch.Generator().manual_seed(5)
    docs = [rand_doc(n, gen) for n in (13, 5, 22, 9, 3, 17, 8)]
    ds = StreamBatches(docs, segment_length=L, window=3, batch_size=2, bos_token_id=BOS, pad_token_id=PAD, seed=1)
    model = build_model(seed=5, dropout=0.1)
    seeds = [[11, 12, 13], [21, 22, 23]]
    mem = None
    for w in range(min(len(ds), 2)):
        cells = {k: v for k, v in ds[w].items() if k not in ("stream_ids", "window_index")}
        _, mem_b, g_b = run_cells(model, cells, mem, mode="bptt", seeds=seeds[w])
        _, mem_m, g_m = run_cells(model, cells, mem, mode="mrbp", seeds=seeds[w])
        assert_grads_close(g_m, g_b, what=f"StreamBatches window {w}")
        torch.testing.assert_close(mem_m, mem_b, rtol=1e-12, atol=1e-14)
        mem = mem_m


# ============================================================================================== loss weighting
@pytest.mark.parametrize("weighting", ["exponential", "per_cell_mean"])
def test_loss_weighting(weighting):
    T = 5
    model = build_model(seed=30, dropout=0.1)
    cells = stream_window(LAYOUTS[T], T, "bos", seed=30)
    memory = carry_memory(model, 3)
    seeds = list(range(50, 50 + T))
    loss_r, _, g_r, means = reference_bptt(model, cells, memory, seeds=seeds, weighting=weighting)
    if weighting == "exponential":
        w = [2.0 ** (t + 1) / sum(2.0 ** j for j in range(1, T + 1)) for t in range(T)]
    else:
        w = [1.0] * T
    hand = sum(wt * m for wt, m in zip(w, means))
    loss_m, _, g_m = run_cells(model, cells, memory, mode="mrbp", loss_weighting=weighting, seeds=seeds)
    loss_b, _, g_b = run_cells(model, cells, memory, mode="bptt", loss_weighting=weighting, seeds=seeds)
    assert float(loss_m) == pytest.approx(hand, rel=1e-12)
    assert float(loss_b) == pytest.approx(hand, rel=1e-12)
    assert float(loss_r) == pytest.approx(hand, rel=1e-12)
    assert_grads_close(g_m, g_b, what=f"{weighting}: mrbp vs bptt")
    assert_grads_close(g_m, g_r, what=f"{weighting}: mrbp vs independent loop")


def test_unknown_mode_and_weighting_raise():
    model = build_model()
    cells = stream_window(LAYOUTS[1], 1, "bos")
    with pytest.raises(ValueError, match="mode"):
        cells_backward(model, cells, None, mode="nope")
    with pytest.raises(ValueError, match="weighting"):
        cells_backward(model, cells, None, loss_weighting="nope")


def test_carried_memory_beyond_the_bound_is_refused():
    """`cells_backward` checks the carried memory once per window (the cells skip their own checks): a finite memory
    of 1e160 (float64 model) ran through and gave a NaN loss and NaN gradients. It is refused naming the bound, as
    the model's `memory=` is; a memory at the bound gives a finite loss."""
    model = build_model()
    cells = stream_window(LAYOUTS[2], 2, "bos")
    limit = (torch.finfo(torch.float64).max / TINY["hidden_size"]) ** 0.5 / 2
    largest = torch.full((3, TINY["num_memory_slots"], TINY["hidden_size"]), limit, dtype=torch.float64)
    largest[..., ::2] *= -1
    loss, memory = cells_backward(model, cells, largest)
    assert math.isfinite(float(loss)) and torch.isfinite(memory).all()
    for bad in (largest * 1.01, torch.full_like(largest, 1e160)):
        with pytest.raises(ValueError, match=re.escape(f"carried memory holds values beyond ±{limit:.3g}: ") + ".*float64"):
            cells_backward(model, cells, bad)


# ============================================================================================== truncated mode
def test_truncated_mode():
    T = 5
    model = build_model(seed=40, dropout=0.1)
    cells = stream_window(LAYOUTS[T], T, "bos", seed=40)
    memory = carry_memory(model, 3)
    seeds = list(range(90, 90 + T))
    N = int((cells["shift_labels"] != -100).sum())
    loss_t, mem_t, g_t = run_cells(model, cells, memory, mode="truncated", seeds=seeds)

    # the writer's projections only shape memory that no loss in the window sees
    for name, g in g_t.items():
        if name.startswith("model.writer.") and "proj" in name:
            assert float(g.abs().max()) == 0.0, name

    # == independent per-cell backward calls, each from the (detached) memory of the previous cell
    model.zero_grad(set_to_none=True)
    mem, total = memory, 0.0
    for t in range(T):
        with seeded(seeds[t]):
            out = model(**{k: cells[k][:, t] for k in CELL_KEYS}, memory=mem.detach(),
                        memory_reset=cells["memory_reset"][:, t],
                        shift_labels=cells["shift_labels"][:, t * L:(t + 1) * L].contiguous(), num_items_in_batch=N)
        out.loss.backward()
        total += float(out.loss.detach())
        mem = out.memory
    assert_grads_close(g_t, grads(model), what="truncated vs per-cell backward")
    assert float(loss_t) == pytest.approx(total, rel=1e-12)
    torch.testing.assert_close(mem_t, mem.detach(), rtol=1e-12, atol=1e-14)


# ============================================================================================== fp16-style scaling
def test_grad_scale_unscales_memory_gradient():
    S = 1024.0  # a power of two, as GradScaler uses: scaling is exact
    T = 4
    model = build_model(seed=50)
    cells = stream_window(LAYOUTS[5], 5, "bos", seed=50)
    cells = {k: (v[:, :T] if k != "shift_labels" else v[:, :T * L].contiguous()) for k, v in cells.items()}
    memory = carry_memory(model, 3)
    loss_1, mem_1, g_1 = run_cells(model, cells, memory)
    loss_s, mem_s, g_s = run_cells(model, cells, memory, backward=lambda t: (t * S).backward(), grad_scale=lambda: S)
    assert_grads_close({n: g / S for n, g in g_s.items()}, g_1, rtol=1e-12, what="scaled / S vs unscaled")
    torch.testing.assert_close(loss_s, loss_1, rtol=1e-12, atol=0)  # the reported loss is unscaled
    torch.testing.assert_close(mem_s, mem_1, rtol=0, atol=0)
    # without unscaling, the memory gradient would be injected S times too large: a visible difference
    _, _, g_bad = run_cells(model, cells, memory, backward=lambda t: (t * S).backward())
    assert max_error({n: g / S for n, g in g_bad.items()}, g_1) > 1e-3


class _PoisonMemoryGrad(torch.nn.Module):
    """Wraps a model (like DDP: `.module`); makes the gradient reaching the `k`-th grad-requiring `memory` input
    non-finite, as an fp16 overflow would."""

    def __init__(self, model, k: int):
        super().__init__()
        self.module, self.k, self.calls = model, k, 0

    def forward(self, **kwargs):
        mem = kwargs.get("memory")
        if mem is not None and mem.requires_grad:
            self.calls += 1
            if self.calls == self.k:
                mem.register_hook(lambda g: torch.full_like(g, float("inf")))
        return self.module(**kwargs)


def test_nonfinite_memory_gradient_is_zeroed_not_propagated():
    T, bad_cell = 4, 2
    model = build_model(seed=60)
    cells = stream_window(LAYOUTS[5], 5, "bos", seed=60)
    cells = {k: (v[:, :T] if k != "shift_labels" else v[:, :T * L].contiguous()) for k, v in cells.items()}
    memory = carry_memory(model, 3)
    N = int((cells["shift_labels"] != -100).sum())

    calls = []
    wrapper = _PoisonMemoryGrad(model, k=T - bad_cell)  # phase 2 runs t = T-1 .. 1 with grad-requiring memory
    model.zero_grad(set_to_none=True)
    loss, _ = cells_backward(wrapper, cells, memory, backward=lambda t: (calls.append(float(t.detach())), t.backward()),
                             grad_scale=lambda: 1.0)
    got = grads(model)
    assert len(calls) == T, "every backward must still run (skipping one deadlocks DDP)"
    assert all(torch.isfinite(torch.tensor(calls))), "a non-finite memory gradient was injected into an objective"

    # expected: the gradient into M_bad is dropped, i.e. two independent BPTT windows [0, bad) and [bad, T)
    def part(lo, hi):
        return {k: (v[:, lo:hi] if k != "shift_labels" else v[:, lo * L:hi * L].contiguous()) for k, v in cells.items()}

    model.zero_grad(set_to_none=True)
    _, mem_mid = cells_backward(model, part(0, bad_cell), memory, mode="bptt", num_items_in_batch=N)
    cells_backward(model, part(bad_cell, T), mem_mid, mode="bptt", num_items_in_batch=N)
    assert_grads_close(got, grads(model), what="poisoned memory grad == split window")


# ============================================================================================== GA and DDP
def _docs(seed: int, lengths) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [rand_doc(n, gen) for n in lengths]


DOC_LENGTHS = (13, 5, 22, 9, 3, 17, 8, 11, 6, 14)


def _cells_of(batch):
    return {k: v for k, v in batch.items() if k not in ("stream_ids", "window_index")}


def test_gradient_accumulation_equals_full_batch():
    docs = _docs(70, DOC_LENGTHS)
    common = dict(segment_length=L, window=3, bos_token_id=BOS, pad_token_id=PAD, seed=3)
    full = StreamBatches(docs, batch_size=4, grad_accum=1, **common)
    halves = StreamBatches(docs, batch_size=2, grad_accum=2, **common)
    model = build_model(seed=70)
    memory = carry_memory(model, 4)
    b_full = _cells_of(full[0])
    N = int((b_full["shift_labels"] != -100).sum())
    _, mem_full, g_full = run_cells(model, b_full, memory, mode="bptt")

    model.zero_grad(set_to_none=True)
    mems = []
    for k in range(2):
        b = _cells_of(halves[k])
        assert torch.equal(b["encoder_input_ids"], b_full["encoder_input_ids"][2 * k:2 * k + 2])
        _, m = cells_backward(model, b, memory[2 * k:2 * k + 2], num_items_in_batch=N)
        mems.append(m)
    assert_grads_close(grads(model), g_full, what="GA 2 x half == full batch")
    torch.testing.assert_close(torch.cat(mems), mem_full, rtol=1e-12, atol=1e-14)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    with gloo_group(rank, world, port):
        docs = _docs(80, DOC_LENGTHS)
        common = dict(segment_length=L, window=3, batch_size=2, bos_token_id=BOS, pad_token_id=PAD, seed=4)
        local = _cells_of(StreamBatches(docs, world_size=world, rank=rank, **common)[0])
        model = build_model(seed=80)
        memory = carry_memory(model, 2 * world)[2 * rank:2 * rank + 2]
        ddp = DDP(model)
        current, reduced_in = [0], []  # which backward call triggered each bucket all-reduce

        def hook(state, bucket):
            reduced_in.append(current[0])
            buf = bucket.buffer().div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)

        def backward(t):
            t.backward()
            current[0] += 1

        n_items = (local["shift_labels"] != -100).sum()
        dist.all_reduce(n_items)
        loss, mem = cells_backward(ddp, local, memory, no_sync=ddp.no_sync, loss_scale=world,
                                   num_items_in_batch=n_items, backward=backward)
        torch.save({"grads": grads(model), "memory": mem, "loss": loss, "reduced_in": reduced_in,
                    "n_backward": current[0]}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_ranks_equal_single_process_full_batch():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        spawn_workers(_ddp_worker, world, tmp, timeout=120)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]

    docs = _docs(80, DOC_LENGTHS)
    full = _cells_of(StreamBatches(docs, segment_length=L, window=3, batch_size=2 * world, bos_token_id=BOS,
                                   pad_token_id=PAD, seed=4)[0])
    model = build_model(seed=80)
    loss_ref, mem_ref, g_ref = run_cells(model, full, carry_memory(model, 2 * world), mode="bptt")
    for r in range(world):
        assert_grads_close(res[r]["grads"], g_ref, what=f"DDP rank {r} vs single process")
        # gradients are synchronised once, in the last backward (t = 0); the others run under no_sync
        assert res[r]["n_backward"] == 3 and res[r]["reduced_in"] and set(res[r]["reduced_in"]) == {2}
    torch.testing.assert_close(torch.cat([res[r]["memory"] for r in range(world)]), mem_ref, rtol=1e-12, atol=1e-14)
    # each rank reports its share of the global token mean
    assert float(sum(res[r]["loss"] for r in range(world))) == pytest.approx(float(loss_ref), rel=1e-12)


# ============================================================================================== stream API
def assert_cache_equal(got, ref):
    """Equal states: every tensor, except the decoder self-K/V past each row's `fill` (positions fill+1.. are not
    part of the state, docs/design.md#cache, and are never attended); those are checked functionally instead."""
    a, b = cache_tensors(got), cache_tensors(ref)
    assert a.keys() == b.keys()
    assert got.consumed == ref.consumed
    valid = (torch.arange(L)[None, :] <= b["fill"][:, None])[:, None, :, None]  # [B, 1, L, 1]
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        x, y = a[k], b[k]
        if k.endswith(".keys") or k.endswith(".values"):
            x, y = x * valid, y * valid
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13, msg=k)


def assert_same_continuation(model, got, ref):
    """Both caches continue identically (a further forward over 6 tokens, crossing a segment boundary)."""
    ids = torch.arange(5, 11).repeat(got.memory.shape[0], 1)
    with torch.no_grad():
        x = model(ids, **{CACHE_KWARG: copy.deepcopy(got)}).logits
        y = model(ids, **{CACHE_KWARG: copy.deepcopy(ref)}).logits
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def _stream_check(model, ids, am, past=None, memory_reset=None, what=""):
    """memory_replay_backward == model(...).loss.backward(); returned cache == plain forward's; `past` untouched."""
    snapshot = None if past is None else (cache_tensors(past), past.consumed)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, attention_mask=am, memory_reset=memory_reset,
                use_cache=True, **{CACHE_KWARG: copy.deepcopy(past)})
    out.loss.backward()
    g_ref = grads(model)
    ref_cache = out[CACHE_KWARG].detach_()

    model.zero_grad(set_to_none=True)
    loss, cache = memory_replay_backward(model, ids, attention_mask=am, memory_reset=memory_reset,
                                         past_key_values=past)
    assert_grads_close(grads(model), g_ref, what=what)
    # the returned loss is accumulated in float32 (see test_stream_api_loss_keeps_model_dtype)
    assert float(loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)
    assert_cache_equal(cache, ref_cache)
    assert_same_continuation(model, cache, ref_cache)
    if past is not None:
        tensors, consumed = snapshot
        now = cache_tensors(past)
        for k in tensors:
            assert torch.equal(now[k], tensors[k]), f"memory_replay_backward modified the passed cache ({k})"
        assert past.consumed == consumed
    return cache


@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_stream_api_equals_forward_backward(boot):
    gen = torch.Generator().manual_seed(90)
    model = build_model(seed=90, boot=boot)
    rows = [[BOS] + rand_doc(13, gen),  # explicit BOS boot, 14 tokens: 3 full segments + a partial one
            rand_doc(11, gen),  # implicit boot (no BOS), left-padded
            [BOS] + rand_doc(7, gen),  # explicit boot, shorter
            rand_doc(2, gen)]  # shorter than a segment: no encode step beyond the boot
    ids, am = left_pad(rows)
    _stream_check(model, ids, am, what=f"stream fresh {boot}")


def test_stream_api_single_short_call():
    model = build_model(seed=91)
    ids = torch.tensor([[BOS, 5, 6], [7, 8, 9]])
    _stream_check(model, ids, torch.ones_like(ids), what="stream short")


@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_stream_api_continues_from_cache_and_resets(boot):
    gen = torch.Generator().manual_seed(92)
    model = build_model(seed=92, boot=boot)
    prev_ids, prev_am = left_pad([[BOS] + rand_doc(6, gen), rand_doc(9, gen), rand_doc(4, gen)])
    with torch.no_grad():
        past = model(prev_ids, attention_mask=prev_am, use_cache=True)[CACHE_KWARG]
    assert sorted(set(past.fill.tolist())) != [0], "want partial segments in the cache"

    ids = torch.tensor([rand_doc(13, gen), rand_doc(13, gen), rand_doc(13, gen)])
    am = torch.ones_like(ids)
    cache = _stream_check(model, ids, am, past=past, what=f"stream continued {boot}")

    # a further call continuing from the returned cache, with row 1 restarting a document (explicit BOS boot)
    ids2 = torch.tensor([rand_doc(9, gen), [BOS] + rand_doc(8, gen), rand_doc(9, gen)])
    _stream_check(model, ids2, torch.ones_like(ids2), past=cache, memory_reset=torch.tensor([False, True, False]),
                  what=f"stream continued with reset {boot}")
    # and a reset on a fresh call (no cache): a no-op on the gradient, still equal
    _stream_check(model, ids2, torch.ones_like(ids2), memory_reset=torch.tensor([True, True, False]),
                  what=f"stream fresh with reset {boot}")


@pytest.mark.parametrize("horizon", [1, 2])
def test_stream_api_honours_bptt_horizon(horizon):
    """With `bptt_horizon` set, a training-mode `model(...).loss.backward()` detaches the memory every `horizon`
    encode steps, but memory_replay_backward back-propagated through all of them: its gradients differed from the
    forward's by up to 0.2 while it claims to leave the same `.grad`. Aligned rows (cells), padded rows (the general
    planner's replay) and a continuation from a cache now all equal the forward."""
    gen = torch.Generator().manual_seed(95)
    model = build_model(seed=95, bptt_horizon=horizon).train()  # dropout 0: train mode only switches the horizon on
    ids = torch.tensor([[BOS] + rand_doc(14, gen), [BOS] + rand_doc(14, gen)])
    _stream_check(model, ids, torch.ones_like(ids), what=f"horizon {horizon} aligned")
    ids, am = left_pad([[BOS] + rand_doc(14, gen), rand_doc(10, gen)])
    _stream_check(model, ids, am, what=f"horizon {horizon} padded")
    with torch.no_grad():
        past = model(torch.tensor([[BOS] + rand_doc(5, gen)] * 2), use_cache=True)[CACHE_KWARG]
    _stream_check(model, torch.tensor([rand_doc(13, gen), rand_doc(13, gen)]), None, past=past,
                  what=f"horizon {horizon} continued")


def test_stream_api_matches_cells_api():
    """The same document through both entry points (no dropout): identical gradients."""
    gen = torch.Generator().manual_seed(93)
    model = build_model(seed=93)
    docs = [rand_doc(14, gen), rand_doc(14, gen)]
    ids = torch.tensor([[BOS] + d for d in docs])
    model.zero_grad(set_to_none=True)
    memory_replay_backward(model, ids)
    g_stream = grads(model)
    parts = [document_cells(d, L, BOS, PAD, "bos") for d in docs]
    cells = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    cells["shift_labels"] = cells["shift_labels"].reshape(2, -1).contiguous()
    # the stream view also scores the first token after BOS... which is target 0 of cell 0: same targets
    assert int((cells["shift_labels"] != -100).sum()) == 2 * 14
    _, _, g_cells = run_cells(model, cells, None)
    assert_grads_close(g_stream, g_cells, what="stream API vs cells API")


def test_stream_api_refuses_dropout_in_training():
    model = build_model(dropout=0.1)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="dropout"):
        memory_replay_backward(model, ids)
    model.eval()  # inactive dropout: fine
    memory_replay_backward(model, ids)


def test_stream_api_loss_keeps_model_dtype():
    model = build_model(seed=94)
    ids = torch.tensor([[BOS] + list(range(5, 18))])
    loss, _ = memory_replay_backward(model, ids)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
    assert loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_eager_float64_fully_masked_rows_stay_finite():
    model = build_model(seed=95, attn="eager")
    out = model(encoder_input_ids=torch.full((1, L), PAD), encoder_attention_mask=torch.zeros(1, L, dtype=torch.bool),
                critical_path_only=True)  # an inactive cell (docs/design.md#inactive-cells)
    assert torch.isfinite(out.memory).all()


def test_memory_reader_keeps_float64():
    from memformer_hf.modeling_memformer import MemoryReader

    torch.manual_seed(0)
    reader = MemoryReader(MemformerConfig(**TINY)).double()
    for p in reader.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h, m = torch.randn(2, L, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        out, _ = reader(h, m)
        split = lambda x: x.view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = split(reader.q_proj(h)), split(reader.k_proj(m)), split(reader.v_proj(m))
        ref = reader.o_proj((torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v).transpose(1, 2).reshape(2, L, 16))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
