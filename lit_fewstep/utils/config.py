"""Self-describing modules: every lit_fewstep class records the arguments it was built with.

A checkpoint then carries `{"class_path": ..., "init_args": {...}}` (nested for networks) instead of
pickled objects, so it loads with `torch.load(weights_only=True)` and rebuilds the module whether it
was built by the CLI, a YAML file or plain Python.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

__all__ = ["Configurable", "to_config", "instantiate", "TRUSTED_PREFIXES"]

# Classes a checkpoint may name without an explicit opt-in (a class path is code that will run).
TRUSTED_PREFIXES = ("lit_fewstep.",)


class Configurable:
    """Mixin: after the outermost `__init__` returns, `self._init_config` holds the class path and
    the bound constructor arguments (defaults applied)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                init_args = {}
                for name, value in list(bound.arguments.items())[1:]:
                    kind = signature.parameters[name].kind
                    if kind == inspect.Parameter.VAR_KEYWORD:
                        init_args.update(value)
                    elif kind != inspect.Parameter.VAR_POSITIONAL:
                        init_args[name] = value
                object.__setattr__(self, "_init_args", init_args)

        cls.__init__ = recording_init

    @property
    def init_config(self) -> dict:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": to_config(getattr(self, "_init_args", {}))}


def to_config(value: Any) -> Any:
    """Plain-data form of a constructor argument (modules become nested class_path dicts)."""
    if isinstance(value, Configurable):
        return value.init_config
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_config(v) for k, v in value.items()}
    raise TypeError(
        f"cannot record constructor argument of type {type(value).__name__} in a checkpoint; "
        "pass plain values or lit_fewstep modules."
    )


def _import(class_path: str, trust: bool):
    if not trust and not class_path.startswith(TRUSTED_PREFIXES):
        raise ValueError(
            f"checkpoint names class {class_path!r} outside lit_fewstep; building it runs its code. "
            "If you trust the file, pass --trust_checkpoint true (trust=True)."
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError:
        # nested qualname such as pkg.module.Outer.Inner
        module_name, _, outer = module_name.rpartition(".")
        obj = getattr(importlib.import_module(module_name), outer)
    return getattr(obj, name)


def instantiate(config: Any, trust: bool = False) -> Any:
    """Inverse of `to_config`: build nested `{"class_path", "init_args"}` dicts."""
    if isinstance(config, dict) and "class_path" in config:
        cls = _import(config["class_path"], trust)
        kwargs = {k: instantiate(v, trust) for k, v in (config.get("init_args") or {}).items()}
        return cls(**kwargs)
    if isinstance(config, list):
        return [instantiate(v, trust) for v in config]
    if isinstance(config, dict):
        return {k: instantiate(v, trust) for k, v in config.items()}
    return config
