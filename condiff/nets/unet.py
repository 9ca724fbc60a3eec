"""A compact DDPM-style UNet for images and fields ``(B, C, H, W)``.

Levels ``i = 0 .. L-1`` run at ``H / 2**i`` with ``base * mults[i]`` channels. Each level has
``num_res`` ResBlocks (GroupNorm, SiLU, 3x3 conv, scale-shift time conditioning); the decoder
mirrors the encoder and concatenates one skip per ResBlock. With ``circular=True`` every 3x3 conv
pads periodically, so the net commutes with circular shifts by multiples of ``2**(L-1)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embed import LabelEmbedding, TimeEmbedding, batch_timesteps


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"UNet: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


class _Conv3(nn.Conv2d):
    """3x3 convolution, zero- or circular-padded, optionally strided."""

    def __init__(self, cin: int, cout: int, circular: bool, stride: int = 1) -> None:
        super().__init__(cin, cout, 3, stride=stride, padding=1,
                         padding_mode="circular" if circular else "zeros")


class _ResBlock(nn.Module):
    """``skip(x) + conv(silu(GN(h) * (1 + scale) + shift))`` with ``h = conv(silu(GN(x)))``.

    ``(scale, shift)`` come from the time (and label) embedding."""

    def __init__(
        self, cin: int, cout: int, emb_dim: int, groups: int, circular: bool, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = _Conv3(cin, cout, circular)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _Conv3(cout, cout, circular)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, residual, output projection zeroed."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.heads = ch // 32 if ch % 32 == 0 else 1
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class _Level(nn.Module):
    """One resolution: ResBlocks, each optionally followed by attention."""

    def __init__(self, chans: Sequence[tuple[int, int]], emb_dim: int, attn: bool, groups: int,
                 circular: bool, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(_ResBlock(a, b, emb_dim, groups, circular, dropout) for a, b in chans)
        self.attn = nn.ModuleList(_Attention(b, groups) for _, b in chans) if attn else None

    def forward(self, h: Tensor, emb: Tensor, skips: list[Tensor], decode: bool = False) -> Tensor:
        """Encoder levels push each block's output onto ``skips``; decoder levels pop one per block."""
        for j, block in enumerate(self.res):
            if decode:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
            if self.attn is not None:
                h = self.attn[j](h)
            if not decode:
                skips.append(h)
        return h


class UNet(nn.Module):
    """Epsilon network for images: ``forward(x (B, C, H, W), t (B,), y=None (B,)) -> (B, out, H, W)``.

    Args:
        in_channels, out_channels: image channels in and out (``out_channels`` defaults to ``in_channels``).
        base, mults: level ``i`` has ``base * mults[i]`` channels and runs at ``H / 2**i``; ``H`` and
            ``W`` must be divisible by ``2**(len(mults) - 1)``.
        num_res: ResBlocks per level (encoder and decoder each).
        attn_res: downsampling factors ``2**i`` of the levels that get self-attention (``1`` = full
            resolution, ``2**(len(mults)-1)`` = the bottleneck). Factors rather than pixel sizes keep
            the architecture independent of the input size.
        time_dim: width of the time embedding (default ``4 * base``).
        num_classes: if > 0, a label embedding with an extra null label (``y=None`` or ``-1``), for
            classifier-free guidance.
        circular: periodic padding in every 3x3 conv, for periodic fields.
        dropout: dropout inside the ResBlocks.
        groups: GroupNorm groups; must divide ``base`` and ``base * m`` for every ``m`` in ``mults``.

    The output conv starts at zero, so the untrained net predicts ``eps = 0``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base: int = 32,
        mults: Sequence[int] = (1, 2, 2),
        num_res: int = 1,
        attn_res: Sequence[int] = (),
        time_dim: int | None = None,
        num_classes: int = 0,
        circular: bool = False,
        dropout: float = 0.0,
        groups: int = 8,
    ) -> None:
        super().__init__()
        in_channels = _int("in_channels", in_channels, 1)
        out_channels = in_channels if out_channels is None else _int("out_channels", out_channels, 1)
        base, num_res = _int("base", base, 1), _int("num_res", num_res, 1)
        groups, num_classes = _int("groups", groups, 1), _int("num_classes", num_classes, 0)
        time_dim = 4 * base if time_dim is None else _int("time_dim", time_dim, 2)
        mults = [_int("mults[]", m, 1) for m in mults]
        if not mults:
            raise ValueError("UNet: mults must name at least one level")
        factors = [2**i for i in range(len(mults))]
        attn_res = sorted({_int("attn_res[]", r, 1) for r in attn_res})
        if bad := [r for r in attn_res if r not in factors]:
            raise ValueError(f"UNet: attn_res entries are downsampling factors, one of {factors}; got {bad}")
        chans = [base * m for m in mults]
        if bad := sorted({c for c in [base, *chans] if c % groups}):
            raise ValueError(f"UNet: channels {chans} and base {base} must be divisible by groups={groups}; "
                             f"{bad} are not")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"UNet: dropout must lie in [0, 1), got {dropout!r}")
        self.config = {
            "name": "unet", "in_channels": in_channels, "out_channels": out_channels, "base": base,
            "mults": mults, "num_res": num_res, "attn_res": attn_res, "time_dim": time_dim,
            "num_classes": num_classes, "circular": bool(circular), "dropout": float(dropout),
            "groups": groups,
        }
        self.in_channels, self.divisor = in_channels, factors[-1]
        block = dict(emb_dim=time_dim, groups=groups, circular=bool(circular), dropout=float(dropout))

        self.time = TimeEmbedding(base, time_dim)
        self.label = LabelEmbedding(num_classes, time_dim) if num_classes > 0 else None
        self.stem = _Conv3(in_channels, base, circular)

        self.down, self.downsample, skip_chans, ch = nn.ModuleList(), nn.ModuleList(), [], base
        for i, c in enumerate(chans):
            pairs = [(ch if j == 0 else c, c) for j in range(num_res)]
            self.down.append(_Level(pairs, attn=factors[i] in attn_res, **block))
            skip_chans += [c] * num_res
            ch = c
            if i < len(chans) - 1:
                self.downsample.append(_Conv3(c, c, circular, stride=2))

        self.mid1 = _ResBlock(ch, ch, **block)
        self.mid_attn = _Attention(ch, groups) if factors[-1] in attn_res else nn.Identity()
        self.mid2 = _ResBlock(ch, ch, **block)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            c, pairs = chans[i], []
            for _ in range(num_res):
                pairs.append((ch + skip_chans.pop(), c))
                ch = c
            self.up.append(_Level(pairs, attn=factors[i] in attn_res, **block))
            if i > 0:  # the conv after upsampling already narrows to the finer level's width: cheaper
                ch = chans[i - 1]
                self.upsample.append(_Conv3(c, ch, circular))

        self.out_norm = nn.GroupNorm(groups, base * mults[0])
        self.out = _Conv3(base * mults[0], out_channels, circular)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"UNet expects x of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            # (B, H, W, C), as image arrays often come: the last axis the channels, the two before it larger
            last = x.shape[3] == self.in_channels and min(x.shape[1], x.shape[2]) > self.in_channels
            hint = f": x of shape {tuple(x.shape)} looks channels-last; permute it to (B, C, H, W)" if last else ""
            raise ValueError(f"UNet was built for {self.in_channels} input channels, got {x.shape[1]}{hint}")
        for axis, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size < 1:
                raise ValueError(f"UNet: x has {axis} {size}; images need at least one pixel a side")
            if size % self.divisor:
                # the levels both sides allow: one more than the times both can be halved
                halvings = min((s & -s).bit_length() - 1 for s in x.shape[2:])
                fits = self.config["mults"][:halvings + 1]
                attn = [r for r in self.config["attn_res"] if r < 2 ** len(fits)]
                keep, flag = ("", "") if attn == self.config["attn_res"] else \
                    (f", attn_res={attn}", f" --set 'model.attn_res={attn}'")
                times = {1: "once", 2: "twice"}.get(len(self.down) - 1, f"{len(self.down) - 1} times")
                raise ValueError(
                    f"UNet with {len(self.down)} levels halves the image {times}, so its sides must be divisible "
                    f"by {self.divisor}; got {axis} {size}: a UNet for these images has {len(fits)} level"
                    f"{'s' * (len(fits) > 1)} (mults={fits}{keep}; training on the command line, --set "
                    f"'model.mults={fits}'{flag}), or the images are padded to a multiple of {self.divisor} (a trained "
                    "model: draw the size it was trained on)"
                )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self._check(x)
        emb = self.time(batch_timesteps(t, x.shape[0], x.device))
        if self.label is not None:
            emb = emb + self.label(y, x.shape[0])
        elif y is not None:
            raise ValueError("UNet was built with num_classes=0 but got labels y")
        emb = F.silu(emb)  # every consumer of emb starts with a Linear, so apply the SiLU once

        h, skips = self.stem(x), []
        for i, level in enumerate(self.down):
            h = level(h, emb, skips)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, level in enumerate(self.up):
            h = level(h, emb, skips, decode=True)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
