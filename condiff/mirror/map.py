"""The neural approximate mirror map: ``g(x) = (1 - a) grad Psi(x) + a x`` and its learned inverse ``f``.

``Psi`` is an input-convex network (:class:`condiff.nets.ICNN`), so ``g`` is the gradient of the
``a``-strongly convex potential ``(1 - a) Psi(x) + a ||x||^2 / 2``: monotone and invertible
(``<g(x) - g(y), x - y> >= a ||x - y||^2``). ``f`` is any image-to-image network (a
:class:`condiff.nets.ResNetGenerator` by default) trained to invert ``g`` and to land on the
constraint set (:mod:`condiff.mirror.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from condiff import checks, io
from condiff.constraints import Distance
from condiff.mirror.informed import InformedInverse
from condiff.nets import build_net

FORMAT = "condiff-namm-mirror"


@dataclass
class MirrorTerms:
    """Everything one NAMM training step needs, from one forward pass (so DDP sees one call)."""

    gx: Tensor  # g(x)
    fgx: Tensor  # f(g(x))
    y: Tensor  # g(x) + sigma z
    fy: Tensor  # f(y)
    gfy: Tensor  # g(f(y))
    grad_psi: Tensor  # grad Psi(x)


class MirrorMap(nn.Module):
    """Forward map ``g`` (through ``psi``) and inverse ``f`` (``inverse``), with ``a`` in ``(0, 1)``."""

    def __init__(self, psi: nn.Module, inverse: nn.Module, a: float = 0.9) -> None:
        super().__init__()
        if not (isinstance(psi, nn.Module) and callable(getattr(psi, "clamp_weights", None))):
            raise TypeError("mirror map: psi must be an input-convex network, whose clamp_weights() keeps it convex "
                            f"(condiff.nets.ICNN, net name 'icnn'; a net of one's own convex by construction may "
                            f"define it as a no-op), got {type(psi).__name__}")
        if not isinstance(inverse, nn.Module):
            raise TypeError(f"mirror map: the inverse must be a network (a torch.nn.Module), got "
                            f"{type(inverse).__name__}")
        if not (checks.is_number(a) and 0.0 < float(a) < 1.0):
            raise ValueError(
                f"mirror map: a must lie in (0, 1) (strong convexity, and Psi must matter), got {a!r}"
            )
        self.psi, self.inverse, self.a = psi, inverse, float(a)

    @property
    def config(self) -> dict:
        return {"psi": self.psi.config, "inverse": self.inverse.config, "a": self.a}

    @classmethod
    def from_config(cls, cfg: dict, saved_by: str | None = None) -> MirrorMap:
        """``saved_by``: what ``cfg`` was read from, where a net of one's own (``FILE.py:NAME``) runs only if
        its file is trusted (:func:`condiff.nets.build_net`)."""
        return cls(build_net(cfg["psi"], saved_by), build_net(cfg["inverse"], saved_by), cfg.get("a", 0.9))

    def grad_psi(self, x: Tensor, create_graph: bool | None = None) -> Tensor:
        """``grad Psi(x)``, same shape as ``x``.

        ``create_graph`` (default: whether autograd is on) keeps the graph so a loss on the result
        can be differentiated in ``x`` and in ``Psi``'s weights (double backprop).
        """
        create = torch.is_grad_enabled() if create_graph is None else create_graph
        with torch.enable_grad():
            # without a graph to keep, differentiate at a detached copy: an input that requires grad (or a
            # view of one made under no_grad, as to_mirror's batches are) is not ours to differentiate
            xr = x if (create and x.requires_grad) else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.psi(xr).sum(), xr, create_graph=create)
        return grad if create else grad.detach()

    def forward_map(self, x: Tensor, create_graph: bool | None = None) -> Tensor:
        """``g(x) = (1 - a) grad Psi(x) + a x``: data space -> mirror space."""
        checks.weights_dtype("x", x, self)
        return (1 - self.a) * self.grad_psi(x, create_graph) + self.a * x

    def inverse_map(self, y: Tensor) -> Tensor:
        """``f(y)``: mirror space -> data space (approximately onto the constraint set)."""
        checks.weights_dtype("y", y, self)
        return self.inverse(y)

    def forward(self, x: Tensor, noise: Tensor) -> MirrorTerms:
        """The NAMM training terms for data ``x`` and mirror-space perturbation ``noise = sigma z``."""
        grad_psi = self.grad_psi(x, create_graph=True)
        gx = (1 - self.a) * grad_psi + self.a * x
        y = gx + noise
        fgx, fy = self.inverse_map(torch.cat([gx, y])).chunk(2)  # one call: cheaper, and DDP-friendly
        gfy = self.forward_map(fy, create_graph=True)
        return MirrorTerms(gx, fgx, y, fy, gfy, grad_psi)

    @torch.no_grad()
    def to_mirror(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """``g`` on a whole data set, in batches, without a graph (each batch checked by :meth:`forward_map`)."""
        batch_size = checks.integer("to_mirror: batch_size", batch_size)
        if len(x) == 0:
            return x.new_empty(x.shape)  # g and f keep the shape
        dev = next(self.parameters()).device
        return torch.cat(
            [self.forward_map(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
        )

    @torch.no_grad()
    def to_data(self, y: Tensor, batch_size: int = 256) -> Tensor:
        """``f`` on a whole set of mirror-space points, in batches (checked by :meth:`inverse_map`)."""
        batch_size = checks.integer("to_data: batch_size", batch_size)
        if len(y) == 0:
            return y.new_empty(y.shape)
        dev = next(self.parameters()).device
        return torch.cat(
            [self.inverse_map(y[i : i + batch_size].to(dev)).cpu() for i in range(0, len(y), batch_size)]
        )


def save_mirror(path: str | Path, mirror: MirrorMap, **meta) -> Path:
    """Write a mirror map as a directory: ``config.json`` + ``model.safetensors`` (``meta`` recorded beside;
    a dtype other than float32 is recorded and restored by :func:`load_mirror`)."""
    check_mirror("save_mirror", mirror)
    check_own_entries("save_mirror", meta)
    return io.save_module(path, mirror, {"format": FORMAT, "mirror": mirror.config, **io.dtype_entry(mirror), **meta})


def check_own_entries(where: str, meta: dict | None) -> None:
    """Refuse ``meta`` entries a saved map writes itself (they would be replaced, or replace them)."""
    if taken := sorted({"format", "mirror", "dtype", "versions"} & set(meta or {})):
        raise ValueError(f"{where}: {', '.join(taken)} are the map's own entries; name your own otherwise")


def check_mirror(where: str, mirror: object) -> None:
    """Refuse anything but a :class:`MirrorMap` where one is expected, in one line."""
    if not isinstance(mirror, MirrorMap):
        raise TypeError(f"{where} needs a mirror map (a condiff.mirror.MirrorMap, e.g. from build_mirror or "
                        f"load_mirror), got {type(mirror).__name__}")


def load_mirror(path: str | Path, device: str | torch.device = "cpu",
                constraint: Distance | None = None) -> tuple[MirrorMap, dict]:
    """Rebuild a saved mirror map; returns ``(mirror, config)``. ``path``: the map's directory, or the
    ``run_dir`` :func:`~condiff.mirror.fit_mirror_map` wrote it into (its ``mirror/``). No code is unpickled.
    ``constraint``: given to an informed inverse (:class:`~condiff.mirror.informed.InformedInverse`), which
    reads it and does not save it; ignored by any other map."""
    checks.device("device", device)
    path = Path(path)
    if not (path / io.CONFIG).is_file() and (path / "mirror" / io.CONFIG).is_file():  # a fit's run_dir
        path = path / "mirror"
    if (path / "namm" / "mirror").is_dir():  # a `condiff namm fit` run: which map is the user's to say
        raise io.CheckpointError(f"{path} is a NAMM run; its maps are {path / 'namm' / 'mirror'} (fitted) and "
                                 f"{path / 'finetune' / 'mirror'} (fine-tuned, once made)")
    cfg = io.load_config(path)
    if cfg.get("format") != FORMAT:
        raise io.CheckpointError(f"{path} is not a NAMM mirror map (format {cfg.get('format')!r})")
    with io.reading_config(path):
        mirror = MirrorMap.from_config(cfg["mirror"], f"the mirror map at {path}").to(device)
    mirror = io.to_recorded_dtype(mirror, cfg, path)
    io.load_state_into(mirror, path)
    if constraint is not None and isinstance(mirror.inverse, InformedInverse):
        mirror.inverse.attach(constraint)
    return mirror.eval(), cfg
