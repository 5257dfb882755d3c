"""Corpora larger than memory (docs/design.md#streamed-corpora): `IterableStreamBatches` against the in-memory
`StreamBatches`, every document token exactly once per pass and in order within its stream, resuming from any batch,
bad sources, and `MemformerTrainer` training on a local jsonl loaded with `datasets.load_dataset(..., streaming=True)`
and resuming from a checkpoint. (The command line with `--streaming true`: `tests/test_cli.py`.)"""

from __future__ import annotations

import itertools
import json
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import BOS, PAD, L, StopAt, build_tiny_memformer, word_tokenizer
from safetensors.torch import load_file

from memformer_hf.data_streams import IGNORE_INDEX, IterableStreamBatches, StreamBatches
from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments

datasets = pytest.importorskip("datasets")


def unique_docs(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    """Documents of random lengths (empty ones included) whose token ids are unique across all documents."""
    rng = random.Random(seed)
    docs, nxt = [], 10
    for _ in range(n):
        k = rng.randint(lo, hi)
        docs.append(list(range(nxt, nxt + k)))
        nxt += k
    return docs


def layout(B: int, G: int, T: int, seg: int = L, **kw) -> dict:
    return dict(segment_length=seg, window=T, batch_size=B, grad_accum=G, bos_token_id=BOS, pad_token_id=PAD, **kw)


def assert_same_batches(got: list[dict], ref: list[dict], stream_offset: int = 0) -> None:
    assert len(got) == len(ref) > 0
    for k, (a, b) in enumerate(zip(got, ref)):
        assert a.keys() == b.keys()
        for key in a:
            want = b[key] + stream_offset if key == "stream_ids" else b[key]
            assert a[key].dtype == want.dtype and torch.equal(a[key], want), (k, key)


# ============================================================================================== batches
@pytest.mark.parametrize("B,G,T,seg", [(2, 1, 2, 4), (3, 2, 3, 5), (1, 3, 1, 4), (2, 2, 4, 3)])
def test_one_pass_equals_stream_batches(B, G, T, seg):
    """One rank, one pass: the batches are those of `StreamBatches(shuffle=False)` over the same documents (the
    greedy dealing applied online gives the same streams); two ranks: rank r's batches are those of the in-memory
    packer over the documents r, r+2, ... with the stream ids of rank r."""
    docs = unique_docs(0, 23, 0, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StreamBatches warns about the empty documents
        ref = StreamBatches(docs, shuffle=False, **layout(B, G, T, seg))
        assert_same_batches(list(IterableStreamBatches(docs, passes=1, **layout(B, G, T, seg))),
                            [ref[k] for k in range(len(ref))])
        for rank in range(2):
            ref = StreamBatches(docs[rank::2], shuffle=False, **layout(B, G, T, seg))
            got = list(IterableStreamBatches(docs, passes=1, world_size=2, rank=rank, **layout(B, G, T, seg)))
            assert_same_batches(got, [ref[k] for k in range(len(ref))], stream_offset=rank * B * G)


def stream_documents(batches: list[dict], T: int) -> dict[int, list[list[int]]]:
    """Per global stream: the target tokens of each document in the order the stream trains them (a document
    starts at an active cell with `memory_reset`; inactive cells have no targets)."""
    streams: dict[int, list[list[int]]] = {}
    for b in batches:
        labels = b["shift_labels"].view(b["memory_reset"].shape[0], T, -1)
        for row, sid in enumerate(b["stream_ids"].tolist()):
            docs = streams.setdefault(sid, [])
            for t in range(T):
                tokens = [x for x in labels[row, t].tolist() if x != IGNORE_INDEX]
                if b["memory_reset"][row, t] and tokens:
                    docs.append([])
                assert tokens == [] or docs, "targets before the first document start"
                if tokens:
                    docs[-1].extend(tokens)
    return streams


def test_every_token_once_per_pass_in_order():
    """Three passes over a source with empty documents on two ranks of 2 x 2 streams: every non-empty document is
    trained exactly once per pass, whole and in order, on the rank that owns it (r = index mod 2); within a stream
    the documents come in source order, and no stream restarts a document."""
    docs = unique_docs(1, 17, 0, 30)
    first = {d[0]: i for i, d in enumerate(docs) if d}
    seen = {i: 0 for i in first.values()}
    for rank in range(2):
        batches = list(IterableStreamBatches(docs, passes=3, world_size=2, rank=rank, **layout(2, 2, 3)))
        assert {int(b["window_index"]) for b in batches} == set(range(len(batches) // 2))
        for sid, trained in stream_documents(batches, 3).items():
            assert 4 * rank <= sid < 4 * rank + 4
            order = []
            for tokens in trained:
                i = first[tokens[0]]
                assert tokens == docs[i] and i % 2 == rank, (sid, tokens)
                seen[i] += 1
                order.append(i)
            wraps = sum(1 for a, b in zip(order, order[1:]) if b <= a)  # (pass, index) increases: the index
            assert order and wraps <= 2, order  # goes back only where the stream enters the next pass
    assert set(seen.values()) == {3}, seen


def take(ds, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def test_resume_from_any_batch_continues_exactly():
    """Texts tokenized on the fly, endless passes, gradient accumulation 2 (positions inside a window): the state
    after any batch, through JSON, makes a fresh dataset continue with exactly the batches of the uninterrupted
    iteration, across pass boundaries; the documents in flight are re-read, not the whole pass."""
    rng = random.Random(3)
    texts = [" ".join(f"w{rng.randrange(3, 50)}" for _ in range(rng.randint(0, 25))) for _ in range(9)]
    tok = word_tokenizer(50)
    kw = layout(2, 2, 2, tokenizer=tok)
    ref = take(IterableStreamBatches(texts, **kw), 68)
    passes_crossed = 0
    for stop in range(0, 60, 3):
        ds = IterableStreamBatches(texts, **kw)
        take(ds, stop)
        state = json.loads(json.dumps(ds.state_dict()))
        passes_crossed = max(passes_crossed, state["position"]["next"][0])
        fresh = IterableStreamBatches(texts, **kw)
        assert fresh.load_state_dict(state) is True
        assert_same_batches(take(fresh, 8), ref[stop:stop + 8])
    assert passes_crossed >= 2


class RecordingTokenizer:
    """A raw-`tokenizers`-like tokenizer of "w<id> w<id> ..." texts that records what it is asked to tokenize."""

    truncation = None

    def __init__(self):
        self.seen: list[str] = []

    def encode_batch(self, texts, add_special_tokens=False):
        self.seen += texts
        return [SimpleNamespace(ids=[int(w[1:]) for w in t.split()]) for t in texts]


def test_resume_tokenizes_only_the_documents_in_flight_and_after():
    """On resume the records before the position are skipped without tokenizing them, except the documents still
    in flight, which are read again from the source."""
    texts = [" ".join(f"w{t}" for t in d) for d in unique_docs(4, 40, 1, 40)]
    kw = dict(passes=1, tokenize_batch=1, **layout(2, 1, 2))
    ds = IterableStreamBatches(texts, tokenizer=RecordingTokenizer(), **kw)
    for _ in range(40):  # stop where a long document is in flight behind documents read after it
        take(ds, 1)
        state = ds.state_dict()
        in_flight = {i for refs in state["position"]["streams"] for _, i, _ in refs}
        nxt = state["position"]["next"][1]
        if in_flight and 0 < min(in_flight) < nxt - 2:
            break
    assert state["resume_from"] == [0, min(in_flight)] and 0 < min(in_flight) < nxt - 2
    tok = RecordingTokenizer()
    fresh = IterableStreamBatches(texts, tokenizer=tok, **kw)
    fresh.load_state_dict(state)
    take(fresh, 1)
    read = [texts.index(t) for t in tok.seen]
    assert in_flight <= set(read) and all(i in in_flight or i >= nxt for i in read), (read, in_flight, nxt)


def test_another_layout_restarts_at_the_earliest_document_in_flight():
    """A state saved with another batch size cannot continue exactly: the new layout starts at `resume_from`
    (the earliest document in flight), with a warning, so no document is skipped."""
    docs = unique_docs(5, 20, 5, 15)
    ds = IterableStreamBatches(docs, passes=1, **layout(2, 1, 2))
    take(ds, 4)
    state = ds.state_dict()
    other = IterableStreamBatches(docs, passes=1, **layout(3, 1, 2))
    with pytest.warns(UserWarning, match=rf"restart at document {state['resume_from'][1]} of pass 0"):
        assert other.load_state_dict(state) is False
    first = take(other, 1)[0]
    assert first["memory_reset"][0, 0] and first["shift_labels"][0, 0] == docs[state["resume_from"][1]][0]


def test_streamed_records_drop_padding_and_a_leading_bos():
    """Streamed records are read as the map-style trainer reads documents: padding (`attention_mask` 0) and a
    leading BOS are dropped, `labels` must equal the ids (masks that hide real tokens are refused)."""
    rng = random.Random(5)
    docs = [[rng.randrange(3, 50) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    records = [{"input_ids": [BOS] + d + [PAD, PAD], "attention_mask": [1] * (len(d) + 1) + [0, 0],
                "labels": [BOS] + d + [-100, -100]} for d in docs]
    kw = layout(2, 1, 2, passes=1)
    reference = list(IterableStreamBatches(docs, **kw))
    assert_same_batches(list(IterableStreamBatches(records, **kw)), reference)
    assert_same_batches(list(IterableStreamBatches([np.array(d) for d in docs], **kw)), reference)
    # the map-style packer drops a leading BOS too (it is the document's boot, as in the model's stream mode)
    with_bos = StreamBatches([[BOS] + d for d in docs], **layout(2, 1, 2), shuffle=False)
    plain = StreamBatches(docs, **layout(2, 1, 2), shuffle=False)
    assert_same_batches([with_bos[i] for i in range(len(with_bos))], [plain[i] for i in range(len(plain))])
    records[3]["labels"][2] = -100
    with pytest.raises(ValueError, match=r"document 3 of pass 0: its `labels` differ from its `input_ids`"):
        list(IterableStreamBatches(records, **kw))


def test_bad_sources_raise_naming_the_problem():
    kw = layout(2, 1, 2)
    with pytest.raises(ValueError, match="one-shot iterator"):
        IterableStreamBatches(iter([[3, 4]]), **kw)
    with pytest.raises(ValueError, match="document 0 of pass 0 is text; pass tokenizer="):
        take(IterableStreamBatches(["w3 w4"], **kw), 1)
    with pytest.raises(ValueError, match=r"document 1 of pass 0 has no column 'body' .*available columns: \['text'\]"):
        take(IterableStreamBatches([{"body": "w3"}, {"text": "w3"}], text_column="body", tokenizer=word_tokenizer(50),
                                   **kw), 1)
    with pytest.raises(ValueError, match="document 2 of pass 0 holds token id 60 but the model's vocab_size is 50"):
        take(IterableStreamBatches([[3] * 9, [4] * 9, [60]], vocab_size=50, **kw), 5)
    with pytest.raises(ValueError, match="document 1 of pass 0 holds float32 values such as 4.5; token ids must be "
                                         "integers"):
        take(IterableStreamBatches([[3] * 9, [4.5, 5], [6]], **kw), 5)
    with pytest.raises(ValueError, match="document 0 of pass 0 holds float64 values such as 3.5"):
        take(IterableStreamBatches([{"input_ids": torch.tensor([3.5, 4.0], dtype=torch.float64)}], **kw), 1)
    with pytest.raises(ValueError, match="pass 0 gave rank 1 no tokens .*at least 2 non-empty"):
        take(IterableStreamBatches([[3, 4, 5], []], world_size=2, rank=1, **kw), 1)
    loader = torch.utils.data.DataLoader(IterableStreamBatches([[3, 4]], **kw), batch_size=None, num_workers=1)
    with pytest.raises(ValueError, match="num_workers=0"):
        next(iter(loader))


# ============================================================================================== trainer
def write_jsonl(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(3, 50)}" for _ in range(rng.randint(3, 40)))
            f.write(json.dumps({"id": i, "text": words}) + "\n")
    return path


def args(out: Path, **kw) -> MemformerTrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, mrbp_window=2,
                max_steps=6, learning_rate=2e-2, logging_steps=1, save_strategy="steps", save_steps=3, report_to=[],
                use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch")
    return MemformerTrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_trainer_streams_a_jsonl_and_resumes(tmp_path, dropout):
    """`load_dataset("json", streaming=True)` of texts, tokenized on the fly with the `processing_class`: training
    runs `max_steps` optimizer steps over endless passes; a run stopped after step 3 and resumed from its checkpoint
    by a fresh trainer and model gives the losses and parameters of the uninterrupted run (the stream position and
    the carried memory are restored, no batch is replayed), with dropout too (the random state is restored after
    the epoch's data iterator is created, whose creation draws from it, as in the uninterrupted run)."""
    data = write_jsonl(tmp_path / "train.jsonl", 5, seed=0)  # short: the 6 steps run through several passes

    def stream():
        return datasets.load_dataset("json", data_files=str(data), split="train", streaming=True)

    def trainer(out, seed=0, **kw):
        model = build_tiny_memformer(seed, dtype=torch.float32, train=True, hidden_dropout=dropout)
        return MemformerTrainer(model=model, args=args(out), train_dataset=stream(), processing_class=word_tokenizer(50),
                                **kw)

    full = trainer(tmp_path / "full")
    assert isinstance(full.train_dataset, IterableStreamBatches) and full.training_plan() == (1, 6)
    full.train()
    assert full.state.global_step == 6 and full.train_dataset.state_dict()["position"]["next"][0] >= 1  # in pass 1

    part = trainer(tmp_path / "part", callbacks=[StopAt(3)])
    part.train()
    ckpt = tmp_path / "part" / "checkpoint-3"
    saved = json.loads((ckpt / "stream_state-rank0.json").read_text())
    assert saved["kind"] == "iterable" and saved["position"]["window"] == 3 and saved["position"]["group"] == 0
    assert load_file(ckpt / "stream_state-rank0.safetensors")["carry"].shape[0] == 4

    resumed = trainer(tmp_path / "part", seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    ref = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    assert sorted(losses) == sorted(ref) == [1, 2, 3, 4, 5, 6]  # steps 1-3 from the checkpoint's log
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(ref[step], rel=1e-6), (step, losses, ref)
    for (name, a), b in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert resumed.train_dataset.state_dict()["position"] == full.train_dataset.state_dict()["position"]


def test_trainer_refuses_a_stream_without_max_steps_or_with_workers(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", 4, seed=1)
    stream = datasets.load_dataset("json", data_files=str(data), split="train", streaming=True)
    model = build_tiny_memformer(0, dtype=torch.float32, train=True)
    with pytest.raises(ValueError, match=r"has no length.*set max_steps > 0 \(got max_steps=-1\)"):
        MemformerTrainer(model=model, args=args(tmp_path, max_steps=-1, num_train_epochs=1), train_dataset=stream,
                         processing_class=word_tokenizer(50))
    with pytest.raises(ValueError, match=r"dataloader_num_workers=0 \(got 2\)"):
        MemformerTrainer(model=model, args=args(tmp_path, dataloader_num_workers=2), train_dataset=stream,
                         processing_class=word_tokenizer(50))
    # texts without a tokenizer: refused at once, naming the trainer's argument (it failed at the first batch of
    # train(), saying "pass tokenizer=", an argument the trainer has not)
    with pytest.raises(ValueError, match=r"columns \['id', 'text'\] and no `input_ids`: pass processing_class="):
        MemformerTrainer(model=model, args=args(tmp_path), train_dataset=stream)
    tokenized = stream.map(lambda r: {"input_ids": [int(w[1:]) + 50 for w in r["text"].split()]})
    with pytest.raises(ValueError, match="holds token id .* but the model's vocab_size is 50"):
        MemformerTrainer(model=model, args=args(tmp_path), train_dataset=tokenized).train()


def test_a_split_dataset_by_node_share_is_read_whole(tmp_path):
    """A `datasets.distributed.split_dataset_by_node` share (the usual way to shard a stream over ranks) already is the
    rank's documents: the trainer reads all of them, as the list of that share. It used to keep only the documents
    r, r+W, ... of the share again, silently dropping (W-1)/W of the rank's data. A share of another rank is refused."""
    from datasets.distributed import split_dataset_by_node

    docs = unique_docs(11, 12, 3, 20)
    source = datasets.Dataset.from_dict({"input_ids": docs}).to_iterable_dataset(num_shards=4)
    share = split_dataset_by_node(source, rank=1, world_size=2)
    tr = MemformerTrainer(model=build_tiny_memformer(0, dtype=torch.float32, train=True), args=args(tmp_path),
                          train_dataset=[[3, 4]] * 4)
    run = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, mrbp_window=2, world_size=2,
                          process_index=1)
    packed = tr._pack_stream(share, run, None)
    packed.passes = 1
    share_docs = [[int(t) for t in r["input_ids"]] for r in share]
    assert 0 < len(share_docs) < len(docs)
    reference = IterableStreamBatches(share_docs, **layout(2, 1, 2), world_size=2, rank=1, split_documents=False,
                                      passes=1)
    assert_same_batches(list(packed), list(reference))
    with pytest.raises(ValueError, match=r"split_dataset_by_node\(rank=1, world_size=2\) but this process is rank 0 "
                                         "of 2"):
        tr._pack_stream(share, SimpleNamespace(**{**vars(run), "process_index": 0}), None)


def test_text_starting_with_the_bos_string_keeps_its_bos_on_both_paths():
    """A text whose first token is the BOS string gives the same documents whether streamed as text (tokenized
    without special tokens) or as `input_ids` tokenized with `add_special_tokens=True` (one BOS added, dropped as the
    boot): every token of the text is a target, its own BOS included (the text path dropped it, the ids path kept
    it). Ordinary texts, and the CLI's in-memory documents (`trainer_documents`), give the same documents too."""
    from tokenizers import processors

    from memformer_hf.cli.corpus import trainer_documents

    tok = word_tokenizer(50)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="w1 $A", special_tokens=[("w1", BOS)])
    texts = ["w1 w5 w6 w7 w8 w9", "w33 w34 w35 w36 w37", "w1 w1 w38 w39", "w40 w1 w43"]  # no w1 / w2 in a word
    expected = [[int(w[1:]) for w in t.split()] for t in texts]  # the text's tokens, all of them
    assert tok(texts[0])["input_ids"] == [BOS] + expected[0]  # the tokenizer adds a BOS, as Llama's does
    kw = layout(1, 1, 2, passes=1)
    from_text = list(IterableStreamBatches(texts, tokenizer=tok, **kw))
    from_ids = list(IterableStreamBatches([{"input_ids": tok(t)["input_ids"]} for t in texts], **kw))
    assert_same_batches(from_text, from_ids)
    assert stream_documents(from_text, 2)[0] == expected
    config = SimpleNamespace(bos_token_id=BOS, first_segment_context="bos")
    in_memory = StreamBatches(trainer_documents(expected, config), shuffle=False, **layout(1, 1, 2))
    assert_same_batches([in_memory[i] for i in range(len(in_memory))], from_text)
    # an empty boot drops nothing, so nothing is added either
    assert trainer_documents(expected, SimpleNamespace(bos_token_id=BOS, first_segment_context="empty")) == expected
