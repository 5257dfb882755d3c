"""Configuration of MemBART (Wu & Yu, "Stateful Memory-Augmented Transformers for Dialogue Modeling").

MemBART is the authors' published memory-augmented BART (github qywu/memformers; checkpoints ``qywu/membart-base`` and
``qywu/membart-large``). The field names are those of the original ``config.json`` (a BART config plus ``memory_len``),
so an original config loads unchanged; see ``conversion/convert_membart_checkpoint.py``.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

# Generation parameters found in original BART/MemBART config.json files. Transformers v5 refuses to save them in a
# model config; the converter moves them into ``generation_config.json``.
MEMBART_GENERATION_KEYS = (
    "forced_eos_token_id",
    "forced_bos_token_id",
    "max_length",
    "min_length",
    "num_beams",
    "no_repeat_ngram_size",
    "early_stopping",
    "length_penalty",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "num_return_sequences",
    "num_beam_groups",
    "diversity_penalty",
    "bad_words_ids",
    "encoder_no_repeat_ngram_size",
    "output_scores",
    "return_dict_in_generate",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "typical_p",
)

_ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_new", "gelu_fast", "quick_gelu", "tanh", "gelu_pytorch_tanh")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MemBartConfig: `{name}` must be an int >= {minimum}, got {value!r}")


def _check_prob(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"MemBartConfig: `{name}` must be a float in [0, 1), got {value!r}")


def _check_token_id(name: str, value: Any, vocab_size: int) -> None:
    if value is None:
        return
    ids = value if isinstance(value, (list, tuple)) else [value]
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(f"MemBartConfig: `{name}` must be a token id in [0, {vocab_size}), got {value!r}")


class MemBartConfig(PreTrainedConfig):
    r"""Configuration for [`MemBartModel`] / [`MemBartForConditionalGeneration`].

    Defaults reproduce ``qywu/membart-base`` (BART-base + 64 memory slots).

    Args:
        memory_len: number of memory slots K.
        vocab_size: vocabulary size (50265 for the BART tokenizer).
        max_position_embeddings: learned absolute positions (the tables have ``max_position_embeddings + 2`` rows).
        d_model: hidden size (= memory slot width).
        encoder_layers / decoder_layers: number of layers.
        encoder_attention_heads / decoder_attention_heads: attention heads.
        encoder_ffn_dim / decoder_ffn_dim: feed-forward inner size (the memory stream FFN uses ``encoder_ffn_dim``).
        activation_function: FFN activation.
        dropout / attention_dropout / activation_dropout: dropout probabilities (also used by the memory gate).
        encoder_layerdrop / decoder_layerdrop: LayerDrop probabilities (training only).
        init_std: std of the normal initialiser (also of ``memory_bias``).
        classifier_dropout: kept for config compatibility with BART (unused).
        scale_embedding: multiply token embeddings by sqrt(d_model).
        use_cache: return decoder key/value caches.
        pad_token_id / bos_token_id / eos_token_id / decoder_start_token_id: special token ids (BART tokenizer).
        tie_word_embeddings: tie ``lm_head`` (and the encoder/decoder token embeddings) to ``model.shared``.
    """

    model_type = "membart"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        memory_len: int = 64,
        vocab_size: int = 50265,
        max_position_embeddings: int = 1024,
        encoder_layers: int = 6,
        encoder_ffn_dim: int = 3072,
        encoder_attention_heads: int = 12,
        decoder_layers: int = 6,
        decoder_ffn_dim: int = 3072,
        decoder_attention_heads: int = 12,
        encoder_layerdrop: float = 0.0,
        decoder_layerdrop: float = 0.0,
        activation_function: str = "gelu",
        d_model: int = 768,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        init_std: float = 0.01,
        classifier_dropout: float = 0.0,
        scale_embedding: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 2,
        decoder_start_token_id: int | None = 2,
        is_encoder_decoder: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        # Derived / legacy keys of the original config.json.
        kwargs.pop("num_hidden_layers", None)
        kwargs.pop("model_type", None)
        for key in MEMBART_GENERATION_KEYS:  # belong to generation_config.json in transformers v5
            kwargs.pop(key, None)
        # Architecture switches of old BART configs (present in the authors' membart-*.yaml): only the
        # post-LN BART layout is implemented, exactly as in the reference code.
        for key, supported in (
            ("normalize_before", False),
            ("add_final_layer_norm", False),
            ("normalize_embedding", True),
            ("add_bias_logits", False),
            ("static_position_embeddings", False),
        ):
            if key in kwargs and kwargs[key] is not None and bool(kwargs[key]) != supported:
                raise ValueError(f"MemBartConfig: `{key}={kwargs[key]!r}` is not supported (MemBART uses {supported})")

        self.memory_len = memory_len
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.encoder_ffn_dim = encoder_ffn_dim
        self.encoder_layers = encoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.activation_function = activation_function
        self.init_std = init_std
        self.encoder_layerdrop = encoder_layerdrop
        self.decoder_layerdrop = decoder_layerdrop
        self.classifier_dropout = classifier_dropout
        self.scale_embedding = scale_embedding
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.tie_word_embeddings = tie_word_embeddings
        for alias, name in self.attribute_map.items():  # `hidden_size` etc.: checked here, not set after the checks
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        self._validate()
        super().__init__(is_encoder_decoder=is_encoder_decoder, **kwargs)
        self.is_encoder_decoder = True if is_encoder_decoder is None else is_encoder_decoder
        if not self.is_encoder_decoder:
            raise ValueError("MemBartConfig: `is_encoder_decoder` must be True")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """`PretrainedConfig.get_config_dict`, refusing a checkpoint without config.json (transformers 5 reads it as
        the default configuration, which would silently replace every setting the weights do not pin down)."""
        subfolder = kwargs.get("subfolder") or ""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            where = f"{pretrained_model_name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise OSError(f"{where} has no config.json: a MemBartConfig cannot be guessed from the weights; restore "
                          f"the checkpoint's config.json or pass `config=` explicitly.")
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PretrainedConfig.from_dict`, whose keyword overrides (`from_pretrained(path, d_model=...)`) are set after
        `__init__`, then `_validate` on the result."""
        out = super().from_dict(config_dict, **kwargs)
        (out[0] if isinstance(out, tuple) else out)._validate()
        return out

    def _validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name, minimum in (
            ("memory_len", 1),
            ("vocab_size", 1),
            ("max_position_embeddings", 1),
            ("d_model", 1),
            ("encoder_layers", 0),
            ("decoder_layers", 1),
            ("encoder_attention_heads", 1),
            ("decoder_attention_heads", 1),
            ("encoder_ffn_dim", 1),
            ("decoder_ffn_dim", 1),
        ):
            _check_int(name, getattr(self, name), minimum)
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name) != 0:
                raise ValueError(
                    f"MemBartConfig: `d_model` ({self.d_model}) must be divisible by `{name}` ({getattr(self, name)})"
                )
        for name in (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "encoder_layerdrop",
            "decoder_layerdrop",
            "classifier_dropout",
        ):
            _check_prob(name, getattr(self, name))
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"MemBartConfig: `activation_function` must be one of {_ACTIVATIONS}, got {self.activation_function!r}"
            )
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"MemBartConfig: `init_std` must be a positive float, got {self.init_std!r}")
        for name in ("scale_embedding", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MemBartConfig: `{name}` must be a bool, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        if self.pad_token_id is None:
            raise ValueError("MemBartConfig: `pad_token_id` is required (it builds decoder inputs from labels)")
        if self.decoder_start_token_id is None:
            raise ValueError("MemBartConfig: `decoder_start_token_id` is required")


__all__ = ["MemBartConfig"]
