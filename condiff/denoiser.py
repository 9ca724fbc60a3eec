"""The Denoiser contract: ``eps(x_t, t)`` and the Tweedie estimate ``x0(x_t, t)``.

Every sampler, guidance method and plug-and-play routine talks to a model only through this
interface, so a condiff network, a diffusers ``UNet2DModel`` or an analytic oracle drop in alike.
``t`` is the integer DDPM step as a ``(B,)`` long tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import checks
from .schedule import Schedule


class Denoiser(nn.Module):
    """Base class: subclasses implement :meth:`predict_eps`; ``nfe`` counts network calls."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.nfe = 0

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise ``eps_hat(x_t, t)``, same shape as ``x_t``."""
        self.nfe += 1
        return self.predict_eps(x_t, _as_t(t, x_t))

    def x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Tweedie: ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``."""
        return self.x0_from_eps(x_t, t, self.eps(x_t, t))

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = self.schedule.abar_at(_as_t(t, x_t), x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x_t) = -eps_hat / sqrt(1 - abar_t)``."""
        a = self.schedule.abar_at(_as_t(t, x_t), x_t)
        return -self.eps(x_t, t) / (1 - a).sqrt()

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps(x_t, t)


def _as_t(t: Tensor | int, x: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.tensor(int(t))
    t = t.to(device=x.device, dtype=torch.long)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class NetDenoiser(Denoiser):
    """Wraps a condiff epsilon-prediction network ``net(x, t, y=None)``.

    ``y`` (a ``(B,)`` long tensor of class labels) is fixed with :meth:`conditioned`.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, y: Tensor | None = None) -> None:
        super().__init__(schedule)
        self.net = net
        self.y = y

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        w = next(self.net.parameters(), None)
        if w is not None and x_t.dtype != w.dtype:
            raise ValueError(f"x_t is {x_t.dtype} but the network's weights are {w.dtype}; convert the input "
                             f"with x.to({w.dtype})")
        if self.y is None:
            return self.net(x_t, t)
        y = self.y.to(x_t.device)
        if y.shape[0] != x_t.shape[0]:
            raise ValueError(f"labels have batch {y.shape[0]} but x_t has batch {x_t.shape[0]}")
        return self.net(x_t, t, y)

    def conditioned(self, y: Tensor | None) -> NetDenoiser:
        """The same network with class labels ``y`` fixed (shares weights)."""
        return NetDenoiser(self.net, self.schedule, y)


class GaussianDenoiser(Denoiser):
    """Exact denoiser for data ``x0 ~ N(mean, std^2 I)``: an analytic oracle for tests.

    ``x_t ~ N(sqrt(a) m, (a s^2 + 1 - a) I)`` so ``E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) m)/(a s^2 + 1 - a)``.
    """

    def __init__(self, schedule: Schedule, mean: Tensor | float = 0.0, std: float = 1.0) -> None:
        super().__init__(schedule)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        if not bool(torch.isfinite(self.mean).all()):
            raise ValueError("GaussianDenoiser: mean must be finite")
        self.std = checks.number("GaussianDenoiser: std", std, ">= 0")

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        a = self.schedule.abar_at(t, x_t)
        var = a * self.std**2 + 1 - a
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mean.to(x_t)) / var


class DiffusersDenoiser(Denoiser):
    """Adapter: a diffusers ``UNet2DModel`` (+ its scheduler config) as a condiff denoiser.

    Handles the scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) by
    converting the output to epsilon.
    """

    def __init__(self, unet: nn.Module, scheduler_config: dict) -> None:
        super().__init__(Schedule.from_diffusers_config(scheduler_config))
        self.unet = unet
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x_t, t).sample
        if self.prediction_type == "epsilon":
            return out
        a = self.schedule.abar_at(t, x_t)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusersDenoiser:
        """Load a local diffusers model directory holding ``unet/`` (or the UNet itself) and a
        scheduler config (``scheduler/scheduler_config.json`` or ``scheduler_config.json``).

        Only safetensors weights are accepted; nothing is downloaded.
        """
        try:
            from diffusers import UNet2DModel
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("diffusers is not installed: pip install 'condiff[diffusers]'") from None
        import json

        path = Path(path)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
            if cand.is_file():
                sched_cfg = json.loads(cand.read_text())
                break
        else:
            raise FileNotFoundError(f"{path}: no scheduler_config.json (looked in scheduler/ and the top level)")
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
        return cls(unet.eval(), sched_cfg)
