"""Warm start: a Memformer built from a pretrained Llama-family decoder (`LlamaForCausalLM`), docs/design.md#warm-start.

Accepted backbones: the transformers classes in `VERIFIED_BACKBONES` (Llama, Mistral, Granite, SmolLM3) with
settings that are Llama's computation; anything else is a `ValueError` naming the model type or setting.

    from memformer_hf.conversion_llama import WARM_START_RECIPE, memformer_from_llama
    memformer = memformer_from_llama(llama, num_memory_slots=32, segment_length=128, encoder_layers=4)
    memformer = memformer_from_llama(llama, **WARM_START_RECIPE)  # the configuration that measures best

`WARM_START_RECIPE` (beyond the paper: the decoder also reads the previous segment, so the start is the backbone over
windows of 2L tokens) is what `memformer-hf train --init_from_llama` builds when its flags do not say otherwise;
`WARM_START_LEARNING_RATES` are its per-origin training rates (docs/design.md#warm-start-recipe).

The mapping, chosen so that the new model starts *exactly* as the backbone restricted to the segment-local context
(each decoder chunk [BOS, s[:-1]] is the backbone run on that sequence, positions 0..L-1):

| Memformer | from the backbone |
|---|---|
| `embed_tokens`, `lm_head` (tied or not), `decoder.norm` | `embed_tokens`, `lm_head`, final `norm` |
| decoder layer i: `self_attn_norm`, `self_attn`, `ffn_norm`, `ffn` | layer i: `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp` (every layer) |
| decoder layer i: `cross_attn` (new) | q/k/v copied from layer i's `self_attn`, `cross_attn_norm` from its `input_layernorm`, **o_proj = 0** |
| encoder layer j: `self_attn_norm`, `self_attn`, `ffn_norm`, `ffn` | layer `encoder_layer_indices[j]` (default: the first k layers), now bidirectional in the segment |
| encoder layer j: `memory_read` (new) | default init, **o_proj = 0**; `memory_read_norm`, `memory_kv_norm` = 1 |
| `encoder.norm` | the backbone's norm in front of the layer after the last copied one (`input_layernorm`, or the final norm) |
| `writer` (q/k/v, forgetting vector, optional self bias / temperature) | new, default init from the config |
| `decoder_memory_norm` (only with `decoder_reads_memory=True`) | new, gain 1; the decoder's cross-attention reads [H ; N(M)], still through its zero o_proj |

A zero output projection makes a block's output exactly zero whatever its inputs, so at initialisation the memory
and the previous segment do not change the decoder; gradients still reach the zero projections at once (their
gradient is the block's attention output times the upstream gradient) and the rest of each new block from the
second step on, as with zero-initialised adapters. `warm_start_parameter_groups` splits the parameters into the new
blocks, the copied encoder and the copied backbone, for separate learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .configuration_memformer import ACTIVATIONS, MemformerConfig
from .modeling_memformer import MemformerForCausalLM

# The warm start that measured best with SmolLM2-135M on long public-domain books (4.9M training tokens, one H200;
# docs/design.md#warm-start-recipe): 16.6 test perplexity in two seeds, below the backbone fine-tuned on the same
# tokens and scored with 512 tokens of context (17.07). Paper-faithful instead: decoder_previous_segment=False,
# cross_attention_rope=False.
WARM_START_RECIPE: dict[str, Any] = {"num_memory_slots": 64, "segment_length": 512, "encoder_layers": 4,
                                     "decoder_previous_segment": True, "cross_attention_rope": True}
# Its learning rates: the new blocks, the copied encoder layers, the copied decoder / embeddings / head
# (`MemformerTrainingArguments.learning_rate / encoder_learning_rate / backbone_learning_rate`).
WARM_START_LEARNING_RATES: dict[str, float] = {"learning_rate": 5e-4, "encoder_learning_rate": 1e-4,
                                               "backbone_learning_rate": 3e-5}

CROSS_ATTENTION_INITS = ("self_attn", "random")
# MemformerConfig fields that memformer_config_from_llama takes from the backbone: an override would break the copy of
# the weights or make the copied decoder compute something else than the backbone.
_BACKBONE_FIELDS = frozenset(("vocab_size", "hidden_size", "decoder_layers", "num_attention_heads", "num_key_value_heads",
                              "intermediate_size", "activation_function", "norm_type", "rms_norm_eps", "mlp_type",
                              "attention_bias", "mlp_bias", "tie_word_embeddings", "position_embedding_type",
                              "rope_parameters"))
# Name fragments of the parameters that a warm start creates (everything else is copied from the backbone).
NEW_PARAMETER_PATTERNS = (".cross_attn.", ".cross_attn_norm.", ".memory_read.", ".memory_read_norm.",
                          ".memory_kv_norm.", "model.writer.", "model.encoder.norm.", "model.decoder_memory_norm.",
                          "memory_predictor.")
_LLAMA_LIKE = "a LlamaForCausalLM-style model (model.embed_tokens, model.layers[i].{self_attn,mlp,...}, model.norm)"
# Parameters of a backbone layer that the mapping copies; any other (q_norm / k_norm, extra norms) has no place.
_LAYER_PARAMETERS = frozenset(
    ["input_layernorm.weight", "post_attention_layernorm.weight"]
    + [f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")]
    + [f"mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")])
# Config options of Llama variants that must be 1 (Granite's multipliers) or absent (soft-capping) to map exactly.
_IDENTITY_OPTIONS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")
_ABSENT_OPTIONS = ("attn_logit_softcapping", "final_logit_softcapping")
# The transformers classes (model_type: class name) whose whole forward is Llama's computation once the config and
# module checks below pass; each is checked to equal its warm start in tests/test_warm_start.py. Other families can
# pass every check and still compute something else in code no config field shows, so they are refused.
VERIFIED_BACKBONES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "granite": "GraniteForCausalLM",
                      "smollm3": "SmolLM3ForCausalLM"}
# What such families do differently (for the error message).
_HIDDEN_DIFFERENCES = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "vaultgemma"),
                    "scales the embeddings by sqrt(hidden_size), and its RMSNorm gain is (1 + weight)"),
    **dict.fromkeys(("helium", "ernie4_5"), "rotates interleaved dimension pairs (RoPE's rotate_every_two), not "
                                            "Llama's rotate_half halves"),
}


def _llama_config_value(config: Any, name: str, default: Any = None) -> Any:
    """`config.name` (default when absent); a setting that is not one value (per-layer configs) is a `ValueError`."""
    try:
        return getattr(config, name, default)
    except Exception as e:  # noqa: BLE001  (e.g. transformers' AmbiguousGlobalPerLayerAttributeError)
        raise ValueError(f"memformer_from_llama: cannot read the backbone's config.{name} as one value "
                         f"({type(e).__name__}: {e}); Memformer's layers all share one setting.") from None


def _check_model_type(llama: nn.Module, config: Any) -> None:
    """Raise `ValueError` unless `llama` is one of the transformers classes in `VERIFIED_BACKBONES`."""
    model_type = getattr(config, "model_type", None)
    cls = type(llama)
    want = VERIFIED_BACKBONES.get(model_type)
    if want is None:
        why = _HIDDEN_DIFFERENCES.get(model_type, "its forward may compute something the mapping does not reproduce")
        raise ValueError(f"memformer_from_llama: the backbone's model_type={model_type!r} ({cls.__name__}) is not a "
                         f"family the warm start is verified to map exactly: {why}. Verified: "
                         f"{', '.join(VERIFIED_BACKBONES.values())}.")
    if cls.__name__ != want or not cls.__module__.startswith("transformers.models."):
        raise ValueError(f"memformer_from_llama: the backbone is {cls.__module__}.{cls.__name__} with "
                         f"model_type={model_type!r}; only transformers' own {want} is verified to map exactly "
                         "(a subclass or remote-code class may compute something else).")


def _check_rope(config: Any) -> None:
    """Raise `ValueError` unless the backbone rotates by plain RoPE over the whole head, the same in every layer."""
    rope = _llama_config_value(config, "rope_parameters") or {}
    nested = sorted(k for k, v in dict(rope).items() if isinstance(v, dict))
    if nested:
        raise ValueError(f"memformer_from_llama: the backbone has RoPE settings per layer type ({nested}); "
                         "Memformer's layers share one RoPE.")
    legacy = _llama_config_value(config, "rope_scaling")
    for where, params in (("rope_parameters", dict(rope)), ("rope_scaling", dict(legacy or {}))):
        rope_type = params.get("rope_type", params.get("type", "default"))
        partial = params.get("partial_rotary_factor", 1.0)
        if rope_type != "default" or partial != 1.0:
            what = f"rope_type={rope_type!r}" if rope_type != "default" else f"partial_rotary_factor={partial!r}"
            raise ValueError(f"memformer_from_llama: the backbone uses {what} ({where}); only plain RoPE ('default', "
                             "over the whole head) maps exactly onto Memformer's in-segment positions.")
    partial = _llama_config_value(config, "partial_rotary_factor", 1.0)
    if partial is not None and partial != 1.0:
        raise ValueError(f"memformer_from_llama: the backbone uses partial_rotary_factor={partial!r}; only plain RoPE "
                         "('default', over the whole head) maps exactly onto Memformer's in-segment positions.")


def _check_biases(layer: nn.Module, config: Any) -> None:
    """Raise `ValueError` unless the attention and MLP projections all have biases or none, as the config's
    `attention_bias` / `mlp_bias` (what the Memformer config is built from) say."""
    for flag, module, names in (("attention_bias", layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp_bias", layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        biases = {name: getattr(getattr(module, name), "bias", None) is not None for name in names}
        if len(set(biases.values())) != 1:
            raise ValueError(f"memformer_from_llama: the backbone has {flag.split('_')[0]} biases on some projections "
                             f"only ({biases}); Memformer's `{flag}` covers all of them.")
        said = bool(_llama_config_value(config, flag, False))
        if said != biases[names[0]]:
            raise ValueError(f"memformer_from_llama: the backbone's config says {flag}={said} but its projections "
                             f"{'have' if biases[names[0]] else 'have no'} biases; the Memformer config would not "
                             "match its weights.")


def _check_backbone(llama: nn.Module) -> tuple[Any, Any]:
    """The backbone's inner model and config, after checking that the mapping applies to it exactly."""
    inner = getattr(llama, "model", None)
    config = getattr(llama, "config", None)
    if inner is None or config is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(f"memformer_from_llama needs {_LLAMA_LIKE}; got {type(llama).__name__}.")
    layer = inner.layers[0]
    for attr in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
        if not hasattr(layer, attr):
            raise ValueError(f"memformer_from_llama: backbone layers have no `{attr}`; it needs {_LLAMA_LIKE}.")
    for attr in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(layer.mlp, attr, None), nn.Linear):
            raise ValueError(f"memformer_from_llama: the backbone's MLP has no `{attr}` (a SwiGLU MLP is needed).")
    for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(layer.self_attn, attr, None), nn.Linear):
            raise ValueError(f"memformer_from_llama: the backbone's attention has no `{attr}` projection (e.g. "
                             f"multi-head latent attention); it needs {_LLAMA_LIKE}.")
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = _llama_config_value(config, "head_dim") or d // heads
    if head_dim * heads != d:
        raise ValueError(f"memformer_from_llama: the backbone's head_dim={head_dim} x {heads} heads != hidden_size={d}; "
                         "Memformer's heads split the model width.")
    _check_rope(config)
    act = _llama_config_value(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"memformer_from_llama: the backbone's hidden_act={act!r} is not one of {ACTIVATIONS}.")
    _check_biases(layer, config)
    window = _llama_config_value(config, "sliding_window")
    if window not in (None, 0) and _llama_config_value(config, "use_sliding_window", True) is not False:
        raise ValueError(f"memformer_from_llama: the backbone uses sliding-window attention (sliding_window={window}); "
                         "Memformer's decoder attends to the whole segment.")
    kinds = sorted(set(_llama_config_value(config, "layer_types") or ()) - {"full_attention"})
    if kinds:
        raise ValueError(f"memformer_from_llama: the backbone has layers of type {kinds}; every Memformer layer is "
                         "full attention.")
    for name in _IDENTITY_OPTIONS:
        value = _llama_config_value(config, name)
        if value is not None and value != 1:
            raise ValueError(f"memformer_from_llama: the backbone's {name}={value!r} scales activations in a way "
                             f"Memformer's blocks do not; only 1 (or no such option) maps exactly.")
    for name in _ABSENT_OPTIONS:
        if _llama_config_value(config, name) is not None:
            raise ValueError(f"memformer_from_llama: the backbone uses {name}={_llama_config_value(config, name)!r}, "
                             "which Memformer's blocks do not have.")
    if bool(_llama_config_value(config, "tie_word_embeddings", False)):
        head = llama.get_output_embeddings() if hasattr(llama, "get_output_embeddings") else None
        emb = inner.embed_tokens.weight
        weight = getattr(head, "weight", None)
        if weight is None or not (weight is emb or (weight.shape == emb.shape and (
                emb.is_meta or weight.is_meta or torch.equal(weight, emb)))):
            raise ValueError("memformer_from_llama: the backbone's config says tie_word_embeddings=True but its "
                             "output head is not its input embedding; a tied Memformer would lose the head.")
    eps = float(_llama_config_value(config, "rms_norm_eps", 1e-6))
    for i, block in enumerate(inner.layers):
        extra = sorted(n for n, _ in block.named_parameters() if n not in _LAYER_PARAMETERS)
        if extra:
            raise ValueError(f"memformer_from_llama: backbone layer {i} has parameters with no place in a Memformer "
                             f"layer ({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}); it needs {_LLAMA_LIKE}.")
        scaling = getattr(block.self_attn, "scaling", None)
        if scaling is not None and not math.isclose(float(scaling), head_dim ** -0.5, rel_tol=1e-6):
            raise ValueError(f"memformer_from_llama: backbone layer {i} scales attention scores by {scaling!r}, not "
                             f"1/sqrt(head_dim={head_dim}) as Memformer does.")
        if getattr(block.self_attn, "sliding_window", None) is not None:
            raise ValueError(f"memformer_from_llama: backbone layer {i} uses sliding-window attention (window "
                             f"{block.self_attn.sliding_window}); Memformer's decoder attends to the whole segment.")
        if not getattr(block.self_attn, "use_rope", True):
            raise ValueError(f"memformer_from_llama: backbone layer {i} has no RoPE (a NoPE layer); every Memformer "
                             "self-attention layer rotates by RoPE.")
        for name in ("input_layernorm", "post_attention_layernorm"):
            _check_rms_norm(getattr(block, name), eps, f"layers[{i}].{name}")
    _check_rms_norm(inner.norm, eps, "norm")
    _check_model_type(llama, config)
    return inner, config


def _check_rms_norm(norm: nn.Module, eps: float, name: str) -> None:
    """Raise `ValueError` unless `norm` computes Llama's RMSNorm `x / sqrt(mean(x²) + eps) · weight` with the
    config's `rms_norm_eps` (not, e.g., a LayerNorm, Gemma's `(1 + weight)` gain, or another eps)."""
    weight = getattr(norm, "weight", None)
    params = [n for n, _ in norm.named_parameters()]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or params != ["weight"]:
        raise ValueError(f"memformer_from_llama: the backbone's {name} ({type(norm).__name__}, parameters {params}) "
                         f"is not an RMSNorm with a gain `weight`; Memformer's norms are Llama's RMSNorm.")
    gen = torch.Generator().manual_seed(0)
    gain = weight  # a backbone on the meta device has no values: check the formula with a stand-in gain
    if weight.is_meta:
        gain = (1 + 0.3 * torch.randn(weight.shape, generator=gen, dtype=torch.float64)).to(weight.dtype)
    for scale in (1.0, eps ** 0.5):  # the small inputs make a different eps visible
        x = ((torch.randn(4, weight.numel(), generator=gen, dtype=torch.float64) + 0.5) * scale).float()
        want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * gain.double().cpu()
        got = torch.func.functional_call(norm, {"weight": gain}, (x.to(gain.device),)).double().cpu()
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())):
            raise ValueError(f"memformer_from_llama: the backbone's {name} ({type(norm).__name__}) does not compute "
                             f"x / sqrt(mean(x²) + rms_norm_eps={eps}) · weight (Llama's RMSNorm), so its copy "
                             f"would not map exactly.")


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    if dst.weight.shape != src.weight.shape:
        raise ValueError(f"shape mismatch copying a projection: {tuple(src.weight.shape)} -> {tuple(dst.weight.shape)}")
    dst.weight.copy_(src.weight)
    if (dst.bias is None) != (src.bias is None):
        raise ValueError("bias mismatch copying a projection")
    if dst.bias is not None:
        dst.bias.copy_(src.bias)


def _copy_norm(dst: nn.Module, src: nn.Module) -> None:
    dst.weight.copy_(src.weight)


def _zero_linear(layer: nn.Linear) -> None:
    layer.weight.zero_()
    if layer.bias is not None:
        layer.bias.zero_()


def _copy_block(dst, src) -> None:
    """Self-attention, MLP and their norms of one backbone layer into a Memformer encoder/decoder layer."""
    _copy_norm(dst.self_attn_norm, src.input_layernorm)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _copy_linear(getattr(dst.self_attn, name), getattr(src.self_attn, name))
    _copy_norm(dst.ffn_norm, src.post_attention_layernorm)
    for name in ("gate_proj", "up_proj", "down_proj"):
        _copy_linear(getattr(dst.ffn, name), getattr(src.mlp, name))


def memformer_config_from_llama(
    llama_config: Any,
    *,
    num_memory_slots: int = 32,
    segment_length: int = 128,
    encoder_layers: int = 4,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **overrides: Any,
) -> MemformerConfig:
    """The `MemformerConfig` of a warm start from a backbone with `llama_config`: Llama layer shapes (RMSNorm, SwiGLU,
    grouped KV heads, RoPE theta, biases, tying), its vocabulary and special tokens (`pad_token_id` defaults to the
    backbone's pad, else its EOS), every decoder layer, and `overrides` for the memory settings (e.g.
    `memory_write_self_bias`, `forget_bias_init_scale`, `memory_write_temperature`); an override of a field taken
    from the backbone (sizes, norm, MLP, positions, vocabulary, tying) is a ValueError."""
    c = llama_config
    rope = dict(_llama_config_value(c, "rope_parameters") or {})
    theta = rope.get("rope_theta", _llama_config_value(c, "rope_theta", 1e4))
    bos = c.bos_token_id if bos_token_id is None else bos_token_id
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (c.pad_token_id if c.pad_token_id is not None else
                                                          (eos[0] if isinstance(eos, list) else eos))
    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, encoder_layers=encoder_layers,
        decoder_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=_llama_config_value(c, "num_key_value_heads") or c.num_attention_heads,
        intermediate_size=c.intermediate_size, activation_function=_llama_config_value(c, "hidden_act", "silu"),
        segment_length=segment_length, num_memory_slots=num_memory_slots, norm_type="rmsnorm",
        rms_norm_eps=float(_llama_config_value(c, "rms_norm_eps", 1e-6)), mlp_type="swiglu",
        attention_bias=bool(_llama_config_value(c, "attention_bias", False)),
        mlp_bias=bool(_llama_config_value(c, "mlp_bias", False)),
        tie_word_embeddings=bool(_llama_config_value(c, "tie_word_embeddings", False)),
        position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
        first_segment_context="bos", attention_dropout=0.0, hidden_dropout=0.0,
        initializer_range=float(_llama_config_value(c, "initializer_range", 0.02)),
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    fixed = sorted(k for k in overrides if MemformerConfig.attribute_map.get(k, k) in _BACKBONE_FIELDS)
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: taken from the backbone by the warm start (its weights and computation "
                         f"fix them); override only the memory settings, K, L and the encoder depth.")
    kwargs.update(overrides)
    return MemformerConfig(**kwargs)


@torch.no_grad()
def memformer_from_llama(
    llama: nn.Module,
    *,
    num_memory_slots: int = 32,
    segment_length: int = 128,
    encoder_layers: int = 4,
    encoder_layer_indices: Sequence[int] | None = None,
    cross_attention_init: str = "self_attn",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **config_overrides: Any,
) -> MemformerForCausalLM:
    """A `MemformerForCausalLM` warm-started from `llama` (a `LlamaForCausalLM` or another of `VERIFIED_BACKBONES`), in
    its dtype and on its device; the mapping is in the module docstring and docs/design.md#warm-start.

    num_memory_slots / segment_length: K and L of the new model.
    encoder_layers: k, the encoder is a copy of the backbone's first k layers (or of `encoder_layer_indices`).
    cross_attention_init: "self_attn" (q/k/v and the norm copied from the same decoder layer's self-attention) or
        "random" (default init); either way its output projection starts at zero.
    bos_token_id: the token that starts every decoder chunk (and the boot segment); defaults to the backbone's BOS.
        Pick the token the backbone saw at document starts (SmolLM2: `<|endoftext|>`, id 0).
    config_overrides: any other `MemformerConfig` field (memory settings: `memory_write_self_bias`,
        `forget_bias_init_scale`, `memory_write_temperature`, `normalize_memory_kv`, ...).

    At initialisation the decoder computes exactly the backbone on each chunk [BOS, s[:-1]] (positions 0..L-1):
    `tests/test_warm_start.py` checks it to float64 rounding."""
    inner, lcfg = _check_backbone(llama)
    if cross_attention_init not in CROSS_ATTENTION_INITS:
        raise ValueError(f"cross_attention_init must be one of {CROSS_ATTENTION_INITS}, got {cross_attention_init!r}.")
    n_layers = len(inner.layers)
    indices = list(range(encoder_layers)) if encoder_layer_indices is None else [int(i) for i in encoder_layer_indices]
    if not indices or any(not 0 <= i < n_layers for i in indices):
        raise ValueError(f"encoder layers must be backbone layer indices in [0, {n_layers}), at least one; got "
                         f"{indices}.")
    config = memformer_config_from_llama(lcfg, num_memory_slots=num_memory_slots, segment_length=segment_length,
                                         encoder_layers=len(indices), bos_token_id=bos_token_id,
                                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **config_overrides)
    weight = inner.embed_tokens.weight
    model = MemformerForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    attn_impl = getattr(llama.config, "_attn_implementation", None)
    if attn_impl in ("eager", "sdpa"):
        model.set_attn_implementation(attn_impl)
    m = model.model

    m.embed_tokens.weight.copy_(inner.embed_tokens.weight)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(llama.get_output_embeddings().weight)
    _copy_norm(m.decoder.norm, inner.norm)
    for dst, src in zip(m.decoder.layers, inner.layers):
        _copy_block(dst, src)
        if cross_attention_init == "self_attn":
            _copy_norm(dst.cross_attn_norm, src.input_layernorm)
            for name in ("q_proj", "k_proj", "v_proj"):
                _copy_linear(getattr(dst.cross_attn, name), getattr(src.self_attn, name))
        _zero_linear(dst.cross_attn.o_proj)
    for dst, i in zip(m.encoder.layers, indices):
        _copy_block(dst, inner.layers[i])
        _zero_linear(dst.memory_read.o_proj)
    after = indices[-1] + 1
    _copy_norm(m.encoder.norm, inner.layers[after].input_layernorm if after < n_layers else inner.norm)
    return model


def warm_start_parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The parameters of a warm-started `MemformerForCausalLM` by origin: `"new"` (cross-attention, memory readers
    and their norms, writer, encoder output norm, the decoder's memory norm with `decoder_reads_memory`, the `memory_prediction_loss` head), `"encoder"` (the copied encoder layers) and `"backbone"` (the
    copied decoder, embeddings and head; a tied head counts once)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"new": [], "encoder": [], "backbone": []}
    for name, p in model.named_parameters():
        if any(pat in name for pat in NEW_PARAMETER_PATTERNS):
            groups["new"].append((name, p))
        elif ".encoder.layers." in name:
            groups["encoder"].append((name, p))
        else:
            groups["backbone"].append((name, p))
    return groups


__all__ = ["CROSS_ATTENTION_INITS", "VERIFIED_BACKBONES", "memformer_config_from_llama", "memformer_from_llama",
           "warm_start_parameter_groups"]
