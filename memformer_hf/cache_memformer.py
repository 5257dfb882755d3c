"""`MemformerCache`: the whole recurrent state of a Memformer stream, as a transformers `Cache`.

Per row it holds the memory slots, the decoder's cross-attention keys/values of the last complete segment, the
decoder self-attention keys/values of the current partial segment, the tokens of that partial segment and the
position inside it. Every tensor has a fixed size that never grows with the number of tokens consumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_memformer import MemformerConfig
from .memory import memory_bound

# Fields of the config that change the meaning of a cached state.
_FINGERPRINT_FIELDS = ("hidden_size", "decoder_layers", "num_attention_heads", "num_memory_slots", "segment_length",
                       "vocab_size", "first_segment_context", "position_embedding_type")


def _stamp(t: torch.Tensor | None) -> tuple | None:
    """Identity and in-place version of a tensor (inference tensors have no version counter: -1)."""
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return weakref.ref(t), version


def _same_stamp(t: torch.Tensor | None, stamp: tuple | None) -> bool:
    if t is None or stamp is None:
        return t is None and stamp is None
    return stamp[0]() is t and _stamp(t)[1] == stamp[1]


def config_fingerprint(config: MemformerConfig) -> str:
    """A short hash of the config fields that a cached state depends on (`decoder_reads_memory`,
    `cross_attention_rope` and `decoder_previous_segment` only when on, so that the fingerprints of the default
    configuration, and the states saved with them, are unchanged)."""
    fields = {k: getattr(config, k) for k in _FINGERPRINT_FIELDS}
    for option in ("decoder_reads_memory", "cross_attention_rope", "decoder_previous_segment"):
        if getattr(config, option, False):
            fields[option] = True
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def self_length(config: MemformerConfig) -> int:
    """Self-attention K/V positions per row and layer: L (the current segment), or 2L with `decoder_previous_segment`
    (the previous segment's prefix, then the current segment; docs/design.md#decoder-previous-segment)."""
    return config.segment_length * (2 if getattr(config, "decoder_previous_segment", False) else 1)


def cross_length(config: MemformerConfig) -> int:
    """Cross-attention keys per row: L (the encoder output), or L + K with `decoder_reads_memory` (and the memory)."""
    return config.segment_length + (config.num_memory_slots if getattr(config, "decoder_reads_memory", False) else 0)


class MemformerCacheLayer(CacheLayerMixin):
    """Decoder layer state: self-attention K/V of the current partial segment and cross-attention K/V of the last
    complete segment's encoder output (and, with `decoder_reads_memory`, of the memory after writing it). All four
    are [batch, heads, length, head_dim]: length segment_length, or L + K for the cross K/V with
    `decoder_reads_memory`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cross_keys: torch.Tensor | None = None
        self.cross_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = torch.zeros_like(key_states), torch.zeros_like(value_states)
        self.cross_keys, self.cross_values = torch.zeros_like(key_states), torch.zeros_like(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Memformer writes its state through `MemformerCache.set_layer_state`; the generic entry point is unused."""
        raise NotImplementedError("MemformerCacheLayer is written by the Memformer model, not through `update`.")

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.keys, self.values, self.cross_keys, self.cross_values]

    def set_tensors(self, tensors: list[torch.Tensor | None]) -> None:
        self.keys, self.values, self.cross_keys, self.cross_values = tensors
        self.is_initialized = self.keys is not None

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[-2]), 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.set_tensors([None, None, None, None])


class MemformerCache(Cache):
    """Recurrent state of Memformer streams, passed and returned as `past_key_values`.

    Row-wise fields (first dimension = batch):

    - `memory` [B, K, d] (float32, or float64 for a float64 model): the memory the next segment is encoded with.
    - per decoder layer (`layers[i]`): self K/V of the current partial segment [B, H, L, d_h] ([B, H, 2L, d_h]
      with `decoder_previous_segment`: the previous segment's prefix at [0, L), then the segment) and cross K/V of the
      last complete segment [B, H, C, d_h], C = L, or L + K with `decoder_reads_memory` (the encoder output, then
      the memory after writing that segment, docs/design.md#decoder-reads-memory).
    - `cross_mask` [B, C] bool: valid cross keys (the K memory keys are always valid).
    - `segment_ids` [B, L]: tokens of the current partial segment; `fill` [B]: how many of them there are.
    - `segment_embeds` [B, L, d] or None: the partial segment's input embeddings while some of its tokens came as
      `inputs_embeds` (their ids are unknown; `segment_ids` holds 0 there). Not part of a saved state.
    - `started` [B] bool: the row has consumed its boot segment.

    `consumed` counts input columns (pad columns included) fed since creation; it is what `get_seq_length()` returns,
    which is how `generate()` knows which columns are new. Memory writes cannot be undone, so `crop` is refused. A
    cache reordered during `generate()` (`reorder_cache`: beam search, also Hub `custom_generate` beam decoding) does
    not match the returned sequences and is marked stale (`mark_stale`): using or saving it raises until `reset()`.

    A state that comes from outside the model (`load_state`, `set_state`, a tensor assigned or modified in place) is
    checked once on its next use (`check_compatible`: one reduction, one host synchronisation) as `set_state` checks
    it, for NaN/inf, and its memory against `memory.memory_bound`; a state the model wrote itself (or that was
    checked since) is not, so decoding pays no synchronisation per token.
    """

    is_compileable = False
    _row_fields = ("memory", "cross_mask", "segment_ids", "fill", "started")

    def __init__(self, config: MemformerConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            raise ValueError("MemformerCache needs the model's MemformerConfig: `MemformerCache(model.config)`.")
        if not isinstance(config, PretrainedConfig) or getattr(config, "model_type", None) != "memformer":
            raise TypeError(f"MemformerCache needs the model's MemformerConfig (`model.config`), got "
                            f"{type(config).__name__}.")
        super().__init__(layers=[MemformerCacheLayer() for _ in range(config.decoder_layers)])
        self.config = config
        self.fingerprint = config_fingerprint(config)
        self.memory: torch.Tensor | None = None
        self.cross_mask: torch.Tensor | None = None
        self.segment_ids: torch.Tensor | None = None
        self.segment_embeds: torch.Tensor | None = None  # see the class docstring
        self.fill: torch.Tensor | None = None
        self.started: torch.Tensor | None = None
        self.consumed = 0
        self._host: tuple[list[bool], list[int]] | None = None  # host copy of (started, fill); None: read on demand
        self._written_in_place = False  # the tensors are this cache's own (the decoder step may update them in place)
        self._graph_buffers: list | None = None  # the model's decoder-graph buffers these tensors were made into
        self._trusted: list | None = None  # stamps of the tensors last written by the model (or verified finite)
        self._checked_config: MemformerConfig | None = None  # the config object last checked compatible
        self._stale: str | None = None  # why the state does not belong to the sequences it was returned with
        self.reorders = 0  # `reorder_cache` calls (generate() marks a cache reordered during it stale)

    # ----------------------------------------------------------------------------------------------- state access
    @property
    def is_empty(self) -> bool:
        return self.memory is None

    @property
    def batch_size(self) -> int:
        return -1 if self.memory is None else self.memory.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.memory is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @staticmethod
    def _names(num_layers: int) -> list[str]:
        """Names of the state tensors, in `_all_tensors` order (also the keys of a state file)."""
        return list(MemformerCache._row_fields) + [f"layers.{i}.{k}" for i in range(num_layers)
                                                   for k in ("keys", "values", "cross_keys", "cross_values")]

    def _all_tensors(self) -> list[torch.Tensor | None]:
        out = [getattr(self, name) for name in self._row_fields]
        for layer in self.layers:
            out.extend(layer.tensors())
        return out

    def _set_all_tensors(self, tensors: list[torch.Tensor | None]) -> None:
        self._host, self._written_in_place = None, False
        n = len(self._row_fields)
        for name, t in zip(self._row_fields, tensors[:n]):
            setattr(self, name, t)
        for i, layer in enumerate(self.layers):
            layer.set_tensors(list(tensors[n + 4 * i: n + 4 * i + 4]))
        self._trusted = None  # a state from outside: checked for NaN/inf on its next use

    def _map_rows(self, fn) -> None:
        trusted = self.is_trusted
        embeds = None if self.segment_embeds is None else fn(self.segment_embeds)
        self._set_all_tensors([None if t is None else fn(t) for t in self._all_tensors()])
        self.segment_embeds = embeds
        if trusted:  # a row permutation / repetition / detach of a checked state is still checked
            self._mark_trusted()

    # ------------------------------------------------------------------------------------- validation on entry
    def _mark_trusted(self) -> None:
        self._trusted = [_stamp(t) for t in self._all_tensors()]

    @property
    def is_trusted(self) -> bool:
        """The state is exactly what the model last wrote (or what was last checked finite): no tensor replaced or
        modified in place since. Costs no device synchronisation."""
        stamps = self._trusted
        return stamps is not None and all(_same_stamp(t, s) for t, s in zip(self._all_tensors(), stamps))

    def check_finite(self, dtype: torch.dtype | None = None) -> None:
        """Raise `ValueError` naming the field if the memory or a cached key/value holds NaN or inf, or (with the
        model's compute `dtype`) the memory holds values beyond `memory.memory_bound`, where the model's norms over it
        overflow, or the state is not one `set_state` would take (shapes, dtypes, `fill`, `segment_ids`). Skipped
        for a trusted state (`is_trusted`); otherwise one reduction over all tensors and one host synchronisation."""
        if self.is_empty or self.is_trusted:
            return
        tensors = dict(zip(self._names(len(self.layers)), self._all_tensors()))
        self._validate_state(tensors, self.config, "The cache", layout_only=True)  # as set_state: shapes, dtypes
        named = [(n, t) for n, t in tensors.items() if t.is_floating_point()]
        device = self.memory.device
        checks = [torch.isfinite(t).all().to(device) for _, t in named]
        limit = None
        if dtype is not None:
            limit, why = memory_bound(self.config.hidden_size, dtype)
            checks.append((self.memory.abs() <= limit).all().to(device))
        # the rest of what set_state checks, in the same reduction
        fill, started, ids = self.fill, self.started, self.segment_ids
        checks += [((fill >= 0) & (fill < self.config.segment_length)).all().to(device),
                   (started | (fill == 0)).all().to(device),
                   ((ids >= 0) & (ids < self.config.vocab_size)).all().to(device)]
        if not bool(torch.stack(checks).all()):
            bad = next((n for n, t in named if not bool(torch.isfinite(t).all())), None)
            if bad is not None:
                raise ValueError(f"The cache's {bad} contains NaN or inf values; start a new cache (or reset the "
                                 f"rows) instead of continuing from a broken state.")
            if limit is not None and not bool((self.memory.abs() <= limit).all()):
                raise ValueError(f"The cache's memory holds values beyond ±{limit:.3g}: {why} (NaN outputs); start "
                                 f"a new cache (or reset the rows) instead of continuing from this state.")
            self._validate_state(tensors, self.config, "The cache")  # names the field
        self._mark_trusted()

    def _match_model(self, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        """Move the state to `device` and cast the cached keys/values to the model's compute `dtype` (a float32
        state from `load_state` with a bf16 model); the memory keeps its own (float32/float64) dtype."""
        tensors = self._all_tensors()
        n = len(self._row_fields)
        out = []
        for i, t in enumerate(tensors):
            want_dtype = dtype if (i >= n and t is not None and t.is_floating_point()) else None
            if t is not None and ((device is not None and t.device != torch.device(device))
                                  or (want_dtype is not None and t.dtype != want_dtype)):
                t = t.to(device=device, dtype=want_dtype)
            out.append(t)
        embeds = self.segment_embeds
        if any(a is not b for a, b in zip(out, tensors)):
            self._set_all_tensors(out)  # a cast can overflow (float32 → fp16): checked again on use
        if embeds is not None:
            self.segment_embeds = embeds.to(device=device, dtype=dtype)

    def mark_stale(self, reason: str) -> None:
        """Refuse any further use of this state (forward, `save_state`) with `reason`, until `reset()`."""
        self._stale = reason

    def check_compatible(self, config: MemformerConfig, batch_size: int, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> None:
        """Raise a clear error if this cache cannot serve a forward of `batch_size` rows of a model with `config`;
        with `dtype` / `device` (the model calls it so at the start of a stream-mode forward), also bring the state
        to the model's device and compute dtype and check it for NaN/inf and its memory against the bound of that
        dtype (`check_finite`)."""
        if self._stale is not None:
            raise ValueError(self._stale)
        if config is not self._checked_config and self.fingerprint != config_fingerprint(config):
            raise ValueError("This MemformerCache was built for a different model configuration (fingerprint "
                             f"{self.fingerprint} != {config_fingerprint(config)}); start a new cache.")
        if self.memory is not None and self.memory.shape[0] != batch_size:
            raise ValueError(
                f"Memory batch size {self.memory.shape[0]} != input batch size {batch_size}. A filled cache is not "
                "expanded by generate(): call `cache.batch_repeat_interleave(n)` (num_return_sequences / num_beams) or "
                "`cache.batch_select_indices(idx)` first.")
        self._checked_config = config  # (hashing the config's fields on every decoded token costs more than the step)
        if self.memory is not None and (dtype is not None or device is not None):
            first = self.layers[0].keys
            if not (self.is_trusted and first is not None and (dtype is None or first.dtype == dtype)
                    and (device is None or first.device == torch.device(device))):
                self._match_model(dtype, device)
            self.check_finite(dtype)

    def set_state(self, *, memory, cross_mask, segment_ids, fill, started, self_kv, cross_kv) -> None:
        """Store a complete new state from outside the model (e.g. a custom decoder): it replaces every field,
        including the host copy of (started, fill) that the decode step reads. Refuses, as `load_state` does, a state
        whose shapes, dtypes or values do not fit the config (`ValueError` naming the field; the self K/V hold 2L
        positions with `decoder_previous_segment`)."""
        self_kv, cross_kv = list(self_kv), list(cross_kv)
        n = len(self.layers)
        if len(self_kv) != n or len(cross_kv) != n:
            raise ValueError(f"set_state: `self_kv` and `cross_kv` need one (K, V) pair per decoder layer ({n}), got "
                             f"{len(self_kv)} and {len(cross_kv)}.")
        tensors = [memory, cross_mask, segment_ids, fill, started] + [
            t for (k, v), (ck, cv) in zip(self_kv, cross_kv) for t in (k, v, ck, cv)]
        self._validate_state(dict(zip(self._names(n), tensors)), self.config, "set_state")
        self._set_all_tensors(tensors)  # (drops the host copy of started/fill and the in-place ownership)
        self.segment_embeds = None

    def host_state(self) -> tuple[list[bool], list[int]]:
        """(started, fill) per row as Python lists, without a device sync when the last write supplied them."""
        if self._host is None:
            self._host = (self.started.tolist(), self.fill.tolist())
        return self._host

    def write(self, *, memory: torch.Tensor, segment_ids: torch.Tensor, fill: torch.Tensor, started: torch.Tensor,
              decoder_state: tuple | None, dtype: torch.dtype, host: tuple[list[bool], list[int]] | None = None,
              segment_embeds: torch.Tensor | None = None) -> None:
        """Commit what one forward produced (the model calls this; nothing else writes the state).

        memory [B, K, d], segment_ids [B, L] (the partial segment's tokens), fill [B], started [B] (the rows that
        have consumed their boot segment after this forward: a row reset without tokens is not). `decoder_state` = (rows [R], per-layer self (K, V) [R, H, ≤L, d_h], per-layer cross (K, V)
        [R, H, C, d_h], cross mask [R, C]; C = L, or L + K with `decoder_reads_memory`) for the rows whose decoder advanced; other rows keep theirs. The
        self K/V are zero-padded to L positions (2L with `decoder_previous_segment`). Tensors are replaced, not written in place, so autograd history
        (a forward with gradients) is kept."""
        b, L = segment_ids.shape
        S = self_length(self.config)
        if self.is_empty:
            zeros = torch.zeros(b, self.config.num_attention_heads, S, self.config.head_dim, dtype=dtype,
                                device=memory.device)
            C = cross_length(self.config)
            cross = zeros if C == S else torch.zeros(b, self.config.num_attention_heads, C, self.config.head_dim,
                                                     dtype=dtype, device=memory.device)
            self.cross_mask = torch.zeros(b, C, dtype=torch.bool, device=memory.device)
            self.started = torch.zeros(b, dtype=torch.bool, device=memory.device)
            for layer in self.layers:
                layer.set_tensors([zeros, zeros, cross, cross])
        if decoder_state is not None:
            rows, self_kv, cross_kv, cross_mask = decoder_state

            def fit(t: torch.Tensor) -> torch.Tensor:
                if t.shape[2] < S:
                    t = torch.nn.functional.pad(t, (0, 0, 0, S - t.shape[2]))
                return t[:, :, :S].to(dtype)

            for layer, (k, v), (ck, cv) in zip(self.layers, self_kv, cross_kv):
                layer.set_tensors([layer.keys.index_copy(0, rows, fit(k)), layer.values.index_copy(0, rows, fit(v)),
                                   layer.cross_keys.index_copy(0, rows, ck.to(dtype)),
                                   layer.cross_values.index_copy(0, rows, cv.to(dtype))])
            self.cross_mask = self.cross_mask.index_copy(0, rows, cross_mask)
        self.memory, self.segment_ids, self.fill = memory, segment_ids, fill
        self.segment_embeds = segment_embeds  # [B, L, d] while a partial segment holds `inputs_embeds` tokens
        self.started = started
        self._host, self._written_in_place = host, False
        self._mark_trusted()  # the model's own state: no NaN/inf check (and no host sync) on the next forward

    def __deepcopy__(self, memo: dict) -> MemformerCache:
        """An independent copy (to branch a stream); tensors are cloned without their autograd history."""
        new = MemformerCache(self.config)
        new._set_all_tensors([None if t is None else t.detach().clone() for t in self._all_tensors()])
        new.segment_embeds = None if self.segment_embeds is None else self.segment_embeds.detach().clone()
        new.consumed, new._stale = self.consumed, self._stale
        if self.is_trusted:
            new._mark_trusted()
        return new

    def detach_(self) -> MemformerCache:
        """Cut the autograd history of every tensor (in place); returns self."""
        self._map_rows(lambda t: t.detach())
        return self

    # ------------------------------------------------------------------------------------ Cache API for generate()
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.consumed

    def get_max_length(self, *args: Any, **kwargs: Any) -> int:
        return -1

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        return -1

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.consumed, 0

    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("MemformerCache is written by the Memformer model, not through `update`.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every per-row tensor follows its hypothesis."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self.reorders += 1

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def crop(self, max_length: int) -> None:
        if max_length != 0 and max_length != self.consumed:
            raise ValueError("MemformerCache cannot be cropped: memory writes are irreversible (assisted decoding, "
                             "prompt lookup and other rollback strategies are not supported).")

    def reset(self) -> None:
        self._set_all_tensors([None] * len(self._all_tensors()))
        self.segment_embeds = None
        self.consumed = 0
        self._stale = None

    def reset_rows(self, rows: torch.Tensor | list[bool]) -> None:
        """Mark rows (bool mask [B], or a list of B bools) as not started: their next token begins a new document
        from the initial memory (a row that has not started holds no partial segment: its fill is 0)."""
        if self.started is not None:
            if not torch.is_tensor(rows):
                rows = torch.tensor([bool(r) for r in rows], dtype=torch.bool)
            if rows.shape != self.started.shape:
                raise ValueError(f"reset_rows: the mask must have shape (batch,) = ({self.started.shape[0]},), got "
                                 f"{tuple(rows.shape)} (one flag per row, not row indices).")
            trusted = self.is_trusted
            rows = rows.to(self.started.device).bool()
            self.started = self.started & ~rows
            self.fill = self.fill.masked_fill(rows, 0)
            self._host = None
            if trusted:
                self._mark_trusted()

    def activate_past_recording(self) -> None:  # nothing to record: rollback is not supported
        return None

    def offload(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prefetch(self, *args: Any, **kwargs: Any) -> None:
        return None

    def early_initialization(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemformerCache(batch_size={self.batch_size}, consumed={self.consumed})"

    # ------------------------------------------------------------------------------------------------- persistence
    def save_state(self, path: str) -> None:
        """Save the state to a safetensors file (memory is a portable artifact: chats, long-running streams)."""
        from safetensors.torch import save_file

        if self.memory is None:
            raise ValueError("Cannot save an empty MemformerCache (it has not consumed any token).")
        if self._stale is not None:
            raise ValueError(self._stale)
        if self.segment_embeds is not None:
            raise ValueError("Cannot save this MemformerCache: its partial segment holds tokens given as "
                             "`inputs_embeds`, whose ids are unknown. Save it at a segment boundary, or feed "
                             "`input_ids`.")
        names = self._names(len(self.layers))
        tensors = {n: t.detach().contiguous().cpu() for n, t in zip(names, self._all_tensors())}
        save_file(tensors, path, metadata={"consumed": str(self.consumed), "fingerprint": self.fingerprint,
                                           "format": "memformer-cache-v1"})

    @classmethod
    def load_state(cls, path: str, config: MemformerConfig, device: torch.device | str | None = None
                   ) -> MemformerCache:
        """Load a state written by `save_state`. Refuses, with a `ValueError` naming the field, a state from a
        different configuration and a damaged or crafted one: missing/extra tensors, wrong shapes or dtypes, fill
        outside [0, segment_length), token ids outside the vocabulary, a row not started with a partial segment,
        NaN/inf values."""
        from safetensors import SafetensorError, safe_open

        cache = cls(config)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not a MemformerCache state file (save_state writes one "
                                    f"safetensors file).")
        names = cls._names(config.decoder_layers)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "memformer-cache-v1":
                    raise ValueError(f"{path} is not a MemformerCache state file (missing format metadata).")
                if meta.get("fingerprint") != cache.fingerprint:
                    raise ValueError(f"{path} was saved from a different Memformer configuration "
                                     f"({meta.get('fingerprint')} != {cache.fingerprint}).")
                stored = set(f.keys())
                missing, extra = [n for n in names if n not in stored], sorted(stored - set(names))
                if missing or extra:
                    raise ValueError(f"{path}: not a complete MemformerCache state (missing tensors {missing[:6]}, "
                                     f"unexpected tensors {extra[:6]}).")
                tensors = {n: f.get_tensor(n) for n in names}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}).") from e
        consumed = meta.get("consumed", "")
        if not consumed.isdigit():
            raise ValueError(f"{path}: metadata `consumed`={consumed!r} is not a non-negative integer.")
        cls._validate_state(tensors, config, path)
        values = [tensors[n] for n in names]
        if device is not None:
            values = [t.to(device) for t in values]
        cache._set_all_tensors(values)
        cache.consumed = int(consumed)
        return cache

    @staticmethod
    def _validate_state(tensors: dict[str, torch.Tensor], config: MemformerConfig, source: str,
                        layout_only: bool = False) -> None:
        """Raise `ValueError` naming the field unless `tensors` (by `_names`) form a consistent state for `config`;
        `layout_only`: only the shapes and dtypes (no host sync)."""
        L, K, d = config.segment_length, config.num_memory_slots, config.hidden_size

        def bad(name: str, expected: str, got: Any) -> ValueError:
            return ValueError(f"{source}: `{name}` must be {expected}, got {got}.")

        missing = next((name for name, t in tensors.items() if not torch.is_tensor(t)), None)
        if missing is not None:
            raise bad(missing, "a tensor", type(tensors[missing]).__name__)
        memory = tensors["memory"]
        b = memory.shape[0] if memory.dim() == 3 else -1
        if b < 1 or tuple(memory.shape[1:]) != (K, d) or not memory.is_floating_point():
            raise bad("memory", f"a float tensor (batch ≥ 1, num_memory_slots={K}, hidden_size={d})",
                      f"{memory.dtype} {tuple(memory.shape)}")
        C = cross_length(config)
        kinds = {"cross_mask": ((b, C), "bool"), "segment_ids": ((b, L), "int"), "fill": ((b,), "int"),
                 "started": ((b,), "bool")}
        kv_shape = (b, config.num_attention_heads, self_length(config), config.head_dim)
        cross_shape = (b, config.num_attention_heads, C, config.head_dim)
        for name in tensors:
            if name.startswith("layers."):
                kinds[name] = (cross_shape if name.endswith(("cross_keys", "cross_values")) else kv_shape, "float")
        for name, (shape, kind) in kinds.items():
            t = tensors[name]
            ok_dtype = {"bool": t.dtype == torch.bool, "float": t.is_floating_point(),
                        "int": not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool}[kind]
            if tuple(t.shape) != shape or not ok_dtype:
                raise bad(name, f"a {kind} tensor of shape {shape}", f"{t.dtype} {tuple(t.shape)}")
        if layout_only:
            return
        for name in ["memory"] + [n for n in tensors if n.startswith("layers.")]:
            if not bool(torch.isfinite(tensors[name]).all()):
                raise bad(name, "finite", "NaN or inf values")
        fill, started, ids = tensors["fill"], tensors["started"], tensors["segment_ids"]
        if bool(((fill < 0) | (fill >= L)).any()):
            raise bad("fill", f"in [0, segment_length={L})", fill.tolist())
        if bool((~started & (fill != 0)).any()):
            row = int((~started & (fill != 0)).nonzero()[0, 0])
            raise ValueError(f"{source}: inconsistent `started`/`fill`: row {row} has not started but fill="
                             f"{int(fill[row])} (a row that has not started holds no partial segment).")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
            raise bad("segment_ids", f"token ids in [0, vocab_size={config.vocab_size})",
                      f"ids in [{int(ids.min())}, {int(ids.max())}]")


__all__ = ["MemformerCache", "MemformerCacheLayer", "config_fingerprint", "cross_length", "self_length"]
