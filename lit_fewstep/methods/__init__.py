"""Methods: every one a FewStepModule (LightningModule with an explicit update schedule)."""

from .base import FewStepModule, Phase, Samples, load_teacher
from .diffusion import EDMDiffusion, FlowMatching
