# Copyright 2026 The memformer_hf authors. Licensed under the MIT License.
"""Configuration of the Memformer model (Wu et al., arXiv 2010.06891)."""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

POSITION_EMBEDDING_TYPES = ("rope", "simplified_rpe", "none")
FIRST_SEGMENT_CONTEXTS = ("bos", "empty")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu_mlp", "swiglu")
# Upper bound on `segment_length`: every segment is encoded at full length L (self-attention is L x L per head), so
# a huge L makes even a 5-token forward allocate terabytes.
MAX_SEGMENT_LENGTH = 65536
# Bounds that keep the writer's float32 arithmetic finite (docs/design.md#numerics): its scores are q·k / (sqrt(d_w) τ)
# (+ the self bias), so a τ below 1e-30 or a self bias beyond ±1e30 overflows them to inf and the softmax writes NaN
# into the memory; a forgetting vector of norm beyond ~1.8e19 overflows its squared norm, so BMN and m0 become 0
# instead of unit vectors.
MIN_WRITE_TEMPERATURE = 1e-30
MAX_WRITE_SELF_BIAS = 1e30
MAX_FORGET_BIAS_INIT_SCALE = 1e18
# The smallest RoPE base that float32 holds as a normal number (the tables are computed in float32).
MIN_ROPE_THETA = 1.1754943508222875e-38
# The fields that take True or False (checked by `validate_memformer`).
BOOLEAN_FIELDS = ("learnable_temperature", "memory_write_qk_norm", "writer_out_proj", "use_forget_bias",
                  "normalize_memory_kv", "attention_bias", "tie_word_embeddings", "decoder_reads_memory",
                  "cross_attention_rope", "decoder_previous_segment", "mlp_bias", "use_cache")

# Size presets (docs/design.md#presets). Values are keyword arguments of `MemformerConfig`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, encoder_layers=2, decoder_layers=2, num_attention_heads=4, intermediate_size=256,
                 num_memory_slots=8, segment_length=32),
    # the default CPU run of `memformer-hf train` (5-15 minutes on 2 cores)
    "cpu-small": dict(hidden_size=128, encoder_layers=2, decoder_layers=2, num_attention_heads=4, intermediate_size=512,
                      num_memory_slots=16, segment_length=64),
    "small": dict(hidden_size=256, encoder_layers=2, decoder_layers=4, num_attention_heads=4, intermediate_size=1024,
                  num_memory_slots=16, segment_length=64),
    "v1-lm": dict(hidden_size=512, encoder_layers=4, decoder_layers=8, num_attention_heads=8, intermediate_size=2048,
                  num_memory_slots=32, segment_length=64),
    "v2-lm": dict(hidden_size=512, encoder_layers=4, decoder_layers=16, num_attention_heads=8, intermediate_size=2048,
                  num_memory_slots=32, segment_length=64),
}


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"MemformerConfig: invalid `{field}`={value!r}; expected {allowed}.")


class MemformerConfig(PretrainedConfig):
    r"""Configuration for [`MemformerModel`] and [`MemformerForCausalLM`].

    Memformer encodes each segment of `segment_length` tokens while reading `num_memory_slots` memory slots in
    every encoder layer, writes the slots once per segment with a slot-attention writer followed by Biased Memory
    Normalization, and predicts the next segment with a causal decoder that cross-attends to the encoder output.

    Args:
        vocab_size: vocabulary size (keep a multiple of 128 for LM-head efficiency).
        hidden_size: model width d.
        encoder_layers / decoder_layers: depth of the memory-reading encoder and of the causal decoder.
        num_attention_heads: heads of every attention block (d must be divisible by it).
        intermediate_size: FFN width.
        activation_function: FFN activation (for `mlp_type="swiglu"` the gate's activation: "silu" for Llama);
            `hidden_act` (Llama's name) is accepted as another name for it.
        norm_type: "layernorm" (default, the paper's Pre-LN blocks) or "rmsnorm" (Llama-style RMSNorm, gain only,
            `rms_norm_eps`); applies to every norm of the model (docs/design.md#llama-shapes).
        mlp_type: "gelu_mlp" (default: Linear `fc1` → activation → Linear `fc2`) or "swiglu" (Llama's
            `down_proj(act(gate_proj(x)) * up_proj(x))`).
        num_key_value_heads: key/value heads of the encoder/decoder self-attention and the decoder cross-attention
            (grouped-query attention; None: `num_attention_heads`). Must divide `num_attention_heads`. The memory
            reader and writer keep full heads.
        mlp_bias: biases in the FFN's linear layers (default True, the paper's FFN; False for Llama).
        rms_norm_eps: epsilon of the RMSNorms (used with `norm_type="rmsnorm"` only).
        segment_length: L, tokens per segment; positions are in-segment indices 0..L-1.
        num_memory_slots: K, memory slots per row.
        memory_write_heads: heads of the memory writer (defaults to `num_attention_heads`).
        memory_write_temperature: writer softmax temperature tau in [1e-30, 1]; tau < 1 sharpens (the paper's choice).
        learnable_temperature: learn log(tau) instead of keeping it fixed.
        memory_write_qk_norm: score the writer's query against each key by their cosine divided by tau (per head),
            instead of the scaled dot product q·k / (sqrt(d_w) tau) (an option beyond the paper). The sharpness of
            the write is then set by tau alone, whatever the scale of the slots (unit norm) and of the encoder states:
            with the dot product and a standard init the write starts almost uniform over the tokens.
        writer_out_proj: add an output projection to the writer (ablation; the paper has none).
        memory_write_self_bias: None (the paper) or the initial value of a learnable per-slot bias added to each
            slot's score on itself in the writer; a positive value starts the slots in "retain" (see
            `MemoryWriter`); |bias| + spread/2 at most 1e30.
        memory_write_self_bias_spread: with `memory_write_self_bias`, spread the slots' initial biases evenly over
            [bias - spread/2, bias + spread/2] (0: all equal), so that the slots start with a range of retention
            times, from overwritten at every segment to kept for many (an option beyond the paper).
        forget_bias_init_scale: expected initial norm of each slot's forgetting vector v_bias (init N(0, s²/d));
            smaller values forget less per segment at the start of training; at most 1e18.
        use_forget_bias: add the per-slot forgetting vector before normalisation (BMN); False is the ablation.
        normalize_memory_kv: LayerNorm the memory before the reader's key/value projections. Default True, an
            engineering choice (docs/design.md#memory-scale): memory rows have unit norm while the layer-normed token
            states have norm ~sqrt(d), so without it the reader's keys/values start ~sqrt(d) times too small and in
            our recall runs the memory was never learned (chance accuracy at one segment of distance after 800
            steps; 100% with it). False is the literal reading of the paper's figure.
        position_embedding_type: "rope" (default, fast), "simplified_rpe" (the paper's v1 formula) or "none".
        rope_parameters: RoPE settings, v5 naming (`rope_type`, `rope_theta`).
        first_segment_context: "bos" (the first segment conditions on a BOS-only previous segment) or "empty".
        attention_dropout / hidden_dropout: dropout probabilities (0 in the paper).
        layer_norm_eps / initializer_range / attention_bias: usual meanings (`layer_norm_eps` is used with
            `norm_type="layernorm"` only; `attention_bias` covers self/cross-attention and the memory reader).
        tie_word_embeddings: tie the LM head to the token embedding (default True).
        bptt_horizon: in full-BPTT stream mode, detach the memory every this many segments (None: never).
        decoder_reads_memory: an option beyond the paper (default False: the paper, where the memory reaches the
            decoder only through the encoder's memory readers → H → the decoder's cross-attention). True: the
            decoder's cross-attention for segment t+1 reads [H_t ; N(M_{t+1})] (L + K keys), H_t the encoder output
            of segment t and M_{t+1} the memory after writing it (the memory the next encoder step reads) through
            a new norm `model.decoder_memory_norm` (memory slots have unit norm, H does not); memory keys are always
            valid. As the authors' MemBART, the decoder then reads the memory directly (docs/design.md#decoder-reads-
            memory). The cache then holds cross K/V and a cross mask of L + K positions. Every path (stream, cache,
            cell mode, MRBP) computes the same function, with or without CUDA graphs
            (`benchmarks/check_graphs.py --decoder_reads_memory`). With False nothing changes (shapes, checkpoint
            keys, speed).
        cross_attention_rope: an option beyond the paper (default False: the decoder's cross-attention has no
            positions, so it reads the previous segment as a set). True: the cross-attention rotates its queries at
            the decoder positions and the keys of H_t at the positions that segment's tokens have relative to the
            decoder's inputs (token j of the previous segment at j - L + 1; the decoder's input at position p is
            the token before the p-th target), so every score depends on the true distance, as self-attention over
            both segments would. Needs `position_embedding_type="rope"`; not with `decoder_reads_memory` (memory
            slots have no position). No parameter is added.
        decoder_previous_segment: an option beyond the paper (default False: the decoder's self-attention sees only
            its own segment, whose first input is BOS). True: the decoder reads the true token stream over two
            segments, Transformer-XL style without carried hidden states. For a segment that follows a complete
            previous segment (the encoder input of the cell), the decoder runs over [BOS, that segment's first
            L - 1 tokens] at positions -L..-1 followed by its own inputs, the first of which is that segment's last
            token (not BOS); only the own positions are scored. Each token thus sees L to 2L - 1 earlier tokens
            directly, and a warm start equals the backbone over such windows (docs/design.md#decoder-previous-
            segment). The memory then has to carry what lies beyond the previous segment. Every path supports it (the
            cells of `MemformerTrainer` with the packers' matching layout, the stream forward, the cache, which keeps
            the prefix's K/V in front of the segment's own: 2L self positions, and `generate()`). No parameter is
            added.
        memory_prediction_loss: a training aid beyond the paper (default 0.0: off, the paper). w > 0 adds
            w × (a bag-of-words NLL) to the loss of every training cell (`MemformerTrainer`): the tokens the cell's
            decoder predicts are scored under a mixture of K unigram distributions, one per slot of the memory the
            cell *reads* (written by the earlier segments), through a new projection `memory_predictor` and the LM
            head. The memory is thus pushed to hold what predicts the coming text beyond the segments the decoder
            sees (docs/design.md#memory-prediction-loss). It changes no forward output: evaluation, the stream
            forward, `memory_replay_backward` and `generate()` compute the LM loss only.
    """

    model_type = "memformer"
    attribute_map = {"num_hidden_layers": "decoder_layers", "n_positions": "segment_length",
                     "hidden_act": "activation_function"}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 512,
        encoder_layers: int = 4,
        decoder_layers: int = 8,
        num_attention_heads: int = 8,
        intermediate_size: int = 2048,
        activation_function: str = "gelu",
        segment_length: int = 64,
        num_memory_slots: int = 32,
        memory_write_heads: int | None = None,
        memory_write_temperature: float = 0.5,
        learnable_temperature: bool = False,
        memory_write_qk_norm: bool = False,
        writer_out_proj: bool = False,
        memory_write_self_bias: float | None = None,
        memory_write_self_bias_spread: float = 0.0,
        forget_bias_init_scale: float = 1.0,
        use_forget_bias: bool = True,
        normalize_memory_kv: bool = True,
        position_embedding_type: str = "rope",
        rope_parameters: dict[str, Any] | None = None,
        first_segment_context: str = "bos",
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        attention_bias: bool = True,
        bptt_horizon: int | None = None,
        tie_word_embeddings: bool = True,
        decoder_reads_memory: bool = False,
        cross_attention_rope: bool = False,
        decoder_previous_segment: bool = False,
        memory_prediction_loss: float = 0.0,
        norm_type: str = "layernorm",
        mlp_type: str = "gelu_mlp",
        num_key_value_heads: int | None = None,
        mlp_bias: bool = True,
        rms_norm_eps: float = 1e-6,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if "hidden_act" in kwargs:  # Llama's name for the (SwiGLU gate's) activation
            hidden_act = kwargs.pop("hidden_act")
            _check(activation_function in ("gelu", hidden_act), "hidden_act", hidden_act,
                   f"the same value as activation_function={activation_function!r} (it is another name for it)")
            activation_function = hidden_act
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.activation_function = activation_function
        self.segment_length = segment_length
        self.num_memory_slots = num_memory_slots
        self.memory_write_heads = num_attention_heads if memory_write_heads is None else memory_write_heads
        self.memory_write_temperature = memory_write_temperature
        self.learnable_temperature = learnable_temperature
        self.memory_write_qk_norm = memory_write_qk_norm
        self.writer_out_proj = writer_out_proj
        self.memory_write_self_bias = memory_write_self_bias
        self.memory_write_self_bias_spread = memory_write_self_bias_spread
        self.forget_bias_init_scale = forget_bias_init_scale
        self.use_forget_bias = use_forget_bias
        self.normalize_memory_kv = normalize_memory_kv
        self.position_embedding_type = position_embedding_type
        self.rope_parameters = dict(rope_parameters) if rope_parameters else {"rope_type": "default", "rope_theta": 1e4}
        self.first_segment_context = first_segment_context
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.attention_bias = attention_bias
        self.bptt_horizon = bptt_horizon
        self.tie_word_embeddings = tie_word_embeddings
        self.decoder_reads_memory = decoder_reads_memory
        self.cross_attention_rope = cross_attention_rope
        self.decoder_previous_segment = decoder_previous_segment
        self.memory_prediction_loss = memory_prediction_loss
        self.norm_type = norm_type
        self.mlp_type = mlp_type
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = rms_norm_eps
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.use_cache = use_cache
        kwargs.setdefault("is_encoder_decoder", False)
        # the other names of `attribute_map` (`num_hidden_layers`, `n_positions`): the base class would set them after
        # the checks; they take precedence over the field, as they would there
        given_as: dict[str, str] = {}
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
                given_as[name] = alias
        try:
            self.validate_memformer()  # before the base class, whose own checks give less specific errors
        except ValueError as e:
            names = [f"`{alias}` is another name for `{name}`" for name, alias in given_as.items()
                     if f"`{name}`" in str(e)]
            if not names:
                raise
            raise ValueError(f"{str(e).rstrip('.')} ({'; '.join(names)}).") from None
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """`PretrainedConfig.get_config_dict`, refusing a checkpoint without config.json (transformers 5 reads it as
        the default configuration, which would silently replace every setting the weights do not pin down)."""
        subfolder = kwargs.get("subfolder") or ""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            where = f"{pretrained_model_name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise OSError(f"{where} has no config.json: a MemformerConfig cannot be guessed from the weights; restore "
                          f"the checkpoint's config.json or pass `config=` explicitly.")
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PretrainedConfig.from_dict`, whose keyword overrides (`from_pretrained(path, decoder_layers=...)`) are set
        after `__init__`, then `validate_memformer` on the result."""
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out).validate_memformer()
        return out

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MemformerConfig:
        """Build a config from one of `PRESETS` ("tiny", "cpu-small", "small", "v1-lm", "v2-lm"), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Memformer preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def validate_memformer(self) -> None:
        """Raise `ValueError` naming the field for any invalid value."""

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "segment_length",
                     "num_memory_slots", "memory_write_heads"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 1, name, value, "an integer >= 1")
        _check(self.segment_length <= MAX_SEGMENT_LENGTH, "segment_length", self.segment_length,
               f"at most {MAX_SEGMENT_LENGTH} (each segment is encoded at full length: memory grows with its square)")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 1, name, value, "an integer >= 1")
        _check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads", self.num_attention_heads,
               f"a divisor of hidden_size={self.hidden_size}")
        _check(self.hidden_size % self.memory_write_heads == 0, "memory_write_heads", self.memory_write_heads,
               f"a divisor of hidden_size={self.hidden_size}")
        tau = self.memory_write_temperature
        _check(is_num(tau) and 0.0 < tau <= 1.0, "memory_write_temperature", tau, "a number in (0, 1]")
        _check(tau >= MIN_WRITE_TEMPERATURE, "memory_write_temperature", tau,
               f"at least {MIN_WRITE_TEMPERATURE} (the writer's float32 scores q·k / (sqrt(d_w) tau) overflow below it)")
        bias = self.memory_write_self_bias
        _check(bias is None or (is_num(bias) and math.isfinite(bias)), "memory_write_self_bias", bias,
               "None or a finite number")
        spread = self.memory_write_self_bias_spread
        _check(is_num(spread) and math.isfinite(spread) and spread >= 0, "memory_write_self_bias_spread", spread,
               "a finite number >= 0")
        _check(spread == 0 or bias is not None, "memory_write_self_bias_spread", spread,
               "0 unless memory_write_self_bias is set (it spreads the initial self biases around that value)")
        if bias is not None:
            _check(abs(bias) + spread / 2 <= MAX_WRITE_SELF_BIAS, "memory_write_self_bias", bias,
                   f"initial self biases within ±{MAX_WRITE_SELF_BIAS} (with memory_write_self_bias_spread={spread}); "
                   f"beyond it the writer's float32 scores overflow")
        scale = self.forget_bias_init_scale
        _check(is_num(scale) and math.isfinite(scale) and scale > 0, "forget_bias_init_scale", scale,
               "a positive finite number")
        weight = self.memory_prediction_loss
        _check(is_num(weight) and math.isfinite(weight) and weight >= 0, "memory_prediction_loss", weight,
               "a finite number >= 0 (0: off)")
        _check(scale <= MAX_FORGET_BIAS_INIT_SCALE, "forget_bias_init_scale", scale,
               f"at most {MAX_FORGET_BIAS_INIT_SCALE} (the float32 squared norm of the forgetting vector overflows "
               f"beyond it, and BMN would give zero slots instead of unit vectors)")
        _check(self.position_embedding_type in POSITION_EMBEDDING_TYPES, "position_embedding_type",
               self.position_embedding_type, f"one of {POSITION_EMBEDDING_TYPES}")
        _check(self.first_segment_context in FIRST_SEGMENT_CONTEXTS, "first_segment_context",
               self.first_segment_context, f"one of {FIRST_SEGMENT_CONTEXTS}")
        _check(self.activation_function in ACTIVATIONS, "activation_function", self.activation_function,
               f"one of {ACTIVATIONS}")
        if self.position_embedding_type == "rope":
            _check(self.head_dim % 2 == 0, "num_attention_heads", self.num_attention_heads,
                   "a value giving an even head dimension (RoPE rotates pairs)")
            theta = self.rope_parameters.get("rope_theta", 1e4)
            _check(is_num(theta) and math.isfinite(theta) and theta > 0, "rope_parameters.rope_theta", theta,
                   "a positive finite number")
            _check(theta >= MIN_ROPE_THETA, "rope_parameters.rope_theta", theta,
                   f"at least {MIN_ROPE_THETA} (the RoPE tables are float32: a smaller base is 0 there and gives NaN)")
            rope_type = self.rope_parameters.get("rope_type", "default")
            _check(rope_type == "default", "rope_parameters.rope_type", rope_type,
                   "'default' (positions are in-segment, so no scaling is ever needed)")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _check(is_num(value) and 0.0 <= value < 1.0, name, value, "a probability in [0, 1)")
        _check(self.norm_type in NORM_TYPES, "norm_type", self.norm_type, f"one of {NORM_TYPES}")
        _check(self.mlp_type in MLP_TYPES, "mlp_type", self.mlp_type, f"one of {MLP_TYPES}")
        kv = self.num_key_value_heads
        _check(is_int(kv) and kv >= 1 and self.num_attention_heads % kv == 0, "num_key_value_heads", kv,
               f"None or an integer >= 1 dividing num_attention_heads={self.num_attention_heads}")
        for name in BOOLEAN_FIELDS:  # "false" (a string) would count as True
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        if self.cross_attention_rope:
            _check(self.position_embedding_type == "rope", "cross_attention_rope", True,
                   f"False with position_embedding_type={self.position_embedding_type!r} (it rotates by RoPE)")
            _check(not self.decoder_reads_memory, "cross_attention_rope", True,
                   "False with decoder_reads_memory=True (the memory keys have no position)")
        for name in ("layer_norm_eps", "rms_norm_eps", "initializer_range"):  # inf / nan would give NaN logits
            value = getattr(self, name)
            _check(is_num(value) and math.isfinite(value) and value > 0, name, value, "a positive finite number")
        _check(self.bptt_horizon is None or (is_int(self.bptt_horizon) and self.bptt_horizon >= 1), "bptt_horizon",
               self.bptt_horizon, "None or an integer >= 1")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ok = value is None or (is_int(value) and 0 <= value < self.vocab_size)
            if name == "eos_token_id" and isinstance(value, list):
                ok = all(is_int(v) and 0 <= v < self.vocab_size for v in value)
            _check(ok, name, value, f"None or a token id in [0, vocab_size={self.vocab_size})")
        _check(self.bos_token_id is not None, "bos_token_id", None,
               "a token id (the decoder starts every segment with BOS)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["BOOLEAN_FIELDS", "MAX_FORGET_BIAS_INIT_SCALE", "MAX_SEGMENT_LENGTH", "MAX_WRITE_SELF_BIAS", "MIN_ROPE_THETA",
           "MIN_WRITE_TEMPERATURE", "MLP_TYPES", "MemformerConfig", "NORM_TYPES", "PRESETS"]
