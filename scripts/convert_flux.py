"""Convert a FLUX.1 transformer checkpoint between Black Forest Labs' single-file and diffusers' layouts.

    python scripts/convert_flux.py FLUX.1-dev/transformer flux1-dev.safetensors --to original
    python scripts/convert_flux.py flux1-dev.safetensors diffusion_pytorch_model.safetensors --to diffusers

IN is a .safetensors file (BFL, ComfyUI-prefixed or diffusers), a sharded index, or a folder
(a diffusers `transformer/` folder); OUT is one .safetensors file. Tensors keep their dtype. The same as `zflux convert`, which
also detects the family from the keys.
"""

import sys

from zflux.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
