"""Shared fixtures for the Memformer test suite (tiny sharp models) and an independent reference implementation.

The scaffolding (tiny config, model builder, padding, launchers) is in `helpers.py`; the names below are re-exported
from there for tests that import them from `conftest`.

The reference (`reference_stream`, `reference_writer`) re-implements the model (docs/design.md#model) directly from
the parameters of a model (looked up by their checkpoint names, docs/design.md#parameter-names) with plain
per-segment / per-head loops. It shares no code with `memformer_hf.modeling_memformer`, so agreeing with it is
evidence, not a tautology.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (  # noqa: F401 - re-exported, see the docstring
    BOS,
    EOS,
    PAD,
    TINY_MEMFORMER,
    build_tiny_memformer,
    cache_tensors,
    rand_ids,
    randomize_biases_and_norms,
    tiny_memformer_config,
)

# Tiny models are dominated by per-op overhead; intra-op threads only add contention (10-50x slower on a busy box).
torch.set_num_threads(1)


@pytest.fixture
def tiny_memformer():
    """Factory: `tiny_memformer(seed=0, dtype=torch.float64, attn="eager", randomize=True, **config_overrides)`."""
    return build_tiny_memformer


@pytest.fixture
def tiny_memformer_cfg():
    """Factory: `tiny_memformer_cfg(**overrides)` → MemformerConfig."""
    return tiny_memformer_config


# ================================================================= independent reference (docs/design.md#model)
class _P:
    """Parameter access by checkpoint name, relative to the base model (`model.` prefix stripped)."""

    def __init__(self, model):
        sd = model.state_dict()
        self.p = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        self.lm_head = sd.get("lm_head.weight", self.p["embed_tokens.weight"])
        self.cfg = model.config

    def __getitem__(self, name):
        return self.p[name]

    def lin(self, x, name):
        return x @ self.p[name + ".weight"].T + self.p[name + ".bias"]

    def ln(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.p[name + ".weight"], self.p[name + ".bias"],
                            self.cfg.layer_norm_eps)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, H, dh], pos [T]: rotate pairs (i, i + dh/2) by pos * theta^(-2i/dh). Angles in float32, as HF does."""
    dh = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    ang = pos.float()[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None]
    half = dh // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _self_attention(P: _P, prefix: str, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Self-attention of one segment x [T, d] with in-segment positions 0..T-1 (RoPE or simplified RPE)."""
    cfg = P.cfg
    T, d = x.shape
    H, dh = cfg.num_attention_heads, d // cfg.num_attention_heads
    q = P.lin(x, prefix + ".q_proj").view(T, H, dh)
    k = P.lin(x, prefix + ".k_proj").view(T, H, dh)
    v = P.lin(x, prefix + ".v_proj").view(T, H, dh)
    pos = torch.arange(T)
    if cfg.position_embedding_type == "rope":
        theta = float(cfg.rope_parameters.get("rope_theta", 1e4))
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    out = torch.zeros(T, H, dh, dtype=x.dtype)
    L = cfg.segment_length
    for h in range(H):
        for i in range(T):
            keys = range(i + 1) if causal else range(T)
            logits = []
            for j in keys:
                s = q[i, h] @ k[j, h]
                if cfg.position_embedding_type == "simplified_rpe":
                    s = s + q[i, h] @ P[prefix + ".rel_pos.weight"][max(-(L - 1), min(L - 1, i - j)) + L - 1]
                logits.append(s / math.sqrt(dh))
            p = torch.softmax(torch.stack(logits), 0)
            for a, j in zip(p, keys):
                val = v[j, h]
                if cfg.position_embedding_type == "simplified_rpe":
                    val = val + P[prefix + ".rel_pos.weight"][max(-(L - 1), min(L - 1, i - j)) + L - 1]
                out[i, h] = out[i, h] + a * val
    return P.lin(out.reshape(T, d), prefix + ".o_proj")


def _cross_attention(P: _P, prefix: str, x: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
    """x [T, d] attends to all rows of mem [S, d] (no positions). S = 0: the sublayer outputs exactly 0
    (docs/design.md#boot-segment). With `cross_attention_rope` the queries are rotated at their positions 0..T-1 and
    row j of mem (token j of the previous segment) at j - L + 1 (docs/design.md#cross-attention-rope)."""
    if mem is None or mem.shape[0] == 0:
        return torch.zeros_like(x)
    T, d = x.shape
    H = P.cfg.num_attention_heads
    dh = d // H
    q = P.lin(x, prefix + ".q_proj").view(T, H, dh)
    k = P.lin(mem, prefix + ".k_proj").view(-1, H, dh)
    if getattr(P.cfg, "cross_attention_rope", False):
        theta = float(P.cfg.rope_parameters.get("rope_theta", 1e4))
        q = _rope(q, torch.arange(T), theta)
        k = _rope(k, torch.arange(mem.shape[0]) - (P.cfg.segment_length - 1), theta)
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    v = P.lin(mem, prefix + ".v_proj").view(-1, H, dh).transpose(0, 1)
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
    return P.lin(out.transpose(0, 1).reshape(T, d), prefix + ".o_proj")


def _ffn(P: _P, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return P.lin(F.gelu(P.lin(x, prefix + ".fc1")), prefix + ".fc2")


def reference_writer(P: _P, memory: torch.Tensor, tokens: torch.Tensor, return_probs: bool = False):
    """docs/design.md#writer and #bmn for one row, written out slot by slot and head by head.

    memory [K, d], tokens [S, d] (valid tokens only, S may be 0) → new memory [K, d] (and probs [H, K, 1+S])."""
    cfg = P.cfg
    K, d = memory.shape
    Hw = cfg.memory_write_heads
    dw = d // Hw
    tau = cfg.memory_write_temperature
    if cfg.learnable_temperature:
        tau = float(P["writer.log_temperature"].exp())
    Wq = lambda x: P.lin(x, "writer.q_proj")  # noqa: E731
    Wk = lambda x: P.lin(x, "writer.k_proj")  # noqa: E731
    Wv = lambda x: P.lin(x, "writer.v_proj")  # noqa: E731
    new = torch.zeros_like(memory)
    probs = torch.zeros(Hw, K, 1 + tokens.shape[0], dtype=memory.dtype)
    for i in range(K):
        qi, ki = Wq(memory[i]), Wk(memory[i])
        kt, vt = Wk(tokens), Wv(tokens)
        for h in range(Hw):
            sl = slice(h * dw, (h + 1) * dw)
            scores = torch.stack([qi[sl] @ ki[sl]] + [qi[sl] @ kt[j, sl] for j in range(tokens.shape[0])])
            if cfg.memory_write_qk_norm:  # cosine of the head slices instead of the scaled dot product
                norms = torch.stack([qi[sl].norm() * ki[sl].norm()] + [qi[sl].norm() * kt[j, sl].norm()
                                                                       for j in range(tokens.shape[0])])
                scores = scores / norms / tau
            else:
                scores = scores / math.sqrt(dw) / tau
            if cfg.memory_write_self_bias is not None:  # a learned bias on the slot's score on itself only
                scores = scores + torch.nn.functional.one_hot(torch.tensor(0), len(scores)) * P["writer.self_bias"][i]
            a = torch.softmax(scores, 0)
            probs[h, i] = a
            value = a[0] * memory[i, sl]  # the RAW slot slice is the self value
            for j in range(tokens.shape[0]):
                value = value + a[1 + j] * vt[j, sl]
            new[i, sl] = value
    if cfg.writer_out_proj:
        new = P.lin(new, "writer.out_proj")
    vb = P["writer.forget_bias"]
    biased = new + vb if cfg.use_forget_bias else new
    out = biased / biased.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (out, probs) if return_probs else out


def reference_initial_memory(P: _P) -> torch.Tensor:
    vb = P["writer.forget_bias"]
    return vb / vb.norm(dim=-1, keepdim=True)


def reference_encode(P: _P, ids: list[int], memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = Enc(s, M) and M' = Write(M, H) for one segment `ids` (may be empty)."""
    if not ids:
        H = torch.zeros(0, P.cfg.hidden_size, dtype=memory.dtype)
        return H, reference_writer(P, memory, H)
    h = P["embed_tokens.weight"][torch.tensor(ids)]
    Hh, dh = P.cfg.num_attention_heads, P.cfg.hidden_size // P.cfg.num_attention_heads
    for i in range(P.cfg.encoder_layers):
        pre = f"encoder.layers.{i}"
        h = h + _self_attention(P, pre + ".self_attn", P.ln(h, pre + ".self_attn_norm"), causal=False)
        x = P.ln(h, pre + ".memory_read_norm")
        mem = P.ln(memory, pre + ".memory_kv_norm") if P.cfg.normalize_memory_kv else memory
        q = P.lin(x, pre + ".memory_read.q_proj").view(-1, Hh, dh).transpose(0, 1)
        k = P.lin(mem, pre + ".memory_read.k_proj").view(-1, Hh, dh).transpose(0, 1)
        v = P.lin(mem, pre + ".memory_read.v_proj").view(-1, Hh, dh).transpose(0, 1)
        read = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v).transpose(0, 1).reshape(len(ids), -1)
        h = h + P.lin(read, pre + ".memory_read.o_proj")
        h = h + _ffn(P, pre + ".ffn", P.ln(h, pre + ".ffn_norm"))
    H = P.ln(h, "encoder.norm")
    return H, reference_writer(P, memory, H)


def reference_decode(P: _P, ids: list[int], cross: torch.Tensor) -> torch.Tensor:
    """Causal decoder over `ids` (first is BOS) cross-attending to `cross` → logits [len(ids), V]."""
    y = P["embed_tokens.weight"][torch.tensor(ids)]
    for i in range(P.cfg.decoder_layers):
        pre = f"decoder.layers.{i}"
        y = y + _self_attention(P, pre + ".self_attn", P.ln(y, pre + ".self_attn_norm"), causal=True)
        y = y + _cross_attention(P, pre + ".cross_attn", P.ln(y, pre + ".cross_attn_norm"), cross)
        y = y + _ffn(P, pre + ".ffn", P.ln(y, pre + ".ffn_norm"))
    return P.ln(y, "decoder.norm") @ P.lm_head.T


def reference_cross(P: _P, H: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """What the decoder cross-attends to after encoding H and writing `memory`: H (the paper), or with
    `decoder_reads_memory` the rows of H followed by the K normalised slots (docs/design.md#decoder-reads-memory)."""
    if not getattr(P.cfg, "decoder_reads_memory", False):
        return H
    return torch.cat([H, P.ln(memory, "decoder_memory_norm")], 0)


def reference_stream(model, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-stream view (docs/design.md#logits-convention) of one unpadded row: logits [n, V] (`logits[i]` predicts
    token i+1) and the final memory [K, d]. In "bos" mode `tokens[0]` must be BOS (the boot segment); in "empty"
    mode the boot is ∅."""
    P = _P(model)
    cfg = model.config
    L, bos = cfg.segment_length, cfg.bos_token_id
    logits = torch.full((len(tokens), cfg.vocab_size), float("nan"), dtype=P["embed_tokens.weight"].dtype)
    memory = reference_initial_memory(P)
    if cfg.first_segment_context == "bos":
        assert tokens[0] == bos
        cross, memory = reference_encode(P, [bos], memory)
        prev_col, start = 0, 1
    else:
        cross, memory = reference_encode(P, [], memory)
        prev_col, start = None, 0
    cross = reference_cross(P, cross, memory)
    while True:
        cols = list(range(start, min(start + L, len(tokens))))
        seg = [tokens[c] for c in cols]
        full = len(seg) == L
        dec_in = [bos] + (seg[:-1] if full else seg)
        out_cols = [prev_col] + (cols[:-1] if full else cols)
        out = reference_decode(P, dec_in, cross)
        for j, c in enumerate(out_cols):
            if c is not None:
                logits[c] = out[j]
        if not full:
            return logits, memory
        cross, memory = reference_encode(P, seg, memory)
        cross = reference_cross(P, cross, memory)
        prev_col, start = cols[-1], start + L
