"""`memformer-hf eval --model DIR`: perplexity of a trained model folder with the memory carried through whole
documents and with the memory reset at every segment, and by position in the document, on a split of the dataset,
the files or the default corpus. stdout: the metric tables."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from transformers.utils import logging

from ..trainer_memformer import MemformerTrainer, MemformerTrainingArguments
from . import corpus as corpus_io
from . import report as reports
from .arguments import (
    CliError,
    DataArguments,
    EvalArguments,
    check_data_args,
    check_output_path,
    check_positive,
    flag_given,
    one_line,
    parse,
)

logger = logging.get_logger(__name__)


def cmd_eval(argv: list[str]) -> int:
    ev, data = parse((EvalArguments, DataArguments), argv,
                     "evaluate perplexity with and without memory, and by position in the document", "eval")
    if not ev.model:
        raise CliError("--model DIR is required")
    if flag_given(argv, "streaming_sample_documents"):
        raise CliError("--streaming_sample_documents does nothing in `memformer-hf eval` (it sets what `train` fits "
                       "its tokenizer on); bound the documents with --max_eval_documents")
    check_data_args(data)
    if data.streaming and ev.split == "train" and not (data.max_eval_documents or data.max_train_documents):
        raise CliError("--streaming true --split train: evaluation reads the documents into memory, and a streamed "
                       "train split may be larger than memory or endless: bound it with --max_eval_documents N")
    check_positive("per_device_eval_batch_size", ev.per_device_eval_batch_size)
    check_positive("eval_window", ev.eval_window)
    check_output_path("output_json", ev.output_json)  # before the evaluation, not after it
    model, tokenizer = corpus_io.load_model_folder(ev.model, ev.use_cpu)
    corpus, description = corpus_io.load_corpus(data, splits=(ev.split,))
    if ev.split == "validation" and ev.split not in corpus and not data.streaming:
        # no validation split or file: the documents `train` held out (--validation_split_percentage), as it does
        corpus, description = corpus_io.load_corpus(data, splits=("train",))
        corpus_io.hold_out(corpus, data)
        if "validation" in corpus:
            description += f" (validation: the last {len(corpus['validation'])} train documents, held out)"
    if ev.split not in corpus:
        raise CliError(f"no {ev.split!r} split in {description}")
    texts = corpus[ev.split]
    if data.streaming and ev.split == "train":  # the train split stays a stream in load_corpus
        texts = corpus_io.stream_sample(texts, data.max_eval_documents)
    elif ev.split == "train" and data.max_train_documents:  # (a stream: load_corpus has applied it)
        texts = texts[: data.max_train_documents]
    texts = texts[: data.max_eval_documents] if data.max_eval_documents else texts
    docs = corpus_io.prepare_documents(texts, tokenizer, data.max_eval_tokens)
    if not docs:
        raise CliError(f"the {ev.split} split has no non-empty documents")
    try:  # use_cpu: where load_model_folder put the model (without it, bf16 on a CPU-only machine is refused)
        args = MemformerTrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "memformer-hf-eval"),
                                          per_device_eval_batch_size=min(ev.per_device_eval_batch_size, len(docs)),
                                          eval_window=ev.eval_window, report_to="none",
                                          use_cpu=model.device.type == "cpu", bf16=ev.bf16, disable_tqdm=True)
    except ValueError as e:  # e.g. bf16 on a GPU without bf16
        raise CliError(one_line(e)) from None
    trainer = MemformerTrainer(model=model, args=args, processing_class=tokenizer)
    main_process = trainer.is_world_process_zero()  # under torchrun every rank evaluates its share; rank 0 reports
    if main_process:
        logger.info(f"evaluating {ev.model} on {len(docs)} {ev.split} documents ({sum(map(len, docs)):,} tokens) of "
                    f"{description}")
    t = time.time()
    prefix = "eval" if ev.split == "validation" else ev.split
    metrics = trainer.evaluate_documents(corpus_io.trainer_documents(docs, model.config),
                                           metric_key_prefix=prefix)
    metrics[f"{prefix}_seconds"] = time.time() - t
    if not main_process:
        return 0
    splits = ((prefix, ev.split),)
    print(reports.metrics_table(metrics, splits))
    print()
    print(reports.position_table(metrics, splits), flush=True)
    if ev.output_json:
        path = Path(ev.output_json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0
