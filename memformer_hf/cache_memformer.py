"""`MemformerCache`: the whole recurrent state of a Memformer stream, as a transformers `Cache`.

Per row it holds the memory slots, the decoder's cross-attention keys/values of the last complete segment, the
decoder self-attention keys/values of the current partial segment, the tokens of that partial segment and the
position inside it. Every tensor has a fixed size that never grows with the number of tokens consumed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .configuration_memformer import MemformerConfig

# Fields of the config that change the meaning of a cached state.
_FINGERPRINT_FIELDS = ("hidden_size", "decoder_layers", "num_attention_heads", "num_memory_slots", "segment_length",
                       "vocab_size", "first_segment_context", "position_embedding_type")


def config_fingerprint(config: MemformerConfig) -> str:
    """A short hash of the config fields that a cached state depends on."""
    payload = json.dumps({k: getattr(config, k) for k in _FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class MemformerCacheLayer(CacheLayerMixin):
    """Decoder layer state: self-attention K/V of the current partial segment and cross-attention K/V of the last
    complete segment's encoder output. All four are [batch, heads, segment_length, head_dim]."""

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
    - per decoder layer (`layers[i]`): self K/V of the current partial segment and cross K/V of the last complete
      segment, each [B, H, L, d_h].
    - `cross_mask` [B, L] bool: valid cross keys.
    - `segment_ids` [B, L]: tokens of the current partial segment; `fill` [B]: how many of them there are.
    - `started` [B] bool: the row has consumed its boot segment.

    `consumed` counts input columns (pad columns included) fed since creation; it is what `get_seq_length()` returns,
    which is how `generate()` knows which columns are new. Memory writes cannot be undone, so `crop` is refused.
    """

    is_compileable = False
    _row_fields = ("memory", "cross_mask", "segment_ids", "fill", "started")

    def __init__(self, config: MemformerConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            raise ValueError("MemformerCache needs the model's MemformerConfig: `MemformerCache(model.config)`.")
        super().__init__(layers=[MemformerCacheLayer() for _ in range(config.decoder_layers)])
        self.config = config
        self.fingerprint = config_fingerprint(config)
        self.memory: torch.Tensor | None = None
        self.cross_mask: torch.Tensor | None = None
        self.segment_ids: torch.Tensor | None = None
        self.fill: torch.Tensor | None = None
        self.started: torch.Tensor | None = None
        self.consumed = 0
        self._host: tuple[list[bool], list[int]] | None = None  # host copy of (started, fill); None: read on demand
        self._written_in_place = False  # the tensors are this cache's own (the decoder step may update them in place)

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

    def _map_rows(self, fn) -> None:
        self._set_all_tensors([None if t is None else fn(t) for t in self._all_tensors()])

    def check_compatible(self, config: MemformerConfig, batch_size: int) -> None:
        """Raise a clear error if this cache cannot serve a forward of `batch_size` rows of a model with `config`."""
        if self.fingerprint != config_fingerprint(config):
            raise ValueError("This MemformerCache was built for a different model configuration (fingerprint "
                             f"{self.fingerprint} != {config_fingerprint(config)}); start a new cache.")
        if self.memory is not None and self.memory.shape[0] != batch_size:
            raise ValueError(
                f"Memory batch size {self.memory.shape[0]} != input batch size {batch_size}. A filled cache is not "
                "expanded by generate(): call `cache.batch_repeat_interleave(n)` (num_return_sequences / num_beams) or "
                "`cache.batch_select_indices(idx)` first.")

    def set_state(self, *, memory, cross_mask, segment_ids, fill, started, self_kv, cross_kv) -> None:
        """Store a complete new state (used by the model after each forward)."""
        self.memory, self.cross_mask, self.segment_ids, self.fill, self.started = (
            memory, cross_mask, segment_ids, fill, started)
        for layer, (k, v), (ck, cv) in zip(self.layers, self_kv, cross_kv):
            layer.set_tensors([k, v, ck, cv])

    def host_state(self) -> tuple[list[bool], list[int]]:
        """(started, fill) per row as Python lists, without a device sync when the last write supplied them."""
        if self._host is None:
            self._host = (self.started.tolist(), self.fill.tolist())
        return self._host

    def write(self, *, memory: torch.Tensor, segment_ids: torch.Tensor, fill: torch.Tensor, booted: torch.Tensor,
              decoder_state: tuple | None, dtype: torch.dtype, host: tuple[list[bool], list[int]] | None = None
              ) -> None:
        """Commit what one forward produced (the model calls this; nothing else writes the state).

        memory [B, K, d], segment_ids [B, L] (the partial segment's tokens), fill [B], booted [B] (rows that started
        in this forward). `decoder_state` = (rows [R], per-layer self (K, V) [R, H, ≤L, d_h], per-layer cross (K, V)
        [R, H, L, d_h], cross mask [R, L]) for the rows whose decoder advanced; other rows keep theirs. The
        self K/V are zero-padded to L positions. Tensors are replaced, not written in place, so autograd history
        (a forward with gradients) is kept."""
        b, L = segment_ids.shape
        if self.is_empty:
            zeros = torch.zeros(b, self.config.num_attention_heads, L, self.config.head_dim, dtype=dtype,
                                device=memory.device)
            self.cross_mask = torch.zeros(b, L, dtype=torch.bool, device=memory.device)
            self.started = torch.zeros(b, dtype=torch.bool, device=memory.device)
            for layer in self.layers:
                layer.set_tensors([zeros, zeros, zeros, zeros])
        if decoder_state is not None:
            rows, self_kv, cross_kv, cross_mask = decoder_state

            def fit(t: torch.Tensor) -> torch.Tensor:
                if t.shape[2] < L:
                    t = torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[2]))
                return t[:, :, :L].to(dtype)

            for layer, (k, v), (ck, cv) in zip(self.layers, self_kv, cross_kv):
                layer.set_tensors([layer.keys.index_copy(0, rows, fit(k)), layer.values.index_copy(0, rows, fit(v)),
                                   layer.cross_keys.index_copy(0, rows, ck.to(dtype)),
                                   layer.cross_values.index_copy(0, rows, cv.to(dtype))])
            self.cross_mask = self.cross_mask.index_copy(0, rows, cross_mask)
        self.memory, self.segment_ids, self.fill = memory, segment_ids, fill
        self.started = self.started | booted
        self._host, self._written_in_place = host, False

    def __deepcopy__(self, memo: dict) -> MemformerCache:
        """An independent copy (to branch a stream); tensors are cloned without their autograd history."""
        new = MemformerCache(self.config)
        new._set_all_tensors([None if t is None else t.detach().clone() for t in self._all_tensors()])
        new.consumed = self.consumed
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
        self.consumed = 0

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Mark rows (bool mask [B]) as not started: their next token begins a new document from the initial memory."""
        if self.started is not None:
            self.started = self.started & ~rows.to(self.started.device).bool()
            self._host = None

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
        names = list(self._row_fields) + [f"layers.{i}.{k}" for i in range(len(self.layers))
                                          for k in ("keys", "values", "cross_keys", "cross_values")]
        tensors = {n: t.detach().contiguous().cpu() for n, t in zip(names, self._all_tensors())}
        save_file(tensors, path, metadata={"consumed": str(self.consumed), "fingerprint": self.fingerprint,
                                           "format": "memformer-cache-v1"})

    @classmethod
    def load_state(cls, path: str, config: MemformerConfig, device: torch.device | str | None = None
                   ) -> MemformerCache:
        """Load a state written by `save_state`; refuses a state from a different configuration."""
        from safetensors import safe_open

        cache = cls(config)
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "memformer-cache-v1":
                raise ValueError(f"{path} is not a MemformerCache state file (missing format metadata).")
            if meta.get("fingerprint") != cache.fingerprint:
                raise ValueError(f"{path} was saved from a different Memformer configuration "
                                 f"({meta.get('fingerprint')} != {cache.fingerprint}).")
            names = list(cls._row_fields) + [f"layers.{i}.{k}" for i in range(config.decoder_layers)
                                             for k in ("keys", "values", "cross_keys", "cross_values")]
            tensors = [f.get_tensor(n) for n in names]
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        cache._set_all_tensors(tensors)
        cache.consumed = int(meta["consumed"])
        return cache


__all__ = ["MemformerCache", "MemformerCacheLayer", "config_fingerprint"]
