"""Shared diffusion math: paths, parameterizations, preconditioning, guidance, solvers."""

from .guidance import Autoguidance, ClassifierFreeGuidance, guide, scale_from_cfg_w
from .paths import EDMPath, GaussianPath, LinearPath, TrigFlowPath, VPCosinePath, convert, make_path
from .precond import (PRECONDITIONINGS, ConsistencyPreconditioning, CTMPreconditioning, EDMPreconditioning,
                      FlowMapPreconditioning, PreconditionedNet, Preconditioning, TrigFlowPreconditioning,
                      TwoTimePreconditioning, VelocityPreconditioning, VPEpsPreconditioning, VPVPreconditioning,
                      consistency_coefficients, edm_coefficients, make_preconditioning, trigflow_coefficients)
from .predictions import PREDICTION_KINDS, convert_prediction, from_x0_eps, to_x0_eps
from .solvers import (NFECounter, consistency_sigmas, discrete_lognormal_probs, euler_step, heun_schedule_for_nfe,
                      heun_step, karras_sigmas, lognormal_sigmas, multistep_consistency_sample, pf_ode_velocity,
                      sample_edm_heun, solve_ode, uniform_times)
