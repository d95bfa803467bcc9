"""Teacher files that are not lit_fewstep .pt checkpoints, and conversion to a safe single file.

`teacher_ckpt` (every distillation method), `pairs --teacher`, and through `convert` also `sample` / `evaluate`
accept:

- a diffusers folder (a pipeline folder with unet/ and scheduler/, or a UNet folder with its scheduler config),
  spelled as the folder path or ``diffusers:PATH`` (`external_teacher`);
- a ``.safetensors`` file written by ``python -m lit_fewstep convert`` or by a lit_fewstep export: tensors plus a
  JSON config in the file's metadata (read by `utils.checkpoint.load_checkpoint`, no pickle).

A converted diffusers model is written as the checkpoint of an `EDMDiffusion` teacher whose network is a
`DiffusersUNet` (state keys ``model.net.unet.<diffusers key>``), so `sample` / `evaluate` sample it with the
EDM Heun sampler and every method takes it as a teacher; `to_diffusers` writes it back as a diffusers folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..utils.checkpoint import FORMAT_KEY, load_checkpoint, save_safetensors
from .diffusers import DiffusersTeacher, DiffusersUNet, load_diffusers_teacher, save_diffusers

__all__ = ["DIFFUSERS_PREFIX", "external_teacher", "specialize", "diffusers_to_safetensors", "to_diffusers",
           "is_diffusers_folder", "TEACHER_CLASS", "WEIGHTS_PREFIX"]

DIFFUSERS_PREFIX = "diffusers:"
TEACHER_CLASS = "lit_fewstep.methods.diffusion.EDMDiffusion"  # a class path (a string, not an import)
WEIGHTS_PREFIX = "model.net.unet."  # EDMDiffusion.model (PreconditionedNet) .net (DiffusersUNet) .unet


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in ("model_index.json", "config.json", "unet/config.json"))


def external_teacher(path, field: str = "teacher_ckpt", sigma_data: float = 0.5) -> nn.Module | None:
    """The teacher `path` names if it is not a lit_fewstep checkpoint file (a diffusers folder or
    ``diffusers:PATH``), frozen; None for anything else (the caller loads it as a checkpoint)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    if text.startswith(DIFFUSERS_PREFIX):
        return load_diffusers_teacher(text[len(DIFFUSERS_PREFIX):], sigma_data, field)
    if is_diffusers_folder(text):
        return load_diffusers_teacher(text, sigma_data, field)
    return None


def specialize(teacher: nn.Module) -> nn.Module:
    """A teacher read from a checkpoint whose network is a `DiffusersUNet` becomes a `DiffusersTeacher` (same
    weights, exact float64 timestep labels in `x0_from`); anything else is returned as it is."""
    net = getattr(teacher, "net", None)
    if isinstance(net, DiffusersUNet) and getattr(teacher, "preconditioning", None) == "edm" \
            and not isinstance(teacher, DiffusersTeacher) and teacher.sigma_data == net.sigma_data:
        return DiffusersTeacher(net).requires_grad_(False).eval()
    return teacher


def diffusers_to_safetensors(src: str | os.PathLike, out: str | os.PathLike, sigma_data: float = 0.5) -> Path:
    """Convert a local diffusers folder into one .safetensors teacher file (EDMDiffusion config in its metadata)."""
    src_text = os.fspath(src)
    if src_text.startswith(DIFFUSERS_PREFIX):
        src_text = src_text[len(DIFFUSERS_PREFIX):]
    teacher = load_diffusers_teacher(src_text, sigma_data, field="SRC")
    net = teacher.net
    config = {"class_path": TEACHER_CLASS, "init_args": {"net": net.init_config, "sigma_data": float(sigma_data)}}
    state = {WEIGHTS_PREFIX + k: v for k, v in net.unet.state_dict().items()}
    entry = {"config": config, "data": None, "version": 1, "source": {"format": "diffusers", "path": src_text}}
    out = Path(out)
    save_safetensors({FORMAT_KEY: entry, "state_dict": state}, out)
    return out


def to_diffusers(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the `DiffusersUNet` of a .safetensors teacher (from `diffusers_to_safetensors`, or a student exported
    with a DiffusersUNet generator) back as a diffusers folder (unet/ + scheduler/)."""
    from ..utils.config import instantiate

    ckpt = load_checkpoint(src, field="SRC")
    meta, state = ckpt.get(FORMAT_KEY), ckpt.get("state_dict")
    net_config = _find_net_config((meta or {}).get("config"))
    if net_config is None:
        raise ValueError(f"SRC: {os.fspath(src)!r} holds no DiffusersUNet network; only teachers converted from "
                         "diffusers (or their students) can be written back as diffusers folders.")
    net = instantiate(net_config, base=DiffusersUNet)
    prefixes = sorted({k.split("net.unet.")[0] for k in state if "net.unet." in k})
    if not prefixes:
        raise ValueError(f"SRC: {os.fspath(src)!r} holds no DiffusersUNet weights (no '*.net.unet.*' keys).")
    prefix = next((p for p in ("model.", "G.", "student.", "generator.") if p in prefixes), prefixes[0]) + "net.unet."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    net.unet.load_state_dict(weights, strict=True)
    return save_diffusers(net, out)


def _find_net_config(config):
    """The config of the DiffusersUNet that a module config's `net` argument names (teachers and students)."""
    if not isinstance(config, dict):
        return None
    net = (config.get("init_args") or {}).get("net")
    if isinstance(net, dict) and net.get("class_path") == f"{DiffusersUNet.__module__}.DiffusersUNet":
        return net
    return None


CONVERSIONS = {("diffusers", "safetensors"), ("safetensors", "diffusers"), ("edm", "safetensors"),
               ("edm2", "safetensors"), ("safetensors", "edm"), ("safetensors", "edm2")}


def convert(source: str, src: str | os.PathLike, out: str | os.PathLike, to: str | None = None,
            sigma_data: float = 0.5, arch: str | None = None, label_dim: int = 0, trust: bool = False) -> Path:
    """`python -m lit_fewstep convert`: a diffusers folder or an EDM / EDM2 network (official .pkl with `trust`, or
    an official-layout state dict with `arch`) -> .safetensors teacher; or back (--to diffusers / edm / edm2)."""
    from .official import official_to_safetensors, safetensors_to_official

    to = to or ("diffusers" if source == "safetensors" else "safetensors")
    if (source, to) not in CONVERSIONS:
        raise ValueError(f"--from {source} --to {to}: not supported; supported: "
                         f"{sorted(f'{a} -> {b}' for a, b in CONVERSIONS)}.")
    if to == "safetensors" and not os.fspath(out).endswith(".safetensors"):
        raise ValueError(f"--out: {os.fspath(out)!r} must end with .safetensors.")
    if source == "diffusers":
        return diffusers_to_safetensors(src, out, sigma_data)
    if source in ("edm", "edm2"):
        return official_to_safetensors(src, out, arch, label_dim, trust)
    if to == "diffusers":
        return to_diffusers(src, out)
    return safetensors_to_official(src, out)
