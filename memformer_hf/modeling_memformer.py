"""Memformer: a memory-augmented Transformer for sequence modeling (Wu et al., arXiv 2010.06891), for transformers v5.

Data flow per segment (docs/design.md#data-flow): H_t = Enc(s_t, M_t) (every encoder layer reads the memory slots),
M_{t+1} = Write(M_t, H_t) (slot attention on the final encoder output, then Biased Memory Normalization) and the
causal decoder predicts s_{t+1} while cross-attending to H_t only (with the option `decoder_reads_memory`, beyond
the paper: to [H_t ; N(M_{t+1})], `MemformerModel.cross_context`). The recurrent state lives in `MemformerCache`.

Reading order: building blocks (rotary, attention, FFN, layers; the memory reader, writer and BMN are in
`memory.py`) → encoder / decoder stacks → `MemformerPreTrainedModel` → `MemformerModel` (the recurrent step
`critical_path_step` + the batched decoder `decode_chunks`; the aligned fast path, the one-token decoder step, then
the general path over `stream_planner.plan_stream`; docs/design.md#fast-decode) → `MemformerForCausalLM`. MRBP
replays the step in `mrbp.py`; CUDA graphs of the fixed-shape steps are in `graphs.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .cache_memformer import MemformerCache, cross_length
from .configuration_memformer import MemformerConfig
from .graphs import GraphedStep, StepGraphs, graphs_usable
from .memory import BiasedMemoryNorm, MemoryPredictor, MemoryReader, MemoryWriter, at_least_fp32, memory_bound
from .safe_loading import safetensors_only_from_pretrained
from .stream_planner import StreamPlan, plan_stream

try:  # transformers' init helpers skip tensors that were loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older 5.x
    init = nn.init

logger = logging.get_logger(__name__)

# transformers >= 5.23 names the cache `cache` in forward kwargs and outputs; 5.17 calls it `past_key_values`.
try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:  # pragma: no cover
    _ALL_CACHE_NAMES = ["past_key_values"]
CACHE_KWARG = "cache" if "cache" in _ALL_CACHE_NAMES else "past_key_values"


def _output_class(name: str, doc: str, fields_: list[tuple[str, Any]]) -> type[ModelOutput]:
    """Build a `ModelOutput` dataclass whose cache field uses the installed transformers' name."""
    spec = [(n, t, field(default=None)) for n, t in fields_]
    cls = make_dataclass(name, spec, bases=(ModelOutput,))
    cls.__doc__ = doc
    cls.__module__ = __name__
    return dataclass(cls)


_COMMON_FIELDS = [
    (CACHE_KWARG, Cache | None),
    ("hidden_states", tuple | None),
    ("memory", torch.Tensor | None),
    ("memory_states", tuple | None),
    ("writer_attentions", tuple | None),
    ("reader_attentions", tuple | None),
]
MemformerModelOutput = _output_class(
    "MemformerModelOutput",
    "Output of `MemformerModel`: decoder states per input column, the cache (`past_key_values`), the final memory "
    "[B, K, d] and, on request, memory states, writer attentions [B, H_w, K, 1+L] and reader attentions. "
    "`output_mask` [B, n] marks the columns whose states were computed (all real columns unless `logits_to_keep` "
    "or an MRBP replay step restricts them).",
    [("last_hidden_state", torch.Tensor | None), ("output_mask", torch.Tensor | None)] + _COMMON_FIELDS,
)
MemformerCausalLMOutput = _output_class(
    "MemformerCausalLMOutput",
    "Output of `MemformerForCausalLM`: `loss` (token mean), `logits`, the cache (`past_key_values`), the final "
    "memory and the optional analysis outputs of `MemformerModelOutput`.",
    [("loss", torch.Tensor | None), ("logits", torch.Tensor | None)] + _COMMON_FIELDS,
)


# ============================================================================================ building blocks
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MemformerRotaryEmbedding(nn.Module):
    """RoPE on in-segment positions (0..L-1); the tables are tiny and recomputed per call (no module state)."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = float(config.rope_parameters.get("rope_theta", 1e4))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N, q] → cos, sin [N, 1, q, head_dim]."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device,
                                                        dtype=torch.float32) / self.head_dim))
        angles = positions.float()[..., None] * inv_freq
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if cos_sin is None:
        return x
    cos, sin = cos_sin
    return x * cos + rotate_half(x) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    rel_index: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. `attention_mask` is additive [N, 1|H, q, k]. With `rel_index` [N, q, k] and a module
    `rel_pos` table, adds the paper's simplified relative position terms (logit q·R_{i-j}, value v_j + R_{i-j})."""
    scores = torch.matmul(query, key.transpose(-1, -2))
    rel = None
    if rel_index is not None:
        rel = module.rel_pos.weight[rel_index].to(query.dtype)  # [N, q, k, d_h]
        scores = scores + torch.einsum("nhqd,nqkd->nhqk", query, rel)
    # the mask is added in at least float32: in float16, finfo.min plus a negative score is -inf, and a query with no
    # valid key (empty boot context, inactive cell) would get NaN instead of an exact zero (docs/design.md#numerics)
    scores = at_least_fp32(scores * scaling)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    if rel is not None:
        out = out + torch.einsum("nhqk,nqkd->nhqd", probs, rel)
    return out.transpose(1, 2).contiguous(), probs


_TRAINING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class MemformerAttention(nn.Module):
    """Multi-head attention used for encoder/decoder self-attention (with RoPE or simplified RPE) and for decoder
    cross-attention to the previous segment's encoder output (no positions)."""

    def __init__(self, config: MemformerConfig, is_self_attention: bool) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads  # grouped-query attention when < num_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False  # masks are always explicit, see `_attend`
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.uses_rel_pos = is_self_attention and config.position_embedding_type == "simplified_rpe"
        if self.uses_rel_pos:
            self.rel_pos = nn.Embedding(2 * config.segment_length - 1, self.head_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, q, _ = x.shape
        return x.view(n, q, -1, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor, cos_sin=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, k, d] → keys (rotated when `cos_sin` is given) and values, each [N, H, k, d_h]. With grouped KV heads
        (`num_key_value_heads` < H) each KV head is repeated for its group of query heads here (as transformers'
        `repeat_kv`: query head h reads KV head h // (H / H_kv)), so callers and caches always see H heads
        (docs/design.md#llama-shapes)."""
        key = apply_rotary(self.split_heads(self.k_proj(states)), cos_sin)
        value = self.split_heads(self.v_proj(states))
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return key, value

    def attend(
        self,
        hidden: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        cos_sin=None,
        rel_index: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Queries from `hidden` [N, q, d] against prepared keys/values [N, H, k, d_h]. `mask` is a bool
        [N, 1, q|1, k] (True = may attend); a query with no valid key outputs exactly zero. `causal=True` with
        `mask=None` means a plain causal mask over equal-length q and k (the flash-eligible training case)."""
        query = apply_rotary(self.split_heads(self.q_proj(hidden)), cos_sin)
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        attention_interface = (eager_attention_forward if impl == "eager" or self.uses_rel_pos
                               else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward))
        dropout = self.config.attention_dropout if self.training else 0.0
        if causal and mask is None and (impl == "eager" or self.uses_rel_pos):
            q_len = query.shape[2]
            mask = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()[None, None]
            causal = False
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)
        if attention_interface is eager_attention_forward:
            out, _ = eager_attention_forward(self, query, key, value, additive, self.scaling, dropout,
                                             rel_index=rel_index if self.uses_rel_pos else None)
        else:
            # cuDNN's SDPA backward returned NaN gradients on some training batches while its forward and the
            # memory-efficient and math kernels were finite (H100, torch 2.11, bf16; benchmarks/results/quality.md):
            # training never uses the cuDNN kernel.
            backends = (sdpa_kernel(_TRAINING_SDPA_BACKENDS) if self.training and query.is_cuda
                        else contextlib.nullcontext())
            with backends:
                out, _ = attention_interface(self, query, key, value, additive, dropout=dropout, scaling=self.scaling,
                                             is_causal=causal)
        out = self.o_proj(out.reshape(*hidden.shape[:-1], -1))
        if mask is not None:  # safe softmax: a query with no valid key outputs exactly zero (after o_proj's bias)
            out = out * mask.any(-1).any(1)[..., None].to(out.dtype)
        return out


class MemformerFFN(nn.Module):
    """The paper's FFN (`mlp_type="gelu_mlp"`): fc1 → activation → fc2."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class MemformerSwiGLU(nn.Module):
    """Llama's gated FFN (`mlp_type="swiglu"`): down_proj(act(gate_proj(x)) * up_proj(x)), act = silu for Llama."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, inner, bias=bias)
        self.up_proj = nn.Linear(d, inner, bias=bias)
        self.down_proj = nn.Linear(inner, d, bias=bias)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act(self.gate_proj(x)) * self.up_proj(x)))


class MemformerRMSNorm(nn.Module):
    """RMSNorm as Llama's (`norm_type="rmsnorm"`): x / sqrt(mean(x²) + eps) · weight, computed in at least float32
    (float64 stays float64) and cast back before the gain, as `LlamaRMSNorm` does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = at_least_fp32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(config: MemformerConfig, size: int | None = None) -> nn.Module:
    """The normalisation layer of every block (`norm_type`): LayerNorm (weight, bias) or RMSNorm (weight)."""
    size = config.hidden_size if size is None else size
    if config.norm_type == "rmsnorm":
        return MemformerRMSNorm(size, eps=config.rms_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


def make_ffn(config: MemformerConfig) -> nn.Module:
    """The feed-forward block of every layer (`mlp_type`)."""
    return MemformerSwiGLU(config) if config.mlp_type == "swiglu" else MemformerFFN(config)


class MemformerEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN: self-attention (bidirectional, in-segment positions) → memory read → FFN."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.self_attn_norm = make_norm(config)
        self.self_attn = MemformerAttention(config, is_self_attention=True)
        self.memory_read_norm = make_norm(config)
        self.memory_read = MemoryReader(config)
        self.memory_kv_norm = make_norm(config) if config.normalize_memory_kv else None
        self.ffn_norm = make_norm(config)
        self.ffn = make_ffn(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None, cos_sin=None,
                rel_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.self_attn_norm(hidden)
        key, value = self.self_attn.project_kv(x, cos_sin)
        hidden = hidden + self.dropout(self.self_attn.attend(x, key, value, mask, cos_sin, rel_index))
        if self.memory_kv_norm is not None:
            memory = self.memory_kv_norm(memory.to(self.memory_kv_norm.weight.dtype))
        read, probs = self.memory_read(self.memory_read_norm(hidden), memory)
        hidden = hidden + self.dropout(read)
        hidden = hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))
        return hidden, probs


class MemformerDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN: causal self-attention over the segment-local KV → cross-attention to H → FFN."""

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.self_attn_norm = make_norm(config)
        self.self_attn = MemformerAttention(config, is_self_attention=True)
        self.cross_attn_norm = make_norm(config)
        self.cross_attn = MemformerAttention(config, is_self_attention=False)
        # `cross_attention_rope`: positions of the previous segment's tokens relative to the decoder inputs
        self.cross_rotary = MemformerRotaryEmbedding(config) if config.cross_attention_rope else None
        self.segment_length = config.segment_length
        self.ffn_norm = make_norm(config)
        self.ffn = make_ffn(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, past_key: torch.Tensor | None, past_value: torch.Tensor | None,
                cross_key: torch.Tensor, cross_value: torch.Tensor, plan: DecoderPlan
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the new hidden states and the full self K/V buffers (past with the new positions written)."""
        x = self.self_attn_norm(hidden)
        new_key, new_value = self.self_attn.project_kv(x, plan.cos_sin)
        if plan.write_index is None:  # every chunk starts at position 0: the buffer is just the new K/V
            key, value = new_key, new_value
        else:
            # write the new positions into the (fresh or static-cache) buffers: in place without autograd (the decode
            # step updates the cache's buffers so); with autograd out of place, as a gradient-checkpointed layer's
            # recomputation would otherwise modify the buffer its first pass saved
            idx = plan.write_index[:, None, :, None].expand(-1, new_key.shape[1], -1, new_key.shape[-1])
            scatter = torch.Tensor.scatter if torch.is_grad_enabled() else torch.Tensor.scatter_
            key = scatter(past_key, 2, idx, new_key.to(past_key.dtype))
            value = scatter(past_value, 2, idx, new_value.to(past_value.dtype))
        attn = self.self_attn.attend(x, key, value, plan.self_mask, plan.cos_sin, plan.rel_index,
                                     causal=plan.self_mask is None)
        hidden = hidden + self.dropout(attn)
        cross = self.cross_attn.attend(self.cross_attn_norm(hidden), cross_key, cross_value, plan.cross_mask,
                                       plan.cos_sin if self.cross_rotary is not None else None)
        hidden = hidden + self.dropout(cross)
        hidden = hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))
        return hidden, key, value

    def project_cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of the encoder output H [N, L, d], computed once per segment outside `forward`
        (FSDP2 must register it with `register_fsdp_forward_method` so that the layer's shards are gathered). With
        `cross_attention_rope` the keys are rotated at j - L + 1 for token j (docs/design.md#cross-attention-rope)."""
        cos_sin = None
        if self.cross_rotary is not None:  # the same positions in every row: one table, broadcast over the rows
            positions = torch.arange(states.shape[1], device=states.device) - (self.segment_length - 1)
            cos_sin = self.cross_rotary(positions[None], states.dtype)
        return self.cross_attn.project_kv(states, cos_sin)


@dataclass
class DecoderPlan:
    """Masks and positions shared by all decoder layers for one batched decoder call."""

    cos_sin: tuple[torch.Tensor, torch.Tensor] | None
    rel_index: torch.Tensor | None
    self_mask: torch.Tensor | None  # [N, 1, q, k] bool, or None for plain causal
    cross_mask: torch.Tensor | None  # [N, 1, 1, L (+K)] bool, or None when every cross key is valid
    write_index: torch.Tensor | None  # [N, q] buffer slot of each query's key, or None when all chunks start at 0


# ============================================================================================ stacks
class MemformerEncoder(nn.Module):
    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemformerEncoderLayer(config) for _ in range(config.encoder_layers))
        self.norm = make_norm(config)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None, cos_sin,
                rel_index) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        reads = []
        for layer in self.layers:
            hidden, probs = layer(hidden, memory, mask, cos_sin, rel_index)
            reads.append(probs)
        return self.norm(hidden), tuple(reads)


class MemformerDecoder(nn.Module):
    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemformerDecoderLayer(config) for _ in range(config.decoder_layers))
        self.norm = make_norm(config)


# ============================================================================================ pretrained base
class MemformerPreTrainedModel(PreTrainedModel):
    config_class = MemformerConfig
    config: MemformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MemformerEncoderLayer", "MemformerDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MemformerRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MemoryWriter):
            init.normal_(module.forget_bias, mean=0.0,
                         std=self.config.forget_bias_init_scale * self.config.hidden_size ** -0.5)
            if module.self_bias is not None:
                bias, spread = float(self.config.memory_write_self_bias), float(self.config.memory_write_self_bias_spread)
                k = module.self_bias.numel()  # one slot: the centre of bias ± spread/2 (linspace would give its start)
                values = torch.linspace(bias - spread / 2, bias + spread / 2, k) if k > 1 else torch.full((1,), bias)
                if hasattr(init, "copy_"):  # transformers' helper skips a bias loaded from a checkpoint
                    init.copy_(module.self_bias, values)
                else:
                    module.self_bias.copy_(values)
            if module.log_temperature is not None:
                init.constant_(module.log_temperature, math.log(self.config.memory_write_temperature))

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Save as usual; `auto_map` lists the config and both model classes so that `AutoModel` and
        `AutoModelForCausalLM` resolve from the saved remote code (transformers only writes the saved class)."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_memformer.MemformerConfig",
            "AutoModel": "modeling_memformer.MemformerModel",
            "AutoModelForCausalLM": "modeling_memformer.MemformerForCausalLM",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        **kwargs: Any):
        """`PreTrainedModel.from_pretrained` restricted to safetensors weights and exact checkpoints
        (`safe_loading.safetensors_only_from_pretrained`): a pickle checkpoint (`pytorch_model.bin`, `*.pt`, a `.bin`
        shard in `model.safetensors.index.json`, …) is refused, since unpickling can run code, as is an index shard
        outside the folder; a truncated or corrupted safetensors file raises an `OSError` that names the file, and so
        does a checkpoint with missing or unexpected tensor names (no partly loaded model is returned; `strict=False`
        accepts one)."""
        return safetensors_only_from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path,
                                                *model_args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        """Make `generate()` start from an empty `MemformerCache` (it never builds a stateless default cache). A
        `MemformerCache` passed with `use_cache=False` is refused: generate() would feed the whole sequence at every
        step on top of it."""
        given = [model_kwargs.get(k) for k in (CACHE_KWARG, "past_key_values")]
        if generation_config.use_cache is False and any(isinstance(c, MemformerCache) for c in given):
            raise ValueError("generate() got a MemformerCache together with `use_cache=False`: without a cache "
                             "generate() feeds the whole sequence at every step, which the cache would consume again. "
                             "Drop `use_cache=False` to continue from the cache, or the cache to generate without one.")
        if model_kwargs.get(CACHE_KWARG) is None and model_kwargs.get("past_key_values") is None \
                and generation_config.use_cache is not False:
            if generation_config.cache_implementation is not None:
                raise ValueError(f"Memformer keeps its own recurrent cache; `cache_implementation="
                                 f"{generation_config.cache_implementation!r}` is not supported.")
            model_kwargs[CACHE_KWARG] = MemformerCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def _as_row_flags(value: Any, name: str) -> torch.Tensor | None:
    """Per-row flags given as a tensor, or a Python list/tuple of bools (converted to a bool tensor)."""
    if value is None or torch.is_tensor(value):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int)) and v in (0, 1) for v in value):
        return torch.tensor([bool(v) for v in value], dtype=torch.bool)
    raise ValueError(f"`{name}` must be a bool tensor of shape (batch,) or a list of bools, got {value!r}.")


# ============================================================================================ the model
_GRAPH_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def previous_segment_breaks(encoder_ids: torch.Tensor, encoder_mask: torch.Tensor | None, decoder_ids: torch.Tensor,
                            segment_length: int) -> torch.Tensor:
    """`decoder_previous_segment` cells [..., L] whose encoder input is a complete segment (all L tokens valid) but
    whose first decoder input is not that segment's last token: the decoder continues the segment, so those inputs
    are not the true stream (e.g. packed without `decoder_previous_segment=True`). Returns a bool tensor [...] on
    the device, without a host sync."""
    if encoder_ids.shape[-1] != segment_length or decoder_ids.shape[-1] == 0:
        return torch.zeros(encoder_ids.shape[:-1], dtype=torch.bool, device=encoder_ids.device)
    complete = (torch.ones_like(encoder_ids[..., 0], dtype=torch.bool) if encoder_mask is None
                else encoder_mask.bool().all(-1))
    return complete & (decoder_ids[..., 0] != encoder_ids[..., -1])


PREVIOUS_SEGMENT_LAYOUT_ERROR = (
    "decoder_previous_segment: {where} a complete segment as encoder input, so the decoder continues it and the first "
    "decoder input must be that segment's last token (encoder_input_ids[..., -1]), not BOS; build the cells with "
    "decoder_previous_segment=True (StreamBatches, document_cells, ...).")


def _graph_state(model: nn.Module) -> tuple[StepGraphs, dict]:
    state = _GRAPH_STATE.get(model)
    if state is None:
        state = _GRAPH_STATE[model] = (StepGraphs(), {})
    return state


class MemformerModel(MemformerPreTrainedModel):
    """The Memformer encoder–writer–decoder. `forward` has two modes:

    * **stream mode** (`input_ids` or `inputs_embeds`): any number of columns; the sequence is split into segments
      per row, the recurrence runs inside, the state is taken and returned as `past_key_values`.
    * **cell mode** (`encoder_input_ids` + `decoder_input_ids`): one recurrence cell per row, `memory` in and out
      (used by MRBP training, docs/design.md#cell).
    """

    use_fast_paths: bool = True  # False: every stream-mode call runs the general planner (for tests and debugging)
    use_cuda_graphs: bool = True  # False: the fixed-shape steps run eagerly on CUDA too (graphs.graphs_usable)
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # the bare model from an (untied) causal-LM checkpoint

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.encoder = MemformerEncoder(config)
        self.writer = MemoryWriter(config)
        self.decoder = MemformerDecoder(config)
        # `decoder_reads_memory` (beyond the paper): the norm of the memory slots the decoder cross-attends to
        self.decoder_memory_norm = make_norm(config) if config.decoder_reads_memory else None
        self.rotary = MemformerRotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _step_graphs(self) -> StepGraphs:
        """Captured CUDA graphs of this model's fixed-shape steps (kept outside the module: never saved or copied)."""
        return _graph_state(self)[0]

    def _use_graphs(self, device: torch.device) -> bool:
        """Whether this forward runs its fixed-shape steps as CUDA graphs (`graphs.graphs_usable`); if so, graphs
        captured with other parameter addresses are dropped first. Asked once per forward, not per step."""
        if not graphs_usable(self, device):
            return False
        self._step_graphs.drop_if_stale(self)
        return True

    @property
    def _static_buffers(self) -> dict:
        """Decoder-state buffers that the captured decoder steps update in place, per batch shape."""
        return _graph_state(self)[1]

    @property
    def memory_dtype(self) -> torch.dtype:
        """Memory is kept in float32 (float64 for a float64 model) whatever the compute dtype."""
        return torch.float64 if self.writer.forget_bias.dtype == torch.float64 else torch.float32

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """m₀ = normalize(v_bias), [batch, K, d], inside the autograd graph."""
        return self.writer.initial_memory(self.memory_dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def _positions(self, positions: torch.Tensor, key_positions: torch.Tensor | None, dtype: torch.dtype):
        """RoPE tables or simplified-RPE relative indices for query positions [N, q] and key positions [N, k]."""
        if self.config.position_embedding_type == "rope":
            return self.rotary(positions, dtype), None
        if self.config.position_embedding_type == "simplified_rpe":
            L = self.config.segment_length
            kpos = positions if key_positions is None else key_positions
            rel = (positions[:, :, None] - kpos[:, None, :]).clamp(-(L - 1), L - 1) + (L - 1)
            return None, rel
        return None, None

    def encode_segment(
        self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The critical path of one segment: H = Enc(s, M), M' = Write(M, H).

        inputs_embeds [N, L', d] (L' ≤ L), mask [N, L'] bool or None (all valid), memory [N, K, d].
        Returns H, M', writer attention and reader attentions."""
        n, length, _ = inputs_embeds.shape
        pos = torch.arange(length, device=inputs_embeds.device).expand(n, -1)
        cos_sin, rel_index = self._positions(pos, None, inputs_embeds.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :].expand(-1, 1, length, -1)
        hidden, reads = self.encoder(inputs_embeds, memory, attn_mask, cos_sin, rel_index)
        new_memory, write_probs = self.writer(memory, hidden, mask)
        return hidden, new_memory, write_probs, reads

    def cross_context(self, hidden: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the decoder cross-attends to when it predicts the segment after the one encoded as `hidden` H [N, L', d]
        (`mask` [N, L'] valid positions, None: all): H itself (the paper), or with `decoder_reads_memory`
        [H ; N(M')] [N, L'+K, d] with M' [N, K, d] the memory after writing that segment and the mask extended by
        K always-valid positions (docs/design.md#decoder-reads-memory)."""
        norm = self.decoder_memory_norm
        if norm is None:
            return hidden, mask
        slots = norm(memory.to(norm.weight.dtype)).to(hidden.dtype)
        states = torch.cat([hidden, slots], 1)
        if mask is None:
            return states, None
        return states, torch.cat([mask.bool(), mask.new_ones(mask.shape[0], slots.shape[1], dtype=torch.bool)], 1)

    @property
    def cross_length(self) -> int:
        """Cross-attention keys per segment: L, or L + K with `decoder_reads_memory`."""
        return cross_length(self.config)

    def _decoder_plan(self, starts: torch.Tensor, lengths: torch.Tensor, q_len: int, cross_mask, dtype,
                      prefix_valid: torch.Tensor | None = None) -> tuple[DecoderPlan, int]:
        """Masks/positions for chunks starting at `starts` [N] with `lengths` [N] valid queries out of `q_len`.
        `prefix_valid` [N] bool (`decoder_previous_segment`): the self K/V buffers hold the previous segment's
        prefix at [0, L) (keys at positions -L..-1, valid in these rows) and the own positions from L on."""
        device = starts.device
        positions = starts[:, None] + torch.arange(q_len, device=device)[None]
        if prefix_valid is not None:
            L = self.config.segment_length
            buffer_len = L + int(starts.max()) + q_len
            write_index = positions + L
            key_pos = (torch.arange(buffer_len, device=device) - L).expand(len(starts), -1)
            self_mask = ((key_pos[:, None, :] <= positions[:, :, None])
                         & ((key_pos >= 0) | prefix_valid[:, None])[:, None, :])[:, None]
        elif bool((starts == 0).all()) and bool((lengths == q_len).all()):
            buffer_len, write_index, self_mask = q_len, None, None  # plain causal: flash/SDPA-eligible
            key_pos = positions
        else:
            buffer_len = int(starts.max()) + q_len
            write_index = positions
            key_pos = torch.arange(buffer_len, device=device).expand(len(starts), -1)
            self_mask = (key_pos[:, None, :] <= positions[:, :, None])[:, None]
            if bool((starts == 0).all()):
                write_index = None  # buffer == new K/V (padded queries only see keys up to themselves)
                buffer_len = q_len
                key_pos = positions
                self_mask = self_mask[..., :q_len]
        cos_sin, rel_index = self._positions(positions, key_pos, dtype)
        if cross_mask is not None and bool(cross_mask.all()):
            cross_mask = None
        plan = DecoderPlan(cos_sin, rel_index, self_mask,
                           None if cross_mask is None else cross_mask[:, None, None, :], write_index)
        return plan, buffer_len

    def step_plan(self, positions: torch.Tensor, cross_mask: torch.Tensor, dtype: torch.dtype) -> DecoderPlan:
        """Plan of a one-token decoder step at per-row `positions` [B] over full-length (L, or 2L with
        `decoder_previous_segment`: the prefix first, valid where the cross keys of the segment are complete)
        self/cross buffers; free of host synchronisation so that it can be captured in a CUDA graph."""
        L = self.config.segment_length
        pos = positions[:, None]
        prefix = self.config.decoder_previous_segment
        key_pos = torch.arange(-L if prefix else 0, L, device=positions.device).expand(positions.shape[0], -1)
        self_mask = key_pos[:, None, :] <= pos[:, :, None]
        if prefix:
            self_mask = self_mask & ((key_pos >= 0) | self.follows_segment(cross_mask)[:, None])[:, None, :]
        cos_sin, rel_index = self._positions(pos, key_pos, dtype)
        return DecoderPlan(cos_sin, rel_index, self_mask[:, None], cross_mask[:, None, None, :],
                           pos + L if prefix else pos)

    def follows_segment(self, cross_mask: torch.Tensor) -> torch.Tensor:
        """[N] bool: the segment whose cross keys are `cross_mask` [N, L (+K)] follows a complete segment (all L
        encoder keys valid; not a document's boot segment), so a `decoder_previous_segment` decoder reads its prefix.
        The cells' rule (a complete encoder input) on the cache's state."""
        return cross_mask[:, :self.config.segment_length].all(1)

    def previous_segment_inputs(self, segments: torch.Tensor) -> torch.Tensor:
        """The decoder inputs [N, L, d] that a `decoder_previous_segment` decoder reads at positions -L..-1 before
        the segment after each of `segments` [N, L, d] (input embeddings): [BOS, segment[:-1]]; the segment's last
        token is the next segment's first own input (docs/design.md#decoder-previous-segment)."""
        bos = self.embed_tokens(torch.full((segments.shape[0], 1), self.config.bos_token_id, device=segments.device))
        return torch.cat([bos.to(segments.dtype), segments[:, :-1]], 1)

    def previous_segment_kv(self, segments: torch.Tensor, cross_states, cross_mask: torch.Tensor | None
                            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The `decoder_previous_segment` prefix of the segment after each of `segments` [N, L, d] (the input
        embeddings of complete segments): per decoder layer the self-attention (K, V) [N, H, L, d_h] of [BOS, segment[:-1]] at
        positions -L..-1, causal, cross-attending to that segment's cross context (`cross_states`, `cross_mask`
        as for `decode_chunks`). The stream paths keep them in front of the segment's own K/V
        (docs/design.md#decoder-previous-segment)."""
        L = self.config.segment_length
        n = segments.shape[0]
        prefix = self.previous_segment_inputs(segments)
        positions = torch.arange(-L, 0, device=segments.device).expand(n, -1)
        cos_sin, rel_index = self._positions(positions, positions, self.embed_tokens.weight.dtype)
        plan = DecoderPlan(cos_sin, rel_index, None, None if cross_mask is None else cross_mask[:, None, None, :],
                           None)
        _, self_kv, _, _ = self.decode_chunks(prefix, None, None, cross_states, None, plan=plan)
        return self_kv

    def previous_segment_plan(self, continues: torch.Tensor, q_len: int, cross_mask: torch.Tensor | None,
                              dtype: torch.dtype) -> DecoderPlan:
        """Plan of a `decoder_previous_segment` decoder call over L prefix inputs (positions -L..-1) followed by
        q_len own inputs (0..q_len-1), causal; the prefix keys count only in the rows where `continues` [N] bool (a
        previous segment exists), and every prefix query keeps its own key so that no query is left without one.
        Free of host synchronisation (CUDA-graph capturable)."""
        L = self.config.segment_length
        device = continues.device
        positions = torch.arange(-L, q_len, device=device)
        key_valid = (positions >= 0)[None, :] | continues[:, None]  # [N, L + q]
        causal = positions[None, :] <= positions[:, None]  # [L + q, L + q]: key <= query
        diagonal = torch.eye(L + q_len, dtype=torch.bool, device=device)
        self_mask = (causal[None] & (key_valid[:, None, :] | diagonal[None]))[:, None]
        positions = positions.expand(continues.shape[0], -1)
        cos_sin, rel_index = self._positions(positions, positions, dtype)
        return DecoderPlan(cos_sin, rel_index, self_mask, None if cross_mask is None else cross_mask[:, None, None, :],
                           None)

    def decode_chunks(
        self,
        inputs_embeds: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
        cross_states: list[tuple[torch.Tensor, torch.Tensor]] | torch.Tensor,
        cross_mask: torch.Tensor | None,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        output_hidden_states: bool = False,
        relayout: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        plan: DecoderPlan | None = None,
        prefix_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]],
               tuple[torch.Tensor, ...] | None]:
        """Run the decoder over N chunks at once.

        inputs_embeds [N, q, d]; chunk j holds positions starts[j]..starts[j]+lengths[j]-1 of its segment
            (`starts=None`: every chunk holds positions 0..q-1, plain causal; `cross_mask` None: all cross keys valid).
        cross_states: the encoder output H [N, L, d] (projected here) or per-layer projected (K, V).
        past: per-layer self K/V buffers [N, H, ≥max(starts), d_h] holding positions < starts[j].
        relayout: with `output_hidden_states`, maps chunk states to (the same states routed through another layout,
            the states in that layout); the layer states are recorded in that layout, as nodes of the graph.
        plan: a ready plan whose self-attention covers exactly the q inputs (`previous_segment_plan`); `starts`,
            `lengths` and `cross_mask` are then not read.
        prefix_valid: [N] bool with `starts` (`decoder_previous_segment`): `past` holds the previous segment's
            prefix K/V at [0, L) (valid in these rows) and the own positions from L on (`_decoder_plan`).
        Returns normalised hidden states, per-layer self K/V buffers, per-layer cross K/V, all layer states."""
        if plan is not None:
            buffer_len = inputs_embeds.shape[1]
        elif starts is None:  # whole segments from position 0 (aligned path): plain causal, no host sync
            n_chunks, q_len = inputs_embeds.shape[:2]
            positions = torch.arange(q_len, device=inputs_embeds.device).expand(n_chunks, -1)
            cos_sin, rel_index = self._positions(positions, positions, inputs_embeds.dtype)
            plan = DecoderPlan(cos_sin, rel_index, None, None if cross_mask is None else cross_mask[:, None, None, :],
                               None)
            buffer_len = q_len
        else:
            plan, buffer_len = self._decoder_plan(starts, lengths, inputs_embeds.shape[1], cross_mask,
                                                  inputs_embeds.dtype, prefix_valid)
        all_hidden = [] if output_hidden_states else None

        def record(states: torch.Tensor) -> torch.Tensor:
            if relayout is not None:
                states, recorded = relayout(states)
            else:
                recorded = states
            all_hidden.append(recorded)
            return states

        hidden = record(inputs_embeds) if output_hidden_states else inputs_embeds
        self_kv, cross_kv = [], []
        for i, layer in enumerate(self.decoder.layers):
            if torch.is_tensor(cross_states):
                ck, cv = layer.project_cross_kv(cross_states)
            else:
                ck, cv = cross_states[i]
            past_k = past_v = None
            if plan.write_index is not None:
                shape = (hidden.shape[0], self.config.num_attention_heads, buffer_len, self.config.head_dim)
                past_k = hidden.new_zeros(shape)
                past_v = hidden.new_zeros(shape)
                if past is not None:
                    width = min(buffer_len, past[i][0].shape[2])
                    past_k[:, :, :width] = past[i][0][:, :, :width]
                    past_v[:, :, :width] = past[i][1][:, :, :width]
            hidden, k, v = layer(hidden, past_k, past_v, ck, cv, plan)
            self_kv.append((k, v))
            cross_kv.append((ck, cv))
            if output_hidden_states and i < len(self.decoder.layers) - 1:
                hidden = record(hidden)
        hidden = self.decoder.norm(hidden)
        if output_hidden_states:  # the last entry is the normalised output, as in transformers' decoders
            hidden = record(hidden)
        return hidden, self_kv, cross_kv, (tuple(all_hidden) if output_hidden_states else None)

    # ------------------------------------------------------------------------------------------ the recurrent step
    def critical_path_step(self, segment_embeds: torch.Tensor, memory: torch.Tensor,
                           mask: torch.Tensor | None = None, graphs: bool | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the recurrence: H = Enc(s, M), M' = BMN(Write(M, H)) for segments [N, L, d] (`mask` [N, L]:
        valid tokens, None: all). Shapes are fixed per (batch, segment length, dtype), so on CUDA without autograd
        the step runs as a captured CUDA graph (its outputs are then overwritten by the next replay); `graphs`: the
        caller's `graphs_usable` answer for a loop of steps."""
        if self._use_graphs(memory.device) if graphs is None else graphs:
            key = ("encode", tuple(segment_embeds.shape), segment_embeds.dtype, memory.dtype, mask is None)
            inputs = (segment_embeds, memory) if mask is None else (segment_embeds, memory, mask)
            step = self._step_graphs.get(key, lambda: GraphedStep(self._encode_step, inputs))
            return step(*inputs)
        return self._encode_step(segment_embeds, memory, mask)

    def _encode_step(self, segment_embeds: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, new_memory, _, _ = self.encode_segment(segment_embeds, mask, memory)
        return hidden, new_memory

    def _aligned_offset(self, input_ids, cache, memory_reset, n: int) -> tuple[int, bool] | None:
        """Where the new columns start in every row's segment grid when all rows are in the same state (the aligned
        fast path): 0 or 1 for rows that all start a document (BOS column 0 or an implicit BOS), fill + 1 for rows that
        all continue with the same partial segment, and whether the rows start a document; None when the input is irregular (padding, mixed states, special
        outputs) and the general planner must run. The caller has checked that there is no padding."""
        cfg = self.config
        if n == 0:
            return None
        if cache is None or cache.is_empty:
            started = [False] * input_ids.shape[0]
            fills = [0] * input_ids.shape[0]
        else:
            if cache.segment_embeds is not None:  # the partial segment holds `inputs_embeds` tokens: general path
                return None
            started, fills = cache.host_state()
            if memory_reset is not None:
                reset = memory_reset.tolist()
                started = [s and not r for s, r in zip(started, reset)]
        if all(started):  # (a decoder_previous_segment continuation needs the cached prefix: the general path)
            return (fills[0] + 1, False) if len(set(fills)) == 1 and not cfg.decoder_previous_segment else None
        if any(started) or cfg.first_segment_context != "bos":
            return None
        first = (input_ids[:, 0] == cfg.bos_token_id).tolist()
        return (0, True) if all(first) else ((1, True) if not any(first) else None)

    def aligned_grid(self, input_ids: torch.Tensor, cache: MemformerCache | None, offset: int, fresh: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token grid of an aligned call (`_aligned_offset`): [B, C·L] with column j of the input at grid position
        offset + j, the cached partial segment at positions 1..fill for continued rows and BOS at position 0; and the
        decoder inputs [B, C, L] (each chunk starts with BOS: the token at that grid position only completed the
        previous segment; with `decoder_previous_segment` that token, the true stream, and BOS only in chunk 0). Segment c is grid positions cL+1 .. (c+1)L."""
        L, (b, n), bos = self.config.segment_length, input_ids.shape, self.config.bos_token_id
        n_chunks = -(-(offset + n) // L)
        grid = input_ids.new_full((b, n_chunks * L), bos, dtype=torch.long)
        grid[:, offset:offset + n] = input_ids
        if not fresh and offset > 1:
            grid[:, 1:offset] = cache.segment_ids[:, : offset - 1]
        decoder_ids = grid.view(b, n_chunks, L).clone()
        if self.config.decoder_previous_segment:  # the true stream: BOS only at the document's start
            decoder_ids[:, 0, 0] = bos
        else:
            decoder_ids[:, :, 0] = bos
        return grid, decoder_ids

    def _forward_aligned(self, input_ids: torch.Tensor, cache: MemformerCache | None, offset: int, fresh: bool,
                         use_cache: bool, columns_to_keep: torch.Tensor | None) -> MemformerModelOutput:
        """Stream mode when every row is in the same state and the input has no padding: the segment grid is a
        reshape, the critical path runs one fixed-shape step per segment and the decoder runs once over all the
        segments that need outputs. Column j of the input sits at grid position g = offset + j: decoder chunk g // L,
        position g % L (position 0 of a chunk is BOS); segment c holds grid positions cL+1 .. (c+1)L."""
        cfg = self.config
        L, b, n = cfg.segment_length, input_ids.shape[0], input_ids.shape[1]
        device, bos = input_ids.device, cfg.bos_token_id
        total = offset + n
        n_chunks, n_segments = -(-total // L), (total - 1) // L
        grid, decoder_ids = self.aligned_grid(input_ids, cache, offset, fresh)

        # critical path: boot segment (new documents), then one step per complete segment
        step_index = 0
        if fresh:
            boot = grid.new_full((b, L), bos)
            boot_mask = torch.zeros(b, L, dtype=torch.bool, device=device)
            boot_mask[:, 0] = True
            boot_hidden, memory, _, _ = self.encode_segment(self.embed_tokens(boot), boot_mask,
                                                            self.initial_memory(b))
            boot_hidden, boot_mask = self.cross_context(boot_hidden, memory, boot_mask)
            step_index = 1
        else:
            memory = cache.memory.to(self.memory_dtype)
        segments = self.embed_tokens(grid[:, 1: n_segments * L + 1].view(b, n_segments, L))
        hidden_states = []
        graphs = self._use_graphs(device)
        for s in range(n_segments):
            if cfg.bptt_horizon and self.training and step_index > 0 and step_index % cfg.bptt_horizon == 0:
                memory = memory.detach()
            hidden, memory = self.critical_path_step(segments[:, s], memory, graphs=graphs)
            if self.decoder_memory_norm is not None:  # [H ; N(M')]: a new tensor (graph buffers are not kept)
                hidden_states.append(self.cross_context(hidden, memory, None)[0])
            else:
                hidden_states.append(hidden.clone() if graphs else hidden)
            step_index += 1
        if n_segments and graphs:
            memory = memory.clone()  # the graph's output buffer is overwritten by its next replay

        # decoder over the chunks whose outputs are needed (all, or those holding kept columns + the last one)
        if columns_to_keep is None:
            chunks = list(range(n_chunks))
        else:
            wanted = {(offset + int(c)) // L for c in columns_to_keep.tolist() if 0 <= int(c) < n}
            if use_cache or not wanted:
                wanted.add(n_chunks - 1)
            chunks = sorted(wanted)
        index = torch.tensor(chunks, dtype=torch.long, device=device)
        dec_in = self.embed_tokens(decoder_ids[:, index].flatten(0, 1))
        first_from_cache = chunks[0] == 0 and not fresh
        states = ([boot_hidden[:, None]] if fresh and chunks[0] == 0 else []) + \
                 [hidden_states[c - 1][:, None] for c in chunks if c > 0]
        states = torch.cat(states, 1) if states else None  # [b, chunks needing a projection, L (+K), d]
        cross_kv = []
        for i, layer in enumerate(self.decoder.layers):
            parts_k, parts_v = [], []
            if first_from_cache:
                parts_k.append(cache.layers[i].cross_keys[:, None])
                parts_v.append(cache.layers[i].cross_values[:, None])
            if states is not None:
                k, v = layer.project_cross_kv(states.flatten(0, 1))
                parts_k.append(k.unflatten(0, (b, -1)))
                parts_v.append(v.unflatten(0, (b, -1)))
            cross_kv.append((torch.cat(parts_k, 1).flatten(0, 1), torch.cat(parts_v, 1).flatten(0, 1)))
        cross_mask = None
        width = self.cross_length
        if chunks[0] == 0 and (fresh or not bool(cache.cross_mask.all())):
            first = boot_mask if fresh else cache.cross_mask
            cross_mask = torch.ones(b, len(chunks), width, dtype=torch.bool, device=device)
            cross_mask[:, 0] = first
            cross_mask = cross_mask.flatten(0, 1)
        starts = past = prefix_valid = None
        if cfg.decoder_previous_segment:  # (fresh rows only, `_aligned_offset`) chunk c ≥ 1 reads segment c − 1
            prefix_valid = (index > 0).repeat(b)
            complete = F.pad(grid, (0, 1), value=bos)[:, 1: max(n_chunks - 1, 1) * L + 1].view(b, -1, L)
            segments = complete[:, (index - 1).clamp(0, complete.shape[1] - 1)].flatten(0, 1)  # chunk 0: unused
            prefix_kv = self.previous_segment_kv(self.embed_tokens(segments), cross_kv, cross_mask)
            past = [(F.pad(k, (0, 0, 0, L)), F.pad(v, (0, 0, 0, L))) for k, v in prefix_kv]
            starts = torch.zeros(b * len(chunks), dtype=torch.long, device=device)
        hidden, self_kv, cross_kv, _ = self.decode_chunks(
            dec_in, starts, None if starts is None else torch.full_like(starts, L), cross_kv, cross_mask, past,
            prefix_valid=prefix_valid)
        hidden = hidden.view(b, len(chunks), L, -1)

        if len(chunks) == n_chunks:
            out = hidden.flatten(1, 2)[:, offset:total]
            output_mask = torch.ones(b, n, dtype=torch.bool, device=device)
        else:
            columns = torch.cat([torch.arange(c * L, (c + 1) * L, device=device) for c in chunks]) - offset
            keep = (columns >= 0) & (columns < n)
            out = hidden.new_zeros(b, n, hidden.shape[-1])
            out[:, columns[keep]] = hidden.flatten(1, 2)[:, keep]
            output_mask = torch.zeros(b, n, dtype=torch.bool, device=device)
            output_mask[:, columns[keep]] = True

        if use_cache:
            fill = total - 1 - n_segments * L
            segment_ids = torch.zeros(b, L, dtype=torch.long, device=device)
            segment_ids[:, :fill] = grid[:, n_segments * L + 1: n_segments * L + 1 + fill]
            valid = (torch.arange(L, device=device) <= fill)[None, None, :, None]
            if cfg.decoder_previous_segment:  # the prefix, then the segment's own positions
                valid = torch.cat([torch.ones_like(valid), valid], 2)
            last = len(chunks) - 1
            pick = lambda t: t.view(b, len(chunks), *t.shape[1:])[:, last]  # noqa: E731
            last_mask = (cross_mask.view(b, len(chunks), width)[:, last] if cross_mask is not None
                         else torch.ones(b, width, dtype=torch.bool, device=device))
            decoder_state = (torch.arange(b, device=device),
                             [(pick(k) * valid, pick(v) * valid) for k, v in self_kv],
                             [(pick(k), pick(v)) for k, v in cross_kv], last_mask)
            cache.write(memory=memory, segment_ids=segment_ids,
                        fill=torch.full((b,), fill, dtype=torch.long, device=device),
                        started=torch.ones(b, dtype=torch.bool, device=device), decoder_state=decoder_state,
                        dtype=self.embed_tokens.weight.dtype, host=([True] * b, [fill] * b))
            cache.consumed += n
        result = MemformerModelOutput(last_hidden_state=out, output_mask=output_mask, memory=memory)
        if use_cache:
            result[CACHE_KWARG] = cache
        return result

    # ------------------------------------------------------------------------------------------ decoding step
    def _decode_eligible(self, cache: MemformerCache | None, n: int, memory_reset: torch.Tensor | None = None) -> bool:
        """One new column (no padding), every row started and none reset, no autograd: the fixed-shape decoder step."""
        if n != 1 or cache is None or cache.is_empty or self.training or torch.is_grad_enabled():
            return False
        if memory_reset is not None and bool(memory_reset.any()):  # a reset row starts a document: general paths
            return False
        if cache.segment_embeds is not None:  # the partial segment holds `inputs_embeds` tokens: general path
            return False
        return all(cache.host_state()[0])

    def _decode_step_inplace(self, cache: MemformerCache, tokens: torch.Tensor, boundary: bool) -> torch.Tensor:
        """Consume one token per row ([B]) and return the decoder's final hidden state [B, d]. Updates the cache's
        tensors in place (so a CUDA graph can own them). With `boundary`, rows whose segment completes are encoded,
        their memory written and their cross K/V rebuilt; the other rows' state is left as it was."""
        cfg, L = self.config, self.config.segment_length
        fill = cache.fill
        cache.segment_ids.scatter_(1, fill[:, None].clamp_max(L - 1), tokens[:, None])
        if boundary:
            at_boundary = fill == L - 1
            hidden, memory, _, _ = self.encode_segment(self.embed_tokens(cache.segment_ids), None, cache.memory)
            commit = at_boundary[:, None, None]
            hidden = self.cross_context(hidden, memory, None)[0]
            cache.memory.copy_(torch.where(commit, memory.to(cache.memory.dtype), cache.memory))
            for layer, cache_layer in zip(self.decoder.layers, cache.layers):
                k, v = layer.project_cross_kv(hidden)
                cache_layer.cross_keys.copy_(torch.where(commit[:, None], k.to(cache_layer.cross_keys.dtype),
                                                         cache_layer.cross_keys))
                cache_layer.cross_values.copy_(torch.where(commit[:, None], v.to(cache_layer.cross_values.dtype),
                                                           cache_layer.cross_values))
            cache.cross_mask.copy_(cache.cross_mask | at_boundary[:, None])
            if cfg.decoder_previous_segment:  # the new segment's prefix; its first input is the token just consumed
                prefix_kv = self.previous_segment_kv(
                    self.embed_tokens(cache.segment_ids), [(lay.cross_keys, lay.cross_values) for lay in cache.layers],
                    cache.cross_mask)
                for cache_layer, (pk, pv) in zip(cache.layers, prefix_kv):
                    for buffer, new in ((cache_layer.keys, pk), (cache_layer.values, pv)):
                        buffer[:, :, :L].copy_(torch.where(commit[:, None], new.to(buffer.dtype), buffer[:, :, :L]))
            else:
                tokens = torch.where(at_boundary, torch.full_like(tokens, cfg.bos_token_id), tokens)
            positions = torch.where(at_boundary, torch.zeros_like(fill), fill + 1)
        else:
            positions = fill + 1
        plan = self.step_plan(positions, cache.cross_mask, self.embed_tokens.weight.dtype)
        hidden = self.embed_tokens(tokens)[:, None]
        for layer, cache_layer in zip(self.decoder.layers, cache.layers):
            hidden, _, _ = layer(hidden, cache_layer.keys, cache_layer.values, cache_layer.cross_keys,
                                 cache_layer.cross_values, plan)
        fill.copy_(torch.where(positions == 0, torch.zeros_like(fill), fill + 1) if boundary else fill + 1)
        return self.decoder.norm(hidden)[:, 0]

    def _forward_decode(self, input_ids: torch.Tensor, cache: MemformerCache) -> MemformerModelOutput:
        """The per-token decoding path: one fixed-shape step (a replayed CUDA graph on GPUs) on the cache's tensors."""
        L, b = self.config.segment_length, input_ids.shape[0]
        _, fills = cache.host_state()
        boundary = any(f == L - 1 for f in fills)
        tokens = input_ids[:, 0].long()
        if self._use_graphs(input_ids.device):
            state = self._adopt_static_state(cache)
            key = ("decode", b, boundary, state[0].data_ptr())
            step = self._step_graphs.get(
                key, lambda: GraphedStep(lambda t: (self._decode_step_inplace(cache, t, boundary),),
                                               (tokens,), state=state))
            hidden = step(tokens)[0].clone()
        else:
            if not cache._written_in_place:  # never write into tensors that a caller may still hold
                host = cache._host
                cache._map_rows(lambda t: t.clone())
                cache._host, cache._written_in_place = host, True
            hidden = self._decode_step_inplace(cache, tokens, boundary)
        new_fills = [0 if f == L - 1 else f + 1 for f in fills]
        cache._host = ([True] * b, new_fills)
        cache._mark_trusted()  # the model's own write
        cache.consumed += 1
        result = MemformerModelOutput(last_hidden_state=hidden[:, None], memory=cache.memory.clone(),
                                      output_mask=torch.ones(b, 1, dtype=torch.bool, device=input_ids.device))
        result[CACHE_KWARG] = cache
        return result

    def _adopt_static_state(self, cache: MemformerCache) -> list[torch.Tensor]:
        """Make the cache's tensors the fixed buffers that the captured decoder steps of this batch size update in
        place (copying its state in); a cache that held them before gets its own copies first."""
        tensors = cache._all_tensors()
        held = cache._graph_buffers
        if held is not None and all(t is b for t, b in zip(tensors, held)):  # every token after the first
            return held
        key = ("buffers", tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors))
        entry = self._static_buffers.get(key)
        if entry is None or entry["buffers"][0].device != tensors[0].device:
            entry = self._static_buffers[key] = {"buffers": [t.detach().clone() for t in tensors], "owner": None}
        buffers = entry["buffers"]
        owner = entry["owner"]() if entry["owner"] is not None else None
        if owner is not None and owner is not cache and owner.memory is buffers[0]:
            host, consumed = owner._host, owner.consumed
            owner._set_all_tensors([t.clone() for t in buffers])
            owner._host, owner.consumed = host, consumed
        for buf, t in zip(buffers, tensors):
            buf.copy_(t)
        host, trusted = cache._host, cache.is_trusted
        cache._set_all_tensors(buffers)
        cache._host, cache._written_in_place = host, True
        if trusted:
            cache._mark_trusted()
        entry["owner"] = weakref.ref(cache)
        cache._graph_buffers = buffers
        return buffers

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: MemformerCache | None = None,
        use_cache: bool | None = None,
        memory_reset: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_memory_states: bool = False,
        output_memory_attentions: bool = False,
        return_dict: bool | None = None,
        encoder_input_ids: torch.LongTensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        critical_path_only: bool = False,
        columns_to_keep: torch.Tensor | None = None,
        replay_step: int | None = None,
        replay_memory: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        r"""
        Stream mode:
            input_ids / inputs_embeds [B, n]: any length; each row's real tokens (attention_mask 1) are consumed in
                order. A row's first token, if it is BOS, is its boot segment (else an implicit BOS boot is added;
                with `inputs_embeds` the boot is always implicit, as a BOS embedding cannot be recognised).
            attention_mask [B, n]: 0 marks padding (left padding for generation); pads never reach the memory.
            past_key_values (`MemformerCache`): the state to continue from; updated in place and returned.
            memory_reset [B] bool: rows that restart from the initial memory m₀ (a new document) in this call.
            output_memory_states / output_memory_attentions: return the memory after every encode step, and the
                writer [B, H_w, K, 1+L] and reader [B, H, L, K] attention maps of every encode step.
            columns_to_keep: internal (`logits_to_keep` of the LM head): only columns selected here need outputs.
            replay_step / replay_memory: internal to MRBP (`mrbp.memory_replay_backward`): recompute encode step k
                from its stored memory and only the decoder chunks that depend on it.
        Cell mode (docs/design.md#cell):
            encoder_input_ids, encoder_attention_mask, decoder_input_ids, decoder_attention_mask [B, L]; memory
            [B, K, d] (None: m₀); memory_reset [B]; critical_path_only skips the decoder.
        """
        kw_cache = kwargs.pop("cache", None)
        past_key_values = past_key_values if past_key_values is not None else kw_cache
        if kwargs.get("output_attentions"):
            raise ValueError("Memformer does not return attention weights (`output_attentions=True`): its decoder "
                             "attends over segment-local chunks, so there is no [sequence, sequence] map. "
                             "`output_memory_attentions=True` returns the memory writer's and readers' maps.")
        if kwargs.get("position_ids") is not None:
            raise ValueError("Memformer does not take `position_ids`: positions restart in every segment and follow "
                             "from the stream itself (the cache and `attention_mask`).")
        memory_reset = _as_row_flags(memory_reset, "memory_reset")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        if encoder_input_ids is not None or decoder_input_ids is not None:
            given = [name for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                                              ("attention_mask", attention_mask), (CACHE_KWARG, past_key_values))
                     if value is not None]
            if given:
                raise ValueError(f"Cell mode (`encoder_input_ids` / `decoder_input_ids`) does not take "
                                 f"{', '.join(f'`{name}`' for name in given)}: a cell reads `memory` (m0 when None) "
                                 "and its own masks `encoder_attention_mask` / `decoder_attention_mask`; stream "
                                 "mode takes `input_ids` with `attention_mask` and a cache (docs/design.md#cell).")
            out = self._forward_cell(encoder_input_ids, encoder_attention_mask, decoder_input_ids,
                                     decoder_attention_mask, memory, memory_reset, critical_path_only,
                                     output_hidden_states, output_memory_attentions,
                                     kwargs.pop("validate_inputs", True))
        else:
            if memory is not None:
                raise ValueError("`memory` is a cell-mode input (with `encoder_input_ids` / `decoder_input_ids`); a "
                                 "stream's memory lives in its cache: pass a MemformerCache as `past_key_values` "
                                 "(`cache.set_state(memory=..., ...)` stores one of your own).")
            out = self._forward_stream(input_ids, attention_mask, inputs_embeds, past_key_values, use_cache,
                                       memory_reset, output_hidden_states, output_memory_states,
                                       output_memory_attentions, columns_to_keep, replay_step, replay_memory)
        return out if return_dict else out.to_tuple()

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")
        if ids.numel():
            low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"`{name}` holds token ids outside [0, vocab_size={self.config.vocab_size}): "
                                 f"min {low}, max {high}.")

    def _check_inputs_embeds(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse integer embeddings, and NaN, inf, or values beyond ±sqrt(max / d) / 2 of the normalisation dtype
        (float32; float64 for a float64 model: the embeddings are cast to the model's dtype, as the embedding layer's
        output is) or beyond a float16 model's largest value (the cast would overflow) at real positions: the first
        reach the memory and every later segment, the others overflow a norm's sum of d squared deviations (NaN
        logits). Pads are never read. One host sync."""
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"`inputs_embeds` must be a float tensor, got dtype {inputs_embeds.dtype}.")
        model_dtype = self.embed_tokens.weight.dtype
        norm_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
        limit = (torch.finfo(norm_dtype).max / inputs_embeds.shape[-1]) ** 0.5 / 2
        why = (f"the normalisation layers' sums of their squares would overflow "
               f"{str(norm_dtype).removeprefix('torch.')}")
        if torch.finfo(model_dtype).max < limit:
            limit = torch.finfo(model_dtype).max
            why = f"they would overflow the model's {str(model_dtype).removeprefix('torch.')} when cast to it"
        in_range = inputs_embeds.abs() <= limit  # False for NaN and inf
        if bool((in_range.all(-1) | ~mask).all()):
            return
        if not bool((torch.isfinite(inputs_embeds).all(-1) | ~mask).all()):
            raise ValueError("`inputs_embeds` contains NaN or inf values at real (attention_mask 1) positions.")
        raise ValueError(f"`inputs_embeds` holds values beyond ±{limit:.3g} at real (attention_mask 1) positions: "
                         f"{why} (NaN outputs).")

    def _check_memory(self, memory: torch.Tensor, batch_size: int, name: str) -> None:
        """Refuse a memory of the wrong shape, with NaN or inf, or with values beyond `memory.memory_bound` (where the
        norms over it overflow: NaN outputs). One host sync."""
        expected = (batch_size, self.config.num_memory_slots, self.config.hidden_size)
        if memory.dim() != 3 or memory.shape[1:] != expected[1:]:
            raise ValueError(f"`{name}` must have shape (batch, num_memory_slots, hidden_size) = "
                             f"({batch_size}, {expected[1]}, {expected[2]}), got {tuple(memory.shape)}.")
        if memory.shape[0] != batch_size:
            raise ValueError(f"Memory batch size {memory.shape[0]} != input batch size {batch_size} (`{name}`).")
        limit, why = memory_bound(self.config.hidden_size, self.embed_tokens.weight.dtype)
        if bool((memory.abs() <= limit).all()):  # False for NaN and inf
            return
        if not bool(torch.isfinite(memory).all()):
            raise ValueError(f"`{name}` contains NaN or inf values.")
        raise ValueError(f"`{name}` holds values beyond ±{limit:.3g}: {why} (NaN outputs).")

    def _forward_cell(self, enc_ids, enc_mask, dec_ids, dec_mask, memory, memory_reset, critical_path_only,
                      output_hidden_states, output_memory_attentions, validate_inputs=True):
        """One recurrence cell per row: H = Enc(enc, M), M' = BMN(Write(M, H)), the decoder over `dec_ids`
        cross-attending to H. The decoder runs plain causal: `decoder_attention_mask` marks a valid prefix and the
        outputs after it are undefined (their labels are -100). No host sync when `validate_inputs=False` (the MRBP
        engine validates a whole window once)."""
        if enc_ids is None or (dec_ids is None and not critical_path_only):
            raise ValueError("Cell mode needs `encoder_input_ids` and (unless critical_path_only) `decoder_input_ids`.")
        L = self.config.segment_length
        for name, t in (("encoder_input_ids", enc_ids), ("decoder_input_ids", dec_ids)):
            if t is None:
                continue
            if t.dim() != 2 or t.shape[1] > L or t.shape[0] != enc_ids.shape[0]:
                raise ValueError(f"`{name}` must have shape (batch, ≤ segment_length={L}), got {tuple(t.shape)}.")
            if validate_inputs:
                self._check_ids(t, name)
        if enc_mask is not None and enc_mask.shape != enc_ids.shape:
            raise ValueError(f"`encoder_attention_mask` must have the shape of `encoder_input_ids` "
                             f"{tuple(enc_ids.shape)}, got {tuple(enc_mask.shape)}.")
        memory = self.cell_memory(memory, memory_reset, enc_ids.shape[0], validate_inputs)
        enc_mask = (torch.ones_like(enc_ids, dtype=torch.bool) if enc_mask is None else enc_mask.bool())
        if validate_inputs and self.config.decoder_previous_segment and not critical_path_only:
            self._check_previous_segment_layout(enc_ids, enc_mask, dec_ids)
        if not (critical_path_only or output_hidden_states or output_memory_attentions):
            if self._use_graphs(enc_ids.device):  # the whole cell is one captured graph (evaluation)
                inputs = (enc_ids, enc_mask, dec_ids, memory)
                key = ("cell", tuple(enc_ids.shape), tuple(dec_ids.shape), memory.dtype)
                step = self._step_graphs.get(key, lambda: GraphedStep(self._cell_step, inputs))
                last_hidden, new_memory = (t.clone() for t in step(*inputs))  # the next replay overwrites them
            else:
                last_hidden, new_memory = self._cell_step(enc_ids, enc_mask, dec_ids, memory)
            return MemformerModelOutput(last_hidden_state=last_hidden, memory=new_memory)
        # analysis outputs, or the critical path alone (MRBP's forward sweep)
        embeds = self.embed_tokens(enc_ids)
        write_probs = reads = None
        if output_memory_attentions:
            hidden, new_memory, write_probs, reads = self.encode_segment(embeds, enc_mask, memory)
        else:
            graphs = self._use_graphs(embeds.device)
            hidden, new_memory = self.critical_path_step(embeds, memory, enc_mask, graphs=graphs)
            if graphs:  # graph output buffers are overwritten by the next replay
                hidden, new_memory = (hidden if critical_path_only else hidden.clone()), new_memory.clone()
        last_hidden = all_hidden = None
        if not critical_path_only:
            last_hidden, all_hidden = self._decode_cell(enc_ids, enc_mask, dec_ids, hidden, new_memory,
                                                        output_hidden_states)
        return MemformerModelOutput(
            last_hidden_state=last_hidden, memory=new_memory, hidden_states=all_hidden,
            writer_attentions=(write_probs,) if output_memory_attentions else None,
            reader_attentions=(reads,) if output_memory_attentions else None)

    def _cell_step(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor, dec_ids: torch.Tensor, memory: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One cell without analysis outputs: (the decoder's normalised hidden states, M'). Fixed shapes and no host
        sync (the inputs are validated before), so that without autograd on CUDA it runs as one captured graph."""
        hidden, new_memory = self._encode_step(self.embed_tokens(enc_ids), memory, enc_mask)
        return self._decode_cell(enc_ids, enc_mask, dec_ids, hidden, new_memory)[0], new_memory

    def _decode_cell(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor, dec_ids: torch.Tensor, hidden: torch.Tensor,
                     new_memory: torch.Tensor, output_hidden_states: bool = False
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """A cell's decoder over `dec_ids`, cross-attending to the encoder output H (and M' with
        `decoder_reads_memory`); with `decoder_previous_segment` over the previous segment first."""
        context, context_mask = self.cross_context(hidden, new_memory, enc_mask)
        if self.config.decoder_previous_segment:
            return self._decode_over_previous_segment(enc_ids, enc_mask, dec_ids, context, context_mask,
                                                      output_hidden_states)
        last_hidden, _, _, all_hidden = self.decode_chunks(self.embed_tokens(dec_ids), None, None, context,
                                                           context_mask, output_hidden_states=output_hidden_states)
        return last_hidden, all_hidden

    def cell_memory(self, memory: torch.Tensor | None, memory_reset: torch.Tensor | None, batch_size: int,
                    validate_inputs: bool = True) -> torch.Tensor:
        """The memory a cell reads: `memory` (None: m0) with the rows flagged in `memory_reset` [B] set to m0."""
        m0 = self.initial_memory(batch_size)
        if memory is None:
            memory = m0
        else:
            if validate_inputs:
                self._check_memory(memory, batch_size, "memory")
            memory = memory.to(self.memory_dtype)
        if memory_reset is not None:
            if memory_reset.shape != (batch_size,):
                raise ValueError(f"`memory_reset` must have shape (batch,) = ({batch_size},), "
                                 f"got {tuple(memory_reset.shape)}.")
            memory = torch.where(memory_reset.to(memory.device).bool()[:, None, None], m0, memory)
        return memory

    def _check_previous_segment_layout(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor, dec_ids: torch.Tensor
                                       ) -> None:
        """`decoder_previous_segment`: a row continuing a complete segment must start its decoder input with that
        segment's last token (`previous_segment_breaks`). One host sync."""
        broken = previous_segment_breaks(enc_ids, enc_mask, dec_ids, self.config.segment_length)
        if bool(broken.any()):
            raise ValueError(PREVIOUS_SEGMENT_LAYOUT_ERROR.format(
                where=f"rows {broken.nonzero().flatten().tolist()} have"))

    def _decode_over_previous_segment(self, enc_ids, enc_mask, dec_ids, context, context_mask,
                                      output_hidden_states: bool):
        """The `decoder_previous_segment` decoder of one cell (docs/design.md#decoder-previous-segment): a row whose
        encoder input is a complete segment p (all L tokens valid) continues it: the decoder runs over
        [BOS, p_0..p_{L-2}] at positions -L..-1, then its own inputs, the first of which must be p_{L-1}; only the
        own positions are returned. Other rows (boot and inactive cells) decode their own inputs alone."""
        L = self.config.segment_length
        b, q = dec_ids.shape
        if enc_ids.shape[1] == L:
            continues = enc_mask.all(1)
            prefix = self.previous_segment_inputs(self.embed_tokens(enc_ids))
        else:  # a shorter encoder input is never a complete previous segment (the prefix is masked: any values)
            continues = torch.zeros(b, dtype=torch.bool, device=dec_ids.device)
            prefix = self.embed_tokens(dec_ids.new_full((b, L), self.config.bos_token_id))
        plan = self.previous_segment_plan(continues, q, context_mask, self.embed_tokens.weight.dtype)
        window = torch.cat([prefix, self.embed_tokens(dec_ids)], 1)
        hidden, _, _, all_hidden = self.decode_chunks(window, None, None, context, None,
                                                      output_hidden_states=output_hidden_states, plan=plan)
        if all_hidden is not None:
            all_hidden = tuple(h[:, L:] for h in all_hidden)
        return hidden[:, L:], all_hidden

    def _forward_stream(self, input_ids, attention_mask, inputs_embeds, cache, use_cache, memory_reset,
                        output_hidden_states, output_memory_states, output_memory_attentions, columns_to_keep,
                        replay_step, replay_memory):
        cfg = self.config
        L, d, H = cfg.segment_length, cfg.hidden_size, cfg.num_attention_heads
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds` (or the cell-mode inputs).")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
            self._check_ids(input_ids, "input_ids")
            b, n = input_ids.shape
            device = input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d:
                raise ValueError(f"`inputs_embeds` must have shape (batch, sequence, {d}), "
                                 f"got {tuple(inputs_embeds.shape)}.")
            b, n = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if attention_mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < n:
                raise ValueError(f"`attention_mask` must have shape (batch, ≥ sequence) = ({b}, {n}), "
                                 f"got {tuple(attention_mask.shape)}.")
            mask = attention_mask[:, attention_mask.shape[1] - n:].bool()  # generate passes past + new columns
        if inputs_embeds is not None:
            self._check_inputs_embeds(inputs_embeds, mask.to(device))
            inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)
        if memory_reset is not None:
            if memory_reset.shape != (b,):
                raise ValueError(f"`memory_reset` must have shape (batch,) = ({b},), got {tuple(memory_reset.shape)}.")
            memory_reset = memory_reset.to(device).bool()
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        if cache is not None and not isinstance(cache, MemformerCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # the empty default cache generate() may hand us
            elif type(cache).__name__ == MemformerCache.__name__:  # the same class from another copy of the code
                raise ValueError(f"This MemformerCache comes from module `{type(cache).__module__}`, but this model's "
                                 f"code is `{MemformerCache.__module__}` (e.g. a model loaded with trust_remote_code=True "
                                 "before `import memformer_hf`): build the cache with the model's own code, or import "
                                 "memformer_hf before loading the model.")
            else:
                raise ValueError(f"Memformer needs a MemformerCache as `past_key_values`, got {type(cache).__name__}.")
        if cache is not None:  # also casts the cached K/V to the compute dtype and checks an outside state for NaN
            cache.check_compatible(cfg, b, dtype=self.embed_tokens.weight.dtype, device=device)
        elif use_cache:
            cache = MemformerCache(cfg)
        have_state = cache is not None and not cache.is_empty
        fast = (self.use_fast_paths and input_ids is not None and replay_step is None
                and not (output_hidden_states or output_memory_states or output_memory_attentions))
        full = fast and (attention_mask is None or bool(mask.all()))
        if full and use_cache and self._decode_eligible(cache, n, memory_reset):
            return self._forward_decode(input_ids, cache)
        aligned = self._aligned_offset(input_ids, cache, memory_reset, n) if full else None
        if aligned is not None:
            return self._forward_aligned(input_ids, cache, *aligned, use_cache, columns_to_keep)
        mem_dtype = self.memory_dtype

        # ---- previous state
        if have_state:
            started = cache.started.clone()
            if memory_reset is not None:
                started &= ~memory_reset
            fill = cache.fill
            carried = cache.memory.to(mem_dtype)
            seg_ids, seg_embeds = cache.segment_ids, cache.segment_embeds
        else:
            started = torch.zeros(b, dtype=torch.bool, device=device)
            fill = torch.zeros(b, dtype=torch.long, device=device)
            carried = None
            seg_ids = seg_embeds = None

        started_host = started.tolist()
        plan = plan_stream(cfg, None if input_ids is None else input_ids.cpu(), mask.cpu(), started_host,
                           fill.tolist(), n)

        # ---- token sources: [cached partial segment | new columns | BOS], as ids where all of them are known,
        # else as embeddings (new columns given as `inputs_embeds`, or a cached partial segment that holds some)
        bos = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long, device=device)
        source = emb_source = None
        if input_ids is not None:
            cached = seg_ids if seg_ids is not None else torch.zeros(b, L, dtype=torch.long, device=device)
            source = torch.cat([cached, input_ids.long(), bos], dim=1)
        if input_ids is None or seg_embeds is not None:
            cached_emb = (seg_embeds if seg_embeds is not None else self.embed_tokens(seg_ids) if seg_ids is not None
                          else self.embed_tokens.weight.new_zeros(b, L, d))
            new_emb = inputs_embeds if input_ids is None else self.embed_tokens(input_ids)
            emb_source = torch.cat([cached_emb.to(new_emb.dtype), new_emb, self.embed_tokens(bos)], dim=1)

        if emb_source is None:
            def embed(rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
                return self.embed_tokens(source[rows[:, None], src])
        else:
            def embed(rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
                return emb_source[rows[:, None], src]

        def pad_sources(lists: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
            src = torch.full((len(lists), width), L + n, dtype=torch.long)
            valid = torch.zeros(len(lists), width, dtype=torch.bool)
            for j, s in enumerate(lists):
                src[j, : len(s)] = torch.tensor(s, dtype=torch.long)
                valid[j, : len(s)] = True
            return src.to(device), valid.to(device)

        # ---- critical path: encoder + writer, sequential over encode steps
        booted = torch.tensor(plan.booted, dtype=torch.bool, device=device)
        m0 = self.initial_memory(b)
        n_steps = len(plan.encodes)
        if replay_step is not None:
            if replay_memory is None:
                raise ValueError("`replay_step` needs `replay_memory`.")
            steps = [replay_step] if replay_step < n_steps else []
            mem = replay_memory
            if replay_step == 0:
                mem = torch.where(booted[:, None, None], m0, mem)
        else:
            steps = range(n_steps)
            mem = m0 if carried is None else torch.where(booted[:, None, None], m0, carried)
        memory_states = [mem] if output_memory_states else None
        enc_hidden: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # step → (rows, H, mask)
        writer_attn, reader_attn = [], []
        for k in steps:
            if replay_step is None and cfg.bptt_horizon and self.training and k > 0 and k % cfg.bptt_horizon == 0:
                mem = mem.detach()
            rows = torch.tensor([r for r, _ in plan.encodes[k]], dtype=torch.long, device=device)
            src, valid = pad_sources([s for _, s in plan.encodes[k]], L)
            emask = None if bool(valid.all()) else valid
            hidden, new_rows, wp, reads = self.encode_segment(embed(rows, src), emask, mem[rows])
            mem = mem.index_copy(0, rows, new_rows)
            enc_hidden[k] = (rows, *self.cross_context(hidden, new_rows, valid))
            if output_memory_states:
                memory_states.append(mem)
            if output_memory_attentions:
                writer_attn.append(wp.new_zeros(b, *wp.shape[1:]).index_copy(0, rows, wp))
                reader_attn.append(tuple(r.new_zeros(b, *r.shape[1:]).index_copy(0, rows, r) for r in reads))

        # ---- which decoder chunks must run
        last_chunk_of_row: dict[int, int] = {}
        for j, ch in enumerate(plan.chunks):
            last_chunk_of_row[ch.row] = j
        if replay_step is not None:
            needed = [j for j, ch in enumerate(plan.chunks)
                      if ch.enc == replay_step or (replay_step == 0 and ch.enc is None)]
        elif columns_to_keep is None or output_hidden_states:
            needed = list(range(len(plan.chunks)))
        else:
            keep = set(columns_to_keep.tolist())
            needed = [j for j, ch in enumerate(plan.chunks)
                      if (use_cache and last_chunk_of_row.get(ch.row) == j) or any(c in keep for c in ch.cols)]

        hidden_out = output_mask = None
        all_hidden_out = None
        if needed:
            chs = [plan.chunks[j] for j in needed]
            rows = torch.tensor([c.row for c in chs], dtype=torch.long, device=device)
            q_len = max(len(c.src) for c in chs)
            src, valid = pad_sources([c.src for c in chs], q_len)
            starts = torch.tensor([c.start for c in chs], dtype=torch.long, device=device)
            lengths = valid.sum(-1)
            # cross context per chunk: projected per layer from H (new segments) or from the cache (continuations)
            enc_parts = [(j, c) for j, c in enumerate(chs) if c.enc is not None]
            cont_parts = [j for j, c in enumerate(chs) if c.enc is None]
            order = torch.tensor([j for j, _ in enc_parts] + cont_parts, dtype=torch.long, device=device)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=device)
            h_list, m_list = [], []
            for _, c in enc_parts:
                erows, ehidden, evalid = enc_hidden[c.enc]
                pos = int((erows == c.row).nonzero()[0, 0])
                h_list.append(ehidden[pos])
                m_list.append(evalid[pos])
            h_cross = torch.stack(h_list) if h_list else None
            cross_kv_layers = []
            cont_rows = rows[cont_parts] if cont_parts else None
            for i, layer in enumerate(self.decoder.layers):
                parts_k, parts_v = [], []
                if h_cross is not None:
                    ck, cv = layer.project_cross_kv(h_cross)
                    parts_k.append(ck)
                    parts_v.append(cv)
                if cont_parts:
                    lay = cache.layers[i]
                    parts_k.append(lay.cross_keys[cont_rows])
                    parts_v.append(lay.cross_values[cont_rows])
                cross_kv_layers.append((torch.cat(parts_k)[inverse], torch.cat(parts_v)[inverse]))
            mparts = ([torch.stack(m_list)] if m_list else []) + ([cache.cross_mask[cont_rows]] if cont_parts else [])
            cross_mask = torch.cat(mparts)[inverse]
            past = prefix_valid = None
            if cfg.decoder_previous_segment:  # the prefix: computed for chunks after a complete segment, else cached
                prefix_valid = torch.tensor([c.follows_segment for c in chs], dtype=torch.bool, device=device)
                if cont_parts:
                    prefix_valid[cont_parts] = self.follows_segment(cache.cross_mask[cont_rows])
                past = [torch.zeros(2, len(chs), H, 2 * L, cfg.head_dim, dtype=self.embed_tokens.weight.dtype,
                                    device=device) for _ in self.decoder.layers]
                after = [j for j, c in enumerate(chs) if c.follows_segment]
                if after:
                    index = torch.tensor(after, dtype=torch.long, device=device)
                    segments = [next(src for row, src in plan.encodes[chs[j].enc] if row == chs[j].row) for j in after]
                    seg_src, _ = pad_sources(segments, L)
                    prefix_kv = self.previous_segment_kv(
                        embed(rows[index], seg_src), [(k[index], v[index]) for k, v in cross_kv_layers],
                        cross_mask[index])
                    for buffers, (pk, pv) in zip(past, prefix_kv):
                        buffers[0, index, :, :L] = pk.to(buffers.dtype)
                        buffers[1, index, :, :L] = pv.to(buffers.dtype)
                past = [(buffers[0], buffers[1]) for buffers in past]
            if cont_parts:
                cont_index = torch.zeros(len(chs), dtype=torch.bool, device=device)
                cont_index[cont_parts] = True
                new_past = []
                for i, lay in enumerate(cache.layers):
                    if past is None:
                        pk = torch.zeros(len(chs), H, L, cfg.head_dim, dtype=lay.keys.dtype, device=device)
                        pv = torch.zeros_like(pk)
                    else:
                        pk, pv = past[i]
                    pk[cont_index] = lay.keys[cont_rows].to(pk.dtype)
                    pv[cont_index] = lay.values[cont_rows].to(pv.dtype)
                    new_past.append((pk, pv))
                past = new_past
            # chunk outputs are scattered to their input columns
            flat_chunk, flat_pos, flat_row, flat_col = [], [], [], []
            for j, c in enumerate(chs):
                for i, col in enumerate(c.cols):
                    if col is not None:
                        flat_chunk.append(j)
                        flat_pos.append(i)
                        flat_row.append(c.row)
                        flat_col.append(col)
            fc = torch.tensor(flat_chunk, dtype=torch.long, device=device)
            fp = torch.tensor(flat_pos, dtype=torch.long, device=device)
            fr = torch.tensor(flat_row, dtype=torch.long, device=device)
            fcol = torch.tensor(flat_col, dtype=torch.long, device=device)

            def scatter(states: torch.Tensor) -> torch.Tensor:
                out = states.new_zeros(b, n, d)
                return out.index_put((fr, fcol), states[fc, fp])

            def through_columns(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                """Identity on values; routes the layer states through their per-column copy, so that the returned
                `hidden_states` are nodes of the forward graph (gradients and `retain_grad` reach them)."""
                columns = scatter(states)
                return states.index_put((fc, fp), columns[fr, fcol]), columns

            dec_hidden, self_kv, cross_kv, layer_states = self.decode_chunks(
                embed(rows, src), starts, lengths, cross_kv_layers, cross_mask, past, output_hidden_states,
                relayout=through_columns, prefix_valid=prefix_valid)
            hidden_out = scatter(dec_hidden)
            output_mask = torch.zeros(b, n, dtype=torch.bool, device=device).index_put((fr, fcol),
                                                                                      torch.ones_like(fr, dtype=torch.bool))
            all_hidden_out = layer_states  # already per column

            # the cache keeps, per row, the state of its last chunk
            if use_cache and replay_step is None:
                self._update_cache(cache, plan, started_host, needed, last_chunk_of_row, chs, self_kv, cross_kv, cross_mask,
                                   mem, source, emb_source, b, device)
        elif use_cache and replay_step is None:
            self._update_cache(cache, plan, started_host, [], last_chunk_of_row, [], [], [], None, mem,
                               source, emb_source, b, device)
        if use_cache and replay_step is None:
            cache.consumed += n
        if hidden_out is None:
            hidden_out = (inputs_embeds if inputs_embeds is not None else self.embed_tokens.weight).new_zeros(b, n, d)
        out = MemformerModelOutput(
            last_hidden_state=hidden_out, output_mask=output_mask, memory=mem, hidden_states=all_hidden_out,
            memory_states=tuple(memory_states) if output_memory_states else None,
            writer_attentions=tuple(writer_attn) if output_memory_attentions else None,
            reader_attentions=tuple(reader_attn) if output_memory_attentions else None)
        if use_cache and replay_step is None:
            out[CACHE_KWARG] = cache
        return out

    def _update_cache(self, cache: MemformerCache, plan: StreamPlan, started: list[bool], needed: list[int],
                      last_chunk_of_row: dict[int, int], chs: list, self_kv, cross_kv, cross_mask,
                      memory: torch.Tensor, source: torch.Tensor | None, emb_source: torch.Tensor | None, b: int,
                      device) -> None:
        """Hand the cache each row's new state: its last decoder chunk's self/cross K/V, its partial segment, memory
        and flags (the cache writes them, `MemformerCache.write`). `source` / `emb_source`: the call's token sources
        as ids (None when the new columns came as `inputs_embeds`) / as embeddings (None when every token is known
        by its id). The partial segment is kept as embeddings while any of its tokens is known only that way."""
        L = self.config.segment_length
        position = {j: p for p, j in enumerate(needed)}
        upd_rows, upd_pos = [], []
        for r, j in last_chunk_of_row.items():
            if j not in position:
                raise RuntimeError("internal error: the last decoder chunk of a row was not computed")
            upd_rows.append(r)
            upd_pos.append(position[j])
        decoder_state = None
        if upd_rows:
            rows = torch.tensor(upd_rows, dtype=torch.long, device=device)
            pos = torch.tensor(upd_pos, dtype=torch.long, device=device)
            decoder_state = (rows, [(k[pos], v[pos]) for k, v in self_kv], [(k[pos], v[pos]) for k, v in cross_kv],
                             cross_mask[pos])
        seg = torch.zeros(b, L, dtype=torch.long, device=device)
        seg_emb, ids_unknown = None, False
        if emb_source is not None:
            seg_emb = emb_source.new_zeros(b, L, emb_source.shape[-1])
        for r, s in enumerate(plan.final_segment):
            if not s:
                continue
            index = torch.tensor(s, device=device)
            if source is not None:
                seg[r, : len(s)] = source[r, index]
            if seg_emb is not None:
                seg_emb[r, : len(s)] = emb_source[r, index]
                # a token's id is unknown if it came as `inputs_embeds` now, or from a cached embeddings-only segment
                ids_unknown |= source is None or min(s) < L
        now_started = [s or bt for s, bt in zip(started, plan.booted)]  # `started`: after this call's resets
        cache.write(memory=memory, segment_ids=seg, fill=torch.tensor(plan.final_fill, dtype=torch.long, device=device),
                    started=torch.tensor(now_started, dtype=torch.bool, device=device), decoder_state=decoder_state,
                    dtype=self.embed_tokens.weight.dtype, host=(now_started, list(plan.final_fill)),
                    segment_embeds=seg_emb if ids_unknown else None)


def shift_labels_from(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Align HF-style `labels` [B, n] with the logits: column i is scored against labels[:, i+1]; -100 at the end
    and at padded columns (their logits are not defined)."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    if attention_mask is not None:
        mask = attention_mask[:, attention_mask.shape[1] - labels.shape[1]:]  # (not [:, -0:], the whole mask)
        shifted = shifted.masked_fill(~mask.bool().to(shifted.device), -100)
    return shifted.contiguous()


class MemformerForCausalLM(MemformerPreTrainedModel, GenerationMixin):
    """Memformer as a causal LM over a token stream: `logits[:, i]` predicts `input_ids[:, i+1]`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__(config)
        self.model = MemformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # training aid beyond the paper (memory_prediction_loss > 0): the memory a cell reads predicts its targets
        self.memory_predictor = MemoryPredictor(config) if config.memory_prediction_loss > 0 else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def adds_memory_prediction(self, requested: bool = True) -> bool:
        """Whether a training cell's loss includes the `memory_prediction_loss` term now: `requested` (False from
        `memory_replay_backward`), training mode, and the option on."""
        return requested and self.training and self.memory_predictor is not None

    def memory_prediction_nll(self, memory: torch.Tensor | None, memory_reset: torch.Tensor | None,
                              shift_labels: torch.Tensor) -> torch.Tensor:
        """`memory_prediction_loss` × the summed bag-of-words NLL of a training cell's targets `shift_labels`
        [B, L] under the memory the cell reads (`memory`, m0 where None or `memory_reset`); added to the cell's
        summed LM NLL (docs/design.md#memory-prediction-loss)."""
        read = self.model.cell_memory(memory, _as_row_flags(memory_reset, "memory_reset"), shift_labels.shape[0],
                                      validate_inputs=False)
        return self.config.memory_prediction_loss * self.memory_predictor(read, self.lm_head, shift_labels)

    def _shift_checked_labels(self, labels: torch.Tensor, attention_mask: torch.Tensor | None, from_ids: bool,
                              shape: tuple[int, int] | None) -> torch.Tensor:
        """`shift_labels_from(labels)` after checking `labels`: integer dtype, the input's `shape` (stream mode; 2-D
        in cell mode), and every scored value in [0, vocab_size) (-100, the first column and padded columns are
        not scored). One host sync."""
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"`labels` must hold integer token ids (-100: ignored), got dtype {labels.dtype}.")
        if labels.dim() != 2 or (shape is not None and tuple(labels.shape) != shape):
            raise ValueError(f"`labels` must have the shape of `{'input_ids' if from_ids else 'inputs_embeds'}` "
                             f"{shape if shape is not None else '(batch, length)'}, got {tuple(labels.shape)}.")
        shifted = shift_labels_from(labels, None if shape is None else attention_mask)
        vocab = self.config.vocab_size
        bad = (shifted != -100) & ((shifted < 0) | (shifted >= vocab))
        if bool(bad.any()):
            raise ValueError(f"`labels` holds values outside [0, vocab_size={vocab}) other than -100 (ignored): "
                             f"{shifted[bad].unique()[:8].tolist()}.")
        return shifted

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        """`GenerationMixin.generate`. With a filled `MemformerCache`, `input_ids` must be the whole sequence (the
        columns the cache consumed, then the new ones): generate() feeds the model only the columns after the first
        `cache.get_seq_length()`, so passing only the new ids (or `inputs_embeds`) is refused with a `ValueError`. A
        cache that a beam loop reordered during the call (`reorder_cache`) is marked stale when it returns."""
        if getattr(kwargs.get("generation_config"), "is_assistant", False):
            raise ValueError("MemformerForCausalLM cannot be an `assistant_model`: assisted decoding rolls the "
                             "assistant's cache back to the accepted tokens, and Memformer's memory writes cannot be "
                             "undone.")
        cache = next((kwargs[k] for k in (CACHE_KWARG, "past_key_values", "cache") if kwargs.get(k) is not None), None)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        name, n = None, None
        if torch.is_tensor(ids) and not ids.is_floating_point() and ids.dim() >= 1:
            name, n = "input_ids", ids.shape[-1]
        elif torch.is_tensor(embeds) and embeds.dim() == 3:
            name, n = "inputs_embeds", embeds.shape[1]
        if isinstance(cache, MemformerCache) and cache.get_seq_length() > 0 and n is not None \
                and n <= cache.get_seq_length():
            consumed = cache.get_seq_length()
            raise ValueError(
                f"generate() got {name} of {n} columns with a MemformerCache that has already consumed "
                f"{consumed} columns. Pass the whole sequence with the cache: the {consumed} columns it consumed "
                f"followed by the new ids (e.g. torch.cat([previous_sequences, new_ids], dim=1)); generate() feeds the "
                f"model only the columns after the first {consumed}.")
        if "memory_reset" in kwargs:  # a tensor, so that generate() expands it with the rows (num_return_sequences)
            kwargs["memory_reset"] = _as_row_flags(kwargs["memory_reset"], "memory_reset")
        reorders = cache.reorders if isinstance(cache, MemformerCache) else 0
        out = super().generate(inputs, *args, **kwargs)
        # any beam loop (`_beam_search`, or Hub `custom_generate` code such as group and constrained beam search)
        # leaves the cache with the beams running at its last step, not the returned sequences
        returned = getattr(out, CACHE_KWARG, None)
        for state, before in ((cache, reorders), (returned, reorders if returned is cache else 0)):
            if isinstance(state, MemformerCache) and state.reorders > before:
                state.mark_stale(
                    "This MemformerCache was reordered by beam search in generate() (num_beams > 1, also group, "
                    "constrained or other custom_generate beam decoding): it holds the state of the beams still "
                    "running at its last step, not of the returned sequences. Continue by generating from the "
                    "returned sequences without it (or call `cache.reset()`); greedy and sampled generation return a "
                    "cache that matches their sequences.")
        return out

    def _prefill(self, input_ids: torch.Tensor, generation_config, model_kwargs: dict, *args: Any, **kwargs: Any):
        """`GenerationMixin._prefill` with stream semantics: `memory_reset` restarts its rows once, before the prompt
        (passed on to every forward, it made each generated token start a new document), and a chunked prefill
        (`prefill_chunk_size`) of a filled cache feeds only the columns after `get_seq_length()`, each chunk with the
        mask up to its last column (transformers 5.17 fed the history again; 5.24 dropped new columns when the mask
        has padding)."""
        cache = model_kwargs.get(CACHE_KWARG)
        state = cache if isinstance(cache, MemformerCache) and not cache.is_empty else None
        reset = _as_row_flags(model_kwargs.pop("memory_reset", None), "memory_reset")
        if reset is not None:
            b = state.batch_size if state is not None else input_ids.shape[0]
            if reset.shape != (b,):
                raise ValueError(f"`memory_reset` must have shape (batch,) = ({b},), got {tuple(reset.shape)}.")
            if state is not None:
                state.reset_rows(reset)
        if generation_config.prefill_chunk_size is None:
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("`prefill_chunk_size` is not supported with `inputs_embeds` (Memformer prefills any "
                             "length segment by segment in constant memory: drop `prefill_chunk_size`).")
        if not isinstance(cache, MemformerCache):
            raise ValueError("Cannot use prefill chunking without a cache (`use_cache=False`).")
        past = cache.get_seq_length()
        mask = model_kwargs.pop("attention_mask", None)
        first = kwargs.get("is_first_iteration", args[0] if args else True)
        try:
            for chunk in torch.split(input_ids[:, past:], generation_config.prefill_chunk_size, dim=-1):
                past += chunk.shape[-1]
                if mask is not None:
                    model_kwargs["attention_mask"] = mask[:, :past]  # the model reads the mask's last columns
                inputs = self.prepare_inputs_for_generation(chunk, is_first_iteration=first, **model_kwargs)
                outputs = self(**inputs, return_dict=True)
                model_kwargs[CACHE_KWARG] = getattr(outputs, CACHE_KWARG)
        finally:
            model_kwargs["attention_mask"] = mask
        return outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: MemformerCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        memory_reset: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_memory_states: bool = False,
        output_memory_attentions: bool = False,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        r"""
        labels [B, n]: like every HF causal LM, shifted inside (`logits[:, i]` is scored against `labels[:, i+1]`);
            -100 and padded columns are ignored. Alternatively pass `shift_labels` (already aligned to the
            logits). `num_items_in_batch` divides the summed loss (Trainer gradient accumulation).
        Cell mode (MRBP): `encoder_input_ids`, `decoder_input_ids`, ..., `memory`, with `shift_labels` [B, L]
            aligned to the decoder outputs. In training mode the loss includes the `memory_prediction_loss` term
            (when the config enables it) unless `memory_prediction=False`.
        See `MemformerModel.forward` for the other arguments.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        memory_prediction = kwargs.pop("memory_prediction", True)
        cell_mode = kwargs.get("encoder_input_ids") is not None
        source = input_ids if input_ids is not None else inputs_embeds
        if not cell_mode and (source is None or source.dim() < 2):
            raise ValueError("Pass `input_ids` of shape (batch, sequence) (or `inputs_embeds`, or the cell-mode "
                             f"inputs); got {None if source is None else tuple(source.shape)}.")
        n = None if cell_mode else source.shape[1]
        columns_to_keep = None
        if not cell_mode and labels is None and shift_labels is None and isinstance(logits_to_keep, int) \
                and logits_to_keep > 0:
            columns_to_keep = torch.arange(max(n - logits_to_keep, 0), n)
        elif not cell_mode and torch.is_tensor(logits_to_keep) and labels is None and shift_labels is None:
            columns_to_keep = logits_to_keep.flatten().cpu()
        if labels is not None and shift_labels is None:
            shift_labels = self._shift_checked_labels(labels, attention_mask, input_ids is not None,
                                                      None if cell_mode else tuple(source.shape[:2]))
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            past_key_values=past_key_values, use_cache=use_cache, memory_reset=memory_reset,
            output_hidden_states=output_hidden_states, output_memory_states=output_memory_states,
            output_memory_attentions=output_memory_attentions, columns_to_keep=columns_to_keep,
            return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        loss = logits = None
        if hidden is not None:
            if isinstance(logits_to_keep, int):
                sliced = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            else:
                sliced = hidden[:, logits_to_keep]
            logits = self.lm_head(sliced)
            if labels is not None or shift_labels is not None:
                shift_labels = shift_labels.to(hidden.device)
                if not shift_labels.is_floating_point():
                    shift_labels = shift_labels.long()  # cross_entropy takes int64 targets only
                if shift_labels.shape != hidden.shape[:2]:
                    raise ValueError(f"labels must align with the outputs {tuple(hidden.shape[:2])}, "
                                     f"got {tuple(shift_labels.shape)}.")
                selected = shift_labels != -100
                if outputs.output_mask is not None:  # only columns computed in this call (MRBP replay steps)
                    selected &= outputs.output_mask
                if num_items_in_batch is None:
                    num_items_in_batch = selected.sum()
                # token-weighted mean: summed NLL / N, computed only where there are targets (no full-vocab logits
                # for ignored positions); a partial sum for one replayed MRBP step; 0 when there is no target
                scores = self.lm_head(hidden[selected])
                scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
                nll = F.cross_entropy(scores, shift_labels[selected], reduction="sum")
                if cell_mode and self.adds_memory_prediction(memory_prediction):
                    nll = nll + self.memory_prediction_nll(kwargs.get("memory"), memory_reset,
                                                           shift_labels)
                loss = nll / torch.as_tensor(num_items_in_batch, device=nll.device).clamp_min(1)
        out = MemformerCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, memory=outputs.memory,
            memory_states=outputs.memory_states, writer_attentions=outputs.writer_attentions,
            reader_attentions=outputs.reader_attentions)
        cache = outputs.get(CACHE_KWARG)
        if cache is not None:
            out[CACHE_KWARG] = cache
        return out if return_dict else out.to_tuple()


__all__ = ["shift_labels_from", "MemformerModel", "MemformerForCausalLM", "MemformerPreTrainedModel", "MemformerCausalLMOutput",
           "MemformerModelOutput", "MemoryReader", "MemoryWriter", "BiasedMemoryNorm"]
