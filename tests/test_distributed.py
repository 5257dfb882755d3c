"""Scale-out (docs/design.md#distributed): `MemformerTrainer` under DDP and FSDP2 (full shard) on 2 CPU ranks
(gloo), float64.

Each run is one `torchrun --nproc_per_node=2` of this file (per-device batch 1) against one single process
(batch 2) on the same global batch: 2 optimizer steps of gradient accumulation 2 and MRBP window 3 with carried
memory. Compared:

* the gradient of each optimizer step (what the optimizer sees, gathered from the shards under FSDP) with the
  single-process gradient: max |Δ| <= 1e-10 · max |g_ref| per tensor;
* when gradients are synchronised: one backward in six (the window's last backward of the step's last
  micro-batch); every other backward runs under `no_sync` (DDP) / `set_requires_gradient_sync(False)` (FSDP2);
* the carried memory of each rank's streams, the logged losses and the gathered evaluation;
* FSDP2 with bf16: the memory stays float32 and the gradient is within bf16 accuracy;
* `memformer-hf train --fsdp` under torchrun: one report, a loadable Hub folder, checkpoints with every rank's carry.

The workers get the environment that `accelerate launch --config_file examples/accelerate/{ddp,fsdp}.yaml
--mixed_precision no` sets (computed with accelerate's own launch parser), so the FSDP2 units, resharding and state
dict type are those of the example config. accelerate enables FSDP only on accelerators, so the worker lets its FSDP
code path run on the CPU (`_allow_fsdp_on_cpu`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import Torchrun, require_gloo
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DOCS = dict(seed=11, n=10, lo=3, hi=22)
KW = dict(gradient_accumulation_steps=2, mrbp_window=3, max_steps=2, learning_rate=0.5, optim="sgd",
          max_grad_norm=0.0, per_device_eval_batch_size=2, eval_window=3)
RTOL = 1e-10


def _model(dtype: torch.dtype = torch.float64):
    from test_trainer import make_model

    return make_model(0, dtype=dtype, attn_implementation="sdpa")  # sdpa: float64-exact


class _CaptureGrads:
    """Gradients (full tensors, also from FSDP2 shards) just before each optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        grads: list[dict[str, torch.Tensor]] = []

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
                grads.append({k: full(p.grad).detach().clone() for k, p in model.named_parameters()
                              if p.grad is not None})

        self.grads, self.callback = grads, Callback()


def _instrument(module, syncs: list[bool], memory_dtypes: list[str]) -> None:
    """Wrap the trainer's `cells_backward` so that each backward records whether it synchronised gradients: under
    DDP the wrapper's `require_backward_grad_sync`; under FSDP2 whether sharded gradients appeared (they stay None
    while sync is off, and the Trainer's `zero_grad` sets them to None after each step). Also records the dtype of
    each window's new memory."""
    inner = module.cells_backward

    def wrapper(model, cells, memory, **kw):
        backward = kw["backward"]

        def recording(t):
            ddp = hasattr(model, "require_backward_grad_sync")
            before = model.require_backward_grad_sync if ddp else None
            backward(t)
            syncs.append(before if ddp else any(type(p).__name__ == "DTensor" and p.grad is not None
                                                for p in model.parameters()))

        loss, new_memory = inner(model, cells, memory, **{**kw, "backward": recording})
        memory_dtypes.append(str(new_memory.dtype))
        return loss, new_memory

    module.cells_backward = wrapper


def _allow_fsdp_on_cpu() -> None:
    """accelerate keeps FSDP for accelerators (a CPU run is MULTI_CPU); let its FSDP code path run over gloo."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs

    AcceleratorState.__init__ = patched


def _run(out: Path, backend: str) -> dict:
    """Train and evaluate (in a torchrun worker, or single-process with backend "single"); save what is compared."""
    from test_trainer import make_docs, targs
    from torch.distributed.fsdp import FSDPModule

    import memformer_hf.trainer_memformer as trainer_module
    from memformer_hf.trainer_memformer import MemformerTrainer

    torch.set_num_threads(1)
    extra = {} if backend == "single" else dict(ddp_backend="gloo")
    bf16 = backend.endswith("bf16")
    if backend.startswith("fsdp"):
        _allow_fsdp_on_cpu()
    capture, syncs, memory_dtypes = _CaptureGrads(), [], []
    inner = trainer_module.cells_backward
    _instrument(trainer_module, syncs, memory_dtypes)
    try:
        docs = make_docs(**DOCS)
        args = targs(out, per_device_train_batch_size=2 if backend == "single" else 1, bf16=bf16, **KW, **extra)
        tr = MemformerTrainer(model=_model(torch.float32 if bf16 else torch.float64), args=args, train_dataset=docs,
                              eval_dataset=docs[:7], callbacks=[capture.callback])
        tr.train()
        metrics = tr.evaluate()
    finally:
        trainer_module.cells_backward = inner

    rank = tr.args.process_index
    result = dict(log=tr.state.log_history, metrics=metrics, syncs=syncs, memory_dtypes=memory_dtypes,
                  world=tr.args.world_size,
                  fsdp_modules=sum(isinstance(m, FSDPModule) for m in tr.model.modules()),
                  dtensor_params=sum(type(p).__name__ == "DTensor" for p in tr.model.parameters()))
    carry = tr.carried_memory.memory.cpu().contiguous()
    save_file({"carry": carry}, os.path.join(out, f"carry{rank}.safetensors"))
    if rank == 0:
        for step, g in enumerate(capture.grads):
            save_file({k: v.contiguous() for k, v in g.items()}, os.path.join(out, f"grads{step}.safetensors"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f, default=str)
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out, "single")
    return out


def _accelerate_env(name: str, mixed_precision: str = "no") -> dict[str, str]:
    """The environment `accelerate launch --config_file examples/accelerate/<name>.yaml --mixed_precision ...` gives
    its workers (from accelerate's own launch parser)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "examples" / "accelerate" / f"{name}.yaml"
    argv = ["--config_file", str(config), "--mixed_precision", mixed_precision, "script.py"]
    args = _validate_launch_command(launch_command_parser().parse_args(argv))[0]
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def _launch(tmp_path_factory, backend: str) -> Path:
    require_gloo()
    out = tmp_path_factory.mktemp(backend)
    config, _, precision = backend.partition("-")
    Torchrun(__file__, backend, out, env=_accelerate_env(config, precision or "no"), cwd=REPO).wait(timeout=240)
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def distributed(request, tmp_path_factory):
    return request.param, _launch(tmp_path_factory, request.param)


def test_gradients_equal_single_process(distributed, single):
    """DDP and FSDP2: each optimizer step's gradient equals the single-process one on the same global batch."""
    backend, out = distributed
    result = json.loads((out / "result.json").read_text())
    assert result["world"] == 2
    if backend == "fsdp":  # really sharded: root, every encoder and decoder layer (and accelerate's embedding units)
        assert result["fsdp_modules"] >= 1 + 2 + 2 and result["dtensor_params"] > 0, result
    for step in range(2):
        got, ref = load_file(out / f"grads{step}.safetensors"), load_file(single / f"grads{step}.safetensors")
        assert got.keys() == ref.keys() and len(ref) > 50
        scale = max(g.abs().max().item() for g in ref.values())
        worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
        assert worst[0] <= RTOL * scale, f"{backend} step {step + 1}: {worst[1]} differs by {worst[0]:.3g}"
    assert scale > 1e-3


def test_gradients_sync_once_per_optimizer_step(distributed):
    """2 steps × GA 2 × window 3 = 12 backwards; only the last of each step synchronises."""
    backend, out = distributed
    syncs = json.loads((out / "result.json").read_text())["syncs"]
    assert syncs == [False] * 5 + [True] + [False] * 5 + [True], (backend, syncs)


def test_carry_loss_and_evaluation_equal_single_process(distributed, single):
    backend, out = distributed
    ref_carry = load_file(single / "carry0.safetensors")["carry"]
    S = ref_carry.shape[0] // 2
    for rank in range(2):
        carry = load_file(out / f"carry{rank}.safetensors")["carry"]
        assert carry.dtype == torch.float64
        torch.testing.assert_close(carry, ref_carry[rank * S:(rank + 1) * S], rtol=1e-9, atol=1e-12)
    got, ref = (json.loads((d / "result.json").read_text()) for d in (out, single))
    losses = lambda r: {h["step"]: h["loss"] for h in r["log"] if "loss" in h}  # noqa: E731
    assert losses(got).keys() == losses(ref).keys() == {1, 2}
    for step, loss in losses(ref).items():
        assert losses(got)[step] == pytest.approx(loss, rel=1e-6), backend  # the Trainer logs in float32
    assert got["metrics"]["eval_tokens"] == ref["metrics"]["eval_tokens"]
    for key in ("eval_loss", "eval_loss_no_memory"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-9), (backend, key)


def test_fsdp_bf16_keeps_memory_float32(tmp_path_factory, single):
    """FSDP2 with bf16 (the example config's precision): the Trainer keeps the memory in float32 (accelerate's
    policy would cast the forward inputs and outputs, the memory among them, to bf16) and reduces in float32; the
    gradient stays within bf16 accuracy of the float64 single-process one."""
    out = _launch(tmp_path_factory, "fsdp-bf16")
    result = json.loads((out / "result.json").read_text())
    assert result["memory_dtypes"] == ["torch.float32"] * 4, result["memory_dtypes"]
    assert result["syncs"] == [False] * 5 + [True] + [False] * 5 + [True]
    got, ref = load_file(out / "grads0.safetensors"), load_file(single / "grads0.safetensors")
    scale = max(g.abs().max().item() for g in ref.values())
    worst = max(((got[k].double() - ref[k]).abs().max().item(), k) for k in ref)
    assert worst[0] <= 0.05 * scale, f"{worst[1]} differs by {worst[0]:.3g} (scale {scale:.3g})"


# ============================================================================================== resume across world sizes
RESUME_KW = dict(gradient_accumulation_steps=2, mrbp_window=2, num_train_epochs=2, learning_rate=2e-2, optim="sgd",
                 save_strategy="steps", save_steps=1000)


def _resume_run(out: Path, stop: int, resume: str) -> None:
    """Train 2 epochs on 4 global streams (1 process x batch 2, or 2 ranks x batch 1); stop after step `stop` (with
    its checkpoint) or, with `resume`, continue from that checkpoint. Saves the final weights and logged losses."""
    from helpers import StopAt
    from test_trainer import make_docs, targs

    from memformer_hf.trainer_memformer import MemformerTrainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {} if world == 1 else dict(ddp_backend="gloo")
    args = targs(out, per_device_train_batch_size=2 // world, **RESUME_KW, **extra)
    tr = MemformerTrainer(model=_model(), args=args, train_dataset=make_docs(2, 14, 3, 22),
                          callbacks=[StopAt(stop)] if stop else [])
    tr.train(resume_from_checkpoint=resume or None)
    if tr.args.process_index == 0:
        save_file({k: v.detach().contiguous() for k, v in tr.model.named_parameters()}, out / "weights.safetensors")
        (out / "losses.json").write_text(json.dumps({h["step"]: h["loss"] for h in tr.state.log_history
                                                     if "loss" in h}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _resume_run(out, 0, "")
    return out


@pytest.mark.parametrize("saved_by,resumed_by", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_of_the_same_streams_is_exact(tmp_path, uninterrupted, saved_by, resumed_by):
    """A checkpoint written by 2 ranks x batch 1 resumed by 1 process x batch 2, and vice versa (the same 4 global
    streams): the carried memories are assembled from the checkpoint's rank files, so the resumed run ends with the
    uninterrupted run's weights and losses (regression: they restarted from m0 with a warning)."""

    def launch(world: int, out: Path, stop: int, resume: str = "") -> None:
        if world == 1:
            _resume_run(out, stop, resume)
        else:
            Torchrun(__file__, "resume", out, stop, resume, cwd=REPO).wait(timeout=120)

    out = tmp_path / "run"
    launch(saved_by, out, 3)
    assert (out / "checkpoint-3" / f"stream_state-rank{saved_by - 1}.safetensors").is_file()
    launch(resumed_by, out, 0, str(out / "checkpoint-3"))
    got, ref = load_file(out / "weights.safetensors"), load_file(uninterrupted / "weights.safetensors")
    for name, value in ref.items():
        assert (got[name] - value).abs().max() <= 1e-12, name
    losses, ref_losses = (json.loads((d / "losses.json").read_text()) for d in (out, uninterrupted))
    assert len(ref_losses) > 6 and losses.keys() == ref_losses.keys()
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-6), step


# ============================================================================================== example configs
def test_example_accelerate_configs():
    """examples/accelerate/*.yaml: 2 processes, bf16; the FSDP one is FSDP2 full shard with every encoder / decoder
    layer a unit (their `project_cross_kv` is what the Trainer registers) and full state dicts for `save_model`."""
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("ddp", "fsdp"):
        cfg = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
        assert cfg.num_processes == 2 and cfg.mixed_precision == "bf16", name
    env = _accelerate_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2", env
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT", env
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MemformerEncoderLayer,MemformerDecoderLayer", env
    assert "ACCELERATE_USE_FSDP" not in _accelerate_env("ddp")


# ============================================================================================== CLI
def test_cli_train_under_fsdp(tmp_path):
    """`torchrun --nproc_per_node=2 -m memformer_hf train --fsdp` (the Trainer's own FSDP flags: FSDP2, full shard,
    full state dict): one report, and a Hub folder whose remote code and `auto_map` are the package's (FSDP2 swaps
    the model's class for one defined in torch) and whose weights load."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * i + j * j) % 61}" for j in range(300))}) + "\n"
                            for i in range(24)))
    out = tmp_path / "out"
    argv = ["--train_file", str(data), "--validation_file", str(data),
            "--skip_test", "--max_train_documents", "24", "--max_eval_documents", "2", "--max_eval_tokens", "256",
            "--preset", "tiny", "--vocab_size", "300", "--max_steps", "2", "--per_device_train_batch_size", "1",
            "--eval_strategy", "no", "--use_cpu", "--ddp_backend", "gloo", "--sample_max_new_tokens", "0",
            "--heatmap_segments", "2", "--output_dir", str(out), "--fsdp", "--save_strategy", "steps",
            "--save_steps", "2"]
    stdout = Torchrun(__file__, "cli", "train", *argv, cwd=REPO).wait(timeout=240)
    assert stdout.count("== report") == 1 and stdout.count("wrote ") == 1, stdout[-3000:]
    assert not list(out.glob("_fsdp*.py")) and (out / "modeling_memformer.py").is_file()
    checkpoint = out / "checkpoint-2"  # FSDP checkpoint plus each rank's carried memory
    assert (checkpoint / "stream_state-rank0.safetensors").is_file(), sorted(p.name for p in out.rglob("*"))
    assert (checkpoint / "stream_state-rank1.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memformer.MemformerForCausalLM"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert type(model).__name__ == "MemformerForCausalLM"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["eval_tokens"] > 0 and metrics["eval_ppl"] > 1

    # `memformer-hf eval` of that folder under torchrun: one report and one JSON (rank 0), equal to one process
    eval_argv = ["eval", "--model", str(out), "--validation_file", str(data), "--split", "validation",
                 "--max_eval_documents", "2", "--max_eval_tokens", "256", "--per_device_eval_batch_size", "1",
                 "--use_cpu"]
    stdout = Torchrun(__file__, "cli", *eval_argv, "--output_json", str(tmp_path / "eval2.json"),
                      cwd=REPO).wait(timeout=240)
    assert stdout.count("| split | tokens | perplexity, memory carried") == 1, stdout[-3000:]
    from memformer_hf.cli import main

    assert main([*eval_argv, "--output_json", str(tmp_path / "eval1.json")]) == 0
    two, one = (json.loads((tmp_path / f"eval{n}.json").read_text()) for n in (2, 1))
    assert two["eval_tokens"] == one["eval_tokens"] > 0
    assert abs(two["eval_ppl"] / one["eval_ppl"] - 1) < 1e-9 and abs(two["eval_ppl_no_memory"] / one["eval_ppl_no_memory"] - 1) < 1e-9


def test_cli_streaming_under_ddp_resumes(tmp_path):
    """`torchrun --nproc_per_node=2 -m memformer_hf train --streaming true`: each rank streams its share of the
    records (`split_dataset_by_node`), both ranks' checkpoints hold their stream position with the earliest document
    in flight over all ranks, and a run resumed from checkpoint-1 ends with the uninterrupted run's weights."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * i + j * j) % 61}" for j in range(40 + 9 * i))})
                            + "\n" for i in range(9)))
    argv = ["--streaming", "true", "--train_file", str(data), "--validation_file", str(data), "--skip_test",
            "--max_eval_documents", "2", "--max_eval_tokens", "128", "--preset", "tiny", "--vocab_size", "300",
            "--max_steps", "2", "--per_device_train_batch_size", "1", "--mrbp_window", "2", "--eval_strategy", "no",
            "--use_cpu", "--ddp_backend", "gloo", "--sample_max_new_tokens", "0", "--heatmap_segments", "2",
            "--save_strategy", "steps", "--save_steps", "1",
            "--optim", "sgd"]  # an optimizer state without tensors: transformers 5.17 loads the optimizer of a
    # multi-process CPU run with map_location="cpu:0", which torch cannot restore tensors to
    full, part = tmp_path / "full", tmp_path / "part"
    stdout = Torchrun(__file__, "cli", "train", *argv, "--output_dir", str(full), cwd=REPO).wait(timeout=240)
    assert stdout.count("== report") == 1 and "endless passes over the train stream" in stdout, stdout[-3000:]
    states = [json.loads((full / "checkpoint-1" / f"stream_state-rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in states] == [0, 1] and all(s["world_size"] == 2 for s in states)
    assert states[0]["resume_from"] == states[1]["resume_from"]  # gathered: the minimum over the ranks
    assert all(s["position"]["documents"] > 0 for s in states)
    part.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-1", part / "checkpoint-1")
    Torchrun(__file__, "cli", "train", *argv, "--output_dir", str(part), "--resume_from_checkpoint", "true",
             cwd=REPO).wait(timeout=240)
    got, ref = load_file(part / "model.safetensors"), load_file(full / "model.safetensors")
    for name, value in ref.items():
        assert (got[name] - value).abs().max() <= 1e-6, name
    for r in range(2):
        positions = [json.loads((run / "checkpoint-2" / f"stream_state-rank{r}.json").read_text())["position"]
                     for run in (full, part)]
        assert positions[0] == positions[1], r


if __name__ == "__main__":  # a torchrun worker: python -m torch.distributed.run ... test_distributed.py BACKEND OUT
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "cli":
        from memformer_hf.cli import main

        _allow_fsdp_on_cpu()
        sys.exit(main(sys.argv[2:]))
    if sys.argv[1] == "resume":
        sys.exit(_resume_run(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else ""))
    _run(Path(sys.argv[2]), sys.argv[1])
