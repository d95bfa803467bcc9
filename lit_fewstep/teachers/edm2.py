"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 2-3 and Fig. 21), written here from the paper's description: weights forced to unit norm per output
channel and scaled by 1/sqrt(fan-in) (MP-Conv), MP-SiLU = SiLU / 0.596, MP-Sum and MP-Cat with balances, pixel
normalisation on the encoder path, Fourier noise embedding with fixed frequencies and phases, learned gains
initialised to zero for the embedding and output layers, a constant channel of ones at the input, cosine attention.

Module names follow the official state dict (the ``unet.`` part of an EDM2 ``Precond`` network in NVlabs/edm2's
released files, whose names its paper's Fig. 21 and README use): ``emb_fourier.{freqs,phases}``,
``emb_noise.weight``, ``emb_label.weight``, ``out_gain``, ``enc.<res>x<res>_{conv,down,block<i>}``,
``dec.<res>x<res>_{in0,in1,up,block<i>}``, ``out_conv.weight``; inside a block ``emb_gain``, ``conv_res0``,
``emb_linear``, ``conv_res1``, ``conv_skip``, ``attn_qkv``, ``attn_proj`` (all ``.weight``, no biases). The
precondition's uncertainty head (``logvar_fourier``, ``logvar_linear``) is training-only and not part of this net.
No NVlabs code is copied (non-commercial licence).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.config import Configurable

__all__ = ["EDM2UNet", "edm2_img512", "EDM2_SIZES"]


def _normalize(x: Tensor, dim=None, eps: float = 1e-4) -> Tensor:
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


def _resample(x: Tensor, mode: str) -> Tensor:
    if mode == "keep":
        return x
    c = x.shape[1]
    f = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)  # the [1, 1] box filter
    if mode == "down":
        return F.conv2d(x, f, groups=c, stride=2)
    return F.conv_transpose2d(x, f * 4, groups=c, stride=2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel ()) = linear): unit-norm weights per output, times gain/sqrt(fan-in)."""

    def __init__(self, cin: int, cout: int, kernel: tuple = ()):
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():  # forced weight normalisation (EDM2 Sec. 3.3)
                self.weight.copy_(_normalize(w))
        w = _normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class MPFourier(nn.Module):
    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()[:, None] * self.freqs.float()[None, :] + self.phases.float()[None, :]
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, flavor: str = "enc", resample_mode: str = "keep",
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = cout, flavor, resample_mode
        self.num_heads = cout // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, (3, 3))
        self.emb_linear = MPConv(emb, cout)
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, (1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = _resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = _normalize(x, dim=[1])  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = _normalize(y, dim=[2]).unbind(3)
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", weights, v)
            x = mp_sum(x, self.attn_proj(y.reshape(b, ch, h, w)), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(Configurable, nn.Module):
    """EDM2's UNet (`Precond.unet`); the EDM preconditioning around it is `PreconditionedNet(net, "edm", 0.5)`.

    Args: img_resolution, img_channels (4: SD-VAE latents of ImageNet-512), label_dim, model_channels, channel_mult,
    channel_mult_noise / channel_mult_emb (None: the first / largest block width), num_blocks, attn_resolutions,
    label_balance, concat_balance, dropout (as the official UNet).
    """

    def __init__(self, img_resolution: int = 64, img_channels: int = 4, label_dim: int = 1000,
                 model_channels: int = 192, channel_mult: tuple = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: tuple = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, dropout: float = 0.0):
        super().__init__()
        self.img_resolution, self.in_channels, self.num_classes = img_resolution, img_channels, int(label_dim)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        kw = dict(dropout=dropout)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = MPBlock(cout, cout, cemb, "enc", "down", **kw)
            for i in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{i}"] = MPBlock(cin, cout, cemb, "enc", attention=res in attn_resolutions,
                                                            **kw)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = MPBlock(cout, cout, cemb, "dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = MPBlock(cout, cout, cemb, "dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = MPBlock(cout, cout, cemb, "dec", "up", **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{i}"] = MPBlock(cin, cout, cemb, "dec", attention=res in attn_resolutions,
                                                            **kw)
        self.out_conv = MPConv(cout, img_channels, (3, 3))
        self.feature_channels = cblock[-1]

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                return_features: bool = False, **unused):
        emb = self.emb_noise(self.emb_fourier(noise_labels.reshape(-1)))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError("class_labels: this EDM2UNet is class-conditional; pass labels.")
            onehot = F.one_hot(class_labels.long().clamp(0, self.num_classes - 1), self.num_classes).to(emb.dtype)
            onehot = onehot * (class_labels < self.num_classes)[:, None].to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.num_classes)), self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        features = x
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = block(x, emb)
            if name.endswith("_in1"):
                features = x
        out = self.out_conv(x, gain=self.out_gain)
        return (out, features) if return_features else out


# EDM2 paper Table 2 / official presets (ImageNet-512 latents): model_channels and dropout per size.
EDM2_SIZES = {"xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.10), "l": (320, 0.10), "xl": (384, 0.10),
              "xxl": (448, 0.10)}


def edm2_img512(size: str = "s") -> EDM2UNet:
    channels, dropout = EDM2_SIZES[size]
    return EDM2UNet(64, 4, 1000, model_channels=channels, dropout=dropout)
