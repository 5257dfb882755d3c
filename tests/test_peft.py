"""LoRA fine-tuning of a saved Memformer with `peft` through `MemformerTrainer` (README: "Fine-tuning with LoRA").

* the documented target modules (`q_proj`, `k_proj`, `v_proj`, `o_proj`) wrap exactly the self and cross attention
  projections, the memory reader's and the writer's query/key/value projections;
* training changes only the adapter (the base weights stay as saved), every adapter receives updates (the writer's
  too: the writer must call its projections, not read their weights), checkpoints hold the adapter and the carried
  memory, and a run resumed from such a checkpoint ends where the uninterrupted one does;
* the saved adapter loaded into a fresh copy of the base model gives identical logits (stream mode, memory carried
  across segments), and `merge_and_unload` gives a plain `MemformerForCausalLM` with the same logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import BOS, build_tiny_memformer, rand_ids
from test_trainer import StopAt, make_docs, targs

from memformer_hf import MemformerForCausalLM
from memformer_hf.trainer_memformer import MemformerTrainer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # as in the README


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved float64 model (sdpa: float64-exact), standing for a trained Memformer."""
    folder = tmp_path_factory.mktemp("base")
    build_tiny_memformer(seed=3, attn="sdpa").save_pretrained(folder)
    return folder


def load_base(folder) -> MemformerForCausalLM:
    return MemformerForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="sdpa")


def lora_modules(model) -> dict[str, torch.nn.Module]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def stream_logits(model) -> torch.Tensor:
    """Logits of two rows over 6 segments (memory carried across them), with a left-padded row."""
    ids = rand_ids(23, batch=2, seed=9)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    ids[1, 5] = BOS
    return model.eval()(ids, attention_mask=mask).logits


def test_target_modules_are_attention_reader_and_writer_projections(base_dir):
    model = get_peft_model(load_base(base_dir), lora_config())
    wrapped = set(lora_modules(model))
    blocks = {"encoder": ("self_attn", "memory_read"), "decoder": ("self_attn", "cross_attn")}
    expected = {f"model.{stack}.layers.{i}.{block}.{proj}"
                for stack in blocks for i in range(2) for block in blocks[stack] for proj in TARGETS}
    expected |= {f"model.writer.{proj}" for proj in ("q_proj", "k_proj", "v_proj")}
    assert wrapped == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def train_lora(base_dir, out, docs, stop: int | None = None, **kw) -> MemformerTrainer:
    """A MemformerTrainer on a fresh LoRA-wrapped copy of the base model (the same random A matrices every time);
    a checkpoint every 2 steps."""
    base = load_base(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config())
    args = targs(out, mrbp_window=2, learning_rate=5e-2, save_strategy="steps", save_steps=2,
                 per_device_eval_batch_size=2, eval_window=3, **kw)
    callbacks = [StopAt(stop)] if stop is not None else None
    return MemformerTrainer(model=model, args=args, train_dataset=docs, eval_dataset=docs[:4], callbacks=callbacks)


def test_lora_training_saving_loading_and_merging(base_dir, tmp_path):
    docs = make_docs(7, 10, 3, 22)
    tr = train_lora(base_dir, tmp_path / "run", docs, max_steps=4)
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    assert after["eval_loss"] != before["eval_loss"] and after["eval_tokens"] == before["eval_tokens"]
    model = tr.model
    assert isinstance(model, PeftModel) and tr.state.global_step == 4

    # only the adapter trained, and every adapter did (B starts at 0: a B still 0 got no gradient)
    base = load_base(base_dir).state_dict()
    merged_names = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
                    if "lora_" not in k}
    assert merged_names.keys() == base.keys()
    for k, v in base.items():
        torch.testing.assert_close(merged_names[k], v, rtol=0, atol=0, msg=k)
    untrained = [n for n, m in lora_modules(model).items() if not m.lora_B["default"].weight.abs().max() > 0]
    assert not untrained, f"adapters without updates: {untrained}"

    # checkpoints hold the adapter (not the full model) and the carried memory
    ckpt = tmp_path / "run" / "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "stream_state-rank0.safetensors"} <= names
    assert "model.safetensors" not in names

    # the saved adapter in a fresh base model: identical logits
    tuned = stream_logits(model)
    assert (tuned - stream_logits(load_base(base_dir))).abs().max() > 1e-3  # the adapter matters
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(stream_logits(loaded), tuned, rtol=0, atol=0)

    # merged: a plain model with the same logits, which saves and loads as one
    merged = loaded.merge_and_unload()
    assert type(merged) is MemformerForCausalLM and not lora_modules(merged)
    torch.testing.assert_close(stream_logits(merged), tuned, rtol=0, atol=1e-10)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(stream_logits(load_base(tmp_path / "merged")), tuned, rtol=0, atol=1e-10)


def test_lora_resume_from_checkpoint(base_dir, tmp_path):
    """Stopped after step 2 and resumed by a fresh Trainer and PeftModel: the adapter ends as in the uninterrupted
    run (the Trainer reloads the adapter, MemformerTrainer the carried memory)."""
    docs = make_docs(8, 10, 3, 22)
    full = train_lora(base_dir, tmp_path / "full", docs, max_steps=4)
    full.train()
    part = train_lora(base_dir, tmp_path / "part", docs, max_steps=4, stop=2)
    part.train()
    assert part.state.global_step == 2
    resumed = train_lora(base_dir, tmp_path / "part", docs, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    ref = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-9, msg=n)


@torch.no_grad()
def graphed_paths_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the calls that run captured steps on a GPU: an unpadded stream (the aligned path: one encoder step
    per segment) and one cell-mode call (as the Trainer's evaluation makes: the whole cell)."""
    gen = torch.Generator().manual_seed(4)
    enc, dec = torch.randint(3, 50, (2, 4), generator=gen), torch.randint(3, 50, (2, 4), generator=gen)
    dec[:, 0] = BOS
    model.eval()
    return model(rand_ids(23, batch=2, seed=9)).logits, model(encoder_input_ids=enc, decoder_input_ids=dec).logits


def test_graphs_follow_the_adapter_state(base_dir, monkeypatch):
    """A CUDA graph replays the LoRA branches taken at its capture, and peft switches them with Python state, not
    parameters: `disable_adapter()`, `merge_adapter()` (which adds the update into the base weight in place, at the
    same address) and `rescale_adapter_scale` left the captured steps in place, so a model whose graphs were captured
    with its adapter on kept running the adapter (disabled: the adapted logits; merged: the update twice). Emulated
    on the CPU: a stand-in for the capture that replays the adapter state it saw; parameters are read at replay, as
    a graph reads them at their addresses. Stream mode (the encoder steps) and cell mode (the whole cell)."""
    from peft.helpers import rescale_adapter_scale

    import memformer_hf.modeling_memformer as modeling

    model = get_peft_model(load_base(base_dir), lora_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    layers = list(lora_modules(model).values())
    tuned, plain = graphed_paths_logits(model), graphed_paths_logits(load_base(base_dir))
    with rescale_adapter_scale(model, 0.5):
        halved = graphed_paths_logits(model)
    assert (tuned[0] - plain[0]).abs().max() > 1e-2 and (tuned[1] - plain[1]).abs().max() > 1e-2

    def adapter_state() -> list:
        return [(m._disable_adapters, m._active_adapter, list(m.merged_adapters), dict(m.scaling)) for m in layers]

    def set_adapter_state(state: list) -> None:
        for m, (disabled, active, merged, scaling) in zip(layers, state):
            m._disable_adapters, m._active_adapter, m.merged_adapters, m.scaling = disabled, active, merged, scaling

    class Captured:
        def __init__(self, fn, example_inputs, state=(), warmup=2):
            self.fn, self.seen = fn, adapter_state()

        def __call__(self, *inputs):
            now = adapter_state()
            set_adapter_state(self.seen)
            try:
                return self.fn(*inputs)
            finally:
                set_adapter_state(now)

    monkeypatch.setattr(modeling, "graphs_usable", lambda module, device: True)
    monkeypatch.setattr(modeling, "GraphedStep", Captured)

    def check(expected, what: str) -> None:
        for got, ref, mode in zip(graphed_paths_logits(model), expected, ("stream", "cell")):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-10, msg=f"{what}, {mode} mode")

    check(tuned, "adapter on (captured)")
    with model.disable_adapter():
        check(plain, "disable_adapter()")
    check(tuned, "adapter on again")
    with rescale_adapter_scale(model, 0.5):
        check(halved, "rescale_adapter_scale(0.5)")
    model.merge_adapter()
    check(tuned, "merge_adapter()")
    model.unmerge_adapter()
    check(tuned, "unmerge_adapter()")
