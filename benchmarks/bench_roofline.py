"""Roofline: FLOPs and bytes per token from the model's shapes, the measured bf16 matmul and HBM ceilings, the
achieved fraction for CUDA-graph decoding, and training MFU of an MRBP step (with a profile of where time goes).

    python benchmarks/bench_roofline.py                     # writes results/roofline.md
"""

from __future__ import annotations

import argparse

import torch
from common import median, memformer, time_cuda, write_results

from memformer_hf.modeling_memformer import CACHE_KWARG
from memformer_hf.mrbp import cells_backward

DATASHEET_BF16 = 989e12


def forward_flops_per_token(cfg) -> dict[str, float]:
    """docs/design.md#flops: 2 FLOPs per multiply-accumulate, full attention cores."""
    d, f, L, K, V = cfg.hidden_size, cfg.intermediate_size, cfg.segment_length, cfg.num_memory_slots, cfg.vocab_size
    dec = 8 * d * d + 8 * d * d + 4 * d * f + 8 * L * d
    enc = 8 * d * d + 4 * d * d + 4 * d * d * K / L + 4 * d * f + 4 * L * d + 4 * K * d
    writer = (4 * d * d * K + 4 * d * d * L + 4 * K * (L + 1) * d) / L
    return dict(decoder=cfg.decoder_layers * dec, encoder=cfg.encoder_layers * enc, writer=writer, head=2 * d * V)


def ceilings(device: str) -> tuple[float, float]:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = median(time_cuda(lambda: a @ b, warmup=3, repeat=20)) / 1e3
    x = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    cp = median(time_cuda(lambda: y.copy_(x), warmup=3, repeat=20)) / 1e3
    return 2 * 8192**3 / mm, 2 * x.numel() * 2 / cp


def decode_bytes_per_step(model, batch: int) -> float:
    """Fewest bytes a decode step must move: decoder + head weights once, each row's self/cross K/V once, plus the
    encoder + writer weights and a segment's activations once per L steps."""
    cfg, m = model.config, model.model
    wbytes = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    dec = wbytes(m.decoder) + model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    enc = wbytes(m.encoder) + wbytes(m.writer)
    kv_row = cfg.decoder_layers * 4 * cfg.segment_length * cfg.hidden_size * 2
    return dec + batch * kv_row + enc / cfg.segment_length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--train_batches", default="32,128")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    mm_ceiling, hbm_ceiling = ceilings(device)
    lines = [f"Measured ceilings: bf16 matmul (8192³) {mm_ceiling / 1e12:.0f} TFLOP/s; HBM copy "
             f"{hbm_ceiling / 1e12:.2f} TB/s (read + write bytes).", ""]

    model = memformer().to(device)
    cfg = model.config
    fl = forward_flops_per_token(cfg)
    fwd = sum(fl.values())
    lines += ["Forward FLOPs per token (v1-lm preset, V=32768): " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in
                                                                           fl.items()) + f"; total {fwd / 1e6:.1f}M.",
              ""]

    # decoding: achieved bytes/s against the HBM ceiling (CUDA graphs, bf16)
    lines += ["| decode (bf16, CUDA graphs) | batch | ms/step | min bytes/step (MB) | achieved GB/s | "
              "of HBM ceiling | achieved TFLOP/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    bmodel = model.to(torch.bfloat16).eval()
    ids = torch.randint(2, cfg.vocab_size, (1, 4096), device=device)
    ids[:, 0] = 0
    with torch.no_grad():
        cache1 = bmodel(ids, use_cache=True, logits_to_keep=1)[CACHE_KWARG]
    import copy

    for batch in (1, 64, 256):
        cache = copy.deepcopy(cache1)
        cache.batch_repeat_interleave(batch)
        tok = torch.randint(2, cfg.vocab_size, (batch, 1), device=device)

        def step(cache=cache, tok=tok):  # the model's one-token decoder step (a replayed CUDA graph)
            with torch.no_grad():
                return bmodel(tok, **{CACHE_KWARG: cache}).logits

        for _ in range(2 * cfg.segment_length):
            step()
        ms = sum(time_cuda(step, warmup=0, repeat=4 * cfg.segment_length)) / (4 * cfg.segment_length)
        nbytes = decode_bytes_per_step(bmodel, batch)
        rate = nbytes / (ms / 1e3)
        lines.append(f"| Memformer | {batch} | {ms:.3f} | {nbytes / 1e6:.1f} | {rate / 1e9:.0f} | "
                     f"{rate / hbm_ceiling:.1%} | {batch * fwd / (ms / 1e3) / 1e12:.1f} |")
    lines.append("")

    # training MFU: one MRBP window step (bf16 autocast, fp32 master weights) incl. the optimizer
    model = memformer().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=(device == "cuda"))
    lines += [f"| training (MRBP, T={args.window}, L={cfg.segment_length}, bf16 autocast) | batch | ms/step | "
              "tokens/s | MFU (÷989 TFLOP/s) | of measured matmul ceiling | HFU incl. replay |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    T, L = args.window, cfg.segment_length
    enc_share = (fl["encoder"] + fl["writer"]) / fwd
    profile_text = ""
    for batch in [int(x) for x in args.train_batches.split(",")]:
        ids = torch.randint(2, cfg.vocab_size, (batch, T, L), device=device)
        cells = dict(encoder_input_ids=ids, encoder_attention_mask=torch.ones_like(ids, dtype=torch.bool),
                     decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids, dtype=torch.bool),
                     shift_labels=ids.reshape(batch, T * L).contiguous(),
                     memory_reset=torch.zeros(batch, T, dtype=torch.bool, device=device))

        def step(cells=cells):
            cells_backward(model, cells, None, context=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            ms = median(time_cuda(step, warmup=2, repeat=6))
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| Memformer | {batch} | OOM | | | | |")
            continue
        tps = batch * T * L / (ms / 1e3)
        mfu = tps * 3 * fwd / DATASHEET_BF16
        hfu = tps * (3 * fwd + enc_share * fwd) / DATASHEET_BF16
        lines.append(f"| Memformer | {batch} | {ms:.1f} | {tps:,.0f} | {mfu:.1%} | "
                     f"{tps * 3 * fwd / mm_ceiling:.1%} | {hfu:.1%} |")
        if not profile_text:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            profile_text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50)
    lines += ["", "Where the training step's GPU time goes (torch.profiler, first batch size above):", "", "```",
              profile_text, "```"]
    text = "\n".join(lines)
    print(text)
    write_results("roofline", "Roofline, decoding bandwidth and training MFU", text, args.output)


if __name__ == "__main__":
    main()
