"""`memformer-hf generate --model DIR --prompt "..."`: stream a continuation with `TextStreamer`; `--state FILE`
continues from a saved memory state and saves the state after the generated text. stdout: the text only (status
goes to stderr)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transformers import TextStreamer
from transformers.utils import logging

from . import corpus as corpus_io
from .arguments import CliError, GenerateArguments, check_positive, one_line, parse

logger = logging.get_logger(__name__)


def cmd_generate(argv: list[str]) -> int:
    (gen,) = parse((GenerateArguments,), argv, "generate (streaming) text from a trained model folder",
                    "generate")
    if not gen.model:
        raise CliError("--model DIR is required")
    check_positive("max_new_tokens", gen.max_new_tokens)
    check_positive("temperature", gen.temperature)
    check_positive("top_k", gen.top_k)
    check_positive("repetition_penalty", gen.repetition_penalty)
    if gen.top_p is not None and not 0 < gen.top_p <= 1:
        raise CliError(f"--top_p must be in (0, 1], got {gen.top_p}")
    state_tmp = _reserve_state_file(gen.state) if gen.state else None  # before any work: a bad path fails first
    try:
        return _generate(gen, state_tmp)
    finally:
        if state_tmp is not None and state_tmp.exists():
            state_tmp.unlink()


def _reserve_state_file(state: str) -> Path:
    """Check that `--state` can be written (creating its folder), and return a new empty temporary file beside it:
    the state is written there and moved over `--state` with `os.replace`, so an existing state file is never left
    half written."""
    path = Path(state).expanduser()
    if path.is_dir():
        raise CliError(f"--state {state}: is a directory; pass a file path such as {Path(state, 'memory.safetensors')}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CliError(f"--state {state}: cannot write into {path.parent}: {e.strerror or one_line(e)}") from None
    os.close(fd)
    return Path(tmp)


def _generate(gen: GenerateArguments, state_tmp: Path | None) -> int:
    import torch
    from transformers import set_seed

    from ..cache_memformer import MemformerCache
    from ..modeling_memformer import CACHE_KWARG

    model, tokenizer = corpus_io.load_model_folder(gen.model, gen.use_cpu)
    set_seed(gen.seed)
    kwargs = {k: getattr(gen, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                           "repetition_penalty") if getattr(gen, k) is not None}
    cache = None
    if gen.state and Path(gen.state).expanduser().is_file():
        try:
            cache = MemformerCache.load_state(str(Path(gen.state).expanduser()), model.config, device=model.device)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"--state {gen.state}: {one_line(e)}") from None
    if cache is None:
        ids = tokenizer(gen.prompt, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0 or ids[0, 0] != tokenizer.bos_token_id:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        history = 0
    else:
        if not gen.prompt:
            raise CliError("--prompt is required to continue from --state")
        ids = tokenizer(gen.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        # generate() feeds only the columns the cache has not consumed: stand-in columns for the consumed history
        history = cache.get_seq_length()
        ids = torch.cat([torch.full((1, history), tokenizer.pad_token_id, dtype=torch.long), ids], dim=1)
        kwargs[CACHE_KWARG] = cache
    ids = ids.to(model.device)
    if history:
        print(gen.prompt, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=bool(history), skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             return_dict_in_generate=True, **kwargs)
    print(flush=True)
    if gen.state:
        cache = out.get(CACHE_KWARG)
        if cache is None:
            raise CliError("generate() returned no cache to save")
        with torch.no_grad():  # the last generated token has not been consumed yet
            model(input_ids=out.sequences[:, -1:], **{CACHE_KWARG: cache}, use_cache=True)
        cache.save_state(str(state_tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(state_tmp, 0o666 & ~umask)  # mkstemp made it private; a state file is an ordinary output
        os.replace(state_tmp, Path(gen.state).expanduser())  # atomic: the old state or the new one, never half
        logger.info(f"[memory state after {cache.get_seq_length():,} tokens saved to {gen.state}]")
    return 0
