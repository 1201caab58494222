"""Where FLUX.1's token layout used to live: pack_latents / unpack_latents are in zflux.common.latents now,
img_ids / txt_ids in zflux.flux.pipeline. This module only re-exports them for tests/test_flux_model.py and
tests/test_kernels_models.py, which another change owns; delete it once those two imports move."""

from zflux.common.latents import pack_latents, unpack_latents  # noqa: F401
from zflux.flux.pipeline import img_ids, txt_ids  # noqa: F401
