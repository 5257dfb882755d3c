"""Tests for memformer_hf.data_streams: loading, tokenization, stream batching (docs/design.md#stream-batching),
windows and eval cells."""

from __future__ import annotations

import gzip
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memformer_hf.data_streams import (
    IGNORE_INDEX,
    PACKER_VERSION,
    DocumentWindows,
    StreamBatches,
    collate_single,
    document_cells,
    load_documents,
    stream_batches_loader,
    tokenize_documents,
)

BOS, PAD = 1, 0
KEYS = (
    "encoder_input_ids",
    "encoder_attention_mask",
    "decoder_input_ids",
    "decoder_attention_mask",
    "shift_labels",
    "memory_reset",
    "stream_ids",
    "window_index",
)


def make_docs(lengths: list[int]) -> list[list[int]]:
    """Documents with globally unique token ids (>= 10, so never BOS/PAD) of the given lengths."""
    docs, nxt = [], 10
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


def reference_cells(doc: list[int], L: int, boot: str) -> list[dict]:
    """Naive per-cell reference of docs/design.md#cell (plain lists)."""
    segs = [doc[i : i + L] for i in range(0, len(doc), L)]
    cells = []
    for t, s in enumerate(segs):
        if t == 0:
            enc = [BOS] + [PAD] * (L - 1) if boot == "bos" else [PAD] * L
            enc_mask = [1] + [0] * (L - 1) if boot == "bos" else [0] * L
        else:
            enc, enc_mask = list(segs[t - 1]), [1] * L
        dec = ([BOS] + s[:-1]) + [PAD] * (L - len(s))
        cells.append(
            {
                "enc": enc,
                "enc_mask": enc_mask,
                "dec": dec,
                "dec_mask": [1] * len(s) + [0] * (L - len(s)),
                "tgt": s + [IGNORE_INDEX] * (L - len(s)),
                "reset": t == 0,
            }
        )
    return cells


def collect_streams(docs, L, T, B, G, W, boot="bos", seed=0, epoch=0):
    """Run all ranks; return {global stream id: list of per-cell dicts} plus the datasets."""
    streams: dict[int, list[dict]] = {}
    owner: dict[int, int] = {}
    datasets_ = []
    for r in range(W):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = StreamBatches(
                docs,
                segment_length=L,
                window=T,
                batch_size=B,
                grad_accum=G,
                world_size=W,
                rank=r,
                seed=seed,
                epoch=epoch,
                bos_token_id=BOS,
                pad_token_id=PAD,
                boot=boot,
            )
        datasets_.append(ds)
        n = len(ds)
        assert n % G == 0
        for k in range(n):
            b = ds[k]
            assert set(b) == set(KEYS)
            for key in ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids", "decoder_attention_mask"):
                assert b[key].shape == (B, T, L)
            assert b["encoder_input_ids"].dtype == torch.long and b["encoder_attention_mask"].dtype == torch.bool
            assert b["decoder_attention_mask"].dtype == torch.bool
            assert b["shift_labels"].shape == (B, T * L) and b["shift_labels"].is_contiguous()
            assert b["memory_reset"].shape == (B, T) and b["memory_reset"].dtype == torch.bool
            assert b["stream_ids"].shape == (B,) and b["stream_ids"].dtype == torch.long
            assert b["window_index"].shape == () and int(b["window_index"]) == k // G
            sids = b["stream_ids"].tolist()
            g = k % G
            assert sids == [r * B * G + g * B + i for i in range(B)]
            if k + G < n:  # row i of batch k+G continues row i of batch k
                b2 = ds[k + G]
                assert b2["stream_ids"].tolist() == sids
                assert int(b2["window_index"]) == int(b["window_index"]) + 1
            for i, sid in enumerate(sids):
                assert owner.setdefault(sid, r) == r  # ranks own disjoint streams
                cells = streams.setdefault(sid, [])
                assert len(cells) == int(b["window_index"]) * T  # windows arrive in order
                labels = b["shift_labels"][i].view(T, L)
                for t in range(T):
                    cells.append(
                        {
                            "enc": b["encoder_input_ids"][i, t].tolist(),
                            "enc_mask": b["encoder_attention_mask"][i, t].int().tolist(),
                            "dec": b["decoder_input_ids"][i, t].tolist(),
                            "dec_mask": b["decoder_attention_mask"][i, t].int().tolist(),
                            "tgt": labels[t].tolist(),
                            "reset": bool(b["memory_reset"][i, t]),
                        }
                    )
    return streams, datasets_


def check_streams(docs, L, T, B, G, W, boot="bos", seed=0, epoch=0):
    streams, dss = collect_streams(docs, L, T, B, G, W, boot, seed, epoch)
    assert sorted(streams) == list(range(B * G * W))
    lens = {len(c) for c in streams.values()}
    assert len(lens) == 1  # common padded length, a multiple of T, = rounded global max
    (n_cells,) = lens
    assert n_cells % T == 0
    inactive = {
        "enc": [PAD] * L,
        "enc_mask": [0] * L,
        "dec": [PAD] * L,
        "dec_mask": [0] * L,
        "tgt": [IGNORE_INDEX] * L,
        "reset": True,
    }
    nonempty = [d for d in docs if d]
    expected = Counter(tuple(d) for d in nonempty)
    seen: Counter = Counter()
    active_counts = []
    for sid, cells in streams.items():
        n_active = 0
        for c in cells:
            if c == inactive:
                break
            n_active += 1
        assert all(c == inactive for c in cells[n_active:])  # inactive only at the tail
        active_counts.append(n_active)
        assert n_active == dss[0].stream_num_cells[sid]
        # split at boot cells: resets exactly at document starts
        active = cells[:n_active]
        if active:
            assert active[0]["reset"]
        starts = [t for t, c in enumerate(active) if c["reset"]]
        bounds = starts + [n_active]
        for a, z in zip(bounds[:-1], bounds[1:]):
            doc_cells = active[a:z]
            tokens = [x for c in doc_cells for x in c["tgt"] if x != IGNORE_INDEX]
            assert tuple(tokens) in expected, "reconstructed document is not an input document"
            seen[tuple(tokens)] += 1
            assert doc_cells == reference_cells(tokens, L, boot)
            # explicit checks of the cell relations
            for t, c in enumerate(doc_cells):
                n_tgt = sum(x != IGNORE_INDEX for x in c["tgt"])
                assert c["dec"][:n_tgt] == [BOS] + c["tgt"][: n_tgt - 1]
                if t + 1 < len(doc_cells):
                    assert doc_cells[t + 1]["enc"] == c["tgt"] and doc_cells[t + 1]["enc_mask"] == [1] * L
                    assert n_tgt == L  # only the last segment may be short
    assert seen == expected  # every document exactly once
    # the padded length is the global max rounded up to a multiple of T
    assert n_cells == -(-max(active_counts) // T) * T
    # greedy dealing to the shortest stream keeps lengths within one document's cells
    max_doc_cells = max(-(-len(d) // L) for d in nonempty)
    assert max(active_counts) - min(active_counts) <= max_doc_cells
    return streams, dss


def test_streams_w2_g2_reconstruct_documents():
    L = 4
    lengths = [3, 4 * L, 0, 17, 1, 2 * L, 9, 25, 5, 0, 40, 6, 13, 4]
    docs = make_docs(lengths)
    with pytest.warns(UserWarning, match="empty document"):
        StreamBatches(docs, segment_length=L, window=3, batch_size=2, bos_token_id=BOS, pad_token_id=PAD)
    for boot in ("bos", "empty"):
        check_streams(docs, L=L, T=3, B=2, G=2, W=2, boot=boot, seed=7)


def test_boot_cell_layout():
    docs = [[11, 12, 13, 14, 15]]
    for boot, enc, mask in (("bos", [BOS, PAD, PAD], [True, False, False]), ("empty", [PAD] * 3, [False] * 3)):
        ds = StreamBatches(
            docs, segment_length=3, window=2, batch_size=1, bos_token_id=BOS, pad_token_id=PAD, boot=boot
        )
        b = ds[0]
        assert b["encoder_input_ids"][0, 0].tolist() == enc
        assert b["encoder_attention_mask"][0, 0].tolist() == mask
        assert b["encoder_input_ids"][0, 1].tolist() == [11, 12, 13]
        assert b["decoder_input_ids"][0].tolist() == [[BOS, 11, 12], [BOS, 14, PAD]]
        assert b["decoder_attention_mask"][0].tolist() == [[True] * 3, [True, True, False]]
        assert b["shift_labels"][0].tolist() == [11, 12, 13, 14, 15, IGNORE_INDEX]
        assert b["memory_reset"][0].tolist() == [True, False]


def test_deterministic_and_epoch_reshuffles():
    docs = make_docs([5 + 3 * i for i in range(30)])
    kw = dict(segment_length=4, window=2, batch_size=2, grad_accum=2, world_size=2, bos_token_id=BOS, pad_token_id=PAD)
    a = StreamBatches(docs, rank=1, seed=3, **kw)
    b = StreamBatches(docs, rank=1, seed=3, **kw)
    assert len(a) == len(b)
    for k in range(len(a)):
        for key in KEYS:
            assert torch.equal(a[k][key], b[k][key])
    e1 = StreamBatches(docs, rank=1, seed=3, epoch=1, **kw)
    assert e1.stream_documents != a.stream_documents
    other_seed = StreamBatches(docs, rank=1, seed=4, **kw)
    assert other_seed.stream_documents != a.stream_documents
    # set_epoch reshuffles and is reversible
    a.set_epoch(1)
    assert a.epoch == 1 and a.stream_documents == e1.stream_documents
    assert torch.equal(a[0]["shift_labels"], e1[0]["shift_labels"])
    a.set_epoch(0)
    assert a.stream_documents == b.stream_documents
    # all ranks compute the same dealing
    assert StreamBatches(docs, rank=0, seed=3, **kw).stream_documents == b.stream_documents
    # reshuffled epoch is still a valid packing
    check_streams(docs, L=4, T=2, B=2, G=2, W=2, seed=3, epoch=5)


def test_epochs_keep_their_natural_length():
    """Each epoch's length is that of its own dealing: `epoch_batches(e)` (without switching) == `len` after
    `set_epoch(e)`, and the last window of every epoch holds tokens in some stream group of some rank (no window
    without tokens, which would cost an optimizer step). `length_epochs` pads every epoch to the longest."""
    docs = make_docs([5 + 7 * (i % 9) for i in range(23)])
    kw = dict(segment_length=4, window=3, batch_size=2, grad_accum=2, world_size=2, seed=1, bos_token_id=BOS,
              pad_token_id=PAD)
    ranks = [StreamBatches(docs, rank=r, **kw) for r in range(2)]
    lengths = [ranks[0].epoch_batches(e) for e in range(6)]
    assert ranks[0].epoch == 0 and len(set(lengths)) > 1, lengths
    for e, n in enumerate(lengths):
        for ds in ranks:
            assert ds.epoch_batches(e) == n
            ds.set_epoch(e)
            assert len(ds) == n
        last_window = range(n - kw["grad_accum"], n)  # the G batches of the last window, on every rank
        tokens = sum(int(ds[k]["shift_labels"].ne(IGNORE_INDEX).sum()) for ds in ranks for k in last_window)
        assert tokens > 0, f"epoch {e} ends with a window without tokens"
    padded = StreamBatches(docs, rank=0, length_epochs=6, **kw)
    assert [padded.epoch_batches(e) for e in range(6)] == [max(lengths)] * 6


def test_dataloader_and_state_dict():
    docs = make_docs([7, 20, 3, 11, 30, 2])
    ds = StreamBatches(
        docs, segment_length=4, window=2, batch_size=2, grad_accum=2, seed=1, bos_token_id=BOS, pad_token_id=PAD
    )
    batches = list(stream_batches_loader(ds))
    assert len(batches) == len(ds)
    for k, b in enumerate(batches):
        for key in KEYS:
            assert torch.equal(b[key], ds[k][key])
    plain = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_single)
    assert torch.equal(next(iter(plain))["shift_labels"], ds[0]["shift_labels"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    st_ = ds.state_dict()
    for key, val in dict(
        seed=1,
        epoch=0,
        world_size=1,
        streams_per_rank=4,
        batch_size=2,
        grad_accum=2,
        segment_length=4,
        window=2,
        packer_version=PACKER_VERSION,
    ).items():
        assert st_[key] == val
    assert json.loads(json.dumps(st_)) == st_
    assert ds.compatible_with(st_)
    assert not ds.compatible_with({**st_, "world_size": 2})
    ds.set_epoch(1)
    assert not ds.compatible_with(st_)
    assert ds.compatible_with(st_, ignore=("epoch",))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="no non-empty"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            StreamBatches([[], []], segment_length=2, window=1, batch_size=1, bos_token_id=BOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="rank"):
        StreamBatches(
            [[5]], segment_length=2, window=1, batch_size=1, world_size=2, rank=2, bos_token_id=1, pad_token_id=0
        )
    with pytest.raises(ValueError, match="boot"):
        StreamBatches([[5]], segment_length=2, window=1, batch_size=1, bos_token_id=1, pad_token_id=0, boot="x")


@pytest.mark.parametrize("bad,dtype,value", [
    ([0, 5.7, 9.9, 127.99], "float32", "5.7"),
    (torch.tensor([3.0, 4.0]), "float32", "3.0"),
    (np.array([3, 4.5]), "float64", "4.5"),
    (torch.tensor([True, False]), "bool", "True"),
    (np.array([1 + 2j]), "complex128", r"\(1\+2j\)"),
])
def test_non_integer_token_ids_are_refused(bad, dtype, value):
    """Float, bool and complex ids name the document instead of being cast to long (5.7 used to become 5)."""
    kw = dict(segment_length=2, bos_token_id=BOS, pad_token_id=PAD)
    message = rf"document 1 holds {dtype} values such as {value}; token ids must be integers"
    with pytest.raises(ValueError, match=rf"StreamBatches: {message}"):
        StreamBatches([[5, 6], bad], window=1, batch_size=1, **kw)
    with pytest.raises(ValueError, match=rf"DocumentWindows: {message}"):
        DocumentWindows([[5, 6], bad], window=1, **kw)
    with pytest.raises(ValueError, match=rf"document_cells: the document holds {dtype} values"):
        document_cells(bad, 2, BOS, PAD)
    with pytest.raises(ValueError, match=r"StreamBatches: document 0 is a str, not token ids"):
        StreamBatches(["5 6"], window=1, batch_size=1, **kw)


def test_integer_token_ids_of_any_integer_type_are_accepted():
    kw = dict(segment_length=2, window=1, batch_size=1, bos_token_id=BOS, pad_token_id=PAD, shuffle=False)
    ref = StreamBatches([[5, 6, 7], [8, 9]], **kw)
    for docs in ([np.array([5, 6, 7], dtype=np.int16), np.array([8, 9], dtype=np.uint8)],
                 [torch.tensor([5, 6, 7], dtype=torch.int32), (8, 9)]):
        ds = StreamBatches(docs, **kw)
        assert ds._doc_flat.tolist() == [5, 6, 7, 8, 9] and len(ds) == len(ref)
        assert all(torch.equal(ds[i][k], ref[i][k]) for i in range(len(ds)) for k in KEYS)


def test_more_streams_than_documents():
    docs = make_docs([5, 9])
    streams, _ = check_streams(docs, L=3, T=2, B=2, G=2, W=2)
    assert sum(any(not c["reset"] or c["dec_mask"][0] for c in cells) for cells in streams.values()) == 2


@pytest.mark.parametrize("boot", ["bos", "empty"])
def test_document_cells_matches_reference(boot):
    L = 4
    for n in (1, 3, 4, 8, 9, 17):
        doc = list(range(10, 10 + n))
        cells = document_cells(doc, L, BOS, PAD, boot)
        n_cells = -(-n // L)
        ref = reference_cells(doc, L, boot)
        assert cells["encoder_input_ids"].shape == (n_cells, L)
        assert cells["shift_labels"].shape == (n_cells, L)
        assert cells["memory_reset"].tolist() == [True] + [False] * (n_cells - 1)
        assert cells["encoder_input_ids"].tolist() == [c["enc"] for c in ref]
        assert cells["encoder_attention_mask"].int().tolist() == [c["enc_mask"] for c in ref]
        assert cells["decoder_input_ids"].tolist() == [c["dec"] for c in ref]
        assert cells["decoder_attention_mask"].int().tolist() == [c["dec_mask"] for c in ref]
        assert cells["shift_labels"].tolist() == [c["tgt"] for c in ref]
    with pytest.raises(ValueError):
        document_cells([], L, BOS, PAD)


def test_document_windows():
    L, T = 3, 2
    docs = make_docs([2, 6, 0, 7, 13])
    with pytest.warns(UserWarning, match="empty document"):
        dw = DocumentWindows(docs, segment_length=L, window=T, bos_token_id=BOS, pad_token_id=PAD)
    # chunks of T*L = 6 tokens: 1 + 1 + 2 + 3 samples
    assert len(dw) == 7
    rebuilt: dict[int, list[int]] = {}
    for i in range(len(dw)):
        s = dw[i]
        assert s["encoder_input_ids"].shape == (T, L) and s["shift_labels"].shape == (T * L,)
        assert s["memory_reset"][0] and int(s["stream_ids"]) == i and int(s["window_index"]) == 0
        chunk = [x for x in s["shift_labels"].tolist() if x != IGNORE_INDEX]
        ref = reference_cells(chunk, L, "bos")
        n = len(ref)
        assert s["encoder_input_ids"][:n].tolist() == [c["enc"] for c in ref]
        assert s["decoder_input_ids"][:n].tolist() == [c["dec"] for c in ref]
        assert s["memory_reset"].tolist() == [True] + [False] * (n - 1) + [True] * (T - n)
        assert not s["encoder_attention_mask"][n:].any() and not s["decoder_attention_mask"][n:].any()
        rebuilt.setdefault(dw.sample_document[i], []).extend(chunk)
    assert [rebuilt[d] for d in sorted(rebuilt)] == [d for d in docs if d]
    batch = next(iter(torch.utils.data.DataLoader(dw, batch_size=3)))
    assert batch["encoder_input_ids"].shape == (3, T, L) and batch["memory_reset"].shape == (3, T)
    assert batch["shift_labels"].shape == (3, T * L) and batch["stream_ids"].tolist() == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DocumentWindows(
            docs, segment_length=L, window=T, bos_token_id=BOS, pad_token_id=PAD, long_documents="truncate"
        )
    assert len(tr) == 4
    assert [x for x in tr[3]["shift_labels"].tolist() if x != IGNORE_INDEX] == docs[4][: T * L]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda x: any(x)),
    L=st.integers(1, 5),
    T=st.integers(1, 4),
    B=st.integers(1, 3),
    G=st.integers(1, 3),
    W=st.integers(1, 3),
    boot=st.sampled_from(["bos", "empty"]),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 3),
)
def test_streams_property(lengths, L, T, B, G, W, boot, seed, epoch):
    check_streams(make_docs(lengths), L=L, T=T, B=B, G=G, W=W, boot=boot, seed=seed, epoch=epoch)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and tokenization
# ---------------------------------------------------------------------------------------------------------------------

RECORDS = [
    {"id": "a", "title": "A", "text": "first document\n\nwith two paragraphs\n"},
    {"id": "b", "title": "B", "text": "second\n"},
    {"id": "c", "title": "C", "text": "third one\n"},
]
TEXTS = [r["text"] for r in RECORDS]


def write_jsonl(path: Path, records) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def test_load_local_files(tmp_path):
    assert load_documents(write_jsonl(tmp_path / "d.jsonl", RECORDS)) == TEXTS
    assert load_documents(str(write_jsonl(tmp_path / "d.jsonl.gz", RECORDS))) == TEXTS
    assert load_documents(write_jsonl(tmp_path / "d.json", RECORDS)) == TEXTS
    (tmp_path / "arr.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    assert load_documents(tmp_path / "arr.json") == TEXTS
    assert load_documents(write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}]), text_column="body") == ["x"]
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "b.txt").write_text("doc two\n", encoding="utf-8")
    (txt / "a.txt").write_text("doc one\nline 2\n", encoding="utf-8")
    assert load_documents(txt / "a.txt") == ["doc one\nline 2\n"]
    assert load_documents(txt) == ["doc one\nline 2\n", "doc two\n"]
    assert load_documents([txt / "b.txt", txt / "a.txt"]) == ["doc two\n", "doc one\nline 2\n"]


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_documents(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_documents("does/not/exist.jsonl.gz")
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(ValueError, match=r"available columns: \['id', 'text', 'title'\]"):
        load_documents(path, text_column="content")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path / "empty.jsonl")
    assert load_documents(write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}]), skip_empty=True) == ["x"]


def test_load_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    assert load_documents(ds) == TEXTS
    with pytest.raises(ValueError, match="available columns"):
        load_documents(ds, text_column="body")
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_documents(tmp_path / "saved") == TEXTS
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert load_documents(tmp_path / "saved_dict", split="test") == [TEXTS[1]]
    with pytest.raises(ValueError, match="available splits"):
        load_documents(tmp_path / "saved_dict", split="validation")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(datasets.Dataset.from_dict({"text": []}))
    # the packaged "json" builder on a local file (no Hub)
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert load_documents("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")) == TEXTS


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for t in TEXTS for w in t.split()} | {"long"})
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok, vocab


def test_tokenize_documents_no_truncation_no_special_tokens():
    from transformers import PreTrainedTokenizerFast

    raw, vocab = _word_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    hf.model_max_length = 4
    texts = TEXTS + ["long " * 50]
    ids = tokenize_documents(texts, hf, batch_size=2)
    assert len(ids) == len(texts)
    assert ids[1] == [vocab["second"]]
    assert ids[-1] == [vocab["long"]] * 50  # no truncation to model_max_length, no BOS
    assert all(isinstance(x, int) for d in ids for x in d)
    # a raw `tokenizers.Tokenizer` with truncation switched on: not truncated, setting restored
    raw.enable_truncation(max_length=3)
    ids_raw = tokenize_documents(texts, raw)
    assert ids_raw == ids
    assert raw.truncation is not None and raw.truncation["max_length"] == 3
    # and the ids feed the batcher
    ds = StreamBatches(ids, segment_length=4, window=2, batch_size=2, bos_token_id=1, pad_token_id=0)
    assert len(ds) >= 1
