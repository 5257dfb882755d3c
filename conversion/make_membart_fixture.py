"""Produce the tiny MemBART parity fixture by running the authors' ORIGINAL code (qywu/memformers).

This script is NOT run by the test-suite. It documents how ``tests/fixtures/membart/`` was produced: tiny random
weights in the original state-dict layout, an original-style ``config.json``, three consecutive steps of inputs with
carried memory (batch 2, right padding, one row reset at the last step), and the reference logits / memory states that
the authors' implementation computes for them, plus one greedy ``generate`` run.

Set-up (throwaway environment outside the repository; never copy the reference code into the repo)::

    python3 -m venv /tmp/membart_ref/venv
    /tmp/membart_ref/venv/bin/pip install torch==2.13.0 transformers==4.26.1 safetensors
    # qywu/memformers at commit 4575d14 (MIT), e.g. `git clone https://github.com/qywu/memformers`, then:
    mkdir -p /tmp/membart_ref/src && git -C memformers archive 4575d14 memformers | tar -x -C /tmp/membart_ref/src
    PYTHONPATH=/tmp/membart_ref/src /tmp/membart_ref/venv/bin/python conversion/make_membart_fixture.py \
        --out tests/fixtures/membart

The reference package's ``memformers/models/membart/__init__.py`` imports TorchFly (training only); this script
registers bare package modules so that only the HF-compatible modelling files are imported, unmodified.

Original forward bug (2) (the unpadded encoder mask handed to the decoder) is avoided exactly as the authors' own
training code does: the decoder receives the encoder's padded ``encoder_attention_mask`` (``[memory; tokens]``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import types

import torch
from safetensors.torch import save_file

REFERENCE_COMMIT = "4575d14a76284eb32d2f5e2f52cbf2378ad829f2"

TINY_CONFIG = {
    "vocab_size": 96,
    "max_position_embeddings": 32,
    "d_model": 16,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "memory_len": 4,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "activation_function": "gelu",
    "init_std": 0.01,
    "scale_embedding": False,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_eos_token_id": 2,
    "use_cache": True,
    # keys of the authors' membart-*.yaml that end up in the published config.json
    "normalize_before": False,
    "normalize_embedding": True,
    "add_final_layer_norm": False,
    "add_bias_logits": False,
    "pretrained_name": "facebook/bart-base",
}


def _import_reference():
    """Import the reference modelling modules without executing the TorchFly-dependent package ``__init__``."""
    spec = importlib.util.find_spec("memformers")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the reference package `memformers` is not on PYTHONPATH (see this script's docstring)")
    root = list(spec.submodule_search_locations)[0]
    for name, rel in [
        ("memformers", ""),
        ("memformers.models", "models"),
        ("memformers.models.membart", os.path.join("models", "membart")),
    ]:
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(root, rel)]
        sys.modules[name] = mod
    modeling = importlib.import_module("memformers.models.membart.modeling_membart")
    configuration = importlib.import_module("memformers.models.membart.configuration_membart")
    return modeling, configuration


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter sharp random values (std 0.02 would hide memory bugs behind near-uniform attention)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are yielded once
            noise = torch.randn(param.shape, generator=gen)
            if "layer_norm" in name or "layernorm" in name:
                param.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias") and "memory_bias" not in name:
                param.copy_(0.2 * noise)
            elif "memory_bias" in name:
                param.copy_(noise)
            elif "embed" in name or "shared" in name:
                param.copy_(0.8 * noise)
            else:
                param.copy_(noise * (2.0 / param.shape[-1]) ** 0.5)


def _step_inputs(gen: torch.Generator, vocab: int, enc_len: int, dec_len: int, enc_pad: int, dec_pad: int) -> dict:
    """Random right-padded encoder/decoder inputs for a batch of 2 (row 1 is the padded one)."""
    low = 3  # keep ids clear of bos/pad/eos
    input_ids = torch.randint(low, vocab, (2, enc_len), generator=gen)
    attention_mask = torch.ones(2, enc_len, dtype=torch.long)
    input_ids[:, 0] = 0
    input_ids[0, -1] = 2
    input_ids[1, enc_len - enc_pad - 1] = 2
    if enc_pad:
        input_ids[1, enc_len - enc_pad :] = 1
        attention_mask[1, enc_len - enc_pad :] = 0
    decoder_input_ids = torch.randint(low, vocab, (2, dec_len), generator=gen)
    decoder_input_ids[:, 0] = 2
    decoder_attention_mask = torch.ones(2, dec_len, dtype=torch.long)
    if dec_pad:
        decoder_input_ids[1, dec_len - dec_pad :] = 1
        decoder_attention_mask[1, dec_len - dec_pad :] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/membart", help="output folder")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    import transformers

    modeling, configuration = _import_reference()
    torch.manual_seed(args.seed)
    config = configuration.MemBartConfig(**TINY_CONFIG)
    model = modeling.MemBartForConditionalGeneration(config).eval()
    _randomize_(model, args.seed)
    model.tie_weights()

    # --- the original checkpoint layout: what `save_pretrained` of transformers 4.26.1 writes -------------------
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            config_json = json.load(f)
        state_dict = torch.load(os.path.join(tmp, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    weights = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}

    # --- three consecutive steps with carried memory -----------------------------------------------------------
    gen = torch.Generator().manual_seed(args.seed + 1)
    shapes = [(7, 5, 2, 1), (5, 6, 1, 0), (6, 4, 3, 2)]  # (enc_len, dec_len, enc_pad row 1, dec_pad row 1)
    resets = [[True, True], [False, False], [False, True]]
    tensors: dict[str, torch.Tensor] = {}
    memory = model.construct_memory(2)
    fresh_row = None
    with torch.no_grad():
        for t, ((enc_len, dec_len, enc_pad, dec_pad), reset) in enumerate(zip(shapes, resets)):
            inputs = _step_inputs(gen, config.vocab_size, enc_len, dec_len, enc_pad, dec_pad)
            memory_resets = torch.tensor(reset)
            enc = model.model.encoder(
                input_ids=inputs["input_ids"],
                memory_states=memory,
                memory_resets=memory_resets,
                attention_mask=inputs["attention_mask"],
            )
            out = model(
                input_ids=None,
                encoder_outputs=enc,
                attention_mask=enc.encoder_attention_mask,  # [memory; tokens] mask, as the authors' training code
                decoder_input_ids=inputs["decoder_input_ids"],
                decoder_attention_mask=inputs["decoder_attention_mask"],
                use_cache=False,
            )
            for key, value in inputs.items():
                tensors[f"step{t}.{key}"] = value
            tensors[f"step{t}.memory_resets"] = memory_resets
            tensors[f"step{t}.logits"] = out.logits.contiguous()
            tensors[f"step{t}.memory_states"] = out.memory_states.contiguous()
            tensors[f"step{t}.encoder_last_hidden_state"] = enc.last_hidden_state.contiguous()
            if t == len(shapes) - 1:  # sanity check of the reference itself: reset row == fresh start
                fresh = model.model.encoder(
                    input_ids=inputs["input_ids"][1:],
                    memory_states=model.construct_memory(1),
                    attention_mask=inputs["attention_mask"][1:],
                )
                fresh_row = (fresh.memory_states[0] - enc.memory_states[1]).abs().max().item()
            memory = enc.memory_states

        # --- greedy generation from the carried memory (one more turn) -----------------------------------------
        inputs = _step_inputs(gen, config.vocab_size, 6, 2, 2, 0)
        enc = model.model.encoder(
            input_ids=inputs["input_ids"], memory_states=memory, attention_mask=inputs["attention_mask"]
        )
        generated = model.generate(
            encoder_outputs=enc,
            attention_mask=enc.encoder_attention_mask,
            max_length=10,
            num_beams=1,
            do_sample=False,
        )
        tensors["generate.input_ids"] = inputs["input_ids"]
        tensors["generate.attention_mask"] = inputs["attention_mask"]
        tensors["generate.memory_states_in"] = memory.clone()
        tensors["generate.sequences"] = generated

    os.makedirs(args.out, exist_ok=True)
    save_file(weights, os.path.join(args.out, "original_weights.safetensors"), metadata={"format": "pt"})
    meta = {
        "reference_repo": "qywu/memformers",
        "reference_commit": REFERENCE_COMMIT,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_steps": str(len(shapes)),
        "seed": str(args.seed),
    }
    save_file(tensors, os.path.join(args.out, "reference.safetensors"), metadata=meta)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out}: {len(weights)} weight tensors, {len(tensors)} reference tensors")
    print(f"reference self-check, reset row vs fresh start (max abs diff): {fresh_row:.3e}")
    print("generated:", generated.tolist())


if __name__ == "__main__":
    main()
