"""`cross_attention_rope` (beyond the paper, docs/design.md#cross-attention-rope): the decoder's cross-attention
rotates its queries at the decoder positions and the previous segment's keys at j - L + 1, so its scores depend on
the true distance. Every path must compute the same function as the independent reference (conftest.py
`_cross_attention`, which rotates by hand): the whole-stream forward, token-by-token decoding with the cache, chunked
prefill, the aligned fast path and the general planner (padding, mixed row states, resets), cell mode, MRBP == BPTT,
save → load. With the option off nothing changes.

Tiny sharp float64 models (docs/design.md#testing)."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_stream
from helpers import BOS, L, assert_config_refused, build_tiny_memformer, decode_columns, left_pad, rand_ids
from test_decoder_reads_memory import run_chunks
from test_fast_paths import assert_same, both
from test_mrbp import (  # noqa: F401 - _one_thread: the module's autouse fixture (one intra-op thread)
    LAYOUTS,
    _one_thread,
    _stream_check,
    assert_grads_close,
    build_model,
    carry_memory,
    rand_doc,
    reference_bptt,
    run_cells,
    stream_window,
)

from memformer_hf import MemformerCache, MemformerForCausalLM
from memformer_hf.cache_memformer import config_fingerprint
from memformer_hf.modeling_memformer import CACHE_KWARG

CR = dict(cross_attention_rope=True)


@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_stream_equals_reference_tokenwise_and_chunks(boot):
    model = build_tiny_memformer(first_segment_context=boot, **CR)
    ids = rand_ids(3 * L + 2, seed=1, boot=(boot == "bos"))
    n = ids.shape[1]
    with torch.no_grad():
        full = model(ids, use_cache=True)
        tok_logits, tok_cache = run_chunks(model, ids, [1] * n)
        ch_logits, ch_cache = run_chunks(model, ids, [3, 1, 5, 2, n - 11])
        model.model.use_fast_paths = False
        general = model(ids)
        model.model.use_fast_paths = True
    ref_logits, ref_memory = reference_stream(model, ids[0].tolist())
    torch.testing.assert_close(full.logits[0], ref_logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(full.memory[0], ref_memory, atol=1e-12, rtol=0)
    for logits in (tok_logits, ch_logits, general.logits):
        torch.testing.assert_close(logits, full.logits, atol=1e-10, rtol=0)
    for cache in (tok_cache, ch_cache):
        torch.testing.assert_close(cache.memory, full.memory, atol=1e-12, rtol=0)
    # the option changes the function (only from the second segment on: the first reads the boot segment)
    plain = build_tiny_memformer(first_segment_context=boot)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = (plain(ids).logits - full.logits).abs()
    assert diff[0, L + 1:].max() > 1e-3


def test_scores_depend_on_the_distance_to_the_previous_segment():
    """The same query at decoder positions 0 and 1 over the same two keys: the outputs differ only with the option
    (without it the cross-attention reads the previous segment as a set, whatever the query's position)."""
    for on in (False, True):
        model = build_tiny_memformer(seed=3, cross_attention_rope=on)
        layer = model.model.decoder.layers[0]
        states = torch.randn(1, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        key, value = layer.project_cross_kv(states[:, :2])
        hidden = torch.randn(1, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).expand(1, 2, 16)
        pos = model.model.rotary(torch.arange(2)[None], torch.float64)
        with torch.no_grad():
            out = layer.cross_attn.attend(hidden, key, value, None, pos if on else None)
        gap = float((out[0, 0] - out[0, 1]).abs().max())
        assert gap > 1e-6 if on else gap < 1e-14


@pytest.mark.parametrize("n", [1, 5, 13])
def test_aligned_equals_general_fresh_continued_and_reset(n):
    model = build_tiny_memformer(seed=2, **CR)
    with torch.no_grad():
        assert_same(*both(model, rand_ids(n, batch=3, seed=n), use_cache=True))
        cache = model(rand_ids(3, batch=2, seed=7), use_cache=True)[CACHE_KWARG]
        assert_same(*both(model, rand_ids(n, batch=2, seed=8, boot=False), use_cache=True, **{CACHE_KWARG: cache}))
        assert_same(*both(model, rand_ids(n, batch=2, seed=9), use_cache=True, memory_reset=torch.tensor([True, True]),
                          **{CACHE_KWARG: cache}))


def test_padded_mixed_batch_equals_rows_alone_and_decode_step():
    """Left padding (the general planner), then token-by-token decoding (the in-place decoder step, which computes
    the cross K/V at each boundary) across boundaries: each row equals the row alone."""
    model = build_tiny_memformer(seed=3, attn="sdpa", **CR)
    rows = [rand_ids(n, seed=30 + i, boot=i != 1)[0] for i, n in enumerate([13, 9, 6])]
    ids, mask = left_pad(rows)
    extra = rand_ids(2 * L + 1, batch=3, seed=40, boot=False)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        steps, cache = decode_columns(model, extra, mask, out[CACHE_KWARG])
        n = ids.shape[1]
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, extra[i]])[None])
            k = len(r)
            torch.testing.assert_close(out.logits[i, n - k:], alone.logits[0, :k], atol=1e-10, rtol=0)
            torch.testing.assert_close(steps[i], alone.logits[0, k:], atol=1e-10, rtol=0)


def test_cell_mode_equals_stream():
    model = build_tiny_memformer(seed=4, **CR)
    ids = rand_ids(1 + 2 * L, batch=2, seed=4)
    with torch.no_grad():
        stream = model(ids)
        boot = model(encoder_input_ids=ids[:, :1], decoder_input_ids=torch.cat(
            [torch.full((2, 1), BOS), ids[:, 1:L]], 1))
        cell = model(encoder_input_ids=ids[:, 1:L + 1], memory=boot.memory, decoder_input_ids=torch.cat(
            [torch.full((2, 1), BOS), ids[:, L + 1:2 * L]], 1))
    torch.testing.assert_close(boot.logits, stream.logits[:, :L], atol=1e-10, rtol=0)
    torch.testing.assert_close(cell.logits, stream.logits[:, L:2 * L], atol=1e-10, rtol=0)


@pytest.mark.parametrize("T", [2, 5])
def test_cells_mrbp_equals_bptt_and_independent_loop(T):
    model = build_model(seed=T, dropout=0.2, **CR)
    cells = stream_window(LAYOUTS[T], T, "bos", seed=T)
    memory = carry_memory(model, cells["encoder_input_ids"].shape[0])
    seeds = [1000 + 17 * t for t in range(T)]
    loss_b, mem_b, g_b = run_cells(model, cells, memory, mode="bptt", seeds=seeds)
    loss_m, mem_m, g_m = run_cells(model, cells, memory, mode="mrbp", seeds=seeds)
    loss_r, mem_r, g_r, _ = reference_bptt(model, cells, memory, seeds=seeds)
    assert_grads_close(g_m, g_b, what=f"cross rope mrbp vs bptt T={T}")
    assert_grads_close(g_m, g_r, what=f"cross rope mrbp vs independent loop T={T}")
    torch.testing.assert_close(loss_m, loss_b, rtol=1e-12, atol=0)


def test_stream_mrbp_equals_backward_with_padding():
    gen = torch.Generator().manual_seed(92)
    model = build_model(seed=92, **CR)
    prev_ids, prev_am = left_pad([[BOS] + rand_doc(6, gen), rand_doc(9, gen), rand_doc(4, gen)])
    _stream_check(model, prev_ids, prev_am, what="cross rope stream padded")
    aligned = rand_ids(10, batch=2, seed=7)
    _stream_check(model, aligned, torch.ones_like(aligned), what="cross rope stream aligned")


def test_save_load_cache_state_and_fingerprint(tmp_path):
    model = build_tiny_memformer(seed=6, **CR)
    ids = rand_ids(11, batch=2, seed=6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    model.save_pretrained(tmp_path / "m")
    loaded = MemformerForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float64).eval()
    assert loaded.config.cross_attention_rope is True
    assert set(loaded.state_dict()) == set(build_tiny_memformer().state_dict())  # no new parameter
    more = rand_ids(6, batch=2, seed=7, boot=False)
    path = str(tmp_path / "state.safetensors")
    out[CACHE_KWARG].save_state(path)
    state = MemformerCache.load_state(path, loaded.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(more, past_key_values=state).logits,
                                   model(more, past_key_values=out[CACHE_KWARG]).logits, atol=1e-12, rtol=0)
    # rotated cross keys are not those of the default configuration: its states are refused
    default = build_tiny_memformer().config
    assert config_fingerprint(default) != config_fingerprint(loaded.config)
    with pytest.raises(ValueError, match="different Memformer configuration"):
        MemformerCache.load_state(path, default)


@pytest.mark.parametrize("overrides,message", [
    (dict(cross_attention_rope="yes"), "True or False"),
    (dict(cross_attention_rope=True, position_embedding_type="simplified_rpe"), "position_embedding_type"),
    (dict(cross_attention_rope=True, decoder_reads_memory=True), "decoder_reads_memory"),
])
def test_bad_combinations_are_refused(tmp_path, overrides, message):
    assert_config_refused(tmp_path, overrides, "cross_attention_rope", message)
