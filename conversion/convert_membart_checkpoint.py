"""Convert an original MemBART checkpoint (qywu/memformers) into a transformers v5 folder.

Inputs: the original ``pytorch_model.bin`` (as published for ``qywu/membart-base`` / ``qywu/membart-large``), a TorchFly
training state ``*_model_state.pth`` (keys prefixed ``model.recurrent_training_cell.cell.``) or a ``.safetensors``
file, plus the original ``config.json``. Output: ``model.safetensors``, ``config.json`` (with ``auto_map``),
``generation_config.json`` and the remote-code files ``configuration_membart.py`` / ``modeling_membart.py``, loadable
with ``AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True)``.

Pickles are read with ``torch.load(..., weights_only=True)``: arbitrary objects are never unpickled. The key set and
every shape are checked against a model built from the config; partial loads are refused unless ``--allow_partial``.

Usage::

    python conversion/convert_membart_checkpoint.py --checkpoint membart-base/pytorch_model.bin \\
        --config membart-base/config.json --output_dir membart-base-v5 [--dtype float32] [--tokenizer_dir bart-base]
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

try:
    from memformer_hf.configuration_membart import MEMBART_GENERATION_KEYS, MemBartConfig
    from memformer_hf.modeling_membart import MemBartForConditionalGeneration, MemBartModel
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from memformer_hf.configuration_membart import MEMBART_GENERATION_KEYS, MemBartConfig
    from memformer_hf.modeling_membart import MemBartForConditionalGeneration, MemBartModel

TORCHFLY_PREFIX = "model.recurrent_training_cell.cell."
TIED_KEYS = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
SHARED_KEY = "model.shared.weight"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# Keys of an original config.json that describe the saving run, not the architecture.
_CONFIG_DROP = (
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "auto_map",
    "id2label",
    "label2id",
    "num_labels",
    "gradient_checkpointing",
    "pretrained_name",
    "task_specific_params",
)


class ConversionError(Exception):
    """A conversion problem with a one-line, user-facing message."""


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_config(config_path: Path) -> tuple[MemBartConfig, dict[str, Any]]:
    """Read an original MemBART ``config.json``; return the v5 config and the generation parameters found in it."""
    if not config_path.is_file():
        raise ConversionError(f"config file not found: {config_path}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{config_path} is not a valid JSON config ({_first_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_path} is not a config.json (top level is not an object)")
    model_type = raw.get("model_type")
    if model_type not in (None, "", "bart", "membart"):
        raise ConversionError(f"{config_path}: model_type {model_type!r} is not a MemBART (BART-based) config")
    if "memory_len" not in raw:
        raise ConversionError(f"{config_path} has no `memory_len`: not a MemBART config")
    generation = {k: raw[k] for k in MEMBART_GENERATION_KEYS if raw.get(k) is not None}
    kwargs = {k: v for k, v in raw.items() if k not in _CONFIG_DROP and k not in MEMBART_GENERATION_KEYS}
    try:
        config = MemBartConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{config_path}: invalid MemBART config ({_first_line(exc)})") from exc
    return config, generation


def load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.bin``/``.pth`` (``weights_only=True``) or ``.safetensors``; unwrap a nested state dict."""
    if not checkpoint.is_file():
        raise ConversionError(f"checkpoint file not found: {checkpoint}")
    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(checkpoint))
        else:
            obj = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise ConversionError(
                f"{checkpoint} holds pickled objects other than tensors; refusing to unpickle them (weights_only=True)"
            ) from exc
        raise ConversionError(f"{checkpoint} is not a PyTorch/safetensors checkpoint ({_first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable checkpoint"
        raise ConversionError(
            f"{checkpoint} is not a PyTorch/safetensors checkpoint, or holds objects other than tensors "
            f"({_first_line(exc)})"
        ) from exc
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{checkpoint} does not contain a state dict of tensors")
    return dict(obj)


def normalize_keys(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Strip the TorchFly prefix, prefix a bare ``MemBartModel`` state dict with ``model.``, add ``final_logits_bias``
    (zeros) if missing and drop the tied copies (``lm_head`` and encoder/decoder ``embed_tokens``) after checking
    that they equal ``model.shared.weight``; without ``model.shared.weight``, a stored copy becomes it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(TORCHFLY_PREFIX):
            key = "model." + key[len(TORCHFLY_PREFIX) :]
        out[key] = value
    if not any(k.startswith("model.") for k in out) and "shared.weight" in out:
        out = {f"model.{k}": v for k, v in out.items()}
    if "final_logits_bias" not in out:
        out["final_logits_bias"] = torch.zeros(1, vocab_size)
    source = SHARED_KEY if SHARED_KEY in out else next((k for k in TIED_KEYS if k in out), None)
    if source is None:
        return out
    shared = out[SHARED_KEY] = out[source]  # MemBART ties them: any stored copy is the shared embedding
    for key in TIED_KEYS:
        tied = out.get(key)
        if tied is None:
            continue
        if tied.shape != shared.shape or not torch.equal(tied, shared):
            raise ConversionError(f"{key} differs from {source}; MemBART ties them, so this checkpoint is not one")
        del out[key]
    return out


def check_state_dict(
    state_dict: dict[str, torch.Tensor], config: MemBartConfig
) -> tuple[list[str], list[str], list[str]]:
    """Compare against a model built from ``config`` (on the meta device): (missing, unexpected, mismatches of shape
    or of kind: a floating-point tensor of the model stored as integers or booleans in the checkpoint)."""
    with torch.device("meta"):
        reference = MemBartForConditionalGeneration(config)
    expected = {k: v for k, v in reference.state_dict().items() if k not in TIED_KEYS}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = []
    for k in sorted(set(expected) & set(state_dict)):
        got, want = state_dict[k], expected[k]
        if tuple(got.shape) != tuple(want.shape):
            mismatched.append(f"{k}: checkpoint {tuple(got.shape)} vs config {tuple(want.shape)}")
        elif want.is_floating_point() and not got.is_floating_point():
            mismatched.append(f"{k}: checkpoint dtype {got.dtype} vs a floating-point parameter")
    return missing, unexpected, mismatched


def build_generation_config(config: MemBartConfig, generation: dict[str, Any]) -> Any:
    """Generation defaults: the special ids of the config plus the generation keys of the original config.json."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        **generation,
    )


def convert(
    checkpoint: Path,
    config_path: Path,
    output_dir: Path,
    dtype: str = "float32",
    allow_partial: bool = False,
    tokenizer_dir: Path | None = None,
    verify: bool = True,
) -> Path:
    """Convert ``checkpoint`` + ``config_path`` into a v5 folder at ``output_dir``; return ``output_dir``."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    config, generation = load_config(config_path)
    state_dict = normalize_keys(load_state_dict(checkpoint), config.vocab_size)
    missing, unexpected, mismatched = check_state_dict(state_dict, config)
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        print(f"{title} keys ({len(items)}): {items if items else 'none'}")
    if mismatched:
        raise ConversionError(f"{len(mismatched)} tensors do not match the config's shapes or dtypes, e.g. "
                              f"{mismatched[0]}")
    if (missing or unexpected) and not allow_partial:
        raise ConversionError(
            f"partial checkpoint: {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"(first: {(missing + unexpected)[0]}); pass --allow_partial to convert anyway"
        )

    if missing:  # allowed partial load: real init for the missing tensors
        model = MemBartForConditionalGeneration(config)
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in unexpected}, strict=False)
    else:
        with torch.device("meta"):
            model = MemBartForConditionalGeneration(config)
        model.load_state_dict({k: v for k, v in state_dict.items() if k not in unexpected}, strict=False, assign=True)
    model.tie_weights()
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ConversionError(f"internal error: tensors left uninitialised: {on_meta[:5]}")
    model = model.to(DTYPES[dtype]).eval()
    model.generation_config = build_generation_config(config, generation)

    MemBartConfig.register_for_auto_class()
    MemBartModel.register_for_auto_class("AutoModel")
    MemBartForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
    model.config.auto_map = {
        "AutoConfig": "configuration_membart.MemBartConfig",
        "AutoModel": "modeling_membart.MemBartModel",
        "AutoModelForSeq2SeqLM": "modeling_membart.MemBartForConditionalGeneration",
    }
    model.config.architectures = ["MemBartForConditionalGeneration"]
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))

    if tokenizer_dir is not None:
        copied = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
        for name in copied:
            shutil.copy2(tokenizer_dir / name, output_dir / name)
        print(f"tokenizer files copied: {copied if copied else 'none found in ' + str(tokenizer_dir)}")

    if verify:
        reloaded = MemBartForConditionalGeneration.from_pretrained(str(output_dir), dtype=DTYPES[dtype])
        source = model.state_dict()
        worst = max((reloaded.state_dict()[k].float() - v.float()).abs().max().item() for k, v in source.items())
        if worst != 0.0:
            raise ConversionError(f"saved weights differ from the converted ones after reload (max abs diff {worst})")
        print("verified: reloaded weights are identical")
    print(f"saved {output_dir}")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert an original MemBART checkpoint to a transformers v5 folder.")
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="pytorch_model.bin, *_model_state.pth or .safetensors"
    )
    parser.add_argument("--config", required=True, type=Path, help="the original config.json")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--allow_partial", action="store_true", help="convert even with missing/unexpected keys")
    parser.add_argument("--tokenizer_dir", type=Path, default=None, help="local BART tokenizer files to copy")
    parser.add_argument("--no_verify", action="store_true", help="skip the reload-and-compare check")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (errors print one ``error: ...`` line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        convert(
            args.checkpoint,
            args.config,
            args.output_dir,
            dtype=args.dtype,
            allow_partial=args.allow_partial,
            tokenizer_dir=args.tokenizer_dir,
            verify=not args.no_verify,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
