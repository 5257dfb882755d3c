"""Memory Replay Back-Propagation (MRBP, docs/design.md): exact back-propagation through time over a window of segments
while holding only one segment's graph plus one memory per step.

Phase 1 runs the critical path (encoder + writer) without a graph and stores the memory before every step. Phase 2
walks back from the last step: it recomputes step t from its stored memory, and one backward call covers the step's
own loss and the gradient arriving from step t+1 through the memory (`loss_t + <M_{t+1}, g>`), which yields the
gradient into M_t for the next (earlier) step.

Two entry points:

* `memory_replay_backward(model, input_ids, ...)`: the stream API. It leaves in `.grad` exactly what
  `model(input_ids, labels=labels, ...).loss.backward()` leaves (token-weighted mean), and returns the loss and the
  carried cache. RNG replay needs per-step seeding, which only the cell API provides: with dropout active in
  training mode use `cells_backward` (what `MemformerTrainer` runs).
* `cells_backward(model, cells, memory, ...)`: one window of T cells per row (the `data_streams` batch layout,
  docs/design.md), with per-cell resets, per-cell RNG replay, loss weighting, DDP / FSDP `no_sync` and fp16 loss scaling.
  `mode="bptt"` (one graph over the window) and `mode="truncated"` (T=1 truncation: no gradient through memory)
  run the same cells for comparison.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .modeling_memformer import CACHE_KWARG, shift_labels_from

Backward = Callable[[torch.Tensor], None]
LOSS_WEIGHTINGS = ("token_mean", "exponential", "per_cell_mean")
MODES = ("mrbp", "bptt", "truncated")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _dropout_active(model: torch.nn.Module) -> bool:
    cfg = _unwrap(model).config
    return model.training and (cfg.attention_dropout > 0 or cfg.hidden_dropout > 0)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with a fixed RNG seed on CPU and `device`, restoring the outer RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(seed)
        yield


def memory_replay_backward(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    memory_reset: torch.Tensor | None = None,
    past_key_values: Any = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    backward: Backward | None = None,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, Any]:
    """Accumulate into `.grad` the gradient of `model(input_ids, labels=labels, ...).loss` with one segment graph
    alive at a time.

    Args:
        model: a `MemformerForCausalLM` (possibly wrapped, e.g. by DDP).
        input_ids, labels, attention_mask, memory_reset, past_key_values: as for the model's forward; `labels`
            defaults to `input_ids`. `past_key_values` is read, never modified.
        num_items_in_batch: divide the summed NLL by this (default: the number of targets in this call).
        backward: how to back-propagate a scalar (default `Tensor.backward`; e.g. `accelerator.backward`).
        loss_scale: multiply every backward objective by this (e.g. a world-size factor).
    Returns:
        (loss, cache): the detached loss (as `model(...).loss` would report it) and the new carried cache.
    """
    if _dropout_active(model):
        raise ValueError("memory_replay_backward cannot replay dropout masks across a stream-mode forward; use "
                         "`cells_backward` (per-cell RNG replay, what MemformerTrainer runs) or set dropout to 0.")
    backward = backward or (lambda t: t.backward())
    labels = input_ids if labels is None else labels
    shift_labels = shift_labels_from(labels, attention_mask)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != -100).sum()
    common = dict(input_ids=input_ids, attention_mask=attention_mask, memory_reset=memory_reset)

    # phase 1: critical path only (plus the last decoder chunk per row, for the returned cache)
    with torch.no_grad():
        first = model(**common, past_key_values=copy.deepcopy(past_key_values), use_cache=True, logits_to_keep=1,
                      output_memory_states=True)
    memories = first.memory_states
    new_cache = first[CACHE_KWARG]

    # phase 2: replay each encode step from its stored memory, last first
    g = None
    total = None
    for k in reversed(range(max(len(memories) - 1, 1))):
        m_k = memories[k].detach().requires_grad_(k > 0)
        out = model(**common, past_key_values=past_key_values, use_cache=False, shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch, replay_step=k, replay_memory=m_k)
        objective = out.loss * loss_scale
        if g is not None:
            objective = objective + (out.memory * g).sum()
        backward(objective)
        total = out.loss.detach() if total is None else total + out.loss.detach()
        if k > 0:
            g = m_k.grad
    return total, new_cache


def cell_batch(cells: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """The model inputs of cell t of a window batch ([B, T, L] tensors, `shift_labels` [B, T·L])."""
    L = cells["encoder_input_ids"].shape[-1]
    out = {
        "encoder_input_ids": cells["encoder_input_ids"][:, t],
        "encoder_attention_mask": cells["encoder_attention_mask"][:, t],
        "memory_reset": cells["memory_reset"][:, t],
    }
    if "decoder_input_ids" in cells:
        out["decoder_input_ids"] = cells["decoder_input_ids"][:, t]
        out["decoder_attention_mask"] = cells["decoder_attention_mask"][:, t]
        out["shift_labels"] = cells["shift_labels"][:, t * L: (t + 1) * L].contiguous()
    return out


def _cell_weights(cells: dict[str, torch.Tensor], weighting: str) -> list[float] | None:
    """Per-cell multipliers of per-cell mean losses, or None for the token-weighted mean."""
    T = cells["encoder_input_ids"].shape[1]
    if weighting == "token_mean":
        return None
    if weighting == "exponential":  # [qywu]: w_t = 2^{t+1} / Σ_j 2^j
        norm = sum(2.0 ** j for j in range(1, T + 1))
        return [2.0 ** (t + 1) / norm for t in range(T)]
    if weighting == "per_cell_mean":
        return [1.0] * T
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}.")


def cells_backward(
    model: torch.nn.Module,
    cells: dict[str, torch.Tensor],
    memory: torch.Tensor | None,
    *,
    mode: str = "mrbp",
    loss_weighting: str = "token_mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    backward: Backward | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_scale: float = 1.0,
    grad_scale: Callable[[], float] | None = None,
    seeds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate one window of T cells per row and return (detached loss, new carried memory).

    Args:
        cells: `encoder_input_ids`, `encoder_attention_mask`, `decoder_input_ids`, `decoder_attention_mask`
            [B, T, L], `shift_labels` [B, T·L], `memory_reset` [B, T].
        memory: carried memory [B, K, d] (None: m₀; cells with reset=1 restart from m₀ anyway).
        mode: "mrbp" (exact BPTT over the window, one cell graph alive), "bptt" (one graph over all cells), or
            "truncated" (each cell back-propagated alone; no gradient through memory).
        loss_weighting: "token_mean" (Σ NLL / N, N = `num_items_in_batch` or this window's targets),
            "exponential" or "per_cell_mean" (weights on per-cell mean losses, docs/design.md#loss-weighting).
        backward: back-propagates a scalar (default `Tensor.backward`; the trainer passes `accelerator.backward`).
        no_sync: a context factory wrapping every backward but the last (DDP/FSDP gradient sync only once), e.g.
            `lambda: accelerator.no_sync(model)`; None when the caller keeps sync off for the whole call.
        context: a context factory wrapping every model call (e.g. autocast).
        loss_scale: multiplies each objective (e.g. the world-size factor when tokens are averaged across ranks).
        grad_scale: returns the current fp16 loss scale; the memory gradient is unscaled with it before it is
            injected again, and non-finite values are zeroed (the optimizer step is then skipped by the scaler).
        seeds: one RNG seed per cell (drawn here when dropout is active and none are given).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown training mode {mode!r}; choose one of {MODES}.")
    backward = backward or (lambda t: t.backward())
    no_sync = no_sync or contextlib.nullcontext
    context = context or contextlib.nullcontext
    T = cells["encoder_input_ids"].shape[1]
    device = cells["encoder_input_ids"].device
    weights = _cell_weights(cells, loss_weighting)
    if weights is None and num_items_in_batch is None:
        num_items_in_batch = (cells["shift_labels"] != -100).sum()
    if seeds is None and _dropout_active(model):
        seeds = torch.randint(0, 2**62, (T,)).tolist()
    seed_of = (lambda t: None) if seeds is None else (lambda t: int(seeds[t]))

    def run(t: int, mem: torch.Tensor | None, critical_path_only: bool = False):
        with seeded(seed_of(t), device), context():
            batch = cell_batch(cells, t)
            if critical_path_only:
                for key in ("decoder_input_ids", "decoder_attention_mask", "shift_labels"):
                    batch.pop(key, None)
                return model(**batch, memory=mem, critical_path_only=True)
            n_items = num_items_in_batch if weights is None else None
            out = model(**batch, memory=mem, num_items_in_batch=n_items)
            objective = out.loss * (loss_scale if weights is None else weights[t] * loss_scale)
            return out, objective

    total = torch.zeros((), device=device)
    if mode == "bptt":
        objective, mem = 0.0, memory
        for t in range(T):
            out, obj = run(t, mem)
            objective, mem = objective + obj, out.memory
            total = total + obj.detach() / loss_scale
        backward(objective)
        return total, mem.detach()

    if mode == "truncated":
        mem = memory
        for t in range(T):
            with no_sync() if t < T - 1 else contextlib.nullcontext():
                out, obj = run(t, None if mem is None else mem.detach())
                backward(obj)
            total, mem = total + obj.detach() / loss_scale, out.memory
        return total, mem.detach()

    # MRBP phase 1: critical path only, no graph; store the memory before every cell. The last cell is skipped:
    # its recomputation in phase 2 yields the window's final memory anyway.
    buf = [memory]
    with torch.no_grad():
        for t in range(T - 1):
            buf.append(run(t, buf[-1], critical_path_only=True).memory)
    final = None
    # phase 2: reverse sweep, one cell graph alive at a time
    g = None
    for t in reversed(range(T)):
        m_t = None if buf[t] is None else buf[t].detach().requires_grad_(t > 0)
        with no_sync() if t > 0 else contextlib.nullcontext():
            out, obj = run(t, m_t)
            if g is not None:
                obj = obj + (out.memory * g).sum()
            backward(obj)
        if t == T - 1:
            final = out.memory.detach()
        total = total + (out.loss.detach() * (1.0 if weights is None else weights[t]))
        if t > 0:
            g = m_t.grad
            if grad_scale is not None:
                g = g / grad_scale()
            g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return total, final


__all__ = ["memory_replay_backward", "cells_backward", "cell_batch", "seeded", "LOSS_WEIGHTINGS", "MODES"]
