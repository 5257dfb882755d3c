"""Core Memformer modeling tests (issue 2): stream equivalence, writer invariants, resets, gradients, save/load,
remote code, input validation, left padding and gradient checkpointing. CPU only, tiny sharp models."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import _P, reference_encode, reference_initial_memory, reference_stream, reference_writer
from helpers import (
    BOS,
    PAD,
    assert_config_refused,
    build_tiny_memformer,
    cache_tensors,
    decode_columns,
    left_pad,
    rand_ids,
    tiny_memformer_config,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from memformer_hf import MemformerCache, MemformerConfig, MemformerForCausalLM, MemformerModel
from memformer_hf.configuration_memformer import BOOLEAN_FIELDS
from memformer_hf.modeling_memformer import CACHE_KWARG

L = 4  # segment_length of the tiny config
_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2])
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ================================================================================================ helpers

def run_chunks(model, ids: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None):
    """Feed `ids` in consecutive chunks, carrying the returned cache; the mask passed is the full 2-D mask of the
    columns seen so far (as generate() does). Returns logits [B, n, V] and the final cache."""
    assert sum(sizes) == ids.shape[1]
    cache, logits, pos = None, [], 0
    for s in sizes:
        am = None if mask is None else mask[:, : pos + s]
        out = model(ids[:, pos: pos + s], attention_mask=am, past_key_values=cache, use_cache=True)
        cache = out[CACHE_KWARG]
        logits.append(out.logits)
        pos += s
    return torch.cat(logits, 1), cache


def unit_memory(batch: int, seed: int, dtype=torch.float64, k: int = 3, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, k, d, generator=g, dtype=dtype)
    return m / m.norm(dim=-1, keepdim=True)


def needs_eager_path(pe: str, attn: str) -> bool:
    return attn == "eager" or pe == "simplified_rpe"


# ================================================================================== 1. stream equivalence
STREAM_N = 18  # "bos": boot + 4 full segments + 1; "empty": 4 full segments + 2 → ≥ 4 boundaries
CHUNKS = [3, 1, 5, 2, 7]


def _equivalence_params():
    out = []
    for pe in ("rope", "simplified_rpe"):
        for boot in ("bos", "empty"):
            for attn in ("eager", "sdpa"):
                out.append(pytest.param(pe, boot, attn, id=f"{pe}-{boot}-{attn}"))
    return out


@pytest.mark.parametrize("pe,boot,attn", _equivalence_params())
def test_stream_full_equals_tokenwise_equals_chunks_float64(pe, boot, attn):
    model = build_tiny_memformer(position_embedding_type=pe, first_segment_context=boot, attn=attn)
    assert model.config._attn_implementation == attn
    ids = rand_ids(STREAM_N, seed=1, boot=(boot == "bos"))
    with torch.no_grad():
        full = model(ids, use_cache=True)
        tok_logits, tok_cache = run_chunks(model, ids, [1] * STREAM_N)
        ch_logits, ch_cache = run_chunks(model, ids, CHUNKS)
    assert torch.isfinite(full.logits).all()
    torch.testing.assert_close(tok_logits, full.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(ch_logits, full.logits, atol=1e-10, rtol=0)
    for cache in (tok_cache, ch_cache):
        torch.testing.assert_close(cache.memory, full.memory, atol=1e-10, rtol=0)
        assert cache.consumed == STREAM_N
    torch.testing.assert_close(full[CACHE_KWARG].memory, full.memory, atol=0, rtol=0)
    assert full.memory.dtype == torch.float64
    # the memory really moved (≥ 4 writes) and the sequence crossed ≥ 3 boundaries
    m0 = reference_initial_memory(_P(model))
    assert (full.memory[0] - m0).abs().max() > 1e-2
    # eager and sdpa agree to float64 precision
    other_attn = "sdpa" if attn == "eager" else "eager"
    other = build_tiny_memformer(position_embedding_type=pe, first_segment_context=boot, attn=other_attn)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, full.logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pe", ["rope", "simplified_rpe"])
@pytest.mark.parametrize("boot", ["bos", "empty"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stream_equivalence_and_reference_float32(pe, boot, attn):
    """Same equivalences in float32 (where B1 does not bite), plus the independent reference (conftest.py)."""
    model = build_tiny_memformer(position_embedding_type=pe, first_segment_context=boot, attn=attn,
                                 dtype=torch.float32)
    if boot == "empty":  # B2 (see test_empty_boot_cross_attention_outputs_exact_zero): isolate it there
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                layer.cross_attn.o_proj.bias.zero_()
    ids = rand_ids(STREAM_N, seed=2, boot=(boot == "bos"))
    with torch.no_grad():
        full = model(ids)
        tok_logits, tok_cache = run_chunks(model, ids, [1] * STREAM_N)
        ch_logits, ch_cache = run_chunks(model, ids, CHUNKS)
    torch.testing.assert_close(tok_logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ch_logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(tok_cache.memory, full.memory, atol=1e-6, rtol=0)
    torch.testing.assert_close(ch_cache.memory, full.memory, atol=1e-6, rtol=0)
    ref_model = copy.deepcopy(model).double()
    ref_logits, ref_memory = reference_stream(ref_model, ids[0].tolist())
    torch.testing.assert_close(full.logits[0].double(), ref_logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(full.memory[0].double(), ref_memory, atol=2e-6, rtol=0)


@pytest.mark.parametrize("pe", ["rope", "simplified_rpe"])
def test_matches_independent_reference_float64(pe):
    model = build_tiny_memformer(position_embedding_type=pe, attn="sdpa")
    ids = rand_ids(STREAM_N, seed=3)
    with torch.no_grad():
        out = model(ids)
    ref_logits, ref_memory = reference_stream(model, ids[0].tolist())
    # 1e-6 rather than 1e-12 because of B1 (float32 softmax); the logits are O(1..10)
    torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.memory[0], ref_memory, atol=1e-7, rtol=0)


def test_float64_exactness():
    """A float64 model is float64 end to end (docs/design.md#numerics): eager == sdpa == reference to 1e-10."""
    eager = build_tiny_memformer(attn="eager", position_embedding_type="rope")
    sdpa = build_tiny_memformer(attn="sdpa", position_embedding_type="rope")
    ids = rand_ids(STREAM_N, seed=4)
    with torch.no_grad():
        a, b = eager(ids), sdpa(ids)
    ref_logits, ref_memory = reference_stream(eager, ids[0].tolist())
    torch.testing.assert_close(a.logits, b.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.logits[0], ref_logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.logits[0], ref_logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.memory[0], ref_memory, atol=1e-10, rtol=0)


def test_empty_boot_float64_eager_is_finite():
    model = build_tiny_memformer(attn="eager", first_segment_context="empty")
    with torch.no_grad():
        out = model(rand_ids(6, boot=False))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.memory).all()


def test_empty_boot_cross_attention_outputs_exact_zero():
    model = build_tiny_memformer(attn="sdpa", first_segment_context="empty")  # random non-zero biases
    ids = rand_ids(3, boot=False)  # stays inside the first segment: decoder sees only the empty boot context
    with torch.no_grad():
        out = model(ids)
    ref_logits, _ = reference_stream(model, ids[0].tolist())
    torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-6, rtol=0)


def test_set_attn_implementation_switches_the_path_we_run(monkeypatch):
    """`set_attn_implementation` changes which attention code our layers run (they dispatch on the shared config at
    call time): sdpa runs no eager attention, eager runs it in every attention call, and switching back gives the
    sdpa logits exactly. Also guards the eager/sdpa comparisons above."""
    import memformer_hf.modeling_memformer as mm

    model = build_tiny_memformer(attn="sdpa", dtype=torch.float32)
    ids = rand_ids(STREAM_N, seed=5)
    calls = []
    original = mm.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mm, "eager_attention_forward", spy)
    with torch.no_grad():
        sdpa = model(ids).logits
        n_sdpa = len(calls)
        model.set_attn_implementation("eager")
        eager = model(ids).logits
        n_eager = len(calls)
        model.set_attn_implementation("sdpa")
        again = model(ids).logits
    assert n_sdpa == 0 and n_eager > 0 and len(calls) == n_eager
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, sdpa, atol=0, rtol=0)


# ================================================================================== 2. writer invariants
def _writer_model(**overrides):
    return build_tiny_memformer(seed=7, **overrides)


def _orthogonal_tokens(memory: torch.Tensor, n_tok: int, heads: int, seed: int) -> torch.Tensor:
    """Random tokens [B, n_tok, d] whose every head slice is orthogonal to every slot's head slice."""
    b, _, d = memory.shape
    dw = d // heads
    g = torch.Generator().manual_seed(seed)
    tok = 3.0 * torch.randn(b, n_tok, d, generator=g, dtype=memory.dtype)
    for r in range(b):
        for h in range(heads):
            sl = slice(h * dw, (h + 1) * dw)
            q, _ = torch.linalg.qr(memory[r, :, sl].T)  # [dw, K] basis of the slots' span
            tok[r, :, sl] -= tok[r, :, sl] @ q @ q.T
    return tok


def test_writer_one_hot_self_attention_leaves_slot_unchanged_before_bmn():
    model = _writer_model()
    writer = model.model.writer
    memory = unit_memory(2, seed=1)
    tokens = _orthogonal_tokens(memory, 5, writer.num_heads, seed=2)
    captured = []
    handle = writer.norm.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().clone()))
    vb = writer.forget_bias.detach()

    def run(scale: float):
        with torch.no_grad():
            writer.q_proj.weight.copy_(scale * torch.eye(16, dtype=torch.float64))
            writer.q_proj.bias.zero_()
            writer.k_proj.weight.copy_(torch.eye(16, dtype=torch.float64))
            writer.k_proj.bias.zero_()
            captured.clear()
            return writer(memory, tokens, torch.ones(2, 5, dtype=torch.bool))

    try:
        new, probs = run(400.0)  # self score 400·|m_i^h|² ≫ token scores (exactly 0: orthogonal)
        assert len(captured) == 1
        torch.testing.assert_close(probs[..., 0], torch.ones_like(probs[..., 0]), atol=1e-12, rtol=0)
        torch.testing.assert_close(captured[0], memory, atol=1e-12, rtol=0)  # pre-BMN value == the slot
        expected = (memory + vb) / (memory + vb).norm(dim=-1, keepdim=True)
        torch.testing.assert_close(new, expected, atol=1e-12, rtol=0)
        # control: with spread attention the slot does change (the check above can fail)
        run(0.0)
        assert (captured[0] - memory).abs().max() > 1e-2
    finally:
        handle.remove()


def test_writer_with_no_valid_token_is_bmn_and_keeps_m0():
    model = _writer_model()
    writer = model.model.writer
    P = _P(model)
    vb = writer.forget_bias.detach()
    m0 = reference_initial_memory(P)
    memory = unit_memory(2, seed=3)
    tokens = torch.randn(2, 4, 16, dtype=torch.float64)
    with torch.no_grad():
        new, probs = writer(memory, tokens, torch.zeros(2, 4, dtype=torch.bool))
        torch.testing.assert_close(new, (memory + vb) / (memory + vb).norm(dim=-1, keepdim=True), atol=1e-12, rtol=0)
        torch.testing.assert_close(probs[..., 0], torch.ones_like(probs[..., 0]), atol=0, rtol=0)
        assert (probs[..., 1:] == 0).all()
        m0b = m0.expand(2, -1, -1)
        new0, _ = writer(m0b, tokens, torch.zeros(2, 4, dtype=torch.bool))
        torch.testing.assert_close(new0, m0b, atol=1e-14, rtol=0)
        new_empty, _ = writer(m0b, tokens[:, :0], None)  # zero tokens at all
        torch.testing.assert_close(new_empty, m0b, atol=1e-14, rtol=0)
        torch.testing.assert_close(model.model.initial_memory(2), m0b, atol=1e-14, rtol=0)
    # stream level: the empty boot gives M_0 = m_0 exactly (sdpa: B1 breaks the float64 eager path)
    smodel = build_tiny_memformer(seed=7, first_segment_context="empty", attn="sdpa")
    with torch.no_grad():
        out = smodel(rand_ids(2, boot=False), output_memory_states=True)
    torch.testing.assert_close(out.memory_states[-1][0], reference_initial_memory(_P(smodel)), atol=1e-14, rtol=0)


def test_repeated_bmn_without_input_converges_to_m0():
    model = _writer_model()
    writer = model.model.writer
    m0 = reference_initial_memory(_P(model))
    memory = unit_memory(1, seed=5)
    empty = torch.zeros(1, 0, 16, dtype=torch.float64)
    dists = []
    with torch.no_grad():
        for _ in range(200):
            memory, _ = writer(memory, empty, None)
            dists.append(float((memory[0] - m0).norm()))
    assert all(b <= a + 1e-15 for a, b in zip(dists, dists[1:]))
    assert dists[0] > 1e-2 and dists[-1] < 1e-9


def test_m0_is_unit_for_short_and_zero_forgetting_vectors():
    """m0 divided the forgetting vector by max(‖v‖, 1e-6), so a row shorter than 1e-6 gave a shorter slot: a valid
    `forget_bias_init_scale=1e-7` started every slot at norm ≈ 0.1, a zeroed row at 0 (docs/design.md#bmn: every
    slot lies on the unit sphere). m0 = v / ‖v‖ is now a unit vector for every nonzero row however short (float32
    too, where the squares of a 1e-30 row underflow); a zero row, which has no direction, gives (1, ..., 1) / √d.
    Other rows and their gradients are those of v / ‖v‖."""
    model = build_tiny_memformer()
    writer = model.model.writer
    with torch.no_grad():
        writer.forget_bias[0].mul_(1e-9)
        writer.forget_bias[1].zero_()
    weights = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m0 = model.model.initial_memory(1)[0]
    (m0 * weights).sum().backward()
    v = writer.forget_bias.detach().clone().requires_grad_(True)
    expected = v / v.norm(dim=-1, keepdim=True)
    (expected[[0, 2]] * weights[[0, 2]]).sum().backward()
    torch.testing.assert_close(m0[[0, 2]], expected[[0, 2]], atol=1e-15, rtol=0)
    torch.testing.assert_close(m0[1], torch.full((16,), 16 ** -0.5, dtype=torch.float64), atol=0, rtol=0)
    torch.testing.assert_close(writer.forget_bias.grad[2], v.grad[2], atol=1e-14, rtol=0)
    torch.testing.assert_close(writer.forget_bias.grad[0], v.grad[0], atol=0, rtol=1e-12)  # ~1e9: a short row turns fast
    assert (writer.forget_bias.grad[1] == 0).all()
    with torch.no_grad():
        out = model(rand_ids(9), output_memory_states=True)
    for state in out.memory_states:
        torch.testing.assert_close(state.norm(dim=-1), torch.ones(1, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    for scale in (1e-7, 1e-30):
        small = build_tiny_memformer(dtype=torch.float32, forget_bias_init_scale=scale)
        torch.testing.assert_close(small.model.initial_memory(1).norm(dim=-1), torch.ones(1, 3), atol=1e-6, rtol=0)


WRITER_VARIANTS = {
    "default": {},
    "heads4_tau0.3": dict(memory_write_heads=4, memory_write_temperature=0.3),
    "tau1": dict(memory_write_temperature=1.0),
    "learnable_tau": dict(learnable_temperature=True),
    "qk_norm": dict(memory_write_qk_norm=True, memory_write_temperature=0.1),
    "qk_norm_learnable_tau": dict(memory_write_qk_norm=True, learnable_temperature=True, memory_write_heads=4),
    "out_proj": dict(writer_out_proj=True),
    "no_forget_bias": dict(use_forget_bias=False),
    "self_bias": dict(memory_write_self_bias=1.5, forget_bias_init_scale=0.1),
    "self_bias_spread": dict(memory_write_self_bias=1.5, memory_write_self_bias_spread=3.0, forget_bias_init_scale=0.1),
}


@pytest.mark.parametrize("variant", list(WRITER_VARIANTS))
def test_writer_matches_spec_formula(variant):
    model = _writer_model(**WRITER_VARIANTS[variant])
    writer = model.model.writer
    if writer.log_temperature is not None:
        with torch.no_grad():
            writer.log_temperature.fill_(math.log(0.37))
    P = _P(model)
    memory = unit_memory(2, seed=8)
    tokens = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        new, probs = writer(memory, tokens, mask)
    for r in range(2):
        ref, ref_probs = reference_writer(P, memory[r], tokens[r][mask[r]], return_probs=True)
        torch.testing.assert_close(new[r], ref, atol=1e-12, rtol=0)
        full_probs = torch.zeros_like(probs[r])
        full_probs[..., 0] = ref_probs[..., 0]
        full_probs[..., 1:][..., mask[r]] = ref_probs[..., 1:]
        torch.testing.assert_close(probs[r], full_probs, atol=1e-12, rtol=0)
    # the stream's writer attentions / memory states come from the same formula (on the reference encoder output)
    ids = rand_ids(5, seed=10)
    with torch.no_grad():
        out = model(ids, output_memory_attentions=True, output_memory_states=True)
    assert len(out.writer_attentions) == 2 and len(out.memory_states) == 3  # boot + one full segment
    memory = reference_initial_memory(P)
    for step, seg in enumerate([[BOS], ids[0, 1:].tolist()]):
        hidden, _ = reference_encode(P, seg, memory)
        new_ref, probs_ref = reference_writer(P, memory, hidden, return_probs=True)
        got = out.writer_attentions[step][0]
        torch.testing.assert_close(got[..., : 1 + len(seg)], probs_ref, atol=1e-6, rtol=0)
        assert (got[..., 1 + len(seg):] == 0).all()
        torch.testing.assert_close(out.memory_states[step + 1][0], new_ref, atol=1e-6, rtol=0)
        memory = new_ref


# ================================================================================== 3. resets, shape, norms
def test_memory_reset_stream_mode_equals_fresh_row():
    model = build_tiny_memformer(attn="sdpa")
    first = rand_ids(10, batch=2, seed=11)
    second = rand_ids(9, batch=2, seed=12)
    with torch.no_grad():
        cache = model(first)[CACHE_KWARG]
        out = model(second, past_key_values=cache, memory_reset=torch.tensor([True, False]))
        fresh = model(second[:1])
        cont = model(torch.cat([first[1:], second[1:]], 1))
    torch.testing.assert_close(out.logits[0], fresh.logits[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.memory[0], fresh.memory[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.logits[1], cont.logits[0, 10:], atol=1e-10, rtol=0)
    torch.testing.assert_close(out.memory[1], cont.memory[0], atol=1e-10, rtol=0)
    # without the reset, row 0 is NOT the fresh row (the check above can fail)
    with torch.no_grad():
        cache2 = model(first)[CACHE_KWARG]
        no_reset = model(second, past_key_values=cache2)
    assert (no_reset.logits[0] - fresh.logits[0]).abs().max() > 1e-3
    # cache.reset_rows is the same operation
    with torch.no_grad():
        cache3 = model(first)[CACHE_KWARG]
        cache3.reset_rows(torch.tensor([True, False]))
        via_rows = model(second, past_key_values=cache3)
    torch.testing.assert_close(via_rows.logits, out.logits, atol=1e-10, rtol=0)


def test_memory_reset_cell_mode_equals_fresh_row_and_cuts_gradient():
    model = build_tiny_memformer(attn="sdpa", cls=MemformerModel)
    enc = rand_ids(L, batch=2, seed=13, boot=False)
    dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
    memory = unit_memory(2, seed=14).requires_grad_(True)
    out = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=memory, memory_reset=torch.tensor([True, False]))
    with torch.no_grad():
        fresh = model(encoder_input_ids=enc[:1], decoder_input_ids=dec[:1])  # memory=None → m0
        kept = model(encoder_input_ids=enc[1:], decoder_input_ids=dec[1:], memory=memory[1:].detach())
    torch.testing.assert_close(out.memory[0], fresh.memory[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[0], fresh.last_hidden_state[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.memory[1], kept.memory[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[1], kept.last_hidden_state[0], atol=1e-12, rtol=0)
    (out.memory.sum() + out.last_hidden_state.sum()).backward()
    assert (memory.grad[0] == 0).all() and memory.grad[1].abs().max() > 0
    assert model.writer.forget_bias.grad is not None and model.writer.forget_bias.grad.abs().max() > 0
    # m0 of the cell mode is the reference m0
    torch.testing.assert_close(model.initial_memory(1)[0], reference_initial_memory(_P(model)), atol=1e-14, rtol=0)


def test_memory_shape_constant_and_slots_unit_norm():
    model = build_tiny_memformer(attn="sdpa")
    shapes = {}
    for n_seg in (1, 10):
        ids = rand_ids(1 + n_seg * L, batch=2, seed=n_seg)
        with torch.no_grad():
            out = model(ids, output_memory_states=True)
        assert out.memory.shape == (2, 3, 16)
        assert len(out.memory_states) == n_seg + 2  # m0, boot write, one per segment
        for state in out.memory_states:
            assert state.shape == (2, 3, 16)
            torch.testing.assert_close(state.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64), atol=1e-12, rtol=0)
        shapes[n_seg] = {k: tuple(v.shape) for k, v in cache_tensors(out[CACHE_KWARG]).items()}
    assert shapes[1] == shapes[10]
    assert shapes[1]["memory"] == (2, 3, 16) and shapes[1]["layers.0.keys"] == (2, 2, L, 8)


# ================================================================================== 4. gradients, sensitivity
@pytest.mark.parametrize("overrides", [
    {},
    dict(position_embedding_type="simplified_rpe", learnable_temperature=True, writer_out_proj=True,
         normalize_memory_kv=True),
], ids=["default", "all_optional_params"])
def test_gradients_reach_every_parameter(overrides):
    model = build_tiny_memformer(attn="eager", **overrides).train()
    ids = rand_ids(1 + 3 * L + 2, batch=2, seed=15)  # loss over 4 segments: the writer matters from segment 2 on
    loss = model(ids, labels=ids).loss
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert "model.writer.forget_bias" in names and "model.writer.q_proj.weight" in names
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_loss_is_token_mean_of_shifted_nll():
    model = build_tiny_memformer(attn="sdpa")
    ids = rand_ids(11, batch=2, seed=16)
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits[:, :-1], -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    expected = -logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=0)


def test_labels_are_checked_and_any_integer_dtype_is_taken():
    """`labels` reached `F.cross_entropy` unchecked: int32 labels (valid token ids) failed there with "expected target
    dtype to be Long or Byte, but got Int", a label outside [0, vocab_size) other than -100 with "Target 50 is out
    of bounds" (on CUDA a device-side assert), float labels with a dtype error and 1-D labels with an IndexError in
    the shift. Integer labels of any width give the loss of int64 ones (also as `shift_labels`); the others are
    refused naming `labels` before the forward runs (values that are never scored are not checked)."""
    model = build_tiny_memformer(attn="sdpa")
    ids = rand_ids(11, batch=2, seed=16)
    labels = ids.clone()
    labels[0, 5] = -100
    with torch.no_grad():
        want = model(ids, labels=labels).loss
        for dtype in (torch.int32, torch.int16):
            torch.testing.assert_close(model(ids, labels=labels.to(dtype)).loss, want, rtol=0, atol=0)
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].int()
        torch.testing.assert_close(model(ids, shift_labels=shifted).loss, want, rtol=0, atol=0)
        for value in (50, -5, -1):
            bad = labels.clone()
            bad[1, 3] = value
            with pytest.raises(ValueError, match=rf"`labels` holds values outside \[0, vocab_size=50\) other than "
                                                 rf"-100.*\[{value}\]"):
                model(ids, labels=bad)
        unscored = labels.clone()
        unscored[:, 0] = 999  # column 0 is never a target (the shift); nor are padded columns
        torch.testing.assert_close(model(ids, labels=unscored).loss, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"`labels` must hold integer token ids"):
            model(ids, labels=labels.float())
        for bad in (labels[0], labels[:, :5]):
            with pytest.raises(ValueError, match=r"`labels` must have the shape of `input_ids` \(2, 11\)"):
                model(ids, labels=bad)


def test_perturbing_memory_changes_next_segment_only_after_the_boundary():
    model = build_tiny_memformer(attn="sdpa")
    prefix = rand_ids(1 + L, seed=17)  # boot + one full segment: fill == 0
    nxt = rand_ids(L + 2, seed=18, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        assert int(cache.fill[0]) == 0
        other = copy.deepcopy(cache)
        other.memory = unit_memory(1, seed=19)
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=other).logits
    # the decoder never reads memory directly: columns before the next boundary are unchanged ...
    torch.testing.assert_close(a[:, : L - 1], b[:, : L - 1], atol=1e-12, rtol=0)
    # ... and the segment encoded with the perturbed memory changes everything after it
    assert (a[:, L - 1:] - b[:, L - 1:]).abs().max() > 1e-2


# ================================================================================== 5. save / load / remote code
def test_save_pretrained_auto_classes_roundtrip(tmp_path):
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    ids = rand_ids(14, batch=2, seed=20)
    with torch.no_grad():
        expected = model(ids).logits
        expected_hidden = model.model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_memformer.py", "modeling_memformer.py",
            "cache_memformer.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "memformer"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("MemformerForCausalLM")
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state  # tied, not saved
    for key in ("model.embed_tokens.weight", "model.writer.forget_bias", "model.writer.q_proj.weight",
                "model.encoder.layers.0.memory_read.q_proj.weight", "model.encoder.norm.weight",
                "model.decoder.layers.1.cross_attn.o_proj.bias", "model.decoder.norm.bias"):
        assert key in state, key

    lm = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(lm, MemformerForCausalLM)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, MemformerModel)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(base(ids).last_hidden_state, expected_hidden, atol=1e-6, rtol=0)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(lm.state_dict()[name], p, atol=0, rtol=0)


_REMOTE_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    # argv[1]: folders (os.pathsep-separated) whose contents must not be importable: the checkout. Compare whole path
    # components: a venv at /tmp/x-venv is not inside a checkout at /tmp/x, although its path starts with it.
    hidden = [Path(os.path.realpath(p)) for p in sys.argv[1].split(os.pathsep)]
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in (getattr(f, "__name__", "") + type(f).__module__).lower()]
    sys.path[:] = [p for p in sys.path
                   if not any(Path(os.path.realpath(p or ".")).is_relative_to(h) for h in hidden)]
    try:
        import memformer_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("memformer_hf is importable in the remote-code subprocess")
    import torch
    from transformers import AutoModelForCausalLM
    folder = sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"), trust_remote_code=True).eval()
    assert "memformer_hf" not in sys.modules, "memformer_hf was imported"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    data = torch.load(os.path.join(folder, "inputs.pt"))
    with torch.no_grad():
        logits = model(data["ids"]).logits
    torch.save({"logits": logits, "module": type(model).__module__}, os.path.join(folder, "outputs.pt"))
""")


def test_remote_code_load_in_fresh_process(tmp_path):
    """The saved folder loads as remote code in a process where `memformer_hf` is not importable. The checkout is
    hidden by path components, not by string prefix: here also a folder whose path is a string prefix of the
    site-packages folder (as a checkout /tmp/x is of a venv /tmp/x-venv) is hidden, and torch must still import."""
    site_packages = str(Path(torch.__file__).resolve().parents[1])
    string_prefix = site_packages[:-2]  # e.g. .../site-packag: a prefix of the string, not a parent folder
    assert site_packages.startswith(string_prefix) and not Path(site_packages).is_relative_to(string_prefix)
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    ids = rand_ids(13, batch=2, seed=21)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "model")
    torch.save({"ids": ids}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(script), os.pathsep.join([str(REPO_ROOT), string_prefix]),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = torch.load(tmp_path / "outputs.pt")
    assert result["module"].startswith("transformers_modules")
    torch.testing.assert_close(result["logits"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("missing,overrides", [
    ("model.writer.forget_bias", {}),
    ("model.encoder.layers.0.self_attn.rel_pos.weight", dict(position_embedding_type="simplified_rpe")),
    ("model.writer.log_temperature", dict(learnable_temperature=True, memory_write_temperature=0.25)),
])
def test_missing_parameter_initialises_finite(tmp_path, missing, overrides):
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa", **overrides)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert missing in state
    del state[missing]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=rf"tensor names do not match MemformerForCausalLM \(missing {missing}\)"):
        MemformerForCausalLM.from_pretrained(tmp_path)  # strict by default: no partly loaded model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, info = MemformerForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
        loaded.eval()
    assert info["missing_keys"] == {missing} and not info["unexpected_keys"]
    p = loaded.state_dict()[missing]
    assert torch.isfinite(p).all(), f"{missing} loaded as non-finite"
    assert p.abs().max() < 10, f"{missing} loaded as garbage ({p.abs().max()})"
    if missing.endswith("log_temperature"):
        assert abs(float(p) - math.log(0.25)) < 1e-6
    else:
        assert p.std() > 1e-3  # a real random init, not zeros
    if missing.endswith("forget_bias"):
        d = p.shape[-1]
        assert 0.3 / math.sqrt(d) < float(p.std()) < 3 / math.sqrt(d)  # N(0, 1/d) (docs/design.md#bmn)
    with torch.no_grad():
        assert torch.isfinite(loaded(rand_ids(10)).logits).all()


# ================================================================================== 6. input validation
def _bad_input_cases():
    return {
        "3d_ids": (dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), r"input_ids.*shape"),
        "id_ge_vocab": (dict(input_ids=torch.tensor([[1, 5, 50]])), r"vocab_size"),
        "negative_id": (dict(input_ids=torch.tensor([[1, -1, 5]])), r"vocab_size"),
        "float_ids": (dict(input_ids=torch.tensor([[1.0, 5.0]])), r"integer"),
        "mask_batch": (dict(input_ids=torch.tensor([[1, 5, 6]]), attention_mask=torch.ones(2, 3)), r"attention_mask"),
        "mask_short": (dict(input_ids=torch.tensor([[1, 5, 6]]), attention_mask=torch.ones(1, 2)), r"attention_mask"),
        "mask_1d": (dict(input_ids=torch.tensor([[1, 5, 6]]), attention_mask=torch.ones(3)), r"attention_mask"),
        "ids_and_embeds": (dict(input_ids=torch.tensor([[1, 5]]), inputs_embeds=torch.zeros(1, 2, 16)),
                           r"inputs_embeds"),
        "reset_shape": (dict(input_ids=torch.tensor([[1, 5]]), memory_reset=torch.tensor([True, False])),
                        r"memory_reset"),
        # arguments a Llama takes that mean nothing here: refused, not silently ignored
        "output_attentions": (dict(input_ids=torch.tensor([[1, 5]]), output_attentions=True),
                              r"does not return attention weights.*output_memory_attentions"),
        "position_ids": (dict(input_ids=torch.tensor([[1, 5]]), position_ids=torch.tensor([[0, 1]])),
                         r"does not take `position_ids`"),
        # a cell-mode input with stream-mode inputs was silently ignored (the stream started from m0)
        "memory": (dict(input_ids=torch.tensor([[1, 5]]), memory=unit_memory(1, seed=0)),
                   r"`memory` is a cell-mode input.*set_state"),
    }


@pytest.mark.parametrize("case", list(_bad_input_cases()))
def test_bad_stream_input_raises(case):
    model = build_tiny_memformer(attn="sdpa")
    kwargs, pattern = _bad_input_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        model(**kwargs)


def test_stream_inputs_in_cell_mode_are_refused():
    """Cell mode (`encoder_input_ids` / `decoder_input_ids`) silently ignored the stream-mode inputs passed with it:
    `past_key_values` (the cell ran from `memory`, m0 when None, not from the cache), `input_ids` /
    `inputs_embeds` and `attention_mask` (the encoder read all of `encoder_input_ids`). They are refused naming
    them; `memory` in stream mode is refused in test_bad_stream_input_raises."""
    model = build_tiny_memformer(attn="sdpa")
    enc = rand_ids(L, batch=2, boot=False)
    cell = dict(encoder_input_ids=enc, decoder_input_ids=torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1))
    with torch.no_grad():
        cache = model(rand_ids(6, batch=2))[CACHE_KWARG]
    for name, value in (("input_ids", enc), ("inputs_embeds", torch.zeros(2, L, 16, dtype=torch.float64)),
                        ("attention_mask", torch.zeros(2, L, dtype=torch.long)), (CACHE_KWARG, cache)):
        with pytest.raises(ValueError, match=rf"Cell mode .* does not take `{name}`:"):
            model(**cell, **{name: value})


def test_generate_with_output_attentions_explains():
    """`generate(output_attentions=True)` used to fail inside transformers with an AttributeError."""
    model = build_tiny_memformer(attn="sdpa")
    with pytest.raises(ValueError, match=r"does not return attention weights"):
        model.generate(rand_ids(5), max_new_tokens=2, return_dict_in_generate=True, output_attentions=True)


@pytest.mark.parametrize("mode", ["stream", "stream_padded", "cell"])
def test_last_hidden_state_entry_is_the_normalised_output(mode):
    """As in transformers' decoders, `hidden_states[-1]` is the final (normalised) decoder output, so the LM head
    applied to it gives the logits; the other entries are the embeddings and each earlier layer's output."""
    model = build_tiny_memformer(attn="sdpa")
    with torch.no_grad():
        if mode == "cell":
            enc = rand_ids(L, batch=2, seed=3, boot=False)
            dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
            out = model(encoder_input_ids=enc, decoder_input_ids=dec, output_hidden_states=True)
        else:
            ids = rand_ids(11, batch=2, seed=4)
            mask = torch.ones_like(ids)
            if mode == "stream_padded":
                mask[1, :3] = 0
            out = model(ids, attention_mask=mask, output_hidden_states=True)
            out.logits[mask == 0] = 0  # pad columns have no state
    assert len(out.hidden_states) == model.config.decoder_layers + 1
    logits = model.lm_head(out.hidden_states[-1])
    if mode == "stream_padded":
        logits[mask == 0] = 0
    torch.testing.assert_close(logits, out.logits, atol=1e-12, rtol=0)
    assert not torch.allclose(model.lm_head(out.hidden_states[-2]), out.logits)


def test_1d_input_ids_raise_value_error_base_model():
    model = build_tiny_memformer(attn="sdpa", cls=MemformerModel)
    with pytest.raises(ValueError, match=r"input_ids.*shape"):
        model(input_ids=torch.tensor([1, 5, 6]))


def test_1d_input_ids_raise_value_error_causal_lm():
    model = build_tiny_memformer(attn="sdpa")
    with pytest.raises(ValueError, match=r"input_ids.*shape"):
        model(input_ids=torch.tensor([1, 5, 6]))


def test_cache_batch_mismatch_and_foreign_config_raise():
    model = build_tiny_memformer(attn="sdpa")
    with torch.no_grad():
        cache = model(rand_ids(6, batch=2))[CACHE_KWARG]
        with pytest.raises(ValueError, match=r"batch size 2 != input batch size 3.*batch_repeat_interleave"):
            model(rand_ids(2, batch=3, boot=False), past_key_values=cache)
        other = build_tiny_memformer(attn="sdpa", num_memory_slots=5)
        cache2 = other(rand_ids(6, batch=2))[CACHE_KWARG]
        with pytest.raises(ValueError, match=r"different model configuration"):
            model(rand_ids(2, batch=2, boot=False), past_key_values=cache2)
        nan_cache = model(rand_ids(6, batch=2))[CACHE_KWARG]
        nan_cache.memory = nan_cache.memory.clone()
        nan_cache.memory[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"NaN"):
            model(rand_ids(2, batch=2, boot=False), past_key_values=nan_cache)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_inputs_embeds_are_refused_pads_are_not_read(value):
    """`inputs_embeds` with an inf or NaN at a real position ran through: NaN logits, a NaN memory in the returned
    cache, and NaN logits for every later call continued from it. It is refused naming `inputs_embeds`, the cache
    passed in is left as it was; a NaN at a left-pad position is still never read."""
    model = build_tiny_memformer(attn="sdpa")
    embeds = model.get_input_embeddings()(rand_ids(9, batch=2, seed=3))
    with torch.no_grad():
        cache = model(inputs_embeds=embeds[:, :5], use_cache=True)[CACHE_KWARG]
        before = {k: v.clone() for k, v in cache_tensors(cache).items()}
        bad = embeds[:, 5:].clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match=r"`inputs_embeds` contains NaN or inf"):
            model(inputs_embeds=bad, past_key_values=cache, use_cache=True)
        for k, v in cache_tensors(cache).items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0
        padded = embeds.clone()
        padded[1, :3] = value
        out = model(inputs_embeds=padded, attention_mask=mask)
        clean = model(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(out.logits[1, 3:], clean.logits[1, 3:], rtol=0, atol=0)
    assert torch.isfinite(out.logits[:, 3:]).all()


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_inputs_embeds_whose_squares_overflow_are_refused(norm_type):
    """Finite float32 `inputs_embeds` of 1e20 ran through: the normalisation layers' squares overflow to inf and the
    logits and the memory were NaN, silently. Values beyond sqrt(finfo.max / d) / 2 (where a norm's sum of d squared
    deviations can overflow) are refused naming the bound; up to it the outputs are finite, and a pad position is
    still never read."""
    model = build_tiny_memformer(dtype=torch.float32, norm_type=norm_type)
    limit = (torch.finfo(torch.float32).max / 16) ** 0.5 / 2
    largest = torch.full((2, 6, 16), limit)
    largest[..., ::2] *= -1  # alternating signs: the largest deviations from the mean
    largest[1, :, 0] = 1.0
    with torch.no_grad():
        out = model(inputs_embeds=largest)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.memory).all()
        for bad in (largest * 1.01, torch.full((2, 6, 16), 1e20)):
            with pytest.raises(ValueError, match=re.escape(f"`inputs_embeds` holds values beyond ±{limit:.3g} at real")):
                model(inputs_embeds=bad)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        padded = largest.clone()
        padded[1, :2] = 1e30
        out = model(inputs_embeds=padded, attention_mask=mask)
        clean = model(inputs_embeds=largest, attention_mask=mask)
    torch.testing.assert_close(out.logits[1, 2:], clean.logits[1, 2:], rtol=0, atol=0)


def test_inputs_embeds_bound_is_that_of_the_models_norms():
    """The bound of `inputs_embeds` followed the embeddings' dtype, not the dtype the norms run in: a float64 model
    computes float32 embeddings in float64 (they are promoted), and refused 1e20 as overflowing float32. Such a call
    runs as with the same embeddings in float64; beyond float64's bound it is refused."""
    model = build_tiny_memformer()
    embeds = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    embeds[0, 2] *= 1e20
    with torch.no_grad():
        got = model(inputs_embeds=embeds)
        ref = model(inputs_embeds=embeds.double())
        assert torch.isfinite(got.logits).all()
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.memory, ref.memory, rtol=0, atol=0)
        limit = (torch.finfo(torch.float64).max / 16) ** 0.5 / 2
        with pytest.raises(ValueError, match=re.escape(f"beyond ±{limit:.3g} at real")):
            model(inputs_embeds=torch.full((1, 3, 16), 1e160, dtype=torch.float64))


@pytest.mark.parametrize("model_dtype,embeds_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                                      (torch.float16, torch.float32)])
def test_inputs_embeds_wider_than_the_model_are_cast_to_it(model_dtype, embeds_dtype):
    """`inputs_embeds` wider than the model's dtype (float64 into a float32 model, float32 into a bf16 / float16
    one) failed deep in the first LayerNorm with "mixed dtype (CPU)", while a narrower dtype was promoted; integer
    `inputs_embeds` failed in `torch.finfo` with a TypeError. Embeddings are cast to the model's dtype, as the
    embedding layer's output is (the same logits as the cast embeddings); values that the cast would overflow, and
    integer embeddings, are refused naming `inputs_embeds`."""
    model = build_tiny_memformer(dtype=model_dtype, attn="sdpa")
    embeds = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3), dtype=embeds_dtype)
    with torch.no_grad():
        got = model(inputs_embeds=embeds)
        want = model(inputs_embeds=embeds.to(model_dtype))
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        assert torch.isfinite(got.logits).all()
        if model_dtype == torch.float16:
            with pytest.raises(ValueError, match=r"`inputs_embeds` holds values beyond ±6.55e\+04 .*float16"):
                model(inputs_embeds=embeds * 1e5)
        else:
            limit = (torch.finfo(torch.float32).max / 16) ** 0.5 / 2
            with pytest.raises(ValueError, match=re.escape(f"beyond ±{limit:.3g} at real") + r".*float32"):
                model(inputs_embeds=embeds * 1e30)
        with pytest.raises(ValueError, match=r"`inputs_embeds` must be a float tensor, got dtype torch.int64"):
            model(inputs_embeds=embeds.long())


@pytest.mark.parametrize("position_embedding_type", ["rope", "simplified_rpe"])
def test_float16_eager_queries_without_valid_keys_output_zero(position_embedding_type):
    """A float16 model with eager attention (or simplified RPE, which is always eager) returned NaN logits wherever a
    query had no valid key: the decoder after an `"empty"` boot, an inactive cell, as the additive mask finfo.min
    plus a negative float16 score is -inf and softmax over -inf only is NaN (docs/design.md#numerics promises an
    exact zero). Outputs are finite and match the float32 model's to float16 rounding (5% of the largest logit)."""
    kw = dict(attn="eager", first_segment_context="empty", position_embedding_type=position_embedding_type,
              initializer_range=1.0)
    half, ref = build_tiny_memformer(dtype=torch.float16, **kw), build_tiny_memformer(dtype=torch.float32, **kw)
    ids, mask = left_pad([list(range(5, 16)), list(range(20, 23))])
    inactive = dict(encoder_input_ids=torch.full((2, L), PAD), encoder_attention_mask=torch.zeros(2, L, dtype=torch.bool),
                    decoder_input_ids=torch.tensor([[BOS, 5, 6, 7]] * 2), memory_reset=torch.tensor([True, True]))
    with torch.no_grad():
        for model_inputs in (dict(input_ids=ids, attention_mask=mask), inactive):
            got, want = half(**model_inputs).logits.float(), ref(**model_inputs).logits
            real = mask.bool() if "input_ids" in model_inputs else torch.ones(2, L, dtype=torch.bool)
            assert torch.isfinite(got[real]).all()
            torch.testing.assert_close(got[real], want[real], atol=0.05 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("tau", [1e-8, 1e-30])
def test_float16_learnable_temperature_below_float16_range(tau):
    """A float16 model with `learnable_temperature` and tau = 1e-8 (valid: at least 1e-30) wrote NaN into the memory:
    exp(log tau) was taken in the parameter's float16 and underflowed to 0. The writer takes it in its own dtype (at
    least float32); the memory then matches the float32 model's to float16 rounding."""
    ids = rand_ids(13, batch=2)
    memories = []
    for dtype in (torch.float16, torch.float32):
        model = build_tiny_memformer(dtype=dtype, attn="sdpa", learnable_temperature=True, memory_write_temperature=tau)
        with torch.no_grad():
            memories.append(model(ids, use_cache=True)[CACHE_KWARG].memory)
    assert torch.isfinite(memories[0]).all()
    torch.testing.assert_close(memories[0], memories[1], atol=0.01, rtol=0)


def test_bad_cell_input_raises():
    model = build_tiny_memformer(attn="sdpa", cls=MemformerModel)
    enc = rand_ids(L, batch=2, boot=False)
    dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
    with pytest.raises(ValueError, match=r"segment_length"):
        model(encoder_input_ids=rand_ids(L + 1, batch=2, boot=False), decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"segment_length"):
        model(encoder_input_ids=enc, decoder_input_ids=rand_ids(L + 1, batch=2, boot=False))
    memory = unit_memory(2, seed=0)
    memory[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN"):
        model(encoder_input_ids=enc, decoder_input_ids=dec, memory=memory)
    with pytest.raises(ValueError, match=r"[Mm]emory batch size 3 != input batch size 2"):
        model(encoder_input_ids=enc, decoder_input_ids=dec, memory=unit_memory(3, seed=0))
    with pytest.raises(ValueError, match=r"num_memory_slots"):
        model(encoder_input_ids=enc, decoder_input_ids=dec, memory=unit_memory(2, seed=0, k=4))
    with pytest.raises(ValueError, match=r"vocab_size"):
        model(encoder_input_ids=enc + 100, decoder_input_ids=dec)


@pytest.mark.parametrize("overrides,field", [
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
    (dict(first_segment_context="zeros"), "first_segment_context"),
    (dict(memory_write_temperature=0.0), "memory_write_temperature"),
    (dict(memory_write_temperature=1.5), "memory_write_temperature"),
    (dict(memory_write_temperature=-0.5), "memory_write_temperature"),
    (dict(num_attention_heads=3), "num_attention_heads"),
    (dict(hidden_size=18, num_attention_heads=4), "num_attention_heads"),
    (dict(memory_write_heads=5), "memory_write_heads"),
    (dict(hidden_size="16"), "hidden_size"),
    (dict(segment_length=0), "segment_length"),
    (dict(memory_write_self_bias=float("nan")), "memory_write_self_bias"),
    (dict(forget_bias_init_scale=0.0), "forget_bias_init_scale"),
    (dict(memory_write_self_bias=1.0, memory_write_self_bias_spread=-1.0), "memory_write_self_bias_spread"),
    (dict(memory_write_self_bias_spread=2.0), "memory_write_self_bias_spread"),
    (dict(memory_write_qk_norm=1), "memory_write_qk_norm"),
])
def test_bad_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_memformer_config(**overrides)


@pytest.mark.parametrize("overrides,field,expected", [
    (dict(segment_length=2 ** 20), "segment_length", "at most 65536"),
    (dict(segment_length=65537), "segment_length", "at most 65536"),
    (dict(layer_norm_eps=float("inf")), "layer_norm_eps", "a positive finite number"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps", "a positive finite number"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps", "a positive finite number"),
    (dict(layer_norm_eps=-1e-5), "layer_norm_eps", "a positive finite number"),
    (dict(initializer_range=float("inf")), "initializer_range", "a positive finite number"),
    (dict(initializer_range=float("nan")), "initializer_range", "a positive finite number"),
    (dict(initializer_range=0), "initializer_range", "a positive finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("inf")}), "rope_theta", "a positive finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e-50}), "rope_theta", "at least 1.17"),
])
def test_config_bounds_sizes_and_finite_numbers(tmp_path, overrides, field, expected):
    """Issue 15 item 5: `segment_length=2**20` was accepted (a 5-token forward then tried to allocate 4 TiB) and
    inf `layer_norm_eps` / `initializer_range` gave NaN logits. The config refuses them naming the field, also when
    read from a config.json; values inside the bounds still build a model with finite logits."""
    assert_config_refused(tmp_path, overrides, field, rf"invalid `[\w.]*{field}`=.*expected {expected}")
    assert tiny_memformer_config(segment_length=65536).segment_length == 65536  # the bound itself is allowed
    model = build_tiny_memformer(attn="sdpa", layer_norm_eps=1e-12, initializer_range=1e-3)
    with torch.no_grad():
        assert torch.isfinite(model(rand_ids(7, batch=2)).logits).all()
    model = build_tiny_memformer(dtype=torch.float32, rope_parameters={"rope_type": "default", "rope_theta": 1.2e-38})
    with torch.no_grad():  # rope_theta=1e-50 is 0 in the float32 tables: NaN logits and a NaN memory in the cache
        out = model(rand_ids(7, batch=2), use_cache=True)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out[CACHE_KWARG].memory).all()


@pytest.mark.parametrize("overrides,field,expected", [
    (dict(memory_write_temperature=1e-40), "memory_write_temperature", "at least 1e-30"),
    (dict(memory_write_temperature=1e-40, memory_write_qk_norm=True), "memory_write_temperature", "at least 1e-30"),
    (dict(memory_write_self_bias=1e300), "memory_write_self_bias", "initial self biases within ±1e"),
    (dict(memory_write_self_bias=-2e30), "memory_write_self_bias", "initial self biases within ±1e"),
    (dict(memory_write_self_bias=0.0, memory_write_self_bias_spread=1e300), "memory_write_self_bias", "initial self biases within ±1e"),
    (dict(forget_bias_init_scale=1e20), "forget_bias_init_scale", "at most 1e"),
])
def test_writer_settings_that_overflow_float32_are_refused(tmp_path, overrides, field, expected):
    """A writer temperature of 1e-40 was accepted and wrote NaN into the memory and the cache (its float32 scores
    overflow to inf); a self bias of 1e300 raised a bare RuntimeError ("value cannot be converted to type float")
    when the model was built; `forget_bias_init_scale=1e20` gave m0 = 0 (the squared norm overflows) instead of unit
    slots. The config refuses them naming the field; at the bounds a float32 model keeps finite unit-norm memory."""
    assert_config_refused(tmp_path, overrides, field, rf"invalid `{field}`=.*expected {expected}")
    for ok in (dict(memory_write_temperature=1e-30), dict(memory_write_temperature=1e-30, memory_write_qk_norm=True),
               dict(memory_write_self_bias=1e30), dict(memory_write_self_bias=-1e30),
               dict(memory_write_self_bias=0.0, memory_write_self_bias_spread=2e30),
               dict(forget_bias_init_scale=1e18)):
        model = build_tiny_memformer(dtype=torch.float32, **ok)
        with torch.no_grad():
            out = model(rand_ids(13, batch=2), use_cache=True)
        memory = out.past_key_values.memory
        assert torch.isfinite(out.logits).all(), ok
        torch.testing.assert_close(memory.norm(dim=-1), torch.ones(2, 3), atol=1e-5, rtol=0, msg=str(ok))
        torch.testing.assert_close(model.model.initial_memory(1).norm(dim=-1), torch.ones(1, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides,field,expected", [
    (dict(num_hidden_layers=0), "decoder_layers", "an integer >= 1"),
    (dict(num_hidden_layers=-2), "decoder_layers", "an integer >= 1"),
    (dict(n_positions=10 ** 6), "segment_length", "at most 65536"),
    (dict(n_positions=0), "segment_length", "an integer >= 1"),
])
def test_config_aliases_are_validated(tmp_path, overrides, field, expected):
    """The other names of `attribute_map` (`num_hidden_layers`, `n_positions`) were set by the base class after the
    checks: 0 decoder layers was accepted, `n_positions=10**6` tried to allocate terabytes at the first forward. They
    are checked like the fields, in Python and from a hand-edited config.json; valid values still take effect."""
    alias = next(iter(overrides))
    assert_config_refused(tmp_path, overrides, field,
                          rf"invalid `{field}`=.*expected {expected}.*`{alias}` is another name for `{field}`")
    cfg = tiny_memformer_config(num_hidden_layers=3, n_positions=16)
    assert (cfg.decoder_layers, cfg.num_hidden_layers, cfg.segment_length, cfg.n_positions) == (3, 3, 16, 16)
    cfg.save_pretrained(tmp_path)
    again = MemformerConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict() and "num_hidden_layers" not in json.loads(
        (tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"invalid `decoder_layers`=0"):  # from_pretrained's overrides are set late
        MemformerConfig.from_pretrained(tmp_path, num_hidden_layers=0)


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
@pytest.mark.parametrize("value", ["false", 0, None])
def test_boolean_config_fields_refuse_other_types(tmp_path, field, value):
    """`normalize_memory_kv="false"` (a string, so truthy) used to build a model with the option on."""
    assert_config_refused(tmp_path, {field: value}, field, rf"invalid `{field}`={value!r}; expected True or False")
    assert getattr(tiny_memformer_config(**{field: False}), field) is False


def test_cell_encoder_mask_of_another_shape_is_refused():
    """An `encoder_attention_mask` whose shape is not that of `encoder_input_ids` failed deep in SDPA ("The size of
    tensor a (4) must match the size of tensor b (3)") or elsewhere (IndexError for a 1-D mask), or was broadcast
    over the rows ([1, L]). It is refused naming the mask and both shapes."""
    model = build_tiny_memformer(attn="sdpa")
    enc = rand_ids(L, batch=2, boot=False)
    dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
    for mask in (torch.ones(2, L - 1), torch.ones(L), torch.ones(1, L), torch.ones(2, L, 1)):
        with pytest.raises(ValueError, match=re.escape(f"`encoder_attention_mask` must have the shape of "
                                                       f"`encoder_input_ids` (2, {L}), got {tuple(mask.shape)}")):
            model(encoder_input_ids=enc, decoder_input_ids=dec, encoder_attention_mask=mask)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_in_provided_memory_raises(value):
    model = build_tiny_memformer(attn="sdpa", cls=MemformerModel)
    enc = rand_ids(L, batch=2, boot=False)
    dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
    memory = unit_memory(2, seed=0)
    memory[0, 1, 2] = value
    with pytest.raises(ValueError, match=r"`memory` contains NaN or inf"):
        model(encoder_input_ids=enc, decoder_input_ids=dec, memory=memory)
    lm = build_tiny_memformer(attn="sdpa")
    with torch.no_grad():
        cache = lm(rand_ids(6, batch=2))[CACHE_KWARG]
        cache.memory = cache.memory.clone()
        cache.memory[1, 0, 0] = value
        with pytest.raises(ValueError, match=r"cache's memory contains NaN or inf"):
            lm(rand_ids(2, batch=2, boot=False), past_key_values=cache)


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_memory_whose_norms_overflow_is_refused(dtype, norm_type):
    """A finite user memory of 1e20 (float32 model; 1e160 for a float64 one) ran through: the readers'
    `memory_kv_norm` and the writer's Biased Memory Normalization sum d squares of it, which overflow (NaN logits and
    a NaN memory), silently. Values beyond sqrt(finfo.max / d) / 2 of the memory's dtype (float32, float64 for a
    float64 model) are refused naming `memory`, the bound and the dtype: as the cell-mode `memory=` and as the
    memory of a cache that comes from outside the model (checked once, on its next use). Up to the bound the
    logits and the memory are finite."""
    limit = (torch.finfo(dtype).max / 16) ** 0.5 / 2
    message = re.escape(f"holds values beyond ±{limit:.3g}") + r".*" + str(dtype).removeprefix("torch.")
    largest = torch.full((2, 3, 16), limit, dtype=dtype)
    largest[..., ::2] *= -1  # alternating signs: the largest deviations from the mean
    enc = rand_ids(L, batch=2, boot=False)
    dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
    huge = 1e160 if dtype == torch.float64 else 1e20
    for cls in (MemformerModel, MemformerForCausalLM):
        model = build_tiny_memformer(dtype=dtype, attn="sdpa", cls=cls, norm_type=norm_type)
        with torch.no_grad():
            out = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=largest)
            assert torch.isfinite(out.last_hidden_state if cls is MemformerModel else out.logits).all()
            assert torch.isfinite(out.memory).all()
            for bad in (largest * 1.01, torch.full((2, 3, 16), huge, dtype=dtype)):
                with pytest.raises(ValueError, match=r"`memory` " + message):
                    model(encoder_input_ids=enc, decoder_input_ids=dec, memory=bad)
    lm = model
    with torch.no_grad():
        cache = lm(rand_ids(6, batch=2))[CACHE_KWARG]
        cache.memory = largest.clone()
        out = lm(rand_ids(5, batch=2, boot=False), past_key_values=cache)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.memory).all()
        for bad in (largest * 1.01, torch.full((2, 3, 16), huge, dtype=dtype)):
            cache = lm(rand_ids(6, batch=2))[CACHE_KWARG]
            cache.memory = bad
            with pytest.raises(ValueError, match=r"cache's memory " + message):
                lm(rand_ids(2, batch=2, boot=False), past_key_values=cache)
            state = dict(memory=bad, cross_mask=cache.cross_mask, segment_ids=cache.segment_ids, fill=cache.fill,
                         started=cache.started, self_kv=[(x.keys, x.values) for x in cache.layers],
                         cross_kv=[(x.cross_keys, x.cross_values) for x in cache.layers])
            cache = MemformerCache(lm.config)
            cache.set_state(**state)
            with pytest.raises(ValueError, match=r"cache's memory " + message):
                lm(rand_ids(2, batch=2, boot=False), past_key_values=cache)


def test_memory_bound_of_a_float16_model():
    """A float16 model casts the memory to float16 for its readers' `memory_kv_norm`: a memory of 7e4 (finite in
    the float32 the memory is held in) became inf there and the logits NaN. It is refused naming float16's largest
    value; at that value the outputs are finite."""
    model = build_tiny_memformer(dtype=torch.float16, attn="sdpa")
    enc = rand_ids(L, batch=1, boot=False)
    dec = torch.cat([torch.full((1, 1), BOS), enc[:, :-1]], 1)
    largest = torch.full((1, 3, 16), torch.finfo(torch.float16).max)
    largest[..., ::2] *= -1
    with torch.no_grad():
        out = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=largest)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.memory).all()
        with pytest.raises(ValueError, match=re.escape("`memory` holds values beyond ±6.55e+04") + r".*float16"):
            model(encoder_input_ids=enc, decoder_input_ids=dec, memory=largest * 1.1)


def test_pickle_checkpoint_is_refused(tmp_path):
    """Only safetensors weights load (transformers 5 would otherwise fall back to unpickling pytorch_model.bin)."""
    model = build_tiny_memformer(attn="sdpa")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(OSError, match=r"holds pytorch_model\.bin but no model\.safetensors.*safetensors "
                                          r"checkpoints only"):
            load(tmp_path)
    with pytest.raises(OSError, match=r"pytorch_model\.bin is not a safetensors file"):
        MemformerForCausalLM.from_pretrained(tmp_path / "pytorch_model.bin", config=model.config)
    with pytest.raises(ValueError, match="use_safetensors=False is not supported"):
        MemformerForCausalLM.from_pretrained(tmp_path, use_safetensors=False)
    model.save_pretrained(tmp_path)  # with model.safetensors beside it, the safetensors file is what loads
    loaded = MemformerForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(loaded.dtype))


def test_folder_without_config_is_refused_naming_it(tmp_path):
    """transformers 5 reads a folder without config.json as the default configuration: `MemformerConfig.from_pretrained`
    returned a 512-wide default config, and `from_pretrained` of the model failed with an unrelated size-mismatch
    error (or, where the shapes happen to agree, loaded with every other setting silently at its default). Both now
    raise an `OSError` naming the missing config.json; an explicit `config=` still loads the weights exactly."""
    model = build_tiny_memformer(attn="sdpa", segment_length=5, memory_write_temperature=0.25)
    ids = rand_ids(12, batch=2, seed=26)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    for load in (MemformerConfig.from_pretrained, MemformerForCausalLM.from_pretrained, MemformerModel.from_pretrained):
        with pytest.raises(OSError, match=r"no config\.json") as err:
            load(tmp_path)
        assert str(tmp_path) in str(err.value)
    loaded = MemformerForCausalLM.from_pretrained(tmp_path, config=model.config, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-12, rtol=0)


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header_bytes":  # inside the JSON header
        data[12:24] = b"\xff" * 12
    elif how == "header_length":  # the 8-byte header length
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header_bytes", "header_length", "empty"])
def test_corrupted_safetensors_raises_naming_the_file(tmp_path, how):
    build_tiny_memformer(attn="sdpa").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    _damage(weights, how)
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(OSError, match="truncated or corrupted safetensors file") as err:
            load(tmp_path)
        assert str(weights) in str(err.value)


def _flip_key_byte(path, key: str) -> str:
    """Change one byte inside the tensor name `key` in the JSON header of a safetensors file; returns the new name."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    at = data.find(b'"' + key.encode() + b'"', 8, 8 + header_len) + 1 + len("model.")
    assert at > len("model.")
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))
    return key[: len("model.")] + chr(data[at]) + key[len("model.") + 1:]


def test_checkpoint_with_wrong_tensor_names_is_refused(tmp_path):
    """Issue 15 item 1: one flipped byte in a tensor name used to load with that weight re-initialised at random.
    Missing or unexpected keys are an error naming the keys and the file; a clean checkpoint loads exactly."""
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    ids = rand_ids(11, batch=2, seed=22)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    clean = weights.read_bytes()

    # a good checkpoint (lm_head tied, not saved) loads identically, with nothing reported missing or unexpected
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        loaded, info = load(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, expected)
    base = MemformerModel.from_pretrained(tmp_path)  # the bare model from a causal-LM checkpoint: also exact
    assert torch.equal(base.writer.forget_bias, model.model.writer.forget_bias)

    renamed = _flip_key_byte(weights, "model.writer.forget_bias")
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,
                 MemformerModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match="tensor names do not match") as err:
            load(tmp_path)
        msg = str(err.value)
        missing = "model.writer.forget_bias" if load in (MemformerForCausalLM.from_pretrained,
                                                         AutoModelForCausalLM.from_pretrained) else "writer.forget_bias"
        assert str(weights) in msg and f"missing {missing};" in msg and f"unexpected {renamed})" in msg
    # a caller that asks for the loading report gets it (transformers' contract), listing the mismatch
    loaded, info = MemformerForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.writer.forget_bias" in info["missing_keys"] and renamed in info["unexpected_keys"]
    with pytest.raises(OSError, match="tensor names do not match"):  # unless it asks for strictness too
        MemformerForCausalLM.from_pretrained(tmp_path, output_loading_info=True, strict=True)

    # an extra tensor alone (unexpected, nothing missing) is refused as well
    weights.write_bytes(clean)
    state = load_file(weights)
    state["model.extra.weight"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"do not match MemformerForCausalLM \(unexpected model\.extra\.weight\)"):
        MemformerForCausalLM.from_pretrained(tmp_path)

    weights.write_bytes(clean)  # restored: loads again, identical logits
    with torch.no_grad():
        assert torch.equal(MemformerForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, expected)


def test_checkpoint_with_a_wrong_tensor_shape_is_refused_naming_it(tmp_path):
    """A tensor of the wrong shape raised transformers' RuntimeError "look at the above report", which names
    neither the tensor nor the file (and shows nothing when transformers' logging is silenced). The error now names
    the tensor, both shapes and the file; `ignore_mismatched_sizes=True` still loads with that tensor re-initialised
    and reports it, as transformers does; a clean checkpoint loads exactly."""
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    ids = rand_ids(9, batch=2, seed=27)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["model.writer.forget_bias"] = torch.zeros(5, 16)
    save_file(state, weights, metadata={"format": "pt"})
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
            with pytest.raises(OSError, match=r"tensor shapes do not match MemformerForCausalLM \(model\.writer\."
                                              r"forget_bias: \(5, 16\) in the checkpoint, \(3, 16\) in the model\)"
                               ) as err:
                load(tmp_path)
            assert str(weights) in str(err.value)
        loaded, info = MemformerForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True,
                                                            output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    assert [k for k, *_ in info["mismatched_keys"]] == ["model.writer.forget_bias"]
    assert torch.equal(loaded.model.writer.q_proj.weight, model.model.writer.q_proj.weight)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(MemformerForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, expected)


def test_bare_model_from_untied_causal_lm_checkpoint(tmp_path):
    """Strict loading still lets the bare model load from a causal-LM checkpoint with its own (untied) LM head; a
    causal LM from a bare-model checkpoint has no head to load and is refused."""
    lm = build_tiny_memformer(dtype=torch.float32, attn="sdpa", tie_word_embeddings=False)
    ids = rand_ids(9, batch=2, seed=24)
    lm.save_pretrained(tmp_path / "lm")
    base, info = MemformerModel.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(base.eval()(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    lm.model.save_pretrained(tmp_path / "base")
    with pytest.raises(OSError, match=r"do not match MemformerForCausalLM \(missing lm_head\.weight\)"):
        MemformerForCausalLM.from_pretrained(tmp_path / "base")


def _shard(model, folder) -> dict:
    """Save `model` as a sharded safetensors checkpoint; returns its index."""
    model.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index


@pytest.mark.parametrize("shard", ["pickle.bin", "../outside.safetensors", "ABS", "sub/inner.safetensors"])
def test_safetensors_index_cannot_bypass_safetensors_only(tmp_path, shard):
    """Issue 15 item 2: a weight_map naming a `.bin` shard made transformers unpickle it, and `../x.safetensors` read
    a file outside the folder. Both are refused before anything is read; a normal sharded checkpoint loads exactly."""
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    ids = rand_ids(9, batch=2, seed=23)
    with torch.no_grad():
        expected = model(ids).logits
    folder = tmp_path / "ckpt"
    index = _shard(model, folder)
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with torch.no_grad():
            assert torch.equal(load(folder).eval()(ids).logits, expected)

    state = {}
    for name in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / name))
        os.remove(folder / name)
    if shard == "ABS":
        shard = str(tmp_path / "abs.safetensors")
    target = (folder / shard) if not os.path.isabs(shard) else shard
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if shard.endswith(".bin"):
        torch.save(state, target)
    else:
        save_file(state, target, metadata={"format": "pt"})
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(OSError, match="not `\\*.safetensors` files in the checkpoint's own folder") as err:
            load(folder)
        assert str(folder / "model.safetensors.index.json") in str(err.value) and repr(shard) in str(err.value)


@pytest.mark.parametrize("explicit", ["weights.bin", "../outside.safetensors"])
def test_config_transformers_weights_cannot_bypass_safetensors_only(tmp_path, explicit):
    """The config's `transformers_weights` names the file transformers loads: it must be a safetensors file (or
    index) of the folder too."""
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    if explicit.endswith(".bin"):
        torch.save(state, folder / explicit)
    else:
        save_file(state, folder / explicit, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = explicit
    (folder / "config.json").write_text(json.dumps(config))
    for load in (MemformerForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(OSError, match=f"transformers_weights={explicit!r} is not"):
            load(folder)
    config["transformers_weights"] = "renamed.safetensors"  # a safetensors file of the folder is fine
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "renamed.safetensors", metadata={"format": "pt"})
    loaded = MemformerForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.model.writer.forget_bias, model.model.writer.forget_bias)


def test_hub_cached_index_with_pickle_shard_is_refused(tmp_path, monkeypatch):
    """The same index check for a Hub id (resolved here from a local Hub cache, offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_memformer(dtype=torch.float32, attn="sdpa")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--memformer"
    snapshot = repo / "snapshots" / commit
    index = _shard(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    load = lambda: MemformerForCausalLM.from_pretrained("acme/memformer", cache_dir=tmp_path / "cache")  # noqa: E731
    loaded = load()  # a clean cached snapshot loads
    assert torch.equal(loaded.model.writer.forget_bias, model.model.writer.forget_bias)
    index["weight_map"] = {k: "pytorch_model.bin" for k in index["weight_map"]}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"names shard files 'pytorch_model\.bin' that are not"):
        load()


def test_config_roundtrip_and_tiny_config_values(tmp_path):
    cfg = tiny_memformer_config(memory_write_temperature=0.25, position_embedding_type="simplified_rpe")
    cfg.save_pretrained(tmp_path)
    again = MemformerConfig.from_pretrained(tmp_path)
    for key in ("memory_write_temperature", "position_embedding_type", "segment_length", "num_memory_slots",
                "bos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert getattr(again, key) == getattr(cfg, key), key
    assert again.num_hidden_layers == cfg.decoder_layers


# ================================================================================== 7. padding, checkpointing
@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_left_padded_batch_equals_rows_alone(boot):
    model = build_tiny_memformer(attn="sdpa", first_segment_context=boot)
    if boot == "empty":
        with torch.no_grad():  # B2, isolated in its own test
            for layer in model.model.decoder.layers:
                layer.cross_attn.o_proj.bias.zero_()
    lengths = [13, 9, 6, 2]  # different phases in the segment grid: rows reach boundaries at different steps
    rows = [rand_ids(n, seed=30 + i, boot=(boot == "bos"))[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    extra = rand_ids(7, batch=len(rows), seed=40, boot=False)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        garbage_ids, _ = left_pad(rows, garbage_seed=41)
        out_g = model(garbage_ids, attention_mask=mask)
        # continue one column at a time with generate()'s 2-D mask of past + current columns
        step_logits, cache = decode_columns(model, extra, mask, out[CACHE_KWARG])
    n = ids.shape[1]
    for i, r in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.cat([r, extra[i]])[None])
        k = len(r)
        torch.testing.assert_close(out.logits[i, n - k:], alone.logits[0, :k], atol=1e-10, rtol=0)
        torch.testing.assert_close(out_g.logits[i, n - k:], out.logits[i, n - k:], atol=0, rtol=0)
        torch.testing.assert_close(step_logits[i], alone.logits[0, k:], atol=1e-10, rtol=0)
        torch.testing.assert_close(cache.memory[i], alone.memory[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out_g.memory, out.memory, atol=0, rtol=0)
    assert len(set((n_ + extra.shape[1]) % L for n_ in lengths)) > 1


def test_gradient_checkpointing_same_loss_and_grads():
    model = build_tiny_memformer(attn="eager").train()
    ids = rand_ids(15, batch=2, seed=50)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads()
    calls = []
    hooks = [layer.self_attn_norm.register_forward_pre_hook(lambda *a: calls.append(1))
             for layer in list(model.model.encoder.layers) + list(model.model.decoder.layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    try:
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        n_forward = len(calls)
        loss.backward()
        n_recomputed = len(calls) - n_forward
    finally:
        for h in hooks:
            h.remove()
    assert n_recomputed > 0, "gradient checkpointing did not recompute any layer"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-12, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_checkpointing_continuing_a_cache(fast):
    """Training from a cache whose partial segment the call continues (decoder chunks that start mid-segment) with
    gradient checkpointing on raised a bare RuntimeError in backward ("modified by an inplace operation": the
    recomputed decoder layer scattered its keys into the buffer its first pass had saved). Gradients now equal the
    non-checkpointed ones, on the aligned path and the general planner (left padding)."""
    model = build_tiny_memformer(attn="eager").train()
    model.model.use_fast_paths = fast
    with torch.no_grad():
        past = model(rand_ids(6, batch=2, seed=1), use_cache=True)[CACHE_KWARG]
    ids = rand_ids(7, batch=2, seed=2, boot=False)
    mask = torch.ones_like(ids)
    if not fast:
        mask[1, :2] = 0

    def grads_of_call() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=ids, use_cache=True, **{CACHE_KWARG: copy.deepcopy(past)}).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads_of_call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    got = grads_of_call()
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-12, rtol=1e-10, msg=name)


def test_tuple_output_and_logits_to_keep():
    model = build_tiny_memformer(attn="sdpa")
    ids = rand_ids(11, batch=2, seed=60)
    with torch.no_grad():
        out = model(ids)
        tup = model(ids, return_dict=False)
        last = model(ids, logits_to_keep=1)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out.logits, atol=0, rtol=0)
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1], atol=1e-10, rtol=0)
    torch.testing.assert_close(last[CACHE_KWARG].memory, out[CACHE_KWARG].memory, atol=1e-10, rtol=0)


def test_writer_self_bias_and_forget_bias_scale_init():
    """`memory_write_self_bias` starts every slot's self score at that bias (a large one retains the slot, as the
    one-hot test above); `forget_bias_init_scale` sets the initial norm of v_bias."""
    d = 64
    model = build_tiny_memformer(seed=3, randomize=False, hidden_size=d, num_attention_heads=4, intermediate_size=64,
                                 memory_write_self_bias=30.0, forget_bias_init_scale=0.05, num_memory_slots=64)
    writer = model.model.writer
    assert torch.equal(writer.self_bias.detach(), torch.full((64,), 30.0, dtype=torch.float64))
    norms = writer.forget_bias.detach().norm(dim=-1)
    assert 0.035 < float(norms.mean()) < 0.065  # E‖v_bias‖ ≈ 0.05 (N(0, 0.05²/d) per element)
    memory = unit_memory(2, seed=1, k=64, d=d)
    tokens = torch.randn(2, 5, d, dtype=torch.float64)
    with torch.no_grad():
        new, probs = writer(memory, tokens, torch.ones(2, 5, dtype=torch.bool))
    assert float(probs[..., 0].min()) > 1 - 1e-9  # all attention on the slot itself
    vb = writer.forget_bias.detach()
    torch.testing.assert_close(new, (memory + vb) / (memory + vb).norm(dim=-1, keepdim=True), atol=1e-8, rtol=0)
    assert build_tiny_memformer(seed=3).model.writer.self_bias is None  # default: the paper's writer


def test_writer_self_bias_spread_gives_a_range_of_retention(tmp_path):
    """`memory_write_self_bias_spread` starts the slots' self biases evenly over bias ± spread/2, so that with the same
    segment some slots keep their content and others are overwritten; a reload keeps the trained values."""
    d, k = 64, 8
    model = build_tiny_memformer(seed=3, randomize=False, hidden_size=d, num_attention_heads=4, intermediate_size=64,
                                 memory_write_self_bias=2.0, memory_write_self_bias_spread=40.0, num_memory_slots=k)
    writer = model.model.writer
    torch.testing.assert_close(writer.self_bias.detach(), torch.linspace(-18.0, 22.0, k, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # initialised in float32
    memory = unit_memory(1, seed=1, k=k, d=d)
    with torch.no_grad():
        _, probs = writer(memory, torch.randn(1, 5, d, dtype=torch.float64), None)
    self_weight = probs[0, :, :, 0].mean(0)  # [K], averaged over heads
    assert float(self_weight[0]) < 1e-6 and float(self_weight[-1]) > 1 - 1e-6  # overwritten ... retained
    assert bool((self_weight[1:] >= self_weight[:-1] - 1e-12).all())  # monotone in the bias
    with torch.no_grad():
        writer.self_bias.add_(0.5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float64)
    assert reloaded.config.memory_write_self_bias_spread == 40.0
    torch.testing.assert_close(reloaded.model.writer.self_bias, writer.self_bias, atol=0, rtol=0)


def test_writer_self_bias_spread_with_one_slot_keeps_the_bias():
    """With `num_memory_slots=1` the spread put the only slot's self bias at bias - spread/2 (`linspace` of one point
    is its start): `memory_write_self_bias=2, spread=4` started the slot at 0 instead of 2, so the "retain" start
    asked for was silently lost. One slot sits at the centre of bias ± spread/2, i.e. at the bias."""
    model = build_tiny_memformer(seed=3, randomize=False, num_memory_slots=1, memory_write_self_bias=2.0,
                                 memory_write_self_bias_spread=4.0)
    torch.testing.assert_close(model.model.writer.self_bias.detach(), torch.tensor([2.0], dtype=torch.float64))
    model = build_tiny_memformer(seed=3, randomize=False, num_memory_slots=2, memory_write_self_bias=2.0,
                                 memory_write_self_bias_spread=4.0)
    torch.testing.assert_close(model.model.writer.self_bias.detach(), torch.tensor([0.0, 4.0], dtype=torch.float64))
