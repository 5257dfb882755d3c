"""The fixed-shape recurrent step used by every path equals the general planner (float64, CPU).

Every stream-mode call whose rows are in the same state and hold no padding takes the aligned path (reshape into
segments, one critical-path step per segment, one batched decoder call); one-token calls without autograd take the
in-place decoder step; MRBP's stream API lays aligned input out as cells for the one replay engine. Each is compared
here with `MemformerModel.use_fast_paths = False` (the general planner), which the reference tests check.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BOS, cache_tensors, rand_ids, tiny_memformer_config

from memformer_hf.modeling_memformer import CACHE_KWARG
from memformer_hf.mrbp import memory_replay_backward, stream_cells

L = 4  # tiny config's segment length


def build(seed: int = 0, **overrides):
    from memformer_hf import MemformerForCausalLM

    torch.manual_seed(seed)
    return MemformerForCausalLM(tiny_memformer_config(**overrides)).double().eval()


class general_planner:
    """Context: the model runs the general planner only."""

    def __init__(self, model):
        self.core = model.model

    def __enter__(self):
        self.core.use_fast_paths = False

    def __exit__(self, *exc):
        self.core.use_fast_paths = True


def both(model, *args, **kwargs):
    """(fast, general) outputs of the same call, each on its own copy of any passed cache."""
    cache = kwargs.pop(CACHE_KWARG, None)
    fast = model(*args, **kwargs, **{CACHE_KWARG: copy.deepcopy(cache)})
    with general_planner(model):
        general = model(*args, **kwargs, **{CACHE_KWARG: copy.deepcopy(cache)})
    return fast, general


def assert_same(fast, general, columns=None):
    a, b = fast.logits, general.logits
    if columns is not None:
        a, b = a[:, columns], b[:, columns]
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    fc, gc = fast.get(CACHE_KWARG), general.get(CACHE_KWARG)
    if fc is not None:
        ft, gt = cache_tensors(fc), cache_tensors(gc)
        # state beyond a row's position is never read (either path may leave stale or padding values there)
        valid = (torch.arange(L)[None] <= gc.fill[:, None])[:, None, :, None]
        for k in gt:
            if k.endswith(".keys") or k.endswith(".values"):
                ft[k], gt[k] = ft[k] * valid, gt[k] * valid
            if k == "segment_ids":  # tokens of the partial segment: positions < fill
                tokens = torch.arange(L)[None] < gc.fill[:, None]
                ft[k], gt[k] = ft[k] * tokens, gt[k] * tokens
            torch.testing.assert_close(ft[k], gt[k], atol=1e-10, rtol=0, msg=k)
        assert fc.consumed == gc.consumed and fc.host_state() == gc.host_state()


@pytest.mark.parametrize("n", [1, 3, 4, 5, 13])
@pytest.mark.parametrize("boot", [True, False])
def test_aligned_fresh_equals_general(n, boot):
    model = build(1)
    ids = rand_ids(n, batch=3, seed=n, boot=boot)
    with torch.no_grad():
        assert_same(*both(model, ids, use_cache=True))
        fast, general = both(model, ids, use_cache=True, logits_to_keep=1)
        assert_same(fast, general)


@pytest.mark.parametrize("prefix", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [2, 4, 9])
def test_aligned_continuation_equals_general(prefix, n):
    """Rows continuing the same partial segment (fill 0 .. L-1) from a cache."""
    model = build(2)
    with torch.no_grad():
        cache = model(rand_ids(prefix, batch=2, seed=prefix), use_cache=True)[CACHE_KWARG]
        assert len(set(cache.host_state()[1])) == 1
        ids = rand_ids(n, batch=2, seed=10 + n, boot=False)
        assert_same(*both(model, ids, use_cache=True, **{CACHE_KWARG: cache}))
        # every row restarting a document from a used cache
        restart = rand_ids(n, batch=2, seed=20 + n)
        assert_same(*both(model, restart, use_cache=True, memory_reset=torch.tensor([True, True]),
                          **{CACHE_KWARG: cache}))


def test_aligned_with_gradients_equals_general():
    model = build(3).train()
    ids = rand_ids(11, batch=2, seed=3)
    grads = []
    for fast in (True, False):
        model.model.use_fast_paths = fast
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.model.use_fast_paths = True
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-10, rtol=1e-8, msg=n)


def test_decoder_step_equals_general_across_boundaries():
    """One token at a time (no autograd): the in-place decoder step, rows at different positions (left padding)."""
    model = build(4)
    prompt = rand_ids(6, batch=3, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # row 1 is shorter: its segment position differs from the others'
    mask[2, :1] = 0
    prompt[1, 3] = BOS
    prompt[2, 1] = BOS
    with torch.no_grad():
        cache_fast = model(prompt, attention_mask=mask, use_cache=True)[CACHE_KWARG]
        cache_general = copy.deepcopy(cache_fast)
        assert len(set(cache_fast.host_state()[1])) > 1
        tokens = rand_ids(3 * L + 2, batch=3, seed=5, boot=False)
        for j in range(tokens.shape[1]):
            fast = model(tokens[:, j:j + 1], **{CACHE_KWARG: cache_fast})
            with general_planner(model):
                general = model(tokens[:, j:j + 1], **{CACHE_KWARG: cache_general})
            assert_same(fast, general)


def test_decoder_step_does_not_write_into_callers_tensors():
    model = build(5)
    with torch.no_grad():
        out = model(rand_ids(3, batch=1, seed=5), use_cache=True)
        cache = out[CACHE_KWARG]
        memory, keys = out.memory.clone(), cache.layers[0].keys
        kept = keys.clone()
        for j in range(2 * L):
            model(torch.tensor([[7 + j]]), **{CACHE_KWARG: cache})
        torch.testing.assert_close(out.memory, memory, atol=0, rtol=0)
        torch.testing.assert_close(keys, kept, atol=0, rtol=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prefix", [0, 1, 3, 4])
def test_mrbp_stream_cells_equal_forward_backward(prefix):
    """memory_replay_backward over aligned input runs the cell engine; it equals the whole backward, also when the
    call continues a cache (its first chunk decodes against the cache's cross context)."""
    model = build(6).train()
    past = None
    if prefix:
        with torch.no_grad():
            past = model(rand_ids(prefix, batch=2, seed=prefix), use_cache=True)[CACHE_KWARG]
    ids = rand_ids(10, batch=2, seed=7, boot=prefix == 0)
    assert stream_cells(model, ids, None, None, past, ids) is not None
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=True, **{CACHE_KWARG: copy.deepcopy(past)})
    out.loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, cache = memory_replay_backward(model, ids, past_key_values=past)
    got = _grads(model)
    assert got.keys() == reference.keys()
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], atol=1e-10, rtol=1e-8, msg=n)
    assert float(loss) == pytest.approx(float(out.loss.detach()), rel=1e-10)
    expected = cache_tensors(out[CACHE_KWARG].detach_())
    for k, v in cache_tensors(cache).items():
        torch.testing.assert_close(v, expected[k], atol=1e-10, rtol=0, msg=k)


def test_mrbp_detaches_a_cache_with_autograd_history(caplog):
    """A cache from a forward with gradients: its history is cut (with a warning), and the gradients equal those of
    the same call on the detached cache."""
    model = build(8).train()
    past = model(rand_ids(5, batch=2, seed=8), use_cache=True)[CACHE_KWARG]
    assert past.memory.requires_grad
    ids = rand_ids(9, batch=2, seed=9, boot=False)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **{CACHE_KWARG: copy.deepcopy(past)})  # deepcopy detaches
    out.loss.backward()
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    with caplog.at_level("WARNING"):
        memory_replay_backward(model, ids, past_key_values=past)
    assert "autograd history" in caplog.text
    got = _grads(model)
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], atol=1e-10, rtol=1e-8, msg=n)


def test_cell_mode_without_validation_equals_validated():
    model = build(9)
    enc = rand_ids(L, batch=2, seed=10)
    dec = rand_ids(L, batch=2, seed=11)
    with torch.no_grad():
        a = model(encoder_input_ids=enc, decoder_input_ids=dec)
        b = model(encoder_input_ids=enc, decoder_input_ids=dec, validate_inputs=False)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.memory, b.memory, atol=0, rtol=0)


def test_torch_compile_is_refused_with_a_reason(tmp_path):
    from memformer_hf.trainer_memformer import MemformerTrainingArguments

    with pytest.raises(ValueError, match="torch_compile is not supported by MemformerTrainer"):
        MemformerTrainingArguments(output_dir=str(tmp_path), torch_compile=True)
    assert not MemformerTrainingArguments(output_dir=str(tmp_path)).torch_compile


def _average_worker(rank: int, world: int, port: int) -> None:
    from helpers import gloo_group

    from memformer_hf.mrbp import average_gradients

    with gloo_group(rank, world, port):
        model = build(12)
        ddp_model = torch.nn.parallel.DistributedDataParallel(build(12))
        ids = rand_ids(9, batch=2, seed=20 + rank)  # each rank its own batch
        model(ids, labels=ids).loss.backward()
        average_gradients(model)  # what the Trainer does for graphed cells under DDP
        ddp_model(ids, labels=ids).loss.backward()  # DDP's own averaging
        for (name, p), q in zip(model.named_parameters(), ddp_model.module.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_average_gradients_equals_ddp():
    """Under DDP the graphed training cells run on the bare module and the Trainer averages the gradients itself:
    the result equals DDP's (2 gloo ranks, different batches)."""
    from helpers import spawn_workers

    spawn_workers(_average_worker, 2)


def test_reset_of_a_row_without_tokens_is_kept():
    """A row reset in a call where it has only padding starts its next document from m0 (the reset is not lost), as
    the same row reset in the call that brings its first tokens."""
    model = build(13)
    with torch.no_grad():
        cache = model(rand_ids(6, batch=2, seed=13), use_cache=True)[CACHE_KWARG]
        pad_only = rand_ids(3, batch=2, seed=14, boot=False)
        mask = torch.ones_like(pad_only)
        mask[0] = 0  # row 0: padding only, but reset
        after_reset = model(pad_only, attention_mask=mask, memory_reset=torch.tensor([True, False]),
                            **{CACHE_KWARG: copy.deepcopy(cache)})[CACHE_KWARG]
        assert after_reset.started.tolist() == [False, True] and after_reset.host_state()[0] == [False, True]
        nxt = rand_ids(5, batch=2, seed=15)
        got = model(nxt, **{CACHE_KWARG: after_reset}).logits[0]
        fresh = model(nxt[:1]).logits[0]  # row 0 as a new document
    torch.testing.assert_close(got, fresh, atol=1e-10, rtol=0)
