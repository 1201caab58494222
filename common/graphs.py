"""CUDA graphs for the denoise loop and the prompt encoder: a module's forward captured once per input signature, then replayed.

An eager forward launches hundreds of kernels from Python, one at a time; a replayed CUDA graph hands
the GPU the whole forward in one launch, so the GPU never waits for the CPU between kernels.

`graphed(transformer)` is called like the transformer. The first call with a new signature (every
tensor argument's shape, dtype and device, every other argument's value, the backend in force,
inference mode or not) runs the forward eagerly (the warm-up: Triton autotuning, cuBLAS workspaces,
a torch.compile of the blocks all happen there, outside the capture), returns that result, and
captures one forward into a graph that reads static copies of the inputs. Every later call with that
signature copies its tensors into those copies, replays the graph and returns a copy of its output.
The time step is a tensor input like the latents, so every step of a run, and every later run of the
same size and prompt length, replays the same graph. Every graph on a device shares one memory pool,
which stays reserved while they live: as large as the largest forward's activations (the transformer's,
the prompt encoder's, the autoencoder's decode), not their sum. Sharing is safe because no tensor in the
pool outlives a replay: each replay copies its inputs into static copies made outside the pool, and its
output out of it, before any other graph runs.

The forward runs eagerly instead (and nothing is captured) when an argument is a CPU tensor, when an
argument is neither a tensor nor None nor a plain number or string or a tuple of them (a
ControlNet's closure, cached reference K/V), when autograd records, or when capturing fails (the
forward synchronises with the host: `.item()`, `.tolist()`, `nonzero`, a shape read from a tensor's
values), the last remembered per signature, with a warning naming the cause; and under a parallel
plan (common/parallel.py), whose collectives every rank must issue alike, which a capture that fails
on one rank only would break.
Host values that set shapes (Z-Image's caption lengths) are passed as plain arguments: they enter
the key, and the forward need not read them. A caller whose lengths vary from call to call pads its
inputs to a few lengths first, so that they share graphs (Z-Image's Qwen3, zimg/text.py: token ids
padded on the right to a multiple of 64, which a causal model's real tokens never see).

A graph reads the weights at the addresses they had when it was captured: when any parameter or
buffer of the module has moved (offloaded to the CPU and back, a parameter replaced), every graph
is dropped and captured again.
"""

import warnings
import weakref
from typing import Callable, Hashable

import torch
from torch import Tensor, nn

from zflux.common import ops, parallel

Key = tuple[Hashable, ...]
PLAIN = (bool, int, float, str)  # non-tensor arguments that enter the key by value
_LIVE: "weakref.WeakSet[Captured]" = weakref.WeakSet()  # every captured graph still held, whose pool a capture may join


def signature(args: tuple, kwargs: dict, device_type: str = "cuda") -> Key | None:
    """The key a graph is captured under for these arguments, or None when the call must run eagerly.

    Tensors count by shape, dtype and device (not by value); None, plain numbers and strings, and tuples of
    them by value; anything else (a callable, a list of tensors), or a tensor off `device_type`, makes the call eager.
    """
    parts = []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, Tensor):
            if value.device.type != device_type:
                return None
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif value is None or isinstance(value, PLAIN) or (isinstance(value, tuple) and all(isinstance(v, PLAIN) for v in value)):
            parts.append((name, value))
        else:
            return None
    return tuple(parts)


def weight_addresses(module: nn.Module) -> tuple[int, ...]:
    """Where every parameter and buffer of `module` lives now: a graph is valid only while these stay the same."""
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def release_generator() -> None:
    """Free the current device's default random generator from a capture that failed: the capture registered it, and
    CUDAGraph.capture_end raised before releasing it, so every later draw on the device would raise "Offset increment
    outside graph capture". A fresh copy of its state (same seed and offset) is in no capture."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


class Captured:
    """One captured forward: static inputs, the graph, its static output."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple, kwargs: dict, pool) -> None:
        self.args = [a.clone() if isinstance(a, Tensor) else a for a in args]
        self.kwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        self.graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's steps, with the current stream switched back and the random generator released when the
        # capture fails (its context manager leaves its capture stream current when capture_end raises). What the
        # caching allocator kept of the failed capture stays kept: a process that failed one may cache more memory.
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.graph.capture_begin(pool=pool)
            try:
                self.output = fn(*self.args, **self.kwargs)
            finally:
                try:
                    self.graph.capture_end()
                except RuntimeError:
                    release_generator()
                    raise
        torch.cuda.current_stream().wait_stream(side)
        self.device = torch.cuda.current_device()
        _LIVE.add(self)

    @staticmethod
    def pool():
        """The memory pool of a live graph on the current device, for the next capture to share (see the module
        docstring), or None for a new one. Not a handle kept from before: PyTorch frees a pool once its last graph is
        gone (a model's graphs dropped when its weights moved), and a capture into that handle then fails."""
        device = torch.cuda.current_device()
        return next((c.graph.pool() for c in list(_LIVE) if c.device == device), None)

    def __call__(self, args: tuple, kwargs: dict) -> Tensor:
        for static, given in [*zip(self.args, args), *((self.kwargs[k], v) for k, v in kwargs.items())]:
            if isinstance(given, Tensor):
                static.copy_(given)
        self.graph.replay()
        return self.output.clone()  # the static output is overwritten by the next replay


class GraphedForward:
    """`module` called through CUDA graphs, one per call signature (see the module docstring)."""

    device_type = "cuda"  # where graphs are captured; the CPU tests stand a fake capture in for Captured

    def __init__(self, module: nn.Module) -> None:
        # A weak reference: the module keeps this wrapper (graphed()), and a cycle would hold a deleted model's
        # weights on the GPU until the next garbage collection.
        self._module = weakref.ref(module)
        self.graphs: dict[Key, Captured | None] = {}  # None: capturing failed, run eagerly
        self.addresses = weight_addresses(module)

    @property
    def module(self) -> nn.Module:
        return self._module()

    def __call__(self, *args, **kwargs) -> Tensor:
        key = signature(args, kwargs, self.device_type)
        if key is None or torch.is_grad_enabled() or parallel.active():  # collectives are not captured: run eagerly
            return self.module(*args, **kwargs)
        key += (ops.current_backend(), getattr(self.module, "backend", None), torch.is_inference_mode_enabled())
        addresses = weight_addresses(self.module)
        if addresses != self.addresses:
            self.graphs.clear()
            self.addresses = addresses
        if key in self.graphs:
            captured = self.graphs[key]
            return self.module(*args, **kwargs) if captured is None else captured(args, kwargs)
        return self._warm_up_and_capture(key, args, kwargs)

    def _warm_up_and_capture(self, key: Key, args: tuple, kwargs: dict) -> Tensor:
        """Run the forward eagerly (its result is this call's answer), then capture it under `key`."""
        out = self.module(*args, **kwargs)
        try:
            self.graphs[key] = Captured(self.module, args, kwargs, Captured.pool())
        except RuntimeError as e:  # the forward synced with the host while capturing
            self.graphs[key] = None
            warnings.warn(f"{type(self.module).__name__}: CUDA graph capture failed, this call signature runs eagerly "
                          f"({str(e).splitlines()[0]})", stacklevel=3)
        return out


def graphed(module: nn.Module) -> GraphedForward:
    """The module's GraphedForward, made on first use and kept on the module, so that its graphs outlive a run."""
    if "_graphed" not in module.__dict__:
        module.__dict__["_graphed"] = GraphedForward(module)
    return module.__dict__["_graphed"]


def forward_of(module: nn.Module, cuda_graphs: bool) -> Callable[..., Tensor]:
    """What a predict closure calls: the module through its graphs (`cuda_graphs`), or the module itself."""
    return graphed(module) if cuda_graphs else module


def drop_graphs(module: nn.Module) -> None:
    """Forget the module's graphs: its forward changed with no weight moving (a LoRA side path attached, rescaled or removed)."""
    if "_graphed" in module.__dict__:
        module.__dict__["_graphed"].graphs.clear()
