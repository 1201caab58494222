"""zflux: Z-Image and FLUX text-to-image diffusion transformers in plain PyTorch.

The installed package maps the repository's top-level folders under one name:
`zflux.zimg` (zimg/), `zflux.flux` (flux/), `zflux.common` (common/), `zflux.kernels` (kernels/);
`zflux.cli` is the `zflux` command.
"""

__version__ = "0.1.0"
