"""Where a pipeline's components live during each stage of a run: the offload modes, for cards smaller than the models.

A run has three stages, encode (the prompt), denoise (the transformer's steps) and decode (the
autoencoder); "load" is where components sit once the pipeline is built. A mode is a plan, for each
stage, of where each component is:

    none          everything on the device, always
    text-encoder  the text encoder on the CPU, visiting the device only to encode a prompt
    model         the text encoder and the transformer each on the device only during its own stage
    blocks        as model, but the transformer's repeated blocks never sit on the device together:
                  they are streamed from pinned CPU memory during denoising (BlockStreamer), the
                  next block's copy on a side CUDA stream overlapping the current block's compute;
                  the rest of the transformer (embedders, final layer) stays on the device

The autoencoder stays on the device in every mode: its weights are ~0.17 GB in bf16; what a large
image costs is its activations, which tiled decoding bounds (common/tiling.py).

A parked component's weights live in pinned CPU memory (Parked): a visit to the device copies them
in, and leaving drops the device copy, with no copy back (inference never writes its weights). The
last prompt's encoding is kept, so a repeated prompt costs the text encoder no trip.
"""

from collections.abc import Callable, Iterator
from collections import deque
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MODES = ("none", "text-encoder", "model", "blocks")
STAGES = ("load", "encode", "denoise", "decode")
COMPONENTS = ("text_encoder", "transformer", "vae")
DEVICE, CPU, STREAMED = "device", "cpu", "streamed"  # STREAMED: blocks on the CPU, the rest on the device
Plan = dict[str, dict[str, str]]  # stage -> component -> DEVICE, CPU or STREAMED


def make_plan(mode: str, transformer_aside: bool = False) -> Plan:
    """Where each component is during each stage in offload `mode`.

    `transformer_aside`: the transformer leaves the device while the text encoder visits (FLUX.2
    [dev], whose 24 B encoder and 32 B transformer take turns on one GPU) in text-encoder mode too.
    """
    if mode not in MODES:
        raise ValueError(f"offload {mode!r}: choose one of {', '.join(MODES)}")
    text = {stage: DEVICE if mode == "none" or stage == "encode" else CPU for stage in STAGES}
    if mode == "blocks":
        transformer = dict.fromkeys(STAGES, STREAMED)
    elif mode == "model" or (mode == "text-encoder" and transformer_aside):
        transformer = {stage: DEVICE if stage == "denoise" or (mode == "text-encoder" and stage != "encode") else CPU
                       for stage in STAGES}
    else:
        transformer = dict.fromkeys(STAGES, DEVICE)
    return {stage: {"text_encoder": text[stage], "transformer": transformer[stage], "vae": DEVICE} for stage in STAGES}


def modules_of(component) -> list[nn.Module]:
    """The torch modules a component is made of: itself, or a wrapper's module attributes (a prompt encoder's models)."""
    if isinstance(component, nn.Module):
        return [component]
    return [value for value in vars(component).values() if isinstance(value, nn.Module)]


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks in the order its forward runs them: each ModuleList child's, in registration order
    (Z-Image: noise_refiner, context_refiner, layers; FLUX.1 and FLUX.2: double_blocks, single_blocks)."""
    return [block for child in transformer.children() if isinstance(child, nn.ModuleList) for block in child]


class Parked:
    """The parameters and buffers of some modules, kept in (pinned, with CUDA) CPU memory, put on a device on demand.

    Generic over what the modules hold (bf16 weights, fp8 weights and their scales, norms' buffers):
    every tensor registered in them moves. A parameter keeps its identity (its .data is swapped), so
    tied weights stay tied.
    """

    def __init__(self, modules: list[nn.Module]):
        self.slots: list[tuple[nn.Module, str, bool]] = []  # (owner, name, is a parameter), each tensor once
        seen = set()
        for module in modules:
            for owner in module.modules():
                for kind, table in ((True, owner._parameters), (False, owner._buffers)):
                    for name, tensor in table.items():
                        if tensor is not None and id(tensor) not in seen:
                            seen.add(id(tensor))
                            self.slots.append((owner, name, kind))
        pin = torch.cuda.is_available()
        self.home = [self._get(slot).detach().to("cpu") for slot in self.slots]
        self.home = [t.pin_memory() if pin and not t.is_pinned() else t for t in self.home]
        self.park()

    @staticmethod
    def _get(slot: tuple[nn.Module, str, bool]) -> Tensor:
        owner, name, is_param = slot
        return owner._parameters[name] if is_param else owner._buffers[name]

    def _set(self, slot: tuple[nn.Module, str, bool], tensor: Tensor) -> None:
        owner, name, is_param = slot
        if is_param:
            owner._parameters[name].data = tensor
        else:
            owner._buffers[name] = tensor

    def load(self, device: torch.device) -> list[Tensor]:
        """Point every tensor at a copy on `device` (queued on the current stream, not waited for); return the copies."""
        copies = [t.to(device, non_blocking=True) for t in self.home]
        for slot, copy in zip(self.slots, copies):
            self._set(slot, copy)
        return copies

    def park(self) -> None:
        """Point every tensor back at its CPU home; the device copies are freed once nothing else holds them."""
        for slot, home in zip(self.slots, self.home):
            self._set(slot, home)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.home)


class SyncCopies:
    """Block copies in the compute's own order, for devices without CUDA streams (the CPU: a copy there is no copy)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self, block: Parked) -> list[Tensor]:
        return block.load(self.device)

    def wait(self, handle: list[Tensor]) -> None:
        pass


class CudaCopies:
    """Block copies on a side CUDA stream: start() queues one and records an event, wait() makes the compute stream wait.

    A parked block's device memory is freed only once the compute stream has passed it (record_stream),
    so a host running far ahead of the GPU would hold every block's copy at once: start() first lets
    the GPU reach the compute of the block before last (an event per wait()), keeping about three
    blocks' copies alive.
    """

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.reached: deque[torch.cuda.Event] = deque()  # compute-stream marks, one per block started

    def start(self, block: Parked) -> tuple[torch.cuda.Event, list[Tensor]]:
        if len(self.reached) >= 2:
            self.reached.popleft().synchronize()
        # The copy must not overwrite memory the compute stream still reads: the side stream first waits for it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = block.load(self.device)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done, copies

    def wait(self, handle: tuple[torch.cuda.Event, list[Tensor]]) -> None:
        done, copies = handle
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for copy in copies:  # allocated on the side stream, read on the compute stream: not reused before it is done
            copy.record_stream(compute)
        mark = torch.cuda.Event()
        mark.record(compute)
        self.reached.append(mark)


class BlockStreamer:
    """Streams a transformer's repeated blocks through the device, one at a time, with forward hooks.

    Before block k runs: its copy is started if it is not under way yet (the first block of a call,
    or a block a step cache skipped to), block k+1's copy is started (after the last block: the
    first, for the next call), and the compute waits for block k's copy only, so that block k+1's
    copy overlaps block k's compute. After block k runs, it is parked again. At most two blocks'
    weights are on the device at once. `copies` has start(Parked) -> handle and wait(handle).
    """

    def __init__(self, blocks: list[nn.Module], copies):
        self.blocks = [Parked([block]) for block in blocks]
        self.copies = copies
        self.pending: dict[int, object] = {}  # block index -> its copy's handle
        self.hooks = []
        for k, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(lambda module, args, k=k: self._before(k)))
            self.hooks.append(block.register_forward_hook(lambda module, args, out, k=k: self.blocks[k].park()))

    def _before(self, k: int) -> None:
        for j in (k, (k + 1) % len(self.blocks)):
            if j not in self.pending:
                self.pending[j] = self.copies.start(self.blocks[j])
        self.copies.wait(self.pending.pop(k))

    def remove(self) -> None:
        """Take the hooks off and park every block (the transformer is then whole on the CPU)."""
        for hook in self.hooks:
            hook.remove()
        for block in self.blocks:
            block.park()
        self.pending.clear()


class Offload:
    """A pipeline's components placed as its offload mode's plan says, stage by stage.

    `components` maps COMPONENTS' names (all or some) to the pipeline's objects; `device` is where the run computes.
    `copies` makes the block streamer's copier for the device (default: CudaCopies on a GPU, else SyncCopies).
    """

    def __init__(self, mode: str, components: dict[str, object], device: torch.device, transformer_aside: bool = False,
                 copies: Callable[[torch.device], object] | None = None):
        self.mode, self.plan, self.device = mode, make_plan(mode, transformer_aside), torch.device(device)
        self.components = components
        self.parked = {name: Parked(modules_of(c)) for name, c in components.items()
                       if any(places[name] == CPU for places in self.plan.values())}
        self.streamer = None
        if mode == "blocks":
            transformer = components["transformer"]
            blocks = repeated_blocks(transformer)
            copies = copies or (CudaCopies if self.device.type == "cuda" else SyncCopies)
            self.streamer = BlockStreamer(blocks, copies(self.device))
            block_ids = {id(t) for block in blocks for t in [*block.parameters(), *block.buffers()]}
            rest = [t for t in [*transformer.parameters(), *transformer.buffers()] if id(t) not in block_ids]
            for tensor in rest:
                tensor.data = tensor.data.to(self.device)
        self.places: dict[str, str] = {}
        self._last_prompt: tuple | None = None
        self._encoding = None
        self.enter("load")

    def enter(self, stage: str) -> None:
        """Move each component where the plan has it in `stage` (streamed parts: set up once, at load)."""
        for name, place in self.plan[stage].items():
            if name not in self.components or self.places.get(name) == place:
                continue
            if name in self.parked:
                parked = self.parked[name]
                parked.load(self.device) if place == DEVICE else parked.park()
            elif place == DEVICE:
                for module in modules_of(self.components[name]):
                    module.to(self.device)
            self.places[name] = place

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Run the body with the components placed for `stage`."""
        self.enter(stage)
        yield

    def encode(self, encoder, prompts: list[str], max_length: int) -> tuple[Tensor, ...]:
        """encoder(prompts, max_length) in the encode stage, or the kept result when the same prompts come again."""
        key = (type(encoder), getattr(encoder, "images", None), tuple(prompts), max_length)
        if key != self._last_prompt:
            self._encoding, self._last_prompt = None, None  # the old encoding's memory is free before the new one is made
            with self.stage("encode"):
                self._encoding = encoder(prompts, max_length)
            self._last_prompt = key
        return self._encoding


def resolve_mode(offload: str, offload_text_encoder: bool) -> str:
    """The offload mode from `offload` and the older offload_text_encoder=True (the same as offload="text-encoder")."""
    if offload not in MODES:
        raise ValueError(f"offload {offload!r}: choose one of {', '.join(MODES)}")
    if offload_text_encoder and offload not in ("none", "text-encoder"):
        raise ValueError(f"offload_text_encoder=True is offload='text-encoder'; it cannot go with offload={offload!r}")
    return "text-encoder" if offload_text_encoder else offload


def load_device(mode: str, component: str, device: torch.device | str) -> torch.device:
    """Where to load `component` in offload `mode`: `device` if the plan has it there once loaded, else the CPU."""
    return torch.device(device) if make_plan(mode)["load"][component] == DEVICE else torch.device("cpu")


def graphs_allowed(offload: Offload, cache: float | None) -> bool:
    """Whether a run may replay the transformer as CUDA graphs (common/graphs.py): not while its blocks stream (copies
    and host waits sit inside its forward), nor with the step cache (its skip decision reads the device)."""
    return offload.mode != "blocks" and cache is None
