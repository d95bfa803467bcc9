"""Sampling from a checkpoint: load a trained module for sampling, draw seeded samples in batches.

The one place that `sample`, `evaluate`, the training callbacks and the benchmarks share: it sits with the
methods (it works on any `FewStepModule`) and under everything that uses it (`evaluation`, `callbacks`, `cli`;
see the layer rule in `lit_fewstep/__init__.py`). The command-line options of the commands that read a
checkpoint live here too, so `sample` (cli) and `evaluate` (evaluation) spell them the same way.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..conditioning import Conditioning
from ..diffusion.solvers import ODE_SOLVERS, SIGMA_GRIDS

from ..utils.args import finite_float, parse_bool, positive_int
from ..utils.checkpoint import TRUST_FLAG, load_module
from .base import FewStepModule

__all__ = ["load_for_sampling", "draw", "resolve_device", "add_checkpoint_arguments", "check_sigmas",
           "sampling_options", "SOLVERS"]

SOLVERS = ODE_SOLVERS  # heun, euler, dpmpp_2m, unipc (diffusion/solvers.py)


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when available, else the CPU), or any name `torch.device` takes."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_sampling(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False,
                      field: str = "ckpt", opt_in: str | None = TRUST_FLAG,
                      allow_modules: tuple[str, ...] | list[str] = ()) -> FewStepModule:
    """The module of checkpoint `path` on `device` (or "auto"), in eval mode.

    Loaded by `utils.checkpoint.load_module`: weights-only and lit_fewstep classes only unless `trust`; errors
    name `field` and say how to opt in (`opt_in`, None where the caller offers no opt-in). `allow_modules`: packages
    whose classes may be built too (a user's own methods), without allowing pickle.
    """
    module = load_module(path, trust=trust, field=field, opt_in=opt_in, allow_modules=allow_modules)
    return module.to(resolve_device(device)).eval()


def draw(module: FewStepModule, num: int, nfe: int, seed: int, class_labels=None, use_ema: bool = True,
         batch_size: int = 1000, cond: Conditioning | None = None, **options):
    """Sample in batches from one seeded generator: the same seed gives the same samples at any batch size
    only for equal batch sizes; report (samples, labels, nfe, seconds). `cond` holds per-sample conditioning for
    all `num` samples (e.g. one guidance scale each), sliced with the batches."""
    if cond is not None and cond.batch_size not in (None, num):
        raise ValueError(f"cond: conditioning for {cond.batch_size} samples, but {num} are drawn.")
    generator = torch.Generator().manual_seed(seed)
    xs, ys, nfe_spent = [], [], None
    start = time.perf_counter()
    for begin in range(0, num, batch_size):
        size = min(batch_size, num - begin)
        labels = None if class_labels is None else class_labels[begin:begin + size]
        if cond is not None:
            options["cond"] = cond.select(slice(begin, begin + size))
        out = module.sample(size, nfe, class_labels=labels, generator=generator, use_ema=use_ema, **options)
        xs.append(out.x.float().cpu())
        if out.labels is not None:
            ys.append(out.labels.cpu())
        nfe_spent = out.nfe
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return torch.cat(xs), (torch.cat(ys) if ys else None), nfe_spent, seconds


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that samples a checkpoint (`sample`, `evaluate`)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt from fit, or .pt from export)")
    parser.add_argument("--ema", type=parse_bool, default=True, help="sample from EMA weights (true|false)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--batch_size", type=positive_int, default=1000)
    parser.add_argument("--guidance_scale", type=finite_float, nargs="+", default=None,
                        help="CFG scale (1 = none; default: the model's): one for all samples, or one per sample")
    parser.add_argument("--solver", choices=SOLVERS, default=None,
                        help="ODE solver of a teacher (default: heun; dpmpp_2m and unipc: one evaluation per step)")
    parser.add_argument("--grid", choices=SIGMA_GRIDS, default=None,
                        help="noise levels of a teacher's solver: karras (default, EDM's) or cosine (even in the VP "
                             "cosine time; better at a few steps, benchmarks/results/leaderboard.md)")
    parser.add_argument("--stochastic", type=parse_bool, default=None,
                        help="Meng et al.'s stochastic N-step sampler instead of DDIM (guided distillation students)")
    parser.add_argument("--guide", default=None, metavar="PATH",
                        help="autoguidance: a worse model of the same task (smaller / shorter-trained) guides this one "
                             "at --guidance_scale (Karras et al. 2024); counts two evaluations per guided step")
    parser.add_argument("--gamma", type=finite_float, default=None,
                        help="CTM gamma-sampling: 0 deterministic long jumps (default) ... 1 consistency multistep")
    parser.add_argument("--sigmas", type=finite_float, nargs="+", default=None, metavar="SIGMA",
                        help="consistency models (CD, CT, iCT, sCD, sCT): the nfe - 1 intermediate EDM noise levels "
                             "of multistep sampling, decreasing (default: the Karras grid with nfe + 1 points; the "
                             "CM papers tune them per model)")
    parser.add_argument("--allow_module", action="append", default=[], metavar="PACKAGE",
                        help="also build classes defined in this package (your own methods; repeatable; pickle stays "
                             "off). Same as LIT_FEWSTEP_ALLOW_MODULES=PACKAGE,...")
    parser.add_argument("--trust_checkpoint", type=parse_bool, default=False,
                        help="allow pickle loading and classes outside lit_fewstep (runs code from the file: only for "
                             "files you trust)")


def check_sigmas(parser: argparse.ArgumentParser, args: argparse.Namespace, nfes: list[int]) -> None:
    """--sigmas fixes the NFE (one more than the levels): refuse a mismatch before any work."""
    if args.sigmas is not None and any(nfe != len(args.sigmas) + 1 for nfe in nfes):
        parser.error(f"--sigmas: {len(args.sigmas)} intermediate noise levels make {len(args.sigmas) + 1} NFE, but "
                     f"--nfe is {' '.join(map(str, nfes))}; give nfe - 1 levels, one NFE at a time.")


def sampling_options(args: argparse.Namespace, num: int | None = None) -> dict:
    """The `sample()` options that `add_checkpoint_arguments` set (only those given: the model's defaults stay).
    Several --guidance_scale values (one per sample; `num` of them) become per-sample conditioning for `draw`."""
    scales = args.guidance_scale
    if scales is None:
        options = {}
    elif len(scales) == 1:
        options = {"guidance_scale": scales[0]}
    elif num is not None and len(scales) == num:
        options = {"cond": Conditioning(guidance_scale=torch.tensor(scales, dtype=torch.float32))}
    else:
        expected = "one value" if num is None else f"one value or --num={num} values"
        raise ValueError(f"--guidance_scale: {expected}, got {len(scales)}.")
    if args.solver:
        options["solver"] = args.solver
    if getattr(args, "grid", None):
        options["grid"] = args.grid
    if getattr(args, "gamma", None) is not None:
        options["gamma"] = args.gamma
    if getattr(args, "sigmas", None) is not None:
        options["sigmas"] = args.sigmas
    if getattr(args, "stochastic", None) is not None:
        options["stochastic"] = args.stochastic
    if getattr(args, "guide", None):
        options["guide"] = load_for_sampling(args.guide, args.device, args.trust_checkpoint, field="--guide",
                                             allow_modules=args.allow_module)
    return options
