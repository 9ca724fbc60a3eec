"""ResNet image-to-image generator (Johnson et al. 2016; CycleGAN's generator): NAMM's inverse map.

``7x7 conv -> downsamples x (stride-2 3x3 conv) -> blocks x residual block -> upsamples x
(nearest upsample + 3x3 conv) -> 7x7 conv``, a norm and ReLU between, channels doubling at each
downsample from ``base``. With ``residual=True`` the output is ``x + net(x)`` and the last conv
starts at zero, so the untrained generator is the identity.

``norm="instance"`` is the paper's (and CycleGAN's) choice. Instance norm removes each feature map's
mean and scale, so the correction ``net(x)`` cannot see the input's absolute level or amplitude;
constraints that depend on them (a total flux, the advection speed in Burgers' equation) need
``norm="none"``.

``context=True`` adds a global branch before the last conv: each feature map's spatial mean and the
input's own per-channel means (standardised by running statistics), through a linear layer, are
added back at every pixel. Without it a correction depends only on a window of the input (about
21 px across for the small nets), so an error in a sum over the whole image (a total flux) cannot
be seen, let alone spread as one offset over all pixels.

``skips=True`` (with ``downsamples > 0``) adds each resolution's features from the way down to the
output of the matching upsample (a U-Net's additive skips): the coarse levels see the whole image
while full-resolution detail does not have to pass the bottleneck.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import register_net

PADDING = ("circular", "reflect", "zeros")
NORMS = ("instance", "none")


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"ResNetGenerator: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _conv(cin: int, cout: int, k: int, padding: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode=padding)


def _norm(ch: int, norm: str) -> nn.Module:
    return nn.InstanceNorm2d(ch, affine=True) if norm == "instance" else nn.Identity()


def _norm_act(ch: int, norm: str) -> list[nn.Module]:
    return [_norm(ch, norm), nn.ReLU()]


class _Block(nn.Module):
    def __init__(self, ch: int, padding: str, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(ch, ch, 3, padding),
            *_norm_act(ch, norm),
            _conv(ch, ch, 3, padding),
            _norm(ch, norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Context(nn.Module):
    """``h + W [mean_{H,W}(h), z]``, broadcast over the pixels: a global view for a local net.

    ``z`` is the input's per-channel mean, standardised by running statistics (updated in training,
    used as they stand in both modes, so a batch of identical means is harmless). A correction linear
    in a global sum (a projection onto a fixed total) is then a few weights away; the raw mean would
    carry the same signal as a 0.3% ripple on a large constant, which Adam does not pick up in
    thousands of steps.
    """

    def __init__(self, ch: int, in_channels: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.mix = nn.Linear(ch + in_channels, ch)
        self.momentum = momentum
        self.register_buffer("x_mean", torch.zeros(in_channels))
        self.register_buffer("x_var", torch.ones(in_channels))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        m = x.mean((2, 3))
        if self.training:
            with torch.no_grad():
                # the first batch sets the statistics; later ones move them by `momentum`
                k = 1.0 if int(self.seen) == 0 else self.momentum
                self.x_mean.lerp_(m.mean(0), k)
                self.x_var.lerp_((m - self.x_mean).pow(2).mean(0), k)
                self.seen += 1
        z = (m - self.x_mean) / (self.x_var + 1e-12).sqrt()
        return h + self.mix(torch.cat([h.mean((2, 3)), z], 1))[:, :, None, None]


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, padding: str, norm: str) -> None:
        super().__init__()
        # upsample + conv instead of a transposed conv: no checkerboard, and it keeps circular padding
        self.conv = nn.Sequential(_conv(cin, cout, 3, padding), *_norm_act(cout, norm))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register_net("resnet")
class ResNetGenerator(nn.Module):
    """``forward(x (B, C, H, W)) -> (B, out_channels, H, W)``; ``H``, ``W`` divisible by ``2**downsamples``.

    Args:
        in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
        base: channels after the first conv (64 in the paper).
        blocks: residual blocks at the lowest resolution (6 in the paper).
        downsamples: stride-2 stages (2 in the paper).
        residual: add the input to the output (needs ``out_channels == in_channels``).
        padding: ``circular`` (periodic data), ``reflect`` or ``zeros``.
        norm: ``instance`` (the paper's) or ``none`` (keeps absolute levels visible; see the module doc).
        context: add the global branch (module doc) before the last conv.
        skips: add the features of each resolution on the way down to the way up (module doc).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base: int = 64,
        blocks: int = 6,
        downsamples: int = 2,
        residual: bool = True,
        padding: str = "circular",
        norm: str = "instance",
        context: bool = False,
        skips: bool = False,
    ) -> None:
        super().__init__()
        in_channels = _int("in_channels", in_channels, 1)
        out_channels = in_channels if out_channels is None else _int("out_channels", out_channels, 1)
        base, blocks, downsamples = (
            _int("base", base, 1),
            _int("blocks", blocks, 0),
            _int("downsamples", downsamples, 0),
        )
        if padding not in PADDING:
            raise ValueError(f"ResNetGenerator: padding must be one of {PADDING}, got {padding!r}")
        if norm not in NORMS:
            raise ValueError(f"ResNetGenerator: norm must be one of {NORMS}, got {norm!r}")
        if residual and out_channels != in_channels:
            raise ValueError(
                f"ResNetGenerator: residual=True needs out_channels == in_channels, "
                f"got {in_channels} -> {out_channels}"
            )
        self.config = {
            "name": "resnet",
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base": base,
            "blocks": blocks,
            "downsamples": downsamples,
            "residual": bool(residual),
            "padding": padding,
            "norm": norm,
        }
        if context:  # stored only when used, so older checkpoints' configs read the same
            self.config["context"] = True
        if skips:
            if downsamples == 0:
                raise ValueError("ResNetGenerator: skips=True needs downsamples >= 1")
            self.config["skips"] = True
        self.skips = bool(skips)
        self.in_channels, self.residual, self.divisor = in_channels, bool(residual), 2**downsamples
        layers: list[nn.Module] = [_conv(in_channels, base, 7, padding), *_norm_act(base, norm)]
        ch = base
        for _ in range(downsamples):
            layers += [_conv(ch, 2 * ch, 3, padding, stride=2), *_norm_act(2 * ch, norm)]
            ch *= 2
        layers += [_Block(ch, padding, norm) for _ in range(blocks)]
        for _ in range(downsamples):
            layers.append(_Up(ch, ch // 2, padding, norm))
            ch //= 2
        if context:
            layers.append(_Context(ch, in_channels))
        last = _conv(ch, out_channels, 7, padding)
        if residual:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def check_size(self, h: int, w: int) -> None:
        """Refuse ``h x w`` images the layers cannot take: sides not divisible by ``2**downsamples``,
        smaller than the first 7x7 convolution's padding can wrap or reflect, or a bottleneck too small
        to reflect-pad or to instance-normalise (torch would fail deep inside with its own message)."""
        down, pad = self.divisor.bit_length() - 1, self.config["padding"]
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"ResNetGenerator with {down} downsamples needs H and W divisible by {self.divisor}, "
                             f"got {h}x{w}")
        need = {"reflect": 4, "circular": 3, "zeros": 1}[pad]
        if min(h, w) < need:
            raise ValueError(f"ResNetGenerator: its first 7x7 convolution with {pad} padding needs images of at "
                             f"least {need}x{need}, got {h}x{w}")
        bh, bw = h // self.divisor, w // self.divisor
        if pad == "reflect" and min(bh, bw) < 2 or self.config["norm"] == "instance" and bh * bw < 2:
            why = "reflect-pad" if pad == "reflect" and min(bh, bw) < 2 else "instance-normalise"
            raise ValueError(f"ResNetGenerator: {down} downsamples take {h}x{w} images to {bh}x{bw}, too small to "
                             f"{why}; use fewer downsamples")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetGenerator expects (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        self.check_size(x.shape[2], x.shape[3])
        y, saved = x, []
        for layer in self.net:
            if self.skips and isinstance(layer, _Up):
                y = layer(y) + saved.pop()
                continue
            if self.skips and isinstance(layer, nn.Conv2d) and layer.stride == (2, 2):
                saved.append(y)
            y = layer(y, x) if isinstance(layer, _Context) else layer(y)
        return x + y if self.residual else y
