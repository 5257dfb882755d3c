"""The general stream planner: how one stream-mode call walks every row's tokens through its segment grid.

A row's tokens fill its current segment; when a segment completes, it is encoded (the critical path: encoder +
memory write) and the decoder continues on the next segment, cross-attending to the completed segment's encoder
output. Rows may start at different positions (a cache with partial segments), hold padding anywhere, or restart
from the initial memory. This planner handles all of that in Python on the host; `MemformerModel` uses it only
when the input is irregular and otherwise takes the aligned fast path (`MemformerModel._aligned_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_memformer import MemformerConfig


@dataclass
class Chunk:
    """A run of decoder positions of one row: `enc` is the encode step whose output it cross-attends to (None:
    the cached cross context), `start` its first position, `src` the input token sources, `cols` the output column
    of each position (None: discarded). `follows_segment`: the chunk starts the segment after a complete one (encode
    step `enc`), whose prefix a `decoder_previous_segment` decoder reads."""

    row: int
    enc: int | None
    start: int
    src: list[int]
    cols: list[int | None]
    follows_segment: bool = False


@dataclass
class StreamPlan:
    """How one stream-mode call walks every row's grid."""

    encodes: list[list[tuple[int, list[int]]]]  # per encode step: (row, encoder input sources)
    chunks: list[Chunk]
    final_fill: list[int]
    final_segment: list[list[int]]
    booted: list[bool]  # the row (re)starts from m0 in this call


def plan_stream(config: MemformerConfig, ids_cpu: torch.Tensor | None, mask_cpu: torch.Tensor, started: list[bool],
                 fill: list[int], n_cols: int) -> StreamPlan:
    """Walk each row's new tokens through its segment grid.

    Token sources index a per-row source row laid out as [cached partial segment (L) | new columns (n) | BOS]. A
    segment's first decoder input is BOS, or with `decoder_previous_segment` the token that completed the segment
    before (BOS only at a document's start)."""
    L, bos_src = config.segment_length, config.segment_length + n_cols
    previous_segment = getattr(config, "decoder_previous_segment", False)
    bos_mode = config.first_segment_context == "bos"
    encodes: list[list[tuple[int, list[int]]]] = []
    chunks: list[Chunk] = []
    final_fill, final_segment, booted = [], [], []
    for r in range(mask_cpu.shape[0]):
        cols = mask_cpu[r].nonzero().flatten().tolist()
        n_enc = 0

        def add_encode(src: list[int], row: int = r) -> int:
            nonlocal n_enc
            if len(encodes) <= n_enc:
                encodes.append([])
            encodes[n_enc].append((row, src))
            n_enc += 1
            return n_enc - 1

        if started[r]:
            segment = list(range(fill[r]))
            current = Chunk(r, None, fill[r] + 1, [], [])
            booted.append(False)
        else:
            if not cols:  # nothing to consume: the row stays unstarted
                final_fill.append(0)
                final_segment.append([])
                booted.append(False)
                continue
            boot_col = None  # with inputs_embeds the boot BOS is always implicit
            if bos_mode and ids_cpu is not None and int(ids_cpu[r, cols[0]]) == config.bos_token_id:
                boot_col = cols.pop(0)
            k = add_encode([bos_src] if bos_mode else [])
            segment = []
            current = Chunk(r, k, 0, [bos_src], [boot_col])
            booted.append(True)
        for c in cols:
            segment.append(L + c)
            if len(segment) < L:
                current.src.append(L + c)
                current.cols.append(c)
            else:
                if current.src:
                    chunks.append(current)
                k = add_encode(segment)
                segment = []
                current = Chunk(r, k, 0, [L + c if previous_segment else bos_src], [c], follows_segment=True)
        if current.src:
            chunks.append(current)
        final_fill.append(len(segment))
        final_segment.append(segment)
    return StreamPlan(encodes, chunks, final_fill, final_segment, booted)


__all__ = ["Chunk", "StreamPlan", "plan_stream"]
