"""Where a pipeline's components live during each stage of a run: the offload modes, for cards smaller than the models.

A run has three stages, encode (the prompt), denoise (the transformer's steps) and decode (the
autoencoder); "load" is where components sit once the pipeline is built. A mode is a plan, for each
stage, of where each component is:

    none          everything on the device, always
    text-encoder  the text encoder on the CPU, its layers streamed through the device to encode a prompt;
                  the transformer stays on the device
    model         as text-encoder, and the transformer on the device only while it denoises
    blocks        as text-encoder, and the transformer's repeated blocks streamed too, in every step

A streamed component (STREAMED) keeps its repeated layers in pinned CPU memory and copies each one to
the device just before it runs (BlockStreamer), the next layer's copy on a side CUDA stream
overlapping the current layer's compute, so that at most two of its layers are on the device at once;
the rest of it (embeddings, final norms and layers) is on the device whole. Its repeated layers are
found generically (repeated_blocks): the ModuleLists nearest the top of each of its models, which
are the transformer's blocks (Z-Image: noise_refiner, context_refiner, layers; FLUX.1 and FLUX.2:
double_blocks, single_blocks) and the text models' layers (Qwen3Model.layers, T5's encoder.block,
CLIP's encoder.layers, Mistral 3's language_model.layers). A streamed text encoder costs
a new prompt its bytes over the host-to-device bandwidth, as a whole visit would, but only about
two layers and its embedding table of device memory beside the resident transformer (Z-Image: 0.8 GB
instead of Qwen3-4B's 7.5 GB).

FLUX.2 [dev] needs no special case: its 24 B encoder streams past the resident 32 B transformer in
text-encoder mode (beside it: two 1.1 GB layers, the 1.3 GB embedding table and the unused 0.8 GB
vision tower, which count as the rest), and a new prompt moves the encoder's bytes only; a card that
cannot hold even that takes model mode, where the transformer leaves the device for the encode.

The autoencoder stays on the device in every mode: its weights are ~0.17 GB in bf16; what a large
image costs is its activations, which tiled encoding and decoding bound (common/tiling.py).

A parked component's weights live in pinned CPU memory (Parked): a visit to the device copies them
in, and leaving drops the device copy, with no copy back (inference never writes its weights). The
last prompt's encoding is kept, so a repeated prompt costs the text encoder no trip; whatever
changes the encoder's weights (a LoRA on CLIP) drops it (forget_encoding).
"""

from collections.abc import Callable, Iterator
from collections import deque
from contextlib import contextmanager
import weakref

import torch
from torch import Tensor, nn

MODES = ("none", "text-encoder", "model", "blocks")
STAGES = ("load", "encode", "denoise", "decode")
COMPONENTS = ("text_encoder", "transformer", "vae")
DEVICE, CPU, STREAMED = "device", "cpu", "streamed"  # STREAMED: repeated layers on the CPU, streamed as they run; the rest on the device
Plan = dict[str, dict[str, str]]  # stage -> component -> DEVICE, CPU or STREAMED


def make_plan(mode: str) -> Plan:
    """Where each component is during each stage in offload `mode`."""
    if mode not in MODES:
        raise ValueError(f"offload {mode!r}: choose one of {', '.join(MODES)}")
    text = {stage: DEVICE if mode == "none" else STREAMED if stage == "encode" else CPU for stage in STAGES}
    if mode == "blocks":
        transformer = dict.fromkeys(STAGES, STREAMED)
    elif mode == "model":
        transformer = {stage: DEVICE if stage == "denoise" else CPU for stage in STAGES}
    else:
        transformer = dict.fromkeys(STAGES, DEVICE)
    return {stage: {"text_encoder": text[stage], "transformer": transformer[stage], "vae": DEVICE} for stage in STAGES}


def modules_of(component) -> list[nn.Module]:
    """The torch modules a component is made of: itself, or a wrapper's module attributes (a prompt encoder's models), but
    those inside another (Qwen3PromptEncoder's model, inside its graphable `features`)."""
    if isinstance(component, nn.Module):
        return [component]
    held = [value for value in vars(component).values() if isinstance(value, nn.Module)]
    inside = {id(sub) for module in held for sub in module.modules() if sub is not module}
    return [module for module in held if id(module) not in inside]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """A model's repeated blocks in the order its forward runs them: the items of its ModuleLists nearest the top (fewest
    dots in their names), each list's in registration order. Z-Image: noise_refiner, context_refiner, layers; FLUX.1 and
    FLUX.2: double_blocks, single_blocks; Qwen3Model: layers; T5EncoderModel: encoder.block; CLIPTextModel:
    encoder.layers; Mistral3Model: language_model.layers (not its vision tower's, one level deeper)."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    top = min((name.count(".") for name, _ in lists), default=0)
    return [block for name, module in lists if name.count(".") == top for block in module]


class Parked:
    """The parameters and buffers of some modules (less those of `skip`), kept in (pinned, with CUDA) CPU memory, put on a
    device on demand.

    Generic over what the modules hold (bf16 weights, fp8 weights and their scales, norms' buffers):
    every tensor registered in them moves. A parameter keeps its identity (its .data is swapped), so
    tied weights stay tied.
    """

    def __init__(self, modules: list[nn.Module], skip: list[nn.Module] = ()):
        self.slots: list[tuple[nn.Module, str, bool]] = []  # (owner, name, is a parameter), each tensor once
        seen = {id(t) for module in skip for t in [*module.parameters(), *module.buffers()]}
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


def default_copies(device: torch.device):
    """The block copier for `device`: CudaCopies on a GPU, else SyncCopies."""
    return (CudaCopies if device.type == "cuda" else SyncCopies)(device)


class BlockStreamer:
    """Streams a model's repeated blocks through the device, one at a time, with forward hooks.

    Before block k runs: its copy is started if it is not under way yet (the first block of a call,
    or a block a step cache skipped to), block k+1's copy is started (after the last block, when
    `cyclic`: the first, for the next call of a transformer called once per step; an encoder, called
    once per new prompt, starts none), and the compute waits for block k's copy only, so that block
    k+1's copy overlaps block k's compute. After block k runs, it is parked again. At most two
    blocks' weights are on the device at once. `copies` has start(Parked) -> handle and wait(handle).
    """

    def __init__(self, blocks: list[nn.Module], copies, cyclic: bool = True):
        self.blocks = [Parked([block]) for block in blocks]
        self.copies, self.cyclic = copies, cyclic
        self.pending: dict[int, object] = {}  # block index -> its copy's handle
        self.modules, self.hooks = blocks, []
        self.attach()

    def attach(self) -> None:
        """Put the hooks on the blocks (again, after remove(); once)."""
        if self.hooks:
            return
        for k, block in enumerate(self.modules):
            self.hooks.append(block.register_forward_pre_hook(lambda module, args, k=k: self._before(k)))
            self.hooks.append(block.register_forward_hook(lambda module, args, out, k=k: self.blocks[k].park()))

    def _before(self, k: int) -> None:
        ahead = [k + 1] if k + 1 < len(self.blocks) else [0] if self.cyclic else []
        for j in [k, *ahead]:
            if j not in self.pending:
                self.pending[j] = self.copies.start(self.blocks[j])
        self.copies.wait(self.pending.pop(k))

    def park(self) -> None:
        """Park every block and forget the copies under way (a first block queued for a call that will not come soon)."""
        for block in self.blocks:
            block.park()
        self.pending.clear()

    def remove(self) -> None:
        """Take the hooks off and park every block (the model is then whole on the CPU, but what the plan put elsewhere)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.park()


class Streamed:
    """A component whose repeated blocks stream through the device as they run (BlockStreamer) and whose rest is Parked:
    load() puts the rest on the device (the component is then STREAMED), park() puts everything back in CPU memory."""

    def __init__(self, modules: list[nn.Module], copies, cyclic: bool):
        blocks = [block for module in modules for block in repeated_blocks(module)]
        self.streamer = BlockStreamer(blocks, copies, cyclic=cyclic)
        self.rest = Parked(modules, skip=blocks)

    def load(self, device: torch.device) -> None:
        self.rest.load(device)

    def park(self) -> None:
        self.rest.park()
        self.streamer.park()


# Per module, the Offload that placed it last (see Offload._claim); weak both ways, as the Offload holds the module (a
# strong reference here would keep every Offload, and its pinned copies of the weights, alive for good).
_PLACED_BY: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[Offload]]" = weakref.WeakKeyDictionary()


class Offload:
    """A pipeline's components placed as its offload mode's plan says, stage by stage.

    `components` maps COMPONENTS' names (all or some) to the pipeline's objects; `device` is where the run computes.
    `copies(device)` makes a streamed component's block copier (default: default_copies).
    """

    def __init__(self, mode: str, components: dict[str, object], device: torch.device,
                 copies: Callable[[torch.device], object] = default_copies):
        self.mode, self.plan, self.device = mode, make_plan(mode), torch.device(device)
        self.components = components
        self.held: dict[str, Parked | Streamed] = {}  # the components that are not always on the device whole
        for name, component in components.items():
            places = {self.plan[stage][name] for stage in STAGES}
            if STREAMED in places:
                # The transformer runs once per step: its first block's copy for the next step starts during the last.
                self.held[name] = Streamed(modules_of(component), copies(self.device), cyclic=name == "transformer")
            elif CPU in places:
                self.held[name] = Parked(modules_of(component))
        self.places: dict[str, str] = {}
        self._last_prompt: tuple | None = None
        self._encoding = None
        self.enter("load")

    def _claim(self, name: str) -> None:
        """Take component `name` over from another Offload that placed the same objects last (two pipelines built on one
        text encoder, say, in different modes): its streaming hooks come off (they would stream inside this pipeline's
        forward, and break its CUDA graphs), this one's go back on, and both place the component anew when next used."""
        modules = modules_of(self.components[name])
        owners = (ref() for ref in (_PLACED_BY.get(m) for m in modules) if ref is not None)
        others = {id(owner): owner for owner in owners if owner is not None and owner is not self}
        for other in others.values():
            if isinstance(other.held.get(name), Streamed):
                other.held[name].streamer.remove()
            other.places.pop(name, None)
        if others:
            self.places.pop(name, None)
            if isinstance(self.held.get(name), Streamed):
                self.held[name].streamer.attach()
        for module in modules:
            _PLACED_BY[module] = weakref.ref(self)

    def enter(self, stage: str) -> None:
        """Move each component where the plan has it in `stage`."""
        for name in self.components:
            self._claim(name)
        for name, place in self.plan[stage].items():
            if name not in self.components or self.places.get(name) == place:
                continue
            if name in self.held:
                held = self.held[name]
                held.park() if place == CPU else held.load(self.device)
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
            self.forget_encoding()  # the old encoding's memory is free before the new one is made
            with self.stage("encode"):
                self._encoding = encoder(prompts, max_length)
            self._last_prompt = key
        return self._encoding

    def forget_encoding(self) -> None:
        """Drop the kept encoding: the next prompt is encoded anew, even a repeated one (the encoder's weights changed)."""
        self._encoding, self._last_prompt = None, None


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


def stays_on_device(offload: Offload, component: str) -> bool:
    """Whether `component` stays on the device whole in every stage, so that CUDA graphs of it stay valid.

    One streamed (copies and host waits sit inside its forward) or visiting the device stage by stage
    is not: its weights land wherever free memory is each time, so its graphs would be stale on every
    run and captured anew, their memory pool reserved meanwhile, in a mode chosen for want of memory."""
    return all(on_device_for(offload, component, stage) for stage in offload.plan)


def on_device_for(offload: Offload, component: str, stage: str) -> bool:
    """Whether `component` is on the device whole (not streamed, not parked) during `stage`."""
    return offload.plan[stage][component] == DEVICE


def graphs_allowed(offload: Offload, cache: float | None) -> bool:
    """Whether a run may replay the transformer as CUDA graphs (common/graphs.py): only when it stays on the device
    (stays_on_device), and not with the step cache (its skip decision reads the device)."""
    return stays_on_device(offload, "transformer") and cache is None
