"""`MemformerTrainer` (docs/design.md#trainer, #distributed, #testing) against independent references.

* the stock `transformers.Trainer` fed the same cells one segment per row (window 1, nothing to carry): identical
  logged losses and parameters, i.e. loss scaling by `num_items_in_batch`, gradient accumulation and the optimizer
  step are those of the stock Trainer;
* a hand-written loop (plain `model(...)` calls in cell mode, full BPTT over the window, AdamW + linear schedule +
  clipping) for the truncated, mrbp and bptt modes with carried memory;
* the gradient of one optimizer step == the gradient of the token-weighted mean over all micro-batches;
* the carried memory == a sequential no-grad recomputation of every stream from its document starts (m₀ there);
* kill-and-resume, in process and with a real SIGKILL in a subprocess, with and without dropout;
* checkpoint contents and a mismatched layout on resume;
* `evaluate()` == one stream-mode forward per document (and the no-memory variant == m₀ before every cell);
* bf16 autocast on CPU; bad arguments; 2-rank DDP (gloo, torchrun) == one process with the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BOS, CELL_KEYS, PAD, L, StopAt, Torchrun, build_tiny_memformer, word_tokenizer
from helpers import TINY_MEMFORMER as TINY
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup
from transformers.trainer_utils import get_last_checkpoint

import memformer_hf.trainer_memformer as trainer_module
from memformer_hf import MemformerForCausalLM, mrbp
from memformer_hf.data_streams import StreamBatches
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments


# ============================================================================================== helpers
def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
               **overrides) -> MemformerForCausalLM:
    """A tiny sharp model in train mode, biases and LayerNorm affines randomised, attention key biases frozen (see
    `helpers.build_tiny_memformer`)."""
    return build_tiny_memformer(seed, dtype=dtype, attn=attn_implementation, train=True, freeze_key_biases=True,
                                **overrides)


def make_docs(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY["vocab_size"]) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


def targs(tmp, **overrides) -> MemformerTrainingArguments:
    kw = dict(output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2, mrbp_window=2,
              num_train_epochs=1, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
              use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0, optim="adamw_torch")
    kw.update(overrides)
    return MemformerTrainingArguments(**kw)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_params_close(got: dict, ref: dict, atol: float, what: str = "") -> None:
    assert got.keys() == ref.keys()
    worst = max(((g - ref[k]).abs().max().item(), k) for k, g in got.items())
    assert worst[0] <= atol, f"{what}: parameter {worst[1]} differs by {worst[0]:.3g} > {atol}"


def logged_losses(trainer, key: str = "loss") -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def cell(batch: dict, t: int) -> dict[str, torch.Tensor]:
    """Cell t of a [B, T, L] window batch, built here (not with `mrbp.cell_batch`)."""
    out = {k: batch[k][:, t] for k in CELL_KEYS}
    out["memory_reset"] = batch["memory_reset"][:, t]
    out["shift_labels"] = batch["shift_labels"][:, t * L:(t + 1) * L].clone()
    return out


class RecordCells:
    """Wraps `trainer_memformer.cells_backward` (what `training_step` runs) to record the carried memory going in
    and coming out of every micro-batch, keyed by the batch's stream ids."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        inner = mrbp.cells_backward  # the original, also when another recorder is installed

        def wrapper(model, cells, memory, **kw):
            loss, new = inner(model, cells, memory, **kw)
            self.calls.append(dict(stream_ids=cells["stream_ids"].clone(), window=int(cells["window_index"]),
                                   tokens=int(cells["shift_labels"].ne(-100).sum()),
                                   memory_in=None if memory is None else memory.detach().clone(),
                                   memory_out=new.detach().clone(), loss=float(loss)))
            return loss, new

        monkeypatch.setattr(trainer_module, "cells_backward", wrapper)


# ============================================================================================== 1. stock Trainer
class _RowCells(torch.utils.data.Dataset):
    """One cell per row for the stock Trainer: the rows of window-1 batches, in order."""

    def __init__(self, batches: list[dict]):
        self.rows = []
        for b in batches:
            for r in range(b["encoder_input_ids"].shape[0]):
                row = {k: b[k][r, 0] for k in CELL_KEYS}
                row["memory_reset"] = b["memory_reset"][r, 0]
                row["shift_labels"] = b["shift_labels"][r]
                row["labels"] = b["shift_labels"][r]  # only so that the stock Trainer counts `shift_labels`
                self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_window1_equals_stock_trainer(tmp_path):
    """Documents of one segment: every cell is a boot cell (reset), so there is nothing to carry and the stock
    Trainer (with `memory=None`) sees exactly the same cells. Micro-batches hold very different token counts, so a
    mean of micro-batch means would differ from the token-weighted mean."""
    docs = make_docs(1, 24, 1, L)
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-2,
                  max_grad_norm=0.5, weight_decay=0.01, warmup_steps=1)
    model = make_model(0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mt = MemformerTrainer(model=model, args=targs(tmp_path / "m", mrbp_window=1, training_mode="truncated", **common),
                          train_dataset=docs)
    batches = [mt.train_dataset[k] for k in range(len(mt.train_dataset))]
    assert all(b["memory_reset"].all() for b in batches)
    counts = [int(b["shift_labels"].ne(-100).sum()) for b in batches]
    assert len(set(counts)) > 1, counts
    mt.train()

    ref_model = make_model(0)
    ref_model.load_state_dict(init)
    stock_args = TrainingArguments(
        output_dir=str(tmp_path / "s"), num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, data_seed=0, optim="adamw_torch",
        remove_unused_columns=False, train_sampling_strategy="sequential", **common)
    st = Trainer(model=ref_model, args=stock_args, train_dataset=_RowCells(batches))
    st.train()

    got, ref = logged_losses(mt), logged_losses(st)
    assert len(ref) == len(batches) // 2 >= 5
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got, ref)
    # the gradient scale (AdamW and clipping would forgive a constant factor)
    got, ref = logged_losses(mt, "grad_norm"), logged_losses(st, "grad_norm")
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)
    assert_params_close(params(mt.model), params(st.model), 1e-6, "stock Trainer")
    moved = max((v - init[k]).abs().max().item() for k, v in params(mt.model).items())
    assert moved > 1e-2, "training did not move the parameters"


# ============================================================================================== 1b. hand loop
def reference_run(model, ds: StreamBatches, mode: str, lr: float, max_grad_norm: float, epochs: int = 1):
    """What the Trainer should do, written out: per optimizer step, G window batches; N = all targets of the step;
    per window one graph over its T cells (memory detached between cells in truncated mode); carry per stream."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    G = ds.grad_accum
    steps_per_epoch = len(ds) // G
    sched = get_linear_schedule_with_warmup(opt, 0, steps_per_epoch * epochs)
    carry: dict[int, torch.Tensor] = {}
    losses, norms = [], []
    model.train()
    for _ in range(epochs):
        for step in range(steps_per_epoch):
            batches = [ds[step * G + i] for i in range(G)]
            n_items = sum(int(b["shift_labels"].ne(-100).sum()) for b in batches)
            step_loss = 0.0
            for b in batches:
                ids = b["stream_ids"].tolist()
                mem = torch.stack([carry[i] for i in ids]) if all(i in carry for i in ids) else None
                objective = 0.0
                for t in range(b["encoder_input_ids"].shape[1]):
                    out = model(**cell(b, t), memory=mem, num_items_in_batch=n_items)
                    objective = objective + out.loss
                    mem = out.memory.detach() if mode == "truncated" else out.memory
                objective.backward()
                step_loss += float(objective.detach())
                for i, m in zip(ids, mem.detach()):
                    carry[i] = m
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(step_loss)
    return losses, norms, carry


@pytest.mark.parametrize("mode,window", [("truncated", 1), ("truncated", 3), ("mrbp", 3), ("bptt", 2)])
def test_training_equals_hand_written_loop(tmp_path, mode, window):
    """Multi-segment documents with carried memory: logged losses, final parameters and final carries equal a
    hand-written AdamW loop over the same window batches."""
    docs = make_docs(2, 14, 3, 22)
    model = make_model(0)
    ref_model = make_model(0)
    args = targs(tmp_path, mrbp_window=window, training_mode=mode, learning_rate=2e-2, max_grad_norm=1.0)
    tr = MemformerTrainer(model=model, args=args, train_dataset=docs)
    ds = tr.train_dataset
    assert any(not b for b in (ds[k]["memory_reset"][:, 0].all() for k in range(len(ds)))), "no carry exercised"
    tr.train()
    ref_losses, ref_norms, ref_carry = reference_run(ref_model, ds, mode, lr=2e-2, max_grad_norm=1.0)
    got, norms = logged_losses(tr), logged_losses(tr, "grad_norm")
    assert list(got) == list(norms) == list(range(1, len(ref_losses) + 1))
    for step, (ref, ref_norm) in enumerate(zip(ref_losses, ref_norms), 1):
        assert got[step] == pytest.approx(ref, rel=1e-5), (step, got, ref_losses)
        assert norms[step] == pytest.approx(ref_norm, rel=1e-5), (step, norms, ref_norms)
    assert_params_close(params(tr.model), params(ref_model), 1e-5, mode)
    carry = tr.carried_memory.memory  # the per-stream store (docs/design.md#carry)
    for sid, m in ref_carry.items():
        torch.testing.assert_close(carry[sid], m, rtol=0, atol=1e-5)


def test_float64_training_with_inactive_cells_stays_finite(tmp_path):
    """Regression: float64 batches mixing active rows with inactive (all-pad, fully masked) cells once gave NaN
    (the eager softmax ran on `scores.float()`, turning finfo(float64).min into -inf)."""
    docs = make_docs(2, 14, 3, 22)  # streams of different lengths: inactive cells next to active ones
    tr = MemformerTrainer(model=make_model(0, dtype=torch.float64), train_dataset=docs,
                          args=targs(tmp_path, mrbp_window=1, training_mode="truncated", learning_rate=2e-2))
    tr.train()
    norms = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
    assert norms and all(math.isfinite(x) for x in norms), norms


# ============================================================================================== 2. accumulation
def window_objective(model, batch: dict, memory, n_items) -> tuple[torch.Tensor, torch.Tensor]:
    """Full BPTT over one window: Σ_t NLL_t / n_items and the window-end memory."""
    objective = 0.0
    for t in range(batch["encoder_input_ids"].shape[1]):
        out = model(**cell(batch, t), memory=memory, num_items_in_batch=n_items)
        objective, memory = objective + out.loss, out.memory
    return objective, memory


class CaptureStep(TrainerCallback):
    """Gradients and parameters seen just before each optimizer step."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
        self.params.append({k: p.detach().clone() for k, p in model.state_dict().items()})


def test_gradient_accumulation_is_token_weighted_mean_over_micro_batches(tmp_path):
    """The gradient of an optimizer step (G = 3 micro-batches, each a window of another stream group) equals the
    gradient of Σ NLL / N over all micro-batches, N = all their targets, with the carry of the previous step."""
    docs = make_docs(3, 16, 2, 26)
    G, B, T = 3, 2, 3
    ref_model = make_model(0)
    cap = CaptureStep()
    tr = MemformerTrainer(model=make_model(0), callbacks=[cap], train_dataset=docs,
                          args=targs(tmp_path, per_device_train_batch_size=B, gradient_accumulation_steps=G,
                                     mrbp_window=T, max_steps=2, max_grad_norm=0.0, learning_rate=5e-2))
    ds = tr.train_dataset
    tr.train()
    assert len(cap.grads) == 2
    carry: dict[int, torch.Tensor] = {}
    for step in range(2):
        ref_model.load_state_dict(cap.params[step])
        ref_model.zero_grad()
        batches = [ds[step * G + g] for g in range(G)]
        counts = [int(b["shift_labels"].ne(-100).sum()) for b in batches]
        assert len(set(counts)) > 1, "equal token counts would not distinguish a mean of micro-batch means"
        n_items = sum(counts)
        new_carry = {}
        for b in batches:
            ids = b["stream_ids"].tolist()
            mem = torch.stack([carry[i] for i in ids]) if step else None
            objective, mem = window_objective(ref_model, b, mem, n_items)
            objective.backward()
            new_carry.update(zip(ids, mem.detach()))
        carry = new_carry
        ref = {k: p.grad for k, p in ref_model.named_parameters() if p.grad is not None}
        got = cap.grads[step]
        assert got.keys() == ref.keys()
        scale = max(g.abs().max().item() for g in ref.values())
        worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
        assert worst[0] <= 1e-5 * scale, f"step {step + 1}: {worst[1]} gradient differs by {worst[0]:.3g}"


# ============================================================================================== 3. carry
@torch.no_grad()
def document_memories(model, doc: list[int], memory=None) -> list[torch.Tensor]:
    """The memory after each cell of one document, computed cell by cell from `memory` (None: m₀, the document
    start), with unpadded segments and no masks: boot [BOS], then s_0 .. s_{n-2} (the last one is never encoded)."""
    segs = [doc[i:i + L] for i in range(0, len(doc), L)]
    out = []
    for j, seg in enumerate(segs):
        enc = [BOS] if j == 0 else segs[j - 1]
        res = model(encoder_input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([[BOS] + seg[:-1]]),
                    memory=memory)
        memory = res.memory
        out.append(memory[0])
    return out


def test_carried_memory_equals_sequential_recomputation(tmp_path):
    """After every optimizer step (all G stream groups advanced by one window) the checkpointed carry of each stream
    equals the memory of a sequential recomputation of that stream from the start of its current document (m₀
    there); an exhausted stream holds Write(m₀, ∅). lr = 0 keeps the parameters fixed."""
    docs = make_docs(4, 13, 2, 23)
    T = 3
    tr = MemformerTrainer(model=make_model(0), train_dataset=docs,
                          args=targs(tmp_path, mrbp_window=T, learning_rate=0.0, save_strategy="steps",
                                     save_steps=1))
    ds = tr.train_dataset
    tr.train()
    model = make_model(0).eval()
    with torch.no_grad():
        empty = model(encoder_input_ids=torch.full((1, L), PAD), encoder_attention_mask=torch.zeros(1, L, dtype=bool),
                      decoder_input_ids=torch.tensor([[BOS]]), memory_reset=torch.ones(1, dtype=bool)).memory[0]
    per_stream, no_reset = [], []
    for s in range(ds.num_streams):
        mems, cont, mem = [], [], None
        for d in ds.stream_documents[s]:
            mems += document_memories(model, docs[d])
            cont += document_memories(model, docs[d], memory=mem)  # negative control: no reset at the start
            mem = cont[-1][None]
        per_stream.append(mems)
        no_reset.append(cont)
    n_steps = len(ds) // ds.grad_accum
    assert n_steps >= 4
    boundaries_inside = sum(bool(ds[k]["memory_reset"][:, 1:].any()) for k in range(len(ds)))
    exhausted = control_differs = 0
    for step in range(1, n_steps + 1):
        carry = load_file(tmp_path / f"checkpoint-{step}" / "stream_state-rank0.safetensors")["carry"]
        assert carry.shape == (ds.num_streams, TINY["num_memory_slots"], TINY["hidden_size"])
        last = step * T - 1  # index of the last cell consumed by every stream
        for s in range(ds.num_streams):
            if last < len(per_stream[s]):
                torch.testing.assert_close(carry[s], per_stream[s][last], rtol=0, atol=2e-6,
                                           msg=f"stream {s} after step {step}")
                if (carry[s] - no_reset[s][last]).abs().max() > 1e-3:
                    control_differs += 1
            else:
                torch.testing.assert_close(carry[s], empty, rtol=0, atol=2e-6, msg=f"exhausted stream {s}")
                exhausted += 1
    assert boundaries_inside and exhausted and control_differs, (boundaries_inside, exhausted, control_differs)


# ============================================================================================== 4. resume
def resume_case(tmp_path, monkeypatch, docs, stop: int, epochs: int, dropout: float):
    """Uninterrupted run vs. a run stopped after step `stop` and resumed by a fresh Trainer and model."""
    kw = dict(mrbp_window=2, num_train_epochs=epochs, save_strategy="steps", save_steps=1000, learning_rate=2e-2)
    drop = dict(attention_dropout=dropout, hidden_dropout=dropout)
    full_rec = RecordCells(monkeypatch)
    full = MemformerTrainer(model=make_model(0, **drop), args=targs(tmp_path / "full", **kw), train_dataset=docs)
    full.train()
    part_rec = RecordCells(monkeypatch)
    part = MemformerTrainer(model=make_model(0, **drop), args=targs(tmp_path / "part", **kw), train_dataset=docs,
                            callbacks=[StopAt(stop)])
    part.train()
    assert part.state.global_step == stop
    res_rec = RecordCells(monkeypatch)
    resumed = MemformerTrainer(model=make_model(1, **drop), args=targs(tmp_path / "part", **kw), train_dataset=docs)
    resumed.train(resume_from_checkpoint=True)
    return full, full_rec, part_rec, resumed, res_rec


def assert_resumed_equal(full, full_rec, part_rec, resumed, res_rec, stop: int):
    G = full.args.gradient_accumulation_steps
    assert resumed.state.global_step == full.state.global_step
    got, ref = logged_losses(resumed), logged_losses(full)
    assert [s for s in got if s > stop] == [s for s in ref if s > stop] != []
    for s in ref:
        if s > stop:
            assert got[s] == pytest.approx(ref[s], rel=1e-6), (s, got, ref)
    assert_params_close(params(resumed.model), params(full.model), 1e-6, "resumed run")
    # the stream cursor and the carries: the micro-batches after the stop are the uninterrupted run's
    assert len(part_rec.calls) == stop * G
    tail = full_rec.calls[stop * G:]
    assert len(res_rec.calls) == len(tail)
    for a, b in zip(res_rec.calls, tail):
        assert a["window"] == b["window"] and torch.equal(a["stream_ids"], b["stream_ids"])
        torch.testing.assert_close(a["memory_in"], b["memory_in"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["memory_out"], b["memory_out"], rtol=0, atol=1e-6)
    # the first resumed window starts from the checkpoint's carry, which is not m0 of the checkpoint's weights
    ckpt = Path(resumed.args.output_dir) / f"checkpoint-{stop}"
    saved = load_file(ckpt / "stream_state-rank0.safetensors")["carry"]
    first = res_rec.calls[0]
    torch.testing.assert_close(first["memory_in"], saved[first["stream_ids"]], rtol=0, atol=0)
    m0 = MemformerForCausalLM.from_pretrained(ckpt).model.initial_memory(1).detach()
    assert (first["memory_in"] - m0).abs().max() > 1e-3, "the first resumed window does not use a restored carry"
    assert (saved - saved[:1]).abs().max() > 1e-3, "the saved carries are not per-stream memories"


@pytest.mark.parametrize("stop,dropout", [(3, 0.0), (9, 0.1)])
def test_kill_and_resume_in_process(tmp_path, monkeypatch, stop, dropout):
    """Stop after step `stop` (in the first epoch; in the second, with dropout whose RNG must be restored), resume
    with a fresh Trainer and a differently initialised model: the same batches, carries, losses and parameters."""
    docs = make_docs(2, 14, 3, 22)
    out = resume_case(tmp_path, monkeypatch, docs, stop, epochs=2, dropout=dropout)
    assert out[0].state.global_step > stop + 2
    assert_resumed_equal(*out, stop=stop)


def test_resume_after_an_epoch_of_another_length(tmp_path, monkeypatch):
    """The stream layout is re-dealt every epoch, so the natural epoch lengths differ (here 14, 12, 14 batches, i.e.
    7, 6, 7 optimizer steps) and each epoch keeps its own length. Resuming in the third epoch (after 7 + 6 + 2
    steps) must still continue exactly where the uninterrupted run was."""
    docs = make_docs(0, 14, 3, 22)
    common = dict(segment_length=L, window=2, batch_size=2, grad_accum=2, seed=0, bos_token_id=BOS, pad_token_id=PAD)
    natural = StreamBatches(docs, **common)
    lengths = []
    for e in range(3):
        natural.set_epoch(e)
        lengths.append(len(natural))
    assert lengths == [14, 12, 14]
    stop = 15  # 7 + 6 steps in the first two epochs, then two steps into the third
    out = resume_case(tmp_path, monkeypatch, docs, stop, epochs=3, dropout=0.0)
    assert out[0].state.global_step == 7 + 6 + 7
    assert_resumed_equal(*out, stop=stop)


def _windows_with_tokens(docs, epochs: int, **layout) -> list[list[tuple[int, tuple[int, ...], int]]]:
    """Per epoch, every (window, stream ids, target tokens) of the natural dealing that holds target tokens, read
    from a `StreamBatches` of the same layout (GA = 1: one batch per window)."""
    ds = StreamBatches(docs, segment_length=L, bos_token_id=BOS, pad_token_id=PAD, **layout)
    out = []
    for e in range(epochs):
        ds.set_epoch(e)
        batches = [ds[k] for k in range(len(ds))]
        out.append([(int(b["window_index"]), tuple(b["stream_ids"].tolist()), int(b["shift_labels"].ne(-100).sum()))
                    for b in batches if b["shift_labels"].ne(-100).any()])
        assert len(out[-1]) == ds.epoch_batches(e) == len(ds)  # the natural length has no window without tokens
    return out


@pytest.mark.parametrize("limit", ["epochs", "max_steps"])
def test_every_optimizer_step_trains_on_tokens(tmp_path, monkeypatch, limit):
    """Three epochs whose dealings pack to different lengths (regression: the shorter epochs used to end with empty
    windows that still took optimizer steps with loss 0 and advanced the LR schedule). Every batch the Trainer
    trains on holds target tokens, the steps are exactly the non-empty windows of the three epochs in order, the
    step count is their real total (also when set by max_steps, here ending inside the third epoch), and the linear
    schedule reaches 0 exactly at the last step."""
    docs = make_docs(1, 9, 3, 30)
    layout = dict(window=2, batch_size=2, grad_accum=1, seed=0)
    expected = _windows_with_tokens(docs, 3, **layout)
    lengths = [len(e) for e in expected]
    assert len(set(lengths)) > 1, lengths  # the epochs really differ in length
    if limit == "epochs":
        kw, total = dict(num_train_epochs=3), sum(lengths)
    else:
        kw, total = dict(max_steps=lengths[0] + lengths[1] + 2), lengths[0] + lengths[1] + 2
    rec = RecordCells(monkeypatch)
    tr = MemformerTrainer(model=make_model(0), train_dataset=docs,
                          args=targs(tmp_path, gradient_accumulation_steps=1, lr_scheduler_type="linear", **kw))
    assert tr.training_plan() == (3, total)
    tr.train()
    assert tr.state.global_step == tr.state.max_steps == total
    got = [(c["window"], tuple(c["stream_ids"].tolist()), c["tokens"]) for c in rec.calls]
    assert got == [w for epoch in expected for w in epoch][:total]
    assert all(c["tokens"] > 0 for c in rec.calls)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == total and all(h["loss"] > 0 and h["grad_norm"] > 0 for h in logs), logs
    assert tr.lr_scheduler.get_last_lr()[0] == 0.0 and logs[-1]["learning_rate"] > 0
    assert tr.state.epoch == pytest.approx(3.0 if limit == "epochs" else 2 + 2 / lengths[2])


# ============================================================================================== one GPU per process
def test_several_gpus_in_one_process_never_use_data_parallel(tmp_path, caplog):
    """The Trainer wraps the model in `nn.DataParallel` when one process sees several GPUs (`args.n_gpu > 1`), which
    cannot run MRBP (regression: plain `memformer-hf train` on a 2-GPU machine crashed). Pretend 2 visible GPUs on
    CPU: the trainer trains on one device and says in one line how to use both; the model is never wrapped."""
    args = targs(tmp_path, max_steps=2, gradient_accumulation_steps=1)
    assert args.device.type == "cpu"  # devices resolved; now the process "sees" two GPUs
    args._n_gpu = 2
    assert args.n_gpu == 2 and args.train_batch_size == 4
    with caplog.at_level(logging.WARNING):
        tr = MemformerTrainer(model=make_model(0), args=args, train_dataset=make_docs(0, 6, 3, 22))
    lines = [r.getMessage() for r in caplog.records if "GPUs are visible" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], caplog.text
    assert "torchrun --nproc_per_node 2" in lines[0] and "accelerate launch --num_processes 2" in lines[0]
    assert args.n_gpu == 1 and args.train_batch_size == 2  # one device's batch, not DataParallel's n_gpu x batch
    args._n_gpu = 2  # also when set again later, `_wrap_model` itself never returns DataParallel
    assert tr._wrap_model(tr.model) is tr.model
    args._n_gpu = 2
    tr.train()
    assert not isinstance(tr.model_wrapped, torch.nn.DataParallel) and tr.model_wrapped is tr.model
    assert tr.state.global_step == 2 and all(math.isfinite(v) for v in logged_losses(tr).values())


# ---------------------------------------------------------------------------------------------- real SIGKILL
class _KillSelf(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_substep_end(self, args, state, control, **kwargs):  # mid-way through optimizer step `step + 1`
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def sigkill_run(out: str, mode: str, kill_at: int) -> MemformerTrainer:
    """The training run of the SIGKILL test (also run as a script): dropout 0.1, a checkpoint every step, two epochs
    of 4 optimizer steps. mode: "full", "kill" (SIGKILL itself during step kill_at + 1) or "resume"."""
    docs = make_docs(0, 8, 3, 16)
    drop = dict(attention_dropout=0.1, hidden_dropout=0.1)
    args = targs(out, mrbp_window=2, num_train_epochs=2, save_strategy="steps", save_steps=1, learning_rate=2e-2)
    tr = MemformerTrainer(model=make_model(0 if mode != "resume" else 5, **drop), args=args, train_dataset=docs,
                          callbacks=[_KillSelf(kill_at)] if mode == "kill" else None)
    tr.train(resume_from_checkpoint=True if mode == "resume" else None)
    final = {k: v.detach().contiguous() for k, v in tr.model.named_parameters()}
    save_file(final, os.path.join(out, "final.safetensors"))
    with open(os.path.join(out, "log.json"), "w") as f:
        json.dump(tr.state.log_history, f)
    return tr


def test_sigkill_and_resume_in_subprocesses(tmp_path):
    """A training process SIGKILLs itself in the middle of an optimizer step of the second epoch; a new process
    resumes from the last checkpoint. Final parameters, the losses and the last checkpoint's carries equal those of
    an uninterrupted run (in this process, meanwhile)."""
    kill_at = 5  # killed during step 6, in the second epoch
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_trainer; "
            f"test_trainer.sigkill_run(sys.argv[1], sys.argv[2], {kill_at})")

    def launch(mode):
        return subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "crash"), mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    killed = launch("kill")
    sigkill_run(str(tmp_path / "full"), "full", kill_at)
    out_killed, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, out_killed[-3000:])
    crash = tmp_path / "crash"
    assert sorted(int(p.name.split("-")[1]) for p in crash.glob("checkpoint-*"))[-1] == kill_at
    assert not (crash / "final.safetensors").exists()
    resumed = launch("resume")
    out_res, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out_res[-3000:]

    ref, got = load_file(tmp_path / "full" / "final.safetensors"), load_file(crash / "final.safetensors")
    assert_params_close(got, ref, 1e-6, "SIGKILL + resume")
    log_ref = {h["step"]: h["loss"] for h in json.loads((tmp_path / "full" / "log.json").read_text()) if "loss" in h}
    log_got = {h["step"]: h["loss"] for h in json.loads((crash / "log.json").read_text()) if "loss" in h}
    assert max(log_ref) >= kill_at + 3 and log_got.keys() == log_ref.keys()
    for s in log_got:
        assert log_got[s] == pytest.approx(log_ref[s], rel=1e-6), (s, log_got, log_ref)
    last = max(log_ref)
    carry_ref = load_file(tmp_path / "full" / f"checkpoint-{last}" / "stream_state-rank0.safetensors")["carry"]
    carry_got = load_file(crash / f"checkpoint-{last}" / "stream_state-rank0.safetensors")["carry"]
    torch.testing.assert_close(carry_got, carry_ref, rtol=0, atol=1e-6)


# ============================================================================================== 5. checkpoints
def test_checkpoint_holds_stream_state_and_mismatched_layout_resets_carries(tmp_path, monkeypatch, caplog):
    docs = make_docs(2, 14, 3, 22)
    kw = dict(mrbp_window=2, save_strategy="steps", save_steps=3, max_steps=3)
    tr = MemformerTrainer(model=make_model(0), args=targs(tmp_path, **kw), train_dataset=docs)
    tr.train()
    ckpt = tmp_path / "checkpoint-3"
    state = json.loads((ckpt / "stream_state-rank0.json").read_text())
    expected = dict(seed=0, world_size=1, rank=0, batch_size=2, grad_accum=2, streams_per_rank=4, segment_length=L,
                    window=2, boot="bos", epoch=0)
    assert {k: state.get(k) for k in expected} == expected
    assert isinstance(state.get("packer_version"), int)
    carry = load_file(ckpt / "stream_state-rank0.safetensors")["carry"]
    assert carry.dtype == torch.float32 and carry.shape == (4, TINY["num_memory_slots"], TINY["hidden_size"])
    assert not list(ckpt.glob("*.tmp*"))

    # resume with another per-device batch size (another stream layout): warn, restart carries from m0, no crash
    rec = RecordCells(monkeypatch)
    other = MemformerTrainer(model=make_model(0), train_dataset=docs,
                             args=targs(tmp_path, per_device_train_batch_size=1, **{**kw, "max_steps": 5}))
    with caplog.at_level(logging.WARNING):
        other.train(resume_from_checkpoint=str(ckpt))
    assert any("stream layout differs" in r.getMessage() for r in caplog.records), caplog.text
    assert rec.calls and rec.calls[0]["memory_in"] is not None
    m0 = MemformerForCausalLM.from_pretrained(ckpt).model.initial_memory(1).detach()  # m0 of the resumed weights
    torch.testing.assert_close(rec.calls[0]["memory_in"], m0, rtol=0, atol=1e-7)
    assert (carry[0] - m0[0]).abs().max() > 1e-3  # what a compatible resume would have restored
    assert other.state.global_step == 5
    assert all(math.isfinite(h["loss"]) for h in other.state.log_history if "loss" in h)


def test_resume_from_a_missing_or_damaged_checkpoint_names_it(tmp_path):
    """A missing checkpoint folder, no checkpoint at all for `resume_from_checkpoint=True`, and a truncated weights,
    carried-memory or optimizer file raise before anything is loaded, naming the folder or the file (regression:
    a truncated model.safetensors raised a SafetensorError that named no file)."""
    import shutil

    docs = make_docs(2, 8, 3, 22)
    kw = dict(save_strategy="steps", save_steps=2, max_steps=2)
    MemformerTrainer(model=make_model(0), args=targs(tmp_path / "run", **kw), train_dataset=docs).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    fresh = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "run", **{**kw, "max_steps": 4}),
                             train_dataset=docs)
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint .*nope: no such checkpoint folder"):
        fresh.train(resume_from_checkpoint=str(tmp_path / "nope"))
    empty = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "empty", **kw), train_dataset=docs)
    with pytest.raises(FileNotFoundError, match="No checkpoint found in output_dir"):
        empty.train(resume_from_checkpoint=True)
    for name in ("model.safetensors", "stream_state-rank0.safetensors", "optimizer.pt"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(ckpt, bad)
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(OSError, match="truncated or corrupted checkpoint file") as err:
            fresh.train(resume_from_checkpoint=str(bad))
        assert str(err.value).startswith(f"{bad / name}: "), err.value
    assert fresh.state.global_step == 0  # nothing was trained from a damaged checkpoint
    fresh.train(resume_from_checkpoint=str(ckpt))  # the intact one resumes
    assert fresh.state.global_step == 4


def test_crash_during_checkpoint_save_resumes_from_the_previous_complete_one(tmp_path, monkeypatch):
    """Checkpoints are staged in `_tmp-checkpoint-N` and renamed when complete: a crash after the model file of step
    4 is written leaves no `checkpoint-4`, resume picks `checkpoint-2` and ends with the uninterrupted parameters."""
    docs = make_docs(2, 14, 3, 22)
    kw = dict(mrbp_window=2, num_train_epochs=2, save_strategy="steps", save_steps=2, learning_rate=2e-2)
    full = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "full", **kw), train_dataset=docs)
    full.train()
    assert full.state.global_step > 6

    crash = tmp_path / "crash"
    save_rng = MemformerTrainer._save_rng_state

    def crashing(self, output_dir):  # after the model, optimizer and scheduler of step 4 are written
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash while saving")
        save_rng(self, output_dir)

    monkeypatch.setattr(MemformerTrainer, "_save_rng_state", crashing)
    part = MemformerTrainer(model=make_model(0), args=targs(crash, **kw), train_dataset=docs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        part.train()
    monkeypatch.undo()
    assert (crash / "_tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert sorted(p.name for p in crash.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(crash)) == str(crash / "checkpoint-2")

    resumed = MemformerTrainer(model=make_model(1), args=targs(crash, **kw), train_dataset=docs)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == full.state.global_step
    assert_params_close(params(resumed.model), params(full.model), 1e-6, "crash during save + resume")
    assert not list(crash.glob("_tmp-*"))  # the stale staging folder is gone
    assert {p.name for p in crash.glob("checkpoint-*")} == {p.name for p in (tmp_path / "full").glob("checkpoint-*")}
    for ckpt in crash.glob("checkpoint-*"):
        assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.pt", "rng_state.pth",
                                                    "trainer_state.json", "stream_state-rank0.safetensors"}


def test_atomic_checkpoints_keep_rotation_and_best_model(tmp_path):
    """`save_total_limit` rotation and `load_best_model_at_end` see the renamed folders: the best checkpoint path is
    the final one (also in its trainer_state.json), and at most best + latest remain."""
    docs = make_docs(2, 14, 3, 22)
    args = targs(tmp_path, mrbp_window=2, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                 eval_steps=2, save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 eval_no_memory=False, learning_rate=2e-2)
    tr = MemformerTrainer(model=make_model(0), args=args, train_dataset=docs, eval_dataset=docs[:4])
    tr.train()
    best = Path(tr.state.best_model_checkpoint)
    assert best.parent == tmp_path and best.name.startswith("checkpoint-") and best.is_dir()
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(best)
    kept = {p.name for p in tmp_path.glob("checkpoint-*")}
    assert "checkpoint-6" in kept and best.name in kept and len(kept) <= 2
    assert not list(tmp_path.glob("_tmp-*"))


# ============================================================================================== 6. evaluation
@torch.no_grad()
def reference_eval(model, docs):
    """Per-token NLLs, position in the document and the no-memory NLLs, independently of the trainer and packer.

    With memory: one stream-mode forward per document over [BOS] + doc (the boot segment and the same recurrence
    as the cells). Without: each segment decoded from the encoding of the previous one (the boot [BOS] first)
    starting from m₀ (`memory=None`), in cell mode, unpadded."""
    nll, pos, nll_nomem = [], [], []
    for doc in docs:
        ids = torch.tensor([[BOS] + doc])
        logits = model(ids).logits[0, :-1].float()
        nll.append(F.cross_entropy(logits, torch.tensor(doc), reduction="none").double())
        lm = model(ids, labels=ids).loss  # the model's own mean over the document
        torch.testing.assert_close(lm.double(), nll[-1].mean(), rtol=1e-5, atol=1e-6)
        pos.append(torch.arange(len(doc)))
        segs = [doc[i:i + L] for i in range(0, len(doc), L)]
        for j, seg in enumerate(segs):
            out = model(encoder_input_ids=torch.tensor([[BOS] if j == 0 else segs[j - 1]]),
                        decoder_input_ids=torch.tensor([[BOS] + seg[:-1]]), memory=None)
            nll_nomem.append(F.cross_entropy(out.logits[0].float(), torch.tensor(seg), reduction="none").double())
    return torch.cat(nll), torch.cat(pos), torch.cat(nll_nomem)


@pytest.mark.parametrize("eval_batch,eval_window", [(2, 2), (3, 16)])
def test_evaluate_equals_stream_forward_per_document(tmp_path, eval_batch, eval_window):
    docs = make_docs(5, 6, 1, 30) + [make_docs(6, 1, 150, 150)[0]]  # one document reaches the [64, 512) bucket
    model = make_model(0)
    tr = MemformerTrainer(model=model, train_dataset=docs[:3], eval_dataset=docs,
                          args=targs(tmp_path, per_device_eval_batch_size=eval_batch, eval_window=eval_window))
    metrics = tr.evaluate()
    nll, pos, nll_nomem = reference_eval(make_model(0).eval(), docs)
    n = sum(len(d) for d in docs)
    assert metrics["eval_tokens"] == n == nll.numel() == nll_nomem.numel()
    assert metrics["eval_loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert metrics["eval_loss_no_memory"] == pytest.approx(nll_nomem.mean().item(), rel=1e-5)
    assert metrics["eval_ppl_no_memory"] == pytest.approx(math.exp(nll_nomem.mean().item()), rel=1e-5)
    assert abs(metrics["eval_loss"] - metrics["eval_loss_no_memory"]) > 1e-3  # the memory matters here
    for lo, hi, name in ((0, 64, "0-64"), (64, 512, "64-512")):
        sel = (pos >= lo) & (pos < hi)
        assert metrics[f"eval_ppl_pos_{name}"] == pytest.approx(math.exp(nll[sel].mean().item()), rel=1e-5)
    assert not any(k.startswith("eval_ppl_pos_512") for k in metrics)
    # the model is left as it was and evaluating again gives the same numbers
    assert tr.evaluate()["eval_loss"] == metrics["eval_loss"]
    assert any("eval_loss" in h for h in tr.state.log_history)


@torch.no_grad()
def test_eval_foreign_memory_reads_the_other_documents_memory(tmp_path):
    """`eval_foreign_memory`: every cell of one document reads the memory the other stream carries into the same cell
    (document starts read m₀), against a reference built in cell mode from each document's carried memories."""
    a, b = make_docs(9, 2, 4 * L, 4 * L)  # two documents of equal length: one per stream, cells aligned
    model = make_model(0).eval()
    tr = MemformerTrainer(model=model, train_dataset=[a, b],
                          args=targs(tmp_path, per_device_eval_batch_size=2, eval_window=2, eval_foreign_memory=True))
    metrics = tr.evaluate([a, b])

    def cells(doc):
        segs = [doc[i:i + L] for i in range(0, len(doc), L)]
        return [([BOS] if j == 0 else segs[j - 1], [BOS] + seg[:-1], seg) for j, seg in enumerate(segs)]

    def carried(doc):  # the memory each cell reads, carried through the document from m0
        mems, mem = [], None
        for enc, dec, _ in cells(doc):
            mems.append(mem)
            mem = model(encoder_input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec]), memory=mem).memory
        return mems

    nll = []
    for doc, other in ((a, b), (b, a)):
        for (enc, dec, seg), mem in zip(cells(doc), carried(other)):
            out = model(encoder_input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec]), memory=mem)
            nll.append(F.cross_entropy(out.logits[0].float(), torch.tensor(seg), reduction="none").double())
    foreign = torch.cat(nll).mean().item()
    assert metrics["eval_loss_foreign_memory"] == pytest.approx(foreign, rel=1e-5)
    assert abs(foreign - metrics["eval_loss"]) > 1e-4 and abs(foreign - metrics["eval_loss_no_memory"]) > 1e-4
    tr.args.per_device_eval_batch_size = 1
    with pytest.raises(ValueError, match="eval_foreign_memory needs at least 2 evaluation streams"):
        tr.evaluate([a, b])


def test_padding_labels_and_a_leading_bos_are_read_as_the_model_reads_them(tmp_path):
    """A padded dataset (`attention_mask`, `labels` with -100 on the pads) trains and evaluates on its real tokens
    only, never on the pads; `labels` that mask real tokens cannot be honoured (every token is a target) and are
    refused naming the document; a leading BOS is the document's boot, as in the model's stream mode, not a target."""
    datasets = pytest.importorskip("datasets")
    docs = make_docs(5, 4, 5, 30)
    width = max(map(len, docs)) + 3
    padded = {"input_ids": [d + [PAD] * (width - len(d)) for d in docs],
              "attention_mask": [[1] * len(d) + [0] * (width - len(d)) for d in docs],
              "labels": [d + [-100] * (width - len(d)) for d in docs]}
    plain = MemformerTrainer(model=make_model(0), train_dataset=docs, args=targs(tmp_path / "a"))
    read = MemformerTrainer(model=make_model(0), train_dataset=datasets.Dataset.from_dict(padded),
                            args=targs(tmp_path / "b"))
    assert torch.equal(read.train_dataset._doc_flat, plain.train_dataset._doc_flat)
    reference = plain.evaluate(docs)
    for other in (datasets.Dataset.from_dict(padded), [[BOS] + d for d in docs]):
        metrics = plain.evaluate(other)
        assert metrics["eval_tokens"] == reference["eval_tokens"] == sum(map(len, docs))
        assert metrics["eval_loss"] == reference["eval_loss"]
    # every entry point reads a leading BOS the same way, and tensors / NumPy arrays as lists (evaluating fewer
    # documents than the training streams is no reason for a warning)
    sums = plain.evaluate_documents(docs)["eval_loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for other in ([[BOS] + d for d in docs], [torch.tensor(d) for d in docs], [np.array(d) for d in docs]):
            assert plain.evaluate_documents(other)["eval_loss"] == sums
        plain.evaluate(docs[:1])
    masked = {**padded, "labels": [list(x) for x in padded["labels"]]}
    masked["labels"][1][2] = -100
    with pytest.raises(ValueError, match=r"train_dataset: document 1: its `labels` differ from its `input_ids`"):
        MemformerTrainer(model=make_model(0), train_dataset=datasets.Dataset.from_dict(masked),
                         args=targs(tmp_path / "c"))


@pytest.mark.parametrize("mode", ["non_padding", "all"])
def test_num_input_tokens_seen_counts_the_documents_tokens(tmp_path, mode):
    """`include_num_input_tokens_seen` counted 0 (the batches have no `input_ids`): one epoch sees every document
    token once (`non_padding`), or every decoder position of every window, padding included (`all`)."""
    docs = make_docs(9, 6, 5, 40)
    tr = MemformerTrainer(model=make_model(0), train_dataset=docs,
                          args=targs(tmp_path, include_num_input_tokens_seen=mode))
    tr.train()
    batches = [tr.train_dataset[i] for i in range(len(tr.train_dataset))]
    expected = (sum(map(len, docs)) if mode == "non_padding" else sum(b["decoder_input_ids"].numel() for b in batches))
    assert tr.state.num_input_tokens_seen == expected > 0
    assert mode == "non_padding" or expected > sum(map(len, docs))


def test_fewer_documents_than_streams_warns_and_predict_explains(tmp_path):
    """Streams without a document only hold padding (their forward and backward passes are wasted): a warning says
    so and how to avoid it. `predict` (per-example outputs) says what to use instead of failing inside transformers."""
    docs = make_docs(7, 3, 5, 30)
    with pytest.warns(UserWarning, match=r"3 document\(s\) for 4 parallel streams .*1 stream\(s\) hold only padding"):
        tr = MemformerTrainer(model=make_model(0), train_dataset=docs, args=targs(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MemformerTrainer(model=make_model(0), train_dataset=docs + make_docs(8, 1, 5, 30), args=targs(tmp_path))
    with pytest.raises(NotImplementedError, match=r"predict is not supported.*trainer.evaluate\(documents\)"):
        tr.predict(docs)


class RecordEvaluation(TrainerCallback):
    """What callbacks (and so the `report_to` loggers, which are callbacks) see of evaluations."""

    def __init__(self):
        self.evaluated, self.logged = [], []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluated.append((state.global_step, dict(metrics)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append((state.global_step, dict(logs)))


def test_evaluation_metrics_reach_callbacks_loggers_and_compute_metrics(tmp_path, capsys):
    """`compute_metrics` gets the token sums ([variants, buckets] summed NLL / targets) and the trainer's metrics;
    what it returns is prefixed and joins them; callbacks get all of them in `on_evaluate` and `on_log`, for an
    `evaluate()` call and for an evaluation during training. A progress bar shows unless `disable_tqdm`."""
    docs = make_docs(5, 6, 1, 30) + [make_docs(6, 1, 150, 150)[0]]
    calls = []

    def compute_metrics(p):
        calls.append(p)
        return {"nll_from_sums": float(p.predictions[0].sum() / p.label_ids[0].sum()),
                "eval_targets_no_memory": int(p.label_ids[1].sum()), "as_tensor": torch.tensor(1.5)}

    rec = RecordEvaluation()
    args = targs(tmp_path, per_device_eval_batch_size=2, eval_window=2, max_steps=2, eval_strategy="steps",
                 eval_steps=2)
    tr = MemformerTrainer(model=make_model(0), train_dataset=docs[:4], eval_dataset=docs, args=args, callbacks=[rec],
                          compute_metrics=compute_metrics)
    metrics = tr.evaluate()
    p = calls[-1]
    assert p.variants == ("", "_no_memory") and p.predictions.shape == p.label_ids.shape == (2, 5)
    assert p.label_ids[:, :2].sum(1).tolist() == [metrics["eval_tokens"]] * 2 and not p.label_ids[:, 2:].any()
    predictions, label_ids = p  # unpacks like any EvalPrediction
    assert predictions is p.predictions and label_ids is p.label_ids
    assert p.metrics["eval_loss"] == metrics["eval_loss"]
    assert metrics["eval_nll_from_sums"] == pytest.approx(metrics["eval_loss"], rel=1e-12)
    assert metrics["eval_targets_no_memory"] == metrics["eval_tokens"] and metrics["eval_as_tensor"] == 1.5
    # the same perplexity metrics as without compute_metrics, which `evaluate_documents` gives alone
    assert tr.evaluate_documents(docs) == {k: v for k, v in metrics.items() if k in p.metrics}
    assert rec.evaluated[-1] == (0, metrics)
    assert rec.logged[-1] == (0, metrics)

    tr.train()
    assert len(calls) == 2
    step, during = rec.evaluated[-1]
    assert step == 2 and {"eval_loss", "eval_ppl_pos_64-512", "eval_nll_from_sums"} <= during.keys()
    assert (2, during) in rec.logged
    assert any(h.get("eval_nll_from_sums") == during["eval_nll_from_sums"] for h in tr.state.log_history)

    capsys.readouterr()
    tr.args.disable_tqdm = False
    tr.evaluate_documents(docs[:2])
    assert "Evaluating" in capsys.readouterr().err
    tr.args.disable_tqdm = True
    tr.evaluate_documents(docs[:2])
    assert "Evaluating" not in capsys.readouterr().err


def test_carried_memory_store(tmp_path, caplog):
    """Rows by global stream id (rank 1 owns streams 4..7), m₀ once on the first get, save / load of a checkpoint
    folder, and a layout mismatch or a missing state leaves the store empty."""
    store = trainer_module.CarriedMemory(first_stream=4, num_streams=4, rank=1)
    made = []

    def initial(n):
        made.append(n)
        return torch.zeros(n, 3, 2)

    ids = torch.tensor([6, 4])
    assert torch.equal(store.get(ids, initial), torch.zeros(2, 3, 2)) and made == [4]
    store.put(ids, torch.ones(2, 3, 2, dtype=torch.float64))
    assert store.memory.dtype == torch.float32 and store.memory[[0, 2]].eq(1).all() and store.memory[[1, 3]].eq(0).all()
    assert torch.equal(store.get(torch.tensor([5, 6]), initial)[1], torch.ones(3, 2)) and made == [4]

    store.save(str(tmp_path), {"world_size": 2})
    assert {p.name for p in tmp_path.iterdir()} == {"stream_state-rank1.safetensors", "stream_state-rank1.json"}
    again = trainer_module.CarriedMemory(first_stream=4, num_streams=4, rank=1)
    assert again.load(str(tmp_path), lambda layout: layout == {"world_size": 2}, torch.device("cpu"))
    assert torch.equal(again.memory, store.memory)
    with caplog.at_level(logging.WARNING):
        other = trainer_module.CarriedMemory(first_stream=4, num_streams=4, rank=1)
        assert not other.load(str(tmp_path), lambda layout: False, torch.device("cpu")) and other.memory is None
        rank0 = trainer_module.CarriedMemory(first_stream=0, num_streams=4, rank=0)
        assert not rank0.load(str(tmp_path), lambda layout: True, torch.device("cpu")) and rank0.memory is None
    assert "stream layout differs" in caplog.text and "no carried-memory state" in caplog.text


# ============================================================================================== 7. mixed precision
@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_autocast_on_cpu(tmp_path, monkeypatch, precision):
    """`bf16=True` on CPU: the cells run under autocast (a Linear inside the recomputed cells emits bf16), the
    carried memory stays fp32, and the losses stay finite and close to the fp32 run's."""
    docs = make_docs(2, 10, 3, 22)
    kw = dict(mrbp_window=3, max_steps=4, learning_rate=1e-2)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    try:
        args = targs(tmp_path / precision, **{precision: True}, **kw)
        model = make_model(0)
        tr = MemformerTrainer(model=model, args=args, train_dataset=docs)
    except (ValueError, ImportError) as e:  # pragma: no cover - depends on the accelerate / torch build
        pytest.skip(f"{precision} on CPU is not supported by this transformers/accelerate/torch build: {e}")
    seen = set()
    model.model.encoder.layers[0].ffn.fc1.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    rec = RecordCells(monkeypatch)
    tr.train()
    assert half in seen, seen
    assert all(c["memory_out"].dtype == torch.float32 for c in rec.calls)
    assert tr.carried_memory.memory.dtype == torch.float32
    got = logged_losses(tr)
    ref = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "fp32", **kw), train_dataset=docs)
    ref.train()
    fp32 = logged_losses(ref)
    assert got.keys() == fp32.keys() == {1, 2, 3, 4}
    for s in fp32:
        assert math.isfinite(got[s]) and got[s] == pytest.approx(fp32[s], rel=5e-2), (got, fp32)
    assert any(got[s] != fp32[s] for s in fp32)  # it really ran in another precision


def test_evaluation_runs_under_the_mixed_precision_it_is_given(tmp_path):
    """`bf16=True`: a Trainer that only evaluates (as `memformer-hf eval --bf16 true`) evaluates under autocast,
    as one that trained does (it evaluated in float32 before: only the training cells entered accelerate's
    autocast)."""
    docs = make_docs(2, 6, 3, 22)
    try:
        tr = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "bf16", bf16=True), eval_dataset=docs)
    except (ValueError, ImportError) as e:  # pragma: no cover - depends on the accelerate / torch build
        pytest.skip(f"bf16 on CPU is not supported by this transformers/accelerate/torch build: {e}")
    seen = set()
    tr.model.model.encoder.layers[0].ffn.fc1.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    got = tr.evaluate()
    assert torch.bfloat16 in seen, seen
    ref = MemformerTrainer(model=make_model(0), args=targs(tmp_path / "fp32"), eval_dataset=docs).evaluate()
    assert got["eval_ppl"] == pytest.approx(ref["eval_ppl"], rel=5e-2) and got["eval_ppl"] != ref["eval_ppl"]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fp16 needs CUDA: on CPU accelerate applies neither fp16 autocast nor a GradScaler "
                           "(fp16=True silently trains in fp32), so the loss scaling / memory-gradient unscaling "
                           "path cannot run")
def test_fp16_grad_scaler_on_cuda(tmp_path, monkeypatch):  # pragma: no cover - CPU CI
    docs = make_docs(2, 10, 3, 22)
    tr = MemformerTrainer(model=make_model(0), train_dataset=docs,
                          args=targs(tmp_path, fp16=True, use_cpu=False, mrbp_window=3, max_steps=4))
    assert tr.accelerator.scaler is not None
    rec = RecordCells(monkeypatch)
    tr.train()
    assert all(c["memory_out"].dtype == torch.float32 for c in rec.calls)
    assert all(math.isfinite(v) for v in logged_losses(tr).values())


# ============================================================================================== 8. bad input
def test_bad_arguments_raise(tmp_path):
    model = make_model(0)
    docs = make_docs(0, 4, 3, 10)
    with pytest.raises(TypeError, match="MemformerTrainingArguments"):
        MemformerTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                         train_dataset=docs)
    for bad in ("some text", ["a document", "another"], {"input_ids": docs}, 42):
        with pytest.raises(ValueError, match="train_dataset"):
            MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=bad)
    with pytest.raises(ValueError, match="eval_dataset"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs, eval_dataset="text")
    with pytest.raises(ValueError, match="mrbp_window"):
        targs(tmp_path, mrbp_window=0)
    with pytest.raises(ValueError, match="training_mode"):
        targs(tmp_path, training_mode="x")
    with pytest.raises(ValueError, match="mrbp_loss_weighting"):
        targs(tmp_path, mrbp_loss_weighting="mean")
    with pytest.raises(ValueError, match="eval_window"):
        targs(tmp_path, eval_window=0)
    # a ready StreamBatches with another layout than the run's
    wrong = StreamBatches(docs, segment_length=L, window=2, batch_size=3, grad_accum=2, bos_token_id=BOS,
                          pad_token_id=PAD)
    with pytest.raises(ValueError, match="layout"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=wrong)
    # no eval documents
    tr = MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs)
    with pytest.raises(ValueError, match="eval"):
        tr.evaluate()


def test_tokenizer_or_token_ids_beyond_vocab_raise(tmp_path):
    """A tokenizer larger than the embedding, or data with ids >= vocab_size, fails at construction (or at
    evaluation), naming both sizes, instead of at some later training step."""
    model, vocab = make_model(0), TINY["vocab_size"]
    docs = make_docs(0, 4, 3, 10)
    bad = docs[:2] + [docs[2] + [vocab]]
    with pytest.raises(ValueError, match=rf"tokenizer has {vocab + 10} tokens but the model's vocab_size is {vocab}"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs, processing_class=word_tokenizer(60))
    MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs, processing_class=word_tokenizer(vocab))
    with pytest.raises(ValueError, match=rf"train_dataset hold token id {vocab} but the model's vocab_size is {vocab}"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=bad)
    packed = StreamBatches(bad, segment_length=L, window=2, batch_size=2, grad_accum=2, bos_token_id=BOS,
                           pad_token_id=PAD)
    with pytest.raises(ValueError, match=rf"token id {vocab} but the model's vocab_size is {vocab}"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=packed)
    with pytest.raises(ValueError, match=rf"eval_dataset hold token id {vocab + 5}"):
        MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs, eval_dataset=[[3, vocab + 5]])
    tr = MemformerTrainer(model=model, args=targs(tmp_path), train_dataset=docs)
    with pytest.raises(ValueError, match=rf"eval documents hold token id {vocab} but the model's vocab_size"):
        tr.evaluate_documents(bad)


def test_datasets_dataset_input(tmp_path):
    """A `datasets.Dataset` with an `input_ids` column packs exactly like the list of documents."""
    datasets = pytest.importorskip("datasets")
    docs = make_docs(2, 10, 3, 22)
    a = MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=docs)
    b = MemformerTrainer(model=make_model(0), args=targs(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"input_ids": docs}))
    assert len(a.train_dataset) == len(b.train_dataset)
    for k in range(len(a.train_dataset)):
        x, y = a.train_dataset[k], b.train_dataset[k]
        assert all(torch.equal(x[key], y[key]) for key in x)
    with pytest.raises(ValueError, match="input_ids"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"text": ["a", "b"]}))



def test_eval_sets_by_name_as_the_trainer(tmp_path):
    """`eval_dataset={"a": ds1, "b": ds2}` (and a `DatasetDict`, a dict of splits) evaluates each set as the Trainer
    does: metrics prefixed `eval_a_...`, each equal to evaluating that set alone, also during training; it used to be
    refused ("got dict"). `evaluate("a")` picks one set by name."""
    datasets = pytest.importorskip("datasets")
    docs_a, docs_b = make_docs(3, 4, 3, 30), make_docs(4, 3, 3, 30)
    rec = RecordEvaluation()
    args = targs(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1)
    tr = MemformerTrainer(model=make_model(0), args=args, train_dataset=docs_a, callbacks=[rec],
                          eval_dataset={"a": docs_a, "b": datasets.Dataset.from_dict({"input_ids": docs_b})})
    ref_a, ref_b = tr.evaluate_documents(docs_a), tr.evaluate_documents(docs_b)
    metrics = tr.evaluate()
    assert metrics["eval_a_loss"] == ref_a["eval_loss"] and metrics["eval_b_loss"] == ref_b["eval_loss"]
    assert metrics["eval_a_tokens"] == sum(map(len, docs_a)) and metrics["eval_b_tokens"] == sum(map(len, docs_b))
    assert not any(k.startswith("eval_loss") for k in metrics)
    assert tr.evaluate("b")["eval_loss"] == ref_b["eval_loss"]
    split = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"input_ids": docs_b})})
    assert tr.evaluate(split)["eval_validation_loss"] == ref_b["eval_loss"]
    tr.train()
    (step_a, during_a), (step_b, during_b) = rec.evaluated[-2:]  # one on_evaluate per set, as in the Trainer
    assert step_a == step_b == 1 and "eval_a_loss" in during_a and "eval_b_loss" in during_b
    with pytest.raises(ValueError, match=r"eval_dataset 'c' is not one of the trainer's eval sets \['a', 'b'\]"):
        tr.evaluate("c")
    with pytest.raises(ValueError, match=r"eval_dataset\['b'\]: document 0 holds float32"):
        tr.evaluate({"a": docs_a, "b": [[3.5, 4.0]]})
    with pytest.raises(ValueError, match="dict of columns"):
        tr.evaluate({"input_ids": docs_a})


def test_datasets_dataset_dicts_and_streamed_eval_sets(tmp_path):
    """A `DatasetDict` (or `IterableDatasetDict`) passed as train_dataset is refused naming its splits (it was "needs
    an `input_ids` column ... it has {'train': ['input_ids']}"); a streamed eval set is read whole, also when its
    columns are unknown until read (`IterableDataset.from_generator`: a TypeError before), evaluating like the list."""
    datasets = pytest.importorskip("datasets")
    docs = make_docs(2, 5, 3, 22)
    ds = datasets.Dataset.from_dict({"input_ids": docs})
    for split in (datasets.DatasetDict({"train": ds}), datasets.IterableDatasetDict({"train": ds.to_iterable_dataset()})):
        with pytest.raises(ValueError, match=r"train_dataset: a \w*DatasetDict of the splits \['train'\]; pass one "
                                             r"split, e.g. train_dataset=dataset\['train'\]"):
            MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=split)
    tr = MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=docs)
    reference = tr.evaluate_documents(docs)["eval_loss"]

    def rows():
        yield from ({"input_ids": d, "attention_mask": [1] * len(d)} for d in docs)

    streamed = datasets.IterableDataset.from_generator(rows)
    assert streamed.column_names is None
    assert tr.evaluate(streamed)["eval_loss"] == reference
    assert tr.evaluate(ds.to_iterable_dataset())["eval_loss"] == reference
    with pytest.raises(ValueError, match=r"eval_dataset: a datasets.IterableDataset needs an `input_ids` column .*"
                                         r"row 0 has \['text'\]"):
        tr.evaluate(datasets.IterableDataset.from_generator(lambda: iter([{"text": "w3 w4"}])))


def test_a_data_collator_is_refused(tmp_path):
    """The packer builds the batches, so a user's `data_collator` (e.g. `DataCollatorForLanguageModeling`) was
    silently never called; it is refused, saying so."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(word_tokenizer(50), mlm=False)
    with pytest.raises(ValueError, match="data_collator is not supported: the batches are windows of cells"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=make_docs(2, 5, 3, 22),
                         data_collator=collator)


def test_non_integer_token_ids_are_refused(tmp_path):
    """Float token ids (train, eval, a `datasets.Dataset` column, `evaluate_documents`) are a ValueError naming the
    document; they used to be truncated (5.7 -> 5) and trained on."""
    datasets = pytest.importorskip("datasets")
    docs = make_docs(2, 3, 3, 22)
    bad = [*docs[:2], [0, 5.7, 9.9, 20.99]]
    message = "document 2 holds float32 values such as 5.7; token ids must be integers"
    with pytest.raises(ValueError, match=f"train_dataset: {message}"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=bad)
    with pytest.raises(ValueError, match=f"eval_dataset: {message}"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=docs, eval_dataset=bad)
    # Arrow gives the whole column one type: every document is float, the first one is named
    with pytest.raises(ValueError, match=r"train_dataset: document 0 holds float32 values such as \d+\.0; token ids"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"input_ids": bad}))
    tr = MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=docs)
    with pytest.raises(ValueError, match="holds float32 values such as 5.7"):
        tr.evaluate_documents(bad)
    # documents nested one level too deep were flattened into one; NumPy arrays are documents like lists
    with pytest.raises(ValueError, match=r"train_dataset: document 1 has shape \(2, 2\); a document is one flat"):
        MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=[docs[0], [[3, 4], [5, 6]]])
    as_arrays = MemformerTrainer(model=make_model(0), args=targs(tmp_path), train_dataset=[np.array(d) for d in docs])
    assert torch.equal(as_arrays.train_dataset._doc_flat, tr.train_dataset._doc_flat)


# ============================================================================================== 9. DDP
DDP_DOCS = dict(seed=7, n=10, lo=3, hi=22)
# SGD: Adam's normalisation would turn the rounding noise of all-reduce order on near-zero gradients into ±lr
# (and no clipping, which would hide a gradient scale error)
DDP_KW = dict(gradient_accumulation_steps=2, mrbp_window=2, max_steps=2, learning_rate=0.5, optim="sgd",
              max_grad_norm=0.0, per_device_eval_batch_size=2, eval_window=3)

DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from test_trainer import DDP_DOCS, DDP_KW, make_docs, make_model, targs
    from memformer_hf.trainer_memformer import MemformerTrainer

    out = sys.argv[1]
    docs = make_docs(**DDP_DOCS)
    args = targs(out, per_device_train_batch_size=1, ddp_backend="gloo", **DDP_KW)
    tr = MemformerTrainer(model=make_model(0), args=args, train_dataset=docs, eval_dataset=docs[:7])
    assert tr.args.world_size == 2, tr.args.world_size
    tr.train()
    metrics = tr.evaluate()
    rank = tr.args.process_index
    carry = tr.carried_memory.memory.cpu().contiguous()
    save_file({{"carry": carry}}, os.path.join(out, f"carry{{rank}}.safetensors"))
    if rank == 0:
        save_file({{k: v.detach().contiguous() for k, v in tr.model.named_parameters()}},
                  os.path.join(out, "params.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(dict(log=tr.state.log_history, metrics=metrics), f)
""")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One 2-rank torchrun (gloo, per-device batch 1) and one single process (batch 2), same global batch."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = Torchrun(script, tmp / "ddp")
    # the single-process run meanwhile, in this process
    docs = make_docs(**DDP_DOCS)
    single = MemformerTrainer(model=make_model(0), args=targs(tmp / "single", per_device_train_batch_size=2, **DDP_KW),
                              train_dataset=docs, eval_dataset=docs[:7])
    single.train()
    single_metrics = single.evaluate()
    run.wait(timeout=180)
    return tmp / "ddp", single, single_metrics


def test_ddp_two_ranks_equal_single_process(ddp_runs):
    """Streams are dealt globally (rank r owns [r·S, (r+1)·S)), so 2 ranks × batch 1 see the streams of 1 process ×
    batch 2: after 2 optimizer steps (GA 2, MRBP window 2) parameters and each rank's carries are equal, and the
    gathered evaluation equals the single-process one."""
    ddp, single, single_metrics = ddp_runs
    got, ref = load_file(ddp / "params.safetensors"), params(single.model)
    assert_params_close(got, ref, 1e-6, "DDP vs single")
    init = make_model(0).state_dict()
    assert max((v - init[k]).abs().max().item() for k, v in ref.items()) > 0.05
    S = single.train_dataset.streams_per_rank // 2
    for rank in range(2):
        carry = load_file(ddp / f"carry{rank}.safetensors")["carry"]
        ref = single.carried_memory.memory[rank * S:(rank + 1) * S]
        torch.testing.assert_close(carry, ref, rtol=0, atol=1e-5)
    metrics = json.loads((ddp / "result.json").read_text())["metrics"]
    assert metrics["eval_tokens"] == single_metrics["eval_tokens"]
    for key in ("eval_loss", "eval_loss_no_memory"):
        assert metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key


def test_ddp_logged_loss_equals_single_process(ddp_runs):
    ddp, single, _ = ddp_runs
    log = json.loads((ddp / "result.json").read_text())["log"]
    got = {h["step"]: h["loss"] for h in log if "loss" in h}
    ref = logged_losses(single)
    assert got.keys() == ref.keys() == {1, 2}
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (got, ref)


def test_data_seed_zero_is_the_stream_seed(tmp_path):
    """`data_seed=0` deals the documents with seed 0 whatever `seed` is (regression: `data_seed or seed` read 0 as
    unset, so the order followed `seed`); unset, the stream seed is `seed`."""
    docs = make_docs(3, 12, 3, 22)
    zero = MemformerTrainer(model=make_model(0), args=targs(tmp_path, seed=5, data_seed=0), train_dataset=docs)
    unset = MemformerTrainer(model=make_model(0), args=targs(tmp_path, seed=5, data_seed=None), train_dataset=docs)
    assert zero.train_dataset.seed == 0 and unset.train_dataset.seed == 5
    ref = StreamBatches(docs, segment_length=L, window=2, batch_size=2, grad_accum=2, seed=0, bos_token_id=BOS,
                        pad_token_id=PAD)
    assert zero.train_dataset.stream_documents == ref.stream_documents != unset.train_dataset.stream_documents


def test_training_keeps_the_models_use_cache(tmp_path):
    """The stock Trainer sets `model.config.use_cache = args.use_cache` (False by default) and never sets it back, so
    every folder a MemformerTrainer saved (checkpoints, `save_model`, the `memformer-hf train` output) said
    `use_cache: false`: `model(ids)` of the reloaded model returned no cache, so a loop that carries
    `out.past_key_values` into the next call silently restarted the memory at every call. The model's own setting now
    survives training and saving."""
    from memformer_hf.modeling_memformer import CACHE_KWARG

    model = make_model(0)
    trainer = MemformerTrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=make_docs(1, 4, 10, 30))
    assert model.config.use_cache is True
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["use_cache"] is True
    reloaded = MemformerForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[BOS, *range(3, 3 + 2 * L)]])
    with torch.no_grad():
        cache = reloaded(ids)[CACHE_KWARG]
        assert cache.get_seq_length() == ids.shape[1]
        split = reloaded(ids[:, L:], **{CACHE_KWARG: reloaded(ids[:, :L])[CACHE_KWARG]}).logits
        torch.testing.assert_close(split, reloaded(ids).logits[:, L:], rtol=1e-5, atol=1e-5)
