"""Method-agnostic networks: ``net(x, noise_labels, class_labels=None, s_labels=None, guidance=None,
extra=None, return_features=False)``. Preconditioning lives in ``lit_fewstep.diffusion``."""

from .dit import DiT
from .heads import DiscriminatorHead
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "DiT", "DiscriminatorHead"]
