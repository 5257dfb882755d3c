"""Graphed == eager on CUDA: the fixed-shape steps replayed as CUDA graphs give the same numbers as the same steps
run eagerly (bf16 weights), for prefill (stream forward), greedy generate() and an MRBP training window.

    python benchmarks/check_graphs.py [--preset v1-lm] [--tokens 8192] [--decoder_reads_memory | --cross_attention_rope]
        [--decoder_previous_segment]

`--decoder_reads_memory`: the same check for a model whose decoder also reads the memory (cross K/V of L + K keys).

Measured on an H200 (2026-11-30): inference bitwise equal and the Trainer's training cells (`cells_backward`) equal
to 3e-9 in both configurations; `memory_replay_backward` from fresh documents equal to 3e-9 by default and, with
`--decoder_reads_memory`, to 4.5e-7 relative in float32 and 4.2e-3 in bf16 autocast (the same loss to 1e-6): the
rounding level of each precision, so the same function (a wrong input would differ by far more), but not bitwise as
without the option; which kernel differs was not pinned down. `--cross_attention_rope`: inference bitwise equal,
Trainer cells 0 (float32) / 3e-9 (bf16), `memory_replay_backward` 0 / 2.4e-9. After the `inputs_embeds` fix
(2026-11-30, evening; `--tokens 2048`): all of the above unchanged (bitwise inference, cells 0 / 2.9e-9, replay
0 / 1.4e-9); generating from a prompt given as embeddings equalled generating from its ids (same tokens, logits
difference 0) in a one-off script with the `small` preset, the check that this script now makes too. Run by this
script itself (2026-11-30, late; `--tokens 2048`), before and after the generate() fixes of that session
(`_prefill` / `_beam_search` overrides): generate from embeddings == from ids (same tokens, logits difference 0), and
every number above unchanged. Re-run after that session's numerics changes (2026-11-30, evening; `--tokens 2048`, the
three configurations): every number above unchanged (bf16 `memory_replay_backward` with `--decoder_reads_memory`
1.8e-3, the rounding level as before). `--decoder_previous_segment` (cell mode only, so only the training cells; with
and without `--cross_attention_rope`): graphed == eager, loss equal, gradients 0 in float32 and 3.9e-9 in bf16.
2026-12-01 (`--tokens 2048 --decoder_previous_segment --cross_attention_rope`, one H200): the Trainer's evaluation
(`check_evaluation`, whole cells captured as one graph each) equals its eager run bitwise (NLL sums, carried and
reset, bf16 autocast) at 85.6k vs 63.4k tokens/s eager; the code before (only the critical path graphed) ran that
evaluation at 53.9k graphed / 59.3k eager. Every other number above unchanged (cells 0 / 4.2e-9, replay 0 / 1.8e-9).
Re-run after the cross-entropy layout fix of the same day (same flags, one H200): evaluation graphed == eager
bitwise, 223k vs 41.5k tokens/s eager; every other number above unchanged (cells 0 / 4.2e-9, replay 0 / 1.8e-9).
"""

from __future__ import annotations

import argparse
import copy

import torch

from memformer_hf import MemformerConfig, MemformerForCausalLM
from memformer_hf.data_streams import StreamBatches
from memformer_hf.mrbp import cells_backward, memory_replay_backward


def check_training_cells(cfg: MemformerConfig) -> None:
    """A training window through cells_backward (the Trainer's step): graphed training cells vs eager cells."""
    docs = [torch.randint(2, cfg.vocab_size, (3000,)).tolist() for _ in range(64)]
    batch = StreamBatches(docs, segment_length=cfg.segment_length, window=4, batch_size=32, grad_accum=1,
                          world_size=1, rank=0, seed=0, bos_token_id=0, pad_token_id=1, boot="bos",
                          decoder_previous_segment=cfg.decoder_previous_segment)[1]
    batch = {k: v.cuda() for k, v in batch.items()}
    train_runs = {}
    for autocast in (False, True):
        for graphs in (True, False):
            torch.manual_seed(1)
            net = MemformerForCausalLM(cfg).cuda().train()
            net.model.use_cuda_graphs = graphs
            memory = net.model.initial_memory(32).detach().clone() * 1.0
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                for _ in range(2):  # twice: the second window replays the captured graphs
                    net.zero_grad(set_to_none=True)
                    loss, new_memory = cells_backward(net, batch, memory)
            grad = torch.cat([q.grad.flatten().float() for q in net.parameters() if q.grad is not None])
            train_runs[(autocast, graphs)] = (float(loss), grad, new_memory)
        (lg_, gg_, mg_), (le_, ge_, me_) = train_runs[(autocast, True)], train_runs[(autocast, False)]
        print(f"cells_backward window T=4 B=32 ({'bf16 autocast' if autocast else 'float32'}): loss {lg_:.6f} vs "
              f"{le_:.6f}; grad rel diff {((gg_ - ge_).norm() / ge_.norm()).item():.3e}; "
              f"max|memory diff| {(mg_ - me_).abs().max().item():.3e}")


def check_evaluation(cfg: MemformerConfig) -> None:
    """`MemformerTrainer.evaluation_sums` (the Trainer's evaluation: whole cells without autograd, each one captured
    graph) graphed vs eager, bf16 autocast as `--bf16` runs it, with the memory carried and reset; and its speed."""
    import tempfile
    import time

    from memformer_hf.trainer_memformer import MemformerTrainer, MemformerTrainingArguments

    docs = [torch.randint(2, cfg.vocab_size, (4096,)).tolist() for _ in range(32)]
    torch.manual_seed(1)
    model = MemformerForCausalLM(cfg).cuda()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = MemformerTrainingArguments(output_dir=tmp, per_device_eval_batch_size=16, eval_window=16, bf16=True,
                                          eval_no_memory=True, report_to=[], disable_tqdm=True)
        trainer = MemformerTrainer(model=model, args=args, eval_dataset=docs)
        for graphs in (True, False):
            model.model.use_cuda_graphs = graphs
            trainer.evaluation_sums(docs[:16])  # warm-up (captures)
            torch.cuda.synchronize()
            tic = time.perf_counter()
            sums = trainer.evaluation_sums(docs)
            seconds = time.perf_counter() - tic
            results[graphs] = ({k: (v.nll.double(), v.tokens) for k, v in sums.items()}, seconds)
    (g, tg), (e, te) = results[True], results[False]
    tokens = sum(map(len, docs))
    for key in g:
        diff = ((g[key][0] - e[key][0]).abs().max() / e[key][0].abs().max()).item()
        print(f"evaluation_sums{key or ' (carried)'} 32 docs x 4096, 16 streams, bf16: NLL sums rel diff {diff:.3e}; "
              f"tokens equal {torch.equal(g[key][1], e[key][1])}")
    print(f"evaluation speed (carried + reset): graphed {2 * tokens / tg:,.0f} tokens/s vs eager {2 * tokens / te:,.0f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="v1-lm")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--decoder_reads_memory", action="store_true")
    p.add_argument("--cross_attention_rope", action="store_true")
    p.add_argument("--decoder_previous_segment", action="store_true")
    p.add_argument("--memory_prediction_loss", type=float, default=0.0, help="its weight (the training cells)")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MemformerConfig.from_preset(args.preset, vocab_size=32768, bos_token_id=0, eos_token_id=None, pad_token_id=1,
                                      decoder_reads_memory=args.decoder_reads_memory,
                                      cross_attention_rope=args.cross_attention_rope,
                                      decoder_previous_segment=args.decoder_previous_segment,
                                      memory_prediction_loss=args.memory_prediction_loss)
    model = MemformerForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(2, cfg.vocab_size, (4, args.tokens), device="cuda")
    ids[:, 0] = 0
    runs = {}
    for graphs in (True, False):
        model.model.use_cuda_graphs = graphs
        with torch.no_grad():
            out = model(ids, use_cache=True)
        seq = model.generate(ids[:, :1000], attention_mask=torch.ones_like(ids[:, :1000]), max_new_tokens=200,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
        replays = []
        for autocast in (True, False):
            train = copy.deepcopy(model).float().train()
            train.model.use_cuda_graphs = graphs
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                loss, _ = memory_replay_backward(train, ids[:, : 4 * cfg.segment_length + 1])
            replays.append((float(loss), torch.cat([q.grad.flatten().float() for q in train.parameters()
                                                    if q.grad is not None])))
        runs[graphs] = (out.logits.float(), out.past_key_values.memory, seq.sequences, torch.stack(seq.logits).float(),
                        replays)
    # a prompt given as embeddings that ends inside a segment (the cache holds that segment's embeddings until it
    # completes, then the graphed decode step takes over) generates what the same ids do
    model.model.use_cuda_graphs = True
    prompt = ids[:, 1:101]  # no BOS: the boot is implicit for ids and embeddings alike
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=80, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        by_ids = model.generate(prompt, **kw)
        by_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(prompt), **kw)
    embeds_check = (torch.equal(by_ids.sequences[:, prompt.shape[1]:], by_embeds.sequences),
                    max(float((x.float() - y.float()).abs().max()) for x, y in zip(by_ids.logits, by_embeds.logits)))
    check_training_cells(cfg)
    check_evaluation(cfg)
    (lg, mg, sg, gg, replays_g), (le, me, se, ge, replays_e) = runs[True], runs[False]
    print(f"prefill {tuple(ids.shape)}: max|logits graphed - eager| {(lg - le).abs().max().item():.3e} "
          f"(logit std {le.std().item():.3f}); max|memory diff| {(mg - me).abs().max().item():.3e}")
    print(f"generate 4x200 greedy: tokens equal {torch.equal(sg, se)} ({(sg == se).float().mean().item():.1%}); "
          f"max|logits diff| {(gg - ge).abs().max().item():.3e}")
    print(f"generate from inputs_embeds vs from ids (4 x 100-token prompts, 80 new, graphed): tokens equal "
          f"{embeds_check[0]}; max|logits diff| {embeds_check[1]:.3e}")
    for (lossg, gradg), (losse, grade), name in zip(replays_g, replays_e, ("bf16 autocast", "float32")):
        print(f"memory_replay_backward T=4 ({name}): loss {lossg:.6f} vs {losse:.6f}; grad rel diff "
              f"{((gradg - grade).norm() / grade.norm()).item():.3e}")


if __name__ == "__main__":
    main()
