"""Method-agnostic networks: ``net(x, noise_labels, class_labels=None, s_labels=None, guidance=None,
extra=None, return_features=False)``; the image nets also take ``resolution=None`` (a cross-check of
the input's size). Preconditioning lives in ``lit_fewstep.diffusion``.

Optional conditioning exists only when the net is built for it, so a net built with the defaults has
the same parameters as one built before the option existed:

- ``second_time=True``: a second time ``s_labels`` [B] (two-time maps such as g(x_t, t, s) or
  f(x_t, t, s)), embedded like the noise label and added to the conditioning vector.
- ``guidance_embed=True``: a per-sample guidance scale ``guidance`` [B] (a guidance-conditioned
  student), embedded the same way; with ``guidance_null=g`` the embedding of ``g`` is subtracted, so
  the net's prediction at scale ``g`` (e.g. 1.0, no guidance) does not depend on it. The UNet's
  ``guidance_adapter=True`` (with ``guidance_null``; ``guidance_rank=r`` for a convolutional branch)
  adds per-block layers of guidance's own that are exactly zero at scale ``g``.
- ``extra_channels=k``: ``extra`` [B, k, ...] concatenated to x (low-resolution condition image,
  self-conditioning estimate).
- ``resolutions=(r0, r1, ...)`` (UNet, DiT): inputs of any listed size, with a learned embedding of
  the size's index; the DiT resamples its position embedding to the input's token grid.
"""

from .dit import DiT
from .heads import DiscriminatorHead
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "DiT", "DiscriminatorHead"]
