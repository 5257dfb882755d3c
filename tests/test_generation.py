"""Generation tests (issue 3): incremental decoding, generate() strategies, continuation, cache semantics,
persistence, streamers and pipelines. CPU only, tiny sharp float64 models; every cached result is compared with a
path that does not use the cache (full forwards / `use_cache=False`)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import BOS, EOS, PAD, build_tiny_memformer, cache_tensors, left_pad, rand_ids
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, TextStreamer, pipeline

from memformer_hf import MemformerCache
from memformer_hf.modeling_memformer import CACHE_KWARG

L = 4



def left_padded_prompt(lengths=(7, 3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([rand_ids(k, seed=seed + i)[0] for i, k in enumerate(lengths)])


@pytest.fixture(scope="module")
def model():
    return build_tiny_memformer(seed=3, attn="sdpa")


def gen(model, ids, mask=None, **kwargs):
    """generate() with dict output and raw logits. The cache goes in as `past_key_values=` (both versions accept it;
    5.24 warns that it is a deprecated alias of `cache`)."""
    kwargs.setdefault("max_new_tokens", 14)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                                  return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_logits_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    """generate() hands out float32 logits (it casts them); compare at float32 resolution."""
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0)


# ============================================================================== incremental decoding
def test_incremental_logits_equal_full_forward_left_padded(model):
    ids, mask = left_padded_prompt((6, 3), seed=1)
    new = rand_ids(15, batch=2, seed=2, boot=False)  # ≥ 3 boundaries for both rows, at different steps
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, use_cache=False).logits
        out = model(ids, attention_mask=mask)
        cache, steps = out[CACHE_KWARG], [out.logits]
        for t in range(new.shape[1]):
            o = model(new[:, t: t + 1], attention_mask=full_mask[:, : ids.shape[1] + t + 1], past_key_values=cache)
            assert o[CACHE_KWARG] is cache  # updated in place
            steps.append(o.logits)
    inc = torch.cat(steps, 1)
    real = full_mask.bool()
    torch.testing.assert_close(inc[real], full[real], atol=1e-10, rtol=0)
    assert cache.consumed == full_ids.shape[1]


def _argmax_loop(model, ids, mask, steps):
    """Greedy decoding with full forwards and no cache; rows that produced EOS continue with PAD."""
    seq, am = ids.clone(), mask.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    logits = []
    for _ in range(steps):
        with torch.no_grad():
            last = model(seq, attention_mask=am, use_cache=False).logits[:, -1]
        logits.append(last)
        nxt = torch.where(done, torch.full_like(last[:, 0], PAD, dtype=torch.long), last.argmax(-1))
        seq = torch.cat([seq, nxt[:, None]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        done |= nxt == EOS
        if done.all():
            break
    return seq, logits


def test_greedy_generate_equals_argmax_loop():
    # normalize_memory_kv=False: with the default reader LayerNorm this tiny random model's greedy output collapses to
    # one repeated token, which would make the sequence comparison blind to cache bugs
    model = build_tiny_memformer(seed=3, attn="sdpa", normalize_memory_kv=False)
    ids, mask = left_padded_prompt((7, 2), seed=3)
    out = gen(model, ids, mask, max_new_tokens=15)
    ref_seq, ref_logits = _argmax_loop(model, ids, mask, 15)
    torch.testing.assert_close(out.sequences, ref_seq, atol=0, rtol=0)
    assert len(out.logits) == len(ref_logits)
    for a, b in zip(out.logits, ref_logits):
        assert_logits_close(a, b)
    # the generated part is not trivial (otherwise this test could not see a cache bug)
    assert len(set(out.sequences[:, ids.shape[1]:].flatten().tolist())) > 3


def test_greedy_use_cache_false_and_prefill_chunks(model):
    ids, mask = left_padded_prompt((9, 5), seed=4)
    a = gen(model, ids, mask)
    b = gen(model, ids, mask, use_cache=False)
    c = gen(model, ids, mask, prefill_chunk_size=3)
    torch.testing.assert_close(a.sequences, b.sequences, atol=0, rtol=0)
    torch.testing.assert_close(a.sequences, c.sequences, atol=0, rtol=0)
    for x, y, z in zip(a.logits, b.logits, c.logits):
        assert_logits_close(x, y)
        assert_logits_close(x, z)


def test_sampling_same_seed_with_and_without_cache(model):
    ids, mask = left_padded_prompt((5, 2), seed=5)
    torch.manual_seed(123)
    a = gen(model, ids, mask, do_sample=True, top_k=0, max_new_tokens=14)
    torch.manual_seed(123)
    b = gen(model, ids, mask, do_sample=True, top_k=0, max_new_tokens=14, use_cache=False)
    torch.testing.assert_close(a.sequences, b.sequences, atol=0, rtol=0)
    torch.manual_seed(124)
    c = gen(model, ids, mask, do_sample=True, top_k=0, max_new_tokens=14)
    assert not torch.equal(a.sequences, c.sequences)  # the seed matters: the test could fail


@pytest.mark.parametrize("do_sample", [False, True], ids=["beam", "beam_sample"])
def test_beam_search_with_cache_equals_without(model, do_sample):
    ids, mask = left_padded_prompt((6, 3), seed=6)
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=do_sample, max_new_tokens=12, output_scores=True,
              early_stopping=True)
    reorders = []
    original = MemformerCache.reorder_cache

    def spy(self, beam_idx):
        reorders.append(beam_idx.clone())
        return original(self, beam_idx)

    MemformerCache.reorder_cache = spy
    try:
        torch.manual_seed(7)
        a = gen(model, ids, mask, **kw)
    finally:
        MemformerCache.reorder_cache = original
    torch.manual_seed(7)
    b = gen(model, ids, mask, use_cache=False, **kw)
    torch.testing.assert_close(a.sequences, b.sequences, atol=0, rtol=0)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-9, rtol=0)
    assert a.sequences.shape[0] == 4
    # hypotheses really swapped places, so the cache rows had to follow them
    assert any(not torch.equal(idx, torch.arange(len(idx))) for idx in reorders)


def test_num_return_sequences(model):
    ids, mask = left_padded_prompt((5, 2), seed=8)
    torch.manual_seed(11)
    a = gen(model, ids, mask, do_sample=True, num_return_sequences=2, max_new_tokens=10)
    torch.manual_seed(11)
    b = gen(model, ids, mask, do_sample=True, num_return_sequences=2, max_new_tokens=10, use_cache=False)
    assert a.sequences.shape[0] == 4
    torch.testing.assert_close(a.sequences, b.sequences, atol=0, rtol=0)
    torch.testing.assert_close(a.sequences[:, : ids.shape[1]], ids.repeat_interleave(2, 0), atol=0, rtol=0)
    # each returned sequence is what its own row gives alone (full forward, no cache): its logits match
    for r in range(4):
        with torch.no_grad():
            full = model(a.sequences[r: r + 1], attention_mask=torch.cat(
                [mask.repeat_interleave(2, 0)[r: r + 1], torch.ones(1, a.sequences.shape[1] - ids.shape[1],
                                                                     dtype=torch.long)], 1), use_cache=False).logits
        for t, step in enumerate(a.logits):
            assert_logits_close(step[r], full[0, ids.shape[1] - 1 + t])


# ============================================================================== continuation and cache semantics
@pytest.mark.parametrize("case", ["batch1", "batch2", "batch2_all_rows_padded"])
def test_continuation_from_returned_cache(model, case):
    batch = 1 if case == "batch1" else 2
    if batch == 1:
        ids, mask = rand_ids(6, seed=9), torch.ones(1, 6, dtype=torch.long)
    else:
        ids, mask = left_padded_prompt((6, 3), seed=9)
    if case == "batch2_all_rows_padded":  # a pad column in every row: `consumed` counts columns, not tokens
        ids = torch.cat([torch.full((2, 2), PAD), ids], 1)
        mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), mask], 1)
    first = gen(model, ids, mask, max_new_tokens=5)
    cache = first[CACHE_KWARG]
    assert isinstance(cache, MemformerCache)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # columns consumed (the last token is not yet)
    new = rand_ids(3, batch=batch, seed=10, boot=False)
    full = torch.cat([first.sequences, new], 1)
    full_mask = torch.cat([mask, torch.ones(batch, full.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    cont = gen(model, full, full_mask, past_key_values=cache, max_new_tokens=9)
    scratch = gen(model, full, full_mask, max_new_tokens=9)
    no_cache = gen(model, full, full_mask, max_new_tokens=9, use_cache=False)
    torch.testing.assert_close(cont.sequences, scratch.sequences, atol=0, rtol=0)
    torch.testing.assert_close(cont.sequences, no_cache.sequences, atol=0, rtol=0)
    for a, b in zip(cont.logits, no_cache.logits):
        assert_logits_close(a, b)


def test_filled_cache_with_other_batch_raises_then_repeat_interleave_works(model):
    ids, mask = left_padded_prompt((6, 3), seed=12)
    first = gen(model, ids, mask, max_new_tokens=3)
    cache = first[CACHE_KWARG]
    new = rand_ids(2, batch=2, seed=13, boot=False)
    full = torch.cat([first.sequences, new], 1)
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="batch_repeat_interleave"):
        gen(model, full, full_mask, past_key_values=copy.deepcopy(cache), do_sample=True, num_return_sequences=2)
    cache.batch_repeat_interleave(2)
    assert cache.memory.shape[0] == 4
    rep, rep_mask = full.repeat_interleave(2, 0), full_mask.repeat_interleave(2, 0)
    cont = gen(model, rep, rep_mask, past_key_values=cache, max_new_tokens=6)
    scratch = gen(model, rep, rep_mask, max_new_tokens=6, use_cache=False)
    torch.testing.assert_close(cont.sequences, scratch.sequences, atol=0, rtol=0)
    for a, b in zip(cont.logits, scratch.logits):
        assert_logits_close(a, b)
    # batch_select_indices keeps the chosen rows
    two = gen(model, left_padded_prompt((6, 3), seed=14)[0], left_padded_prompt((6, 3), seed=14)[1],
              max_new_tokens=2)[CACHE_KWARG]
    mem1 = two.memory[1].clone()
    two.batch_select_indices(torch.tensor([1]))
    assert two.memory.shape[0] == 1 and torch.equal(two.memory[0], mem1)


def test_crop_and_assisted_decoding_refused(model):
    ids = rand_ids(6, seed=15)
    cache = gen(model, ids, max_new_tokens=2)[CACHE_KWARG]
    with pytest.raises(ValueError):
        cache.crop(1)
    assert cache.is_croppable is False
    cache.crop(cache.get_seq_length())  # a no-op crop is allowed
    with pytest.raises(ValueError, match="stateful|assist"):
        gen(model, ids, prompt_lookup_num_tokens=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="stateful|assist"):
        gen(model, ids, assistant_model=model, max_new_tokens=3)


def test_cache_size_constant_over_segments(model):
    ids = rand_ids(2, seed=16)
    after = {}
    for n_seg in (1, 10):
        cache = gen(model, ids, max_new_tokens=n_seg * L)[CACHE_KWARG]
        after[n_seg] = cache
    s1 = {k: (tuple(v.shape), v.dtype) for k, v in cache_tensors(after[1]).items()}
    s10 = {k: (tuple(v.shape), v.dtype) for k, v in cache_tensors(after[10]).items()}
    assert s1 == s10
    assert after[10].consumed > after[1].consumed + 8 * L
    assert s1["memory"][0] == (1, 3, 16) and s1["layers.1.cross_keys"][0] == (1, 2, L, 8)


def test_deepcopy_branches(model):
    prefix = rand_ids(7, seed=17)
    a_new, b_new = rand_ids(6, seed=18, boot=False), rand_ids(6, seed=19, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        branch = copy.deepcopy(cache)
        b_logits = model(b_new, past_key_values=branch).logits  # run the branch first: the original must not move
        a_logits = model(a_new, past_key_values=cache).logits
        ref_a = model(torch.cat([prefix, a_new], 1), use_cache=False).logits[:, prefix.shape[1]:]
        ref_b = model(torch.cat([prefix, b_new], 1), use_cache=False).logits[:, prefix.shape[1]:]
    torch.testing.assert_close(a_logits, ref_a, atol=1e-10, rtol=0)
    torch.testing.assert_close(b_logits, ref_b, atol=1e-10, rtol=0)
    assert (a_logits - b_logits).abs().max() > 1e-3


def test_save_state_load_state_roundtrip(model, tmp_path):
    prefix = rand_ids(9, batch=2, seed=20)
    new = rand_ids(7, batch=2, seed=21, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
    cache.save_state(str(tmp_path / "state.safetensors"))
    loaded = MemformerCache.load_state(str(tmp_path / "state.safetensors"), model.config)
    assert loaded.consumed == cache.consumed
    for k, v in cache_tensors(cache).items():
        assert torch.equal(cache_tensors(loaded)[k], v), k
    with torch.no_grad():
        cont = model(new, past_key_values=loaded).logits
        ref = model(torch.cat([prefix, new], 1), use_cache=False).logits[:, prefix.shape[1]:]
    torch.testing.assert_close(cont, ref, atol=1e-10, rtol=0)
    # generate from the loaded state == generate from scratch
    loaded2 = MemformerCache.load_state(str(tmp_path / "state.safetensors"), model.config)
    full = torch.cat([prefix, new], 1)
    g1 = gen(model, full, past_key_values=loaded2, max_new_tokens=6)
    g2 = gen(model, full, max_new_tokens=6, use_cache=False)
    torch.testing.assert_close(g1.sequences, g2.sequences, atol=0, rtol=0)
    other = build_tiny_memformer(attn="sdpa", segment_length=5)
    with pytest.raises(ValueError, match="different Memformer configuration"):
        MemformerCache.load_state(str(tmp_path / "state.safetensors"), other.config)
    with pytest.raises(ValueError):
        MemformerCache(model.config).save_state(str(tmp_path / "empty.safetensors"))


@pytest.mark.parametrize("normalize_memory_kv", [False, True])
def test_memory_change_changes_generation(normalize_memory_kv):
    model = build_tiny_memformer(seed=3 if not normalize_memory_kv else 8, attn="sdpa",
                                 normalize_memory_kv=normalize_memory_kv)
    with torch.no_grad():  # a memory-sensitive model: its readers' values are 3x larger
        for layer in model.model.encoder.layers:
            layer.memory_read.v_proj.weight.mul_(3.0)
    prefix = rand_ids(1 + 2 * L, seed=22)  # ends on a boundary: the next boundary comes after L-1 new tokens
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
    assert int(cache.fill[0]) == 0
    other = copy.deepcopy(cache)
    g = torch.Generator().manual_seed(23)
    mem = torch.randn(other.memory.shape, generator=g, dtype=other.memory.dtype)
    other.memory = mem / mem.norm(dim=-1, keepdim=True)
    full = torch.cat([prefix, torch.full((1, 1), 5)], 1)  # one new column so that generate feeds something
    a = gen(model, full, past_key_values=cache, max_new_tokens=3 * L)
    b = gen(model, full, past_key_values=other, max_new_tokens=3 * L)
    # before the next boundary nothing depends on the memory; after it the generation changes
    for t in range(L - 1):
        assert_logits_close(a.logits[t], b.logits[t], atol=0)
    assert max((x - y).abs().max() for x, y in zip(a.logits, b.logits)) > 1e-1
    assert (a.sequences != b.sequences).sum() >= 3


def test_deepcopy_of_plain_forward_cache():
    model = build_tiny_memformer(seed=3, attn="sdpa")
    with torch.no_grad():
        cache = model(rand_ids(6, seed=25))[CACHE_KWARG]
    copy.deepcopy(cache)  # fine under no_grad (as inside generate)


def test_deepcopy_of_grad_enabled_forward_cache():
    model = build_tiny_memformer(seed=3, attn="sdpa")
    cache = model(rand_ids(6, seed=25))[CACHE_KWARG]
    branch = copy.deepcopy(cache)
    assert torch.equal(branch.memory, cache.memory)


# ============================================================================== streamer, pipeline
@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, 50)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_text_streamer(model, tokenizer, capsys):
    enc = tokenizer("w5 w17 w9 w33 w21", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == BOS
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    expected = tokenizer.decode(out[0, enc.input_ids.shape[1]:])
    assert printed.split() == expected.split()
    assert len(printed.split()) >= 5


def test_text_generation_pipeline(model, tokenizer):
    prompt = "w5 w17 w9 w33 w21 w8"
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe(prompt, max_new_tokens=9, do_sample=False)[0]["generated_text"]
    token_ids = pipe(prompt, max_new_tokens=9, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=9, do_sample=False, use_cache=False)
    assert list(token_ids) == ref[0].tolist()
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert text[len(prompt):].replace(" ", "") == tokenizer.decode(ref[0, enc.input_ids.shape[1]:],
                                                                   skip_special_tokens=True).replace(" ", "")


# ============================================================================== issue 15 items 6-7: state from outside
def _state_file(model, tmp_path, batch: int = 2, reset_row: bool = False):
    """A filled cache (rows mid-segment), saved; returns (prefix ids, cache, path)."""
    prefix = rand_ids(10, batch=batch, seed=40)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
    if reset_row:
        cache.reset_rows(torch.tensor([True] + [False] * (batch - 1)))
    path = tmp_path / "state.safetensors"
    cache.save_state(str(path))
    return prefix, cache, path


def test_float32_state_with_bf16_model_is_cast_on_entry(tmp_path):
    """A float32 state (from `load_state` of an fp32 model) with a bf16 model failed inside SDPA ("Expected query,
    key, and value to have the same dtype"); the cached K/V are now cast to the model's dtype on entry, which gives
    exactly what casting them by hand gives."""
    fp32 = build_tiny_memformer(seed=3, dtype=torch.float32, attn="sdpa")
    prefix, _, path = _state_file(fp32, tmp_path)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    new = rand_ids(6, batch=2, seed=41, boot=False)
    loaded = MemformerCache.load_state(str(path), bf16.config)
    assert loaded.layers[0].keys.dtype == torch.float32
    by_hand = MemformerCache.load_state(str(path), bf16.config)
    by_hand._set_all_tensors([t if t is None or not t.is_floating_point() or i < 5 else t.to(torch.bfloat16)
                              for i, t in enumerate(by_hand._all_tensors())])
    with torch.no_grad():
        out = bf16(new, past_key_values=loaded)
        ref = bf16(new, past_key_values=by_hand)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert torch.equal(out.logits, ref.logits)
    assert all(t.dtype == torch.bfloat16 for layer in loaded.layers for t in layer.tensors())
    assert loaded.memory.dtype == torch.float32  # the memory keeps its own precision
    # and generate() continues from the fp32 state file with the bf16 model
    g = gen(bf16, torch.cat([prefix, new], 1), past_key_values=MemformerCache.load_state(str(path), bf16.config),
            max_new_tokens=3)
    assert g.sequences.shape[1] == prefix.shape[1] + new.shape[1] + 3


def _craft(tensors: dict, case: str, L: int, vocab: int) -> dict | str:
    """Damage one field of a saved state; returns the tensors, or the metadata change as a string."""
    t = dict(tensors)
    if case == "fill_gt_L":
        t["fill"] = torch.full_like(t["fill"], L + 3)
    elif case == "fill_negative":
        t["fill"] = torch.full_like(t["fill"], -1)
    elif case == "memory_shape":
        t["memory"] = t["memory"][:, :-1]
    elif case == "kv_shape":
        t["layers.1.values"] = t["layers.1.values"][:, :, :-1]
    elif case == "kv_batch":
        t["layers.0.cross_keys"] = t["layers.0.cross_keys"][:1]
    elif case == "kv_int_dtype":
        t["layers.0.keys"] = t["layers.0.keys"].long()
    elif case == "started_float":
        t["started"] = t["started"].float()
    elif case == "segment_ids_float":
        t["segment_ids"] = t["segment_ids"].float()
    elif case == "segment_ids_vocab":
        t["segment_ids"] = t["segment_ids"] + vocab
    elif case == "not_started_with_fill":
        t["started"] = torch.zeros_like(t["started"])
    elif case == "nan_values":
        t["layers.1.cross_values"] = t["layers.1.cross_values"].clone()
        t["layers.1.cross_values"][0, 0, 0, 0] = float("nan")
    elif case == "missing_tensor":
        del t["cross_mask"]
    elif case == "extra_tensor":
        t["layers.9.keys"] = torch.zeros(1)
    return t


_CRAFTED = {
    "fill_gt_L": r"`fill` must be in \[0, segment_length=4\)",
    "fill_negative": r"`fill` must be in \[0, segment_length=4\)",
    "memory_shape": r"`memory` must be a float tensor \(batch ≥ 1, num_memory_slots=3, hidden_size=16\)",
    "kv_shape": r"`layers\.1\.values` must be a float tensor of shape \(2, 2, 4, 8\)",
    "kv_batch": r"`layers\.0\.cross_keys` must be a float tensor of shape \(2, 2, 4, 8\)",
    "kv_int_dtype": r"`layers\.0\.keys` must be a float tensor",
    "started_float": r"`started` must be a bool tensor of shape \(2,\), got torch\.float32",
    "segment_ids_float": r"`segment_ids` must be a int tensor",
    "segment_ids_vocab": r"`segment_ids` must be token ids in \[0, vocab_size=50\)",
    "not_started_with_fill": r"inconsistent `started`/`fill`: row 0 has not started but fill=",
    "nan_values": r"`layers\.1\.cross_values` must be finite, got NaN or inf",
    "missing_tensor": r"missing tensors \['cross_mask'\]",
    "extra_tensor": r"unexpected tensors \['layers\.9\.keys'\]",
    "consumed_metadata": r"metadata `consumed`='-5' is not a non-negative integer",
    "not_safetensors": r"not a readable safetensors file",
}


@pytest.mark.parametrize("case", sorted(_CRAFTED))
def test_crafted_state_file_is_refused_naming_the_field(model, tmp_path, case):
    """A damaged or crafted state file failed with an internal RuntimeError/IndexError on use; `load_state` now
    refuses it with a ValueError naming the field. The undamaged file still loads and continues exactly."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix, cache, path = _state_file(model, tmp_path)
    assert bool((cache.fill > 0).all())  # rows mid-segment: fill and started matter
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    if case == "not_safetensors":
        bad.write_bytes(path.read_bytes()[:100])
    elif case == "consumed_metadata":
        save_file(tensors, str(bad), metadata={**meta, "consumed": "-5"})
    else:
        save_file({k: v.contiguous() for k, v in _craft(tensors, case, L, model.config.vocab_size).items()}, str(bad),
                  metadata=meta)
    with pytest.raises(ValueError, match=_CRAFTED[case]) as err:
        MemformerCache.load_state(str(bad), model.config)
    assert str(bad) in str(err.value)

    new = rand_ids(5, batch=2, seed=42, boot=False)
    with torch.no_grad():
        cont = model(new, past_key_values=MemformerCache.load_state(str(path), model.config)).logits
        ref = model(torch.cat([prefix, new], 1), use_cache=False).logits[:, prefix.shape[1]:]
    torch.testing.assert_close(cont, ref, atol=1e-10, rtol=0)


def test_state_file_argument_mistakes_are_named(model, tmp_path):
    """`load_state(folder, ...)` raised "No such device (os error 19)", and `load_state(path, model)` /
    `MemformerCache(model)` (the model instead of `model.config`) an AttributeError on `decoder_layers`; each now says
    what is wrong. The right call still continues exactly."""
    prefix, cache, path = _state_file(model, tmp_path)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder, not a MemformerCache state file"):
        MemformerCache.load_state(str(tmp_path), model.config)
    for wrong in (model, model.config.to_dict()):
        with pytest.raises(TypeError, match=rf"needs the model's MemformerConfig \(`model\.config`\), got "
                                            rf"{type(wrong).__name__}"):
            MemformerCache.load_state(str(path), wrong)
        with pytest.raises(TypeError, match="needs the model's MemformerConfig"):
            MemformerCache(wrong)
    new = rand_ids(5, batch=2, seed=49, boot=False)
    with torch.no_grad():
        ref = model(new, past_key_values=copy.deepcopy(cache)).logits
        assert torch.equal(model(new, past_key_values=MemformerCache.load_state(path, model.config)).logits, ref)


def test_state_with_a_reset_row_saves_and_loads(model, tmp_path):
    """`reset_rows` clears the row's partial segment (fill 0), so a state saved after it is consistent and loads;
    continuing from it equals continuing from the in-memory cache."""
    _, cache, path = _state_file(model, tmp_path, reset_row=True)
    assert cache.fill.tolist()[0] == 0 and not bool(cache.started[0])
    new = rand_ids(5, batch=2, seed=43, boot=True)
    with torch.no_grad():
        ref = model(new, past_key_values=copy.deepcopy(cache)).logits
        cont = model(new, past_key_values=MemformerCache.load_state(str(path), model.config)).logits
    assert torch.equal(cont, ref)


def test_reset_rows_needs_one_flag_per_row(model):
    """`cache.reset_rows` broadcast its mask over the rows: [True] on a batch of 2 reset both rows, a row index
    tensor([0]) (read as the mask [False]) reset none, silently; a mask of 3 rows failed with a RuntimeError and a
    list with an AttributeError. A list of bools now equals the tensor, and any other shape than (batch,) is
    refused naming the batch size; the cache is left as it was."""
    with torch.no_grad():
        cache = model(rand_ids(6, batch=2, seed=44))[CACHE_KWARG]
    ref = copy.deepcopy(cache)
    ref.reset_rows(torch.tensor([True, False]))
    listed = copy.deepcopy(cache)
    listed.reset_rows([True, False])
    assert listed.started.tolist() == ref.started.tolist() == [False, True]
    assert listed.fill.tolist() == ref.fill.tolist()
    for rows in (torch.tensor([True]), torch.tensor([0]), torch.tensor([True, False, True]), [True],
                 torch.tensor([[True], [False]])):
        with pytest.raises(ValueError, match=r"reset_rows: the mask must have shape \(batch,\) = \(2,\)"):
            cache.reset_rows(rows)
        assert cache.started.tolist() == [True, True]


def test_memory_reset_accepts_a_list(model):
    """`memory_reset` as a Python list raised AttributeError; a list of bools is now the same as the tensor."""
    prefix, new = rand_ids(6, batch=2, seed=44), rand_ids(5, batch=2, seed=45)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        ref = model(new, past_key_values=copy.deepcopy(cache), memory_reset=torch.tensor([True, False])).logits
        for flags in ([True, False], (1, 0)):
            out = model(new, past_key_values=copy.deepcopy(cache), memory_reset=flags).logits
            assert torch.equal(out, ref)
        no_reset = model(new, past_key_values=copy.deepcopy(cache), memory_reset=[False, False]).logits
        assert (no_reset[0] - ref[0]).abs().max() > 1e-3 and torch.equal(no_reset[1], ref[1])
        enc = rand_ids(L, batch=2, seed=46, boot=False)
        dec = torch.cat([torch.full((2, 1), BOS), enc[:, :-1]], 1)
        cell_ref = model.model(encoder_input_ids=enc, decoder_input_ids=dec, memory_reset=torch.tensor([False, True]))
        cell = model.model(encoder_input_ids=enc, decoder_input_ids=dec, memory_reset=[False, True])
        assert torch.equal(cell.memory, cell_ref.memory)
        with pytest.raises(ValueError, match=r"`memory_reset` must be a bool tensor of shape \(batch,\) or a list"):
            model(new, past_key_values=copy.deepcopy(cache), memory_reset=["yes", "no"])
        with pytest.raises(ValueError, match=r"`memory_reset` must have shape \(batch,\) = \(2,\), got \(3,\)"):
            model(new, past_key_values=copy.deepcopy(cache), memory_reset=[True, False, True])


@pytest.mark.parametrize("how", ["assigned", "in_place", "loaded"])
@pytest.mark.parametrize("field", ["layers.0.keys", "layers.1.cross_values", "memory"])
def test_nan_in_cached_state_raises_naming_the_field(model, tmp_path, how, field):
    """NaN in cached keys/values gave NaN logits with no error (only the memory was checked). Every float tensor of a
    state that comes from outside the model is checked once, naming the field; the model's own state is trusted."""
    prefix, new = rand_ids(7, batch=2, seed=47), rand_ids(3, batch=2, seed=48, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        ref = model(new, past_key_values=copy.deepcopy(cache)).logits
    assert cache.is_trusted
    owner, attr = (cache, "memory") if field == "memory" else (cache.layers[int(field.split(".")[1])],
                                                                field.split(".")[2])
    if how == "assigned":
        t = getattr(owner, attr).clone()
        t[1, 0, 0] = float("nan")
        setattr(owner, attr, t)
    elif how == "in_place":
        getattr(owner, attr)[1, 0, 0] = float("nan")
    else:
        cache.save_state(str(tmp_path / "s.safetensors"))
        getattr(owner, attr)[1, 0, 0] = float("nan")  # the loaded state is checked on use, like any outside state
        cache = MemformerCache.load_state(str(tmp_path / "s.safetensors"), model.config)
        owner = cache if field == "memory" else cache.layers[int(field.split(".")[1])]
        getattr(owner, attr)[1, 0, 0] = float("nan")
    assert not cache.is_trusted
    with torch.no_grad(), pytest.raises(ValueError, match=rf"The cache's {field} contains NaN or inf values"):
        model(new, past_key_values=cache)
    getattr(owner, attr)[1, 0, 0] = 0.0 if field != "memory" else getattr(owner, attr)[1, 0, 1]
    with torch.no_grad():
        out = model(new, past_key_values=copy.deepcopy(cache)).logits  # repaired: runs, finite
    assert torch.isfinite(out).all() and out.shape == ref.shape


@pytest.mark.parametrize("field,value,message", [
    ("memory", torch.zeros(2, 3, 8), r"`memory` must be a float tensor \(batch ≥ 1, num_memory_slots=3, hidden_size=16\)"),
    ("memory", torch.zeros(2, 4, 16), r"`memory` must be a float tensor"),
    ("memory", torch.zeros(2, 48), r"`memory` must be a float tensor"),
    ("memory", torch.zeros(2, 3, 16, dtype=torch.long), r"`memory` must be a float tensor"),
    ("cross_mask", torch.ones(2, 2, dtype=torch.bool), r"`cross_mask` must be a bool tensor of shape \(2, 4\)"),
    ("segment_ids", torch.full((2, 4), 99), r"`segment_ids` must be token ids in \[0, vocab_size=50\)"),
    ("fill", torch.tensor([9, 0]), r"`fill` must be in \[0, segment_length=4\), got \[9, 0\]"),
    ("fill", torch.tensor([-1, 0]), r"`fill` must be in \[0, segment_length=4\)"),
    ("started", torch.tensor([1, 1]), r"`started` must be a bool tensor of shape \(2,\)"),
])
def test_an_edited_state_is_validated_as_set_state_does(model, field, value, message):
    """A state edited by assignment was only checked for NaN/inf on its next use, while `set_state` / `load_state`
    validate shapes, dtypes and values: a memory of another width or slot count ran until the next boundary and then
    failed deep in a LayerNorm or the writer, a short `cross_mask` in `index_copy_`, `segment_ids` outside the
    vocabulary in the embedding ("index out of range in self"); `fill` 9 or -1 (outside [0, L)) ran silently. Such a
    state is refused naming the field on its next use, with the same single reduction as before."""
    prefix, new = rand_ids(6, batch=2, seed=47), rand_ids(5, batch=2, seed=48, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        setattr(cache, field, value)
        with pytest.raises(ValueError, match=r"The cache: " + message):
            model(new, past_key_values=cache)


def test_finiteness_check_costs_one_reduction_and_only_for_outside_state(model, tmp_path, monkeypatch):
    """The decoding hot path pays no NaN check (no host sync per token): a state the model wrote, or permuted /
    repeated rows of it, is trusted. An outside state is checked once, with one reduction over all tensors."""
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(tuple(t.shape)) or real(t))
    prefix, new = rand_ids(7, batch=2, seed=49), rand_ids(1, batch=2, seed=50, boot=False)
    with torch.no_grad():
        cache = model(prefix)[CACHE_KWARG]
        for _ in range(3):
            model(new, past_key_values=cache)
        cache.reorder_cache(torch.tensor([1, 0]))
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0, 2]))
        branch = copy.deepcopy(cache)
        model(new, past_key_values=branch)
        gen(model, rand_ids(9, batch=2, seed=51), max_new_tokens=6)
    assert calls == []
    cache.save_state(str(tmp_path / "s.safetensors"))
    loaded = MemformerCache.load_state(str(tmp_path / "s.safetensors"), model.config)
    calls.clear()
    with torch.no_grad():
        model(new, past_key_values=loaded)  # checked once: memory + 4 K/V per layer, stacked into one result
        assert len(calls) == 1 + 4 * model.config.decoder_layers
        calls.clear()
        model(new, past_key_values=loaded)  # written by the model since: trusted again
    assert calls == []


def test_generate_with_filled_cache_and_only_new_ids_explains(model):
    """A filled cache with only the new ids ended in an IndexError inside transformers (and the same ids as the cache
    consumed were silently fed twice); generate() now says to pass the whole sequence, which works. Likewise for
    `inputs_embeds`."""
    prefix = rand_ids(9, seed=52)
    new = rand_ids(3, seed=53, boot=False)
    first = gen(model, prefix, max_new_tokens=2)
    cache = first[CACHE_KWARG]
    consumed = cache.get_seq_length()
    for ids in (new, first.sequences[:, :consumed]):
        with pytest.raises(ValueError, match=rf"input_ids of {ids.shape[1]} columns with a MemformerCache that has "
                                             rf"already consumed {consumed} columns\. Pass the whole sequence"):
            gen(model, ids, past_key_values=copy.deepcopy(cache), max_new_tokens=3)
    full = torch.cat([first.sequences, new], 1)
    # the same as embeddings (transformers sliced them by a negative length: an IndexError inside the model)
    with pytest.raises(ValueError, match=rf"inputs_embeds of 3 columns with a MemformerCache that has already consumed "
                                         rf"{consumed} columns\. Pass the whole sequence"), torch.no_grad():
        model.generate(inputs_embeds=model.get_input_embeddings()(new), attention_mask=torch.ones_like(new),
                       past_key_values=copy.deepcopy(cache), max_new_tokens=3)
    cont = gen(model, full, past_key_values=cache, max_new_tokens=5)
    scratch = gen(model, full, max_new_tokens=5, use_cache=False)
    torch.testing.assert_close(cont.sequences, scratch.sequences, atol=0, rtol=0)


# ============================================================================== prompts given as embeddings
@pytest.mark.parametrize("split", [3, 5, 8], ids=["inside_first_segment", "across_a_boundary", "at_a_boundary"])
def test_inputs_embeds_prompt_continued_with_ids_equals_ids(model, split):
    """A prompt given as `inputs_embeds` and continued with `input_ids` through the cache scores exactly as the whole
    sequence given as ids. The cached partial segment of an embeddings prompt has no ids: it used to be re-encoded as
    token 0 at the next segment boundary (silently wrong logits, e.g. in `generate(inputs_embeds=...)`)."""
    ids = rand_ids(17, batch=2, seed=60, boot=False)  # no BOS: the boot is implicit for ids and embeddings alike
    emb = model.get_input_embeddings()
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        first = model(inputs_embeds=emb(ids[:, :split]))
        cache = first[CACHE_KWARG]
        assert (cache.segment_embeds is not None) == (split % L != 0)  # kept only while a partial segment needs it
        assert (cache.segment_embeds is None) == (split % L == 0)
        # the next 2 columns one at a time (the decoding path), then the rest at once
        parts = [first.logits]
        for j in (split, split + 1):
            parts.append(model(ids[:, j: j + 1], past_key_values=cache).logits)
        parts.append(model(ids[:, split + 2:], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-10, rtol=0)
    assert cache.segment_embeds is None  # past the embeddings' last segment: ids only again (fast paths)


def test_embeddings_in_chunks_then_ids_equal_ids(model):
    """A prompt fed as `inputs_embeds` in several chunks (each may continue a partial segment, held as ids or as
    embeddings), then ids, scores as the whole sequence given as ids."""
    ids = rand_ids(23, batch=2, seed=62, boot=False)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        first = model(ids[:, :3])  # a partial segment held as ids
        cache, parts = first[CACHE_KWARG], [first.logits]
        for a, b in ((3, 6), (6, 13), (13, 14)):
            parts.append(model(inputs_embeds=emb(ids[:, a:b]), past_key_values=cache).logits)
        parts.append(model(ids[:, 14:], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-10, rtol=0)


def test_generate_from_inputs_embeds_equals_generate_from_ids(model):
    """`generate(inputs_embeds=...)` (a prompt that ends inside a segment) gives the logits of `generate(input_ids)`
    at every step, greedy and with beams; while the prompt's partial segment holds embeddings the cache cannot be
    saved (its ids are unknown) and says so."""
    ids = rand_ids(9, batch=2, seed=61, boot=False)
    embeds = model.get_input_embeddings()(ids).detach()
    for kw in (dict(), dict(num_beams=2, num_return_sequences=2, output_scores=True)):
        a = gen(model, ids, max_new_tokens=11, **kw)
        with torch.no_grad():
            b = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=11,
                               return_dict_in_generate=True, output_logits=True, do_sample=False, **kw)
        torch.testing.assert_close(a.sequences[:, ids.shape[1]:], b.sequences, atol=0, rtol=0)
        for x, y in zip(a.logits, b.logits):
            assert_logits_close(x, y)
    with torch.no_grad():
        cache = model(inputs_embeds=embeds[:, :6])[CACHE_KWARG]
    with pytest.raises(ValueError, match="partial segment holds tokens given as `inputs_embeds`"):
        cache.save_state("unused.safetensors")
    branch = copy.deepcopy(cache)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, 6:], past_key_values=branch).logits,
                                   model(ids[:, 6:], past_key_values=cache).logits, atol=0, rtol=0)


# ============================================================================== other generate() entry points
def _cont_setup(model, batch: int = 1):
    """A cache filled by generate() and the whole history to continue from (prompt, generated, 5 new columns)."""
    prefix = rand_ids(9, batch=batch, seed=70)
    first = gen(model, prefix, max_new_tokens=2)
    full = torch.cat([first.sequences, rand_ids(5, batch=batch, seed=71)], 1)  # the new columns start with BOS
    return first[CACHE_KWARG], full


def test_cache_after_beam_search_refuses_to_continue(model):
    """After beam search the cache holds the beams still running at the last step, not the returned sequences;
    continuing from it was silently wrong (or the error suggested `batch_repeat_interleave`). It now says so."""
    ids = rand_ids(6, seed=72)
    for nb, nrs in ((2, 2), (3, 1)):
        out = gen(model, ids, num_beams=nb, num_return_sequences=nrs, max_new_tokens=7)
        cache = out[CACHE_KWARG]
        full = torch.cat([out.sequences, rand_ids(3, batch=nrs, seed=73, boot=False)], 1)
        with pytest.raises(ValueError, match="beam search"):
            gen(model, full, past_key_values=cache, max_new_tokens=4)
        with pytest.raises(ValueError, match="beam search"):
            cache.save_state("unused.safetensors")
    # the caller's own cache object is updated in place by beam search: it is marked too
    mine = MemformerCache(model.config)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, max_new_tokens=3, past_key_values=mine)
    with pytest.raises(ValueError, match="beam search"):
        model(ids[:, :1], past_key_values=mine)
    mine.reset()  # an emptied cache starts over
    cont = gen(model, ids, past_key_values=mine, max_new_tokens=4)
    torch.testing.assert_close(cont.sequences, gen(model, ids, max_new_tokens=4).sequences, atol=0, rtol=0)


def test_cache_after_a_custom_generate_beam_loop_refuses_to_continue(model):
    """Group and constrained beam search are Hub `custom_generate` code in transformers 5: they run their own beam
    loop (reordering the cache with `reorder_cache`), not `_beam_search`, so the cache they left was not marked stale
    and continuing from it silently used the wrong beams' memory. A cache reordered during generate() is now marked:
    here by a local custom_generate running a beam loop of its own. One that was not reordered continues."""
    from transformers.generation.utils import GenerationMixin

    def own_beam_loop(model, *args, **kwargs):
        return GenerationMixin._beam_search(model, *args, **kwargs)

    def own_greedy_loop(model, *args, **kwargs):
        return GenerationMixin._sample(model, *args, **kwargs)

    ids = rand_ids(6, seed=72)
    mine = MemformerCache(model.config)
    out = gen(model, ids, num_beams=2, num_return_sequences=2, max_new_tokens=7, past_key_values=mine,
              custom_generate=own_beam_loop)
    assert out[CACHE_KWARG] is mine
    full = torch.cat([out.sequences, rand_ids(3, batch=2, seed=73, boot=False)], 1)
    with pytest.raises(ValueError, match="reordered by beam search"):
        gen(model, full, past_key_values=mine, max_new_tokens=4)
    with pytest.raises(ValueError, match="reordered by beam search"):
        mine.save_state("unused.safetensors")
    greedy = gen(model, ids, max_new_tokens=7, custom_generate=own_greedy_loop)
    full = torch.cat([greedy.sequences, rand_ids(3, seed=73, boot=False)], 1)
    cont = gen(model, full, past_key_values=greedy[CACHE_KWARG], max_new_tokens=4)
    torch.testing.assert_close(cont.sequences, gen(model, full, max_new_tokens=4).sequences, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [None, 3], ids=["prefill", "chunked_prefill"])
def test_generate_memory_reset_applies_to_the_prompt_only(model, chunk):
    """`generate(memory_reset=...)` was passed to every forward, so each generated token started a new document.
    It now restarts the chosen rows once, before the prompt: row 0 (reset) generates as its new columns alone, row
    1 (kept) as the continuation without a reset."""
    cache, full = _cont_setup(model, batch=2)
    n_new = full.shape[1] - cache.get_seq_length()  # the columns generate() feeds
    kw = dict(max_new_tokens=9, prefill_chunk_size=chunk)
    out = gen(model, full, past_key_values=copy.deepcopy(cache), memory_reset=torch.tensor([True, False]), **kw)
    alone = gen(model, full[:1, -n_new:], **kw)
    kept = gen(model, full, past_key_values=copy.deepcopy(cache), **kw)
    torch.testing.assert_close(out.sequences[:1, -n_new - 9:], alone.sequences, atol=0, rtol=0)
    torch.testing.assert_close(out.sequences[1], kept.sequences[1], atol=0, rtol=0)
    for a, b, c in zip(out.logits, alone.logits, kept.logits):
        assert_logits_close(a[0], b[0])
        assert_logits_close(a[1], c[1])
    # with num_return_sequences generate() expands the flags with the rows, also when given as a list
    cache4 = copy.deepcopy(cache)
    cache4.batch_repeat_interleave(2)
    out4 = gen(model, full, past_key_values=cache4, memory_reset=[True, False], num_return_sequences=2,
               do_sample=True, top_k=1, **kw)  # top_k=1: greedy
    torch.testing.assert_close(out4.sequences, out.sequences.repeat_interleave(2, 0), atol=0, rtol=0)
    # without a cache the rows have not started: a reset changes nothing
    fresh = gen(model, full, memory_reset=torch.tensor([True, True]), **kw)
    torch.testing.assert_close(fresh.sequences, gen(model, full, **kw).sequences, atol=0, rtol=0)


def test_chunked_prefill_continuing_a_cache(model):
    """`prefill_chunk_size` with a filled cache fed the whole history again on top of the cache (transformers splits
    the full `input_ids`): silently wrong. Only the new columns are fed now; with `inputs_embeds` chunking is refused
    (transformers failed inside with an IndexError)."""
    cache, full = _cont_setup(model)
    consumed = cache.get_seq_length()
    out = gen(model, full, past_key_values=cache, max_new_tokens=6, prefill_chunk_size=3)
    ref = gen(model, full, max_new_tokens=6, use_cache=False)
    torch.testing.assert_close(out.sequences, ref.sequences, atol=0, rtol=0)
    for a, b in zip(out.logits, ref.logits):
        assert_logits_close(a, b)
    assert cache.get_seq_length() == consumed + (full.shape[1] - consumed) + 5
    with pytest.raises(ValueError, match="prefill_chunk_size"), torch.no_grad():
        model.generate(inputs_embeds=model.get_input_embeddings()(full), attention_mask=torch.ones_like(full),
                       max_new_tokens=3, prefill_chunk_size=3)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_prefill_continuing_a_left_padded_cache(model, chunk):
    """The same with a left-padded history (the mask is not all ones, so transformers 5.24 keeps it): 5.24 sliced
    the new columns again by the mask's length and fed only some of them (continuation wrong, cache 2 columns
    short). Each chunk now gets the mask up to its last column; equal to generating without a cache."""
    ids, mask = left_padded_prompt((7, 3), seed=5)
    first = gen(model, ids, mask, max_new_tokens=2)
    cache = first[CACHE_KWARG]
    full = torch.cat([first.sequences, rand_ids(5, batch=2, seed=71)], 1)
    full_mask = torch.cat([mask, torch.ones(2, 7, dtype=mask.dtype)], 1)
    out = gen(model, full, full_mask, past_key_values=cache, max_new_tokens=6, prefill_chunk_size=chunk)
    ref = gen(model, full, full_mask, max_new_tokens=6, use_cache=False)
    assert cache.get_seq_length() == full.shape[1] + 5
    torch.testing.assert_close(out.sequences, ref.sequences, atol=0, rtol=0)
    for a, b in zip(out.logits, ref.logits):
        assert_logits_close(a, b)


def test_generate_use_cache_false_with_a_cache_is_refused(model):
    """`use_cache=False` with a MemformerCache made generate() feed the whole sequence at every step on top of the
    cache (silently wrong); it is refused, naming both."""
    cache, full = _cont_setup(model)
    for c in (cache, MemformerCache(model.config)):
        with pytest.raises(ValueError, match="use_cache=False"):
            gen(model, full, past_key_values=c, use_cache=False, max_new_tokens=3)


def test_memformer_as_assistant_model_is_refused(model):
    """Memformer as another model's `assistant_model` failed deep inside with 'does not take `position_ids`'; it is
    refused up front (assisted decoding rolls the assistant's cache back, and memory writes cannot be undone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    main = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, bos_token_id=BOS,
                                        eos_token_id=EOS, pad_token_id=PAD)).double().eval()
    ids = rand_ids(6, seed=74)
    with pytest.raises(ValueError, match="assistant_model"), torch.no_grad():
        main.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                      assistant_model=model)


def test_zero_new_columns_with_the_running_mask_is_a_no_op(model):
    """A forward of 0 columns with a mask of the past columns (a streaming loop's empty chunk) failed with an
    IndexError (`mask[:, -0:]` is the whole mask); it returns no logits and leaves the state as it was."""
    ids = rand_ids(6, seed=75)
    new = rand_ids(5, seed=76, boot=False)
    with torch.no_grad():
        cache = model(ids)[CACHE_KWARG]
        mask = torch.ones(1, ids.shape[1], dtype=torch.long)
        for empty in (dict(input_ids=ids[:, :0]), dict(inputs_embeds=model.get_input_embeddings()(ids[:, :0]))):
            assert model(**empty, attention_mask=mask, past_key_values=cache).logits.shape == (1, 0, 50)
        cont = model(new, past_key_values=cache).logits
        ref = model(torch.cat([ids, new], 1), use_cache=False).logits[:, ids.shape[1]:]
        torch.testing.assert_close(cont, ref, atol=1e-10, rtol=0)
        empty_labels = model(ids[:, :0], attention_mask=mask, labels=ids[:, :0], use_cache=False)
    assert empty_labels.loss == 0


def test_cache_from_another_copy_of_the_code_is_named(model):
    """A model loaded as remote code with a cache from the installed package (or the reverse) failed with 'needs a
    MemformerCache, got MemformerCache'; the error names both modules."""
    from transformers.cache_utils import Cache

    class MemformerCache(Cache):  # noqa: F811 - stand-in for the same class from another module
        def __init__(self):
            super().__init__(layers=[])

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 6

    MemformerCache.__module__ = "transformers_modules.my_model.cache_memformer"
    with pytest.raises(ValueError, match=r"comes from module `transformers_modules\.my_model\.cache_memformer`, but "
                                         r"this model's code is `memformer_hf\.cache_memformer`"), torch.no_grad():
        model(rand_ids(2, seed=78, boot=False), past_key_values=MemformerCache())
