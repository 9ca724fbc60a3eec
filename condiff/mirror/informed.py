"""An inverse map told its constraint's reading (``finetune.informed``; not in the NAMM paper).

``f(y) = y + net([y, grad(l(y)^2 / 2) / s, l(y)])``: the inverse network gets, as extra input channels,
the constraint distance at its input (broadcast over the pixels) and the gradient of half its square
(scaled by a fixed ``s``, the gradient's standard deviation on up to 512 of the mirror samples it was
first fine-tuned on). It is still a map of mirror space alone (the distance is a fixed function), but it
need not learn from scratch which inputs are off the set and in which direction. On the count data,
with an inverse net large enough for the repair fine-tuned on 12,800 mirror samples, it measured
10.4x against the plain map's 9.3x, removing more of the extra sources; with the quick profile's
earlier 16-filter net on 2048 samples, 4x against 1.1x (docs/namm-count.md, ninth and tenth
looks). The gradient is of ``l^2 / 2``, not of
``l``, so that it fades on the set (a distance such as ``|count(x) - k|`` has a gradient of the
same size on and off it).

:meth:`InformedInverse.from_inverse` starts from a fitted inverse network (a
:class:`~condiff.nets.ResNetGenerator`) with the new channels' weights at zero, so the new map
computes exactly what the fitted one did until it is trained. The constraint is not one of the
map's weights: it is saved with neither the map nor its checkpoints, and a loaded map is given it
again (``load_mirror(path, constraint=...)``, or :meth:`InformedInverse.attach`). Copies of the
map share it, and moving the map (``.to``, ``.double()``) moves an attached network itself. Where ``y``
carries a gradient (mirror DPS differentiates through ``f``), the features are differentiated too
(second derivatives of ``l``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from condiff import checks
from condiff.constraints import device_of
from condiff.nets import register_net
from condiff.nets.resnet import ResNetGenerator


@register_net("informed")
class InformedInverse(nn.Module):
    """``forward(y (B, C, H, W)) -> (B, C, H, W)``: ``y + net(features(y))`` (``residual``) or
    ``net(features(y))``.

    Args:
        net: the inner :class:`~condiff.nets.ResNetGenerator`'s settings, with ``in_channels = 2 C + 1``
            and ``out_channels = C`` (its own ``residual`` off: the input is added here).
        scale: ``s``, what the gradient channel is divided by (> 0).
        residual: add ``y`` to the inner net's output.
    """

    def __init__(self, net: dict, scale: float = 1.0, residual: bool = True) -> None:
        super().__init__()
        if not isinstance(net, dict):
            raise TypeError(f"InformedInverse: net is the inner network's settings, a dict, got {type(net).__name__}")
        inner = dict(net)
        if inner.pop("name", "resnet") != "resnet":
            raise ValueError(f"InformedInverse: the inner network must be a 'resnet', got {net.get('name')!r}")
        if inner.get("residual", False):
            raise ValueError("InformedInverse: the inner network's own residual must be off (the input is added by "
                             "InformedInverse's residual)")
        inner["residual"] = False
        self.net = ResNetGenerator(**inner)
        c = self.net.config["out_channels"]
        if self.net.config["in_channels"] != 2 * c + 1:
            raise ValueError(f"InformedInverse: the inner network takes the image, the gradient and the distance "
                             f"(in_channels = 2 * {c} + 1 = {2 * c + 1}), got in_channels = "
                             f"{self.net.config['in_channels']}")
        self.channels, self.scale = c, checks.number("InformedInverse: scale", scale, "> 0")
        self.residual = bool(residual)
        self.config = {"name": "informed", "net": self.net.config, "scale": self.scale, "residual": self.residual}
        object.__setattr__(self, "_constraint", None)  # never a submodule: not trained, not saved

    @classmethod
    def from_inverse(cls, inverse: nn.Module, constraint: Any, y: Tensor) -> InformedInverse:
        """An informed map that computes what ``inverse`` (a fitted ResNetGenerator) computes, until trained;
        ``s`` is the gradient's standard deviation on (up to 512 of) the mirror samples ``y``."""
        if not isinstance(inverse, ResNetGenerator):
            raise ValueError(f"an informed inverse map starts from a 'resnet' inverse network (mirror.inverse.name), "
                             f"got {type(inverse).__name__}")
        cfg = dict(inverse.config)
        c = cfg["in_channels"]
        if cfg["out_channels"] != c:
            raise ValueError(f"an informed inverse map needs an inverse network with as many output channels as "
                             f"input channels, got {c} -> {cfg['out_channels']}")
        residual = cfg.pop("residual")
        cfg.update(in_channels=2 * c + 1, residual=False)
        p = next(inverse.parameters())
        # where the constraint's weights are (a weightless one: where y is), as fit.py's _probe does
        grad = _gradient(constraint, y[:512].to(device_of(constraint, y.device)), create_graph=False)[0]
        scale = float(grad.std())
        if scale == 0:
            raise ValueError("the constraint's gradient on the mirror samples is zero everywhere, so it cannot "
                             "inform the inverse map (finetune.informed)")
        if not math.isfinite(scale):
            raise ValueError(f"the constraint's gradient on the mirror samples is not finite (its spread: {scale}), "
                             "so it cannot inform the inverse map (finetune.informed)")
        new = cls(cfg, scale, residual).to(p.device, p.dtype)
        new.net.load_state_dict(_widened(inverse.state_dict(), new.net.state_dict()))
        return new.attach(constraint)

    def attach(self, constraint: Any) -> InformedInverse:
        """Give the map its constraint (a distance ``x -> (B,)``, e.g. the run's); returns the map."""
        if not callable(constraint):
            raise TypeError(f"InformedInverse.attach: the constraint is a distance x -> (B,), got "
                            f"{type(constraint).__name__}")
        object.__setattr__(self, "_constraint", constraint)  # (a Module set as usual would become a submodule)
        return self

    @property
    def constraint(self) -> Any:
        return self._constraint

    def _apply(self, fn, recurse=True):  # .to(device or dtype): an attached network goes along (itself, shared)
        super()._apply(fn, recurse)
        if isinstance(self._constraint, nn.Module):
            self._constraint._apply(fn, recurse)
        return self

    def __deepcopy__(self, memo: dict) -> InformedInverse:
        """A copy of the map that shares its constraint (the trainer's EMA copy, a saved map's copy): the
        constraint is read, never trained, and need not be copyable."""
        if self._constraint is not None:
            memo[id(self._constraint)] = self._constraint
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def features(self, y: Tensor) -> Tensor:
        """``[y, grad(l(y)^2 / 2) / s, l(y)]`` along the channels: ``(B, 2 C + 1, H, W)``."""
        if self._constraint is None:
            raise RuntimeError("this inverse map reads its constraint's distance (an informed inverse, "
                               "finetune.informed) but was not given it: load it with load_mirror(path, "
                               "constraint=...), or call mirror.inverse.attach(constraint)")
        if y.dim() != 4 or y.shape[1] != self.channels:
            raise ValueError(f"the informed inverse map expects (B, {self.channels}, H, W), got shape "
                             f"{tuple(y.shape)}")
        grad, dist = _gradient(self._constraint, y, create_graph=y.requires_grad and torch.is_grad_enabled())
        return torch.cat([y, grad / self.scale, dist.view(-1, 1, 1, 1).expand(-1, 1, *y.shape[2:])], 1)

    def forward(self, y: Tensor) -> Tensor:
        out = self.net(self.features(y))
        return y + out if self.residual else out


def _gradient(constraint: Any, y: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """``(grad(l(y)^2 / 2), l(y))``; with ``create_graph`` both stay differentiable in ``y``."""
    # (under inference mode the gradient would silently be zero: a different map)
    checks.gradients_on("the informed inverse map (its input features are the constraint's gradient)")
    with torch.enable_grad():
        yr = y if create_graph else y.detach().requires_grad_(True)
        dist = constraint(yr)
        grad = None
        if dist.requires_grad:  # (a distance constant in y has no gradient at all)
            (grad,) = torch.autograd.grad((0.5 * dist.square()).sum(), yr, create_graph=create_graph,
                                          allow_unused=True)
        grad = torch.zeros_like(y) if grad is None else grad
    return (grad, dist) if create_graph else (grad.detach(), dist.detach())


def _widened(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``old``'s tensors in ``new``'s shapes: where the new input channels make a tensor larger (the first
    convolution's weights, the global branch's mixing weights and statistics), ``old`` fills the leading
    part and the rest is zero for weights (the new inputs start unused) or ``new``'s own for statistics."""
    out = {}
    for k, t in new.items():
        o = old[k]
        if o.shape == t.shape:
            out[k] = o.clone()
            continue
        w = torch.zeros_like(t) if ("weight" in k or "bias" in k) else t.clone()
        w[tuple(slice(0, n) for n in o.shape)] = o
        out[k] = w
    return out
