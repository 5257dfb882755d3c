"""Property-based tests (hypothesis) over small configurations and input shapes: the stream forward never fails on
valid input and stays finite, a left-padded batch equals each row run alone, and any chunking of the input with the
cache carried equals one forward over the whole input."""

from __future__ import annotations

import torch
from helpers import build_tiny_memformer, left_pad
from hypothesis import given, settings
from hypothesis import strategies as st

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.modeling_memformer import CACHE_KWARG

VOCAB, PAD, BOS = 23, 0, 1


@st.composite
def setups(draw):
    heads = draw(st.sampled_from([1, 2]))
    cfg = MemformerConfig(
        vocab_size=VOCAB, hidden_size=8 * heads, num_attention_heads=heads, intermediate_size=16,
        encoder_layers=draw(st.integers(1, 2)), decoder_layers=draw(st.integers(1, 2)),
        segment_length=draw(st.integers(2, 5)), num_memory_slots=draw(st.integers(1, 3)),
        position_embedding_type=draw(st.sampled_from(["rope", "simplified_rpe", "none"])),
        first_segment_context=draw(st.sampled_from(["bos", "empty"])),
        normalize_memory_kv=draw(st.booleans()), initializer_range=0.3, bos_token_id=BOS, eos_token_id=2,
        pad_token_id=PAD)
    rows = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 13)) for _ in range(rows)]
    seed = draw(st.integers(0, 2**16))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(lengths)), max_size=3))))
    return cfg, lengths, seed, cuts


def build(cfg: MemformerConfig, seed: int) -> MemformerForCausalLM:
    return build_tiny_memformer(seed, config=cfg, randomize=False, attn=None)


def left_padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows of the given lengths, an explicit boot (BOS) on every other row, left-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (m,), generator=g) for m in lengths]
    for r in range(0, len(rows), 2):
        rows[r][0] = BOS  # explicit boot on some rows, implicit on the others
    return left_pad(rows, pad=PAD)


@settings(max_examples=25, deadline=None)
@given(setups())
def test_batched_equals_unbatched_and_finite(setup):
    cfg, lengths, seed, _ = setup
    model = build(cfg, seed)
    ids, mask = left_padded(lengths, seed)
    n = ids.shape[1]
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert torch.isfinite(out.memory).all()
        for r, m in enumerate(lengths):
            alone = model(ids[r:r + 1, n - m:])
            assert torch.isfinite(alone.logits).all()
            torch.testing.assert_close(out.logits[r, n - m:], alone.logits[0], atol=1e-9, rtol=0)
            torch.testing.assert_close(out.memory[r], alone.memory[0], atol=1e-9, rtol=0)


@settings(max_examples=25, deadline=None)
@given(setups())
def test_chunked_equals_whole(setup):
    cfg, lengths, seed, cuts = setup
    model = build(cfg, seed)
    ids, mask = left_padded(lengths, seed)
    n = ids.shape[1]
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        cache, parts = None, []
        bounds = [0] + [c for c in cuts if c < n] + [n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache)
            cache = out[CACHE_KWARG]
            parts.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], whole.logits[real], atol=1e-9, rtol=0)
    torch.testing.assert_close(cache.memory, whole.memory, atol=1e-9, rtol=0)
    assert cache.get_seq_length() == n
