"""diffusers `UNet2DModel` teachers: a local folder (no downloads) on our paths with the scheduler's exact alpha-bar.

A diffusers DDPM / DDIM model is a network eps / v / x0 = F(x_k, k) trained on T discrete timesteps k = 0..T-1
with x_k = sqrt(alpha_bar_k) x + sqrt(1 - alpha_bar_k) z, alpha_bar_k = prod_{i<=k} (1 - beta_i) from its
scheduler config (`beta_schedule` linear / scaled_linear / squaredcos_cap_v2 or `trained_betas`; computed by
diffusers itself, so the table is bit-identical to the one `DDIMScheduler.step` uses).

Continuous time (`DiscreteVPPath`): t in [0, 1], t = (k + 1) / T at training step k, and t = 0 the clean data
(alpha_bar = 1, diffusers' `set_alpha_to_one` end of DDIM). Between grid points alpha_bar is linear in t, so the
path is exact at every training step, continuous and monotone; the network is fed the continuous timestep
label k = T t - 1, clamped to [0, T - 1] (below step 0, i.e. sigma < sigma_0, the label of step 0 is used with the
state's exact alpha_bar; above step T - 1 nothing is defined: keep a method's sigma_max <= the teacher's
`sigma_max`). A state on any other path reaches the teacher by equal log-SNR (`diffusion.paths.convert`).

`DiffusersUNet` is the network as a lit_fewstep net in EDM form (the raw F of `PreconditionedNet(net, "edm")`:
it is fed c_in(sigma) x and ln(sigma) / 4, and returns the F for which c_skip x + c_out F is the diffusers
model's x0), so every method uses it as it uses our own EDM teachers: as the real score, as the fake score's
initialisation and as the generator's architecture (a student of a diffusers teacher is a diffusers UNet).
`DiffusersTeacher` (what `load_diffusers_teacher` returns) is that `PreconditionedNet`, with `x0` / `x0_from`
computed from the state's log-SNR in float64 (the timestep label is exact at the grid points; the generic
route through ln(sigma) / 4 in float32 is only accurate to ~1e-4 of a timestep).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusion.paths import GaussianPath
from ..diffusion.precond import PreconditionedNet, edm_coefficients
from ..utils.config import Configurable

__all__ = ["DiscreteVPPath", "DiffusersUNet", "DiffusersTeacher", "load_diffusers_teacher", "diffusers_alphas_cumprod",
           "PREDICTION_TYPES", "SCHEDULERS", "save_diffusers", "find_diffusers_folders"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Schedulers whose training table is alpha_bar_k = prod (1 - beta_i) over T discrete steps (the DDPM family).
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
              "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
              "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler")


def _require_diffusers(what: str):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs the diffusers package: pip install 'lit_fewstep[diffusers]' "
                          "(or pip install diffusers).") from None
    return diffusers


def diffusers_alphas_cumprod(scheduler_config: dict) -> Tensor:
    """alpha_bar_k, k = 0..T-1, as diffusers computes it (float32, then float64 here) from a scheduler config."""
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: {name!r} is not supported; a diffusers teacher needs a discrete DDPM-family "
                         f"scheduler (alpha_bar from betas), one of {SCHEDULERS}.")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"scheduler: prediction_type {prediction!r} is not supported; choose one of {PREDICTION_TYPES}.")
    from diffusers import DDPMScheduler
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    config = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    try:
        table = DDPMScheduler(**config).alphas_cumprod
    except NotImplementedError as err:
        raise ValueError(f"scheduler: {err}") from None
    return table.double()


class DiscreteVPPath(GaussianPath):
    """The VP path of a discrete scheduler: a(t) = sqrt(alpha_bar(t)), b(t) = sqrt(1 - alpha_bar(t)).

    t = (k + 1) / T at training step k (alpha_bar exactly the scheduler's), t = 0 clean (alpha_bar = 1); alpha_bar
    is linear in t between these T + 1 points. `timestep(t)` is the network's label k = T t - 1 (unclamped).
    """

    name = "vp_discrete"

    def __init__(self, alphas_cumprod: Tensor):
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if table.numel() < 2 or not bool(((table[1:] <= table[:-1]).all() & (table[0] <= 1) & (table[-1] >= 0))):
            raise ValueError("alphas_cumprod: need a non-increasing table in [0, 1] with at least 2 steps.")
        self.T = table.numel()
        self.table = torch.cat([torch.ones(1, dtype=torch.float64), table])  # at t = 0, 1/T, ..., 1
        self.t_min, self.t_max = 1.0 / self.T, 1.0

    def _table(self, like: Tensor) -> Tensor:
        return self.table.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float64)

    def alpha_bar(self, t) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        table = self._table(t)
        pos = (t.clamp(0.0, 1.0) * self.T)
        lo = pos.floor().clamp(0, self.T - 1).long()
        frac = pos - lo.to(pos.dtype)
        return table[lo] + frac * (table[lo + 1] - table[lo])

    def _slope(self, t) -> Tensor:
        """d alpha_bar / d t on t's segment."""
        t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        table = self._table(t)
        lo = (t.clamp(0.0, 1.0) * self.T).floor().clamp(0, self.T - 1).long()
        return (table[lo + 1] - table[lo]) * self.T

    def a(self, t):
        return self.alpha_bar(t).sqrt()

    def b(self, t):
        return (1.0 - self.alpha_bar(t)).clamp_min(0.0).sqrt()

    def da(self, t):
        return self._slope(t) / (2.0 * self.a(t))

    def db(self, t):
        return -self._slope(t) / (2.0 * self.b(t))

    def log_snr(self, t):
        ab = self.alpha_bar(t)
        return 0.5 * (torch.log(ab) - torch.log1p(-ab))

    def t_from_alpha_bar(self, alpha_bar: Tensor) -> Tensor:
        """Inverse of `alpha_bar` (clamped to [0, 1]: beyond the last step the result is t = 1)."""
        table = self._table(alpha_bar)
        flipped = -table  # increasing
        idx = torch.searchsorted(flipped, -alpha_bar.contiguous(), right=True).clamp(1, self.T) - 1
        lo, hi = table[idx], table[idx + 1]
        frac = ((lo - alpha_bar) / (lo - hi).clamp_min(1e-300)).clamp(0.0, 1.0)
        return (idx.to(alpha_bar.dtype) + frac) / self.T

    def t_from_log_snr(self, log_snr):
        log_snr = torch.as_tensor(log_snr)
        return self.t_from_alpha_bar(torch.sigmoid(2.0 * log_snr))

    def timestep(self, t) -> Tensor:
        """The diffusers timestep label of time t: k = T t - 1 (step k at t = (k + 1) / T)."""
        return torch.as_tensor(t) * self.T - 1.0

    def __repr__(self) -> str:
        return f"DiscreteVPPath(T={self.T})"


def _plain(value):
    """JSON-able plain data of a diffusers config (FrozenDict, tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class DiffusersUNet(Configurable, nn.Module):
    """A diffusers `UNet2DModel` with its scheduler's table, as the raw network F of an EDM `PreconditionedNet`.

    Args:
        unet_config: the UNet2DModel config (its config.json as a dict).
        scheduler_config: the scheduler config (scheduler_config.json): `num_train_timesteps`, betas,
            `prediction_type` (epsilon / v_prediction / sample).
        sigma_data: sigma_d of the EDM preconditioning this net sits in (must equal the PreconditionedNet's).

    The state dict is ``unet.*``: exactly the diffusers model's keys under ``unet.``.
    """

    def __init__(self, unet_config: dict, scheduler_config: dict, sigma_data: float = 0.5):
        super().__init__()
        _require_diffusers("DiffusersUNet")
        from diffusers import UNet2DModel

        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        self.unet = UNet2DModel.from_config(config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.vp_path = DiscreteVPPath(diffusers_alphas_cumprod(scheduler_config))
        self.sigma_data = float(sigma_data)
        self.in_channels = int(self.unet.config.in_channels)
        size = self.unet.config.sample_size
        self.img_resolution = int(size if isinstance(size, int) else size[0])
        self.num_classes = int(self.unet.config.num_class_embeds or 0)
        self.feature_channels = int(self.unet.config.block_out_channels[-1])
        self._features: list[Tensor] = []
        if self.unet.mid_block is not None:
            self.unet.mid_block.register_forward_hook(self._capture)  # a bound method: deepcopy rebinds it

    def _capture(self, module, args, out) -> None:
        self._features.append(out)

    @property
    def num_train_timesteps(self) -> int:
        return self.vp_path.T

    def sigma_range(self) -> tuple[float, float]:
        """EDM sigma of the first and last training step: the range where the teacher is defined."""
        ab = self.vp_path.table[1:]
        return (float(((1 - ab[0]) / ab[0]).sqrt()), float(((1 - ab[-1]) / ab[-1].clamp_min(1e-300)).sqrt()))

    def run(self, x_vp: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None,
            return_features: bool = False):
        """x0 predicted from the VP state x_vp = sqrt(ab) x + sqrt(1 - ab) z ([B] alpha_bar, float64 is best)."""
        t = self.vp_path.t_from_alpha_bar(alpha_bar.double())
        label = self.vp_path.timestep(t).clamp(0.0, self.vp_path.T - 1.0).to(torch.float32)
        self._features.clear()
        out = self.unet(x_vp, label.to(x_vp.device), class_labels=class_labels if self.num_classes else None).sample
        features = self._features[-1] if self._features else None
        self._features.clear()
        shape = (-1,) + (1,) * (x_vp.ndim - 1)
        a = alpha_bar.double().sqrt().to(x_vp.dtype).reshape(shape)
        b = (1.0 - alpha_bar.double()).clamp_min(0.0).sqrt().to(x_vp.dtype).reshape(shape)
        if self.prediction_type == "epsilon":
            x0 = (x_vp - b * out) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_vp - b * out
        else:
            x0 = out
        return (x0, features) if return_features else x0

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                return_features: bool = False, **unused):
        """EDM raw F: x = c_in(sigma) x_sigma, noise_labels = ln(sigma) / 4 (see `PreconditionedNet`)."""
        if any(v is not None for v in unused.values()):
            raise ValueError(f"DiffusersUNet takes no {sorted(k for k, v in unused.items() if v is not None)} conditioning.")
        sigma = torch.exp(4.0 * noise_labels.double()).reshape(-1)
        c_skip, c_out, c_in, _ = edm_coefficients(sigma, self.sigma_data)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_sigma = x / c_in.to(x.dtype).reshape(shape)
        alpha_bar = 1.0 / (1.0 + sigma * sigma)
        out = self.run(x_sigma * alpha_bar.sqrt().to(x.dtype).reshape(shape), alpha_bar, class_labels, return_features)
        x0, features = out if return_features else (out, None)
        F = (x0 - c_skip.to(x.dtype).reshape(shape) * x_sigma) / c_out.to(x.dtype).reshape(shape)
        return (F, features) if return_features else F


class DiffusersTeacher(PreconditionedNet):
    """`PreconditionedNet(DiffusersUNet, "edm")` whose `x0` / `x0_from` go straight to the diffusers model.

    `path` is the EDM path (the preconditioning's, what a student built from `net` lives on); `vp_path` is the
    scheduler's own `DiscreteVPPath`; `prediction_type` the model's parameterization; `sigma_min` / `sigma_max`
    the EDM sigma of its first / last training step.
    """

    def __init__(self, net: DiffusersUNet, sigma_data: float | None = None):
        super().__init__(net, "edm", net.sigma_data if sigma_data is None else sigma_data)
        if self.sigma_data != net.sigma_data:
            raise ValueError(f"sigma_data: the DiffusersUNet was built for sigma_data={net.sigma_data}, not {self.sigma_data}.")
        self.vp_path = net.vp_path
        self.prediction_type = net.prediction_type
        self.sigma_lo, self.sigma_hi = net.sigma_range()

    def x0_from(self, x_t: Tensor, t: Tensor, path: GaussianPath, class_labels: Tensor | None = None, **cond) -> Tensor:
        t = self._times(t, x_t).double()
        if any(v is not None for v in cond.values()):
            raise ValueError(f"a diffusers teacher takes no {sorted(cond)} conditioning.")
        log_snr = path.log_snr(t)
        alpha_bar = torch.sigmoid(2.0 * log_snr)
        scale = (alpha_bar.sqrt() / path.a(t)).to(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return self.net.run(x_t * scale, alpha_bar, class_labels)

    def x0(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond) -> Tensor:
        return self.x0_from(x_t, t, self.path, class_labels=class_labels, **cond)


def find_diffusers_folders(path: str | os.PathLike, field: str = "teacher_ckpt") -> tuple[Path, dict]:
    """(UNet folder, scheduler config) of a local diffusers model: a pipeline folder (model_index.json, unet/,
    scheduler/) or a UNet folder (config.json) with scheduler_config.json in it or in ../scheduler/."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{field}: diffusers folder {str(root)!r} does not exist; give a local folder written "
                                "by save_pretrained (nothing is downloaded).")
    if not root.is_dir():
        raise NotADirectoryError(f"{field}: {str(root)!r} is a file; a diffusers teacher is a folder (config.json + "
                                 "weights, or a pipeline folder with unet/ and scheduler/).")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{field}: {str(root)!r} holds no UNet config.json (nor unet/config.json).")
    candidates = [root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
                  unet_dir.parent / "scheduler" / "scheduler_config.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{field}: no scheduler config next to the UNet in {str(root)!r} (looked for "
                                "scheduler/scheduler_config.json and scheduler_config.json); save the scheduler with "
                                "save_pretrained too.")
    unet_config = json.loads((unet_dir / "config.json").read_text())
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{field}: {str(unet_dir)!r} holds a {unet_config['_class_name']}; only UNet2DModel teachers "
                         "are supported.")
    return unet_dir, json.loads(found.read_text())


def load_diffusers_teacher(path: str | os.PathLike, sigma_data: float = 0.5, field: str = "teacher_ckpt") -> DiffusersTeacher:
    """A frozen `DiffusersTeacher` from a local diffusers folder (`from_pretrained(..., local_files_only=True)`)."""
    _require_diffusers(f"{field}: a diffusers teacher")
    from diffusers import UNet2DModel

    unet_dir, scheduler_config = find_diffusers_folders(path, field)
    diffusers_alphas_cumprod(scheduler_config)  # scheduler / prediction type errors before the weights load
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    net = DiffusersUNet(_plain(dict(unet.config)), _plain(scheduler_config), sigma_data)
    net.unet.load_state_dict(unet.state_dict())
    teacher = DiffusersTeacher(net)
    return teacher.requires_grad_(False).eval()


def save_diffusers(net: DiffusersUNet, out: str | os.PathLike) -> Path:
    """Write `net` back as a diffusers pipeline-style folder: unet/ (save_pretrained) and scheduler/."""
    out = Path(out)
    net.unet.save_pretrained(str(out / "unet"))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(net._init_args["scheduler_config"], indent=2))
    return out
