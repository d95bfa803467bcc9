"""Shared diffusion math: paths, parameterizations, preconditioning, guidance, solvers."""

from .guidance import Autoguidance, ClassifierFreeGuidance, autoguided_x0, guide, guided_x0, scale_from_cfg_w
from .paths import EDMPath, GaussianPath, LinearPath, TrigFlowPath, VPCosinePath, convert, make_path
from .precond import (PRECONDITIONINGS, ConsistencyPreconditioning, CTMPreconditioning, EDMPreconditioning,
                      FlowMapPreconditioning, PreconditionedNet, Preconditioning, TrigFlowEDMPreconditioning,
                      TrigFlowPreconditioning, TwoTimePreconditioning, VelocityPreconditioning, VPEpsPreconditioning,
                      VPVPreconditioning, consistency_coefficients, edm_coefficients, make_preconditioning,
                      trigflow_coefficients)
from .predictions import PREDICTION_KINDS, convert_prediction, from_x0_eps, to_x0_eps
from .solvers import (ConstantAccelerationStep, DDIMHeunStep, DDIMStep, DenoiseRenoise, EulerStep, HeunStep, NFECounter,
                      SamplerState, SelfConditioned, Step, StochasticDDIMStep, TwoTimeJump, consistency_sigmas,
                      denoise_renoise, discrete_lognormal_probs, euler_step, gaussian_noise, heun_schedule_for_nfe,
                      heun_step, karras_sigmas, lognormal_sigmas, multistep_consistency_sample, pf_ode_velocity,
                      run_steps, sample_edm_heun, solve_ode, uniform_times)
