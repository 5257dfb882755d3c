"""memformer_hf: Memformer (Wu et al., arXiv 2010.06891) as a Hugging Face Transformers plugin.

Importing the package registers the Memformer classes with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .cache_memformer import MemformerCache
from .configuration_membart import MemBartConfig
from .configuration_memformer import PRESETS, MemformerConfig
from .modeling_membart import MemBartForConditionalGeneration, MemBartModel, MemBartPreTrainedModel
from .modeling_memformer import MemformerForCausalLM, MemformerModel, MemformerPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("memformer", MemformerConfig, exist_ok=True)
AutoModel.register(MemformerConfig, MemformerModel, exist_ok=True)
AutoModelForCausalLM.register(MemformerConfig, MemformerForCausalLM, exist_ok=True)

# `save_pretrained` writes `auto_map` + copies the remote-code files, so saved folders load with
# `trust_remote_code=True` where this package is not installed.
MemformerConfig.register_for_auto_class()
MemformerModel.register_for_auto_class("AutoModel")
MemformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# MemBART: the authors' published checkpoints (conversion/convert_membart_checkpoint.py)
AutoConfig.register("membart", MemBartConfig, exist_ok=True)
AutoModel.register(MemBartConfig, MemBartModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(MemBartConfig, MemBartForConditionalGeneration, exist_ok=True)
MemBartConfig.register_for_auto_class()
MemBartModel.register_for_auto_class("AutoModel")
MemBartForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "PRESETS",
    "MemBartConfig",
    "MemBartForConditionalGeneration",
    "MemBartModel",
    "MemBartPreTrainedModel",
    "MemformerCache",
    "MemformerConfig",
    "MemformerForCausalLM",
    "MemformerModel",
    "MemformerPreTrainedModel",
]
