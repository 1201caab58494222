"""The device a run asks for, and whether its memory holds the run: checked before anything loads.

The memory a run needs is estimated from the checkpoints' headers, never their tensors:

    weights      every parameter of the transformer, the autoencoder and the text encoders, at the
                 requested dtype's size (the files may be stored in another one);
    activations  ACTIVATION_ELEMENTS_PER_PIXEL per output pixel, at the dtype's size: the
                 autoencoder's decoder at full resolution dominates (128 channels, a few live
                 tensors), then the transformer's tokens (one per 16 x 16 pixels, CFG rows included).

An offloaded text encoder visits the device only while the prompt is encoded, so the peak is then
the larger of all weights, or the transformer and autoencoder with the activations. The estimate
leaves out the CUDA context and the allocator's slack: it is a floor, so a run is refused only when
even the floor does not fit ("clearly short"); a run that passes may still run out, which the CLI
reports in one line with the peak it reached (out_of_memory_need).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from zflux.common.identify import read_header
from zflux.common.pipeline import default_device

ACTIVATION_ELEMENTS_PER_PIXEL = 768  # ~1.5 GiB in bf16 at 1024 x 1024; calibrate with tests/test_memory_gpu.py
GIB = 2**30
DEVICE_TYPES = ("cpu", "cuda", "mps")


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
    numel = 0
    for _, shape in read_header(path).values():
        count = 1
        for size in shape:
            count *= size
        numel += count
    return numel


@dataclass(frozen=True)
class Footprint:
    """What a run keeps on its device, before a dtype is chosen: parameters and output pixels."""

    model_params: int  # transformer and autoencoder
    text_params: int  # text encoders
    pixels: int  # height * width of one image

    def bytes(self, dtype: torch.dtype, offload_text_encoder: bool) -> int:
        """The floor of the device memory a run needs in `dtype` (see the module's docstring)."""
        size = dtype.itemsize
        weights = (self.model_params + self.text_params) * size
        activations = self.pixels * ACTIVATION_ELEMENTS_PER_PIXEL * size
        if offload_text_encoder:
            return max(weights, self.model_params * size + activations)
        return weights + activations


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on `device` (the CPU: MemAvailable, on Linux); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), flags=re.M)
        return int(match.group(1)) * 1024 if match else None
    return None


def out_of_memory_need(error: BaseException, device: torch.device) -> tuple[int, int]:
    """(what the run needed at least, the device's total), in bytes, after a CUDA out-of-memory `error` on `device`."""
    match = re.search(r"Tried to allocate ([\d.]+) ([KMG])iB", str(error))
    asked = float(match.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)] if match else 0
    return torch.cuda.max_memory_allocated(device) + int(asked), torch.cuda.get_device_properties(device).total_memory


def gib(n: int) -> str:
    """Bytes as people read them: GiB, or MiB below a tenth of one."""
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"
