"""Teacher ODE noise -> sample pairs, made once and reused (DMD's regression set; reflow couplings).

    python -m lit_fewstep pairs --teacher lit_fewstep/assets/edm_digits.pt --num 2048 --nfe 35 --out pairs.pt

(``python -m lit_fewstep.data.pairs ...`` is the same command.) This module makes and reads pairs from a teacher
object; loading the teacher from a checkpoint is the command's work (`lit_fewstep.cli.pairs_main`).

The file holds plain tensors only (it loads with ``torch.load(weights_only=True)``):

=================  ======================================================================
key                value
=================  ======================================================================
``noise``          unit Gaussian z [N, ...]; the ODE starts at sigma_max * z (EDM coordinates), or at z itself
                   (``path="linear"``: the linear path's t = 1 is pure noise)
``x``              the teacher's deterministic PF-ODE solution from that start [N, ...]
``labels``         class labels [N] (int64), or absent for an unconditional teacher
``sigma_max``      the starting noise level (a one-step student must be fed sigma_max * z); inf on the linear path
``path``           the path the ODE was solved on: "edm" (EDM Heun on a Karras grid) or "linear" (Heun on a
                   uniform grid of the flow-matching teacher's own path, t = 1 -> 0; reflow / CAF couplings)
``nfe``            teacher evaluations per sample (guidance counts double)
``guidance_scale`` CFG scale of the teacher (1 = none, EDM2 convention)
``teacher``        the teacher checkpoint path, as given
=================  ======================================================================
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..diffusion.guidance import guided_x0
from ..diffusion.paths import EDMPath, LinearPath
from ..diffusion.solvers import NFECounter, heun_schedule_for_nfe, sample_edm_heun, solve_ode, uniform_times
from ..utils.checkpoint import atomic_save, load_checkpoint

__all__ = ["make_pairs", "save_pairs", "load_pairs"]

PAIR_KEYS = ("noise", "x", "sigma_max", "nfe", "guidance_scale", "teacher")


@torch.no_grad()
def make_pairs(teacher, num: int, nfe: int = 35, num_classes: int | None = None, guidance_scale: float = 1.0,
               seed: int = 0, batch_size: int = 512, sigma_max: float = 80.0, path: str = "edm") -> dict:
    """Solve the teacher's PF-ODE (EDM Heun, `nfe` evaluations) from `num` seeded noises.

    Args:
        teacher: a `PreconditionedNet` (e.g. from `methods.base.load_teacher`), any path/parameterization.
        num_classes: label count for class-conditional teachers (default: the teacher's; labels are uniform).
        guidance_scale: CFG scale for the teacher (1 = none; `diffusion.guidance.guided_x0`, null label = the
            teacher's num_classes).
        seed: seeds one `torch.Generator` that draws labels and noise, batch after batch.
        path: "edm" (any teacher, EDM Heun from sigma_max * z), or "linear": a flow-matching teacher's ODE on its
            own path from z at t = 1 to t = 0 (Heun on a uniform grid, a final Euler step; `nfe` evaluations), so
            the noise is exactly the start of the teacher's flow (the reflow couplings of rectified flow and CAF).
    Returns a dict of plain tensors (see the module docstring).
    """
    if num < 1:
        raise ValueError(f"num: must be >= 1, got {num}.")
    if path not in ("edm", "linear"):
        raise ValueError(f"path: choose 'edm' or 'linear', got {path!r}.")
    if path == "linear" and getattr(getattr(teacher, "path", None), "name", None) != "linear":
        raise ValueError("path: 'linear' solves a flow-matching teacher's own ODE; this teacher is not on the linear "
                         "path (use path='edm').")
    num_classes = teacher.num_classes if num_classes is None else num_classes
    if guidance_scale != 1.0 and num_classes == 0:
        raise ValueError("guidance_scale: classifier-free guidance needs a class-conditional teacher; use 1.")
    net = getattr(teacher, "net", teacher)
    res = getattr(net, "img_resolution", None)
    shape = (net.in_channels,) if res is None else (net.in_channels, res, res)
    edm = EDMPath(sigma_max=sigma_max)
    device = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same pairs on any device
    noises, xs, labels, counter = [], [], [], NFECounter()
    for begin in range(0, num, batch_size):
        n = min(batch_size, num - begin)
        y = torch.randint(0, num_classes, (n,), generator=g).to(device) if num_classes > 0 else None
        z = torch.randn((n, *shape), generator=g).to(device)
        counter.count = 0

        def x0_fn(x, sigma, y=y):  # two passes (conditional, then null label): the pairs of earlier versions exactly
            return guided_x0(teacher, x, sigma, y, guidance_scale, path=edm, counter=counter, batched=False)

        if path == "linear":
            heun, euler = heun_schedule_for_nfe(nfe)
            linear = LinearPath()
            times = uniform_times(heun + euler, dtype=z.dtype).to(device)

            def x0_linear(x, t, y=y):  # the teacher's own path (path=None: converting at t = 1 would divide 0 by 0)
                return guided_x0(teacher, x, t, y, guidance_scale, path=None, counter=counter, batched=False)

            xs.append(solve_ode(x0_linear, z, times, linear, method="heun", euler_last=euler))
        else:
            xs.append(sample_edm_heun(x0_fn, z, nfe, sigma_max=sigma_max))
        noises.append(z)
        if y is not None:
            labels.append(y)
    pairs = {"noise": torch.cat(noises).cpu(), "x": torch.cat(xs).float().cpu(),
             "sigma_max": float(sigma_max) if path == "edm" else math.inf, "path": path,
             "nfe": int(counter.count), "guidance_scale": float(guidance_scale)}
    if labels:
        pairs["labels"] = torch.cat(labels).cpu()
    return pairs


def save_pairs(pairs: dict, path: str | Path, teacher_path: str = "") -> None:
    atomic_save({**pairs, "teacher": str(teacher_path)}, path)


def load_pairs(path: str | Path, field: str = "pairs_path") -> dict:
    """Load a pair file (weights_only) and check its keys; errors name `field`."""
    pairs = load_checkpoint(path, field=field)
    missing = [k for k in ("noise", "x", "sigma_max") if k not in pairs]
    if missing:
        raise ValueError(f"{field}: {str(path)!r} is not a pair file (missing {missing}); make one with "
                         "`python -m lit_fewstep.data.pairs --teacher PATH --num N --out FILE.pt`.")
    if pairs["noise"].shape != pairs["x"].shape:
        raise ValueError(f"{field}: {str(path)!r} has noise {tuple(pairs['noise'].shape)} but samples "
                         f"{tuple(pairs['x'].shape)}; regenerate it.")
    return pairs


if __name__ == "__main__":  # the command lives in the CLI (data sits under the methods that load a teacher)
    from lit_fewstep.cli import pairs_main

    pairs_main(prog="python -m lit_fewstep.data.pairs")
