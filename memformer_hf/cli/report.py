"""The report of `memformer-hf`: the plots (`training_curve.png`, `memory_writer_attention.png`), the metric tables
printed by `train` and `eval`, and the model card, rendered from the `model_card.md` template with
`huggingface_hub.ModelCard.from_template` (its metadata from a `ModelCardData`)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .arguments import CliError, one_line

logger = logging.get_logger(__name__)

# ================================================================================================ run facts
def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    from .. import __version__

    return {"memformer_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}


def device_description(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ================================================================================================ plots
def _runs(points: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """Split (step, value) points into runs of consecutive steps (a line is never drawn across a gap)."""
    runs: list[list[tuple[int, float]]] = []
    for step, value in points:
        if runs and step == runs[-1][-1][0] + 1:
            runs[-1].append((step, value))
        else:
            runs.append([(step, value)])
    return runs


def _log_ticks(ax, values: list[float]) -> None:
    """Log axis limits around `values` and ticks at 1-2-5 steps labelled in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(values), max(values)
    ax.set_ylim(lo / 1.25, hi * 1.25)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_training_curve(step_losses: list[tuple[int, float]], log_history: list[dict], path: Path,
                        unigram: float | None = None, smooth: int = 10,
                        final: tuple[int, float, float | None] | None = None) -> None:
    """Left: the train loss per optimizer step and its moving average (lines break where steps are missing, e.g.
    steps without target tokens), with the last average marked. Right: validation perplexity during training with
    the memory carried (solid, filled circles) and reset every segment (dashed, open squares: visible also where
    the two agree), and `final` = (step, ppl, ppl with the memory reset) of the evaluation after training (stars;
    the only points with `--eval_strategy no`). The log axis is labelled in plain numbers, with a labelled line at
    the final perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(h["step"], h["eval_ppl"], h.get("eval_ppl_no_memory")) for h in log_history if "eval_ppl" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)  # one step axis for both panels
    if step_losses:
        k = max(1, min(int(smooth), len(step_losses)))
        last_avg = None
        for i, run in enumerate(_runs(sorted(step_losses))):
            steps, losses = zip(*run)
            ax1.plot(steps, losses, color="tab:blue", alpha=0.3 if k > 1 else 1.0, lw=0.8 if k > 1 else 1.2,
                     label="per step" if i == 0 else None)
            avg = [sum(losses[max(0, j - k + 1):j + 1]) / len(losses[max(0, j - k + 1):j + 1])
                   for j in range(len(losses))]
            if k > 1:
                ax1.plot(steps, avg, color="tab:blue", lw=1.8, label=f"mean of {k} steps" if i == 0 else None)
            last_avg = (steps[-1], avg[-1])
        if last_avg is not None:
            ax1.axhline(last_avg[1], color="tab:blue", ls=":", lw=0.8)
            ax1.annotate(f"{last_avg[1]:.2f}", xy=last_avg, xytext=(-4, 6), textcoords="offset points",
                         ha="right", color="tab:blue", fontsize=9)
        ax1.legend()
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss (nats / token)")
    ax1.set_title("Training loss (MRBP)")
    ax1.grid(alpha=0.3)

    values: list[float] = []
    if evals:
        steps = [e[0] for e in evals]
        ax2.plot(steps, [e[1] for e in evals], color="tab:blue", ls="-", marker="o", ms=6, zorder=3,
                 label="memory carried")
        values += [e[1] for e in evals]
        if all(e[2] is not None for e in evals):
            ax2.plot(steps, [e[2] for e in evals], color="tab:orange", ls="--", marker="s", ms=9, mfc="none", mew=1.5,
                     zorder=4, label="memory reset every segment")
            values += [e[2] for e in evals]
    if final is not None and final[1] is not None:
        step, ppl, ppl_reset = final
        ax2.plot([step], [ppl], ls="none", marker="*", ms=13, color="tab:blue", zorder=5,
                 label=f"final, memory carried ({ppl:,.1f})")
        values.append(ppl)
        if ppl_reset is not None:
            ax2.plot([step], [ppl_reset], ls="none", marker="*", ms=17, mfc="none", mew=1.2, color="tab:orange",
                     zorder=6, label=f"final, memory reset ({ppl_reset:,.1f})")
            values.append(ppl_reset)
        ax2.axhline(ppl, color="tab:blue", ls=":", lw=0.8)
    if unigram:
        ax2.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:,.0f})")
        values.append(unigram)
    ax2.set_yscale("log")
    if values:
        _log_ticks(ax2, values)
        if final is not None and final[1] is not None:  # a labelled tick at the final perplexity
            ticks = [t for t in ax2.get_yticks() if ax2.get_ylim()[0] <= t <= ax2.get_ylim()[1]]
            ticks = [t for t in ticks if abs(math.log(t / final[1])) > 0.12] + [final[1]]
            ax2.set_yticks(sorted(ticks))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation perplexity")
    ax2.set_title("Validation perplexity")
    ax2.grid(alpha=0.3, which="both")
    if values:
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=ax2.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def writer_self_weights(model, doc: list[int], max_segments: int):
    """Memory-writer attention of each slot on itself (column 0 of `writer_attentions`, averaged over heads) per
    segment of `doc`, with the memory carried: a [K, n_segments] tensor. Near 1: the slot keeps its content;
    near 0: it is overwritten from the segment (paper Fig. 6)."""
    return memory_write_analysis(model, doc, max_segments)[0]


def memory_write_analysis(model, doc: list[int], max_segments: int):
    """Per slot and segment of `doc` (memory carried), two [K, n_segments] tensors: the writer's self weight
    (`writer_self_weights`) and the cosine of the slot before and after the segment's write + BMN, which also counts
    what the normalisation and the forgetting vector change (1: unchanged; NaN where the memory starts from m0, the
    boot segment: only forwards touch the parameters, so that this also runs on FSDP-sharded models)."""
    import torch

    from ..data_streams import document_cells

    cfg = model.config
    L = cfg.segment_length
    doc = doc[: max_segments * L]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.bos_token_id
    cells = document_cells(doc, L, cfg.bos_token_id, pad, boot=cfg.first_segment_context)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        memory, weights, cosines = None, [], []
        for t in range(cells["encoder_input_ids"].shape[0]):
            reset = cells["memory_reset"][t:t + 1].to(device)
            out = model(encoder_input_ids=cells["encoder_input_ids"][t:t + 1].to(device),
                        encoder_attention_mask=cells["encoder_attention_mask"][t:t + 1].to(device),
                        memory=memory, memory_reset=reset, critical_path_only=True, output_memory_attentions=True)
            weights.append(out.writer_attentions[0][0, :, :, 0].float().mean(0).cpu())  # [K]
            if memory is None or bool(reset[0]):
                cosines.append(torch.full_like(weights[-1], float("nan")))
            else:
                cosines.append(torch.nn.functional.cosine_similarity(memory.float(), out.memory.float(), dim=-1)[0].cpu())
            memory = out.memory.clone()
    return torch.stack(weights, dim=1), torch.stack(cosines, dim=1)


def plot_writer_attention(weights, path: Path, title: str) -> dict[str, float]:
    """Heatmap slots x segments of the writer's self weight, plus the fraction of retaining slots per segment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.numpy()
    retain = (w > 0.5).mean(axis=0)
    K, S = w.shape
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.18 * S + 2), 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1.2]})
    im = ax1.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_ylabel("memory slot")
    ax1.set_title(title)
    fig.colorbar(im, ax=[ax1, ax2], label="writer attention on the slot itself", fraction=0.04, pad=0.02)
    x = range(S)
    ax2.plot(x, retain, color="tab:green", marker=".", label="retain (self weight > 0.5)")
    ax2.plot(x, 1 - retain, color="tab:red", marker=".", label="overwrite")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("segment of the document")
    ax2.set_ylabel("fraction of slots")
    ax2.legend(loc="center right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    after_boot = w[:, 1:] if S > 1 else w
    return {"writer_self_weight_mean": float(after_boot.mean()),
            "writer_retain_fraction": float((after_boot > 0.5).mean())}


# ================================================================================================ model card
def template_path(explicit: str | None) -> Path | None:
    """`--model_card_template`, else `model_card.md` at the repository root (None when not installed from a
    checkout: the fallback card is used)."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise CliError(f"--model_card_template {explicit}: no such file")
        return p
    p = Path(__file__).resolve().parents[2] / "model_card.md"
    return p if p.is_file() else None


FALLBACK_CARD = """---
{{ card_data }}
---
# {{model_name}}

A Memformer language model (Wu et al., arXiv 2010.06891) trained with MRBP by `memformer-hf`.
Load it with `AutoModelForCausalLM.from_pretrained("{{repo_id}}", trust_remote_code=True, revision="<commit>")`.

{{metrics_table}}

{{memory_effect}}

{{training_table}}

{{origin_limitations}}
"""

CARD_TAGS = ["memformer", "recurrent-memory", "custom_code", "text-generation"]


LICENSE_FIELDS = ("license", "license_name", "license_link")


def card_metadata(folder: str | Path) -> dict[str, Any]:
    """The metadata of the model card of `folder` (its README.md), read by huggingface_hub's `metadata_load`; {} when
    there is none (an unreadable one is a warning)."""
    from huggingface_hub.repocard import metadata_load

    path = Path(folder).expanduser() / "README.md"
    if not path.is_file():
        return {}
    try:
        return metadata_load(path) or {}
    except Exception as e:  # noqa: BLE001 - unreadable, not YAML (yaml.YAMLError), not a mapping (ValueError)
        logger.warning(f"warning: cannot read the metadata of {path}: {one_line(e)}")
        return {}


def card_license(folder: str | Path) -> dict[str, str]:
    """The license that the model card of `folder` (its README.md) states in its metadata (`card_metadata`):
    `license` and, where given, `license_name` / `license_link` (the Hub's fields for `license: other`; the link
    only as a URL: a relative one names a file of that repository, not of ours); {} when there is no card, or it
    states no license."""
    meta = card_metadata(folder)
    if not meta.get("license"):
        return {}
    stated = {k: str(meta[k]) for k in LICENSE_FIELDS if meta.get(k)}
    if not stated.get("license_link", "https://").startswith(("https://", "http://")):
        del stated["license_link"]
    return stated


def card_data(datasets: list[str] | None = None, license: dict[str, str] | None = None,
              base_model: str | list[str] | None = None):
    """The card's metadata: the license (`license`: the `LICENSE_FIELDS` of `card_license`; default MIT, that of a
    model trained from scratch), `transformers` with remote code, text generation, perplexity; `datasets`: the Hub
    datasets it was trained on (None for local files and the embedded corpus); `base_model`: the Hub id of the model
    the weights derive from (None: none, or none known)."""
    from huggingface_hub import ModelCardData

    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=CARD_TAGS,
                         datasets=datasets or None, metrics=["perplexity"], base_model=base_model or None,
                         **(license or {"license": "mit"}))


_HUB_CACHE_SNAPSHOT = re.compile(r"models--([\w.-]+?)--([\w.-]+)$")


def _hub_id(name: Any) -> str | None:
    """`name` if it looks like a Hub model id (`org/name`) and is no existing local path, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def backbone_hub_id(folder: str | Path) -> str | None:
    """The Hub id of the model in the local `folder`, where it can be known: the folder is a snapshot of the Hub cache
    (`.../models--org--name/snapshots/<revision>`), or its config.json's `_name_or_path` (written by transformers 4)
    looks like a Hub id and is no existing local path; else None."""
    path = Path(folder).expanduser().resolve()
    match = _HUB_CACHE_SNAPSHOT.fullmatch(path.parent.parent.name) if path.parent.name == "snapshots" else None
    if match and _hub_id(f"{match[1]}/{match[2]}"):
        return f"{match[1]}/{match[2]}"
    try:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # no config.json (a GGUF folder), not JSON, not an object
        return None
    return _hub_id(saved)


def backbone_name(folder: str | Path) -> str:
    """What the card calls the backbone in `folder` (and the folder of a continued model or of a loaded tokenizer):
    its Hub id (`backbone_hub_id`), else the folder's name (never the local path, which means nothing to a reader of
    the card)."""
    return backbone_hub_id(folder) or Path(folder).expanduser().resolve().name


def render_model_card(template: str, values: dict[str, Any], data=None):
    """`ModelCard.from_template(data, template_str=template, **values)`: `{{ card_data }}` becomes the YAML of
    `data` (default `card_data()`), every other `{{ key }}` its value. An unknown placeholder is a `CliError` (no
    silently empty card), as is a template that Jinja cannot parse."""
    import jinja2
    import jinja2.meta
    from huggingface_hub import ModelCard

    data = card_data() if data is None else data
    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError as e:
        raise CliError(f"model card template: line {e.lineno}: {e.message}") from None
    unknown = sorted(names - set(values) - set(data.to_dict()) - {"card_data"})
    if unknown:
        raise CliError(f"model card template: unknown placeholder {{{{{unknown[0]}}}}}")
    card = ModelCard.from_template(data, template_str=template, **values)
    card.text = card.text.rstrip("\n") + "\n"  # Jinja drops the template's final newline
    return card


def fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return "n/a" if x is None else str(x)


SPLIT_PREFIXES = (("eval", "validation"), ("test", "test"))


def metrics_table(metrics: dict[str, Any], splits=SPLIT_PREFIXES) -> str:
    rows = ["| split | tokens | perplexity, memory carried | perplexity, memory reset every segment | "
            "unigram baseline |", "|---|---:|---:|---:|---:|"]
    for prefix, name in splits:
        if f"{prefix}_ppl" in metrics:
            rows.append(f"| {name} | {fmt(metrics.get(f'{prefix}_tokens'))} | **{fmt(metrics[f'{prefix}_ppl'])}** | "
                        f"{fmt(metrics.get(f'{prefix}_ppl_no_memory'))} | "
                        f"{fmt(metrics.get(f'{prefix}_unigram_ppl'))} |")
    return "\n".join(rows)


def position_table(metrics: dict[str, Any], splits=SPLIT_PREFIXES) -> str:
    from ..trainer_memformer import POSITION_BUCKETS

    rows = ["| split | tokens into the document | memory carried | memory reset every segment |", "|---|---|---:|---:|"]
    for prefix, name in splits:
        for i, lo in enumerate(POSITION_BUCKETS):
            bucket = f"{lo}-{POSITION_BUCKETS[i + 1]}" if i + 1 < len(POSITION_BUCKETS) else f"{lo}+"
            key = f"{prefix}_ppl_pos_{bucket}"
            if key in metrics:
                rows.append(f"| {name} | [{bucket.replace('-', ', ')}) | {fmt(metrics[key])} | "
                            f"{fmt(metrics.get(f'{prefix}_ppl_no_memory_pos_{bucket}'))} |")
    return "\n".join(rows)


def kv_table(items: list[tuple[str, Any]], header=("setting", "value")) -> str:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {k} | {fmt(v) if not isinstance(v, str) else v} |" for k, v in items]
    return "\n".join(rows)


MEASURABLE_MEMORY_GAIN = 0.01  # relative perplexity gain of carrying the memory that the card calls measurable


def memory_effect(ppl: float | None, ppl_reset: float | None, warm_start: bool = False) -> str:
    """The card's plain statement of what the memory did in this run: the relative perplexity gain of carrying it
    over resetting it every segment, called measurable from `MEASURABLE_MEMORY_GAIN` on, and if it is not, why
    (`warm_start`: a model built on a pretrained backbone, for which long context does pay)."""
    if ppl is None or ppl_reset is None or not (math.isfinite(ppl) and math.isfinite(ppl_reset)):
        return "The memory's effect was not measured in this run (no evaluation with the memory reset)."
    gain = (ppl_reset - ppl) / ppl_reset
    if gain >= MEASURABLE_MEMORY_GAIN:
        return (f"**The memory pays in this run:** carrying it through the document lowers validation perplexity by "
                f"{gain:.1%} relative to resetting it every segment.")
    measured = ("the memory collected at most 3% over resetting it and at most 0.6% over the same model trained "
                "without memory in our runs; the measurements are in the `memformer_hf` repository, "
                "`benchmarks/results/quality.md`.")
    if warm_start:
        return (f"**The memory has no measurable effect in this run** ({gain:+.1%} from carrying it instead of "
                "resetting it every segment). For a pretrained backbone long context does pay (SmolLM2-135M: 17% "
                "lower perplexity at 2,048 than at 128 tokens of context), but what this model gains over the "
                "backbone comes from its decoder reading the previous segment's tokens, not from the memory: in our "
                "warm starts on long books (4.9M training tokens) another book's memory worked as well as the "
                "document's own, and " + measured)
    return (f"**The memory has no measurable effect in this run** ({gain:+.1%} from carrying it instead of resetting "
            "it every segment). That is expected at this scale and not a failure of the run: a model this small, "
            "trained this briefly, gains nothing from context beyond about a hundred tokens (same-size transformers "
            "with 512 or 2,048 tokens of full attention score no better past position 128 than at 64-128), so there "
            "is nothing long-range for the memory to carry. Even where long context does pay (a pretrained 135M "
            "backbone, 17% lower perplexity at 2,048 than at 128 tokens of context), " + measured)


def _license_shown(license: dict[str, str]) -> str:
    name = license.get("license_name") if license.get("license") == "other" else None
    return f"`{name or license['license']}`" + (f", {license['license_link']}" if license.get("license_link") else "")


def origin_limitations(tokenizer_path: str | None, backbone: str | None, continued_from: str | None,
                       license: dict[str, str] | None = None) -> str:
    """The card's limitations that depend on where the tokenizer and the weights came from; `tokenizer_path` and
    `continued_from`: the names of the folders (`backbone_name`, never their local paths); `backbone`: the warm
    start's backbone, in markdown; `license`: what the backbone's card (warm start) or the continued model's card
    states (`card_license`; {}: nothing)."""
    tokens = (f"the backbone's tokenizer ({backbone})" if backbone else
              f"the tokenizer loaded from `{tokenizer_path}`" if tokenizer_path else "its own byte-level BPE")
    if backbone:
        knows = (f"Its decoder and encoder layers start from the pretrained backbone {backbone}: besides the "
                 "training data here, it carries what that backbone learned, and its biases. Its weights derive from "
                 "the backbone's and carry its license" +
                 (f" ({_license_shown(license)}, as the backbone's model card states)." if license else
                  ", which the backbone's folder does not state (hence `license: other` here): see the backbone's "
                  "own terms before you use or share this model."))
    elif continued_from:
        knows = (f"It continues the training of `{continued_from}`: besides the training data here, it carries what "
                 "that model learned (see its card)" +
                 (f", and its license ({_license_shown(license)})." if license else "."))
    else:
        knows = "It knows only the style and content of its training data."
    return f"- Perplexities are per token of {tokens}; compare models only with the same tokenizer.\n- {knows}"


def decoder_note(config: dict[str, Any]) -> str:
    """The card's sentence on what the decoder reads beyond the paper's cross-attention (`config`: the saved config's
    fields), with a leading space; "" for the paper's decoder."""
    if not config.get("decoder_previous_segment"):
        return ""
    L = config.get("segment_length")
    span = f"{L:,} to {2 * L - 1:,} earlier tokens" if isinstance(L, int) else "the previous segment's tokens"
    return (" Beyond the paper, this model's decoder also reads the previous segment's own tokens ahead of its "
            f"segment (`decoder_previous_segment`): each token sees {span} directly, and the memory only has to carry "
            "what lies before the previous segment.")


def card_values(args, record: dict, settings: list, tokenizer_description: str, n_params: int,
                n_embed: int, tokenizer_path: str | None = None, backbone: str | None = None,
                continued_from: str | None = None, license: dict[str, str] | None = None) -> dict[str, Any]:
    """The template's placeholders, from the run's `metrics.json` record; `tokenizer_path`: the folder the tokenizer
    was loaded from (None: trained here), `backbone`: the warm start's backbone in markdown, `continued_from`: the
    model folder training continued from (each by its name, never the local path: `backbone_name`), `license`: what
    the card of either states (`card_license`)."""
    m = record["metrics"]
    repo_id = args.hub_model_id or f"your-username/{Path(args.output_dir).name}"
    versions = record["versions"]
    ppl, ppl_nm = m.get("eval_ppl"), m.get("eval_ppl_no_memory")
    summary = (f"validation perplexity **{fmt(ppl)}** with the memory carried through each document vs "
               f"{fmt(ppl_nm)} with the memory reset at every segment (unigram baseline "
               f"{fmt(m.get('eval_unigram_ppl'))})")
    return {
        "model_name": Path(args.output_dir).name,
        "trained_how": record["trained_how"],
        "repo_id": repo_id,
        "corpus": record["corpus"],
        "tokenizer": tokenizer_description,
        "origin_limitations": origin_limitations(tokenizer_path, backbone, continued_from, license),
        "parameters": f"{n_params / 1e6:.2f}M ({(n_params - n_embed) / 1e6:.2f}M without the tied embedding)",
        "segment_length": record["config"].get("segment_length", ""),
        "decoder_note": decoder_note(record["config"]),
        "metrics_summary": summary,
        "memory_effect": memory_effect(ppl, ppl_nm, warm_start=bool(record.get("backbone"))),
        "metrics_table": metrics_table(m),
        "position_table": position_table(m),
        "training_table": kv_table(settings),
        "writer_summary": (f"after the boot segment, the mean self weight is {m['writer_self_weight_mean']:.2f} and "
                           f"{100 * m['writer_retain_fraction']:.0f}% of (slot, segment) pairs retain (self weight "
                           "> 0.5)") if "writer_self_weight_mean" in m else "",
        "train_time": f"{m.get('train_seconds', 0) / 60:.1f} min on {record['device']}",
        "command": record["command"],
        "date": record["date"][:10],
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "sample_prompt": json.dumps(record["sample_prompt"], ensure_ascii=False),
        "sample": (record["sample"] or "(no sample)").replace("```", "'''"),
    }
