"""Safetensors-only, all-or-nothing `from_pretrained`, shared by the Memformer and MemBART model classes.

Loading refuses:

- pickle weights (`pytorch_model*.bin`, `*.pt`, ...): unpickling can run arbitrary code;
- a safetensors index (`model.safetensors.index.json`, or the config's `transformers_weights`) whose `weight_map`
  names a shard that is not a plain `*.safetensors` file of the checkpoint folder (a `.bin` shard would be
  unpickled, a `../x.safetensors` shard would be read from outside the folder);
- a truncated or corrupted safetensors file (an `OSError` naming the file);
- a checkpoint whose tensor names do not match the model (missing or unexpected keys), unless `strict=False`:
  transformers would re-initialise the missing weights at random and return a partly loaded model;
- a tensor of another shape than the model's, unless `ignore_mismatched_sizes=True` (an error naming the tensors, their
  shapes and the file, where transformers' own names neither).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig
from transformers.utils import logging
from transformers.utils.hub import cached_file

logger = logging.get_logger(__name__)

SAFETENSORS_ONLY = ("Memformer and MemBART load safetensors checkpoints only (unpickling a checkpoint can run arbitrary code). "
                    "Convert a trusted pickle once: load its state dict with torch.load(path, weights_only=True) "
                    "into the model, then save_pretrained() it.")
_INDEX_NAME = "model.safetensors.index.json"


def refuse_pickle_checkpoint(path: str) -> None:
    """Raise `OSError` for a local pickle checkpoint: a weights file that is not safetensors, or a folder with
    `pytorch_model*.bin` weights and no `model*.safetensors` (transformers would fall back to unpickling them)."""
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise OSError(f"{path} is not a safetensors file: {SAFETENSORS_ONLY}")
    if os.path.isdir(path):
        names = os.listdir(path)
        if not any(n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
            pickles = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
            if pickles:
                raise OSError(f"{path} holds {', '.join(pickles)} but no model.safetensors: {SAFETENSORS_ONLY}")


def unreadable_safetensors(path: str | None) -> str | None:
    """The first local `*.safetensors` weights file under `path` (a folder or a file) whose header does not parse
    or does not cover the file; None when none is found locally (e.g. a Hub id)."""
    if path is None:
        return None
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    else:
        return None
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open is the answer
            return file
    return None


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' naming of a variant file: `model.safetensors.index.json` → `model.safetensors.index.fp16.json`."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _checkpoint_file(source: str, name: str, kwargs: dict[str, Any]) -> str | None:
    """Local path of the file `name` of the checkpoint `source` (a folder or a Hub id; `subfolder`, `revision` and
    the download options of `kwargs` apply), or None when the checkpoint has no such file or cannot be reached
    (`from_pretrained` then reports that itself)."""
    return cached_file(
        source, name, cache_dir=kwargs.get("cache_dir"), force_download=kwargs.get("force_download", False),
        proxies=kwargs.get("proxies"), token=kwargs.get("token"), revision=kwargs.get("revision"),
        local_files_only=kwargs.get("local_files_only", False), subfolder=kwargs.get("subfolder") or "",
        _raise_exceptions_for_gated_repo=False, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False)


def _is_plain_safetensors_name(name: Any, allow_index: bool = False) -> bool:
    """A bare file name (no folder, no `..`, not absolute) of a safetensors file (or index)."""
    suffixes = (".safetensors", ".safetensors.index.json") if allow_index else (".safetensors",)
    return (isinstance(name, str) and name.endswith(suffixes) and not name.startswith(".")
            and "/" not in name and "\\" not in name and not os.path.isabs(name))


def check_safetensors_index(path: str) -> None:
    """Raise `OSError` naming `path` unless it is a safetensors index whose `weight_map` names only plain
    `*.safetensors` files of the checkpoint folder."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: unreadable safetensors index ({e}).") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OSError(f"{path}: not a safetensors index (no `weight_map` of tensor names to shard files).")
    bad = sorted({repr(v) for v in weight_map.values() if not _is_plain_safetensors_name(v)})
    if bad:
        shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise OSError(f"{path}: the weight_map names shard files {shown} that are not `*.safetensors` files in the "
                      f"checkpoint's own folder (no folders, no `..`, no pickle `.bin` shards). {SAFETENSORS_ONLY}")


def _explicit_weights_name(source: str, kwargs: dict[str, Any]) -> str | None:
    """The config's `transformers_weights` (a weights file name transformers loads instead of the default)."""
    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        return getattr(config, "transformers_weights", None)
    if config is None:
        path = _checkpoint_file(source, "config.json", kwargs)
    elif os.path.isfile(str(config)):
        path = str(config)
    elif os.path.isdir(str(config)):
        path = os.path.join(str(config), "config.json")
    else:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, TypeError, ValueError):  # no config here: the config loader reports it
        return None
    return data.get("transformers_weights") if isinstance(data, dict) else None


def check_safetensors_checkpoint(source: str, kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is loaded, a checkpoint that would make transformers unpickle a file or read one
    outside the checkpoint folder: pickle weights, a config `transformers_weights` that is not a safetensors file
    of the folder, a safetensors index naming such a shard."""
    subfolder = kwargs.get("subfolder") or ""
    refuse_pickle_checkpoint(os.path.join(source, subfolder) if subfolder else source)
    if os.path.isfile(source) or os.path.isfile(os.path.join(subfolder, source)):
        return  # a single weights file (a safetensors one, as checked above)
    explicit = _explicit_weights_name(source, kwargs)
    indexes = [_with_variant(_INDEX_NAME, kwargs.get("variant"))]
    if explicit is not None:
        if not _is_plain_safetensors_name(explicit, allow_index=True):
            raise OSError(f"{source}: the config's transformers_weights={explicit!r} is not a `*.safetensors` file "
                          f"(or `*.safetensors.index.json`) in the checkpoint's own folder. {SAFETENSORS_ONLY}")
        if explicit.endswith(".index.json"):
            indexes.append(explicit)
    for name in indexes:
        path = _checkpoint_file(source, name, kwargs)
        if path is not None:
            check_safetensors_index(path)


def _weights_description(source: str | None, kwargs: dict[str, Any]) -> str:
    """Where the weights came from, for error messages: the local weights files, else the source."""
    if kwargs.get("state_dict") is not None:
        return "the given state_dict"
    subfolder = kwargs.get("subfolder") or ""
    path = os.path.join(source, subfolder) if source is not None and subfolder else source
    if path is not None and os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".safetensors.index.json")))
        if names:
            return ", ".join(os.path.join(path, n) for n in names)
    return str(path)


def _key_list(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")


def safetensors_only_from_pretrained(cls: type, load: Callable[..., Any], pretrained_model_name_or_path: Any,
                                     *model_args: Any, **kwargs: Any):
    """`PreTrainedModel.from_pretrained` (`load`, the bound parent method of `cls`) restricted to safetensors weights
    and to checkpoints that match the model exactly. Pass `strict=False` to accept missing/unexpected keys (the
    missing ones are freshly initialised, as transformers does). A caller that asks for the loading report
    (`output_loading_info=True`) or passes its own `state_dict` gets transformers' behaviour (the report lists the
    mismatch, and a warning says it) unless it passes `strict=True`."""
    source = None if pretrained_model_name_or_path is None else str(pretrained_model_name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    strict = kwargs.pop("strict", None)
    want_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    if strict is None:
        strict = not want_info and kwargs.get("state_dict") is None
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"{cls.__name__}.from_pretrained: use_safetensors=False is not supported; this model "
                         f"loads safetensors weights only.")
    if source is not None and kwargs.get("state_dict") is None and kwargs.get("gguf_file") is None:
        check_safetensors_checkpoint(source, kwargs)
        kwargs["use_safetensors"] = True
    try:
        model, info = load(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                           ignore_mismatched_sizes=True, **kwargs)  # shape mismatches are reported below
    except SafetensorError as e:
        path = os.path.join(source, subfolder) if source is not None and subfolder else source
        bad = unreadable_safetensors(path)
        raise OSError(f"{bad or f'a safetensors weights file of {source}'}: truncated or corrupted safetensors "
                      f"file ({e}); re-download or re-save the checkpoint.") from e
    except OSError as e:
        if "use_safetensors" not in str(e):
            raise
        raise OSError(f"{source} has no model.safetensors (or model.safetensors.index.json): "
                      f"{SAFETENSORS_ONLY}") from e
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched and not ignore_mismatched:
        shapes = "; ".join(f"{k}: {tuple(ckpt)} in the checkpoint, {tuple(own)} in the model"
                           for k, ckpt, own in mismatched[:8]) + (f" (and {len(mismatched) - 8} more)"
                                                                 if len(mismatched) > 8 else "")
        raise OSError(f"{_weights_description(source, kwargs)}: the checkpoint's tensor shapes do not match "
                      f"{cls.__name__} ({shapes}). It was saved from a different configuration; refusing to return a "
                      f"partly loaded model (pass ignore_mismatched_sizes=True to load it anyway, with those weights "
                      f"freshly initialised).")
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    if strict and (missing or unexpected):
        problems = ([f"missing {_key_list(missing)}"] if missing else []) + \
                   ([f"unexpected {_key_list(unexpected)}"] if unexpected else [])
        raise OSError(f"{_weights_description(source, kwargs)}: the checkpoint's tensor names do not match "
                      f"{cls.__name__} ({'; '.join(problems)}). The file is corrupted or was saved from a different "
                      f"model or configuration; refusing to return a partly loaded model (pass strict=False to load "
                      f"it anyway, with the missing weights freshly initialised).")
    if missing or unexpected:
        logger.warning(f"{_weights_description(source, kwargs)} does not match {cls.__name__}: missing "
                       f"{_key_list(missing) or 'none'}; unexpected {_key_list(unexpected) or 'none'} (the missing "
                       f"weights are freshly initialised).")
    return (model, info) if want_info else model


__all__ = ["SAFETENSORS_ONLY", "check_safetensors_checkpoint", "check_safetensors_index", "refuse_pickle_checkpoint",
           "safetensors_only_from_pretrained", "unreadable_safetensors"]
