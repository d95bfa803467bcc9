"""EDM's CIFAR-10 networks (Karras et al. 2022): DDPM++ / NCSN++ (`SongUNet`), written here from the paper's and the
original score-SDE architecture descriptions, with module names chosen so that a state dict laid out as the official
`SongUNet` (NVlabs/edm, training/networks.py) loads key for key: ``map_noise`` / ``map_label`` / ``map_augment`` /
``map_layer0`` / ``map_layer1``, ``enc.<res>x<res>_{conv,down,block<i>,aux_down,aux_skip,aux_residual}``,
``dec.<res>x<res>_{in0,in1,up,block<i>,aux_norm,aux_conv,aux_up}``; inside a block ``norm0, conv0, affine, norm1,
conv1, skip, norm2, qkv, proj``; a convolution holds ``weight``, ``bias`` and, when it resamples, the persistent
buffer ``resample_filter`` [1, 1, k, k]; the Fourier embedding holds the buffer ``freqs``. (The layout was read
from the module and argument names that EDM's README and paper give; no NVlabs code is copied — it is under a
non-commercial licence.)

The net has the lit_fewstep interface ``net(x, noise_labels, class_labels=None, return_features=False)`` (EDM's
raw F: fed c_in x and c_noise = ln(sigma) / 4 by `PreconditionedNet(net, "edm")`), with EDM's one-hot class labels
built from integer labels here. `ddpmpp_cifar10()` / `ncsnpp_cifar10()` are the official CIFAR-10 settings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.config import Configurable

__all__ = ["SongUNet", "DhariwalUNet", "ddpmpp_cifar10", "ncsnpp_cifar10", "adm_imagenet64", "count_parameters"]


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class Linear(nn.Module):
    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _filter(taps) -> Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (f[:, None] * f[None, :] / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """k x k convolution (k = 0: none) with optional 2x up / down resampling by a separable FIR filter."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True, up: bool = False, down: bool = False,
                 resample_filter=(1, 1), fused_resample: bool = False, zero: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.up, self.down, self.fused_resample = up, down, fused_resample
        scale = 0.0 if zero else 1.0 / math.sqrt(max(cin * kernel * kernel, 1))
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) * scale) if kernel else None
        self.bias = nn.Parameter(torch.zeros(cout)) if kernel and bias else None
        if up or down:
            self.register_buffer("resample_filter", _filter(resample_filter))
        else:
            self.resample_filter = None

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        wp = w.shape[-1] // 2 if w is not None else 0
        fp = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                   padding=max(fp - wp, 0))
            x = F.conv2d(x, w, padding=max(wp - fp, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=wp + fp)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                       padding=fp)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=fp)
            if w is not None:
                x = F.conv2d(x, w, padding=wp)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5, num_groups: int = 32, min_channels_per_group: int = 4):
        super().__init__()
        self.num_groups = min(num_groups, channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Block(nn.Module):
    """Residual block: GN-SiLU-conv, + embedding (add or scale/shift), GN-SiLU-dropout-conv, skip, optional
    self-attention; both sums scaled by skip_scale."""

    def __init__(self, cin: int, cout: int, emb: int, up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None else cout // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(cin, eps)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb, cout * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(cout, eps)
        self.conv1 = Conv2d(cout, cout, 3, zero=True)
        self.skip = None
        if cout != cin or up or down:
            kernel = 1 if resample_proj or cout != cin else 0
            self.skip = Conv2d(cin, cout, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(cout, eps)
            self.qkv = Conv2d(cout, cout * 3, 1)
            self.proj = Conv2d(cout, cout, 1, zero=True)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            weights = torch.softmax(torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(q.shape[1])).float()), dim=2)
            a = torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v)
            x = (self.proj(a.reshape(b, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    def __init__(self, channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.channels, self.max_positions, self.endpoint = channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** freqs
        x = x.float()[:, None] * freqs[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()[:, None] * (2 * math.pi * self.freqs.float())[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(Configurable, nn.Module):
    """DDPM++ / NCSN++ of Song et al. 2021 as configured by EDM (arguments and defaults as EDM's `SongUNet`).

    Args:
        img_resolution, in_channels, out_channels: image size and channels.
        label_dim: number of classes (0: unconditional); integer labels become EDM's scaled one-hot vectors.
        augment_dim: augmentation-label dimension (9 for EDM's CIFAR-10 models, which were trained with it; the
            labels are zero at sampling, so only the layer's presence matters).
        model_channels, channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout: the UNet's width,
            per-level multipliers, embedding width multiplier, blocks per level, attention resolutions, dropout.
        embedding_type: "positional" (DDPM++) or "fourier" (NCSN++); channel_mult_noise: noise-embedding width.
        encoder_type: "standard" / "skip" / "residual" (NCSN++); decoder_type: "standard" / "skip".
        resample_filter: FIR taps, [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
    """

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, out_channels: int = 3, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: tuple = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: tuple = (16,), dropout: float = 0.1,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter: tuple = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier") or encoder_type not in ("standard", "skip", "residual") \
                or decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: unknown embedding/encoder/decoder type {embedding_type!r}/{encoder_type!r}/"
                             f"{decoder_type!r}.")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = int(label_dim)
        emb = model_channels * channel_mult_emb
        noise = model_channels * channel_mult_noise
        kw = dict(emb=emb, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(noise, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise))
        self.map_label = Linear(label_dim, noise) if label_dim else None
        self.map_augment = Linear(augment_dim, noise, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise, emb)
        self.map_layer1 = Linear(emb, emb)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, down=True, **kw)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter, fused_resample=True)
                    caux = cout
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, attention=res in attn_resolutions, **kw)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, attention=(i == num_blocks and res in attn_resolutions),
                                                          **kw)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, zero=True)
        self.feature_channels = model_channels * channel_mult[-1]

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                return_features: bool = False, augment_labels: Tensor | None = None, **unused):
        emb = self.map_noise(noise_labels.reshape(-1))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # sin first, then cos
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("class_labels: this SongUNet is class-conditional; pass labels.")
            onehot = F.one_hot(class_labels.long().clamp(0, self.num_classes - 1), self.num_classes).to(emb.dtype)
            onehot = onehot * (class_labels < self.num_classes)[:, None].to(emb.dtype)  # label num_classes = null
            emb = emb + self.map_label(onehot * math.sqrt(self.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, Block) else block(x)
                skips.append(x)
        features, aux, tmp = x, None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
                if name.endswith("_in1"):
                    features = x
        return (aux, features) if return_features else aux


def ddpmpp_cifar10(label_dim: int = 0, dropout: float = 0.13) -> SongUNet:
    """EDM's CIFAR-10 DDPM++ (VP): 128 channels, multipliers [2, 2, 2], 4 blocks, attention at 16, augment_dim 9."""
    return SongUNet(32, 3, 3, label_dim=label_dim, augment_dim=9, model_channels=128, channel_mult=(2, 2, 2),
                    dropout=dropout, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                    decoder_type="standard", resample_filter=(1, 1))


def ncsnpp_cifar10(label_dim: int = 0, dropout: float = 0.13) -> SongUNet:
    """EDM's CIFAR-10 NCSN++ (VE): Fourier embedding (x2 width), residual encoder, [1, 3, 3, 1] resampling."""
    return SongUNet(32, 3, 3, label_dim=label_dim, augment_dim=9, model_channels=128, channel_mult=(2, 2, 2),
                    dropout=dropout, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                    decoder_type="standard", resample_filter=(1, 3, 3, 1))


class DhariwalUNet(Configurable, nn.Module):
    """ADM of Dhariwal & Nichol 2021 as configured by EDM for ImageNet-64 (arguments and defaults as EDM's
    `DhariwalUNet`): scale/shift conditioning, 64 channels per attention head, class embedding added to the
    noise embedding. Official state-dict layout: ``map_noise, map_augment, map_layer0, map_layer1, map_label``,
    ``enc.<res>x<res>_{conv,down,block<i>}``, ``dec.<res>x<res>_{in0,in1,up,block<i>}``, ``out_norm``, ``out_conv``.
    """

    def __init__(self, img_resolution: int = 64, in_channels: int = 3, out_channels: int = 3, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: tuple = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: tuple = (32, 16, 8),
                 dropout: float = 0.1):
        super().__init__()
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = int(label_dim)
        emb = model_channels * channel_mult_emb
        kw = dict(emb=emb, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, down=True, **kw)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, attention=res in attn_resolutions, **kw)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, attention=res in attn_resolutions, **kw)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, zero=True)
        self.feature_channels = model_channels * channel_mult[-1]

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None,
                return_features: bool = False, augment_labels: Tensor | None = None, **unused):
        emb = self.map_noise(noise_labels.reshape(-1))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("class_labels: this DhariwalUNet is class-conditional; pass labels.")
            onehot = F.one_hot(class_labels.long().clamp(0, self.num_classes - 1), self.num_classes).to(emb.dtype)
            emb = emb + self.map_label(onehot * (class_labels < self.num_classes)[:, None].to(emb.dtype))
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, Block) else block(x)
            skips.append(x)
        features = x
        for name, block in self.dec.items():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
            if name.endswith("_in1"):
                features = x
        out = self.out_conv(F.silu(self.out_norm(x)))
        return (out, features) if return_features else out


def adm_imagenet64(dropout: float = 0.1) -> DhariwalUNet:
    """EDM's class-conditional ImageNet-64 ADM: 192 channels, [1, 2, 3, 4], 3 blocks, attention at 32/16/8."""
    return DhariwalUNet(64, 3, 3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                        attn_resolutions=(32, 16, 8), dropout=dropout)
