"""Fast decoding: static-shape state buffers and CUDA-graph replay of the per-token step (docs/design.md#fast-decode).

`MemformerStaticCache` holds the same state as `MemformerCache` in preallocated buffers that are only ever updated
in place, so their addresses never change. `StaticDecoder` runs one token per row per call with two step functions:

* the decoder step: one token through the decoder against the segment-local self K/V and the cross K/V;
* the boundary step, used when at least one row completes its segment: encode every row's segment with its memory,
  write the memory, rebuild the cross K/V, commit all of this only for the rows at the boundary, then run the
  decoder step (BOS at position 0 for those rows).

With `cuda_graphs=True` (on CUDA) both are captured once and replayed, so a token costs one graph launch and a few
bytes of host bookkeeping. The same functions run eagerly on any device, which is how the CPU tests check them
against the reference forward.

Prompts are prefilled with the model's ordinary forward (any length, padding allowed), then handed over:

    decoder = StaticDecoder(model, cache)            # cache: the MemformerCache after prefill
    logits = decoder.step(next_tokens)               # [B, V]
"""

from __future__ import annotations

import torch

from .cache_memformer import MemformerCache
from .modeling_memformer import CACHE_KWARG, MemformerForCausalLM


class MemformerStaticCache:
    """Memformer state in fixed buffers (B rows): memory [B, K, d] (fp32), per decoder layer self/cross K/V
    [B, H, L, d_h], cross mask [B, L], segment tokens [B, L] and per-row fill [B]."""

    def __init__(self, cache: MemformerCache) -> None:
        if cache.is_empty:
            raise ValueError("MemformerStaticCache needs a prefilled MemformerCache (run the prompt through the model).")
        if not bool(cache.started.all()):
            raise ValueError("Every row must have consumed at least one token before static decoding.")
        self.config = cache.config
        self.memory = cache.memory.detach().clone()
        self.cross_mask = cache.cross_mask.clone()
        self.segment_ids = cache.segment_ids.clone()
        self.fill = cache.fill.clone()
        self.self_k = [layer.keys.detach().clone() for layer in cache.layers]
        self.self_v = [layer.values.detach().clone() for layer in cache.layers]
        self.cross_k = [layer.cross_keys.detach().clone() for layer in cache.layers]
        self.cross_v = [layer.cross_values.detach().clone() for layer in cache.layers]
        self.consumed = cache.consumed

    def buffers(self) -> list[torch.Tensor]:
        return [self.memory, self.cross_mask, self.segment_ids, self.fill, *self.self_k, *self.self_v,
                *self.cross_k, *self.cross_v]

    def to_cache(self) -> MemformerCache:
        """Back to a dynamic `MemformerCache` (e.g. to continue with `generate()` or save the state)."""
        cache = MemformerCache(self.config)
        cache.set_state(memory=self.memory.clone(), cross_mask=self.cross_mask.clone(),
                        segment_ids=self.segment_ids.clone(), fill=self.fill.clone(),
                        started=torch.ones_like(self.fill, dtype=torch.bool),
                        self_kv=[(k.clone(), v.clone()) for k, v in zip(self.self_k, self.self_v)],
                        cross_kv=[(k.clone(), v.clone()) for k, v in zip(self.cross_k, self.cross_v)])
        cache.consumed = self.consumed
        return cache


class StaticDecoder:
    """One token per row per `step`, with the state in a `MemformerStaticCache` and optional CUDA graphs."""

    def __init__(self, model: MemformerForCausalLM, cache: MemformerCache, cuda_graphs: bool = True,
                 compile: bool = False, warmup: int = 3) -> None:
        self.model = model
        self.cfg = model.config
        self.state = MemformerStaticCache(cache)
        self.batch_size = self.state.memory.shape[0]
        self.device = self.state.memory.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self._fills = self.state.fill.tolist()  # host copy: decides which step runs without a device sync
        self.tokens = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(self.batch_size, self.cfg.vocab_size, dtype=self.dtype, device=self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._warmup = warmup
        # torch.compile fuses the step's many small kernels; the graphs then replay the fused kernels
        self._step_fn = torch.compile(self._step, dynamic=False, fullgraph=False) if compile else self._step

    # ------------------------------------------------------------------------------------------------ steps
    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        m, st = self.model.model, self.state
        plan = m.step_plan(positions, st.cross_mask, self.dtype)
        hidden = m.embed_tokens(tokens)[:, None]
        for i, layer in enumerate(m.decoder.layers):
            hidden, _, _ = layer(hidden, st.self_k[i], st.self_v[i], st.cross_k[i], st.cross_v[i], plan)
        return self.model.lm_head(m.decoder.norm(hidden))[:, 0]

    def _step(self, boundary: bool) -> None:
        """Consume `self.tokens` (one per row) and write the next-token logits into `self.logits`."""
        m, st, L = self.model.model, self.state, self.cfg.segment_length
        x = self.tokens
        fill = st.fill
        st.segment_ids.scatter_(1, fill[:, None], x[:, None])
        if boundary:
            at_boundary = fill == L - 1
            hidden, memory, _, _ = m.encode_segment(m.embed_tokens(st.segment_ids), None, st.memory)
            commit = at_boundary[:, None, None]
            st.memory.copy_(torch.where(commit, memory, st.memory))
            for i, layer in enumerate(m.decoder.layers):
                k, v = layer.cross_attn.project_kv(hidden)
                st.cross_k[i].copy_(torch.where(commit[:, None], k.to(st.cross_k[i].dtype), st.cross_k[i]))
                st.cross_v[i].copy_(torch.where(commit[:, None], v.to(st.cross_v[i].dtype), st.cross_v[i]))
            st.cross_mask.copy_(st.cross_mask | at_boundary[:, None])
            bos = torch.full_like(x, self.cfg.bos_token_id)
            tokens_in = torch.where(at_boundary, bos, x)
            positions = torch.where(at_boundary, torch.zeros_like(fill), fill + 1)
        else:
            tokens_in, positions = x, fill + 1
        self.logits.copy_(self._decode(tokens_in, positions))
        st.fill.copy_(torch.where(positions == 0, torch.zeros_like(fill), fill + 1) if boundary else fill + 1)

    def _run(self, boundary: bool) -> None:
        if not self.use_graphs:
            self._step_fn(boundary)
            return
        graph = self._graphs.get(boundary)
        if graph is None:
            graph = self._capture(boundary)
        graph.replay()

    def _capture(self, boundary: bool) -> torch.cuda.CUDAGraph:
        """Capture one step; the state is snapshotted and restored so that capturing changes nothing."""
        snapshot = [b.clone() for b in self.state.buffers()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self._warmup):
                self._step_fn(boundary)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._step_fn(boundary)
        for b, s in zip(self.state.buffers(), snapshot):
            b.copy_(s)
        self._graphs[boundary] = graph
        return graph

    # ------------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); returns the next-token logits [B, V] (a buffer overwritten next step)."""
        if tokens.shape != (self.batch_size,):
            raise ValueError(f"StaticDecoder.step expects one token per row, shape ({self.batch_size},), "
                             f"got {tuple(tokens.shape)}.")
        self.tokens.copy_(tokens)
        L = self.cfg.segment_length
        boundary = any(f == L - 1 for f in self._fills)
        self._run(boundary)
        self._fills = [0 if f == L - 1 else f + 1 for f in self._fills]
        self.state.consumed += 1
        return self.logits


@torch.no_grad()
def fast_generate(model: MemformerForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                  cuda_graphs: bool = True, compile: bool = False, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, MemformerCache]:
    """Greedy or sampled generation with the static decoder. Returns (sequences, cache)."""
    out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    cache = out[CACHE_KWARG]
    decoder = StaticDecoder(model, cache, cuda_graphs=cuda_graphs, compile=compile)
    logits = out.logits[:, -1]
    generated = []
    for _ in range(max_new_tokens):
        if do_sample:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        generated.append(nxt)
        logits = decoder.step(nxt)
    sequences = torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
    return sequences, decoder.state.to_cache()


__all__ = ["MemformerStaticCache", "StaticDecoder", "fast_generate"]
