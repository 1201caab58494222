"""Convert a Z-Image transformer checkpoint between the official single-file and diffusers layouts.

    python scripts/convert_zimage.py Z-Image-Turbo/transformer z_image_turbo.safetensors --to original
    python scripts/convert_zimage.py z_image_turbo.safetensors diffusion_pytorch_model.safetensors --to diffusers

IN is a .safetensors file, a sharded index, or a folder (a diffusers `transformer/` folder);
OUT is one .safetensors file. Tensors keep their dtype.
"""

import argparse

from common.weights import read_state_dict, save_state_dict
from zimg.convert import from_diffusers, to_diffusers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint file, index or folder (either layout)")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--to", choices=("original", "diffusers"), default="original", help="layout to write")
    args = parser.parse_args()
    state_dict = read_state_dict(args.src)
    save_state_dict(to_diffusers(state_dict) if args.to == "diffusers" else from_diffusers(state_dict), args.dst)
    print(f"wrote {len(state_dict)} tensors in the {args.to} layout to {args.dst}")


if __name__ == "__main__":
    main()
