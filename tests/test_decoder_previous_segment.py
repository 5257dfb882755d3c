"""`decoder_previous_segment` (docs/design.md#decoder-previous-segment): the decoder reads the true token stream over
the previous segment and its own.

* a float64 warm start from a tiny Llama equals the Llama over [BOS, previous segment, own inputs] for every cell of
  a document (the memory carried), through cell mode and through the trainer's evaluation (batched streams of
  documents of several lengths, boot and continuing cells side by side), and differs from the segment-local start
  from the second cell on, so the previous segment is really read;
* the packers build the true-stream decoder inputs, and a stream layout without them is refused;
* MRBP equals full back-propagation through the window with the option, and the trainer trains with it;
* every stream path (aligned, general planner, token-by-token decoding, chunks through the cache, padded batches,
  embeddings, generate(), saved states, memory_replay_backward) computes what the cells compute.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_cells_mrbp_matches_bptt
from test_warm_start import BOS, PAD, L, assert_mrbp_matches_bptt, ids_with_bos, perturb, tiny_llama, warm

from memformer_hf import MemformerCache, MemformerConfig, MemformerForCausalLM
from memformer_hf.data_streams import StreamBatches, document_cells
from memformer_hf.modeling_memformer import CACHE_KWARG
from memformer_hf.mrbp import cells_backward
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments


def llama_windows(llama, doc: list[int]) -> torch.Tensor:
    """The backbone's logits for each target of `doc` read as the option reads it: target x_s.. of segment t from
    [BOS, x_{s-L} .. x_{s+L-2}] (t ≥ 1), from [BOS, x_0 .. x_{L-2}] for t = 0. RoPE positions -L.. as the model's
    (the same function at other absolute positions, where the float32 tables round differently)."""
    full = torch.tensor([BOS] + doc)
    out = []
    for s in range(0, len(doc), L):
        n = min(L, len(doc) - s)
        with torch.no_grad():
            if s == 0:
                out.append(llama(full[None, :n]).logits[0])
            else:
                window = torch.cat([full[:1], full[s - L + 1: s + n]])[None]
                out.append(llama(window, position_ids=torch.arange(-L, n)[None]).logits[0, L:])
    return torch.cat(out)


def cell_logits(model, doc: list[int], previous_segment: bool = True) -> torch.Tensor:
    cells = document_cells(doc, L, BOS, PAD, decoder_previous_segment=previous_segment)
    memory, out = None, []
    for t in range(cells["encoder_input_ids"].shape[0]):
        cell = {k: v[t: t + 1] for k, v in cells.items() if k != "shift_labels"}
        with torch.no_grad():
            result = model(**cell, memory=memory)
        memory = result.memory
        out.append(result.logits[0, : min(L, len(doc) - t * L)])
    return torch.cat(out)


def test_warm_start_equals_the_backbone_over_the_previous_segment():
    llama = tiny_llama()
    model = warm(llama, decoder_previous_segment=True)
    doc = ids_with_bos(3 * L + 5, batch=1, seed=7)[0, 1:].tolist()
    ref = llama_windows(llama, doc)
    got = cell_logits(model, doc)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-11)
    assert ref.abs().max() > 1.0
    # not vacuous: without the option the second cell on reads only its own segment
    local = cell_logits(warm(llama), doc, previous_segment=False)
    torch.testing.assert_close(local[:L], ref[:L], rtol=0, atol=1e-11)
    for c in range(1, 4):
        assert (local[c * L: (c + 1) * L] - ref[c * L: (c + 1) * L]).abs().max() > 1e-3, c

    # the trainer's evaluation: streams of documents of several lengths (boot, continuing and inactive cells in one
    # batch), memory carried and reset; summed NLL equals the backbone over the same windows
    docs = [ids_with_bos(n, batch=1, seed=10 + n)[0, 1:].tolist() for n in (3 * L + 5, 2 * L, L + 2, L - 3)]
    trainer = MemformerTrainer(model=model, args=MemformerTrainingArguments(
        output_dir="unused", per_device_eval_batch_size=2, eval_window=2, report_to=[], disable_tqdm=True,
        use_cpu=True, eval_no_memory=True), eval_dataset=docs)
    sums = trainer.evaluation_sums(docs)
    nll = sum(float(torch.nn.functional.cross_entropy(llama_windows(llama, d), torch.tensor(d), reduction="sum"))
              for d in docs)
    for variant in ("", "_no_memory"):  # the evaluation scores float32 logits
        assert float(sums[variant].tokens.sum()) == sum(map(len, docs))
        assert math.isclose(float(sums[variant].nll.sum()), nll, rel_tol=1e-6)


def test_the_memory_reaches_the_decoder_with_the_option():
    """With the new weights perturbed, the memory changes the second cell on (reader → H → cross-attention) and the
    first cell (boot, no previous segment) is unchanged by a different writer."""
    model = warm(tiny_llama(), decoder_previous_segment=True)
    for i, layer in enumerate(model.model.decoder.layers):
        perturb(layer.cross_attn.o_proj, seed=i)
    for i, layer in enumerate(model.model.encoder.layers):
        perturb(layer.memory_read.o_proj, seed=100 + i)
    doc = ids_with_bos(3 * L, batch=1, seed=5)[0, 1:].tolist()
    before = cell_logits(model, doc)
    perturb(model.model.writer.v_proj, seed=200)
    after = cell_logits(model, doc)
    torch.testing.assert_close(after[:L], before[:L], rtol=0, atol=1e-12)
    assert (after[L:] - before[L:]).abs().max() > 1e-3


def test_packers_build_the_true_stream():
    doc = list(range(3, 3 + 2 * L + 3))
    cells = document_cells(doc, L, BOS, PAD, decoder_previous_segment=True)
    paper = document_cells(doc, L, BOS, PAD)
    assert cells["decoder_input_ids"][0, 0] == BOS  # the document's start
    for t in (1, 2):
        assert cells["decoder_input_ids"][t, 0] == doc[t * L - 1] == cells["encoder_input_ids"][t, -1]
        assert paper["decoder_input_ids"][t, 0] == BOS
    for key in ("encoder_input_ids", "encoder_attention_mask", "decoder_attention_mask", "shift_labels",
                "memory_reset"):
        assert torch.equal(cells[key], paper[key]), key
    assert torch.equal(cells["decoder_input_ids"][:, 1:], paper["decoder_input_ids"][:, 1:])
    on = StreamBatches([doc], segment_length=L, window=2, batch_size=1, bos_token_id=BOS, pad_token_id=PAD,
                       decoder_previous_segment=True)
    off = StreamBatches([doc], segment_length=L, window=2, batch_size=1, bos_token_id=BOS, pad_token_id=PAD)
    assert on[0]["decoder_input_ids"][0, 1, 0] == doc[L - 1]
    assert on.state_dict()["decoder_previous_segment"] is True
    assert "decoder_previous_segment" not in off.state_dict()  # states saved before the option still match
    assert not on.compatible_with(off.state_dict()) and not off.compatible_with(on.state_dict())


def test_a_cell_that_does_not_continue_its_previous_segment_is_refused():
    model = warm(tiny_llama(), decoder_previous_segment=True)
    doc = ids_with_bos(2 * L, batch=1, seed=3)[0, 1:].tolist()
    paper = document_cells(doc, L, BOS, PAD)  # BOS first in every cell
    cell = {k: v[1:2] for k, v in paper.items() if k != "shift_labels"}
    with pytest.raises(ValueError, match="decoder_previous_segment.*last token"):
        model(**cell)


def tiny_model(**overrides) -> MemformerForCausalLM:
    torch.manual_seed(0)
    cfg = MemformerConfig(vocab_size=61, hidden_size=16, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                          intermediate_size=32, segment_length=L, num_memory_slots=3, bos_token_id=BOS,
                          pad_token_id=PAD, eos_token_id=None, decoder_previous_segment=True, **overrides)
    return MemformerForCausalLM(cfg).double()


@pytest.mark.parametrize("position_embedding_type", ["rope", "simplified_rpe"])
def test_mrbp_equals_bptt_with_the_option(position_embedding_type):
    model = tiny_model(position_embedding_type=position_embedding_type)
    docs = [torch.randint(2, 61, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (4 * L + 3, 2 * L)]
    batch = StreamBatches(docs, segment_length=L, window=4, batch_size=2, bos_token_id=BOS, pad_token_id=PAD,
                          decoder_previous_segment=True)[0]
    cells = {k: v for k, v in batch.items() if k not in ("stream_ids", "window_index")}
    _, grads = assert_cells_mrbp_matches_bptt(model, cells)
    assert grads["model.writer.q_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["mrbp", "bptt", "truncated"])
def test_cells_backward_refuses_a_window_without_the_true_stream(mode):
    """`cells_backward` runs its cells without per-cell checks (`validate_inputs=False`): the window check refuses
    BOS-first cells (it trained on them silently)."""
    model = tiny_model()
    docs = [torch.randint(2, 61, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3 * L + 3, 2 * L)]
    stale = StreamBatches(docs, segment_length=L, window=3, batch_size=2, bos_token_id=BOS, pad_token_id=PAD)[0]
    cells = {k: v for k, v in stale.items() if k not in ("stream_ids", "window_index")}
    with pytest.raises(ValueError, match="decoder_previous_segment: 3 cells .* last token"):
        cells_backward(model, cells, None, mode=mode)
    assert all(p.grad is None for p in model.parameters())

def test_the_trainer_trains_with_the_option_and_refuses_a_layout_without_it(tmp_path):
    model = tiny_model().float()
    docs = [torch.randint(2, 61, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5 * L, 3 * L)]
    args = MemformerTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, mrbp_window=2,
                                      max_steps=2, report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no")
    trainer = MemformerTrainer(model=model, args=args, train_dataset=docs)
    assert trainer.train_dataset.decoder_previous_segment
    before = model.model.writer.q_proj.weight.detach().clone()
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert not torch.equal(before, model.model.writer.q_proj.weight)
    stale = StreamBatches(docs, segment_length=L, window=2, batch_size=2, bos_token_id=BOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="decoder_previous_segment"):
        MemformerTrainer(model=model, args=args, train_dataset=stale)


def stream_logits(model, ids: torch.Tensor, splits: list[int] | None = None, **kwargs) -> torch.Tensor:
    """Logits of `ids` fed through the cache in the calls `splits` (column boundaries; None: one call)."""
    bounds = [0, *(splits or []), ids.shape[1]]
    cache, out = None, []
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            result = model(ids[:, a:b], **{CACHE_KWARG: cache}, **kwargs)
            cache = result[CACHE_KWARG]
            out.append(result.logits)
    return torch.cat(out, 1)


def perturbed(model):
    """The new zero-initialised weights perturbed, so that the memory and the cross-attention reach the output."""
    for i, layer in enumerate(model.model.decoder.layers):
        perturb(layer.cross_attn.o_proj, seed=i)
    for i, layer in enumerate(model.model.encoder.layers):
        perturb(layer.memory_read.o_proj, seed=100 + i)
    return model


def test_every_stream_path_equals_the_cells():
    """The stream paths compute what the cells compute (the previous segment's prefix kept in the cache): the
    aligned path, the general planner, token-by-token decoding, irregular chunks through the cache, an implicit
    boot, labels, and at the warm start the backbone."""
    llama = tiny_llama()
    model = warm(llama, decoder_previous_segment=True)
    doc = ids_with_bos(3 * L + 5, batch=1, seed=8)[0, 1:].tolist()
    ids = torch.tensor([[BOS] + doc])
    torch.testing.assert_close(stream_logits(model, ids)[0, :-1], llama_windows(llama, doc), rtol=0, atol=1e-11)
    perturbed(model)
    ref = cell_logits(model, doc)  # ref[i] predicts doc[i]
    for splits in (None, list(range(1, ids.shape[1])), [5, 13, 14, 30], [L, 2 * L + 1]):
        torch.testing.assert_close(stream_logits(model, ids, splits)[0, :-1], ref, rtol=0, atol=1e-12,
                                   msg=str(splits))
    model.model.use_fast_paths = False  # the general planner for every call
    torch.testing.assert_close(stream_logits(model, ids)[0, :-1], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(stream_logits(model, ids, [3, L + 2])[0, :-1], ref, rtol=0, atol=1e-12)
    model.model.use_fast_paths = True
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([doc])).logits[0, :-1], ref[1:], rtol=0, atol=1e-12)
        embeds = model.get_input_embeddings()(torch.tensor([doc]))
        torch.testing.assert_close(model(inputs_embeds=embeds).logits[0, :-1], ref[1:], rtol=0, atol=1e-12)
        loss = model(ids, labels=ids).loss
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ref, ids[0, 1:]), rtol=1e-12, atol=0)


def test_padded_batches_generation_and_saved_states(tmp_path):
    """Left-padded rows of different lengths equal each row alone; greedy generate() continues as the full
    forward predicts; a state saved mid-segment and loaded again continues exactly."""
    model = perturbed(warm(tiny_llama(), decoder_previous_segment=True))
    a = ids_with_bos(2 * L + 3, batch=1, seed=11)
    b = ids_with_bos(L - 2, batch=1, seed=12)
    batch = torch.full((2, a.shape[1]), PAD)
    batch[0] = a[0]
    batch[1, -b.shape[1]:] = b[0]
    mask = (torch.arange(a.shape[1]) >= a.shape[1] - b.shape[1]).long().expand(2, -1).clone()
    mask[0] = 1
    with torch.no_grad():
        both = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[0], model(a).logits[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(both[1, -b.shape[1]:], model(b).logits[0], rtol=0, atol=1e-12)
        out = model.generate(batch, attention_mask=mask, max_new_tokens=L + 3, do_sample=False)
        for r, prompt in enumerate((a, b)):
            sequence = torch.cat([prompt[0], out[r, batch.shape[1]:]])[None]
            predicted = model(sequence).logits[0, prompt.shape[1] - 1: -1].argmax(-1)
            assert torch.equal(predicted, out[r, batch.shape[1]:]), r
    ids = ids_with_bos(3 * L, batch=1, seed=13)
    whole = stream_logits(model, ids)
    cut = L + 3
    with torch.no_grad():
        first = model(ids[:, :cut])
        path = str(tmp_path / "state.safetensors")
        first[CACHE_KWARG].save_state(path)
        loaded = type(first[CACHE_KWARG]).load_state(path, model.config)
        rest = model(ids[:, cut:], **{CACHE_KWARG: loaded}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, rtol=0, atol=1e-12)


def test_set_state_replaces_the_whole_state_and_checks_the_layout():
    """`set_state` into a cache that decoded before continues exactly (the host copy of the old fill does not
    survive, and the tensors handed in are not written in place), and a self K/V of L positions (the layout without
    the option) is refused by name instead of failing inside the decode step."""
    model = perturbed(tiny_model()).eval()  # (the decode step runs in eval mode only)
    ids = torch.randint(2, 61, (1, 3 * L), generator=torch.Generator().manual_seed(9))
    ids[:, 0] = BOS
    with torch.no_grad():
        whole = model(ids).logits
        source = model(ids[:, :L])[CACHE_KWARG]  # fill L - 1: the next token completes the segment
        state = dict(memory=source.memory, cross_mask=source.cross_mask, segment_ids=source.segment_ids,
                     fill=source.fill, started=source.started, self_kv=[(lay.keys, lay.values) for lay in source.layers],
                     cross_kv=[(lay.cross_keys, lay.cross_values) for lay in source.layers])
        before = [t.clone() for t in source._all_tensors()]
        cache = model(ids[:, :2])[CACHE_KWARG]
        model(ids[:, 2:3], **{CACHE_KWARG: cache})  # a decode step: fill 2 in the host copy, tensors owned in place
        cache.set_state(**state)
        out = [model(ids[:, j: j + 1], **{CACHE_KWARG: cache}).logits for j in range(L, L + 3)]
    torch.testing.assert_close(torch.cat(out, 1), whole[:, L: L + 3], rtol=0, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(source._all_tensors(), before))
    old_layout = {**state, "self_kv": [(k[:, :, L:], v[:, :, L:]) for k, v in state["self_kv"]]}
    with pytest.raises(ValueError, match=r"set_state: `layers.0.keys` must be a float tensor of shape \(1, 2, 16, 8\)"):
        MemformerCache(model.config).set_state(**old_layout)


@pytest.mark.parametrize("options", [dict(position_embedding_type="simplified_rpe"), dict(cross_attention_rope=True),
                                     dict(decoder_reads_memory=True), dict(first_segment_context="empty")])
def test_stream_paths_equal_the_cells_with_other_options(options):
    model = tiny_model(**options).eval()
    doc = torch.randint(2, 61, (3 * L + 2,), generator=torch.Generator().manual_seed(3)).tolist()
    boot = [BOS] if options.get("first_segment_context") != "empty" else []
    ids = torch.tensor([boot + doc]) if boot else torch.tensor([doc])
    cells = document_cells(doc, L, BOS, PAD, boot="empty" if not boot else "bos", decoder_previous_segment=True)
    memory, ref = None, []
    with torch.no_grad():
        for t in range(cells["encoder_input_ids"].shape[0]):
            result = model(**{k: v[t: t + 1] for k, v in cells.items() if k != "shift_labels"}, memory=memory)
            memory = result.memory
            ref.append(result.logits[0, : min(L, len(doc) - t * L)])
    ref = torch.cat(ref)
    offset = 0 if boot else 1  # without a BOS column, column j predicts doc[j + 1]
    for splits in (None, [2, L + 1], list(range(1, ids.shape[1]))):
        got = stream_logits(model, ids, splits)[0]
        torch.testing.assert_close(got[: len(doc) - offset] if boot else got[:-1], ref[offset:], rtol=0, atol=1e-12,
                                   msg=str(splits))


def test_memory_replay_backward_equals_bptt_with_the_option():
    ids = torch.randint(2, 61, (2, 4 * L + 3), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = BOS
    assert_mrbp_matches_bptt(tiny_model(), ids)


def test_the_config_option_round_trips_and_is_validated():
    model = tiny_model()
    assert MemformerConfig.from_dict(model.config.to_dict()).decoder_previous_segment is True
    with pytest.raises(ValueError, match="decoder_previous_segment"):
        MemformerConfig(decoder_previous_segment="yes")
