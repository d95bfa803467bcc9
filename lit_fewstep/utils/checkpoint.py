"""Checkpoint files: safe loading by default, atomic writes, modules rebuilt from their recorded config.

Every failure is one line that names the field (or command-line flag) the file came from and says what to do.
Loading is `torch.load(weights_only=True)` unless the caller passes `trust`; what the user must type to opt in
differs between entry points (`--trust_checkpoint true` for `sample`, `--weights_only false` for `fit --ckpt_path`),
so each caller says it with `opt_in` (None: this entry point offers no opt-in).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from .config import UnsafeClassPathError, instantiate
from .runs import resolve_run_pointer

__all__ = ["load_checkpoint", "load_module", "atomic_save", "remove_stale_temporaries", "FORMAT_KEY", "TRUST_FLAG",
           "load_safetensors", "save_safetensors"]

FORMAT_KEY = "lit_fewstep"
TRUST_FLAG = "--trust_checkpoint true"
# How to make a trusted pickled lit_fewstep file safe once, for entry points without an opt-in (teacher_ckpt).
RESAVE_HINT = ("if you trust its source, re-save it weights-only once: python -c \"from lit_fewstep.utils.checkpoint "
               "import load_module; load_module('OLD', trust=True).export('NEW.pt')\" and use NEW.pt")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else type(err).__name__


def _opt_in_hint(opt_in: str | None) -> str:
    return f"only if you trust the file's source, pass {opt_in}" if opt_in else RESAVE_HINT


def load_checkpoint(path: str | os.PathLike, trust: bool = False, field: str = "ckpt",
                    opt_in: str | None = TRUST_FLAG) -> dict[str, Any]:
    """torch.load with weights_only=True unless `trust`; every failure is one line naming `field`."""
    path = resolve_run_pointer(path)  # runs/<name>/latest/... also where `latest` is a text file, not a symlink
    if path.is_dir():
        raise IsADirectoryError(f"{field}: {str(path)!r} is a directory; give the path of a .ckpt/.pt file in it.")
    if not path.is_file():
        raise FileNotFoundError(f"{field}: checkpoint {str(path)!r} does not exist; give the path of a .ckpt/.pt file written by lit_fewstep.")
    if path.stat().st_size == 0:
        raise ValueError(f"{field}: {str(path)!r} is empty (0 bytes; a save that never finished); use an earlier checkpoint.")
    if path.suffix == ".safetensors":
        return load_safetensors(path, field)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        # torch.save writes a zip archive: anything else (or a truncated one) is damage, not pickle.
        if trust or not zipfile.is_zipfile(path):
            raise ValueError(
                f"{field}: {str(path)!r} is not a readable checkpoint (truncated or corrupted: "
                f"{_first_line(err)}); use an earlier checkpoint or re-export it."
            ) from None
        raise ValueError(
            f"{field}: {str(path)!r} contains pickled Python objects and was refused (weights_only=True; unpickling "
            f"runs arbitrary code): {_opt_in_hint(opt_in)}."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        raise ValueError(
            f"{field}: {str(path)!r} is not a readable checkpoint (truncated or corrupted: {_first_line(err)}); "
            "use an earlier checkpoint or re-export it."
        ) from None


SAFETENSORS_META = "lit_fewstep"  # the metadata entry of a .safetensors file: JSON of {config, data, version}


def load_safetensors(path: str | os.PathLike, field: str = "ckpt") -> dict[str, Any]:
    """A .safetensors file written by `save_safetensors` as {FORMAT_KEY: its config, "state_dict": tensors}
    (no pickle at all: tensors plus a JSON config in the file's metadata)."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(SAFETENSORS_META)
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{field}: {str(path)!r} is not a readable .safetensors file ({_first_line(err)}).") from None
    if meta is None:
        raise ValueError(f"{field}: {str(path)!r} has no '{SAFETENSORS_META}' metadata (a config); convert it with "
                         "python -m lit_fewstep convert, or export it from lit_fewstep.")
    try:
        return {FORMAT_KEY: json.loads(meta), "state_dict": state}
    except json.JSONDecodeError as err:
        raise ValueError(f"{field}: {str(path)!r} has unreadable '{SAFETENSORS_META}' metadata ({err}).") from None


def save_safetensors(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write {FORMAT_KEY: config, "state_dict": tensors} as .safetensors (atomic; the config as JSON metadata)."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in obj["state_dict"].items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        save_file(state, tmp, metadata={SAFETENSORS_META: json.dumps(obj[FORMAT_KEY])})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_weights(state: dict[str, Any], module: torch.nn.Module, where: str) -> None:
    """Shapes against the module, and finite values: a clear line instead of load_state_dict's text or NaN samples."""
    own = module.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where} holds {type(value).__name__} under {key!r} where a tensor belongs; re-export it.")
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{where} does not match the module it describes: {key!r} has shape {tuple(value.shape)} in the file "
                f"but {tuple(own[key].shape)} in the module; it was written by another version of the code or edited."
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where} holds non-finite weights (NaN/Inf in {key!r}); use an earlier checkpoint.")


def load_module(path: str | os.PathLike, trust: bool = False, field: str = "ckpt", opt_in: str | None = TRUST_FLAG,
                allow_modules: tuple[str, ...] | list[str] = ()):
    """Rebuild a lit_fewstep module from a checkpoint (Lightning .ckpt or exported .pt) with its weights.

    Every class path in the recorded config, nested ones included, must name a class of the expected kind
    defined in lit_fewstep or in `allow_modules` / $LIT_FEWSTEP_ALLOW_MODULES (a user's own method package;
    `utils.config.resolve_class`); `trust` lifts that rule and also allows pickle.
    """
    ckpt = load_checkpoint(path, trust=trust, field=field, opt_in=opt_in)
    where = f"{field}: {str(path)!r}"
    meta = ckpt.get(FORMAT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "config" not in meta or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{where} is not a lit_fewstep checkpoint (no '{FORMAT_KEY}' config); train or export it with lit_fewstep.")
    try:
        module = instantiate(meta["config"], trust=trust, base=LightningModule, allow_modules=allow_modules)
    except UnsafeClassPathError as err:
        raise UnsafeClassPathError(f"{where}: {err}.") from None
    module.data_config = meta.get("data")
    if hasattr(module, "prepare_state"):
        module.prepare_state(ckpt["state_dict"])  # e.g. frozen networks a later training stage made in memory
    _check_weights(ckpt["state_dict"], module, where)
    skip = tuple(getattr(module, "unsaved_prefixes", ()))
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    training_only = tuple(p for p in getattr(module, "training_only_prefixes", ())
                          if module._modules.get(p.rstrip(".")) is None)  # not built: nothing to load them into
    unexpected = [k for k in unexpected if not k.startswith(training_only)]
    optional = set(getattr(module, "optional_state_keys", ()))
    missing = [k for k in missing if not k.startswith(skip) and k not in optional]
    if missing and all(k.startswith(("ema.", "ema_")) for k in missing) and hasattr(module, "on_load_state_dict_without_ema"):
        module.on_load_state_dict_without_ema()  # an EMA-only export
        missing = []
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the module it describes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it was written by another version of the code."
        )
    return module


# mkstemp's names: ".<file name>.<8 random characters>.tmp" (see atomic_save); nothing else is ever removed.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write then rename, so a kill during the write never leaves a half-written file at `path`.

    The file gets the permissions of any file the user creates (0666 less the umask; mkstemp alone gives 0600).
    A failed write (disk full, no permission) raises one line naming the file; the previous file stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            torch.save(obj, tmp)
        except (RuntimeError, OSError) as err:
            raise OSError(
                f"could not write checkpoint {str(path)!r} ({_first_line(err)}); is the disk full or read-only? "
                "The previous file at that path, if any, is unchanged."
            ) from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that `atomic_save` left in `directory` when its process was killed mid-write."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
