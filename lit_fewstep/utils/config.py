"""Self-describing modules: every lit_fewstep class records the arguments it was built with.

A checkpoint then carries `{"class_path": ..., "init_args": {...}}` (nested for networks) instead of
pickled objects, so it loads with `torch.load(weights_only=True)` and rebuilds the module whether it
was built by the CLI, a YAML file or plain Python.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from typing import Any

__all__ = ["Configurable", "to_config", "instantiate", "resolve_class", "allowed_prefixes", "UnsafeClassPathError",
           "TRUSTED_PREFIXES", "ALLOW_MODULES_ENV"]

# Classes a checkpoint may name without an explicit opt-in (a class path is code that will run).
TRUSTED_PREFIXES = ("lit_fewstep.",)


class Configurable:
    """Mixin: after the outermost `__init__` returns, `self._init_args` holds the bound constructor arguments
    (defaults applied) and `init_config` the class path of the object's own class with them.

    The outermost `__init__` is the first one entered, whichever class defines it: a subclass that adds no
    `__init__` of its own (``class HingeDMD2(DMD2)`` overriding two losses) records its parent's arguments under
    its own class path, so it exports, reloads and samples like any method.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            outermost = not self.__dict__.get("_recording_init", False)
            if outermost:
                _check_plain_types(type(self), signature, signature.bind(self, *args, **kw).arguments)
                object.__setattr__(self, "_recording_init", True)
            try:
                init(self, *args, **kw)
            finally:
                if outermost:
                    object.__setattr__(self, "_recording_init", False)
            if outermost:
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


_PLAIN_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_plain_types(cls: type, signature: inspect.Signature, arguments: dict) -> None:
    """A value of the wrong plain type (a string where a number belongs, from a hand-written config or a Python
    call) is named here, instead of surfacing as a TypeError from inside torch. Only annotations that are plain
    int / float / bool / str (optionally `| None`) are checked; everything else is the method's business."""
    for name, value in list(arguments.items())[1:]:
        annotation = signature.parameters[name].annotation
        if not isinstance(annotation, str):
            annotation = getattr(annotation, "__name__", "")
        base, _, rest = annotation.partition(" | ")
        if base not in _PLAIN_TYPES or rest not in ("", "None") or (value is None and rest == "None"):
            continue
        wrong_bool = isinstance(value, bool) and base != "bool"
        if wrong_bool or not isinstance(value, _PLAIN_TYPES[base]):
            raise TypeError(f"{name}: {cls.__name__} expects {annotation}, got {value!r} ({type(value).__name__}); "
                            "fix that value in the config or call.")


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


class UnsafeClassPathError(ValueError):
    """A recorded config names something that is not a lit_fewstep class of the expected kind."""


def _refuse(class_path: Any, why: str) -> UnsafeClassPathError:
    return UnsafeClassPathError(f"config names class_path {class_path!r}, which was refused: {why}")


ALLOW_MODULES_ENV = "LIT_FEWSTEP_ALLOW_MODULES"


def allowed_prefixes(allow_modules: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """lit_fewstep, the packages given, and those in $LIT_FEWSTEP_ALLOW_MODULES (comma-separated): the modules
    whose classes a config may name without `trust` (your own method package, e.g. "mylab.methods")."""
    extra = [m.strip() for m in os.environ.get(ALLOW_MODULES_ENV, "").split(",") if m.strip()]
    return TRUSTED_PREFIXES + tuple(f"{m.rstrip('.')}." for m in (*allow_modules, *extra))


def resolve_class(class_path: Any, base: type = object, trust: bool = False,
                  allow_modules: tuple[str, ...] | list[str] = ()) -> type:
    """The class that `class_path` names, if it is safe to build.

    A class path is code that will run, so it resolves only to a *class* (never a function such as
    `os.system`) that is a subclass of `base`. Without `trust` the module part must be a `lit_fewstep`
    module (or one of `allow_modules` / $LIT_FEWSTEP_ALLOW_MODULES) and the class must be defined in one;
    the name is looked up only through classes (nested classes), never through attributes of a module that
    merely imports another one (`lit_fewstep.utils.checkpoint.os.system`). Allowing a module lets its
    classes be built; it does not allow pickle (that is `trust`).
    """
    if not isinstance(class_path, str) or not all(part.isidentifier() for part in class_path.split(".")):
        raise _refuse(class_path, "it is not a dotted Python name")
    parts = class_path.split(".")
    trusted = allowed_prefixes(allow_modules)
    if not trust and not class_path.startswith(trusted):
        package = parts[0] if len(parts) > 1 else class_path
        raise _refuse(class_path, f"it is outside lit_fewstep; if you trust the package that defines it, allow it "
                                  f"with --allow_module {package} (or {ALLOW_MODULES_ENV}={package}); pickle stays off")
    module = None
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a real module
        module_name = ".".join(parts[:cut])
        if not trust and not (module_name + ".").startswith(trusted):
            break
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                raise
    if module is None:
        raise _refuse(class_path, "no module of that name exists")
    obj: Any = module
    for name in parts[cut:]:
        obj = getattr(obj, name, None)
        if not inspect.isclass(obj):
            what = "does not exist" if obj is None else f"is a {type(obj).__name__}, not a class"
            raise _refuse(class_path, f"{name!r} {what}")
    if not trust and not (obj.__module__ + ".").startswith(trusted):
        raise _refuse(class_path, f"it is {obj.__module__}.{obj.__qualname__}, which is not defined in lit_fewstep "
                                  "or an allowed module")
    if not issubclass(obj, base):
        expected = "a configurable lit_fewstep module" if base is Configurable else f"a {base.__name__}"
        raise _refuse(class_path, f"{obj.__qualname__} is not {expected}")
    return obj


def instantiate(config: Any, trust: bool = False, base: type = object, nested_base: type = Configurable,
                allow_modules: tuple[str, ...] | list[str] = ()) -> Any:
    """Inverse of `to_config`: build nested `{"class_path", "init_args"}` dicts.

    The outermost class must be a subclass of `base`, every nested one (a network inside a method) of
    `nested_base`; each class path passes `resolve_class` before its class is built.
    """
    if isinstance(config, dict) and "class_path" in config:
        cls = resolve_class(config["class_path"], base, trust, allow_modules)
        init_args = config.get("init_args") or {}
        if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
            raise _refuse(config["class_path"], "its init_args are not a mapping of argument names")
        kwargs = {k: instantiate(v, trust, nested_base, nested_base, allow_modules) for k, v in init_args.items()}
        return cls(**kwargs)
    if isinstance(config, list):
        return [instantiate(v, trust, base, nested_base, allow_modules) for v in config]
    if isinstance(config, dict):
        return {k: instantiate(v, trust, base, nested_base, allow_modules) for k, v in config.items()}
    return config
