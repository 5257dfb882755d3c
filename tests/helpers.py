"""Shared scaffolding of the test suite: the tiny configuration, the model builder, left padding, a word-level
tokenizer, a callback that stops training after a step, and the launchers of multi-process (gloo) runs.
`conftest.py` holds the fixtures and the independent reference implementation."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from transformers import TrainerCallback

from memformer_hf import MemformerConfig, MemformerForCausalLM

BOS, EOS, PAD = 1, 2, 0
L = 4  # segment length of the tiny config
TINY_MEMFORMER = dict(
    vocab_size=50, hidden_size=16, encoder_layers=2, decoder_layers=2, num_attention_heads=2, intermediate_size=32,
    segment_length=L, num_memory_slots=3, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    initializer_range=0.3,  # SHARP init (docs/design.md#testing): with 0.02 the logits ignore the memory
)
CELL_KEYS = ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids", "decoder_attention_mask")


def assert_cells_mrbp_matches_bptt(model: torch.nn.Module, cells: dict[str, torch.Tensor]
                                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """`cells_backward` over one window: MRBP gives BPTT's loss, carried memory and gradients (float64); returns the
    MRBP loss and gradients by parameter name."""
    from memformer_hf.mrbp import cells_backward

    results = {}
    for mode in ("bptt", "mrbp"):
        model.zero_grad()
        loss, memory = cells_backward(model, cells, None, mode=mode)
        results[mode] = (float(loss), memory, {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_b, memory_b, grads_b), (loss_m, memory_m, grads_m) = results["bptt"], results["mrbp"]
    assert math.isclose(loss_m, loss_b, rel_tol=1e-12)
    torch.testing.assert_close(memory_m, memory_b, rtol=0, atol=1e-12)
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_m[name], g, rtol=1e-9, atol=1e-12, msg=name)
    return loss_m, grads_m


# ================================================================================================ models
def tiny_memformer_config(**overrides) -> MemformerConfig:
    return MemformerConfig(**{**TINY_MEMFORMER, **overrides})


def randomize_biases_and_norms(model: torch.nn.Module, seed: int) -> None:
    """Random biases (not the forgetting vector) and LayerNorm gains, so that a missing bias or a wrong LayerNorm
    cannot hide behind zero / one initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.endswith("forget_bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def build_tiny_memformer(seed: int = 0, dtype: torch.dtype = torch.float64, attn: str | None = "eager",
                         randomize: bool = True, cls=MemformerForCausalLM, config: MemformerConfig | None = None,
                         train: bool = False, freeze_key_biases: bool = False, **overrides):
    """A tiny sharp model of `TINY_MEMFORMER` + `overrides` (or of `config`), initialised from `seed`.

    randomize: every bias / LayerNorm affine gets a random value (they are initialised to 0 / 1, which would hide a
        missing bias or a wrong LayerNorm).
    attn: the attention implementation, set with `set_attn_implementation` (None: keep the config's). The model
        dispatches on the config attribute at call time (docs/design.md), shared by every submodule.
    train: train mode (default: eval mode).
    freeze_key_biases: attention key biases get no gradient. Softmax is shift-invariant, so their true gradient is 0
        and what they get is rounding noise, which Adam's normalisation would turn into ±lr updates that differ
        between summation orders."""
    torch.manual_seed(seed)
    model = cls(config if config is not None else tiny_memformer_config(**overrides))
    if randomize:
        randomize_biases_and_norms(model, seed + 1000)
    if freeze_key_biases:
        for name, p in model.named_parameters():
            if name.endswith("k_proj.bias"):
                p.requires_grad_(False)
    model = model.to(dtype).train(train)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def rand_ids(n: int, batch: int = 1, seed: int = 0, boot: bool = True) -> torch.Tensor:
    """Content ids in [3, 50) (never pad/bos/eos); column 0 is BOS when `boot`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (batch, n), generator=g)
    if boot:
        ids[:, 0] = BOS
    return ids


def cache_tensors(cache) -> dict[str, torch.Tensor]:
    """Every tensor of a `MemformerCache` (state and per-layer K/V), detached copies keyed by name."""
    out = {name: getattr(cache, name) for name in ("memory", "cross_mask", "segment_ids", "fill", "started")}
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values", "cross_keys", "cross_values"):
            out[f"layers.{i}.{name}"] = getattr(layer, name)
    return {k: v.detach().clone() for k, v in out.items()}


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad: int = PAD, garbage_seed: int | None = None,
             vocab_size: int = TINY_MEMFORMER["vocab_size"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded batch: (ids [B, n], attention mask [B, n] of 0/1 longs). The
    padding is `pad`, or random ids in [0, vocab_size) drawn from `garbage_seed` (which a correct model ignores)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    if garbage_seed is not None:
        ids = torch.randint(0, vocab_size, (len(rows), n), generator=torch.Generator().manual_seed(garbage_seed))
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.as_tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask


def decode_columns(model, extra: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
    """Continue a cached batch one column of `extra` [B, m] at a time, as `generate()` does (its 2-D mask of past +
    current columns, `past_key_values=cache`): the logits of every step [B, m, V] and the final cache."""
    from memformer_hf.modeling_memformer import CACHE_KWARG

    logits = []
    for t in range(extra.shape[1]):
        mask = torch.cat([mask, torch.ones(extra.shape[0], 1, dtype=torch.long)], 1)
        out = model(extra[:, t: t + 1], attention_mask=mask, past_key_values=cache)
        cache = out[CACHE_KWARG]
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def word_tokenizer(n: int):
    """A `PreTrainedTokenizerFast` with `n` tokens `w0 .. w{n-1}` (word level, built offline; w0 pads and is the
    unknown token, w1 is BOS, w2 EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="w0", bos_token="w1", eos_token="w2")


class StopAt(TrainerCallback):
    """Ends training right after optimizer step `step` (after its checkpoint, as a crash right after it would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


# ================================================================================================ gloo launchers
def require_gloo() -> None:
    """Skip the calling test unless torch.distributed with the gloo backend is available."""
    try:
        import torch.distributed as dist
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"torch.distributed unavailable: {e}")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo process group on 127.0.0.1:`port` for the block (in a worker started by `spawn_workers`)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_workers(worker: Callable[..., None], world: int, *args, timeout: float = 120) -> None:
    """Run `worker(rank, world, port, *args)` in `world` processes (fork where available: the children inherit the
    imported modules, where spawn would re-import torch and transformers per rank) and wait for them; a worker's
    exception is re-raised here. The worker joins the group with `gloo_group(rank, world, port)`."""
    import torch.multiprocessing as mp

    require_gloo()
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} workers did not finish within {timeout:g} s")


class Torchrun:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N script args...`, started at once (so that a
    single-process reference can run meanwhile); `wait` checks the exit status and returns the combined output.
    One intra-op thread per rank; `env` adds to this process's environment. Skips without gloo."""

    def __init__(self, script, *args, nproc: int = 2, env: dict[str, str] | None = None, cwd=None) -> None:
        require_gloo()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
             *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=None if cwd is None else str(cwd))

    def wait(self, timeout: float = 240) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"torchrun did not finish within {timeout:g} s:\n{out[-6000:]}")
        assert self.proc.returncode == 0, out[-6000:]
        return out


def assert_config_refused(tmp_path, overrides: dict, field: str, message: str) -> None:
    """A `MemformerConfig` with `overrides` raises a ValueError matching `message`, built in Python and read from a
    config.json (the error names `field` there too)."""
    from memformer_hf import MemformerConfig

    with pytest.raises(ValueError, match=message):
        tiny_memformer_config(**overrides)
    tiny_memformer_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field):
        MemformerConfig.from_pretrained(tmp_path)
