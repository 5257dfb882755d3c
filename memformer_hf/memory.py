"""The memory of Memformer: where it is read, written and forgotten.

* `MemoryReader`: every encoder layer's tokens attend to the K memory slots (read).
* `MemoryWriter`: once per segment, each slot attends to itself and to the segment's final encoder states (write).
* `BiasedMemoryNorm`: add the per-slot forgetting vector and L2-normalise each slot (forget); it also gives the
  initial memory m0 = normalize(forgetting vector).
* `MemoryPredictor`: an optional training aid beyond the paper (`memory_prediction_loss`): the memory a cell reads
  predicts the bag of words of the text the cell's decoder predicts.

The memory is replayed for exact back-propagation through time in `mrbp.py`; the carried state lives in
`cache_memformer.MemformerCache`. Formulas and the choices made where the paper is ambiguous: `docs/design.md`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_memformer import MemformerConfig


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision for softmax/loss; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def memory_bound(hidden_size: int, compute_dtype: torch.dtype) -> tuple[float, str]:
    """(the largest |value| a memory [.., K, hidden_size] from outside the model may hold when read by a model
    computing in `compute_dtype`, why). The memory is held and written in float32 (float64 for a float64 model): the
    readers' `memory_kv_norm` sums d squared deviations of it and the writer's Biased Memory Normalization d squares,
    so beyond sqrt(max / d) / 2 (the bound of `inputs_embeds`) they can overflow (NaN outputs). A float16 model casts
    the memory to float16 for its readers: at most float16's largest value. Memories the model writes are unit
    vectors (BMN), far inside."""
    dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    limit = (torch.finfo(dtype).max / hidden_size) ** 0.5 / 2
    if compute_dtype.is_floating_point and torch.finfo(compute_dtype).max < limit:
        name = str(compute_dtype).removeprefix("torch.")
        return torch.finfo(compute_dtype).max, f"the readers cast the memory to the model's {name}, where they would be inf"
    return limit, (f"the sums of its squares in the memory's norms (the readers' `memory_kv_norm`, the writer's "
                   f"Biased Memory Normalization) would overflow {str(dtype).removeprefix('torch.')}")


class MemoryReader(nn.Module):
    """Tokens attend to the K memory slots (every encoder layer; no mask, no positions). docs/design.md."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        d, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.dropout = config.attention_dropout

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, L, d] (already normalised), memory [N, K, d] → output [N, L, d], attention [N, H, L, K]."""
        n, q, _ = hidden.shape
        memory = memory.to(self.k_proj.weight.dtype) if not torch.is_autocast_enabled() else memory
        query = self.q_proj(hidden).view(n, q, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(memory).view(n, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(memory).view(n, -1, self.num_heads, self.head_dim).transpose(1, 2)
        probs = torch.softmax(at_least_fp32(query @ key.transpose(-1, -2)) * self.head_dim ** -0.5, dim=-1)
        probs = F.dropout(probs.to(value.dtype), p=self.dropout, training=self.training)
        out = (probs @ value).transpose(1, 2).reshape(n, q, -1)
        return self.o_proj(out), probs


class BiasedMemoryNorm(nn.Module):
    """Biased Memory Normalization (docs/design.md): m ← (m' + v_bias) / ‖m' + v_bias‖₂ per slot, and the initial memory
    m₀ = v_bias / ‖v_bias‖₂. The forgetting vector v_bias is owned by the writer (`writer.forget_bias`)."""

    def __init__(self, config: MemformerConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.use_forget_bias = config.use_forget_bias
        self.eps = eps

    def initial_memory(self, forget_bias: torch.Tensor) -> torch.Tensor:
        """m₀ = v / ‖v‖₂ per slot, a unit vector for every nonzero row however short (ε is not applied: each row is
        first divided by its largest |entry|, so its squared norm cannot underflow); a zero row has no direction
        and gives (1, ..., 1) / √d."""
        peak = forget_bias.abs().amax(dim=-1, keepdim=True)
        unit = F.normalize(forget_bias / torch.where(peak > 0, peak, 1), dim=-1)
        return torch.where(peak > 0, unit, forget_bias.shape[-1] ** -0.5)

    def forward(self, memory: torch.Tensor, forget_bias: torch.Tensor) -> torch.Tensor:
        if self.use_forget_bias:
            memory = memory + forget_bias
        return memory / memory.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class MemoryWriter(nn.Module):
    """Slot-attention memory writer on the final encoder output (docs/design.md).

    Slot i attends to itself and to the segment's valid tokens (never to other slots), with temperature τ; the
    self value is the raw slot and there is no output projection by default, so a slot whose attention stays on
    itself is unchanged before BMN. Runs in at least float32."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.memory_write_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d) if config.writer_out_proj else None
        self.forget_bias = nn.Parameter(torch.empty(config.num_memory_slots, d))
        self.log_temperature = (nn.Parameter(torch.tensor(math.log(config.memory_write_temperature)))
                                if config.learnable_temperature else None)
        self.self_bias = (nn.Parameter(torch.full((config.num_memory_slots,), float(config.memory_write_self_bias)))
                          if config.memory_write_self_bias is not None else None)
        self.temperature = config.memory_write_temperature
        self.qk_norm = config.memory_write_qk_norm
        self.norm = BiasedMemoryNorm(config)
        self.dropout = config.attention_dropout

    def initial_memory(self, dtype: torch.dtype) -> torch.Tensor:
        """m₀ [K, d], rebuilt from the parameter on every call so that it stays in the autograd graph."""
        return self.norm.initial_memory(self.forget_bias.to(dtype))

    def _linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)` in x's dtype (≥ fp32): a plain Linear's weights are cast; a wrapped projection (e.g. a peft
        LoRA layer, which is no `nn.Linear`) is called, so that its adapter applies."""
        if isinstance(layer, nn.Linear):
            return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))
        return layer(x)

    def forward(self, memory: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [N, K, d] (≥ fp32), hidden [N, L, d], mask [N, L] bool → new memory, attention [N, H_w, K, 1+L]
        (column 0 is the slot's own entry)."""
        dtype = memory.dtype
        with torch.autocast(device_type=memory.device.type, enabled=False):
            hidden = hidden.to(dtype)
            n, k, _ = memory.shape
            split = lambda x: x.view(n, -1, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
            q = split(self._linear(self.q_proj, memory))
            k_self = split(self._linear(self.k_proj, memory))
            k_tok, v_tok = split(self._linear(self.k_proj, hidden)), split(self._linear(self.v_proj, hidden))
            # exp in the writer's dtype: a float16 parameter's exp underflows to 0 below ~6e-8 (scores inf, memory NaN)
            tau = self.log_temperature.to(dtype).exp() if self.log_temperature is not None else self.temperature
            if self.qk_norm:  # cosine scores: the sharpness is 1/tau whatever the scale of slots and tokens
                q, k_self, k_tok = (F.normalize(x, dim=-1, eps=1e-6) for x in (q, k_self, k_tok))
                scale = 1.0 / tau
            else:
                scale = 1.0 / (math.sqrt(self.head_dim) * tau)
            self_score = (q * k_self).sum(-1, keepdim=True) * scale  # [N, H, K, 1]
            if self.self_bias is not None:
                self_score = self_score + self.self_bias.to(dtype)[:, None]
            tok_score = (q @ k_tok.transpose(-1, -2)) * scale  # [N, H, K, L]
            if mask is not None:
                tok_score = tok_score.masked_fill(~mask[:, None, None, :], torch.finfo(dtype).min)
            probs = torch.softmax(torch.cat([self_score, tok_score], dim=-1), dim=-1)
            probs = F.dropout(probs, p=self.dropout, training=self.training)
            m_heads = split(memory)
            new = probs[..., :1] * m_heads + probs[..., 1:] @ v_tok
            new = new.transpose(1, 2).reshape(n, k, -1)
            if self.out_proj is not None:
                new = self._linear(self.out_proj, new)
            return self.norm(new, self.forget_bias.to(dtype)), probs


class MemoryPredictor(nn.Module):
    """The `memory_prediction_loss` head (beyond the paper, docs/design.md#memory-prediction-loss): each slot of a
    memory M [N, K, d] gives a unigram distribution softmax(lm_head(P m_k)) over the vocabulary; their mixture
    (1/K) Σ_k scores the tokens the cell's decoder predicts. Returns the summed NLL of the labelled tokens."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, memory: torch.Tensor, lm_head: nn.Module, shift_labels: torch.Tensor) -> torch.Tensor:
        """memory [N, K, d], shift_labels [N, n] (-100: not scored) → summed NLL (a scalar, float32 or wider)."""
        states = self.proj(memory.to(self.proj.weight.dtype) if not torch.is_autocast_enabled() else memory)
        log_probs = torch.log_softmax(at_least_fp32(lm_head(states)), dim=-1)  # [N, K, V]
        mixture = torch.logsumexp(log_probs, dim=1) - math.log(memory.shape[1])  # [N, V]
        scored = shift_labels != -100
        picked = mixture.gather(1, shift_labels.clamp_min(0))
        return -(picked * scored).sum()


__all__ = ["MemoryReader", "MemoryWriter", "BiasedMemoryNorm", "MemoryPredictor", "at_least_fp32", "memory_bound"]
