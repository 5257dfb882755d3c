"""CUDA graphs for Memformer's fixed-shape steps (inference only).

A Memformer forward is a sequence of small steps whose shapes never change for a given (batch, segment length,
dtype): the critical-path step (encode a segment while reading the memory, write and normalise the memory) and the
one-token decoder step. On a GPU each step is dozens of small kernels, so the host's launch overhead, not the GPU,
sets the speed. `GraphedStep` captures one step once and replays it: one launch per step.

Graphs are only used without autograd and in eval mode, on CUDA. A captured graph reads the parameters at the
addresses they had when it was captured, so `StepGraphs` keys every graph by the parameters' addresses as well as
the shapes and drops stale graphs when the model is moved, cast or has its parameters replaced; likewise when the
adapters of peft tuner layers are switched (`adapter_state`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor]


class GraphedStep:
    """`fn(*inputs) -> tuple of tensors` captured as a CUDA graph over static input buffers.

    Calling it copies the inputs into the static buffers (skipped for an input that already is its buffer), replays
    the graph and returns the static output tensors, which the next call overwrites. `fn` may also update tensors it
    closes over in place (the decoder step updates the cache); `state` lists them so that the warm-up and capture
    runs leave them unchanged."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], example_inputs: Tensors, state: Tensors = (),
                 warmup: int = 2) -> None:
        self.inputs = [t.detach().clone() for t in example_inputs]
        snapshot = [t.clone() for t in state]
        # autocast's cache of cast weights must not outlive the capture (its tensors would be freed under the graph)
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), torch.autocast("cuda", dtype, autocast, cache_enabled=False):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad(), \
                torch.autocast("cuda", dtype, autocast, cache_enabled=False):
            self.outputs = fn(*self.inputs)
        for t, saved in zip(state, snapshot):
            t.copy_(saved)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for buf, x in zip(self.inputs, inputs):
            if buf is not x:
                buf.copy_(x)
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """The captured steps of one model, keyed by a name and the shapes/dtypes of the step, and valid only for the
    parameter addresses they were captured with."""

    def __init__(self) -> None:
        self._graphs: dict[tuple, GraphedStep] = {}
        self._params_key: tuple | None = None
        self._tuner_layers: list[torch.nn.Module] = []
        self._adapter_state: tuple = ()

    def drop_if_stale(self, module: torch.nn.Module) -> None:
        """Drop every graph if `module`'s parameters moved, were cast or replaced since the graphs were captured, or
        its peft adapters were switched (`adapter_state`). Called once per forward (it walks the parameters), before
        the `get` calls of that forward."""
        params_key = tuple(p.data_ptr() for p in module.parameters())
        if params_key != self._params_key:  # (adding or removing adapter layers changes the parameters)
            self._tuner_layers = tuner_layers(module)
        state = adapter_state(self._tuner_layers)
        if params_key != self._params_key or state != self._adapter_state:
            self.clear()
            self._params_key, self._adapter_state = params_key, state

    def get(self, key: tuple, build: Callable[[], GraphedStep]) -> GraphedStep:
        """The graph captured for `key` (and the current autocast state), capturing it with `build` the first time."""
        key = key + (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = build()
        return graph

    def clear(self) -> None:
        self._graphs.clear()


def tuner_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft tuner layers (LoRA, ...; peft's `BaseTunerLayer`) inside `module`; none while peft is not imported
    (then no module can hold one), so this never imports it."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return []
    return [m for m in module.modules() if isinstance(m, tuners.BaseTunerLayer)]


def adapter_state(layers: list[torch.nn.Module]) -> tuple:
    """What peft tuner `layers` branch on in Python, which a captured graph replays as it was at the capture: the
    adapters disabled, active and merged into the base weights (`merge_adapter` adds the update in place: the
    weight's address stays), and LoRA's scales (`rescale_adapter_scale`)."""
    return tuple((m.disable_adapters, tuple(m.active_adapters), tuple(m.merged_adapters),
                  tuple(sorted((k, v) for k, v in getattr(m, "scaling", {}).items() if isinstance(v, (int, float)))))
                 for m in layers)


def graphs_usable(module: torch.nn.Module, device: torch.device) -> bool:
    """CUDA graphs apply without autograd (inference, MRBP's critical-path pass) on a CUDA device, when no dropout is
    active and `module.use_cuda_graphs` is not switched off."""
    cfg = module.config
    dropout = module.training and (cfg.attention_dropout > 0 or cfg.hidden_dropout > 0)
    return (device.type == "cuda" and not dropout and not torch.is_grad_enabled()
            and getattr(module, "use_cuda_graphs", True) and not torch.cuda.is_current_stream_capturing()
            and not is_sharded(module))


def is_sharded(module: torch.nn.Module) -> bool:
    """FSDP2-sharded parameters are gathered by hooks on other streams, which a graph capture cannot follow."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


__all__ = ["GraphedStep", "StepGraphs", "adapter_state", "graphs_usable", "is_sharded", "tuner_layers"]
