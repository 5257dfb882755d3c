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
from transformers.utils import logging

from .graphs import is_sharded
from .memory import memory_bound
from .modeling_memformer import (
    CACHE_KWARG,
    PREVIOUS_SEGMENT_LAYOUT_ERROR,
    _graph_state,
    previous_segment_breaks,
    shift_labels_from,
)

logger = logging.get_logger(__name__)

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

    When every row is in the same state and there is no padding (the usual case: whole documents, or streams
    continued from a cache), the input is laid out as cells (`stream_cells`) and runs through the same engine as
    `cells_backward`; otherwise each encode step of the general planner is replayed from its stored memory.
    In training mode with `config.bptt_horizon` set, the memory is detached every that many encode steps, as the
    forward does.

    Args:
        model: a `MemformerForCausalLM` (possibly wrapped, e.g. by DDP).
        input_ids, labels, attention_mask, memory_reset, past_key_values: as for the model's forward; `labels`
            defaults to `input_ids`. `past_key_values` is read, never modified; a cache that still carries autograd
            history (from a forward run with gradients) is detached with a warning, since gradients cannot flow
            into an earlier, already back-propagated call.
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
    past_key_values = _detached_cache(past_key_values)
    labels = input_ids if labels is None else labels
    shift_labels = shift_labels_from(labels, attention_mask)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != -100).sum()
    common = dict(input_ids=input_ids, attention_mask=attention_mask, memory_reset=memory_reset)
    config = _unwrap(model).config
    L = config.segment_length
    # `bptt_horizon`: in training the forward detaches the memory every this many encode steps; so do the replays
    horizon = config.bptt_horizon if _unwrap(model).training else None

    layout = stream_cells(model, input_ids, attention_mask, memory_reset, past_key_values, shift_labels)
    # the carried cache after this call (critical path + each row's last decoder chunk, no graph)
    with torch.no_grad():
        first = model(**common, past_key_values=copy.deepcopy(past_key_values), use_cache=True, logits_to_keep=1,
                      output_memory_states=layout is None)
    new_cache = first[CACHE_KWARG]

    if layout is not None:
        cells, head_columns, fresh = layout
        total = torch.zeros((), device=input_ids.device)
        if head_columns:  # the continued chunk: cross context from the cache, no memory dependence in this call
            out = model(input_ids=input_ids[:, :head_columns], past_key_values=past_key_values, use_cache=False,
                        shift_labels=shift_labels[:, :head_columns], num_items_in_batch=num_items_in_batch)
            backward(out.loss * loss_scale)
            total = total + out.loss.detach()
        if cells is not None:
            memory = None if fresh else past_key_values.memory
            T = cells["encoder_input_ids"].shape[1]
            for a in range(0, T, horizon or T):  # the forward detaches the memory before every horizon-th cell
                window = {k: v[:, a:a + (horizon or T)] for k, v in cells.items() if k != "shift_labels"}
                window["shift_labels"] = cells["shift_labels"][:, a * L:(a + (horizon or T)) * L].contiguous()
                loss, memory = cells_backward(model, window, memory, num_items_in_batch=num_items_in_batch,
                                              backward=backward, loss_scale=loss_scale, memory_prediction=False)
                total = total + loss
        return total, new_cache

    # irregular input: replay each encode step of the general planner from its stored memory
    memories = first.memory_states

    def run(k: int, memory: torch.Tensor | None, critical_path_only: bool):
        out = model(**common, past_key_values=past_key_values, use_cache=False, shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch, replay_step=k, replay_memory=memory)
        return out, out.loss * loss_scale

    steps = max(len(memories) - 1, 1)
    loss = torch.zeros((), device=input_ids.device)
    for a in range(0, steps, horizon or steps):  # the forward detaches the memory before every horizon-th step
        b = min(a + (horizon or steps), steps)
        part, _ = replay(lambda k, memory, critical_path_only, a=a: run(a + k, memory, critical_path_only), b - a,
                         memories[a], backward=backward, memories=list(memories[a:b]))
        loss = loss + part
    return loss, new_cache


def _detached_cache(cache: Any) -> Any:
    if cache is None or getattr(cache, "memory", None) is None:
        return cache
    if any(t is not None and t.requires_grad for t in cache._all_tensors()):
        logger.warning("memory_replay_backward: the cache passed carries autograd history (it comes from a forward "
                       "with gradients); it is detached: gradients do not flow into earlier calls.")
        return copy.deepcopy(cache)  # MemformerCache.__deepcopy__ detaches
    return cache


def stream_cells(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 memory_reset: torch.Tensor | None, cache: Any, shift_labels: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor] | None, int, bool] | None:
    """The cells of a stream-mode call whose rows are all in the same state and hold no padding (None otherwise):
    (cells [B, T, L] as `cells_backward` takes them, or None when no segment is encoded; the number of leading
    columns that continue the cache's partial segment, decoded against the cache's cross context; whether the rows
    start documents, so that the cells start from m0 rather than the cache's memory)."""
    core = _unwrap(model)
    core = getattr(core, "model", core)
    if attention_mask is not None and not bool(attention_mask[:, -input_ids.shape[1]:].bool().all()):
        return None
    layout = core._aligned_offset(input_ids, cache, memory_reset, input_ids.shape[1])
    if layout is None:
        return None
    offset, fresh = layout
    cfg = core.config
    L, (b, n), bos = cfg.segment_length, input_ids.shape, cfg.bos_token_id
    grid, decoder_ids = core.aligned_grid(input_ids, cache, offset, fresh)
    n_chunks = decoder_ids.shape[1]
    labels = shift_labels.new_full((b, n_chunks * L), -100)
    labels[:, offset:offset + n] = shift_labels
    encoder_ids = grid.new_full((b, n_chunks, L), bos)
    encoder_ids[:, 1:] = grid[:, 1: (n_chunks - 1) * L + 1].view(b, n_chunks - 1, L)
    encoder_mask = torch.ones_like(encoder_ids, dtype=torch.bool)
    encoder_mask[:, 0, 1:] = False  # cell 0 encodes the boot segment [BOS]
    reset = torch.zeros(b, n_chunks, dtype=torch.bool, device=input_ids.device)
    reset[:, 0] = True
    cells = dict(encoder_input_ids=encoder_ids, encoder_attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                 decoder_attention_mask=torch.ones_like(decoder_ids), memory_reset=reset,
                 shift_labels=labels.view(b, n_chunks, L))
    head = 0
    if not fresh:  # chunk 0 continues the cache; the cells start at chunk 1 with the cache's memory
        head = min(n, L - offset)
        cells = {k: v[:, 1:] for k, v in cells.items()}
        cells["memory_reset"] = torch.zeros_like(cells["memory_reset"])
        if cells["encoder_input_ids"].shape[1] == 0:
            return None, head, fresh
    cells["shift_labels"] = cells["shift_labels"].flatten(1).contiguous()
    return cells, head, fresh


def _validate_window(model: torch.nn.Module, cells: dict[str, torch.Tensor], memory: torch.Tensor | None) -> None:
    """Check a whole window's token ids, the carried memory (finite and within `memory.memory_bound`) and, with
    `decoder_previous_segment`, the decoder layout (as `MemformerModel._check_previous_segment_layout` checks one
    cell) with one host sync (the cells then skip their own per-call checks, which would each stop the host until the
    GPU catches up)."""
    config = _unwrap(model).config
    vocab = config.vocab_size
    ids = [cells["encoder_input_ids"]] + ([cells["decoder_input_ids"]] if "decoder_input_ids" in cells else [])
    low = torch.stack([t.min() for t in ids]).min()
    high = torch.stack([t.max() for t in ids]).max()
    limit, why = memory_bound(config.hidden_size, _unwrap(model).get_input_embeddings().weight.dtype)
    in_range = torch.ones((), dtype=torch.bool, device=low.device)
    if memory is not None:  # False for NaN and inf too, which are told apart only when refused
        in_range = (memory.abs() <= limit).all()
    broken = torch.zeros((), dtype=torch.long, device=low.device)
    if getattr(config, "decoder_previous_segment", False) and "decoder_input_ids" in cells:
        broken = previous_segment_breaks(cells["encoder_input_ids"], cells.get("encoder_attention_mask"),
                                         cells["decoder_input_ids"], config.segment_length).sum().to(low.device)
    low, high, in_range, broken = torch.stack([low, high, in_range.long().to(low.device), broken]).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(f"The window's token ids are outside [0, vocab_size={vocab}): min {low}, max {high}.")
    if not in_range:
        if not bool(torch.isfinite(memory).all()):
            raise ValueError("The carried memory contains NaN or inf values.")
        raise ValueError(f"The carried memory holds values beyond ±{limit:.3g}: {why} (NaN outputs).")
    if broken:
        raise ValueError(PREVIOUS_SEGMENT_LAYOUT_ERROR.format(where=f"{broken} cells of the window have"))


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


class _CellOutput:
    def __init__(self, loss: torch.Tensor, memory: torch.Tensor) -> None:
        self.loss, self.memory = loss, memory


class _GradientInto:
    """Post-accumulate-grad hook of a parameter alias: move its gradient into the parameter's `.grad`."""

    def __init__(self, parameter: torch.nn.Parameter) -> None:
        self.parameter = parameter

    def __call__(self, alias: torch.Tensor) -> None:
        if self.parameter.grad is None:
            self.parameter.grad = alias.grad.clone()  # (alias.grad may be the graph's own output buffer)
        else:
            self.parameter.grad.add_(alias.grad)
        alias.grad = None


class _TrainingCell(torch.nn.Module):
    """A training cell as a module over the model's parameters: cell-mode forward, LM head, summed NLL / count
    (plus the `memory_prediction_loss` term in training mode, unless `memory_prediction=False`)."""

    def __init__(self, model: torch.nn.Module, memory_prediction: bool = True) -> None:
        super().__init__()
        self.net = model
        self.memory_prediction = memory_prediction

    def forward(self, memory, encoder_input_ids, encoder_attention_mask, decoder_input_ids, decoder_attention_mask,
                memory_reset, shift_labels, num_items):
        out = self.net.model(encoder_input_ids=encoder_input_ids, encoder_attention_mask=encoder_attention_mask,
                             decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                             memory=memory, memory_reset=memory_reset, validate_inputs=False)
        logits = self.net.lm_head(out.last_hidden_state)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(),
                                                ignore_index=-100, reduction="sum")
        if self.net.adds_memory_prediction(self.memory_prediction):
            nll = nll + self.net.memory_prediction_nll(memory, memory_reset, shift_labels)
        return nll / num_items.clamp_min(1), out.memory


class TrainingCellGraph:
    """One training cell (forward and backward) captured as CUDA graphs with
    `torch.cuda.make_graphed_callables`: on a GPU a cell is hundreds of small kernels whose launches, not the GPU,
    set the speed of training. The graphed cell computes the same loss (summed NLL over the cell's targets / the
    window's target count) and next memory as the model's cell-mode forward; autograd connects it to the memory
    gradient of the next cell as usual.

    Used by `cells_backward` for a plain (not DDP/FSDP-wrapped) model on CUDA without active dropout, when
    `model.model.use_cuda_graphs` is on; one graph per (batch, segment length, dtypes, autocast) and model parameters
    (moving, casting or replacing them drops the graphs)."""

    def __init__(self, model: torch.nn.Module, example: dict[str, torch.Tensor], memory: torch.Tensor,
                 memory_prediction: bool = True) -> None:
        self.model = model
        cell = _TrainingCell(model, memory_prediction)
        # The graphs differentiate with respect to detached aliases of the trainable parameters (same storage, so
        # optimizer updates are seen), created here: the parameters' own gradient accumulators may live on another
        # stream (DDP keeps them alive), which would break the capture. A hook adds each alias's gradient into its
        # parameter's `.grad` after every backward.
        names = [n for n, p in cell.named_parameters() if p.requires_grad]
        params = dict(cell.named_parameters())
        self.aliases = [params[n].detach().requires_grad_(True) for n in names]
        for alias, name in zip(self.aliases, names):
            alias.register_post_accumulate_grad_hook(_GradientInto(params[name]))

        def run(*args):
            return torch.func.functional_call(cell, dict(zip(names, args[8:])), args[:8])

        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        torch.clear_autocast_cache()  # no cast made outside may enter the captured graphs
        with torch.autocast("cuda", dtype, autocast, cache_enabled=False):
            self.graphed = torch.cuda.make_graphed_callables(
                run, self._args(example, memory, torch.ones((), dtype=torch.long, device=memory.device))
                + tuple(self.aliases), num_warmup_iters=3)

    @staticmethod
    def _args(batch: dict[str, torch.Tensor], memory: torch.Tensor, num_items: torch.Tensor) -> tuple:
        return (memory, batch["encoder_input_ids"], batch["encoder_attention_mask"], batch["decoder_input_ids"],
                batch["decoder_attention_mask"], batch["memory_reset"], batch["shift_labels"], num_items)

    def __call__(self, batch: dict[str, torch.Tensor], memory: torch.Tensor | None, num_items) -> _CellOutput:
        core = self.model.model
        if memory is None:  # the window starts from m0 for every row
            memory = core.initial_memory(batch["encoder_input_ids"].shape[0]).detach()
        if not memory.requires_grad:  # one graph for every cell: the memory always takes a gradient
            memory = memory.detach().requires_grad_(True)
        if num_items is None:
            num_items = batch["shift_labels"].ne(-100).sum()
        num_items = torch.as_tensor(num_items, device=memory.device).long()
        example = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        loss, new_memory = self.graphed(*self._args(example, memory.to(core.memory_dtype), num_items),
                                        *self.aliases)
        return _CellOutput(loss, new_memory)

    @classmethod
    def for_model(cls, model: torch.nn.Module, cells: dict[str, torch.Tensor], memory: torch.Tensor | None,
                  memory_prediction: bool = True) -> TrainingCellGraph | None:
        """The model's graphed cell for this window's shapes, or None when graphs do not apply."""
        if not graphed_cells_apply(model, cells) or not torch.is_grad_enabled():
            return None
        core = model.model
        device = cells["encoder_input_ids"].device
        # whether the cell adds the memory_prediction_loss term: a graph replays the branch taken at its capture
        memory_prediction = model.adds_memory_prediction(memory_prediction)
        # make_graphed_callables keeps the sample tensors as its static inputs: never the caller's (views of) cells
        example = {k: v.clone() for k, v in cell_batch(cells, 0).items()}
        b = example["encoder_input_ids"].shape[0]
        key = ("train-cell", tuple(example["encoder_input_ids"].shape), tuple(example["decoder_input_ids"].shape),
               core.memory_dtype, memory_prediction)
        m = torch.zeros(b, core.config.num_memory_slots, core.config.hidden_size, dtype=core.memory_dtype,
                        device=device, requires_grad=True)
        try:
            graphs = _graph_state(model)[0]
            graphs.drop_if_stale(model)
            graphed = graphs.get(key, lambda: cls(model, example, m, memory_prediction))
        except RuntimeError as e:  # e.g. an op that cannot be captured: train eagerly (and say so once)
            logger.warning_once(f"Training cells run eagerly: capturing them as CUDA graphs failed ({e}).")
            core.use_cuda_graphs = False
            return None
        return graphed


def graphed_cells_apply(model: torch.nn.Module, cells: dict[str, torch.Tensor]) -> bool:
    """Whether `cells_backward` runs this model's training cells as CUDA graphs: a bare (not DDP/FSDP-wrapped or
    sharded) Memformer on CUDA, no active dropout, `model.model.use_cuda_graphs` on. Under DDP the Trainer runs the
    bare module and averages the gradients itself (`average_gradients`)."""
    from transformers import PreTrainedModel

    core = getattr(model, "model", None)
    if (cells["encoder_input_ids"].device.type != "cuda" or not isinstance(model, PreTrainedModel) or core is None
            or not getattr(core, "use_cuda_graphs", False) or _dropout_active(model)
            or "decoder_input_ids" not in cells):
        return False
    return not is_sharded(model)


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean over ranks) every gradient of `model` in one flat buffer, as DDP does after a backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or not torch.distributed.is_initialized():
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat.div_(torch.distributed.get_world_size())
    torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))


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
    memory_prediction: bool = True,
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
        memory_prediction: in training mode, add the `memory_prediction_loss` term to each cell's loss (when the
            config enables it); `memory_replay_backward` passes False (the gradient of the stream forward's loss).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown training mode {mode!r}; choose one of {MODES}.")
    backward = backward or (lambda t: t.backward())
    no_sync = no_sync or contextlib.nullcontext
    context = context or contextlib.nullcontext
    T = cells["encoder_input_ids"].shape[1]
    device = cells["encoder_input_ids"].device
    extra = {} if memory_prediction else {"memory_prediction": False}
    weights = _cell_weights(cells, loss_weighting)
    if weights is None and num_items_in_batch is None:
        num_items_in_batch = (cells["shift_labels"] != -100).sum()
    if seeds is None and _dropout_active(model):
        seeds = torch.randint(0, 2**62, (T,)).tolist()
    seed_of = (lambda t: None) if seeds is None else (lambda t: int(seeds[t]))

    _validate_window(model, cells, memory)
    with context():  # captured under the caller's autocast setting, as the cells will run
        graphed = (TrainingCellGraph.for_model(model, cells, memory, memory_prediction)
                   if seeds is None and mode != "bptt" else None)

    def run(t: int, mem: torch.Tensor | None, critical_path_only: bool = False):
        with seeded(seed_of(t), device), context():
            batch = cell_batch(cells, t)
            batch["validate_inputs"] = False
            if critical_path_only:
                for key in ("decoder_input_ids", "decoder_attention_mask", "shift_labels"):
                    batch.pop(key, None)
                return model(**batch, memory=mem, critical_path_only=True)
            n_items = num_items_in_batch if weights is None else None
            if graphed is not None:
                out = graphed(batch, mem, n_items)
            else:
                out = model(**batch, memory=mem, num_items_in_batch=n_items, **extra)
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

    def cell(t: int, mem: torch.Tensor | None, critical_path_only: bool):
        if critical_path_only:
            return run(t, mem, critical_path_only=True), None
        return run(t, mem)

    fix = None
    if grad_scale is not None:
        def fix(g: torch.Tensor) -> torch.Tensor:
            g = g / grad_scale()
            return torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    else:
        def fix(g: torch.Tensor) -> torch.Tensor:
            return torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return replay(cell, T, memory, backward=backward, no_sync=no_sync, fix_gradient=fix, weights=weights)


def replay(
    run: Callable[[int, torch.Tensor | None, bool], tuple[Any, torch.Tensor | None]],
    steps: int,
    memory: torch.Tensor | None,
    *,
    backward: Backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    fix_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: list[float] | None = None,
    memories: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The MRBP engine (docs/design.md, MRBP): exact back-propagation through `steps` recurrence steps with one
    step's graph alive.

    `run(t, memory_t, critical_path_only)` computes step t from the memory before it and returns (output with
    `.memory` (after the step) and `.loss`, the step's objective); with `critical_path_only` only the memory matters
    (no graph is built). Phase 1 stores the memory before every step (or takes `memories`); phase 2 walks back from
    the last step, recomputing step t and back-propagating `objective_t + <M_{t+1}, g_{t+1}>` in one call, which
    yields g_t, the gradient into the memory before step t. Returns (the detached sum of the step losses, weighted
    by `weights`, and the memory after the last step)."""
    no_sync = no_sync or contextlib.nullcontext
    if memories is None:  # phase 1; the last step is skipped: phase 2 recomputes it first anyway
        memories = [memory]
        with torch.no_grad():
            for t in range(steps - 1):
                memories.append(run(t, memories[-1], True)[0].memory)
    total, final, g = None, None, None
    for t in reversed(range(steps)):
        m_t = None if memories[t] is None else memories[t].detach().requires_grad_(t > 0)
        with no_sync() if t > 0 else contextlib.nullcontext():
            out, objective = run(t, m_t, False)
            if g is not None:
                objective = objective + (out.memory * g).sum()
            backward(objective)
        if t == steps - 1:
            final = out.memory.detach().clone()  # (a graphed cell's output buffer is overwritten by the next replay)
        loss = out.loss.detach() * (1.0 if weights is None else weights[t])
        total = loss if total is None else total + loss
        if t > 0:
            g = m_t.grad
            if fix_gradient is not None:
                g = fix_gradient(g)
    return total, final


__all__ = ["memory_replay_backward", "cells_backward", "replay", "stream_cells", "cell_batch", "seeded",
           "LOSS_WEIGHTINGS", "MODES"]
