"""Options beyond the paper for the decoder's cross-attention:

* `decoder_reads_memory` (docs/design.md#decoder-reads-memory): for segment t+1 it reads [H_t ; N(M_{t+1})];
* `cross_attention_rope` (docs/design.md#cross-attention-rope): it sees the previous segment's positions (queries
  rotated at the decoder positions, the keys of H_t at j - L + 1).

With either option every path must compute the same function as the independent reference (conftest.py
`reference_stream`, which builds the context and rotates by hand): the whole-stream forward, token-by-token decoding
with the cache, chunked prefill, the aligned fast path and the general planner (padding, mixed row states, resets),
cell mode, MRBP (stream and cell APIs) == BPTT, save → load. With the options off nothing changes.

Tiny sharp float64 models (docs/design.md#testing)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import _P, reference_stream
from helpers import (
    BOS,
    L,
    assert_config_refused,
    build_tiny_memformer,
    decode_columns,
    left_pad,
    rand_ids,
    tiny_memformer_config,
)
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
from memformer_hf.modeling_memformer import CACHE_KWARG, DecoderPlan

K = 3  # num_memory_slots of the tiny config
DM = dict(decoder_reads_memory=True)
CR = dict(cross_attention_rope=True)
OPTIONS = pytest.mark.parametrize("opts", [DM, CR], ids=["decoder_reads_memory", "cross_attention_rope"])


def run_chunks(model, ids, sizes, mask=None):
    cache, logits, pos = None, [], 0
    for s in sizes:
        am = None if mask is None else mask[:, : pos + s]
        out = model(ids[:, pos: pos + s], attention_mask=am, past_key_values=cache, use_cache=True)
        cache, pos = out[CACHE_KWARG], pos + s
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


# ============================================================================================ the function
@OPTIONS
@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_stream_equals_reference_tokenwise_and_chunks(boot, opts):
    model = build_tiny_memformer(first_segment_context=boot, **opts)
    assert (model.model.decoder_memory_norm is not None) == (opts is DM)
    ids = rand_ids(18, seed=1, boot=(boot == "bos"))
    with torch.no_grad():
        full = model(ids, use_cache=True)
        tok_logits, tok_cache = run_chunks(model, ids, [1] * 18)
        ch_logits, ch_cache = run_chunks(model, ids, [3, 1, 5, 2, 7])
        model.model.use_fast_paths = False
        general = model(ids)
        model.model.use_fast_paths = True
    ref_logits, ref_memory = reference_stream(model, ids[0].tolist())
    torch.testing.assert_close(full.logits[0], ref_logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(full.memory[0], ref_memory, atol=1e-12, rtol=0)
    for logits in (tok_logits, ch_logits, general.logits):
        torch.testing.assert_close(logits, full.logits, atol=1e-10, rtol=0)
    width = L + K if opts is DM else L
    for cache in (tok_cache, ch_cache, full[CACHE_KWARG]):
        torch.testing.assert_close(cache.memory, full.memory, atol=1e-12, rtol=0)
        assert cache.cross_mask.shape == (1, width) and bool(cache.cross_mask[:, L:].all())
        for layer in cache.layers:
            assert layer.cross_keys.shape[2] == layer.cross_values.shape[2] == width
            assert layer.keys.shape[2] == L
    # the option changes the function: the same weights without it give other logits (with cross_attention_rope
    # from the second segment on: the first reads the one-token boot segment, whatever its position)
    paper = build_tiny_memformer(first_segment_context=boot)
    paper.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert (paper(ids).logits - full.logits)[:, L + 1:].abs().max() > 1e-3


@OPTIONS
def test_sdpa_equals_eager_and_generate_equals_argmax_loop(opts):
    eager = build_tiny_memformer(attn="eager", **opts)
    sdpa = build_tiny_memformer(attn="sdpa", **opts)
    ids = rand_ids(11, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, atol=1e-10, rtol=0)
        gen = sdpa.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(7):  # no cache: the whole sequence each time
            seq = torch.cat([seq, sdpa(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)


@OPTIONS
@pytest.mark.parametrize("n", [1, 5, 13])
def test_aligned_equals_general_fresh_continued_and_reset(n, opts):
    model = build_tiny_memformer(seed=2, **opts)
    with torch.no_grad():
        assert_same(*both(model, rand_ids(n, batch=3, seed=n), use_cache=True))
        assert_same(*both(model, rand_ids(n, batch=3, seed=n, boot=False), use_cache=True, logits_to_keep=1))
        cache = model(rand_ids(3, batch=2, seed=7), use_cache=True)[CACHE_KWARG]
        assert_same(*both(model, rand_ids(n, batch=2, seed=8, boot=False), use_cache=True, **{CACHE_KWARG: cache}))
        assert_same(*both(model, rand_ids(n, batch=2, seed=9), use_cache=True, memory_reset=torch.tensor([True, True]),
                          **{CACHE_KWARG: cache}))


@OPTIONS
def test_padded_mixed_batch_equals_rows_alone_and_decode_step(opts):
    """Left padding (rows at different segment phases: the general planner), then token-by-token decoding (the
    in-place decoder step, which projects the cross K/V at each boundary) across boundaries and a reset of one row:
    each row equals the row alone."""
    model = build_tiny_memformer(seed=3, attn="sdpa", **opts)
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
            torch.testing.assert_close(cache.memory[i], alone.memory[0], atol=1e-12, rtol=0)
        # row 1 restarts a document in a call that continues the others (mixed row states)
        new = torch.tensor([rand_doc(6, torch.Generator().manual_seed(1)), [BOS] + rand_doc(5, torch.Generator()),
                            rand_doc(6, torch.Generator().manual_seed(2))])
        reset = torch.tensor([False, True, False])
        fast, general = both(model, new, use_cache=True, memory_reset=reset, **{CACHE_KWARG: cache})
        assert_same(fast, general)
        torch.testing.assert_close(fast.logits[1], model(new[1:2]).logits[0], atol=1e-10, rtol=0)


@OPTIONS
def test_cell_mode_equals_stream(opts):
    """A cell (encoder [BOS + segment], decoder over the next segment) equals the stream's logits for that segment."""
    model = build_tiny_memformer(seed=4, **opts)
    ids = rand_ids(1 + 2 * L, batch=2, seed=4)
    with torch.no_grad():
        stream = model(ids)
        boot = model(encoder_input_ids=ids[:, :1], decoder_input_ids=torch.cat(
            [torch.full((2, 1), BOS), ids[:, 1:L]], 1))
        cell = model(encoder_input_ids=ids[:, 1:L + 1], memory=boot.memory, decoder_input_ids=torch.cat(
            [torch.full((2, 1), BOS), ids[:, L + 1:2 * L]], 1))
    torch.testing.assert_close(boot.logits, stream.logits[:, :L], atol=1e-10, rtol=0)
    torch.testing.assert_close(cell.logits, stream.logits[:, L:2 * L], atol=1e-10, rtol=0)


@pytest.mark.parametrize("on", [False, True])
def test_decoder_depends_on_the_memory_directly(on):
    """Encoder readers zeroed (H does not depend on the memory): the next segment's logits still depend on
    M_{t+1} (through the memory given to the cell, or the writer's forgetting vector) with the option, not without."""
    model = build_tiny_memformer(seed=5, decoder_reads_memory=on)
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            layer.memory_read.o_proj.weight.zero_()
            layer.memory_read.o_proj.bias.zero_()
    enc, dec = rand_ids(L, batch=2, seed=5, boot=False), rand_ids(L, batch=2, seed=6)
    m1, m2 = carry_memory(model, 2, seed=1), carry_memory(model, 2, seed=2)
    with torch.no_grad():
        a = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=m1)
        b = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=m2)
        fb = model.model.writer.forget_bias  # (a random change: LayerNorm removes a constant shift)
        fb.add_(0.5 * torch.randn(fb.shape, generator=torch.Generator().manual_seed(0), dtype=fb.dtype))
        c = model(encoder_input_ids=enc, decoder_input_ids=dec, memory=m1)
    assert (a.memory - b.memory).abs().max() > 1e-2  # M_{t+1} differs
    for other in (b, c):
        diff = float((a.logits - other.logits).abs().max())
        assert diff > 1e-3 if on else diff == 0.0


# ============================================================================================ training
@OPTIONS
@pytest.mark.parametrize("T", [2, 5])
def test_cells_mrbp_equals_bptt_and_independent_loop(T, opts):
    model = build_model(seed=T, dropout=0.2, **opts)
    cells = stream_window(LAYOUTS[T], T, "bos", seed=T)
    memory = carry_memory(model, cells["encoder_input_ids"].shape[0])
    seeds = [1000 + 17 * t for t in range(T)]
    loss_b, mem_b, g_b = run_cells(model, cells, memory, mode="bptt", seeds=seeds)
    loss_m, mem_m, g_m = run_cells(model, cells, memory, mode="mrbp", seeds=seeds)
    loss_r, mem_r, g_r, _ = reference_bptt(model, cells, memory, seeds=seeds)
    assert_grads_close(g_m, g_b, what=f"{opts} mrbp vs bptt T={T}")
    assert_grads_close(g_m, g_r, what=f"{opts} mrbp vs independent loop T={T}")
    if opts is DM:
        assert float(g_m["model.decoder_memory_norm.weight"].abs().max()) > 1e-6
    torch.testing.assert_close(loss_m, loss_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(mem_m, mem_b, rtol=1e-12, atol=1e-14)


@OPTIONS
@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_stream_mrbp_equals_backward_with_padding_cache_and_resets(boot, opts):
    gen = torch.Generator().manual_seed(92)
    model = build_model(seed=92, boot=boot, **opts)
    prev_ids, prev_am = left_pad([[BOS] + rand_doc(6, gen), rand_doc(9, gen), rand_doc(4, gen)])
    _stream_check(model, prev_ids, prev_am, what=f"{opts} stream padded {boot}")  # irregular: per-step replay
    with torch.no_grad():
        past = model(prev_ids, attention_mask=prev_am, use_cache=True)[CACHE_KWARG]
    ids = torch.tensor([rand_doc(9, gen), [BOS] + rand_doc(8, gen), rand_doc(9, gen)])
    _stream_check(model, ids, torch.ones_like(ids), past=past, memory_reset=torch.tensor([False, True, False]),
                  what=f"{opts} stream continued with reset {boot}")
    aligned = rand_ids(10, batch=2, seed=7)  # aligned input: the cell engine
    _stream_check(model, aligned, torch.ones_like(aligned), what=f"{opts} stream aligned {boot}")


# ============================================================================================ persistence, config
@OPTIONS
def test_save_load_roundtrip_and_cache_state(tmp_path, opts):
    model = build_tiny_memformer(seed=6, **opts)
    ids = rand_ids(11, batch=2, seed=6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    model.save_pretrained(tmp_path / "m")
    loaded = MemformerForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float64).eval()
    for option in opts:
        assert getattr(loaded.config, option) is True
    if opts is DM:
        torch.testing.assert_close(loaded.model.decoder_memory_norm.weight, model.model.decoder_memory_norm.weight)
    else:  # cross_attention_rope adds no parameter
        assert set(loaded.state_dict()) == set(build_tiny_memformer().state_dict())
    more = rand_ids(6, batch=2, seed=7, boot=False)
    path = str(tmp_path / "state.safetensors")
    out[CACHE_KWARG].save_state(path)
    state = MemformerCache.load_state(path, loaded.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out.logits, atol=1e-12, rtol=0)  # (sdpa vs eager)
        torch.testing.assert_close(loaded(more, past_key_values=state).logits,
                                   model(more, past_key_values=out[CACHE_KWARG]).logits, atol=1e-12, rtol=0)
    # a state of the default configuration is refused (another fingerprint: other cross K/V shapes or rotations)
    assert config_fingerprint(tiny_memformer_config()) != config_fingerprint(loaded.config)
    with pytest.raises(ValueError, match="different Memformer configuration"):
        MemformerCache.load_state(path, tiny_memformer_config())
    if opts is DM:  # the state's shape checks follow the option: a cross K/V of L positions is refused
        from safetensors.torch import load_file

        tensors = load_file(path)
        assert tensors["cross_mask"].shape == (2, L + K)
        tensors["layers.0.cross_keys"] = tensors["layers.0.cross_keys"][:, :, :L]
        with pytest.raises(ValueError, match="layers.0.cross_keys"):
            MemformerCache._validate_state(tensors, loaded.config, "state")


def test_option_off_keeps_keys_shapes_and_fingerprint():
    off = MemformerForCausalLM(tiny_memformer_config())
    on = MemformerForCausalLM(tiny_memformer_config(**DM))
    assert off.model.decoder_memory_norm is None
    assert set(on.state_dict()) - set(off.state_dict()) == {"model.decoder_memory_norm.weight",
                                                            "model.decoder_memory_norm.bias"}
    assert not any("decoder_memory_norm" in k for k in off.state_dict())
    rms = MemformerForCausalLM(tiny_memformer_config(norm_type="rmsnorm", **DM))
    assert {k for k in rms.state_dict() if "decoder_memory_norm" in k} == {"model.decoder_memory_norm.weight"}
    # the default's fingerprint is the one states were saved with before the options existed (computed at the
    # commit before `decoder_reads_memory`), so those states still load
    legacy = "d66dfbc63a00f9ee"
    assert config_fingerprint(tiny_memformer_config()) == legacy != config_fingerprint(tiny_memformer_config(**DM))
    assert legacy != config_fingerprint(tiny_memformer_config(cross_attention_rope=True))
    with torch.no_grad():
        cache = off.eval()(rand_ids(6, seed=1), use_cache=True)[CACHE_KWARG]
    assert cache.cross_mask.shape == (1, L) and cache.layers[0].cross_keys.shape[2] == L


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_non_bool_value_is_refused_naming_the_field(tmp_path, value):
    assert_config_refused(tmp_path, {"decoder_reads_memory": value}, "decoder_reads_memory", "decoder_reads_memory")


def test_reference_reads_the_norm_parameters():
    """The reference builds [H ; N(M)] from the checkpoint name of the new norm (no shared code with the model)."""
    model = build_tiny_memformer(**DM)
    P = _P(model)
    assert P["decoder_memory_norm.weight"].shape == (model.config.hidden_size,)
    ids = rand_ids(9, seed=2)
    with torch.no_grad():
        before = model(ids).logits
        model.model.decoder_memory_norm.bias.add_(0.3)
        after = model(ids).logits
    ref, _ = reference_stream(model, ids[0].tolist())
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after[0], ref, atol=1e-10, rtol=0)
    assert copy.deepcopy(model).config.decoder_reads_memory


@pytest.mark.parametrize("on", [False, True])
def test_one_token_call_with_a_reset_starts_a_new_document(on):
    """Regression (found while testing this option; default configuration too): a one-token call with
    `memory_reset` on a started cache went to the in-place decoder step, which ignored the reset."""
    model = build_tiny_memformer(seed=2, decoder_reads_memory=on)
    with torch.no_grad():
        cache = model(rand_ids(3, batch=2, seed=7), use_cache=True)[CACHE_KWARG]
        out = model(torch.full((2, 1), BOS), past_key_values=cache, memory_reset=torch.tensor([True, True]))
        torch.testing.assert_close(out.logits, model(torch.full((2, 1), BOS)).logits, atol=1e-12, rtol=0)


# ============================================================================================ cross_attention_rope
def test_scores_depend_on_the_distance_to_the_previous_segment():
    """With the option a decoder layer hands its cross-attention the queries' positions, and the same query at
    decoder positions 0 and 1 then reads the same keys differently; without it the cross-attention gets no positions
    (it reads the previous segment as a set, whatever the query's position)."""
    for on in (False, True):
        model = build_tiny_memformer(seed=3, cross_attention_rope=on)
        layer = model.model.decoder.layers[0]
        states = torch.randn(1, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        key, value = layer.project_cross_kv(states[:, :2])
        hidden = torch.randn(1, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).expand(1, 2, 16)
        pos = model.model.rotary(torch.arange(2)[None], torch.float64)
        attend, seen = layer.cross_attn.attend, []

        def spy(*args, _attend=attend, _seen=seen, **kwargs):
            _seen.append(args[4] if len(args) > 4 else kwargs.get("cos_sin"))
            return _attend(*args, **kwargs)

        layer.cross_attn.attend = spy
        with torch.no_grad():
            layer(hidden, None, None, key, value, DecoderPlan(pos, None, None, None, None))
            assert len(seen) == 1 and (seen[0] is pos if on else seen[0] is None)
            if on:
                out = attend(hidden, key, value, None, pos)
                assert float((out[0, 0] - out[0, 1]).abs().max()) > 1e-6


@pytest.mark.parametrize("overrides,message", [
    (dict(cross_attention_rope="yes"), "True or False"),
    (dict(cross_attention_rope=True, position_embedding_type="simplified_rpe"), "position_embedding_type"),
    (dict(cross_attention_rope=True, decoder_reads_memory=True), "decoder_reads_memory"),
])
def test_cross_attention_rope_bad_values_are_refused(tmp_path, overrides, message):
    assert_config_refused(tmp_path, overrides, "cross_attention_rope", message)
