"""Methods: every one a FewStepModule (LightningModule with an explicit update schedule)."""

from .base import FewStepModule, Phase, Samples, Stage, load_teacher
from .diffusion import EDMDiffusion, FlowMatching
from .dmd import DMD, DMD2
from .msd import MSD
from .consistency import CD, CT, ICT
from .scm import SCD, SCT
from .ctm import CTM
from .guided_distillation import GuidedDistillation
from .analog_bits import AnalogBits
from .caf import CAF
from .flow_map import AYF
from .lowdiff import LowDiff
