"""PyTorch MemBART: the authors' memory-augmented BART (github qywu/memformers), ported to transformers v5.

Architecture (faithful to the reference code at commit 4575d14):

* post-LN BART encoder/decoder with learned absolute positions (offset 2);
* K memory slots travel explicitly between steps. At the start of a step the memory is renormalised,
  ``M0 = LayerNorm((1 - reset) * M + memory_bias)`` (a reset row therefore equals a fresh start);
* every encoder layer runs one joint "fusion" attention over ``[memory; tokens]``: tokens use ``{q,k,v,out}_proj``,
  memory uses ``mem_{q,k,v,out}_proj``; memory slot i sees only itself among the slots plus all non-pad tokens, tokens
  see every slot and every non-pad token. The memory stream then has its own post-LN residual blocks and FFN;
* a gate per slot, ``a = sigmoid(W2 GELU(W1 M_L))``, gives the new memory ``a * M_L + (1 - a) * M0``;
* the encoder output is ``[new memory; tokens]`` and the decoder cross-attends to all of it.

Two bugs of the reference ``forward`` are fixed: the LM forward no longer reads ``memory_states`` from a ``None``
``encoder_outputs``, and the decoder's cross-attention mask is the encoder mask padded with K ones for the memory.

Memory in/out: ``memory_states`` (``(batch, memory_len, d_model)``, ``None`` = fresh) and ``memory_resets``
(``(batch,)`` bool) go in; the updated ``memory_states`` come out in the encoder output and in the model output.
``generate`` is standard seq2seq generation (the encoder output carries the memory);
[`MemBartForConditionalGeneration.generate_turn`] threads memory across dialogue turns.

Module names reproduce the original state-dict keys exactly, so original checkpoints load without renaming
(``conversion/convert_membart_checkpoint.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, ModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils import logging

from .configuration_membart import MemBartConfig
from .modeling_memformer import CACHE_KWARG  # the cache field of model outputs: `cache` from transformers 5.24 on
from .safe_loading import safetensors_only_from_pretrained

try:  # transformers >= 5.x: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _hf_init
except ImportError:  # pragma: no cover - older releases
    _hf_init = None

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# init helpers (no-ops on tensors that a checkpoint already filled)
# ----------------------------------------------------------------------------------------------------------------------
def _is_loaded(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, "_is_hf_initialized", False))


def _normal_(tensor: torch.Tensor, std: float) -> None:
    if _hf_init is not None:
        _hf_init.normal_(tensor, mean=0.0, std=std)
    elif not _is_loaded(tensor):
        nn.init.normal_(tensor, mean=0.0, std=std)


def _zeros_(tensor: torch.Tensor) -> None:
    if _hf_init is not None:
        _hf_init.zeros_(tensor)
    elif not _is_loaded(tensor):
        nn.init.zeros_(tensor)


def _ones_(tensor: torch.Tensor) -> None:
    if _hf_init is not None:
        _hf_init.ones_(tensor)
    elif not _is_loaded(tensor):
        nn.init.ones_(tensor)


# ----------------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MemBartEncoderOutput(BaseModelOutput):
    """Encoder output. ``last_hidden_state`` is ``[new memory; tokens]`` of shape ``(batch, K + seq_len, d_model)``.

    Args:
        memory_states: the updated memory ``(batch, memory_len, d_model)`` to pass to the next step.
        encoder_attention_mask: bool ``(batch, K + seq_len)`` mask over ``last_hidden_state`` (memory always visible).
    """

    memory_states: torch.FloatTensor | None = None
    encoder_attention_mask: torch.Tensor | None = None


@dataclass
class MemBartSeq2SeqModelOutput(Seq2SeqModelOutput):
    """[`Seq2SeqModelOutput`] plus the updated ``memory_states``."""

    memory_states: torch.FloatTensor | None = None


@dataclass
class MemBartSeq2SeqLMOutput(Seq2SeqLMOutput):
    """[`Seq2SeqLMOutput`] plus the updated ``memory_states``."""

    memory_states: torch.FloatTensor | None = None


@dataclass
class MemBartTurnOutput(ModelOutput):
    """Result of [`MemBartForConditionalGeneration.generate_turn`].

    Args:
        sequences: generated token ids ``(batch * num_return_sequences, length)``.
        memory_states: memory after reading this turn's input; pass it to the next turn.
        generate_output: the full ``generate`` output when ``return_dict_in_generate=True``.
    """

    sequences: torch.LongTensor | None = None
    memory_states: torch.FloatTensor | None = None
    generate_output: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Shift ids one position to the right, prepend ``decoder_start_token_id`` and replace -100 by the pad id."""
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1].clone()
    shifted[:, 0] = decoder_start_token_id
    shifted.masked_fill_(shifted == -100, pad_token_id)
    return shifted


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" mask -> additive float mask (0 or the dtype's minimum), as in BART."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class MemBartLearnedPositionalEmbedding(nn.Embedding):
    """BART's learned absolute positions: ``num_positions + 2`` rows, position p uses row ``p + 2``."""

    def __init__(self, num_positions: int, embedding_dim: int) -> None:
        self.offset = 2
        super().__init__(num_positions + self.offset, embedding_dim)

    def forward(self, seq_len: int, past_length: int = 0) -> torch.Tensor:  # type: ignore[override]
        """Position embeddings ``(seq_len, d)`` for positions ``past_length .. past_length + seq_len - 1``."""
        if past_length + seq_len > self.num_embeddings - self.offset:
            raise ValueError(
                f"MemBART: sequence of {past_length + seq_len} positions exceeds max_position_embeddings="
                f"{self.num_embeddings - self.offset}"
            )
        positions = torch.arange(past_length, past_length + seq_len, dtype=torch.long, device=self.weight.device)
        return super().forward(positions + self.offset)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention on ``(batch, heads, len, head_dim)`` tensors (``query`` already scaled).

    Computed with ``bmm`` on contiguous ``(batch * heads, len, head_dim)`` tensors in the same order as the reference
    BART code, which keeps the port bit-for-bit close to the original. Returns (output, weights) with output
    ``(batch, heads, q_len, head_dim)`` and weights ``(batch, heads, q_len, kv_len)``.
    """
    bsz, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    query = query.contiguous().view(bsz * heads, q_len, head_dim)
    key = key.contiguous().view(bsz * heads, kv_len, head_dim)
    value = value.contiguous().view(bsz * heads, kv_len, head_dim)
    weights = torch.bmm(query, key.transpose(1, 2))
    if mask is not None:
        weights = (weights.view(bsz, heads, q_len, kv_len) + mask).view(bsz * heads, q_len, kv_len)
    weights = F.softmax(weights, dim=-1)
    probs = F.dropout(weights, p=dropout, training=training)
    output = torch.bmm(probs, value).view(bsz, heads, q_len, head_dim)
    return output, weights.view(bsz, heads, q_len, kv_len)


# ----------------------------------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------------------------------
class MemBartEncoderAttention(nn.Module):
    """Joint "fusion" attention over ``[memory; tokens]`` with separate projections for the memory rows."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.mem_k_proj = nn.Linear(embed_dim, embed_dim)
        self.mem_v_proj = nn.Linear(embed_dim, embed_dim)
        self.mem_q_proj = nn.Linear(embed_dim, embed_dim)
        self.mem_out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, memory_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (token output, memory output, attention weights over ``[memory; tokens]``)."""
        bsz, mem_len = memory_states.shape[:2]
        query = torch.cat([self.mem_q_proj(memory_states), self.q_proj(hidden_states)], dim=1) * self.scaling
        key = torch.cat([self.mem_k_proj(memory_states), self.k_proj(hidden_states)], dim=1)
        value = torch.cat([self.mem_v_proj(memory_states), self.v_proj(hidden_states)], dim=1)
        output, weights = _attend(
            self._heads(query), self._heads(key), self._heads(value), attention_mask, self.dropout, self.training
        )
        output = output.transpose(1, 2).reshape(bsz, -1, self.embed_dim)
        return self.out_proj(output[:, mem_len:]), self.mem_out_proj(output[:, :mem_len]), weights


class MemBartEncoderLayer(nn.Module):
    """Post-LN BART encoder layer whose attention also reads/writes the memory, plus the memory stream's blocks."""

    def __init__(self, config: MemBartConfig) -> None:
        super().__init__()
        self.embed_dim = config.d_model
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.self_attn = MemBartEncoderAttention(
            self.embed_dim, config.encoder_attention_heads, config.attention_dropout
        )
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.fc1 = nn.Linear(self.embed_dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)
        self.mem_self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.mem_fc1 = nn.Linear(self.embed_dim, config.encoder_ffn_dim)
        self.mem_fc2 = nn.Linear(config.encoder_ffn_dim, self.embed_dim)
        self.mem_final_layer_norm = nn.LayerNorm(self.embed_dim)

    def _block(
        self,
        x: torch.Tensor,
        attn_out: torch.Tensor,
        ln1: nn.LayerNorm,
        fc1: nn.Linear,
        fc2: nn.Linear,
        ln2: nn.LayerNorm,
    ) -> torch.Tensor:
        x = ln1(x + F.dropout(attn_out, p=self.dropout, training=self.training))
        h = F.dropout(self.activation_fn(fc1(x)), p=self.activation_dropout, training=self.training)
        h = F.dropout(fc2(h), p=self.dropout, training=self.training)
        return ln2(x + h)

    def forward(
        self, hidden_states: torch.Tensor, memory_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (tokens, memory, fusion attention weights)."""
        attn_out, mem_out, weights = self.self_attn(hidden_states, memory_states, attention_mask)
        hidden_states = self._block(
            hidden_states, attn_out, self.self_attn_layer_norm, self.fc1, self.fc2, self.final_layer_norm
        )
        memory_states = self._block(
            memory_states, mem_out, self.mem_self_attn_layer_norm, self.mem_fc1, self.mem_fc2, self.mem_final_layer_norm
        )
        return hidden_states, memory_states, weights


class UpdateGate(nn.Module):
    """Per-slot scalar write gate ``sigmoid(dense2(GELU(dense(M))))`` (module name as in the original)."""

    def __init__(self, input_dim: int, inner_dim: int, pooler_dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(input_dim, inner_dim)
        self.dropout = pooler_dropout
        self.dense2 = nn.Linear(inner_dim, 1)
        self.act_fn = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.act_fn(self.dense(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        return torch.sigmoid(self.dense2(hidden_states))


class MemBartEncoder(nn.Module):
    """MemBART encoder: BART embeddings + ``encoder_layers`` [`MemBartEncoderLayer`] + memory normalisation and gate."""

    def __init__(self, config: MemBartConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.memory_len = config.memory_len
        embed_dim = config.d_model
        self.embed_scale = math.sqrt(embed_dim) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim, config.pad_token_id)
        self.embed_positions = MemBartLearnedPositionalEmbedding(config.max_position_embeddings, embed_dim)
        self.layers = nn.ModuleList([MemBartEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(embed_dim)
        self.memory_layer_norm = nn.LayerNorm(embed_dim)
        self.memory_bias = nn.Parameter(torch.zeros(1, config.memory_len, embed_dim))
        self.memory_gate_net = UpdateGate(embed_dim, embed_dim, pooler_dropout=config.dropout)
        self.gradient_checkpointing = False

    def construct_memory(self, batch_size: int) -> torch.Tensor:
        """The memory of a fresh start: zeros ``(batch_size, memory_len, d_model)`` (as in the original)."""
        return self.memory_bias.new_zeros(batch_size, self.memory_len, self.memory_bias.shape[-1])

    def _fusion_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``(batch, 1, K + L, K + L)`` mask: slot i sees slot i and tokens; tokens see slots and tokens."""
        k = self.memory_len
        allowed = attention_mask[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1).clone()
        allowed[:, :, :k, :k] = torch.eye(k, dtype=torch.bool, device=allowed.device)
        return _additive_mask(allowed, dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        memory_states: torch.FloatTensor | None = None,
        memory_resets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MemBartEncoderOutput | tuple:
        """Read one step into memory.

        Args:
            input_ids / inputs_embeds: the step's tokens ``(batch, seq_len)`` (exactly one of them).
            memory_states: carried memory ``(batch, memory_len, d_model)``; ``None`` starts fresh.
            memory_resets: ``(batch,)`` bool; rows set to True start fresh (equal to ``memory_states=None``).
            attention_mask: ``(batch, seq_len)``, 1 for tokens, 0 for padding.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MemBART encoder: pass exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        batch_size, seq_len = inputs_embeds.shape[:2]
        hidden_states = inputs_embeds + self.embed_positions(seq_len).to(inputs_embeds.dtype)
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)

        if memory_states is None:
            memory_states = self.construct_memory(batch_size).to(hidden_states.dtype)
        expected = (batch_size, self.memory_len, config.d_model)
        if tuple(memory_states.shape) != expected:
            raise ValueError(f"MemBART: `memory_states` must have shape {expected}, got {tuple(memory_states.shape)}")
        if memory_resets is None:
            memory_resets = torch.zeros(batch_size, dtype=memory_states.dtype, device=memory_states.device)
        if memory_resets.shape != (batch_size,):
            raise ValueError(
                f"MemBART: `memory_resets` must have shape ({batch_size},), got {tuple(memory_resets.shape)}"
            )
        keep = 1 - memory_resets.to(device=memory_states.device, dtype=memory_states.dtype)
        memory_states = self.memory_layer_norm(keep.view(batch_size, 1, 1) * memory_states + self.memory_bias)
        initial_memory = memory_states

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        if attention_mask.shape != (batch_size, seq_len):
            raise ValueError(
                f"MemBART: `attention_mask` must have shape {(batch_size, seq_len)}, got {tuple(attention_mask.shape)}"
            )
        memory_visible = torch.ones(batch_size, self.memory_len, dtype=torch.bool, device=attention_mask.device)
        encoder_attention_mask = torch.cat([memory_visible, attention_mask.bool()], dim=1)
        fusion_mask = self._fusion_mask(encoder_attention_mask, hidden_states.dtype)

        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            if self.gradient_checkpointing and self.training:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None)
                if checkpoint is None:
                    hidden_states, memory_states, weights = torch.utils.checkpoint.checkpoint(
                        layer, hidden_states, memory_states, fusion_mask, use_reentrant=False
                    )
                else:
                    hidden_states, memory_states, weights = checkpoint(
                        layer.__call__, hidden_states, memory_states, fusion_mask
                    )
            else:
                hidden_states, memory_states, weights = layer(hidden_states, memory_states, fusion_mask)
            if output_attentions:
                all_attentions += (weights,)
        if output_hidden_states:
            all_hidden += (hidden_states,)

        gate = self.memory_gate_net(memory_states)
        memory_states = gate * memory_states + (1 - gate) * initial_memory
        output = MemBartEncoderOutput(
            last_hidden_state=torch.cat([memory_states, hidden_states], dim=1),
            hidden_states=all_hidden,
            attentions=all_attentions,
            memory_states=memory_states,
            encoder_attention_mask=encoder_attention_mask,
        )
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# decoder (BART, post-LN)
# ----------------------------------------------------------------------------------------------------------------------
class MemBartAttention(nn.Module):
    """BART multi-head attention (decoder self-attention or cross-attention) with an `EncoderDecoderCache`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, layer_idx: int, is_cross: bool) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.is_cross = is_cross
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, tgt_len = hidden_states.shape[:2]
        query = self._heads(self.q_proj(hidden_states) * self.scaling)
        if self.is_cross:
            if cache is not None and cache.is_updated.get(self.layer_idx):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                key, value = layer.keys, layer.values
            else:
                key = self._heads(self.k_proj(key_value_states))
                value = self._heads(self.v_proj(key_value_states))
                if cache is not None:
                    key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True
        else:
            key = self._heads(self.k_proj(hidden_states))
            value = self._heads(self.v_proj(hidden_states))
            if cache is not None:
                key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        output, weights = _attend(query, key, value, attention_mask, self.dropout, self.training)
        output = output.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(output), weights


class MemBartDecoderLayer(nn.Module):
    """Post-LN BART decoder layer."""

    def __init__(self, config: MemBartConfig, layer_idx: int) -> None:
        super().__init__()
        self.embed_dim = config.d_model
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        heads, attn_drop = config.decoder_attention_heads, config.attention_dropout
        self.self_attn = MemBartAttention(self.embed_dim, heads, attn_drop, layer_idx, is_cross=False)
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.encoder_attn = MemBartAttention(self.embed_dim, heads, attn_drop, layer_idx, is_cross=True)
        self.encoder_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.fc1 = nn.Linear(self.embed_dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (hidden, self-attention weights, cross-attention weights)."""
        attn, self_weights = self.self_attn(hidden_states, cache=cache, attention_mask=attention_mask)
        hidden_states = self.self_attn_layer_norm(
            hidden_states + F.dropout(attn, p=self.dropout, training=self.training)
        )
        cross_weights = None
        if encoder_hidden_states is not None:
            attn, cross_weights = self.encoder_attn(
                hidden_states,
                key_value_states=encoder_hidden_states,
                cache=cache,
                attention_mask=encoder_attention_mask,
            )
            hidden_states = self.encoder_attn_layer_norm(
                hidden_states + F.dropout(attn, p=self.dropout, training=self.training)
            )
        h = F.dropout(self.activation_fn(self.fc1(hidden_states)), p=self.activation_dropout, training=self.training)
        h = F.dropout(self.fc2(h), p=self.dropout, training=self.training)
        return self.final_layer_norm(hidden_states + h), self_weights, cross_weights


class MemBartDecoder(nn.Module):
    """BART decoder (``decoder_layers`` [`MemBartDecoderLayer`]) cross-attending to ``[memory; tokens]``."""

    def __init__(self, config: MemBartConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.layerdrop = config.decoder_layerdrop
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.embed_positions = MemBartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([MemBartDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> dict[str, Any]:
        """Run the decoder; ``encoder_attention_mask`` is a bool/0-1 mask over ``encoder_hidden_states``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MemBART decoder: pass exactly one of `decoder_input_ids` or `decoder_inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        batch_size, seq_len = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        hidden_states = inputs_embeds + self.embed_positions(seq_len, past).to(inputs_embeds.dtype)
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)

        device, dtype = hidden_states.device, hidden_states.dtype
        allowed = torch.ones(seq_len, past + seq_len, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device).bool()
            if attention_mask.shape[-1] == seq_len and past > 0:
                attention_mask = F.pad(attention_mask, (past, 0), value=True)
            if attention_mask.shape != (batch_size, past + seq_len):
                raise ValueError(
                    f"MemBART: `decoder_attention_mask` must have shape {(batch_size, past + seq_len)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            allowed = allowed & attention_mask[:, None, None, :]
        self_mask = _additive_mask(allowed, dtype)
        cross_mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            cross_mask = _additive_mask(encoder_attention_mask.to(device).bool()[:, None, None, :], dtype)

        all_hidden = () if output_hidden_states else None
        all_self = () if output_attentions else None
        all_cross = () if output_attentions and encoder_hidden_states is not None else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            args = (hidden_states, self_mask, encoder_hidden_states, cross_mask, cache)
            if self.gradient_checkpointing and self.training and cache is None:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None)
                if checkpoint is None:
                    outputs = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
                else:
                    outputs = checkpoint(layer.__call__, *args)
            else:
                outputs = layer(*args)
            hidden_states = outputs[0]
            if output_attentions:
                all_self += (outputs[1],)
                if all_cross is not None:
                    all_cross += (outputs[2],)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return {
            "last_hidden_state": hidden_states,
            "hidden_states": all_hidden,
            "attentions": all_self,
            "cross_attentions": all_cross,
        }


# ----------------------------------------------------------------------------------------------------------------------
# pretrained models
# ----------------------------------------------------------------------------------------------------------------------
class MemBartPreTrainedModel(PreTrainedModel):
    """Weight init and loading hooks shared by the MemBART models."""

    config_class = MemBartConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemBartEncoderLayer", "MemBartDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _keys_to_ignore_on_load_unexpected = [r"encoder\.version", r"decoder\.version"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, ``init_std``) for linear/embedding weights, zeros for biases, BART LayerNorm defaults;
        ``memory_bias`` ~ Normal(0, ``init_std``) as in the original; ``final_logits_bias`` zeros."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            _normal_(module.weight, std)
            if module.bias is not None:
                _zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, std)
            if module.padding_idx is not None and not _is_loaded(module.weight):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            _ones_(module.weight)
            _zeros_(module.bias)
        if isinstance(module, MemBartEncoder):
            _normal_(module.memory_bias, std)
        if isinstance(module, MemBartForConditionalGeneration):
            _zeros_(module.final_logits_bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        **kwargs: Any):
        """`PreTrainedModel.from_pretrained` restricted to safetensors weights and exact checkpoints, as for
        Memformer (`safe_loading.safetensors_only_from_pretrained`): pickle weights (also as `.bin` shards of a
        safetensors index) and index shards outside the folder are refused, and missing or unexpected tensor names
        raise an `OSError` naming the file (`strict=False` accepts them)."""
        return safetensors_only_from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path,
                                                *model_args, **kwargs)

    @staticmethod
    def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
        """Accept the cache under its v5.24 name (``cache``) or its older name (``past_key_values``)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("MemBART: pass the decoder cache as `cache` or `past_key_values`, not both")
        return cache if cache is not None else past_key_values


class MemBartModel(MemBartPreTrainedModel):
    """The bare MemBART encoder-decoder returning decoder hidden states and the updated memory."""

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }
    # loading the bare model from a MemBartForConditionalGeneration checkpoint
    _keys_to_ignore_on_load_unexpected = [r"encoder\.version", r"decoder\.version", r"final_logits_bias"]

    def __init__(self, config: MemBartConfig) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = MemBartEncoder(config)
        self.decoder = MemBartDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, *args: Any, **kwargs: Any) -> MemBartEncoder:
        return self.encoder

    def get_decoder(self, *args: Any, **kwargs: Any) -> MemBartDecoder:
        return self.decoder

    def construct_memory(self, batch_size: int) -> torch.Tensor:
        """Fresh memory (zeros) for ``batch_size`` rows."""
        return self.encoder.construct_memory(batch_size)

    def _cross_attention_mask(
        self, attention_mask: torch.Tensor | None, encoder_outputs: MemBartEncoderOutput | tuple, enc_len: int
    ) -> torch.Tensor | None:
        """Mask over ``[memory; tokens]``: a token-level mask gets K leading ones (fix of original bug 2)."""
        k = self.config.memory_len
        if attention_mask is None:
            return getattr(encoder_outputs, "encoder_attention_mask", None)
        if attention_mask.shape[-1] == enc_len - k:
            return F.pad(attention_mask.bool(), (k, 0), value=True)
        if attention_mask.shape[-1] == enc_len:
            return attention_mask.bool()
        raise ValueError(
            f"MemBART: `attention_mask` has length {attention_mask.shape[-1]}; expected {enc_len - k} (tokens) "
            f"or {enc_len} (memory + tokens)"
        )

    def _ensure_cache(self, cache: Cache | None, use_cache: bool) -> EncoderDecoderCache | None:
        if not use_cache:
            return None
        if cache is None:
            return EncoderDecoderCache(DynamicCache(), DynamicCache())
        if isinstance(cache, EncoderDecoderCache):
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return EncoderDecoderCache(cache, DynamicCache())
        raise ValueError(f"MemBART: expected an EncoderDecoderCache, got {type(cache).__name__}")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory_states: torch.FloatTensor | None = None,
        memory_resets: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MemBartEncoderOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MemBartSeq2SeqModelOutput | tuple:
        """Encode one step with memory (unless ``encoder_outputs`` is given) and decode.

        Args:
            memory_states / memory_resets: see [`MemBartEncoder.forward`]; ignored when ``encoder_outputs`` is given.
            attention_mask: token mask ``(batch, seq_len)`` (or already padded ``(batch, K + seq_len)``).
            encoder_outputs: a [`MemBartEncoderOutput`] (or tuple ``(last_hidden_state, ...)``) from a previous call.
            cache / past_key_values: decoder [`EncoderDecoderCache`] (the v5.24 and the older argument name).
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = config.use_cache if use_cache is None else use_cache
        cache = self._ensure_cache(self._cache_argument(cache, past_key_values), use_cache)

        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MemBART: pass `decoder_input_ids`/`decoder_inputs_embeds`, or `input_ids` to shift")
            decoder_input_ids = shift_tokens_right(input_ids, config.pad_token_id, config.decoder_start_token_id)

        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                memory_states=memory_states,
                memory_resets=memory_resets,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, ModelOutput):
            encoder_outputs = MemBartEncoderOutput(
                last_hidden_state=encoder_outputs[0],
                memory_states=encoder_outputs[0][:, : config.memory_len],
            )
        encoder_hidden = encoder_outputs[0]
        cross_mask = self._cross_attention_mask(attention_mask, encoder_outputs, encoder_hidden.shape[1])

        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=cross_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        memory_out = getattr(encoder_outputs, "memory_states", None)
        if memory_out is None:
            memory_out = encoder_hidden[:, : config.memory_len]
        output = MemBartSeq2SeqModelOutput(
            last_hidden_state=decoder_outputs["last_hidden_state"],
            decoder_hidden_states=decoder_outputs["hidden_states"],
            decoder_attentions=decoder_outputs["attentions"],
            cross_attentions=decoder_outputs["cross_attentions"],
            encoder_last_hidden_state=encoder_hidden,
            encoder_hidden_states=getattr(encoder_outputs, "hidden_states", None),
            encoder_attentions=getattr(encoder_outputs, "attentions", None),
            memory_states=memory_out,
            **{CACHE_KWARG: cache},
        )
        return output if return_dict else output.to_tuple()


class MemBartForConditionalGeneration(MemBartPreTrainedModel, GenerationMixin):
    """MemBART with the (tied) LM head: seq2seq LM with memory carried across steps/turns."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]

    def __init__(self, config: MemBartConfig) -> None:
        super().__init__(config)
        self.model = MemBartModel(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, *args: Any, **kwargs: Any) -> MemBartEncoder:
        return self.model.encoder

    def get_decoder(self, *args: Any, **kwargs: Any) -> MemBartDecoder:
        return self.model.decoder

    def construct_memory(self, batch_size: int) -> torch.Tensor:
        """Fresh memory (zeros) for ``batch_size`` rows."""
        return self.model.construct_memory(batch_size)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory_states: torch.FloatTensor | None = None,
        memory_resets: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: MemBartEncoderOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MemBartSeq2SeqLMOutput | tuple:
        """Seq2seq LM forward; ``labels`` (-100 = ignored) give the mean token cross-entropy.

        ``memory_states`` of the output is the memory after this step's encoder; pass it (and per-row
        ``memory_resets``) to the next call. ``num_items_in_batch`` (Trainer) switches the loss to sum / count.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            memory_states=memory_states,
            memory_resets=memory_resets,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=self._cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        logits = logits + self.final_logits_bias.to(logits.device, logits.dtype)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            flat_logits, flat_labels = logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)

        output = MemBartSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            memory_states=outputs.memory_states,
            **{CACHE_KWARG: outputs[CACHE_KWARG] if CACHE_KWARG in outputs else None},
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate_turn(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        memory_states: torch.FloatTensor | None = None,
        memory_resets: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> MemBartTurnOutput:
        """One dialogue turn: read ``input_ids`` into the carried memory, then generate the reply.

        Example::

            memory = None
            for turn in turns:
                batch = tokenizer(turn, return_tensors="pt", padding=True)
                out = model.generate_turn(**batch, memory_states=memory, max_new_tokens=40)
                print(tokenizer.batch_decode(out.sequences, skip_special_tokens=True))
                memory = out.memory_states  # carry to the next turn

        The memory is written by the encoder only (as in the original training), so include the previous reply in
        the next turn's input if it should be remembered. ``memory_resets`` (``(batch,)`` bool) restarts rows.
        Extra keyword arguments go to ``generate`` (beam search, sampling, ``num_return_sequences`` ...).
        """
        encoder_outputs = self.get_encoder()(
            input_ids=input_ids,
            memory_states=memory_states,
            memory_resets=memory_resets,
            attention_mask=attention_mask,
            return_dict=True,
        )
        new_memory = encoder_outputs.memory_states  # generate may expand encoder_outputs in place (beams)
        generated = self.generate(encoder_outputs=encoder_outputs, attention_mask=attention_mask, **generate_kwargs)
        sequences = generated if isinstance(generated, torch.Tensor) else generated.sequences
        return MemBartTurnOutput(
            sequences=sequences,
            memory_states=new_memory,
            generate_output=None if isinstance(generated, torch.Tensor) else generated,
        )


__all__ = [
    "MemBartEncoderOutput",
    "MemBartForConditionalGeneration",
    "MemBartModel",
    "MemBartPreTrainedModel",
    "MemBartSeq2SeqLMOutput",
    "MemBartSeq2SeqModelOutput",
    "MemBartTurnOutput",
]
