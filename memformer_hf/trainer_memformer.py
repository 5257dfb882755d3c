"""`MemformerTrainer`: a `transformers.Trainer` that trains Memformer with MRBP over contiguous document streams.

Each training batch is a window of T cells of B parallel streams (`data_streams.StreamBatches`,
docs/design.md#stream-batching); the memory at the end of a window is carried (detached) to the next window of the
same streams, keyed by stream id, and restarts from m₀ at every document start. `training_step` runs
`mrbp.cells_backward`, so one optimizer step may contain several backward calls: DDP / FSDP gradient sync happens
only on the last one of the optimizer step (`accelerator.no_sync`), fp16 memory gradients are unscaled before they
are injected again, and the loss is normalised by the global token count of the optimizer step
(`num_items_in_batch`, including gradient accumulation and, with `average_tokens_across_devices`, all ranks). Under
FSDP2 each replayed cell re-gathers the shards. Every epoch trains its own windows (the documents are re-dealt each
epoch, so lengths differ; no step trains on a window without tokens) and the step count and LR schedule follow the
real total (`training_plan`). One process never wraps the model in `nn.DataParallel`: with several visible GPUs and
no launcher it trains on one and logs how to use all (docs/design.md#distributed).
A corpus larger than memory comes as an `IterableStreamBatches` (or a `datasets.IterableDataset`, wrapped in one):
its documents are tokenized as they are dealt, training is bounded by `max_steps`, and checkpoints hold its position,
so a resumed run continues where it stopped (docs/design.md#streamed-corpora).

The trainer is built from named parts:

* `CarriedMemory`: the per-stream carried memory of this rank (get / put / save / load);
* `checkpointing.AtomicCheckpointMixin`: checkpoints are staged in `_tmp-checkpoint-N` and renamed to
  `checkpoint-N` when complete, so a crash during a save is never resumed from; they also hold the carried memory
  and the stream layout, so a resumed run continues exactly;
* `PerplexitySums`: evaluation carries the memory through whole documents and sums the NLL and the targets per
  position bucket on the device (one synchronisation at the end). It reports perplexity, the same with the memory
  reset at every segment (`*_no_memory`), and perplexity by position in the document; `evaluate()` shows a progress
  bar, passes the sums to `compute_metrics` (`MemformerEvalPrediction`), logs the metrics (`report_to` loggers) and
  calls the callbacks' `on_evaluate`.

Beyond calling it, the trainer reaches into the model (for m₀) only through `_causal_lm`, which unwraps
accelerate's wrappers and a peft `PeftModel`, so LoRA fine-tuning (`peft.get_peft_model`) trains through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, SequentialSampler
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import denumpify_detensorize, get_last_checkpoint
from transformers.utils import logging

from .checkpointing import AtomicCheckpointMixin
from .data_streams import IterableStreamBatches, StreamBatches, check_vocab, collate_single, document_ids
from .graphs import tuner_layers
from .mrbp import LOSS_WEIGHTINGS, MODES, average_gradients, cell_batch, cells_backward, graphed_cells_apply

logger = logging.get_logger(__name__)

POSITION_BUCKETS = (0, 64, 512, 4096, 32768)
BUCKET_NAMES = tuple(f"{lo}-{hi}" for lo, hi in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:])) + (
    f"{POSITION_BUCKETS[-1]}+",)
STREAM_STATE = "stream_state-rank{rank}"
PER_RANK_KEYS = ("world_size", "rank", "streams_per_rank", "batch_size", "grad_accum")  # one split of the streams
STREAM_DATASETS = (StreamBatches, IterableStreamBatches)  # rank-aware stream layouts with a carried memory per stream


@dataclass
class MemformerTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the recurrent-training settings."""

    mrbp_window: int = field(default=4, metadata={"help": "Segments (cells) per window T; gradients flow through the "
                                                          "memory across the T cells of a window."})
    training_mode: str = field(default="mrbp", metadata={"help": f"One of {MODES}: exact BPTT with one segment graph "
                                                                 "alive (mrbp), one graph over the window (bptt), or no "
                                                                 "gradient through memory (truncated)."})
    mrbp_loss_weighting: str = field(default="token_mean", metadata={"help": f"One of {LOSS_WEIGHTINGS}."})
    eval_window: int = field(default=16, metadata={"help": "Cells per evaluation batch (memory is carried through "
                                                           "whole documents regardless)."})
    eval_no_memory: bool = field(default=True, metadata={"help": "Also report perplexity with the memory reset at "
                                                                 "every segment (the 'w/o memory' diagnostic)."})
    eval_foreign_memory: bool = field(default=False, metadata={
        "help": "Also report perplexity with each segment read against the memory another evaluation stream carries "
                "at that step (another document's, at ≥ 2 streams): below it, the memory holds information about its "
                "own document, not only a state the model expects."})
    encoder_learning_rate: float | None = field(default=None, metadata={
        "help": "For a model warm-started from a Llama-family backbone (conversion_llama): the learning rate of the "
                "encoder layers copied from it (0: frozen; None: learning_rate). learning_rate is then the rate of the "
                "new blocks (memory readers and writer, cross-attention)."})
    backbone_learning_rate: float | None = field(default=None, metadata={
        "help": "For a warm-started model: the learning rate of the copied decoder, embeddings and head (0: frozen; "
                "None: learning_rate)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: batches are built for the "
                                                                         "model by the stream packer."})

    def origin_learning_rates(self) -> dict[str, float]:
        """The learning rate of each origin of a warm-started model's parameters (`warm_start_parameter_groups`):
        `learning_rate` for the new blocks, and for the copied encoder / backbone where their rate is unset."""
        return {"new": self.learning_rate,
                "encoder": self.learning_rate if self.encoder_learning_rate is None else self.encoder_learning_rate,
                "backbone": self.learning_rate if self.backbone_learning_rate is None else self.backbone_learning_rate}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mrbp_window < 1:
            raise ValueError(f"mrbp_window must be >= 1, got {self.mrbp_window}.")
        if self.training_mode not in MODES:
            raise ValueError(f"training_mode must be one of {MODES}, got {self.training_mode!r}.")
        if self.mrbp_loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"mrbp_loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.mrbp_loss_weighting!r}.")
        if self.eval_window < 1:
            raise ValueError(f"eval_window must be >= 1, got {self.eval_window}.")
        for name in ("encoder_learning_rate", "backbone_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: frozen) or None, got {value!r}.")
        if self.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor} is not supported by MemformerTrainer: "
                             "its MRBP cells compute the plain token cross-entropy; leave it at 0.")
        if self.torch_compile:
            raise ValueError("torch_compile is not supported by MemformerTrainer: on a GPU the MRBP cells already run "
                             "as captured CUDA graphs, and a compiled model re-traces every cell (3.9x slower when "
                             "measured); leave torch_compile off.")


class _EpochLoader(DataLoader):
    """A sequential, batch-size-1 loader over ready batches whose `set_epoch` reshuffles the streams."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class _StreamEpochCallback(TrainerCallback):
    """Keep the stream layout on the Trainer's epoch (also when accelerate wraps the loader to skip batches)."""

    def __init__(self, dataset: StreamBatches) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor(state.epoch + 1e-6)) if state.epoch else 0)


class CarriedMemory:
    """The memory that each training stream of this rank carries from one window to the next (detached, docs/design.md#carry).

    Row i holds global stream `first_stream + i`: this rank owns streams `[first_stream, first_stream +
    num_streams)`. The store is empty until the first `get`, which fills every row with m₀; a document start inside
    a window is the model's business (`memory_reset`), not the store's. `save` / `load` write and read this rank's
    rows and the stream layout in a checkpoint folder (`stream_state-rank{r}.safetensors` / `.json`)."""

    def __init__(self, first_stream: int = 0, num_streams: int = 0, rank: int = 0) -> None:
        self.first_stream, self.num_streams, self.rank = first_stream, num_streams, rank
        self.memory: torch.Tensor | None = None  # [num_streams, K, d]

    def get(self, stream_ids: torch.Tensor, initial: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The memories of `stream_ids` [B]; `initial(n)` gives m₀ for n streams when the store is empty."""
        if self.memory is None:
            self.memory = initial(self.num_streams).detach().clone()
        return self.memory[stream_ids - self.first_stream]

    def put(self, stream_ids: torch.Tensor, memory: torch.Tensor) -> None:
        """Store the (new) memories [B, K, d] of `stream_ids` [B], detached, in the store's dtype."""
        self.memory[stream_ids - self.first_stream] = memory.detach().to(self.memory.dtype)

    def _path(self, folder: str) -> str:
        return os.path.join(folder, STREAM_STATE.format(rank=self.rank))

    def save(self, folder: str, layout: dict[str, Any]) -> None:
        """This rank's memories and the stream `layout` (`StreamBatches.state_dict()`); nothing while empty."""
        if self.memory is None:
            return
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        path = self._path(folder)
        save_file({"carry": self.memory.detach().cpu().contiguous()}, path + ".safetensors")
        with open(path + ".json", "w") as f:
            json.dump(layout, f)

    def saved_layout(self, folder: str) -> dict[str, Any] | None:
        """The stream layout saved with this rank's memories in `folder`, or None."""
        path = self._path(folder) + ".json"
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def load(self, folder: str, layout_matches: Callable[[dict[str, Any]], bool], device: torch.device,
             same_streams: Callable[[dict[str, Any]], bool] | None = None) -> bool:
        """Restore this rank's memories from a checkpoint whose stream layout `layout_matches` this run's. A checkpoint
        of another world size / per-rank split whose saved layout passes `same_streams` (the same global streams: same
        dealing, stream count, window) is restored exactly too, from every saved rank's rows. Otherwise (no stream
        state, or another layout) warn and leave the store empty: the streams restart from m₀. Returns whether the
        memories were restored."""
        from safetensors.torch import load_file

        path = self._path(folder)
        layout = self.saved_layout(folder) if os.path.isfile(path + ".safetensors") else None
        if layout is not None and layout_matches(layout):
            self.memory = load_file(path + ".safetensors")["carry"].to(device)
            return True
        if same_streams is not None and self._load_global(folder, same_streams, device):
            return True
        if layout is None:
            logger.warning(f"{folder} has no carried-memory state; streams restart from the initial memory.")
        else:
            logger.warning("The checkpoint's stream layout differs from this run (e.g. another world size); "
                           "carried memories are reset to m0.")
        return False

    def _load_global(self, folder: str, same_streams: Callable[[dict[str, Any]], bool], device: torch.device
                     ) -> bool:
        """This rank's rows of the global carry assembled from every rank file of a checkpoint written with another
        per-rank split of the same global streams (e.g. 2 ranks x batch 1 resumed by 1 rank x batch 2)."""
        from safetensors.torch import load_file

        first = CarriedMemory(rank=0).saved_layout(folder)
        if first is None or not same_streams(first):
            return False
        parts = []
        for r in range(int(first["world_size"])):
            saved = CarriedMemory(rank=r)
            path = saved._path(folder)
            layout = saved.saved_layout(folder)
            if layout is None or not os.path.isfile(path + ".safetensors") or not same_streams(layout):
                return False
            parts.append(load_file(path + ".safetensors")["carry"])
        carry = torch.cat(parts)
        if carry.shape[0] < self.first_stream + self.num_streams:
            return False
        self.memory = carry[self.first_stream:self.first_stream + self.num_streams].to(device)
        logger.info(f"Carried memories restored from the {len(parts)} rank(s) of {folder} (another per-rank split "
                    "of the same streams).")
        return True


@dataclass
class PerplexitySums:
    """Exact token sums of one evaluation variant: the summed NLL and the number of targets per position bucket
    (`POSITION_BUCKETS`: a target's position in its document, from 0). float64, on the device while evaluating."""

    nll: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu") -> PerplexitySums:
        def zeros() -> torch.Tensor:
            return torch.zeros(len(POSITION_BUCKETS), dtype=torch.float64, device=device)

        return cls(zeros(), zeros())

    @staticmethod
    def buckets(position: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """The bucket of each position: `edges` is `torch.tensor(POSITION_BUCKETS)` on the positions' device."""
        return torch.bucketize(position, edges, right=True) - 1

    def add(self, nll: torch.Tensor, valid: torch.Tensor, bucket: torch.Tensor) -> None:
        """Add the per-target NLLs where `valid` to their position buckets (`buckets`; all three of one shape). No
        host synchronisation."""
        bucket = bucket.flatten()
        self.nll.index_add_(0, bucket, torch.where(valid, nll.to(self.nll.dtype), 0.0).flatten())
        self.tokens.index_add_(0, bucket, valid.flatten().to(self.tokens.dtype))

    @property
    def loss(self) -> float:
        """Token-weighted mean NLL over all positions."""
        return float(self.nll.sum() / self.tokens.sum().clamp_min(1))


def perplexity_metrics(sums: dict[str, PerplexitySums], prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_loss{variant}`, `{prefix}_ppl{variant}`, `{prefix}_tokens` (of the first variant) and
    `{prefix}_ppl{variant}_pos_{bucket}` for the buckets that hold targets, from CPU sums keyed by variant suffix."""
    metrics: dict[str, float] = {}
    for suffix, s in sums.items():
        loss = s.loss
        metrics[f"{prefix}_loss{suffix}"] = loss
        metrics[f"{prefix}_ppl{suffix}"] = math.exp(min(loss, 50.0))
        if not suffix:
            metrics[f"{prefix}_tokens"] = int(s.tokens.sum())
        for name, nll, n in zip(BUCKET_NAMES, s.nll.tolist(), s.tokens.tolist()):
            if n > 0:
                metrics[f"{prefix}_ppl{suffix}_pos_{name}"] = math.exp(min(nll / n, 50.0))
    return metrics


class MemformerEvalPrediction(EvalPrediction):
    """What `compute_metrics` receives from `MemformerTrainer.evaluate`: exact token sums over the evaluated
    documents, not logits (an evaluation of whole documents keeps no per-token outputs).

    * `predictions`: summed NLL, a float64 array [variants, buckets]; `label_ids`: the number of targets, same
      shape. Rows follow `variants` (`""`: memory carried through the documents; `"_no_memory"`: memory reset at
      every segment, when `eval_no_memory`; `"_foreign_memory"`: another stream's carried memory, when
      `eval_foreign_memory`), columns `POSITION_BUCKETS` (position of the target in its document).
      So `predictions.sum(1) / label_ids.sum(1)` is the mean NLL of each variant.
    * `metrics`: the trainer's own metrics of this evaluation (`eval_loss`, `eval_ppl`, ...).

    `compute_metrics` returns a dict of further metrics; as in `Trainer.evaluate`, keys without the
    `metric_key_prefix` (`eval_`) get it, and they are logged and passed to the callbacks with the others."""

    def __init__(self, sums: dict[str, PerplexitySums], metrics: dict[str, float]) -> None:
        self.variants = tuple(sums)
        self.metrics = dict(metrics)
        super().__init__(predictions=np.stack([s.nll.cpu().numpy() for s in sums.values()]),
                         label_ids=np.stack([s.tokens.cpu().numpy() for s in sums.values()]))


class MemformerTrainer(AtomicCheckpointMixin, Trainer):
    """Trainer for `MemformerForCausalLM` with MRBP and carried memory.

    `train_dataset`: a `StreamBatches`, or tokenized documents (a list of token-id lists, or a `datasets.Dataset`
    with an `input_ids` column), which are packed into streams with the arguments' batch size, gradient
    accumulation, world size, seed and `mrbp_window`. For corpora larger than memory: an `IterableStreamBatches`,
    or a `datasets.IterableDataset` (`load_dataset(..., streaming=True)`) of texts (tokenized on the fly with
    `processing_class`) or of `input_ids`, which is wrapped in one; it has no length, so `max_steps` > 0 is
    required (docs/design.md#streamed-corpora); a `split_dataset_by_node` share is read whole. `eval_dataset`:
    tokenized documents (same forms as above, read into memory, so a streamed one must be finite: bound an endless
    one with `stream.take(n)`), or a dict of them by name (metrics `eval_{name}_...`, as the Trainer's). A
    `data_collator` is refused (the packer builds the batches). A `processing_class` tokenizer with more tokens than
    the model's `vocab_size`, or token ids `>= vocab_size` in the data, raise a `ValueError`
    (`data_streams.check_vocab`).

    `model` may be a peft `PeftModel` around a `MemformerForCausalLM` (LoRA fine-tuning; checkpoints then hold the
    adapter). `compute_metrics` receives a `MemformerEvalPrediction` (token sums, see there) and returns extra
    metrics.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: MemformerTrainingArguments | None = None, train_dataset=None,
                 eval_dataset=None, **kwargs: Any) -> None:
        if args is None:
            args = MemformerTrainingArguments(output_dir="memformer_output")
        if not isinstance(args, MemformerTrainingArguments):
            raise TypeError("MemformerTrainer needs MemformerTrainingArguments (window, training mode, weighting).")
        self._model_config = model.config
        vocab = model.config.vocab_size
        check_vocab(vocab, tokenizer=kwargs.get("processing_class"))
        if _is_streamed(train_dataset):
            train_dataset = self._pack_stream(train_dataset, args, kwargs.get("processing_class"))
        if isinstance(train_dataset, IterableStreamBatches):
            _check_streaming_args(train_dataset, args)
            train_dataset.vocab_size = min(vocab, train_dataset.vocab_size or vocab)  # checked as documents are read
        elif train_dataset is not None and not isinstance(train_dataset, StreamBatches):
            documents = _as_documents(train_dataset, "train_dataset")
            streams = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            n_docs = sum(1 for d in documents if len(d))
            if 0 < n_docs < streams:
                warnings.warn(f"train_dataset: {n_docs} document(s) for {streams} parallel streams (per_device_train_"
                              f"batch_size x gradient_accumulation_steps x processes): {streams - n_docs} stream(s) "
                              "hold only padding, and their forward and backward passes are wasted; lower the batch "
                              "size or the gradient accumulation.", stacklevel=2)
            train_dataset = self._pack(documents, args)
        if isinstance(train_dataset, StreamBatches):
            check_vocab(vocab, documents=train_dataset, what="train_dataset")
        if kwargs.get("data_collator") is not None:
            raise ValueError("MemformerTrainer: data_collator is not supported: the batches are windows of cells built "
                             "by the stream packer (data_streams.StreamBatches), so a collator would never be called; "
                             "drop it and pass tokenized documents.")
        self._eval_documents = None if eval_dataset is None else _eval_documents(eval_dataset)
        for key, docs in _named_eval_sets(self._eval_documents):
            check_vocab(vocab, documents=docs, what=_eval_name(key))
        _one_gpu_per_process(args)
        use_cache = getattr(model.config, "use_cache", None)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=self._eval_documents,
                         **kwargs)
        # The Trainer sets config.use_cache = args.use_cache (False) for good: every saved folder would say
        # use_cache=false, and `model(ids)` of the reloaded model return no cache. Training never reads it (cell
        # mode; MRBP passes use_cache itself), so the model keeps its own setting.
        if use_cache is not None:
            model.config.use_cache = use_cache
        self._carry: torch.Tensor | None = None
        self._rng_restore: str | None = None  # a streamed resume's deferred random state (`_load_rng_state`)
        if isinstance(train_dataset, STREAM_DATASETS):
            self._check_stream_layout(train_dataset)
        if isinstance(train_dataset, StreamBatches):
            self.add_callback(_StreamEpochCallback(train_dataset))
            if train_dataset.length_epochs > 1:
                logger.warning(f"train_dataset was built with length_epochs={train_dataset.length_epochs}: its shorter "
                               "epochs end with windows without tokens, which still take optimizer steps; "
                               "MemformerTrainer follows each epoch's own length, so build it with length_epochs=1.")

    # ------------------------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (`--optim`, its weight-decay split); with `encoder_learning_rate` or
        `backbone_learning_rate`, one learning rate per origin of a warm-started model's parameters
        (`conversion_llama.warm_start_parameter_groups`: new blocks at `learning_rate`, copied encoder layers,
        copied decoder / embeddings / head); a rate of 0 freezes its parameters (`requires_grad=False`)."""
        args = self.args
        if self.optimizer is not None or (args.encoder_learning_rate is None and args.backbone_learning_rate is None):
            return super().create_optimizer(model)
        from .conversion_llama import warm_start_parameter_groups

        opt_model = self.model if model is None else model
        if tuner_layers(opt_model):
            raise ValueError("encoder_learning_rate / backbone_learning_rate split a warm-started model's own "
                             "parameters by origin; with peft adapters, an adapter inside a copied layer would count "
                             "as encoder / backbone (a rate of 0 would freeze it). Train the adapters at learning_rate "
                             "(peft already freezes the base weights) and leave these rates unset.")
        optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs if self.optimizer_cls_and_kwargs is not None
                                           else self.get_optimizer_cls_and_kwargs(args, opt_model))
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or \
                optimizer_kwargs.keys() & {"params", "model", "optimizer_dict"} or "bitsandbytes" in str(optimizer_cls):
            raise ValueError(f"encoder_learning_rate / backbone_learning_rate need a torch optimizer built from "
                             f"parameter groups; optim={args.optim!r} builds its own (or, 8-bit, needs the Trainer's "
                             f"own setup).")
        flat = next((n for n, _ in opt_model.named_parameters() if "_flat_param" in n), None)
        if flat is not None:
            raise ValueError(f"encoder_learning_rate / backbone_learning_rate find a parameter's origin by its name, "
                             f"but the model's parameters are flattened ({flat!r}: FSDP1 without use_orig_params); "
                             f"use FSDP2 or use_orig_params=True.")
        rates = args.origin_learning_rates()
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for origin, named in warm_start_parameter_groups(opt_model).items():
            if rates[origin] == 0:
                for _, p in named:
                    p.requires_grad_(False)
                continue
            trainable = [(n, p) for n, p in named if p.requires_grad]
            for decayed in (True, False):
                params = [p for n, p in trainable if (n in decay) == decayed]
                if params:
                    groups.append({"params": params, "lr": rates[origin],
                                   "weight_decay": args.weight_decay if decayed else 0.0})
        if not groups:
            raise ValueError("every parameter group has learning rate 0: nothing would train.")
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "lr")}
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """As the Trainer's, refusing a checkpoint whose optimizer groups or their rates are not this run's (e.g. other
        `encoder_learning_rate` / `backbone_learning_rate`): torch raises on a different group layout, and on the same
        layout it would keep the checkpoint's rates in place of the ones asked for."""
        groups = getattr(self.optimizer, "param_groups", None)
        if checkpoint is None or groups is None:
            return super()._load_optimizer_and_scheduler(checkpoint)

        def layout(gs) -> list[tuple[int, float]]:
            return [(len(g["params"]), g.get("initial_lr", g["lr"])) for g in gs]

        asked = layout(groups)
        advice = (f"resume_from_checkpoint {checkpoint}: the checkpoint's optimizer has other parameter groups or "
                  "per-group learning rates than this run (learning_rate / encoder_learning_rate / "
                  "backbone_learning_rate); resume with the checkpoint's rates")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as e:
            if "parameter group" not in str(e):
                raise
            raise ValueError(f"{advice} ({e}).") from e
        loaded = layout(self.optimizer.param_groups)
        if loaded != asked:
            raise ValueError(f"{advice}: (parameters, rate) per group {loaded} there, {asked} here.")

    # ------------------------------------------------------------------------------------------------ data
    def _pack(self, documents: list[list[int]], args: MemformerTrainingArguments, **overrides: Any) -> StreamBatches:
        seed = args.seed if args.data_seed is None else args.data_seed  # data_seed=0 is a seed, not "unset"
        params = {**stream_layout(self._model_config, args), "seed": seed, **overrides}
        # Every epoch keeps its natural length (the documents are re-dealt each epoch, so lengths differ): no epoch
        # ends with windows without tokens; `set_initial_training_values` and `_run_epoch` follow the real lengths.
        return StreamBatches(documents, **params)

    def _pack_stream(self, source: Any, args: MemformerTrainingArguments, tokenizer: Any) -> IterableStreamBatches:
        """A `datasets.IterableDataset` as streams of this rank (documents `r, r+W, ...`, or the whole source when it
        already is this rank's share, `datasets.distributed.split_dataset_by_node`), tokenized on the fly with
        `tokenizer` unless its rows hold `input_ids`."""
        columns = source.column_names  # None when unknown until read (then the reader names a text row)
        if tokenizer is None and columns is not None and "input_ids" not in columns:
            raise ValueError(f"train_dataset: a datasets.IterableDataset with the columns {columns} and no `input_ids`: "
                             "pass processing_class= (the tokenizer of its texts) or tokenized rows.")
        node = getattr(source, "_distributed", None)  # set by split_dataset_by_node
        if node is not None and (node.rank, node.world_size) != (args.process_index, args.world_size):
            raise ValueError(f"train_dataset was split with split_dataset_by_node(rank={node.rank}, world_size="
                             f"{node.world_size}) but this process is rank {args.process_index} of {args.world_size}.")
        return IterableStreamBatches(source, **stream_layout(self._model_config, args),
                                     tokenizer=getattr(tokenizer, "tokenizer", tokenizer), split_documents=node is None)

    def _check_stream_layout(self, ds: StreamBatches | IterableStreamBatches) -> None:
        a, cfg = self.args, self._model_config
        expected = {"segment_length": cfg.segment_length, "batch_size": a.per_device_train_batch_size,
                    "grad_accum": a.gradient_accumulation_steps, "world_size": a.world_size, "rank": a.process_index,
                    "decoder_previous_segment": getattr(cfg, "decoder_previous_segment", False)}
        wrong = {k: (getattr(ds, k), v) for k, v in expected.items() if getattr(ds, k) != v}
        if wrong:
            raise ValueError(f"train_dataset stream layout does not match the run: {wrong} (dataset, run).")

    # ------------------------------------------------------------------------------------------------ epochs
    def _epoch_updates(self, epoch: int) -> int:
        """Optimizer steps of `epoch`: its own number of windows (each window is G micro-batches)."""
        return -(-self.train_dataset.epoch_batches(epoch) // self.args.gradient_accumulation_steps)

    def training_plan(self) -> tuple[int, int]:
        """`(epochs, optimizer steps)` that `train()` runs. The documents are re-dealt to the streams every epoch,
        so epochs differ in length; each epoch trains exactly its own windows (none without tokens), and the step
        count (hence the LR schedule) is the real total: `max_steps` when > 0 (epochs: as many as it takes), else
        the windows of `num_train_epochs` epochs (a fractional last epoch counts its share of that epoch). A
        streamed `train_dataset` (`IterableStreamBatches`) has no epochs: `(1, max_steps)`, one endless pass of the
        loader over the source's passes."""
        args = self.args
        if isinstance(self.train_dataset, IterableStreamBatches):
            _check_streaming_args(self.train_dataset, args)
            return 1, args.max_steps
        if args.max_steps > 0:
            epochs, steps = 0, 0
            while steps < args.max_steps:
                steps += self._epoch_updates(epochs)
                epochs += 1
            return epochs, args.max_steps
        full = int(args.num_train_epochs)
        steps = sum(self._epoch_updates(e) for e in range(full))
        if args.num_train_epochs > full:
            steps += math.ceil((args.num_train_epochs - full) * self._epoch_updates(full))
        return math.ceil(args.num_train_epochs), steps

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader):
        """As the Trainer's, with the epoch count, step count and sample count of `training_plan` (the Trainer
        assumes that every epoch has the length of the current one)."""
        values = super().set_initial_training_values(args, dataloader)
        if not isinstance(self.train_dataset, StreamBatches):
            return values
        (_, per_epoch, num_examples, _, total_batch, steps_in_epoch, _) = values
        epochs, max_steps = self.training_plan()
        return epochs, per_epoch, num_examples, max_steps * total_batch, total_batch, steps_in_epoch, max_steps

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """As the Trainer's; on resume, the epoch and the batches to skip in it follow the real epoch lengths."""
        epochs_trained, skip = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                            resume_from_checkpoint, trial)
        if resume_from_checkpoint is not None and isinstance(self.train_dataset, StreamBatches):
            epochs_trained, left = 0, self.state.global_step
            while left >= self._epoch_updates(epochs_trained):
                left -= self._epoch_updates(epochs_trained)
                epochs_trained += 1
            skip = 0 if self.args.ignore_data_skip else left * self.args.gradient_accumulation_steps
        if resume_from_checkpoint is not None and isinstance(self.train_dataset, IterableStreamBatches):
            epochs_trained, skip = 0, 0  # the stream position was restored with the carries (`train`)
            self._rng_restore = "defer"  # see `_load_rng_state`
        return epochs_trained, skip

    def _track_num_input_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        """`include_num_input_tokens_seen`: the batches are windows of cells, not `input_ids`; count the document
        tokens they hold (`non_padding`: each token once, as the targets it is; `all`: every decoder position,
        padding included)."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        if self.args.include_num_input_tokens_seen == "non_padding":
            tokens = inputs["shift_labels"].ne(-100).sum()
        else:
            tokens = torch.tensor(inputs["decoder_input_ids"].numel())
        tokens = tokens.to(device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The Trainer's, except on resuming a streamed run: there it would restore the random state before the
        epoch's data iterator is created, whose creation draws from the CPU generator, unlike the uninterrupted run
        (whose iterator was created long before the checkpoint). The state is then restored at the first batch
        fetch instead (`get_batch_samples`), so dropout continues exactly."""
        if self._rng_restore == "defer":
            self._rng_restore = checkpoint
            return
        super()._load_rng_state(checkpoint)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        pending = self._rng_restore
        if pending is not None and pending != "defer":
            self._rng_restore = None
            super()._load_rng_state(pending)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        """As the Trainer's, over this epoch's own number of batches."""
        if isinstance(self.train_dataset, StreamBatches) and "epoch" in kwargs and "steps_in_epoch" in kwargs:
            self.train_dataset.set_epoch(kwargs["epoch"])  # also when resuming through a batch-skipping wrapper
            batches = self.train_dataset.epoch_batches(kwargs["epoch"])
            kwargs["steps_in_epoch"] = batches
            kwargs["num_update_steps_per_epoch"] = -(-batches // self.args.gradient_accumulation_steps)
        return super()._run_epoch(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """Ready batches in order, never re-sharded or re-shuffled by accelerate (streams are rank-aware)."""
        if self.train_dataset is None:
            raise ValueError("MemformerTrainer: training requires a train_dataset.")
        if isinstance(self.train_dataset, IterableStreamBatches):  # its position lives in this process: no workers
            return DataLoader(self.train_dataset, batch_size=1, collate_fn=collate_single,
                              pin_memory=self.args.dataloader_pin_memory)
        return _EpochLoader(self.train_dataset, batch_size=1, sampler=SequentialSampler(self.train_dataset),
                            collate_fn=collate_single, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Target tokens of the optimizer step (all GA micro-batches; summed over ranks when tokens are averaged
        across devices), counted on the packer's `shift_labels`."""
        if not batch_samples or "shift_labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(b["shift_labels"].ne(-100).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _wrap_model(self, model: torch.nn.Module, training: bool = True, dataloader: DataLoader | None = None):
        """As the Trainer's, never in `nn.DataParallel` (MRBP runs several backwards per step; DataParallel would
        split the cells across GPUs): several GPUs in one process train on the first one."""
        _one_gpu_per_process(self.args)
        return super()._wrap_model(model, training=training, dataloader=dataloader)

    # ------------------------------------------------------------------------------------------------ FSDP
    def create_accelerator_and_postprocess(self) -> None:
        """As the Trainer's; with FSDP2 mixed precision the memory stays in float32 (no cast of the forward inputs
        and outputs, docs/design.md#distributed) and gradients are accumulated and reduced in float32 across the
        window's backwards."""
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        policy = getattr(plugin, "mixed_precision_policy", None)
        if getattr(plugin, "fsdp_version", 1) == 2 and dataclasses.is_dataclass(policy) and policy.param_dtype:
            plugin.mixed_precision_policy = dataclasses.replace(
                policy, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=False)

    @staticmethod
    def _register_fsdp_methods(model: torch.nn.Module) -> None:
        """FSDP2 gathers a module's shards only around its `forward`; the decoder layers' cross K/V projection runs
        outside it (once per segment), so it is registered as a forward method of every sharded layer."""
        try:
            from torch.distributed.fsdp import register_fsdp_forward_method
        except ImportError:  # pragma: no cover - torch without FSDP2
            return
        for module in model.modules():
            if (isinstance(module, _fsdp_module_class()) and hasattr(module, "project_cross_kv")
                    and not getattr(module, "_memformer_fsdp_methods", False)):
                register_fsdp_forward_method(module, "project_cross_kv")
                module._memformer_fsdp_methods = True

    @staticmethod
    @contextlib.contextmanager
    def _full_parameters(model: torch.nn.Module) -> Iterator[None]:
        """Gather FSDP2-sharded parameters for a computation outside `forward` (a no-op otherwise)."""
        sharded = [m for m in model.modules() if isinstance(m, _fsdp_module_class())]
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """As the Trainer's. FSDP2 gives the model a subclass defined in torch (`FSDP<cls>`); saving under the
        model's own class keeps `save_pretrained`'s remote-code files and `auto_map` those of this package."""
        model = self.accelerator.unwrap_model(self.model)
        fsdp_module = _fsdp_module_class()
        if not isinstance(model, fsdp_module):
            return super()._save(output_dir, state_dict)
        sharded_cls = type(model)
        model.__class__ = next(c for c in sharded_cls.__mro__ if not issubclass(c, fsdp_module))
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = sharded_cls

    # ------------------------------------------------------------------------------------------------ training
    def _causal_lm(self) -> torch.nn.Module:
        """The `MemformerForCausalLM` inside accelerate's wrappers (DDP, torch.compile) and a peft `PeftModel`."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def carried_memory(self) -> CarriedMemory:
        """This rank's carried memory (`CarriedMemory`), laid out on the training streams."""
        store = self.__dict__.get("_carried_memory")
        if store is None:
            ds = self.train_dataset
            n = ds.streams_per_rank if isinstance(ds, STREAM_DATASETS) else 0
            rank = self.args.process_index
            store = self._carried_memory = CarriedMemory(first_stream=rank * n, num_streams=n, rank=rank)
        return store

    @property
    def _carry(self) -> torch.Tensor | None:
        """The carried memory tensor of this rank's streams (`carried_memory.memory`); None empties the store."""
        return self.carried_memory.memory

    @_carry.setter
    def _carry(self, value: torch.Tensor | None) -> None:
        self.carried_memory.memory = value

    def _initial_memory(self, streams: int, device: torch.device) -> torch.Tensor:
        """m₀ for `streams` streams (gathering FSDP2-sharded parameters for this call outside `forward`)."""
        with torch.no_grad(), self._full_parameters(self.accelerator.unwrap_model(self.model)):
            return self._causal_lm().model.initial_memory(streams).detach().clone().to(device)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._register_fsdp_methods(model)
        inputs = self._prepare_inputs(inputs)
        stream_ids = inputs["stream_ids"]
        memory = self.carried_memory.get(stream_ids, lambda n: self._initial_memory(n, stream_ids.device))
        args = self.args
        token_mean = args.mrbp_loss_weighting == "token_mean"
        if token_mean:
            if num_items_in_batch is None:
                num_items_in_batch = inputs["shift_labels"].ne(-100).sum() * self.current_gradient_accumulation_steps
            world = self.accelerator.num_processes if args.average_tokens_across_devices else 1
            loss_scale = float(world)
        else:  # per-cell mean losses: average over the GA micro-batches ourselves
            num_items_in_batch = None
            loss_scale = 1.0 / self.current_gradient_accumulation_steps
        scaler = getattr(self.accelerator, "scaler", None)
        acc = self.accelerator
        # Gradients are synchronised once per optimizer step: in the window's last backward of the step's last
        # micro-batch. Before other micro-batches every backward runs under one `no_sync` here (the Trainer's own is
        # not enough: accelerate's FSDP2 `no_sync` switches sync back on when the window's inner one exits).
        sync = acc.sync_gradients or acc.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        # DDP with graphed cells: the cells run on the bare module (a captured backward cannot drive DDP's reducer)
        # with DDP's sync off, and the step's gradients are averaged over the ranks here, once, as DDP would.
        ddp_graphs = isinstance(model, DistributedDataParallel) and graphed_cells_apply(model.module, inputs)
        with contextlib.nullcontext() if sync and not ddp_graphs else acc.no_sync(model):
            loss, new_memory = cells_backward(
                model.module if ddp_graphs else model, inputs, memory, mode=args.training_mode,
                loss_weighting=args.mrbp_loss_weighting, num_items_in_batch=num_items_in_batch, backward=acc.backward,
                no_sync=(lambda: acc.no_sync(model)) if sync and not ddp_graphs else None,
                context=self._cell_context, loss_scale=loss_scale,
                grad_scale=(scaler.get_scale if scaler is not None else None))
        if ddp_graphs and sync:
            average_gradients(model.module)
        self.carried_memory.put(stream_ids, new_memory)
        # for logging the Trainer averages over ranks: report this rank's share × world (like Trainer.compute_loss)
        return loss.detach() * loss_scale

    @contextlib.contextmanager
    def _cell_context(self) -> Iterator[None]:
        """Around every cell: the Trainer's loss context and accelerate's autocast. (accelerate applies mixed
        precision by wrapping the model's `forward` when it prepares the model; the graphed training cells call the
        model's parts directly, and a Trainer that only evaluates never prepares it.)"""
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            yield

    # ------------------------------------------------------------------------------------------------ evaluation
    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        """Not supported: per-example predictions do not fit a model that reads whole documents as streams."""
        raise NotImplementedError(
            "MemformerTrainer.predict is not supported: the model reads whole documents as streams. Use "
            "`trainer.evaluate(documents)` for perplexity (by position, memory carried), and `model(input_ids)` or "
            "`model.generate` for logits and text.")

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Perplexity with the memory carried through whole documents (and, optionally, reset every segment), by
        position in the document; plus what `compute_metrics` returns for the sums (`MemformerEvalPrediction`).
        The metrics are logged (`self.log`: the `report_to` loggers and the callbacks' `on_log`) and passed to the
        callbacks' `on_evaluate`, as the Trainer's `evaluate` does."""
        if isinstance(eval_dataset, str) and isinstance(self._eval_documents, dict):  # one of the named eval sets
            if eval_dataset not in self._eval_documents:
                raise ValueError(f"eval_dataset {eval_dataset!r} is not one of the trainer's eval sets "
                                 f"{list(self._eval_documents)}")
            eval_dataset = self._eval_documents[eval_dataset]
        documents = self._eval_documents if eval_dataset is None else _eval_documents(eval_dataset)
        if documents is None:
            raise ValueError("MemformerTrainer.evaluate needs eval documents (eval_dataset).")
        if isinstance(documents, dict):  # several eval sets, as in the Trainer: metrics prefixed with their names
            metrics = {}
            for key, docs in documents.items():
                metrics.update(self.evaluate(docs, ignore_keys, f"{metric_key_prefix}_{key}"))
            return metrics
        sums = self.evaluation_sums(documents)
        metrics = perplexity_metrics(sums, metric_key_prefix)
        if self.compute_metrics is not None:
            extra = denumpify_detensorize(self.compute_metrics(MemformerEvalPrediction(sums, metrics)) or {})
            for key, value in extra.items():
                metrics[key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"] = value
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluate_documents(self, documents: Sequence[Sequence[int]], metric_key_prefix: str = "eval"
                           ) -> dict[str, float]:
        """The perplexity metrics of `documents` (`perplexity_metrics`), without logging or callbacks."""
        return perplexity_metrics(self.evaluation_sums(documents), metric_key_prefix)

    @torch.no_grad()
    def evaluation_sums(self, documents: Sequence[Sequence[int]]) -> dict[str, PerplexitySums]:
        """Exact token sums over all documents (never a mean of batch means), summed over ranks, on the CPU, keyed by
        variant: `""` (memory carried through each document), with `eval_no_memory` `"_no_memory"` (memory reset at
        every segment) and with `eval_foreign_memory` `"_foreign_memory"` (each cell reads the memory that another
        stream of the batch carries into that cell, row r that of row r − 1: another document's; document starts still
        read m₀; nothing is carried from it). Each batch's sums are accumulated on the device; the host waits once, at the end."""
        args = self.args
        model = self.accelerator.unwrap_model(self.model) if self.is_in_train else self.model
        if not self.is_in_train:
            model = model.to(args.device)
        model.eval()
        self._register_fsdp_methods(model)
        ds = self._pack(list(documents), args, window=args.eval_window, batch_size=args.per_device_eval_batch_size,
                        grad_accum=1, shuffle=False)
        check_vocab(self._model_config.vocab_size, documents=ds, what="the eval documents")
        variants = {"": "carried"} | ({"_no_memory": "reset"} if args.eval_no_memory else {}) | (
            {"_foreign_memory": "foreign"} if args.eval_foreign_memory else {})
        sums = {suffix: PerplexitySums.zeros(args.device) for suffix in variants}
        memory = dict.fromkeys(variants)
        last_cell = None  # per row: the position in its document (in cells) of the previous batch's last cell
        edges = torch.tensor(POSITION_BUCKETS, device=args.device)
        bar = logging.tqdm(total=len(ds), desc="Evaluating", leave=not self.is_in_train, dynamic_ncols=True,
                           disable=args.disable_tqdm or not self.is_local_process_zero())
        for k in range(len(ds)):
            batch = {key: v.to(args.device) for key, v in ds[k].items()}
            B, T, L = batch["encoder_input_ids"].shape
            cell_pos, last_cell = _cell_positions(batch["memory_reset"], last_cell)  # true document starts
            position = cell_pos[:, :, None] * L + torch.arange(L, device=args.device)  # [B, T, L] in the document
            bucket = PerplexitySums.buckets(position, edges)
            labels = batch["shift_labels"].view(B, T, L)
            if "_foreign_memory" in variants and B < 2:
                raise ValueError("eval_foreign_memory needs at least 2 evaluation streams per device (another "
                                 "stream's memory); raise per_device_eval_batch_size.")
            carried_in: list[torch.Tensor | None] = []  # the memory each cell of the carried variant read
            for suffix, kind in variants.items():
                cells = {**batch, "memory_reset": torch.ones_like(batch["memory_reset"])} if kind == "reset" else batch
                nll = torch.empty(B, T, L, dtype=torch.float64, device=args.device)
                for t in range(T):
                    cell = cell_batch(cells, t)
                    cell.pop("shift_labels")
                    given = memory[suffix]
                    if kind == "foreign":
                        given = None if carried_in[t] is None else carried_in[t].roll(1, dims=0)
                    elif kind == "carried":
                        carried_in.append(given)
                    with self._cell_context():  # ids were checked when packed: no sync per cell
                        out = model(**cell, memory=given, validate_inputs=False)
                    if kind != "foreign":
                        memory[suffix] = out.memory
                    # rows of [B·L, V]: the vocabulary contiguous (over a [B, V, L] view CUDA's softmax takes ~60 ms
                    # per cell at V = 49k)
                    nll[:, t] = torch.nn.functional.cross_entropy(
                        out.logits.flatten(0, 1).float(), labels[:, t].flatten(), ignore_index=-100,
                        reduction="none").view_as(labels[:, t])
                sums[suffix].add(nll, labels.ne(-100), bucket)
            bar.update(1)
        bar.close()
        if self.is_in_train:
            model.train()
        return self._reduce_sums(sums)

    def _reduce_sums(self, sums: dict[str, PerplexitySums]) -> dict[str, PerplexitySums]:
        """Sum over ranks and move to the CPU, all variants in one tensor (one collective, one host sync)."""
        stacked = torch.stack([torch.stack([s.nll, s.tokens]) for s in sums.values()])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        stacked = stacked.cpu()
        return {suffix: PerplexitySums(row[0], row[1]) for suffix, row in zip(sums, stacked)}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint_extras(self, folder: str) -> None:
        """This rank's carried memory and stream layout (`stream_state-rank{r}.safetensors` / `.json`); for a streamed
        dataset the layout also holds its position, and `resume_from` is the earliest document in flight over all
        ranks (every rank calls this, so the minimum is gathered here)."""
        ds = self.train_dataset
        if isinstance(ds, StreamBatches):
            self.carried_memory.save(folder, ds.state_dict())
        elif isinstance(ds, IterableStreamBatches):
            state = ds.state_dict()
            if self.accelerator.num_processes > 1:
                points = self.accelerator.gather(torch.tensor([state["resume_from"]], device=self.args.device))
                state["resume_from"] = min(map(tuple, points.tolist()))
            self.carried_memory.save(folder, state)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """As the Trainer's. `resume_from_checkpoint`: a checkpoint folder or True (the last one in `output_dir`);
        a missing folder raises `FileNotFoundError`, and an unreadable (e.g. truncated) weights, optimizer or
        stream-state file an `OSError` that names it, before anything is loaded (`check_checkpoint`)."""
        if resume_from_checkpoint is True:
            if not os.path.isdir(self.args.output_dir) or get_last_checkpoint(self.args.output_dir) is None:
                raise FileNotFoundError(f"No checkpoint found in output_dir {self.args.output_dir} to resume from.")
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            check_checkpoint(str(resume_from_checkpoint))
        self._carried_memory = None  # laid out anew on the training streams
        self._rng_restore = None  # (a previous run's deferred random state is never applied to this one)
        if resume_from_checkpoint and isinstance(self.train_dataset, StreamBatches):
            ds = self.train_dataset
            self.carried_memory.load(resume_from_checkpoint, device=self.args.device,
                                     layout_matches=lambda s: ds.compatible_with(s, ignore=("epoch",)),
                                     same_streams=lambda s: ds.compatible_with(s, ignore=("epoch", *PER_RANK_KEYS))
                                     and s.get("streams_per_rank", 0) * s.get("world_size", 0) == ds.num_streams)
        if resume_from_checkpoint and isinstance(self.train_dataset, IterableStreamBatches):
            self._resume_stream(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _resume_stream(self, folder: str) -> None:
        """Restore a streamed dataset's position and the carries from a checkpoint (exact with the same layout; see
        `IterableStreamBatches.load_state_dict` otherwise)."""
        ds = self.train_dataset
        state = self.carried_memory.saved_layout(folder)
        if state is None or "position" not in state:
            raise ValueError(f"resume_from_checkpoint {folder}: the checkpoint holds no stream position "
                             f"({STREAM_STATE.format(rank=self.args.process_index)}.json of a streamed train_dataset); "
                             "it was not written by a streaming run")
        self.carried_memory.load(folder, device=self.args.device, layout_matches=ds.compatible_with)
        ds.load_state_dict(state)


def stream_layout(config: Any, args: MemformerTrainingArguments) -> dict[str, Any]:
    """The layout keywords of `StreamBatches` / `IterableStreamBatches` for a model config and the training arguments:
    segment length, window `mrbp_window`, per-device batch, gradient accumulation, world size, rank, BOS and pad ids
    (BOS when the config has no pad id), the boot mode and the decoder layout (`decoder_previous_segment`)."""
    return dict(segment_length=config.segment_length, window=args.mrbp_window,
                batch_size=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                world_size=args.world_size, rank=args.process_index, bos_token_id=config.bos_token_id,
                pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.bos_token_id,
                boot=config.first_segment_context,
                decoder_previous_segment=getattr(config, "decoder_previous_segment", False))


def _one_gpu_per_process(args: TrainingArguments) -> None:
    """Several GPUs visible to one non-distributed process: the Trainer would wrap the model in `nn.DataParallel`,
    which cannot run MRBP. Train on one GPU and say (once) how to use them all."""
    if args.n_gpu > 1 and args.world_size == 1:
        n = args.n_gpu
        args._n_gpu = 1
        logger.warning(f"{n} GPUs are visible but this is a single process: using {args.device} only. To use "
                       f"all of them run `torchrun --nproc_per_node {n} ...` or `accelerate launch --num_processes "
                       f"{n} ...` (DDP; FSDP with --fsdp).")


def check_checkpoint(folder: str) -> None:
    """Raise `FileNotFoundError` when `folder` is not a checkpoint folder, and an `OSError` naming the file when one
    of its safetensors files (weights, carried memory) does not parse or is shorter than its header says, or one of
    its torch files (optimizer, scheduler, scaler, RNG) is not a complete archive, e.g. after a crash or a truncated
    copy. Checks only headers and archive directories (cheap)."""
    import zipfile

    from safetensors import safe_open

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"resume_from_checkpoint {folder}: no such checkpoint folder")
    names = sorted(os.listdir(folder))
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        raise FileNotFoundError(f"resume_from_checkpoint {folder}: not a checkpoint folder (no model.safetensors)")
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):  # parses the header; checks that it covers the file
                    pass
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as z:
                    z.infolist()
        except Exception as e:  # noqa: BLE001 - any failure to read the header is the answer
            raise OSError(f"{path}: truncated or corrupted checkpoint file ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}); resume from another checkpoint") from e


def _fsdp_module_class() -> type | tuple:
    """torch's `FSDPModule` (the base of FSDP2-sharded modules), or `()` (matches nothing) without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return ()
    return FSDPModule


def _cell_positions(doc_start: torch.Tensor, last: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every cell in its document, counted in cells: `doc_start` [B, T] marks the cells where a document
    starts (or that are inactive), `last` [B] the position of the previous window's last cell (None: the first
    window). Returns the positions [B, T] and their last column."""
    T = doc_start.shape[1]
    t = torch.arange(T, device=doc_start.device)
    start = torch.where(doc_start, t, -1).cummax(dim=1).values  # the latest start at or before each cell
    carried = (torch.zeros_like(doc_start[:, 0], dtype=torch.long) if last is None else last)[:, None] + 1 + t
    pos = torch.where(start >= 0, t - start, carried)
    return pos, pos[:, -1]


def _is_streamed(data: Any) -> bool:
    """A `datasets.IterableDataset` (what `load_dataset(..., streaming=True)` returns)."""
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, IterableDataset)


def _check_streaming_args(ds: IterableStreamBatches, args: TrainingArguments) -> None:
    """A streamed train_dataset has no length: the run needs `max_steps`; its position lives in this process."""
    if args.max_steps <= 0:
        raise ValueError(f"MemformerTrainer: a streamed train_dataset ({type(ds).__name__}) has no length, so the "
                         f"number of epochs cannot be counted: set max_steps > 0 (got max_steps={args.max_steps}).")
    if args.dataloader_num_workers:
        raise ValueError(f"MemformerTrainer: a streamed train_dataset keeps its position in the main process; set "
                         f"dataloader_num_workers=0 (got {args.dataloader_num_workers}).")
    if ds.passes is not None and args.world_size > 1:
        raise ValueError(f"MemformerTrainer: IterableStreamBatches(passes={ds.passes}) under {args.world_size} "
                         "processes: the ranks would run out of batches at different steps; use passes=None "
                         "(endless, bounded by max_steps).")


def _eval_documents(data: Any) -> list[list[int]] | dict[str, list[list[int]]]:
    """The eval documents (`_as_documents`), or, for a dict of eval sets (a `DatasetDict` too), those of each set by
    name, as the Trainer evaluates a dict of datasets (metrics `eval_{name}_...`)."""
    if not isinstance(data, dict):
        return _as_documents(data, "eval_dataset")
    if "input_ids" in data:
        raise ValueError("eval_dataset: a dict is read as named eval sets, but this one has an `input_ids` key (a dict "
                         "of columns?); pass datasets.Dataset.from_dict(...) or a list of token-id lists.")
    if not data:
        raise ValueError("eval_dataset: an empty dict of eval sets.")
    return {key: _as_documents(docs, _eval_name(key)) for key, docs in data.items()}


def _eval_name(key: str | None) -> str:
    return "eval_dataset" if key is None else f"eval_dataset[{key!r}]"


def _named_eval_sets(documents: Any) -> list[tuple[str | None, list[list[int]]]]:
    """`(name, documents)` of each eval set (name None for a single one); none for None."""
    if documents is None:
        return []
    return list(documents.items()) if isinstance(documents, dict) else [(None, documents)]


def _as_documents(data: Any, name: str) -> list[list[int]]:
    """Tokenized documents from a list of token-id lists or a `datasets.Dataset` with an `input_ids` column (and
    optionally `attention_mask`, whose padding is dropped, and `labels`, which must equal the ids;
    `data_streams.document_ids`); ids that are not integers (e.g. 5.7, which `int` would truncate) are a `ValueError`
    naming the document. (A leading BOS is dropped where the documents are packed, `data_streams.StreamBatches`.)"""
    masks = labels = None
    if isinstance(data, dict) and hasattr(data, "column_names"):  # DatasetDict / IterableDatasetDict
        raise ValueError(f"{name}: a {type(data).__name__} of the splits {list(data)}; pass one split, e.g. "
                         f"{name}=dataset[{next(iter(data), 'train')!r}].")
    if _is_streamed(data):  # its columns may be unknown until read (`column_names` None): read its rows
        rows = list(data)
        missing = next((i for i, row in enumerate(rows) if "input_ids" not in row), None)
        if missing is not None:
            raise ValueError(f"{name}: a datasets.IterableDataset needs an `input_ids` column of tokenized documents; "
                             f"row {missing} has {sorted(rows[missing])}.")
        masks, labels = [r.get("attention_mask") for r in rows], [r.get("labels") for r in rows]
        data = [r["input_ids"] for r in rows]
    elif hasattr(data, "column_names"):
        if "input_ids" not in data.column_names:
            raise ValueError(f"{name}: a datasets.Dataset needs an `input_ids` column of tokenized documents; "
                             f"it has {data.column_names}.")
        masks = data["attention_mask"] if "attention_mask" in data.column_names else None
        labels = data["labels"] if "labels" in data.column_names else None
        data = data["input_ids"]
    elif not (isinstance(data, (list, tuple))
              and (not data or isinstance(data[0], (list, tuple, torch.Tensor, np.ndarray)))):
        raise ValueError(f"{name}: expected tokenized documents (a list of token-id lists or a datasets.Dataset with "
                         f"`input_ids`), got {type(data).__name__}.")
    return [document_ids(d, f"{name}: document {i}", None if masks is None else masks[i],
                         None if labels is None else labels[i]).tolist() for i, d in enumerate(data)]


__all__ = ["MemformerTrainer", "MemformerTrainingArguments", "CarriedMemory", "PerplexitySums",
           "MemformerEvalPrediction", "perplexity_metrics", "POSITION_BUCKETS", "check_checkpoint", "stream_layout"]
