"""MemBART port: conversion of original checkpoints and parity with the authors' reference code.

The fixture in ``tests/fixtures/membart`` was produced by ``conversion/make_membart_fixture.py`` running the original
qywu/memformers code (transformers 4.26.1) on tiny random weights: 3 consecutive steps with carried memory, batch 2
with padding, row 1 reset at the last step, plus one greedy ``generate``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from memformer_hf.configuration_membart import MemBartConfig
from memformer_hf.modeling_membart import MemBartForConditionalGeneration, MemBartModel

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "membart"
TOL = 1e-5
NUM_STEPS = 3

AutoConfig.register("membart", MemBartConfig, exist_ok=True)
AutoModel.register(MemBartConfig, MemBartModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(MemBartConfig, MemBartForConditionalGeneration, exist_ok=True)


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_membart_checkpoint", ROOT / "conversion" / "convert_membart_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


converter = _load_converter()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def original_weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "original_weights.safetensors"))


def _convert(checkpoint: Path, out: Path, *extra: str) -> int:
    return converter.main(
        ["--checkpoint", str(checkpoint), "--config", str(FIXTURE / "config.json"), "--output_dir", str(out), *extra]
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original_weights) -> dict[str, Path]:
    """Convert the fixture twice: as an HF ``pytorch_model.bin`` and as a TorchFly ``*_model_state.pth``."""
    tmp = tmp_path_factory.mktemp("membart")
    bin_path = tmp / "pytorch_model.bin"
    torch.save(original_weights, bin_path)
    # TorchFly training state: MemBartModel keys under the recurrent cell prefix, no lm_head / final_logits_bias.
    torchfly = {
        converter.TORCHFLY_PREFIX + key[len("model.") :]: value
        for key, value in original_weights.items()
        if key.startswith("model.")
    }
    pth_path = tmp / "iter_156335_model_state.pth"
    torch.save(torchfly, pth_path)
    folders = {"bin": tmp / "v5_bin", "torchfly": tmp / "v5_torchfly"}
    assert _convert(bin_path, folders["bin"]) == 0
    assert _convert(pth_path, folders["torchfly"]) == 0
    return folders


def _load(folder: Path, how: str) -> MemBartForConditionalGeneration:
    if how == "auto_remote":
        model, info = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    else:
        model, info = MemBartForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _run_steps(model, reference, steps=range(NUM_STEPS)):
    """Run the fixture's steps carrying memory; yield (step, output)."""
    memory = None
    for t in steps:
        step = {k.split(".", 1)[1]: v for k, v in reference.items() if k.startswith(f"step{t}.")}
        with torch.no_grad():
            out = model(
                input_ids=step["input_ids"],
                attention_mask=step["attention_mask"],
                decoder_input_ids=step["decoder_input_ids"],
                decoder_attention_mask=step["decoder_attention_mask"],
                memory_states=memory,
                memory_resets=step["memory_resets"],
            )
        memory = out.memory_states
        yield t, step, out


@pytest.mark.parametrize("source", ["bin", "torchfly"])
@pytest.mark.parametrize("how", ["auto_remote", "class"])
def test_converted_checkpoint_matches_reference(converted, reference, source, how):
    model = _load(converted[source], how)
    assert model.can_generate()
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    worst_logits = worst_memory = 0.0
    for _, step, out in _run_steps(model, reference):
        worst_logits = max(worst_logits, (out.logits - step["logits"]).abs().max().item())
        worst_memory = max(worst_memory, (out.memory_states - step["memory_states"]).abs().max().item())
        enc_diff = (out.encoder_last_hidden_state - step["encoder_last_hidden_state"]).abs().max().item()
        assert enc_diff <= TOL
    print(f"[{source}/{how}] max |logits - ref| = {worst_logits:.3e}, max |memory - ref| = {worst_memory:.3e}")
    assert worst_logits <= TOL and worst_memory <= TOL


def test_reset_row_equals_fresh_start(converted, reference):
    model = _load(converted["bin"], "class")
    *_, (t, step, out) = _run_steps(model, reference)
    assert step["memory_resets"].tolist() == [False, True]
    with torch.no_grad():
        fresh = model(
            input_ids=step["input_ids"][1:],
            attention_mask=step["attention_mask"][1:],
            decoder_input_ids=step["decoder_input_ids"][1:],
            decoder_attention_mask=step["decoder_attention_mask"][1:],
        )
    assert (fresh.memory_states[0] - out.memory_states[1]).abs().max().item() <= 1e-6
    assert (fresh.logits[0] - out.logits[1]).abs().max().item() <= 1e-5
    # the other row carried its memory: it must differ from a fresh start
    with torch.no_grad():
        fresh0 = model.get_encoder()(input_ids=step["input_ids"][:1], attention_mask=step["attention_mask"][:1])
    assert (fresh0.memory_states[0] - out.memory_states[0]).abs().max().item() > 1e-3


def test_fixed_forward_bugs_labels_and_padded_mask(converted, reference):
    """Bug 1: labels without encoder_outputs; bug 2: a token-level mask reaches the decoder padded with K ones."""
    model = _load(converted["bin"], "class")
    step = {k.split(".", 1)[1]: v for k, v in reference.items() if k.startswith("step0.")}
    labels = step["decoder_input_ids"].clone()
    labels[step["decoder_attention_mask"] == 0] = -100
    out = model(input_ids=step["input_ids"], attention_mask=step["attention_mask"], labels=labels)
    assert out.memory_states.shape == (2, model.config.memory_len, model.config.d_model)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.model.encoder.memory_bias.grad is not None
    as_tuple = model(
        input_ids=step["input_ids"], attention_mask=step["attention_mask"], labels=labels, return_dict=False
    )
    assert torch.allclose(as_tuple[0], out.loss)


def test_generate_matches_reference_and_threads_memory(converted, reference):
    model = _load(converted["bin"], "auto_remote")
    kwargs = {
        "input_ids": reference["generate.input_ids"],
        "attention_mask": reference["generate.attention_mask"],
        "memory_states": reference["generate.memory_states_in"],
    }
    greedy = model.generate(**kwargs, max_length=10, do_sample=False, num_beams=1)
    assert torch.equal(greedy, reference["generate.sequences"])
    uncached = model.generate(**kwargs, max_length=10, do_sample=False, num_beams=1, use_cache=False)
    assert torch.equal(uncached, greedy)
    beams = model.generate(**kwargs, max_length=10, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4

    turn = model.generate_turn(
        reference["generate.input_ids"],
        reference["generate.attention_mask"],
        memory_states=reference["generate.memory_states_in"],
        max_length=10,
        num_beams=3,
    )
    encoder = model.get_encoder()(
        input_ids=reference["generate.input_ids"],
        attention_mask=reference["generate.attention_mask"],
        memory_states=reference["generate.memory_states_in"],
    )
    assert torch.equal(turn.memory_states, encoder.memory_states)
    assert turn.memory_states.shape == reference["generate.memory_states_in"].shape
    # the memory matters: generating from a fresh memory gives other scores
    with torch.no_grad():
        fresh = model(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])
        carried = model(**kwargs)
    assert (fresh.logits - carried.logits).abs().max().item() > 1e-3


def test_converter_refuses_bad_inputs(tmp_path, original_weights, capsys):
    partial = dict(original_weights)
    partial.pop("model.encoder.memory_bias")
    torch.save(partial, tmp_path / "partial.bin")
    assert _convert(tmp_path / "partial.bin", tmp_path / "out_partial") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: partial checkpoint") and "--allow_partial" in err and "\n" not in err
    assert not (tmp_path / "out_partial").exists()

    (tmp_path / "notes.bin").write_text("this is not a checkpoint\n")
    assert _convert(tmp_path / "notes.bin", tmp_path / "out_text") == 1
    err = capsys.readouterr().err.strip()
    assert "is not a PyTorch/safetensors checkpoint" in err and "\n" not in err

    assert _convert(tmp_path / "missing.bin", tmp_path / "out_missing") == 1
    assert "checkpoint file not found" in capsys.readouterr().err

    wrong = json.loads((FIXTURE / "config.json").read_text())
    wrong["memory_len"] = 8
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    torch.save(original_weights, tmp_path / "pytorch_model.bin")
    rc = converter.main(
        ["--checkpoint", str(tmp_path / "pytorch_model.bin"), "--config", str(tmp_path / "wrong.json")]
        + ["--output_dir", str(tmp_path / "out_wrong")]
    )
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert "do not match the config's shapes" in err and "model.encoder.memory_bias" in err

    # a floating-point parameter stored as integers of the right shape: one line, not a traceback from loading
    as_ints = dict(original_weights)
    as_ints["model.encoder.memory_bias"] = as_ints["model.encoder.memory_bias"].round().long()
    torch.save(as_ints, tmp_path / "ints.bin")
    assert _convert(tmp_path / "ints.bin", tmp_path / "out_ints") == 1
    err = capsys.readouterr().err.strip()
    assert "model.encoder.memory_bias: checkpoint dtype torch.int64 vs a floating-point parameter" in err, err
    assert "\n" not in err and not (tmp_path / "out_ints").exists()

    # with --allow_partial the missing tensor is initialised (finite) instead
    assert _convert(tmp_path / "partial.bin", tmp_path / "out_allowed", "--allow_partial") == 0
    model = MemBartForConditionalGeneration.from_pretrained(tmp_path / "out_allowed")
    assert torch.isfinite(model.model.encoder.memory_bias).all()


def test_checkpoint_without_shared_takes_the_embedding_from_a_tied_copy(converted, reference, tmp_path, original_weights):
    """A checkpoint that stores the tied embedding only as ``lm_head.weight`` (or ``embed_tokens``) converts to the same
    model: the copy is the shared embedding (it used to be dropped as unexpected and re-initialised under
    --allow_partial, or refused as partial without it)."""
    expected = _step_logits(_load(converted["bin"], "class"), reference)
    shared = original_weights["model.shared.weight"]
    for copy_key in ("lm_head.weight", "model.decoder.embed_tokens.weight"):
        weights = {k: v for k, v in original_weights.items() if k not in converter.TIED_KEYS and k != converter.SHARED_KEY}
        weights[copy_key] = shared.clone()
        torch.save(weights, tmp_path / "no_shared.bin")
        out = tmp_path / f"out_{copy_key}"
        assert _convert(tmp_path / "no_shared.bin", out) == 0
        torch.testing.assert_close(_step_logits(_load(out, "class"), reference), expected, rtol=0, atol=0)
    weights[copy_key] = shared.clone()
    weights["lm_head.weight"] = shared + 1  # copies that disagree are not a MemBART checkpoint
    with pytest.raises(converter.ConversionError, match="embed_tokens.weight differs from lm_head.weight"):
        converter.normalize_keys(weights, shared.shape[0])


def test_missing_memory_bias_initialises_finite(converted, tmp_path):
    """An explicit nn.Parameter missing from a checkpoint must be initialised by `_init_weights` (not left as garbage)."""
    folder = tmp_path / "no_bias"
    folder.mkdir()
    for f in converted["bin"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(converted["bin"] / "model.safetensors"))
    weights.pop("model.encoder.memory_bias")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"do not match MemBartForConditionalGeneration \(missing model\.encoder\."
                                      r"memory_bias\)"):
        MemBartForConditionalGeneration.from_pretrained(folder)  # strict by default
    model, info = MemBartForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)
    assert "model.encoder.memory_bias" in info["missing_keys"]
    bias = model.model.encoder.memory_bias
    assert torch.isfinite(bias).all() and 0 < bias.std().item() < 10 * model.config.init_std


def _step_logits(model, reference) -> torch.Tensor:
    return torch.cat([out.logits.flatten() for _, _, out in _run_steps(model, reference)])


def test_loading_is_safetensors_only_and_exact(converted, reference, tmp_path):
    """Issue 15 items 1-2 for MemBART: a flipped byte in a tensor name, a pickle `.bin` shard or a shard outside the
    folder named by `model.safetensors.index.json` are refused; the clean checkpoint loads with identical outputs."""
    folder = tmp_path / "ckpt"
    shutil.copytree(converted["bin"], folder)
    expected = _step_logits(_load(converted["bin"], "class"), reference)
    weights = folder / "model.safetensors"
    clean = weights.read_bytes()

    data = bytearray(clean)  # one byte of one tensor name in the JSON header
    at = data.find(b'"model.encoder.memory_bias"', 8, 8 + int.from_bytes(data[:8], "little")) + len('"model.e')
    data[at] = ord("X")
    weights.write_bytes(bytes(data))
    for load in (MemBartForConditionalGeneration.from_pretrained, AutoModelForSeq2SeqLM.from_pretrained):
        with pytest.raises(OSError, match="tensor names do not match") as err:
            load(folder)
        assert str(weights) in str(err.value) and "missing model.encoder.memory_bias;" in str(err.value)
        assert "unexpected model.eXcoder.memory_bias" in str(err.value)

    weights.write_bytes(clean)
    state = load_file(str(weights))
    weights.unlink()
    for shard in ("pytorch_model.bin", "../outside.safetensors"):
        if shard.endswith(".bin"):
            torch.save(state, folder / shard)
        else:
            save_file(state, str(folder / shard), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: shard for k in state}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(OSError, match=r"weight_map names shard files .* that are not `\*\.safetensors` files"):
            MemBartForConditionalGeneration.from_pretrained(folder)

    save_file(state, str(folder / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(_step_logits(_load(folder, "class"), reference), expected)


def test_config_validation_and_original_config():
    config = MemBartConfig(**json.loads((FIXTURE / "config.json").read_text()))
    assert (config.memory_len, config.d_model, config.decoder_start_token_id) == (4, 16, 2)
    assert config.tie_word_embeddings and config.is_encoder_decoder
    for bad, field in [
        ({"memory_len": 0}, "memory_len"),
        ({"d_model": 30, "encoder_attention_heads": 4}, "d_model"),
        ({"dropout": 1.5}, "dropout"),
        ({"activation_function": "nope"}, "activation_function"),
        ({"pad_token_id": 10**6}, "pad_token_id"),
        ({"normalize_before": True}, "normalize_before"),
        ({"hidden_size": 0}, "d_model"),  # the names of `attribute_map` are checked too
        ({"num_attention_heads": 5}, "encoder_attention_heads"),
        ({"use_cache": "false"}, "use_cache"),
    ]:
        with pytest.raises(ValueError, match=field):
            MemBartConfig(**bad)


def test_from_pretrained_overrides_are_validated(tmp_path):
    """`from_pretrained(path, key=value)` sets the overrides after `__init__`: they are checked all the same."""
    MemBartConfig(**json.loads((FIXTURE / "config.json").read_text())).save_pretrained(tmp_path)
    for bad, field in [({"d_model": 0}, "d_model"), ({"hidden_size": 0}, "d_model"), ({"use_cache": "no"}, "use_cache")]:
        with pytest.raises(ValueError, match=field):
            MemBartConfig.from_pretrained(tmp_path, **bad)
    assert MemBartConfig.from_pretrained(tmp_path, dropout=0.2).dropout == 0.2
