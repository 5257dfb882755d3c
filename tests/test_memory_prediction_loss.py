"""`memory_prediction_loss` (a training aid beyond the paper, docs/design.md#memory-prediction-loss): the memory a
training cell reads scores the bag of words of the cell's targets. Checked against a plain re-computation, through
both cell implementations (the eager forward and the CUDA-graph cell module), MRBP vs BPTT, the Trainer, and that it
changes no forward output."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BOS, PAD, assert_cells_mrbp_matches_bptt, assert_config_refused, tiny_memformer_config

from memformer_hf import MemformerForCausalLM, mrbp
from memformer_hf.data_streams import StreamBatches
from memformer_hf.mrbp import _TrainingCell, cells_backward, memory_replay_backward
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments

WEIGHT = 0.7


def model_with(weight: float, **overrides) -> MemformerForCausalLM:
    torch.manual_seed(0)
    return MemformerForCausalLM(tiny_memformer_config(memory_prediction_loss=weight, **overrides)).double()


def window(model: MemformerForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """One MRBP window [B=2, T=3] of two documents packed as the Trainer would."""
    cfg = model.config
    L = cfg.segment_length
    docs = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()
            for n in (4 * L + 3, 2 * L)]
    batch = StreamBatches(docs, segment_length=L, window=3, batch_size=2, bos_token_id=BOS, pad_token_id=PAD,
                          decoder_previous_segment=cfg.decoder_previous_segment)[0]
    return {k: v for k, v in batch.items() if k not in ("stream_ids", "window_index")}


def bag_of_words_nll(model: MemformerForCausalLM, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over scored targets of −log((1/K) Σ_k softmax(lm_head(P m_k))[y]), written out slot by slot."""
    total = torch.zeros((), dtype=torch.float64)
    for row in range(labels.shape[0]):
        probs = sum(torch.softmax(model.lm_head(model.memory_predictor.proj(slot)), -1) for slot in memory[row])
        probs = probs / memory.shape[1]
        for y in labels[row]:
            if y != -100:
                total = total - torch.log(probs[y])
    return total


def cell_inputs(cells: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    L = cells["encoder_input_ids"].shape[-1]
    out = {k: cells[k][:, t] for k in ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids",
                                       "decoder_attention_mask", "memory_reset")}
    out["shift_labels"] = cells["shift_labels"][:, t * L:(t + 1) * L]
    return out


@pytest.mark.parametrize("decoder_previous_segment", [False, True])
def test_the_training_loss_adds_the_bag_of_words_nll_of_the_memory_read(decoder_previous_segment):
    model = model_with(WEIGHT, decoder_previous_segment=decoder_previous_segment)
    cells = window(model)
    cell = cell_inputs(cells, 1)
    memory = torch.nn.functional.normalize(torch.randn(2, 3, 16, dtype=torch.float64), dim=-1)
    cell["memory_reset"] = torch.tensor([1, 0])  # row 0 reads m0
    n = int((cell["shift_labels"] != -100).sum())
    model.eval()
    lm_loss = model(**cell, memory=memory).loss
    model.train()  # dropout is 0: only the auxiliary term differs
    loss = model(**cell, memory=memory).loss
    read = torch.stack([model.model.initial_memory(1)[0], memory[1]])
    expected = lm_loss + WEIGHT * bag_of_words_nll(model, read, cell["shift_labels"]) / n
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert float((loss - lm_loss).detach()) > 0.1
    # the cell module that CUDA graphs capture adds the same term (checked here eagerly; its LM NLL is float32)
    graph_cell = _TrainingCell(model)
    cell_loss, _ = graph_cell(memory, cell["encoder_input_ids"], cell["encoder_attention_mask"],
                              cell["decoder_input_ids"], cell["decoder_attention_mask"], cell["memory_reset"],
                              cell["shift_labels"], torch.tensor(n))
    torch.testing.assert_close(cell_loss, expected, rtol=1e-7, atol=0)


def test_mrbp_equals_bptt_and_the_aid_reaches_the_writer():
    model = model_with(WEIGHT).train()
    cells = window(model)
    loss, grads = assert_cells_mrbp_matches_bptt(model, cells)
    assert grads["memory_predictor.proj.weight"].abs().sum() > 0
    # the same weights without the aid: the writer's gradient differs (the aid reaches it through the memory)
    plain = model_with(0.0).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("memory_predictor.")})
    plain_loss, _ = cells_backward(plain, cells, None, mode="mrbp")
    assert float(plain_loss) < loss
    writer = "model.writer.q_proj.weight"
    assert not torch.allclose(dict(plain.named_parameters())[writer].grad, grads[writer])


def test_it_changes_no_forward_output_and_round_trips(tmp_path):
    model = model_with(WEIGHT).eval()
    plain = model_with(0.0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("memory_predictor.")})
    ids = torch.randint(3, 50, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=ids).logits, plain(ids, labels=ids).logits, rtol=0, atol=0)
        assert float(model(ids, labels=ids).loss) == float(plain(ids, labels=ids).loss)
    model.save_pretrained(tmp_path)
    loaded = MemformerForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert loaded.config.memory_prediction_loss == WEIGHT
    torch.testing.assert_close(loaded.memory_predictor.proj.weight, model.memory_predictor.proj.weight, rtol=0, atol=0)
    assert model_with(0.0).memory_predictor is None  # off: no parameter, no checkpoint key


def test_the_trainer_trains_the_predictor(tmp_path):
    model = model_with(WEIGHT).float()
    L = model.config.segment_length
    docs = [torch.randint(3, 50, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5 * L, 3 * L)]
    args = MemformerTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, mrbp_window=2,
                                      max_steps=2, report_to=[], disable_tqdm=True, use_cpu=True, save_strategy="no")
    before = model.memory_predictor.proj.weight.detach().clone()
    result = MemformerTrainer(model=model, args=args, train_dataset=docs).train()
    assert math.isfinite(result.training_loss)
    assert not torch.equal(before, model.memory_predictor.proj.weight)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.5"])
def test_a_bad_weight_is_refused(tmp_path, value):
    assert_config_refused(tmp_path, {"memory_prediction_loss": value}, "memory_prediction_loss",
                          "memory_prediction_loss")


def test_memory_replay_backward_computes_the_lm_loss_only():
    """memory_replay_backward is the gradient of the stream forward's loss, which has no auxiliary term, also in
    training mode on aligned input (where it runs the cell engine)."""
    model = model_with(WEIGHT).train()
    ids = torch.randint(3, 50, (2, 17), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = BOS
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, _ = memory_replay_backward(model, ids)
    assert float(loss) == pytest.approx(float(out.loss.detach()), rel=1e-10)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys()  # the predictor gets no gradient from the stream loss
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-10, msg=name)


def test_a_training_cell_takes_memory_reset_as_a_list_of_bools():
    """The forward takes `memory_reset` as a bool/int tensor or a list of bools; so does the auxiliary term."""
    model = model_with(WEIGHT).train()
    cell = cell_inputs(window(model), 1)
    memory = torch.nn.functional.normalize(torch.randn(2, 3, 16, dtype=torch.float64), dim=-1)
    expected = model(**{**cell, "memory_reset": torch.tensor([True, False])}, memory=memory).loss
    for reset in ([True, False], [1, 0], torch.tensor([1, 0])):
        got = model(**{**cell, "memory_reset": reset}, memory=memory).loss
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the training cells run as CUDA graphs on a GPU only")
def test_graphed_training_cells_add_the_term_in_training_mode_only():  # pragma: no cover - CPU CI
    """The graphed cells (CUDA) compute what the eager ones do, in training mode (with the term) and in eval mode
    (without it), whichever mode the graph was captured in first; memory_replay_backward's graphed cells leave the
    term out."""
    cells = {k: v.cuda() for k, v in window(model_with(WEIGHT)).items()}
    runs = {}
    for graphs in (True, False):
        model = model_with(WEIGHT).float().cuda()
        model.model.use_cuda_graphs = graphs
        for training in (True, False, True):
            model.train(training)
            model.zero_grad(set_to_none=True)
            loss, memory = cells_backward(model, cells, None)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            runs.setdefault(graphs, []).append((float(loss), memory, grads))
        ids = torch.randint(3, 50, (2, 17), generator=torch.Generator().manual_seed(2)).cuda()
        ids[:, 0] = BOS
        model.train()
        reference = float(model(ids, labels=ids).loss)
        loss, _ = memory_replay_backward(model, ids)
        assert float(loss) == pytest.approx(reference, rel=1e-5), f"graphs={graphs}"
    for (graphed, eager) in zip(runs[True], runs[False]):
        assert graphed[0] == pytest.approx(eager[0], rel=1e-5)
        torch.testing.assert_close(graphed[1], eager[1], rtol=1e-5, atol=1e-6)
        assert graphed[2].keys() == eager[2].keys()
        for name, g in eager[2].items():
            torch.testing.assert_close(graphed[2][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert runs[False][0][0] > runs[False][1][0]  # the training loss holds the term, the eval loss not


def test_the_graphed_cell_is_keyed_on_whether_it_adds_the_term(monkeypatch):
    """A CUDA graph replays the branches taken when it was captured: the graphed training cell of a model captured
    in training mode (with the term) must not be replayed in eval mode (without it), nor the reverse. Emulated on
    the CPU: a stand-in for the capture that fixes the mode it saw."""
    def capture(self, model, example, memory, memory_prediction=True):
        self.model, self.aliases = model, []
        cell, captured_in = _TrainingCell(model, memory_prediction), model.training

        def replay(*args):
            was = model.training
            model.train(captured_in)
            try:
                return cell(*args)
            finally:
                model.train(was)
        self.graphed = replay

    model = model_with(WEIGHT)
    cells = window(model)
    eager = {}
    for training in (True, False):
        model.train(training)
        eager[training] = float(cells_backward(model, cells, None)[0])
    assert eager[True] > eager[False]
    monkeypatch.setattr(mrbp, "graphed_cells_apply", lambda model, cells: True)
    monkeypatch.setattr(mrbp.TrainingCellGraph, "__init__", capture)
    for training in (True, False, True):
        model.train(training)
        # (the graphed cell sums the LM NLL in float32)
        assert float(cells_backward(model, cells, None)[0]) == pytest.approx(eager[training], rel=1e-6), training
