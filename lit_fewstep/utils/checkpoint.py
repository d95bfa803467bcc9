"""Checkpoint files: safe loading by default, atomic writes, modules rebuilt from their recorded config."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import instantiate

__all__ = ["load_checkpoint", "load_module", "atomic_save", "FORMAT_KEY"]

FORMAT_KEY = "lit_fewstep"


def load_checkpoint(path: str | os.PathLike, trust: bool = False, field: str = "ckpt") -> dict[str, Any]:
    """torch.load with weights_only=True unless `trust`; every failure is one line naming `field`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: checkpoint {str(path)!r} does not exist; give the path of a .ckpt/.pt file written by lit_fewstep.")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        # torch.save writes a zip archive: anything else (or a truncated one) is damage, not pickle.
        if trust or not zipfile.is_zipfile(path):
            raise ValueError(
                f"{field}: {str(path)!r} is not a readable checkpoint (truncated or corrupted: "
                f"{str(err).splitlines()[0][:120]}); use an earlier checkpoint or re-export it."
            ) from err
        raise ValueError(
            f"{field}: {str(path)!r} contains pickled Python objects and was refused (weights_only=True). "
            "Unpickling runs arbitrary code: only if you trust the file's source, pass --trust_checkpoint true."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"{field}: {str(path)!r} is not a readable checkpoint (truncated or corrupted: {str(err).splitlines()[0][:120]}); "
            "use an earlier checkpoint or re-export it."
        ) from err


def load_module(path: str | os.PathLike, trust: bool = False, field: str = "ckpt"):
    """Rebuild a lit_fewstep module from a checkpoint (Lightning .ckpt or exported .pt) with its weights."""
    ckpt = load_checkpoint(path, trust=trust, field=field)
    meta = ckpt.get(FORMAT_KEY) if isinstance(ckpt, dict) else None
    if not meta or "config" not in meta or "state_dict" not in ckpt:
        raise ValueError(f"{field}: {str(path)!r} is not a lit_fewstep checkpoint (no '{FORMAT_KEY}' config); train or export it with lit_fewstep.")
    module = instantiate(meta["config"], trust=trust)
    module.data_config = meta.get("data")
    skip = tuple(getattr(module, "unsaved_prefixes", ()))
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    optional = set(getattr(module, "optional_state_keys", ()))
    missing = [k for k in missing if not k.startswith(skip) and k not in optional]
    if missing and all(k.startswith("ema.") for k in missing) and hasattr(module, "on_load_state_dict_without_ema"):
        module.on_load_state_dict_without_ema()  # an EMA-only export
        missing = []
    if missing or unexpected:
        raise ValueError(
            f"{field}: {str(path)!r} does not match the module it describes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it was written by another version of the code."
        )
    return module


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write then rename, so a kill during the write never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
