"""README.md's Python snippets run as written on CPU: the Auto-class / forward / memory snippet, generation and
streaming, MRBP, the `MemformerTrainer` snippet and the streamed-corpus one (on a small jsonl.gz, 2 steps), executed in
one namespace in that order, with only the preset
substituted ("small" -> "tiny") and the names the README leaves to the reader (`tokenizer`, the token lists)
supplied. None of them may log the transformers >= 5.23 deprecation of the `past_key_values` name (CI runs this at
5.17 and at the newest 5.x)."""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import warnings
from pathlib import Path

import torch
import transformers

from memformer_hf.cli import train_bpe_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _block(marker: str) -> str:
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, f"README: expected one python block with {marker!r}, found {len(found)}"
    return found[0]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_readme_python_snippets_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    usage = _block("AutoModelForCausalLM.from_config")
    cpu_usage = usage.replace('from_preset("small"', 'from_preset("tiny"')
    assert cpu_usage != usage
    generation, mrbp, trainer = _block("TextStreamer"), _block("memory_replay_backward"), _block("trainer.evaluate()")
    assert "bf16=True" not in trainer  # the snippet must run without a GPU
    streaming = _block("streaming=True")
    cpu_streaming = streaming.replace("max_steps=10_000", "max_steps=2")
    assert cpu_streaming != streaming

    rng = random.Random(0)
    words = "the king queen lord lady night day sword crown love death heart fair foul good sweet".split()
    texts = ["\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(rng.randint(20, 60)))
             for _ in range(24)]
    tokenizer = train_bpe_tokenizer(texts, 300)
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:  # the streaming snippet's file
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:20])

    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    transformers.utils.logging.warning_once.cache_clear()  # a warning already given in this process counts too
    ns: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(cpu_usage, "README: Auto classes, forward, memory", "exec"), ns)
            assert ns["reset"].logits.shape[0] == 2 and ns["cache"].memory.shape[0] == 2
            ns["tokenizer"] = tokenizer
            exec(compile(generation, "README: generation and streaming", "exec"), ns)
            assert ns["nxt"].shape[1] > ns["history"].shape[1] and (tmp_path / "chat.safetensors").is_file()
            exec(compile(mrbp, "README: training with MRBP", "exec"), ns)
            assert torch.isfinite(ns["loss"]) and ns["model"].lm_head.weight.grad is not None
            ns["train_token_lists"], ns["valid_token_lists"] = token_lists[:20], token_lists[20:]
            exec(compile(trainer, "README: MemformerTrainer", "exec"), ns)
            tr = ns["trainer"]
            assert tr.state.global_step == tr.training_plan()[1] > 0 and not tr.args.bf16
            assert any("eval_ppl_no_memory" in h for h in tr.state.log_history)
            exec(compile(cpu_streaming, "README: corpora larger than memory", "exec"), ns)
            ns["trainer"].train()
            assert ns["trainer"].state.global_step == 2
    finally:
        hf_logger.removeHandler(records)
    messages = records.messages + [str(w.message) for w in caught]
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m], messages
