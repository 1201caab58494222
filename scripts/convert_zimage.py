"""Convert a Z-Image transformer checkpoint between the official single-file and diffusers layouts.

    python scripts/convert_zimage.py Z-Image-Turbo/transformer z_image_turbo.safetensors --to original
    python scripts/convert_zimage.py z_image_turbo.safetensors diffusion_pytorch_model.safetensors --to diffusers

IN is a .safetensors file, a sharded index, or a folder (a diffusers `transformer/` folder);
OUT is one .safetensors file. Tensors keep their dtype. The same as `zflux convert`, which
also detects the family from the keys.
"""

import sys

from zflux.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
