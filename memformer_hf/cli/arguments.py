"""The arguments of `memformer-hf`: the dataclasses that `HfArgumentParser` parses, their checks, the model
configuration they describe, and the command line's logging.

A bad argument or input raises `CliError`; `main` reports it as one line on stderr (`memformer-hf: error: ...`) with
exit code 2, before any work where the argument alone shows the problem. `--config_overrides` is parsed with
`PretrainedConfig.update_from_string` (its syntax: `key=value,key=value`, booleans `true`/`false`).

Logging: the commands log their progress through transformers' `logging.get_logger` under `memformer_hf.cli`
(`setup_logging`): information goes to stdout for `train` and `eval` (the run's log, as in the transformers example
scripts) and to stderr for `generate` (whose stdout is the generated text), warnings to stderr. Under `torchrun` /
`accelerate launch` only rank 0 logs information (`process_log_level`: the other ranks log warnings; `--log_level` and
`--log_level_replica` override both).
"""

from __future__ import annotations

import argparse
import json
import logging as pylogging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.utils import logging

from ..configuration_memformer import PRESETS, MemformerConfig
from ..trainer_memformer import MemformerTrainingArguments

PROG = "memformer-hf"
DEFAULT_OUTPUT_DIR = "outputs/memformer-shakespeare"
MAX_SEGMENT_LENGTH = 4096
DEFAULT_MAX_STEPS = 900
WARM_START_MAX_STEPS = 300  # with --init_from_llama: the measured recipe's budget (4.9M tokens at L = 512)
CONFIG_OVERRIDE_FIELDS = ("hidden_size", "encoder_layers", "decoder_layers", "num_attention_heads",
                          "intermediate_size", "num_memory_slots", "segment_length", "memory_write_temperature",
                          "position_embedding_type", "first_segment_context", "hidden_dropout", "attention_dropout")
# Fields that may change when continuing from a trained model (the others are baked into its weights).
CONTINUE_OK_FIELDS = ("memory_write_temperature", "hidden_dropout", "attention_dropout")
LOGGER_NAME = "memformer_hf.cli"


class CliError(Exception):
    """A bad argument or input: reported as one line on stderr, exit code 2."""


# ================================================================================================ dataclasses
@dataclass
class ModelArguments:
    preset: str = field(default="cpu-small", metadata={
        "help": f"Size preset, one of memformer_hf.PRESETS ({', '.join(map(repr, PRESETS))}); 'cpu-small' (d=128) is "
                "the default CPU run of 5-15 minutes. The flags below override single fields."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved Memformer folder to continue training from (its tokenizer is used unless "
                "--tokenizer_name_or_path is given)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "A tokenizer folder to use instead of training a byte-level BPE on the train split."})
    init_from_llama: str | None = field(default=None, metadata={
        "help": "Warm-start from a local Llama-family model folder (safetensors weights, or --gguf_file) and use its "
                "tokenizer: its layers become the decoder, its first --encoder_layers the encoder, new memory blocks "
                "start at zero output (docs/design.md#warm-start). Sizes come from the backbone. What the flags leave open is "
                "the measured recipe (conversion_llama.WARM_START_RECIPE / WARM_START_LEARNING_RATES): K=64, L=512, 4 "
                "encoder layers, decoder_previous_segment and cross_attention_rope (paper-faithful: --config_overrides "
                "decoder_previous_segment=false,cross_attention_rope=false), learning rates 5e-4 for the new blocks, "
                "--encoder_learning_rate 1e-4, --backbone_learning_rate 3e-5, and 300 steps."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "With --init_from_llama: the GGUF file inside that folder to load (dequantized) instead of "
                "safetensors."})
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
        "help": "Any other MemformerConfig fields, e.g. 'use_forget_bias=false,initializer_range=0.02' (parsed by "
                "PretrainedConfig.update_from_string)."})


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
    streaming: bool = field(default=False, metadata={
        "help": "Read the data as a `datasets` IterableDataset (load_dataset(..., streaming=True)): the train split "
                "is tokenized as it is dealt to the streams and never held in memory (`train` needs --max_steps > 0 and a "
                "validation split or --validation_file); the validation / test splits are read up to "
                "--max_eval_documents (`eval --split train` needs it, or --max_train_documents)."})
    streaming_sample_documents: int = field(default=10000, metadata={
        "help": "With --streaming: the byte-level BPE and the unigram baseline are fitted on the first N documents "
                "of the train stream."})


@dataclass
class ReportArguments:
    sample_prompt: str = field(default="ACT I\n\nSCENE I. A room in the palace.\n\n", metadata={
        "help": "Prompt of the sample generation streamed at the end of training."})
    sample_max_new_tokens: int = field(default=160, metadata={"help": "Length of the sample (0: no sample)."})
    heatmap_segments: int = field(default=48, metadata={
        "help": "Segments of a validation document shown in memory_writer_attention.png."})
    model_card_template: str | None = field(default=None, metadata={
        "help": "Model card template (default: model_card.md at the repository root); `{{ name }}` placeholders and "
                "`{{ card_data }}` (the metadata) are rendered with huggingface_hub's ModelCard.from_template."})
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
    learning_rate: float = field(default=3e-3, metadata={
        "help": "Peak AdamW learning rate (5e-4 for the new blocks with --init_from_llama)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps (a float < 1: a ratio)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the train streams."})
    max_steps: int = field(default=DEFAULT_MAX_STEPS, metadata={
        "help": f"Optimizer steps (default {DEFAULT_MAX_STEPS}: the 5-15 minute CPU run; {WARM_START_MAX_STEPS} with "
                "--init_from_llama; -1, or passing only --num_train_epochs, trains for num_train_epochs)."})
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


def parse(dataclass_types, argv: list[str], description: str, command: str):
    """`HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)` for `memformer-hf COMMAND`; a bad flag
    or a value that a dataclass's `__post_init__` refuses (e.g. `TrainingArguments`') is a `CliError`."""
    # no abbreviated flags: `flag_given` must see every flag the parser took (e.g. whether --max_steps was given)
    parser = _OneLineParser(dataclass_types, prog=f"{PROG} {command}", description=description,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except CliError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # __post_init__ checks of TrainingArguments & co
        raise CliError(one_line(e)) from None


def flag_given(argv: list[str], name: str) -> bool:
    """Whether `--name` was given, also as `--name=value` or in the dashed spelling `HfArgumentParser` accepts
    (`--max-steps`)."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in spellings for a in argv)


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split()) if text else type(e).__name__


def check_choice(name: str, value: Any, allowed) -> None:
    if value is not None and value not in allowed:
        raise CliError(f"--{name} {value!r}: choose one of {', '.join(map(str, allowed))}")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise CliError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def split_paths(value: str, flag: str) -> list[str]:
    """The comma-separated paths of a file flag, each of which must exist."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise CliError(f"--{flag} is empty")
    for p in paths:
        if not Path(p).expanduser().exists():
            raise CliError(f"--{flag} {p}: no such file or directory")
    return paths


def check_output_path(flag: str, value: str | None, directory: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder (`directory`) that exists as
    something else, a file path that is a folder, or either under a regular file. Missing folders are fine: they are
    created when writing (as the Trainer does for --output_dir)."""
    if not value:
        return
    path = Path(value).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise CliError(f"--{flag} {value}: exists and is not a directory")
    if not directory and path.is_dir():
        raise CliError(f"--{flag} {value}: is a directory; pass a file path such as {Path(value, 'metrics.json')}")
    existing = path if directory and path.is_dir() else path.parent  # where the files will be created
    while not existing.exists() and existing != existing.parent:  # the nearest folder that exists
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"--{flag} {value}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--{flag} {value}: cannot write into {existing} (permission denied)")
    if not directory and path.is_file() and not os.access(path, os.W_OK):
        raise CliError(f"--{flag} {value}: the file exists and cannot be overwritten (permission denied)")


# ================================================================================================ checks
def check_training_args(args) -> None:
    """Numbers the Trainer would accept and then fail on (a ZeroDivisionError, a 0-step run, a rising loss), the
    Hub strategy, and the checkpoint to resume from (`--resume_from_checkpoint DIR`, or `true`: the last one); without
    one, an --output_dir that holds an earlier run's checkpoints is refused."""
    if args.max_steps == 0 or args.max_steps < -1:
        raise CliError(f"--max_steps must be > 0, or -1 to train for --num_train_epochs, got {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise CliError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        raise CliError(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps"):
        check_positive(name, getattr(args, name))
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
        from ..trainer_memformer import check_checkpoint

        try:
            check_checkpoint(str(Path(args.resume_from_checkpoint).expanduser()))
        except OSError as e:
            raise CliError(("--" if isinstance(e, FileNotFoundError) else "") + one_line(e)) from None
    elif Path(args.output_dir).expanduser().is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(Path(args.output_dir).expanduser()))
        if last is not None:  # a fresh run would save beside them, and a later resume could pick up the old run's
            raise CliError(f"--output_dir {args.output_dir} holds checkpoints of an earlier run ({Path(last).name}); "
                           "pass --resume_from_checkpoint true to continue it, or another --output_dir")


def check_data_args(data: DataArguments, args=None) -> None:
    """The data flags (and, for `train`, what `--streaming` needs of the training arguments `args`)."""
    if data.dataset_name and (data.train_file or data.validation_file or data.test_file):
        raise CliError("pass either --dataset_name or --train_file/--validation_file/--test_file, not both")
    for flag in ("train_file", "validation_file", "test_file"):
        if getattr(data, flag):
            split_paths(getattr(data, flag), flag)
    check_positive("max_train_documents", data.max_train_documents)
    check_positive("max_eval_documents", data.max_eval_documents)
    check_positive("max_eval_tokens", data.max_eval_tokens, allow_zero=True)
    check_positive("streaming_sample_documents", data.streaming_sample_documents)
    if args is None:  # eval: the split to evaluate may come from any of the flags
        return
    if (data.validation_file or data.test_file) and not data.train_file:
        raise CliError("--validation_file/--test_file need --train_file for training (or use `memformer-hf eval`)")
    if not 0 <= data.validation_split_percentage < 100:
        raise CliError(f"--validation_split_percentage must be in [0, 100), got {data.validation_split_percentage}")
    if data.streaming:
        if not (data.dataset_name or data.train_file):
            raise CliError("--streaming true needs --dataset_name or --train_file (the default corpus is read into "
                           "memory)")
        if args.max_steps <= 0:
            raise CliError(f"--streaming true needs --max_steps > 0 (a stream has no length to count epochs with), "
                           f"got --max_steps {args.max_steps}")
        if data.train_file and not data.validation_file:
            raise CliError("--streaming true with --train_file needs --validation_file (no validation documents can "
                           "be held out of a stream)")


def check_model_args(model_args: ModelArguments) -> None:
    if model_args.model_name_or_path is None:
        check_choice("preset", model_args.preset, list(PRESETS))
    for flag in ("model_name_or_path", "tokenizer_name_or_path", "init_from_llama"):
        value = getattr(model_args, flag)
        if value is not None and not Path(value).expanduser().is_dir():
            raise CliError(f"--{flag} {value}: no such directory (the Hub is not reachable; pass a local folder)")
    if model_args.gguf_file is not None:
        if model_args.init_from_llama is None:
            raise CliError("--gguf_file needs --init_from_llama (the folder that holds it)")
        if not (Path(model_args.init_from_llama).expanduser() / model_args.gguf_file).is_file():
            raise CliError(f"--gguf_file {model_args.gguf_file}: no such file in {model_args.init_from_llama}")
    if model_args.init_from_llama is not None:
        given = [f"--{k}" for k in ("model_name_or_path", "tokenizer_name_or_path", *BACKBONE_FIXED_FIELDS)
                 if getattr(model_args, k) is not None]
        if given:
            raise CliError(f"{', '.join(given)} cannot be combined with --init_from_llama (the backbone fixes its "
                           f"sizes and tokenizer)")
    if model_args.vocab_size < 260 or model_args.vocab_size > 2 ** 20:
        raise CliError(f"--vocab_size must be in [260, 1048576] (256 byte symbols plus special tokens), "
                       f"got {model_args.vocab_size}")
    seg = model_args.segment_length
    if seg is not None and not 1 <= seg <= MAX_SEGMENT_LENGTH:
        raise CliError(f"--segment_length must be in [1, {MAX_SEGMENT_LENGTH}] (attention is quadratic in the "
                       f"segment; memory carries longer context), got {seg}")
    config_overrides(model_args)  # unknown fields and unparsable values fail here, before any work


# ================================================================================================ configuration
def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`key=value,...` of `--config_overrides` as typed values. Each item is parsed by
    `PretrainedConfig.update_from_string` on a default `MemformerConfig`, so a value takes the type of the field's
    default (ints, floats and strings as written; booleans `true`/`false`); a field whose default is None (e.g.
    `memory_write_self_bias`, `bptt_horizon`) takes a JSON number, `true`/`false`/`null`, or else the string. An
    unknown field or a value of the wrong type is a `CliError` naming the item."""
    if not text:
        return {}
    scratch = MemformerConfig()
    fields = scratch.to_dict().keys() | MemformerConfig.attribute_map.keys()
    out: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or "=" in value:
            raise CliError(f"--config_overrides: expected key=value items, got {item!r}")
        if key not in fields:
            raise CliError(f"--config_overrides: unknown MemformerConfig field {key!r}")
        if getattr(scratch, key) is None:
            try:
                out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
            except json.JSONDecodeError:
                out[key] = value
            continue
        try:
            scratch.update_from_string(f"{key}={value}")
        except (ValueError, TypeError) as e:
            raise CliError(f"--config_overrides {key}={value}: {one_line(e)}") from None
        out[key] = getattr(scratch, key)
    return out


# the sizes a warm start takes from its backbone (--init_from_llama)
BACKBONE_FIXED_FIELDS = ("hidden_size", "decoder_layers", "num_attention_heads", "intermediate_size")


def config_overrides(model_args: ModelArguments) -> dict[str, Any]:
    """The single-field flags that were given, then `--config_overrides`."""
    explicit = {k: getattr(model_args, k) for k in CONFIG_OVERRIDE_FIELDS if getattr(model_args, k) is not None}
    return {**explicit, **parse_config_overrides(model_args.config_overrides)}


def build_config(model_args: ModelArguments, tokenizer, pretrained_config=None) -> MemformerConfig:
    """The model configuration: the preset with the tokenizer's special ids and a vocabulary rounded up to a multiple
    of 128, and the overrides; or, continuing from a trained model, its config with the fields that may change."""
    overrides = config_overrides(model_args)
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
            raise CliError(one_line(e)) from None
        return pretrained_config
    vocab = -(-len(tokenizer) // 128) * 128
    ids = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    try:
        return MemformerConfig.from_preset(model_args.preset, **{**ids, **overrides})
    except (ValueError, TypeError) as e:
        raise CliError(one_line(e)) from None


# What a saved config holds besides the model itself (set by save_pretrained and the Trainer).
_SAVE_METADATA = ("transformers_version", "architectures", "auto_map", "use_cache", "dtype", "torch_dtype",
                  "_name_or_path")


def check_resume_config(config: MemformerConfig, checkpoint: str) -> None:
    """A `CliError` naming the fields in which this run's model config differs from the checkpoint's (other than
    `CONTINUE_OK_FIELDS`): the Trainer would load the checkpoint's weights into this model, a traceback for other
    sizes and a silently different computation for other options."""
    try:
        saved = MemformerConfig.from_pretrained(checkpoint).to_dict()
    except Exception:  # noqa: BLE001 - no or an unreadable config: check_checkpoint and the Trainer say what is wrong
        return
    ours = config.to_dict()
    differ = [f"{k} ({ours.get(k)}, checkpoint: {saved.get(k)})" for k in sorted(set(ours) | set(saved))
              if k not in _SAVE_METADATA + CONTINUE_OK_FIELDS and ours.get(k) != saved.get(k)]
    if differ:
        raise CliError(f"--resume_from_checkpoint {checkpoint}: this run's model is not the checkpoint's: "
                       f"{', '.join(differ)}; resume with the checkpoint's model flags")


# ================================================================================================ logging
class _Console(pylogging.Handler):
    """Information to the command's status stream, warnings and errors to stderr. The streams are looked up for
    every record, so a replaced `sys.stdout` (pytest's capture, a redirect) is honoured."""

    def __init__(self, info_stream: str) -> None:
        super().__init__()
        self.info_stream = info_stream

    def emit(self, record: pylogging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= pylogging.WARNING else getattr(sys, self.info_stream)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def setup_logging(info_stream: str = "stdout", level: int = pylogging.INFO) -> None:
    """Route the command line's loggers (`memformer_hf.cli.*`, from `transformers.utils.logging.get_logger`) to the
    console: information to `info_stream` ("stdout" or "stderr"), warnings to stderr, plain messages."""
    logger = logging.get_logger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    logger.addHandler(_Console(info_stream))
    logger.setLevel(level)
    logger.propagate = False


def process_log_level(args) -> int:
    """The level of this process: information on rank 0, warnings on the others; `--log_level` (rank 0) and
    `--log_level_replica` (the others) override it, as they do for transformers' loggers in the Trainer."""
    from transformers.training_args import trainer_log_levels

    name = args.log_level if args.process_index == 0 else args.log_level_replica
    level = trainer_log_levels.get(name, -1)
    if level == -1:  # "passive"
        return pylogging.INFO if args.process_index == 0 else pylogging.WARNING
    return level
