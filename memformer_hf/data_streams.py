"""Document loading and deterministic cell batching for Memformer training and evaluation (docs/design.md#cell,
#stream-batching).

A document with token ids ``d`` (no BOS) is split into segments ``s_0..s_{n-1}`` of ``L`` tokens (the last one possibly
shorter). Its cells are: encoder inputs ``[boot, s_0, ..., s_{n-2}]``, decoder targets ``[s_0, ..., s_{n-1}]`` and
decoder inputs ``[BOS] + target[:-1]`` (with the model option ``decoder_previous_segment``, ``decoder_previous_segment=True``
here: the true stream, whose first input is the previous segment's last token except in the boot cell). The boot cell has ``memory_reset=1``; inactive padding cells (reset, all-pad
inputs, all ``-100`` targets) give every stream a common length.

Public API:

* :func:`load_documents` / :func:`tokenize_documents`: texts from a ``datasets`` dataset or local files, then token ids.
* :func:`check_vocab`: a clear error when a tokenizer or token ids do not fit the model's ``vocab_size``.
* :class:`StreamBatches`: map-style dataset of ready per-rank batches (Transformer-XL style streams with carry).
* :class:`IterableStreamBatches`: the same batches from an iterable source (``datasets`` streaming), tokenized on the
  fly, for corpora larger than memory; resumable (``state_dict`` / ``load_state_dict``).
* :class:`DocumentWindows`: one independent window of ``T`` cells per sample (no carry), for fine-tuning.
* :func:`document_cells`: all cells of one document, for evaluators that carry memory through a whole document.
* :func:`collate_single`: DataLoader collate that unwraps the single element of a ``batch_size=1`` batch.
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "PACKER_VERSION",
    "IGNORE_INDEX",
    "BootMode",
    "load_documents",
    "text_document_ids",
    "tokenize_documents",
    "check_vocab",
    "document_cells",
    "StreamBatches",
    "IterableStreamBatches",
    "DocumentWindows",
    "collate_single",
    "stream_batches_loader",
]

PACKER_VERSION = 1
"""Bump whenever the mapping (seed, epoch, index) -> batch changes; checkpoints of carried memory depend on it."""

IGNORE_INDEX = -100
BootMode = Literal["bos", "empty"]

_TEXT_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".txt", ".txt.gz")

# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in _TEXT_SUFFIXES:
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _texts_from_records(records: Iterable[Any], text_column: str, where: str) -> list[str]:
    texts: list[str] = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):  # a bare JSON string per line
            texts.append(rec)
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: record {i} is a {type(rec).__name__}, expected a JSON object")
        if text_column not in rec:
            raise ValueError(
                f"{where}: record {i} has no column {text_column!r}; available columns: {sorted(rec.keys())}"
            )
        text = rec[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{where}: record {i} column {text_column!r} is {type(text).__name__}, expected str")
        texts.append(text)
    return texts


def _load_file(path: Path, text_column: str) -> list[str]:
    suf = _suffix(path)
    if suf in (".txt", ".txt.gz"):
        with _open_text(path) as f:
            return [f.read()]
    if suf in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        with _open_text(path) as f:
            content = f.read()
        stripped = content.lstrip()
        if suf.startswith(".json.") or suf == ".json":
            if stripped.startswith("["):  # a JSON array of records
                return _texts_from_records(json.loads(content), text_column, str(path))
        records = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        return _texts_from_records(records, text_column, str(path))
    raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(_TEXT_SUFFIXES)}")


def _texts_from_hf(ds: Any, text_column: str, split: str | None, where: str) -> list[str]:
    """Texts of a ``datasets.Dataset`` (or a split of a ``DatasetDict``)."""
    if isinstance(getattr(ds, "column_names", None), dict):  # DatasetDict
        splits = list(ds.keys())
        if split is None or split not in splits:
            raise ValueError(f"{where}: split {split!r} not found; available splits: {splits}")
        ds = ds[split]
    columns = list(ds.column_names)
    if text_column not in columns:
        raise ValueError(f"{where}: unknown text column {text_column!r}; available columns: {columns}")
    texts = ds[text_column]
    out: list[str] = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{where}: row {i} column {text_column!r} is {type(t).__name__}, expected str")
        out.append(t)
    return out


def _is_saved_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _looks_like_path(source: str) -> bool:
    low = source.lower()
    return (
        source.startswith(("/", "./", "../", "~"))
        or (os.sep in source and Path(source).suffix != "")
        or any(low.endswith(s) for s in _TEXT_SUFFIXES)
    )


def load_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike] | Any,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    split: str | None = "train",
    skip_empty: bool = False,
    **load_dataset_kwargs: Any,
) -> list[str]:
    """Load whole documents as a list of strings.

    ``source`` may be:

    * a local file: ``.jsonl``/``.jsonl.gz``/``.json`` (one JSON object per line, text under ``text_column``; a
      ``.json`` file holding a JSON array of objects also works) or ``.txt`` (the whole file is one document);
    * a local directory: a ``datasets`` ``save_to_disk`` directory (loaded with ``load_from_disk``), otherwise every
      supported file in it, in sorted order;
    * a sequence of local files;
    * an in-memory ``datasets.Dataset`` / ``DatasetDict``;
    * otherwise a ``datasets`` dataset name, loaded with ``datasets.load_dataset(source, dataset_config, split=split)``.

    Raises ``ValueError`` for a missing file, an unknown column (listing the available ones) or no documents.
    With ``skip_empty`` empty texts are dropped; otherwise they are kept (the batchers skip them with a warning).
    """
    if hasattr(source, "column_names"):  # in-memory datasets object
        texts = _texts_from_hf(source, text_column, split, type(source).__name__)
        where = type(source).__name__
    elif isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("load_documents: empty list of files")
        texts = []
        for p in source:
            texts.extend(load_documents(p, text_column=text_column, split=split))
        where = f"{len(source)} files"
    else:
        src = os.fspath(source)
        path = Path(src).expanduser()
        where = src
        if path.is_file():
            texts = _load_file(path, text_column)
        elif path.is_dir():
            if _is_saved_dataset_dir(path):
                import datasets

                texts = _texts_from_hf(datasets.load_from_disk(str(path)), text_column, split, src)
            else:
                files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p) in _TEXT_SUFFIXES)
                if not files:
                    raise ValueError(f"{src}: directory holds no saved dataset and no {'/'.join(_TEXT_SUFFIXES)} files")
                texts = []
                for p in files:
                    texts.extend(_load_file(p, text_column))
        elif _looks_like_path(src):
            raise ValueError(f"{src}: no such file or directory")
        else:
            import datasets

            ds = datasets.load_dataset(src, dataset_config, split=split, **load_dataset_kwargs)
            texts = _texts_from_hf(ds, text_column, split, src)
    if skip_empty:
        texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{where}: no documents found")
    return texts


def tokenize_documents(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    batch_size: int = 256,
) -> list[list[int]]:
    """Token ids of each document, with no special tokens and **no truncation** (documents are long).

    ``tokenizer`` is a ``transformers`` tokenizer (``PreTrainedTokenizerBase``) or a raw ``tokenizers.Tokenizer``.
    Truncation is switched off explicitly, and the "sequence longer than model_max_length" warning is silenced
    because long documents are the point.
    """
    out: list[list[int]] = []
    texts = list(texts)
    if hasattr(tokenizer, "encode_batch") and not callable(getattr(tokenizer, "batch_decode", None)):
        # raw `tokenizers.Tokenizer`: disable its truncation for the call, then restore it.
        saved = tokenizer.truncation
        if saved is not None:
            tokenizer.no_truncation()
        try:
            for i in range(0, len(texts), batch_size):
                encs = tokenizer.encode_batch(texts[i : i + batch_size], add_special_tokens=False)
                out.extend(list(e.ids) for e in encs)
        finally:
            if saved is not None:
                tokenizer.enable_truncation(**saved)
        return out
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            add_special_tokens=False,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            verbose=False,
        )
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def check_vocab(
    vocab_size: int,
    *,
    tokenizer: Any = None,
    documents: Sequence[Sequence[int]] | StreamBatches | None = None,
    what: str = "documents",
) -> None:
    """Raise a ``ValueError`` naming both sizes when a tokenizer or tokenized documents do not fit a model's
    embedding of ``vocab_size`` rows: ``len(tokenizer) > vocab_size``, or a token id ``>= vocab_size`` in
    ``documents`` (token-id lists or a :class:`StreamBatches`; e.g. data tokenized with another tokenizer).

    ``tokenizer``: a ``transformers`` tokenizer, a processor with a ``tokenizer``, or a raw ``tokenizers.Tokenizer``.
    """
    if tokenizer is not None:
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        n = len(tok) if hasattr(tok, "__len__") else getattr(tok, "get_vocab_size", lambda: None)()
        if n is not None and n > vocab_size:
            raise ValueError(
                f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}: token ids >= {vocab_size} "
                f"have no embedding; use the model's tokenizer or model.resize_token_embeddings({n})"
            )
    if documents is not None:
        if isinstance(documents, StreamBatches):
            top = int(documents._doc_flat.max()) if documents._doc_flat.numel() else -1
        else:
            top = max((int(d.max() if torch.is_tensor(d) else max(d)) for d in documents if len(d)), default=-1)
        if top >= vocab_size:
            raise ValueError(
                f"{what} hold token id {top} but the model's vocab_size is {vocab_size} (valid ids are "
                f"0..{vocab_size - 1}); were they tokenized with another tokenizer?"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------------------------------


def _check_ids(segment_length: int, bos_token_id: int, pad_token_id: int, boot: str) -> None:
    if segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    if boot not in ("bos", "empty"):
        raise ValueError(f"boot must be 'bos' or 'empty', got {boot!r}")
    if bos_token_id is None or pad_token_id is None:
        raise ValueError("bos_token_id and pad_token_id must be set")


def _n_cells(n_tokens: int, segment_length: int) -> int:
    return -(-n_tokens // segment_length)


def _build_cells(
    flat: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    is_boot: torch.Tensor,
    segment_length: int,
    bos_token_id: int,
    pad_token_id: int,
    boot: str,
    decoder_previous_segment: bool = False,
) -> dict[str, torch.Tensor]:
    """Cell tensors for any grid of cells (shape ``G``).

    ``flat`` holds tokens; a cell's decoder target is ``flat[start:start+length]`` (``length`` 0 = inactive cell) and
    its encoder input, unless it is a boot cell, is the previous full segment ``flat[start-L:start]``. The decoder's
    first input is BOS; with ``decoder_previous_segment`` only in a boot cell, elsewhere the previous segment's last
    token (the true stream, which the model's decoder continues over that segment).
    Returns ``[*G, L]`` id/mask tensors, ``labels`` ``[*G, L]`` and ``memory_reset`` ``[*G]``.
    """
    L = segment_length
    pos = torch.arange(L, dtype=torch.long)
    start = start.long().unsqueeze(-1)
    length = length.long().unsqueeze(-1)
    active = length > 0  # [*G, 1]
    boot_cell = is_boot.unsqueeze(-1) & active
    n = max(int(flat.numel()), 1)
    src = flat if flat.numel() else torch.zeros(1, dtype=torch.long)  # gather from the compact store, then widen

    tgt_mask = pos < length  # [*G, L]
    tgt = src[(start + pos).clamp(0, n - 1)].long()
    labels = torch.where(tgt_mask, tgt, torch.full_like(tgt, IGNORE_INDEX))

    dec_src = src[(start + pos - 1).clamp(0, n - 1)].long()
    first = (pos == 0) & boot_cell if decoder_previous_segment else pos == 0
    dec_ids = torch.where(first, torch.full_like(dec_src, bos_token_id), dec_src)
    dec_ids = torch.where(tgt_mask, dec_ids, torch.full_like(dec_ids, pad_token_id))

    enc_src = src[(start - L + pos).clamp(0, n - 1)].long()
    enc_normal = active & ~boot_cell
    enc_mask = enc_normal.expand_as(tgt_mask).clone()
    enc_ids = torch.where(enc_mask, enc_src, torch.full_like(enc_src, pad_token_id))
    if boot == "bos":
        first = boot_cell & (pos == 0)
        enc_ids = torch.where(first, torch.full_like(enc_ids, bos_token_id), enc_ids)
        enc_mask = enc_mask | first
    return {
        "encoder_input_ids": enc_ids,
        "encoder_attention_mask": enc_mask,
        "decoder_input_ids": dec_ids,
        "decoder_attention_mask": tgt_mask,
        "labels": labels,
        "memory_reset": (boot_cell | ~active).squeeze(-1),
    }


def document_cells(
    doc_ids: Sequence[int] | torch.Tensor,
    segment_length: int,
    bos_token_id: int,
    pad_token_id: int,
    boot: BootMode = "bos",
    decoder_previous_segment: bool = False,
) -> dict[str, torch.Tensor]:
    """All cells of one document, for evaluation with memory carried through the whole document
    (``decoder_previous_segment``: the decoder inputs of a model with that option, :func:`_build_cells`).

    Returns ``encoder_input_ids``, ``encoder_attention_mask``, ``decoder_input_ids``, ``decoder_attention_mask`` and
    ``shift_labels`` of shape ``[n_cells, L]`` (``shift_labels[t]`` is aligned with the decoder outputs of cell ``t``,
    -100 on pads) and ``memory_reset`` ``[n_cells]`` (True only on the boot cell). ``n_cells = ceil(len(doc) / L)``.
    """
    _check_ids(segment_length, bos_token_id, pad_token_id, boot)
    flat = _token_ids(doc_ids, "document_cells: the document")
    if flat.numel() == 0:
        raise ValueError("document_cells: empty document has no cells")
    n = _n_cells(flat.numel(), segment_length)
    start = torch.arange(n, dtype=torch.long) * segment_length
    length = (flat.numel() - start).clamp(max=segment_length)
    is_boot = torch.zeros(n, dtype=torch.bool)
    is_boot[0] = True
    cells = _build_cells(flat, start, length, is_boot, segment_length, bos_token_id, pad_token_id, boot,
                         decoder_previous_segment)
    cells["shift_labels"] = cells.pop("labels")
    return cells


def _token_ids(ids: Any, where: str) -> torch.Tensor:
    """One document's token ids as a flat long tensor. Raise a ``ValueError`` starting with ``where`` when they are
    not integers (float, complex or bool values, strings): a cast to long would silently truncate 5.7 to 5. Integer
    tensors, NumPy arrays and Python ints are accepted."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{where} is a {type(ids).__name__}, not token ids (tokenize the text first)")
    try:
        t = ids if torch.is_tensor(ids) else torch.as_tensor(ids)  # keeps the dtype of NumPy arrays, infers lists'
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{where} is not a sequence of integer token ids ({type(ids).__name__}: {e})") from None
    if t.dim() > 1 and any(n != 1 for n in t.shape[:-1]):
        raise ValueError(f"{where} has shape {tuple(t.shape)}; a document is one flat sequence of token ids")
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        flat = t.reshape(-1)
        fractional = flat[flat != flat.trunc()] if t.is_floating_point() else flat[:0]
        value = (fractional if fractional.numel() else flat)[0].item()
        value = round(value, 6) if isinstance(value, float) else value
        raise ValueError(f"{where} holds {str(t.dtype).removeprefix('torch.')} values such as {value}; token ids "
                         "must be integers")
    return t.to(torch.long).reshape(-1)


def document_ids(ids: Any, where: str, attention_mask: Any = None, labels: Any = None,
                 bos_token_id: int | None = None) -> torch.Tensor:
    """One tokenized document as the trainer reads it: the ids where ``attention_mask`` is 1 (padding of a padded
    dataset is dropped, never trained on), without a leading ``bos_token_id`` (every document starts from its own boot
    segment, as the model's stream mode does with a leading BOS). ``labels``, if given, must equal the ids at those
    positions: every token of a document is a target, so per-token label masks (-100) cannot be honoured and are a
    ``ValueError`` naming the document instead of being ignored."""
    t = _token_ids(ids, where)
    if attention_mask is not None:
        mask = _token_ids(attention_mask, f"{where}: its attention_mask")
        if mask.shape != t.shape or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{where}: its attention_mask must be 0/1 values, one per token ({t.numel()}); got "
                             f"{mask.numel()} values in [{int(mask.min()) if mask.numel() else 0}, "
                             f"{int(mask.max()) if mask.numel() else 0}]")
        keep = mask.bool()
    else:
        keep = torch.ones_like(t, dtype=torch.bool)
    if labels is not None:
        lab = _token_ids(labels, f"{where}: its labels")
        if lab.shape != t.shape or not torch.equal(lab[keep], t[keep]):
            raise ValueError(f"{where}: its `labels` differ from its `input_ids` (e.g. -100 on some tokens). The "
                             "trainer reads contiguous documents and every token is a target; drop the `labels` "
                             "column, and mark padding with `attention_mask`.")
    t = t[keep]
    if bos_token_id is not None and t.numel() and int(t[0]) == bos_token_id:
        t = t[1:]
    return t


def text_document_ids(ids: Sequence[int], bos_token_id: int | None) -> list[int]:
    """The tokens of one text (:func:`tokenize_documents`, no special tokens) as a document for the packers, which
    drop a leading ``bos_token_id`` as the document's boot (:func:`document_ids`): a text whose own first token is
    that BOS gets a boot BOS in front, so that its BOS stays a target, as when the text is tokenized with
    ``add_special_tokens=True`` (one BOS added); other texts are unchanged. ``bos_token_id`` None (an empty boot):
    nothing is dropped, nothing added."""
    ids = list(ids)
    return [bos_token_id, *ids] if bos_token_id is not None and ids and ids[0] == bos_token_id else ids


def _boot_bos(bos_token_id: int, boot: str) -> int | None:
    """The id a document's leading token is dropped for (:func:`document_ids`): BOS when the boot segment is a BOS
    (a leading BOS is then the document's boot, as in the model's stream mode); none with an empty boot."""
    return bos_token_id if boot == "bos" else None


def _compact_documents(
    documents: Sequence[Sequence[int] | torch.Tensor], what: str, bos_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents into one flat int tensor plus ``[n_docs + 1]`` offsets; warn about empty documents.
    Documents whose ids are not integers are refused; a leading ``bos_token_id`` is dropped (:func:`document_ids`)."""
    docs = [document_ids(d, f"{what}: document {i}", bos_token_id=bos_token_id) for i, d in enumerate(documents)]
    lengths = [d.numel() for d in docs]
    n_empty = sum(1 for n in lengths if n == 0)
    if n_empty:
        warnings.warn(f"{what}: skipping {n_empty} empty document(s) of {len(lengths)}", stacklevel=3)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    if lengths:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    parts = [d for d in docs if d.numel()]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if flat.numel() and (int(flat.min()) < 0):
        raise ValueError(f"{what}: negative token ids")
    dtype = torch.int32 if not flat.numel() or int(flat.max()) < 2**31 else torch.long
    return flat.to(dtype), offsets


# ----------------------------------------------------------------------------------------------------------------------
# Stream batches (docs/design.md#stream-batching)
# ----------------------------------------------------------------------------------------------------------------------


class _StreamLayout:
    """What :class:`StreamBatches` and :class:`IterableStreamBatches` share: the layout (``S = B·G`` streams per rank,
    rank ``r`` owning the global streams ``[r·S, (r+1)·S)``, windows of ``T`` cells of ``L`` tokens), its checks, its
    part of ``state_dict``, and the batch of one stream group."""

    def _init_layout(self, *, segment_length: int, window: int, batch_size: int, grad_accum: int, world_size: int,
                     rank: int, bos_token_id: int, pad_token_id: int, boot: str,
                     decoder_previous_segment: bool = False) -> None:
        _check_ids(segment_length, bos_token_id, pad_token_id, boot)
        for name, v in (("window", window), ("batch_size", batch_size), ("grad_accum", grad_accum)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.segment_length = segment_length
        self.window = window
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.boot = boot
        self.decoder_previous_segment = bool(decoder_previous_segment)
        self.streams_per_rank = batch_size * grad_accum
        self.num_streams = self.streams_per_rank * world_size

    def _layout_state(self) -> dict[str, Any]:
        # `decoder_previous_segment` only when on: the states saved before the option match the default layout
        extra = {"decoder_previous_segment": True} if self.decoder_previous_segment else {}
        return {**extra,
            "packer_version": PACKER_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams_per_rank": self.streams_per_rank,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "segment_length": self.segment_length,
            "window": self.window,
            "boot": self.boot,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def _same_decoder_layout(self, state: dict[str, Any]) -> bool:
        """Whether a saved state had this decoder layout (the key is saved only when on, so compare both ways)."""
        return bool(state.get("decoder_previous_segment", False)) == self.decoder_previous_segment

    def _group_batch(self, flat: torch.Tensor, start: torch.Tensor, length: torch.Tensor, is_boot: torch.Tensor,
                     group: int, window_index: int) -> dict[str, torch.Tensor]:
        """The batch of stream group ``group`` from the cell tables ``[S, T]`` of one window of this rank."""
        B, T, L = self.batch_size, self.window, self.segment_length
        rows = slice(group * B, (group + 1) * B)
        cells = _build_cells(flat, start[rows], length[rows], is_boot[rows], L, self.bos_token_id, self.pad_token_id,
                             self.boot, self.decoder_previous_segment)
        return {
            "encoder_input_ids": cells["encoder_input_ids"],
            "encoder_attention_mask": cells["encoder_attention_mask"],
            "decoder_input_ids": cells["decoder_input_ids"],
            "decoder_attention_mask": cells["decoder_attention_mask"],
            "shift_labels": cells["labels"].reshape(B, T * L).contiguous(),
            "memory_reset": cells["memory_reset"],
            "stream_ids": torch.arange(B, dtype=torch.long) + self.rank * self.streams_per_rank + group * B,
            "window_index": torch.tensor(window_index, dtype=torch.long),
        }


def _shuffle_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"memformer-streams:{seed}:{epoch}").shuffle(order)
    return order


class StreamBatches(_StreamLayout, torch.utils.data.Dataset):
    """Deterministic map-style dataset of ready per-rank batches (docs/design.md#stream-batching); index ``k`` ->
    batch dict.

    Documents are shuffled with ``(seed, epoch)`` and dealt greedily to the currently shortest of ``S·W`` streams
    (``S = B·G`` per rank; ties go to the lowest stream id). Streams are padded with inactive cells to the global
    maximum length rounded up to a multiple of ``T``. Rank ``r`` owns streams ``[r·S, (r+1)·S)``; batch ``k`` carries
    stream group ``g = k % G`` (local rows ``g·B .. g·B+B-1``) at cells ``[w·T, (w+1)·T)`` with ``w = k // G``.

    Batch: ``encoder_input_ids``, ``encoder_attention_mask``, ``decoder_input_ids``, ``decoder_attention_mask``
    ``[B, T, L]``; ``shift_labels`` ``[B, T·L]`` (-100 on pads); ``memory_reset`` ``[B, T]`` bool; ``stream_ids``
    ``[B]`` (global ids); ``window_index`` 0-dim long. All ranks see the same ``len``.
    """

    def __init__(
        self,
        documents: Sequence[Sequence[int] | torch.Tensor],
        *,
        segment_length: int,
        window: int,
        batch_size: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        bos_token_id: int,
        pad_token_id: int,
        boot: BootMode = "bos",
        decoder_previous_segment: bool = False,
        shuffle: bool = True,
        length_epochs: int = 1,
    ) -> None:
        """Each epoch has its natural length (:meth:`epoch_batches`): the documents are re-dealt every epoch, so the
        lengths differ and no epoch ends with windows that hold no tokens. ``length_epochs`` > 1 is only for loops
        that need one fixed length: the length becomes the largest over epochs ``0..length_epochs-1``, and shorter
        dealings then end with inactive windows (no targets). ``MemformerTrainer`` does not need it (it follows
        every epoch's own length)."""
        self._init_layout(segment_length=segment_length, window=window, batch_size=batch_size, grad_accum=grad_accum,
                          world_size=world_size, rank=rank, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                          boot=boot, decoder_previous_segment=decoder_previous_segment)
        if length_epochs < 1:
            raise ValueError(f"length_epochs must be >= 1, got {length_epochs}")
        self.seed = seed
        self.shuffle = shuffle

        self._doc_flat, self._doc_offsets = _compact_documents(documents, "StreamBatches", _boot_bos(bos_token_id, boot))
        lengths = self._doc_offsets[1:] - self._doc_offsets[:-1]
        self._doc_cells = [_n_cells(int(n), segment_length) for n in lengths.tolist()]
        self._nonempty = [i for i, c in enumerate(self._doc_cells) if c > 0]
        if not self._nonempty:
            raise ValueError("StreamBatches: no non-empty documents")
        self.length_epochs = length_epochs
        self._natural_cells: dict[int, int] = {}  # epoch -> padded stream length of its dealing (cells)
        self._fixed_cells = (0 if length_epochs == 1 else
                             max(self._epoch_cells(e) for e in range(length_epochs)))
        self.epoch = -1
        self.set_epoch(epoch)

    def _round_up(self, cells: int) -> int:
        return -(-cells // self.window) * self.window

    def _epoch_cells(self, epoch: int) -> int:
        """The longest stream of ``epoch``'s dealing, rounded up to a multiple of ``T`` (cached)."""
        if epoch not in self._natural_cells:
            self._natural_cells[epoch] = self._round_up(max(self._deal(epoch)[1]))
        return self._natural_cells[epoch]

    def epoch_batches(self, epoch: int) -> int:
        """Number of batches (``len``) of ``epoch``, without switching to it. Every window of an epoch holds target
        tokens in at least one of its ``G·W`` stream groups (unless ``length_epochs`` pads it)."""
        return max(self._epoch_cells(epoch), self._fixed_cells) // self.window * self.grad_accum

    def _deal(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Greedy dealing of the (shuffled) documents to the currently shortest stream; identical on every rank."""
        docs = self._nonempty
        if self.shuffle:
            docs = [docs[i] for i in _shuffle_order(len(docs), self.seed, epoch)]
        heap = [(0, s) for s in range(self.num_streams)]
        stream_docs: list[list[int]] = [[] for _ in range(self.num_streams)]
        stream_cells = [0] * self.num_streams
        for d in docs:
            cells, s = heapq.heappop(heap)
            stream_docs[s].append(d)
            cells += self._doc_cells[d]
            stream_cells[s] = cells
            heapq.heappush(heap, (cells, s))
        return stream_docs, stream_cells

    # -- layout ---------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle and re-deal the documents for ``epoch`` (a no-op if it is the current epoch)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        stream_docs, stream_cells = self._deal(epoch)
        self.stream_num_cells = stream_cells  # active cells per global stream
        self.stream_documents = stream_docs  # document indices (into the input list) per global stream
        self._natural_cells[epoch] = self._round_up(max(stream_cells))
        self.num_cells = max(self._natural_cells[epoch], self._fixed_cells)
        self.num_windows = self.num_cells // self.window

        # Compact per-rank storage: one flat token tensor plus per-cell (start, length, boot) tables.
        lo = self.rank * self.streams_per_rank
        S, C, L = self.streams_per_rank, self.num_cells, self.segment_length
        start = torch.zeros(S, C, dtype=torch.long)
        length = torch.zeros(S, C, dtype=torch.int32)
        is_boot = torch.zeros(S, C, dtype=torch.bool)
        parts: list[torch.Tensor] = []
        pos = 0
        for i in range(S):
            c = 0
            for d in stream_docs[lo + i]:
                a, b = int(self._doc_offsets[d]), int(self._doc_offsets[d + 1])
                n_tok, n_c = b - a, self._doc_cells[d]
                parts.append(self._doc_flat[a:b])
                seg = torch.arange(n_c, dtype=torch.long) * L
                start[i, c : c + n_c] = pos + seg
                length[i, c : c + n_c] = (n_tok - seg).clamp(max=L).to(torch.int32)
                is_boot[i, c] = True
                c += n_c
                pos += n_tok
        self._flat = torch.cat(parts) if parts else torch.zeros(0, dtype=self._doc_flat.dtype)
        self._start, self._length, self._is_boot = start, length, is_boot

    def __len__(self) -> int:
        return self.num_windows * self.grad_accum

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        g, w = index % self.grad_accum, index // self.grad_accum
        cols = slice(w * self.window, (w + 1) * self.window)
        return self._group_batch(self._flat, self._start[:, cols], self._length[:, cols], self._is_boot[:, cols], g, w)

    # -- checkpoint matching ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Summary of the layout, for matching a saved stream state (docs/design.md#checkpoints)."""
        return {
            **self._layout_state(),
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffle,
            "length_epochs": self.length_epochs,
            "num_documents": len(self._doc_cells),
            "num_tokens": int(self._doc_offsets[-1]),
            "num_batches": len(self),
        }

    def compatible_with(self, state: dict[str, Any], ignore: Iterable[str] = ()) -> bool:
        """True if a saved :meth:`state_dict` describes this exact layout.

        Compares every key except ``num_batches`` (derived) and those in ``ignore``.
        """
        ours = self.state_dict()
        skip = {"num_batches", *ignore}
        return self._same_decoder_layout(state) and all(state.get(k) == v for k, v in ours.items() if k not in skip)


def collate_single(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate for ``DataLoader(StreamBatches, batch_size=1)``: unwrap the single ready batch."""
    if len(batch) != 1:
        raise ValueError(f"collate_single expects batch_size=1, got {len(batch)} elements")
    return batch[0]


def stream_batches_loader(dataset: StreamBatches, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over ready batches: ``batch_size=1``, sequential sampler, :func:`collate_single`."""
    return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_single, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Window-per-sample (docs/design.md#windows-per-sample)
# ----------------------------------------------------------------------------------------------------------------------


class DocumentWindows(torch.utils.data.Dataset):
    """One independent window of ``T`` cells per sample, starting with the boot cell (reset); no carry.

    A document of more than ``T`` cells is either split into chunks of ``T·L`` tokens, each an independent sample with
    its own boot cell (``long_documents="split"``, default), or cut to its first ``T`` cells (``"truncate"``). Shorter
    samples end with inactive cells. Samples have the :class:`StreamBatches` keys without the batch dimension
    (``[T, L]``, ``shift_labels`` ``[T·L]``, ``memory_reset`` ``[T]``, ``stream_ids`` = sample index and
    ``window_index`` = 0 as 0-dim tensors), so the default collate of a ``DataLoader`` batches them.
    """

    def __init__(
        self,
        documents: Sequence[Sequence[int] | torch.Tensor],
        *,
        segment_length: int,
        window: int,
        bos_token_id: int,
        pad_token_id: int,
        boot: BootMode = "bos",
        long_documents: Literal["split", "truncate"] = "split",
        decoder_previous_segment: bool = False,
    ) -> None:
        _check_ids(segment_length, bos_token_id, pad_token_id, boot)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if long_documents not in ("split", "truncate"):
            raise ValueError(f"long_documents must be 'split' or 'truncate', got {long_documents!r}")
        self.segment_length = segment_length
        self.window = window
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.boot = boot
        self.long_documents = long_documents
        self.decoder_previous_segment = bool(decoder_previous_segment)
        self._flat, offsets = _compact_documents(documents, "DocumentWindows", _boot_bos(bos_token_id, boot))
        chunk = segment_length * window
        starts: list[int] = []
        ends: list[int] = []
        self.sample_document: list[int] = []  # source document index of each sample
        for d in range(len(offsets) - 1):
            a, b = int(offsets[d]), int(offsets[d + 1])
            s = a
            while s < b:
                starts.append(s)
                ends.append(min(s + chunk, b))
                self.sample_document.append(d)
                if long_documents == "truncate":
                    break
                s += chunk
        if not starts:
            raise ValueError("DocumentWindows: no non-empty documents")
        self._starts = torch.tensor(starts, dtype=torch.long)
        self._ends = torch.tensor(ends, dtype=torch.long)

    def __len__(self) -> int:
        return int(self._starts.numel())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        L, T = self.segment_length, self.window
        a, b = int(self._starts[index]), int(self._ends[index])
        seg = torch.arange(T, dtype=torch.long) * L
        start = a + seg
        length = (b - start).clamp(min=0, max=L)
        is_boot = torch.zeros(T, dtype=torch.bool)
        is_boot[0] = True
        cells = _build_cells(self._flat, start, length, is_boot, L, self.bos_token_id, self.pad_token_id, self.boot,
                             self.decoder_previous_segment)
        return {
            "encoder_input_ids": cells["encoder_input_ids"],
            "encoder_attention_mask": cells["encoder_attention_mask"],
            "decoder_input_ids": cells["decoder_input_ids"],
            "decoder_attention_mask": cells["decoder_attention_mask"],
            "shift_labels": cells["labels"].reshape(T * L).contiguous(),
            "memory_reset": cells["memory_reset"],
            "stream_ids": torch.tensor(index, dtype=torch.long),
            "window_index": torch.tensor(0, dtype=torch.long),
        }


# ----------------------------------------------------------------------------------------------------------------------
# Streamed documents (docs/design.md#streamed-corpora)
# ----------------------------------------------------------------------------------------------------------------------


class IterableStreamBatches(_StreamLayout, torch.utils.data.IterableDataset):
    """:class:`StreamBatches` for corpora larger than memory: the documents are read from an iterable source (a
    ``datasets.IterableDataset`` from ``load_dataset(..., streaming=True)``, a ``datasets.Dataset``, a list, or a
    function returning a fresh iterator), tokenized when they are dealt, and dropped once their last cell is yielded.
    No length: train with ``max_steps``.

    **Ownership.** With ``split_documents`` (default) rank ``r`` keeps the documents ``r, r+W, r+2W, ...`` of the
    source (every rank reads the source, only its own documents are tokenized); with ``split_documents=False`` the
    source already is this rank's share (e.g. ``datasets.distributed.split_dataset_by_node``). Rank ``r`` owns the
    global streams ``[r·S, (r+1)·S)`` (``S = B·G``), as in :class:`StreamBatches`.

    **Dealing.** Before each window the rank deals its next documents, in source order, to the local stream with the
    fewest queued cells (ties to the lowest id) until every stream holds ``T`` cells: the greedy rule of
    :class:`StreamBatches` applied online. Batch ``k`` carries stream group ``g = k % G`` at the window
    ``w = k // G``; the batch dicts are those of :class:`StreamBatches` (``window_index`` counts windows from the
    start of training). Documents with no tokens are skipped. With one rank, no shuffle and ``passes=1`` the batches
    equal ``StreamBatches(documents, shuffle=False)``'s.

    **Passes.** ``passes=None`` (default) reads the source again and again (``set_epoch(pass)`` is called on sources
    that have it, so a seeded ``IterableDataset.shuffle`` reshuffles per pass); streams run on from one pass into
    the next without padding. ``passes=n`` stops after ``n`` passes and pads the last window with inactive cells.
    A whole pass that gives this rank no tokens raises ``ValueError`` (it would never yield a batch).

    **Position.** An iteration continues from the current position (where the previous one stopped; after a
    finished iteration of ``passes`` passes, from the beginning). :meth:`state_dict` holds the layout and the
    position (JSON data): for the next batch, its window and group, the source position ``(pass, index)`` of the
    next undealt document and, per stream, the documents in flight (source position and next cell); ``resume_from``
    is the earliest of them. :meth:`load_state_dict` with the same layout continues **exactly**: the records before
    the earliest document in flight are read but not tokenized, the documents in flight are read and tokenized again,
    and the batches are those of the uninterrupted iteration, provided the source yields the same records in the same
    order in every pass (local files; a dataset with a seeded shuffle). With another layout (world size, batch,
    window, ...) the position cannot be mapped onto the new streams, so it resumes **approximately**: the iteration
    restarts at ``resume_from`` (the trainer saves the earliest document in flight over all ranks there; with
    ``split_documents=False``, at the start of that pass), with a warning: no document is skipped, some are read
    twice. The position lives in this process: read the dataset with ``num_workers=0``.
    """

    def __init__(
        self,
        documents: Any,
        *,
        segment_length: int,
        window: int,
        batch_size: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        bos_token_id: int,
        pad_token_id: int,
        boot: BootMode = "bos",
        decoder_previous_segment: bool = False,
        tokenizer: Any = None,
        text_column: str = "text",
        split_documents: bool = True,
        passes: int | None = None,
        vocab_size: int | None = None,
        tokenize_batch: int = 16,
    ) -> None:
        self._init_layout(segment_length=segment_length, window=window, batch_size=batch_size, grad_accum=grad_accum,
                          world_size=world_size, rank=rank, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                          boot=boot, decoder_previous_segment=decoder_previous_segment)
        if tokenize_batch < 1:
            raise ValueError(f"tokenize_batch must be >= 1, got {tokenize_batch}")
        if passes is not None and passes < 1:
            raise ValueError(f"passes must be >= 1 or None (endless), got {passes}")
        if isinstance(documents, (str, bytes)) or not (callable(documents) or hasattr(documents, "__iter__")):
            raise ValueError(f"IterableStreamBatches: documents must be an iterable of documents or a function "
                             f"returning an iterator, got {type(documents).__name__}")
        if hasattr(documents, "__next__") and iter(documents) is documents:
            raise ValueError("IterableStreamBatches: documents is a one-shot iterator; pass something that can be "
                             "iterated again for every pass and on resume (a list, a datasets IterableDataset, or a "
                             "function returning a fresh iterator)")
        self.documents = documents
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.split_documents = split_documents
        self.passes = passes
        self.vocab_size = vocab_size
        self.tokenize_batch = tokenize_batch
        self._position: dict[str, Any] = self._fresh_position()  # where the next batch comes from

    # -- reading ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _fresh_position() -> dict[str, Any]:
        return {"window": 0, "group": 0, "next": [0, 0], "streams": [], "documents": 0, "tokens": 0}

    def _source(self, pass_index: int) -> Iterator[Any]:
        src = self.documents
        if hasattr(src, "set_epoch"):
            src.set_epoch(pass_index)
        return iter(src() if callable(src) and not hasattr(src, "__iter__") else src)

    def _owned(self, index: int) -> bool:
        return not self.split_documents or index % self.world_size == self.rank

    def _content(self, record: Any, where: str) -> str | list[int] | torch.Tensor:
        """Token ids or text of one source record: a string, token ids, or a mapping with ``input_ids`` or
        ``text_column``."""
        if isinstance(record, str):
            return record
        if isinstance(record, dict):
            if "input_ids" in record:
                return document_ids(record["input_ids"], where, record.get("attention_mask"), record.get("labels"))
            if self.text_column not in record:
                raise ValueError(f"{where} has no column {self.text_column!r} (nor 'input_ids'); available columns: "
                                 f"{sorted(record)}")
            text = record[self.text_column]
            if not isinstance(text, str):
                raise ValueError(f"{where}: column {self.text_column!r} is {type(text).__name__}, expected str")
            return text
        if torch.is_tensor(record) or isinstance(record, (list, tuple, np.ndarray)):
            return record
        raise ValueError(f"{where} is a {type(record).__name__}; expected a text, token ids or a mapping")

    def _read(self, start: tuple[int, int], wanted) -> Iterator[tuple[int, int, torch.Tensor | None]]:
        """``(pass, index, ids)`` of this rank's documents from source position ``start`` on, through the passes;
        ``ids`` is None for documents that ``wanted(pass, index)`` declines (they are not tokenized)."""
        pass_index, first = start
        while self.passes is None or pass_index < self.passes:
            tokens_in_pass, declined = 0, False
            pending: list[tuple[int, Any]] = []  # (index, text / ids / None), tokenized together
            for index, record in enumerate(self._source(pass_index)):
                if index < first or not self._owned(index):
                    continue
                if wanted(pass_index, index):
                    pending.append((index, self._content(record, f"document {index} of pass {pass_index}")))
                else:
                    pending.append((index, None))
                    declined = True
                if len(pending) >= self.tokenize_batch:
                    for item in self._tokenized(pass_index, pending):
                        tokens_in_pass += 0 if item[2] is None else int(item[2].numel())
                        yield item
                    pending = []
            for item in self._tokenized(pass_index, pending):
                tokens_in_pass += 0 if item[2] is None else int(item[2].numel())
                yield item
            if first == 0 and not declined and tokens_in_pass == 0:
                share = (f"documents {self.rank}, {self.rank + self.world_size}, ... of the source"
                         if self.split_documents and self.world_size > 1 else "its documents")
                raise ValueError(f"IterableStreamBatches: pass {pass_index} gave rank {self.rank} no tokens ({share}); "
                                 f"the source needs at least {self.world_size} non-empty document(s)")
            pass_index, first = pass_index + 1, 0

    def _tokenized(self, pass_index: int, pending: list[tuple[int, Any]]
                   ) -> list[tuple[int, int, torch.Tensor | None]]:
        """Token ids of the pending documents (texts tokenized in one call)."""
        texts = [c for _, c in pending if isinstance(c, str)]
        if texts and self.tokenizer is None:
            index = next(i for i, c in pending if isinstance(c, str))
            raise ValueError(f"IterableStreamBatches: document {index} of pass {pass_index} is text; pass "
                             "tokenizer= (or documents of token ids)")
        boot = _boot_bos(self.bos_token_id, self.boot)
        encoded = iter([text_document_ids(ids, boot) for ids in tokenize_documents(texts, self.tokenizer)]
                       if texts else [])
        return [(pass_index, index, None if content is None else
                 self._checked(next(encoded) if isinstance(content, str) else content, pass_index, index))
                for index, content in pending]

    def _checked(self, ids: Any, pass_index: int, index: int) -> torch.Tensor:
        ids = document_ids(ids, f"document {index} of pass {pass_index}",
                           bos_token_id=_boot_bos(self.bos_token_id, self.boot))
        if ids.numel():
            low, top = int(ids.min()), int(ids.max())
            if low < 0:
                raise ValueError(f"document {index} of pass {pass_index} holds a negative token id ({low})")
            if self.vocab_size is not None and top >= self.vocab_size:
                raise ValueError(f"document {index} of pass {pass_index} holds token id {top} but the model's "
                                 f"vocab_size is {self.vocab_size} (valid ids are 0..{self.vocab_size - 1}); was it "
                                 "tokenized with another tokenizer?")
        return ids

    # -- iteration ----------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise ValueError("IterableStreamBatches keeps its stream position in the main process: read it with "
                             "num_workers=0 (dataloader_num_workers=0)")
        start = self._position
        S, T, L, G = self.streams_per_rank, self.window, self.segment_length, self.grad_accum
        # per local stream: its queue of documents in flight, [pass, index, ids, cells, next cell]
        queues: list[list[list[Any]]] = [[] for _ in range(S)]
        in_flight = {(p, i): (s, c) for s, refs in enumerate(start["streams"]) for p, i, c in refs}
        resume_next = tuple(start["next"])
        low = min([resume_next, *in_flight])
        reader = self._read(low, lambda p, i: (p, i) >= resume_next or (p, i) in in_flight)
        restored: dict[tuple[int, int], list[Any]] = {}
        while len(restored) < len(in_flight):  # re-read the documents in flight; the reader then continues
            item = next(reader, None)
            if item is None:
                break
            p, i, ids = item
            if (p, i) in in_flight:
                restored[(p, i)] = [p, i, ids, _n_cells(ids.numel(), L), in_flight[(p, i)][1]]
        missing = sorted(set(in_flight) - set(restored))
        if missing:
            raise ValueError(f"IterableStreamBatches: cannot resume, the source no longer holds the documents (pass, "
                             f"index) {missing[:4]} that were in flight; is it the same source?")
        for s, refs in enumerate(start["streams"]):
            queues[s] = [restored[(p, i)] for p, i, _ in refs]
        queued = [sum(e[3] - e[4] for e in q) for q in queues]
        nxt = list(resume_next)
        documents, tokens = start["documents"], start["tokens"]
        exhausted = False
        window, group = start["window"], start["group"]
        pending_doc = None
        while True:
            snapshot = self._snapshot(window, queues, nxt, documents, tokens)
            # deal: the document goes to the stream with the fewest queued cells (ties: lowest id)
            while not exhausted:
                s = min(range(S), key=lambda k: (queued[k], k))
                if queued[s] >= T:
                    break
                if pending_doc is None:
                    pending_doc = next(reader, None)
                    if pending_doc is None:
                        exhausted = True
                        break
                p, i, ids = pending_doc
                if (p, i) < resume_next:  # a document in flight, already queued
                    pending_doc = None
                    continue
                pending_doc = None
                nxt = [p, i + 1]
                if not ids.numel():
                    continue
                n_c = _n_cells(ids.numel(), L)
                queues[s].append([p, i, ids, n_c, 0])
                queued[s] += n_c
                documents += 1
                tokens += int(ids.numel())
            if exhausted and not any(queued):
                self._position = self._fresh_position()  # a finished iteration: the next one starts over
                return
            cells = self._window_cells(queues, T, L)
            for s in range(S):  # consume the window's cells
                take = T
                while take and queues[s]:
                    entry = queues[s][0]
                    k = min(take, entry[3] - entry[4])
                    entry[4] += k
                    take -= k
                    queued[s] -= k
                    if entry[4] == entry[3]:
                        queues[s].pop(0)
            after = self._snapshot(window + 1, queues, nxt, documents, tokens)
            for g in range(group, G):
                batch = self._group_batch(*cells, g, window)
                self._position = after if g + 1 == G else {**snapshot, "group": g + 1}
                yield batch
            window, group = window + 1, 0

    def _snapshot(self, window: int, queues, nxt, documents: int, tokens: int) -> dict[str, Any]:
        """The position at the start of ``window`` (before its dealing), as plain JSON data."""
        return {"window": window, "group": 0, "next": list(nxt),
                "streams": [[[e[0], e[1], e[4]] for e in q] for q in queues],
                "documents": documents, "tokens": tokens}

    def _window_cells(self, queues, T: int, L: int):
        """(flat tokens, start, length, is_boot) of the next ``T`` cells of every local stream; cells past the end
        of a stream's queue are inactive (length 0)."""
        S = len(queues)
        start = torch.zeros(S, T, dtype=torch.long)
        length = torch.zeros(S, T, dtype=torch.int32)
        is_boot = torch.zeros(S, T, dtype=torch.bool)
        parts: list[torch.Tensor] = []
        pos = 0
        for s, queue in enumerate(queues):
            t = 0
            for _, _, ids, n_c, c0 in queue:
                if t == T:
                    break
                k = min(T - t, n_c - c0)
                lo, hi = max(c0 - 1, 0) * L, min(int(ids.numel()), (c0 + k) * L)  # with the previous segment
                parts.append(ids[lo:hi])
                seg = torch.arange(c0, c0 + k, dtype=torch.long) * L
                start[s, t:t + k] = pos + seg - lo
                length[s, t:t + k] = (ids.numel() - seg).clamp(max=L).to(torch.int32)
                is_boot[s, t] = c0 == 0
                t += k
                pos += hi - lo
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return flat, start, length, is_boot

    # -- position -----------------------------------------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        """What a saved position depends on."""
        return {**self._layout_state(), "kind": "iterable", "split_documents": self.split_documents,
                "passes": self.passes}

    def resume_point(self) -> list[int]:
        """``[pass, index]`` of the earliest document this rank has in flight (or of its next document)."""
        pos = self._position
        return list(min([tuple(pos["next"]), *((p, i) for refs in pos["streams"] for p, i, _ in refs)]))

    def state_dict(self) -> dict[str, Any]:
        """The layout plus ``position`` (JSON-serialisable): where the next batch comes from."""
        position = {**self._position, "streams": [list(map(list, refs)) for refs in self._position["streams"]]}
        return {**self.layout(), "position": position, "resume_from": self.resume_point()}

    def compatible_with(self, state: dict[str, Any], ignore: Iterable[str] = ()) -> bool:
        """True if a saved :meth:`state_dict` was made with this layout (then its position continues exactly)."""
        skip = set(ignore)
        return self._same_decoder_layout(state) and all(state.get(k) == v for k, v in self.layout().items()
                                                        if k not in skip)

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue from a saved :meth:`state_dict` at the next iteration. Returns True when the position is exact
        (same layout); otherwise the iteration restarts at ``state["resume_from"]`` (see the class docstring) and a
        warning says so."""
        if "position" not in state:
            raise ValueError("IterableStreamBatches.load_state_dict: the state holds no position (it is not an "
                             "IterableStreamBatches state)")
        if self.compatible_with(state):
            self._position = {**self._fresh_position(), **state["position"]}
            return True
        p, i = state.get("resume_from") or state["position"]["next"]
        if not (self.split_documents and state.get("split_documents", True)):
            i = 0  # per-rank sources: an index of one rank's share means nothing to another layout
        warnings.warn(f"IterableStreamBatches: the saved stream layout differs from this one (e.g. another world "
                      f"size or batch size); the streams restart at document {i} of pass {p}, so documents in flight "
                      "are read again", stacklevel=2)
        self._position = {**self._fresh_position(), "next": [p, i]}
        return False
