"""Bring your own teacher: networks trained elsewhere, on our paths and preconditionings.

- `diffusers`: a diffusers `UNet2DModel` + its scheduler config from a local folder (`DiffusersTeacher`).
- `formats`: `teacher_ckpt` / `--ckpt` values that are not lit_fewstep .pt files (a diffusers folder,
  ``diffusers:PATH``, a .safetensors file) and the safetensors reader/writer.

Floor 1 of the import layers (with `nets` and `diffusion`): it builds networks and knows no training method.
diffusers is imported only when a diffusers teacher is built (the optional ``diffusers`` extra).
"""

from .diffusers import DiffusersTeacher, DiffusersUNet, DiscreteVPPath, load_diffusers_teacher

__all__ = ["DiffusersTeacher", "DiffusersUNet", "DiscreteVPPath", "load_diffusers_teacher"]
