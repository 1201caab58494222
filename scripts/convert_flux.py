"""Convert a FLUX.1 transformer checkpoint between Black Forest Labs' single-file and diffusers' layouts.

    python scripts/convert_flux.py FLUX.1-dev/transformer flux1-dev.safetensors --to original
    python scripts/convert_flux.py flux1-dev.safetensors diffusion_pytorch_model.safetensors --to diffusers

IN is a .safetensors file (BFL, ComfyUI-prefixed or diffusers), a sharded index, or a folder
(a diffusers `transformer/` folder); OUT is one .safetensors file. Tensors keep their dtype.
"""

import argparse

from common.weights import read_state_dict, save_state_dict
from flux.convert import from_diffusers, to_diffusers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="checkpoint file, index or folder (either layout)")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--to", choices=("original", "diffusers"), default="original", help="layout to write")
    args = parser.parse_args()
    state_dict = read_state_dict(args.src)
    converted = to_diffusers(state_dict) if args.to == "diffusers" else from_diffusers(state_dict)
    save_state_dict(converted, args.dst)
    print(f"wrote {len(converted)} tensors in the {args.to} layout to {args.dst}")


if __name__ == "__main__":
    main()
