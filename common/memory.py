"""The device a run asks for, and whether its memory holds the run: checked before anything loads.

The memory a run needs is estimated from the checkpoints' headers, never their tensors, stage by stage
as the offload mode places the components (common/offload.py):

    weights      each component on the device in that stage, at the requested precision's size (the
                 files may be stored in another one); fp8 holds the transformer's weights in one byte
                 each (common/fp8.py) and the rest in bf16; a streamed transformer holds its largest
                 repeated block twice (the one running and the next one's copy) and nothing else of
                 its blocks; streamed text encoders hold all but their repeated layers, and two of
                 those;
    activations  denoise: TOKEN_ACTIVATION_ELEMENTS per token of each CFG row (image tokens, one per
                 16 x 16 pixels, and 512 text tokens); decode: DECODE_ELEMENTS_PER_PIXEL per output
                 pixel of the largest piece decoded at once (the whole image, or one tile).

The peak is the largest stage's sum. The constants are counted from the models' shapes (a Z-Image
block's live tensors at 1024 x 1024; the decoder's 128- and 256-channel tensors at full resolution)
and are to be checked against tests/test_memory_gpu.py's measured peaks. The estimate leaves out the
CUDA context and the allocator's slack: a run is refused only when the estimate does not fit; a run
that passes may still run out, which the CLI reports in one line with the peak it reached
(out_of_memory_need).
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from zflux.common.identify import read_header
from zflux.common.offload import CPU, MODES, STAGES, STREAMED, make_plan

TOKEN_ACTIVATION_ELEMENTS = 16 * 3072  # per token and CFG row: a block's live (B, S, dim) and MLP tensors, ~16 dims' worth
DECODE_ELEMENTS_PER_PIXEL = 1024  # the decoder's full-resolution tensors: 2 GiB in bf16 at 1024 x 1024
# The encoder's full-resolution tensors have 128 channels only (the decoder's also 256: its last upsampling's output)
ENCODE_ELEMENTS_PER_PIXEL = DECODE_ELEMENTS_PER_PIXEL // 2
TEXT_TOKENS = 512
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}  # bytes per transformer weight; fp8 runs the rest in bf16
GIB = 2**30
DEVICE_TYPES = ("cpu", "cuda", "mps")


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | None) -> torch.device:
    """The device `name` names (None: the GPU if there is one, else the CPU), checked to exist on this machine."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {name!r}: zflux runs on {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
            raise ValueError(f"device {name!r}: this PyTorch ({torch.__version__}) {built}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: no Apple GPU (MPS) here; use --device cpu")
    return device


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError when `device` cannot compute in `dtype` (bf16 on a GPU older than Ampere)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16: use --dtype fp16 (or fp32)")


def checkpoint_numel(path: str | Path) -> int:
    """How many parameters the checkpoint at `path` (file, index or folder) holds, from its header."""
    return sum(math.prod(shape) for _, shape in read_header(path).values())


def block_numels(path: str | Path) -> dict[str, dict[str, int]]:
    """The parameters of each repeated block of the checkpoint at `path`, by list and index (keys `<list>.<index>.`)."""
    lists: dict[str, dict[str, int]] = {}
    for name, (_, shape) in read_header(path).items():
        match = re.match(r"(.*?)\.(\d+)\.", name)
        if match:
            blocks = lists.setdefault(match.group(1), {})
            blocks[match.group(2)] = blocks.get(match.group(2), 0) + math.prod(shape)
    return lists


def largest_block_numel(path: str | Path) -> int:
    """How many parameters the largest repeated block of the transformer at `path` holds."""
    return max((n for blocks in block_numels(path).values() for n in blocks.values()), default=0)


def streamed_numel(paths: list[str | Path]) -> int:
    """How many parameters the text encoders at `paths` hold on the device while their layers stream (common/offload.py):
    each one's all but its repeated layers (its largest list of blocks), and two of the largest layer among them."""
    rest = largest = 0
    for path in paths:
        layers = max(block_numels(path).values(), key=lambda blocks: sum(blocks.values()), default={})
        rest += checkpoint_numel(path) - sum(layers.values())
        largest = max(largest, *layers.values(), 0)
    return rest + 2 * largest


@dataclass(frozen=True)
class Footprint:
    """What a run keeps on its device, before a precision and an offload mode are chosen: parameters and sizes."""

    transformer_params: int
    block_params: int  # the transformer's largest repeated block
    vae_params: int
    text_params: int  # text encoders
    text_streamed_params: int  # text encoders' parameters on the device while their layers stream (streamed_numel)
    pixels: int  # height * width of one image
    rows: int = 1  # CFG rows per transformer call

    def weights(self, component: str, precision: str, place: str) -> int:
        """Bytes of `component`'s weights on the device when the plan has it at `place`."""
        if place == CPU:
            return 0
        size = PRECISIONS[precision]
        if component == "transformer":
            if place == STREAMED:
                return 2 * self.block_params * size
            return self.transformer_params * size
        size = min(size, PRECISIONS["bf16"]) if precision == "fp8" else size
        if component == "vae":
            return self.vae_params * size
        return (self.text_streamed_params if place == STREAMED else self.text_params) * size

    def activations(self, stage: str, precision: str, tile_pixels: int | None = None) -> int:
        """Bytes of `stage`'s activations (computed in bf16 when the weights are fp8)."""
        size = PRECISIONS["bf16" if precision == "fp8" else precision]
        if stage == "denoise":
            return (self.pixels // 256 + TEXT_TOKENS) * self.rows * TOKEN_ACTIVATION_ELEMENTS * size
        if stage == "decode":
            return min(self.pixels, tile_pixels or self.pixels) * DECODE_ELEMENTS_PER_PIXEL * size
        return 0

    def bytes(self, precision: str, offload: str = "none", tile_pixels: int | None = None) -> int:
        """The device memory a run needs at `precision` with `offload` (and decoding in tiles of `tile_pixels`)."""
        plan = make_plan(offload)
        return max(sum(self.weights(name, precision, place) for name, place in plan[stage].items())
                   + self.activations(stage, precision, tile_pixels) for stage in STAGES)

    def choose_offload(self, precision: str, room: int, tile_pixels: int) -> str | None:
        """The first offload mode (least moving first) whose run fits in `room` bytes, decoding whole or else in tiles;
        None when even streamed blocks and tiles do not fit."""
        return next((mode for mode in MODES if self.bytes(precision, mode, tile_pixels) <= room), None)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on `device` (the CPU: MemAvailable, on Linux); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), flags=re.M)
        return int(match.group(1)) * 1024 if match else None
    return None


def vae_fits(stage: str, pixels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the autoencoder's `stage` ("encode" or "decode") of a `pixels`-pixel image whole fits in `device`'s free
    memory (the CPU's: taken to fit)."""
    per_pixel = {"encode": ENCODE_ELEMENTS_PER_PIXEL, "decode": DECODE_ELEMENTS_PER_PIXEL}[stage]
    free = free_bytes(device) if device.type == "cuda" else None
    return free is None or pixels * per_pixel * dtype.itemsize <= free


def out_of_memory_need(error: BaseException, device: torch.device) -> tuple[int, int]:
    """(what the run needed at least, the device's total), in bytes, after a CUDA out-of-memory `error` on `device`."""
    match = re.search(r"Tried to allocate ([\d.]+) ([KMG])iB", str(error))
    asked = float(match.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)] if match else 0
    return torch.cuda.max_memory_allocated(device) + int(asked), torch.cuda.get_device_properties(device).total_memory


def gib(n: int) -> str:
    """Bytes as people read them: GiB, or MiB below a tenth of one."""
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
