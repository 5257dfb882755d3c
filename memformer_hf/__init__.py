"""memformer_hf: Memformer (Wu et al., arXiv 2010.06891) as a Hugging Face Transformers plugin.

Importing the package registers the Memformer classes with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_memformer import MemformerCache
from .configuration_memformer import PRESETS, MemformerConfig
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

__all__ = [
    "PRESETS",
    "MemformerCache",
    "MemformerConfig",
    "MemformerForCausalLM",
    "MemformerModel",
    "MemformerPreTrainedModel",
]
