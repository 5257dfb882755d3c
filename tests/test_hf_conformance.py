"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against Memformer
(docs/design.md#testing).

The mixins come from the transformers sdist matching the installed version exactly, fetched at CI time by
`tests/hf_conformance/fetch_transformers_tests.py` (never vendored). Without them this module is skipped, unless
`MEMFORMER_REQUIRE_CONFORMANCE=1` (set by `.ci/run`), in which case it fails. Every mixin test that cannot apply to
Memformer is skipped below with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import unittest
import warnings
from unittest import mock

import pytest
import torch
from helpers import TINY_MEMFORMER
from hf_conformance import fetch_transformers_tests as fetcher
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from memformer_hf import MemformerConfig, MemformerForCausalLM, MemformerModel

_VERSION = fetcher.installed_transformers_version()
_TESTS = fetcher.tests_dir(_VERSION)
_PACKAGE = "transformers_sdist_tests"  # the sdist's `tests/` package, imported under a name that cannot clash

if not fetcher.is_complete(_TESTS):
    _why = (f"transformers {_VERSION} common tests not found in {_TESTS}; "
            "run `python tests/hf_conformance/fetch_transformers_tests.py`")
    if os.environ.get("MEMFORMER_REQUIRE_CONFORMANCE") == "1":
        pytest.fail(f"MEMFORMER_REQUIRE_CONFORMANCE=1 but {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

if _PACKAGE not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_PACKAGE, _TESTS / "__init__.py",
                                                   submodule_search_locations=[str(_TESTS)])
    sys.modules[_PACKAGE] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_PACKAGE])
with warnings.catch_warnings():  # transformers registers its custom pytest marks in its own conftest, absent here
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    _common = importlib.import_module(f"{_PACKAGE}.test_modeling_common")
    _config_common = importlib.import_module(f"{_PACKAGE}.test_configuration_common")
ModelTesterMixin, ids_tensor = _common.ModelTesterMixin, _common.ids_tensor
ConfigTester = _config_common.ConfigTester


class MemformerModelTester:
    """The suite's tiny config (`TINY_MEMFORMER`, standard init) and stream-mode inputs crossing two segment boundaries."""

    def __init__(self, parent, batch_size: int = 2, seq_length: int = 9, is_training: bool = True) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        # transformers' usual 0.02 init, not the suite's sharp 0.3: the mixin's tolerances (eager vs SDPA at atol 1e-6)
        # are set for the O(0.1) activations of its own testers, the sharp init gives O(10) ones
        self.config_kwargs = {**TINY_MEMFORMER, "initializer_range": 0.02}
        self.vocab_size = self.config_kwargs["vocab_size"]
        self.hidden_size = self.config_kwargs["hidden_size"]
        self.num_attention_heads = self.config_kwargs["num_attention_heads"]
        self.num_hidden_layers = self.config_kwargs["decoder_layers"]  # `num_hidden_layers` maps to the decoder

    def get_config(self) -> MemformerConfig:
        return MemformerConfig(**self.config_kwargs)

    def prepare_config_and_inputs(self) -> tuple[MemformerConfig, torch.Tensor, torch.Tensor]:
        # content ids only (>= 3: never pad / BOS / EOS). A leading BOS id is the row's boot segment, which cannot be
        # recognised in `inputs_embeds` (documented), so test_inputs_embeds_matches_input_ids would differ there
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        # left padding (the layout generate uses) on the last row; every row keeps >= 2 full segments of real tokens,
        # so the memory written after the first one reaches the loss and every parameter gets a gradient
        attention_mask = torch.ones_like(input_ids)
        attention_mask[-1, :1] = 0
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[MemformerConfig, dict[str, torch.Tensor]]:
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class MemformerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MemformerModel, MemformerForCausalLM)
    all_generative_model_classes = ()  # GenerationTesterMixin is not in the sdist; tests/test_generation.py covers it

    def setUp(self) -> None:
        self.model_tester = MemformerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MemformerConfig, hidden_size=16, vocab_size=50,
                                          num_attention_heads=2)
        # The mixin recognises base models and LM heads by name in transformers' built-in mappings, which a plugin is
        # not part of: add ours for the duration of each test (labels for the LM, no loss expected from the base).
        for mapping, name in ((MODEL_MAPPING_NAMES, "MemformerModel"),
                              (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "MemformerForCausalLM")):
            patcher = mock.patch.dict(mapping, {"memformer": name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    @unittest.skip(reason="no `output_attentions`: decoder self-attention runs over segment-local chunks, so there is "
                          "no per-layer [seq, seq] map (the memory's maps come from `output_memory_attentions`)")
    def test_attention_outputs(self) -> None:
        pass

    def test_retain_grad_hidden_states_attentions(self) -> None:
        # no `attentions` output (see test_attention_outputs): run the mixin's hidden-states half only
        with mock.patch.object(self, "has_attentions", False):
            super().test_retain_grad_hidden_states_attentions()

    @unittest.skip(reason="`output_mask` is a bool tensor and the mixin builds its failure message by subtracting "
                          "outputs, which torch forbids for bool; test_tuple_and_dict_outputs_match checks the same")
    def test_model_outputs_equivalence(self) -> None:
        pass

    def test_tuple_and_dict_outputs_match(self) -> None:
        """`return_dict=False` gives `to_tuple()` of the `return_dict=True` output, exactly (incl. bool tensors)."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()

        def check(tuple_object, dict_object) -> None:
            if isinstance(tuple_object, (list, tuple)):
                self.assertEqual(len(tuple_object), len(dict_object))
                for a, b in zip(tuple_object, dict_object):
                    check(a, b)
            elif isinstance(tuple_object, torch.Tensor):
                self.assertEqual(tuple_object.dtype, dict_object.dtype)
                torch.testing.assert_close(tuple_object, dict_object, rtol=0, atol=0)
            else:  # None or the cache
                self.assertIs(type(tuple_object), type(dict_object))

        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            for return_labels in (False, True):
                for extra in ({}, {"output_hidden_states": True}):
                    inputs = self._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
                    with torch.no_grad():
                        tuple_output = model(**inputs, return_dict=False, **extra)
                        dict_output = model(**inputs, return_dict=True, **extra)
                    self.assertIsInstance(tuple_output, tuple)
                    check(tuple_output, dict_output.to_tuple())


class MemformerConfigTest(unittest.TestCase):
    """`ConfigTester` on a config that differs from the defaults in Memformer-specific fields."""

    def test_config_memformer_fields(self) -> None:
        ConfigTester(self, config_class=MemformerConfig, hidden_size=16, num_attention_heads=2, vocab_size=50,
                     segment_length=8, num_memory_slots=4, first_segment_context="empty",
                     position_embedding_type="simplified_rpe").run_common_tests()


class MemformerLlamaStyleModelTester(MemformerModelTester):
    """The tiny config with Llama's layer shapes (docs/design.md#llama-shapes): RMSNorm, SwiGLU, one KV head for two
    query heads, no attention / MLP biases (the head stays tied, as SmolLM2's: an untied head makes the mixin's
    base-model-into-head load miss `lm_head.weight`, which the strict loader refuses by design; tests/test_warm_start.py
    round-trips untied heads)."""

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.config_kwargs.update(norm_type="rmsnorm", mlp_type="swiglu", activation_function="silu",
                                  num_key_value_heads=1, attention_bias=False, mlp_bias=False, rms_norm_eps=1e-6)


class MemformerLlamaStyleModelTest(MemformerModelTest):
    """The mixin's tests again, on the Llama-style configuration."""

    def setUp(self) -> None:
        super().setUp()
        self.model_tester = MemformerLlamaStyleModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MemformerConfig, hidden_size=16, vocab_size=50,
                                          num_attention_heads=2, norm_type="rmsnorm", mlp_type="swiglu",
                                          num_key_value_heads=1, mlp_bias=False, tie_word_embeddings=False)
