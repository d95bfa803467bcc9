"""NVlabs EDM / EDM2 checkpoints into our `SongUNet` / `DhariwalUNet` / `EDM2UNet` and one safe file.

Sources:
- a state dict laid out as the official network's (``.pt`` read weights-only, or ``.safetensors``): EDM's
  ``EDMPrecond`` keys ``model.<SongUNet or DhariwalUNet keys>``, EDM2's ``Precond`` keys ``unet.<UNet keys>`` (+ the
  training-only ``logvar_fourier.*`` / ``logvar_linear.*``, dropped); bare network keys are accepted too. The
  architecture is named with ``arch`` (a preset of `ARCHS`) and ``label_dim``.
- the official ``.pkl`` (a pickle of NVlabs' persistence objects): only with ``trust=True``
  (``--trust_checkpoint true``). It is read with an unpickler that resolves only tensor rebuilding (storages
  weights-only), plain containers and torch.nn module classes, and rebuilds every other object (NVlabs' persistence
  records, whose embedded source is never run, or any other callable) as an inert record of its state; the
  architecture comes from the network's recorded constructor arguments. Convert once to
  .safetensors, then use that file.

The result is an `EDMDiffusion` teacher checkpoint (EDM preconditioning, sigma_data from the file or 0.5) written by
`utils.checkpoint.save_safetensors`; `to_official_state` turns our weights back into the official layout.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..utils.checkpoint import FORMAT_KEY, load_checkpoint, save_safetensors
from .edm import DhariwalUNet, SongUNet
from .edm2 import EDM2_SIZES, EDM2UNet

__all__ = ["ARCHS", "build_arch", "from_official_state", "to_official_state", "read_official_pkl",
           "load_official", "official_to_safetensors", "safetensors_to_official", "FAMILY_PREFIX"]

TEACHER_CLASS = "lit_fewstep.methods.diffusion.EDMDiffusion"
FAMILY_PREFIX = {"edm": "model.", "edm2": "unet."}

_SONG_DDPMPP = dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9, model_channels=128,
                    channel_mult=[2, 2, 2], embedding_type="positional", channel_mult_noise=1,
                    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], dropout=0.13)
_SONG_NCSNPP = dict(_SONG_DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                    resample_filter=[1, 3, 3, 1])
# preset -> (family, class, constructor arguments); label_dim is given separately
ARCHS = {
    "ddpmpp-cifar10": ("edm", SongUNet, _SONG_DDPMPP),
    "ncsnpp-cifar10": ("edm", SongUNet, _SONG_NCSNPP),
    "adm-imagenet64": ("edm", DhariwalUNet, dict(img_resolution=64, in_channels=3, out_channels=3, model_channels=192,
                                                 channel_mult=[1, 2, 3, 4], num_blocks=3,
                                                 attn_resolutions=[32, 16, 8], dropout=0.1)),
    **{f"edm2-img512-{size}": ("edm2", EDM2UNet, dict(img_resolution=64, img_channels=4, model_channels=channels,
                                                      dropout=dropout))
       for size, (channels, dropout) in EDM2_SIZES.items()},
}


def build_arch(arch: str, label_dim: int) -> tuple[str, nn.Module]:
    if arch not in ARCHS:
        raise ValueError(f"--arch: unknown architecture {arch!r}; choose one of {sorted(ARCHS)}.")
    family, cls, kwargs = ARCHS[arch]
    return family, cls(label_dim=label_dim, **kwargs)


def _strip(state: dict, family: str) -> dict:
    prefix = FAMILY_PREFIX[family]
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(("logvar_fourier.", "logvar_linear."))}


def from_official_state(net: nn.Module, state: dict, family: str, where: str = "SRC") -> nn.Module:
    """Load an official-layout state dict into our net (strict: every key and shape must match)."""
    state = _strip(state, family)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: not laid out as the official {type(net).__name__} of this --arch/--label_dim "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}).")
    net.load_state_dict(state, strict=True)
    return net


def to_official_state(net: nn.Module, family: str) -> dict:
    """Our weights in the official layout (EDMPrecond `model.*`, EDM2 Precond `unet.*`)."""
    return {FAMILY_PREFIX[family] + k: v for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------ official .pkl
class _Record:
    """An NVlabs object from a pickle, kept as data: its class name and its state (never its code)."""

    def __init__(self, *args, **kwargs):
        self.class_name, self.state = type(self).__name__, {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_state": state}


def _persistent(meta):
    record = _Record()
    record.class_name = str(meta.get("class_name", "")) if isinstance(meta, dict) else ""
    state = meta.get("state", {}) if isinstance(meta, dict) else {}
    record.state = state if isinstance(state, dict) else {}
    return record


def _storage_from_bytes(data: bytes):
    """torch's `storage._load_from_bytes` (a nested torch.load with pickle), weights-only."""
    return torch.load(io.BytesIO(data), weights_only=True)


_PLAIN = {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str",
                                    "bytes", "bytearray", "slice", "complex", "range")}
_PLAIN |= {("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("_codecs", "encode"),
           ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
           ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
           ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar")}


class _Unpickler(pickle.Unpickler):
    """Resolves only tensor rebuilding, plain containers, torch.nn module classes (rebuilt from their state, no code)
    and storages (weights-only); NVlabs' persistence records and every other class become inert `_Record`s."""

    def find_class(self, module, name):
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _persistent
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _PLAIN or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        if module.startswith("torch.nn.") and module.split(".")[2] in ("modules", "parameter"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, (nn.Module, nn.Parameter)):
                return obj
        return type(name, (_Record,), {})  # dnnlib.EasyDict, training.*, anything else: inert records


def _tensors(obj, prefix: str = "") -> dict:
    """The state dict of a module tree made of records and real modules."""
    if isinstance(obj, nn.Module):
        return {prefix + k: v for k, v in obj.state_dict().items()}
    state = obj.state if isinstance(obj, _Record) else {}
    out, skip = {}, set(state.get("_non_persistent_buffers_set", ()) or ())
    for key in ("_parameters", "_buffers"):
        for name, value in (state.get(key) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_tensors(child, f"{prefix}{name}."))
    return out


def read_official_pkl(path: str | os.PathLike, trust: bool = False) -> tuple[str, dict, dict]:
    """(family, constructor arguments of the network, official-layout state dict) of an NVlabs .pkl."""
    if not trust:
        raise ValueError(f"SRC: {os.fspath(path)!r} is a pickle (NVlabs .pkl); reading it runs the unpickler on the "
                         "file: only if you trust its source, pass --trust_checkpoint true (once; then use the "
                         ".safetensors file it writes).")
    with open(path, "rb") as f:
        data = _Unpickler(io.BytesIO(f.read())).load()
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, _Record):
        raise ValueError(f"SRC: {os.fspath(path)!r} holds no NVlabs network under 'ema'.")
    kwargs = dict(net.state.get("_init_kwargs") or {})
    kwargs.update({k: v for k, v in (net.state.get("init_kwargs") or {}).items()})
    if "img_resolution" not in kwargs:
        raise ValueError(f"SRC: {os.fspath(path)!r} holds no NVlabs network under 'ema' (no recorded constructor "
                         "arguments).")
    family = "edm2" if "unet" in (net.state.get("_modules") or {}) else "edm"  # EDM2 Precond.unet, EDMPrecond.model
    return family, kwargs, _tensors(net)


def _arch_from_kwargs(family: str, kwargs: dict) -> nn.Module:
    label_dim = int(kwargs.get("label_dim", 0))
    if family == "edm2":
        names = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
                 "attn_resolutions", "label_balance", "concat_balance", "dropout")
        return EDM2UNet(img_resolution=int(kwargs["img_resolution"]), img_channels=int(kwargs["img_channels"]),
                        label_dim=label_dim, **{k: kwargs[k] for k in names if k in kwargs})
    model_type = kwargs.get("model_type", "DhariwalUNet")
    cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}.get(model_type)
    if cls is None:
        raise ValueError(f"SRC: model_type {model_type!r} is not supported (SongUNet, DhariwalUNet).")
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "img_resolution", "in_channels",
                                                                 "out_channels", "label_dim"}
    extra = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k in allowed}
    channels = int(kwargs.get("img_channels", 3))
    return cls(img_resolution=int(kwargs["img_resolution"]), in_channels=channels, out_channels=channels,
               label_dim=label_dim, **extra)


def load_official(src: str | os.PathLike, arch: str | None = None, label_dim: int = 0,
                  trust: bool = False) -> tuple[str, nn.Module, float]:
    """(family, our network with the file's weights, sigma_data) from an official .pkl or official-layout file."""
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"SRC: {os.fspath(src)!r} does not exist.")
    if path.suffix == ".pkl":
        family, kwargs, state = read_official_pkl(path, trust)
        net = _arch_from_kwargs(family, kwargs)
        return family, from_official_state(net, state, family), float(kwargs.get("sigma_data", 0.5))
    if arch is None:
        raise ValueError("--arch: a state-dict file does not say its architecture; name it with --arch "
                         f"({sorted(ARCHS)}) and --label_dim.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_checkpoint(path, trust=trust, field="SRC")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    family, net = build_arch(arch, label_dim)
    return family, from_official_state(net, state, family), 0.5


def official_to_safetensors(src: str | os.PathLike, out: str | os.PathLike, arch: str | None = None,
                            label_dim: int = 0, trust: bool = False) -> Path:
    """Convert an EDM / EDM2 network into one .safetensors EDMDiffusion teacher (state keys ``model.net.*``)."""
    family, net, sigma_data = load_official(src, arch, label_dim, trust)
    config = {"class_path": TEACHER_CLASS, "init_args": {"net": net.init_config, "sigma_data": sigma_data}}
    state = {f"model.net.{k}": v for k, v in net.state_dict().items()}
    entry = {"config": config, "data": None, "version": 1, "source": {"format": family, "path": os.fspath(src)}}
    out = Path(out)
    save_safetensors({FORMAT_KEY: entry, "state_dict": state}, out)
    return out


def safetensors_to_official(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Our .safetensors teacher (from `official_to_safetensors`) back to an official-layout state dict
    (.safetensors: EDM ``model.*`` / EDM2 ``unet.*`` keys)."""
    from safetensors.torch import save_file

    from ..utils.config import instantiate

    ckpt = load_checkpoint(src, field="SRC")
    config = ((ckpt.get(FORMAT_KEY) or {}).get("config") or {}).get("init_args", {}).get("net")
    classes = {f"{c.__module__}.{c.__name__}": c for c in (SongUNet, DhariwalUNet, EDM2UNet)}
    if not isinstance(config, dict) or config.get("class_path") not in classes:
        raise ValueError(f"SRC: {os.fspath(src)!r} holds no SongUNet / DhariwalUNet / EDM2UNet teacher.")
    net = instantiate(config, base=nn.Module)
    prefix = next(p for p in ("model.net.", "G.net.", "student.net.") if any(k.startswith(p) for k in ckpt["state_dict"]))
    net.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    family = "edm2" if isinstance(net, EDM2UNet) else "edm"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_official_state(net, family).items()}, str(out))
    return out
