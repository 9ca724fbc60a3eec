"""NAMM training objectives for the core :class:`condiff.train.Trainer`.

Mirror-map loss per batch (Feng et al., ICLR 2025), ``sigma ~ U(0, sigma_max)`` per sample and
``y = g(x) + sigma z``:

    L = l_cyc [0.5 mean|f(g(x)) - x| + 0.5 mean|g(f(y)) - y|] + l_con mean l(f(y)) + l_reg mean|grad Psi(x)|

The noise in mirror space teaches ``f`` to send a whole neighbourhood of the mirror data back onto
the constraint set, so imperfect generated mirror samples are still restored.

Fine-tuning trains ``f`` alone with the same loss, ``y = x_MDM + sigma z`` drawn around samples of the
mirror diffusion model, ``g`` frozen (its regulariser is then a constant and is left out). An optional
realism term ``l_adv mean softplus(-D(f(y)))`` (not in the paper) adds a small critic ``D`` trained
alongside to tell data from ``f(y)`` (non-saturating GAN loss, R1 penalty on the data), so that ``f``
cannot lower ``l`` with outputs unlike the data, such as the faint glow that a strong constraint
weight buys on the count data (docs/namm-count.md).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff import checks, io
from condiff.constraints import Distance, check_sign
from condiff.determinism import seeded
from condiff.mirror.map import MirrorMap
from condiff.readback import DeviceRows
from condiff.train import all_reduce_mean


@dataclass
class NAMMLoss:
    """Loss weights and mirror-space noise level (official values: brightness / count ``l_con = 0.01``,
    Burgers / periodic / divergence-free ``1.0``; ``sigma_max = 0.5`` for the flow data).
    ``l_adv``: weight of the realism term, fine-tuning only (0: off, as in the paper)."""

    l_cyc: float = 1.0
    l_con: float = 1.0
    l_reg: float = 1e-3
    sigma_max: float = 0.1
    l_adv: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> NAMMLoss:
        known = {f.name for f in fields(cls)}
        if bad := sorted(set(d) - known):
            raise ValueError(f"unknown NAMM loss option(s) {bad}; known: {sorted(known)}")
        return cls(**d)

    def __post_init__(self) -> None:
        """Checked however the weights were made (a negative ``l_con`` trains towards violating the set)."""
        for f in fields(self):
            setattr(self, f.name, checks.number(f"NAMM loss {f.name}", getattr(self, f.name), ">= 0"))


def _sigma_noise(shape: torch.Size, sigma_max: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """``sigma z`` with ``sigma ~ U(0, sigma_max)`` per sample and ``z ~ N(0, I)``: shape ``shape``."""
    dev = generator.device
    sigma = sigma_max * torch.rand(shape[0], generator=generator, device=dev)
    z = torch.randn(tuple(shape), generator=generator, device=dev)
    return (sigma.view(-1, *([1] * (len(shape) - 1))) * z).to(like)


def namm_terms(terms, x: Tensor, constraint: Distance) -> dict[str, Tensor]:
    """The three loss terms (scalars) from a :class:`MirrorTerms`."""
    return {
        "cyc": 0.5 * (terms.fgx - x).abs().mean() + 0.5 * (terms.gfy - terms.y).abs().mean(),
        "con": constraint(terms.fy).mean(),
        "reg": terms.grad_psi.abs().mean(),
    }


class _SignCheck:
    """The mean constraint terms of the steps since the trainer last read its losses, kept on the
    device; ``check`` (called by the trainer then) stops training at the first negative one (a
    distance is >= 0, and a sign error would otherwise let the loss fall without bound)."""

    # read after 1000 steps anyway: called outside a trainer, which would have read them by now
    _signs_every = 1000

    def logs(self, parts: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The terms, detached (read back only for the log lines); the constraint term is kept."""
        out = {k: v.detach() for k, v in parts.items()}
        self._signs.keep(out["con"], partial(_check_mean_sign, step))
        return out

    def check(self) -> None:
        self._signs.read()


def _check_mean_sign(step: int, row: list[float]) -> None:
    check_sign(torch.tensor(row), f"the mean constraint distance at step {step}")


def _total(parts: dict[str, Tensor], w: NAMMLoss) -> Tensor:
    return (w.l_cyc * parts["cyc"] + w.l_con * parts["con"] + w.l_reg * parts.get("reg", 0.0)
            + w.l_adv * parts.get("adv", 0.0))


def _batch(x: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator, device=generator.device)
    return x[idx.to(x.device)]


def check_fitting_loss(w: NAMMLoss) -> None:
    """Refuse loss weights the fitting of the mirror map cannot use: the realism term is fine-tuning's
    (``f`` sees only the data's own neighbourhood while the map is fitted)."""
    if w.l_adv > 0:
        raise ValueError("the realism term (l_adv) is for fine-tuning only; set it there (finetune.loss.l_adv)")


class NAMMObjective(_SignCheck):
    """Joint training of ``Psi`` and ``f`` (the model is a :class:`MirrorMap`) on data ``x`` (N, C, H, W)."""

    def __init__(
        self, x: Tensor, constraint: Distance, batch_size: int = 16, weights: NAMMLoss | None = None
    ) -> None:
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"NAMM needs non-empty image data (N, C, H, W), got shape {tuple(x.shape)}")
        checks.finite_rows("NAMM data", x)
        self.x, self.constraint = x, constraint
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.w = weights or NAMMLoss()
        self._signs = DeviceRows(self._signs_every)
        check_fitting_loss(self.w)

    def to(self, device: torch.device | str) -> NAMMObjective:
        self.x = self.x.to(device)
        if isinstance(self.constraint, nn.Module):
            self.constraint.to(device)
        return self

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = _batch(self.x, self.batch_size, generator)
        terms = model(x, _sigma_noise(x.shape, self.w.sigma_max, generator, x))
        parts = namm_terms(terms, x, self.constraint)
        return _total(parts, self.w), self.logs(parts, step)

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        model.psi.clamp_weights()  # keep Psi convex: W_k >= 0 and the output conv >= 0
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class Critic(nn.Module):
    """``(B, C, H, W) -> (B,)`` realism logits: a 3x3 convolution, two stride-2 4x4 convolutions
    (leaky ReLU 0.2), a spatial mean and a linear layer, so any image size of at least 4x4 works."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(2 * w, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean((2, 3)))[:, 0]


# The critic's recipe: Adam 2e-4 with beta1 = 0.5 (as the mirror map), R1 penalty gamma = 0.1 on the data
CRITIC = {"lr": 2e-4, "betas": (0.5, 0.999), "r1": 0.1, "width": 32, "seed": 0}


class FinetuneObjective(_SignCheck):
    """Train ``f`` alone (the model is the inverse network) on samples ``y_mdm`` of the mirror diffusion
    model, with ``g`` frozen. ``x`` are the training data, for the cycle term ``f(g(x)) - x``."""

    def __init__(
        self,
        mirror: MirrorMap,
        x: Tensor,
        y_mdm: Tensor,
        constraint: Distance,
        batch_size: int = 16,
        weights: NAMMLoss | None = None,
    ) -> None:
        if y_mdm.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"mirror samples have shape {tuple(y_mdm.shape[1:])} but the data {tuple(x.shape[1:])}"
            )
        if 0 in (len(x), len(y_mdm)):
            raise ValueError(f"fine-tuning needs data and mirror samples, got {len(x)} and {len(y_mdm)}")
        checks.weights_dtype("the data", x, mirror)
        checks.weights_dtype("the mirror samples", y_mdm, mirror)
        x, y_mdm = x.detach(), y_mdm.detach()  # fixed training data, whatever graph they came from
        if not bool(torch.isfinite(y_mdm).all()):
            raise ValueError("the mirror samples to fine-tune on hold NaN or inf values")
        # only its psi is used, frozen, in a copy: freezing the caller's map froze the very inverse network the
        # Trainer was given to train, which then stayed as it was, silently
        self.psi_map = copy.deepcopy(mirror).eval().requires_grad_(False)
        self.x, self.gx = x, mirror.to_mirror(x)
        reach, y_reach = float(self.gx.abs().max()), float(y_mdm.abs().max())
        if y_reach > 10 * max(reach, 1.0):
            warnings.warn(f"the mirror samples reach |y| = {y_reach:.3g} while the mirror data stay within "
                          f"{reach:.3g}: is the mirror diffusion model trained?", stacklevel=2)
        self.y_mdm, self.constraint = y_mdm, constraint
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.w = weights or NAMMLoss()
        self._signs = DeviceRows(self._signs_every)
        self.critic: Critic | None = None
        if self.w.l_adv > 0:
            with seeded(CRITIC["seed"]):
                self.critic = Critic(x.shape[1], CRITIC["width"])
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=CRITIC["lr"], betas=CRITIC["betas"])
        self._fake: Tensor | None = None
        self._real: Tensor | None = None

    def to(self, device: torch.device | str) -> FinetuneObjective:
        self.x, self.gx, self.y_mdm = self.x.to(device), self.gx.to(device), self.y_mdm.to(device)
        self.psi_map.to(device)
        if isinstance(self.constraint, nn.Module):
            self.constraint.to(device)
        if self.critic is not None:
            self.critic.to(device)
        return self

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.randint(
            0, self.x.shape[0], (self.batch_size,), generator=generator, device=generator.device
        )
        x, gx = self.x[idx.to(self.x.device)], self.gx[idx.to(self.x.device)]
        y0 = _batch(self.y_mdm, self.batch_size, generator)
        y = y0 + _sigma_noise(y0.shape, self.w.sigma_max, generator, y0)
        fgx, fy = model(torch.cat([gx, y])).chunk(2)
        gfy = self.psi_map.forward_map(fy, create_graph=True)
        parts = {
            "cyc": 0.5 * (fgx - x).abs().mean() + 0.5 * (gfy - y).abs().mean(),
            "con": self.constraint(fy).mean(),
        }
        if self.critic is not None:
            self.critic.requires_grad_(False)  # f's step must not leave gradients in the critic
            parts["adv"] = F.softplus(-self.critic(fy)).mean()
            self.critic.requires_grad_(True)
            # the critic's step (after f's, in after_step) sees these outputs against other data
            self._fake = fy.detach()
            self._real = _batch(self.x, self.batch_size, generator)
        return _total(parts, self.w), self.logs(parts, step)

    def after_step(self, model: nn.Module, step: int) -> dict[str, Tensor]:
        """One step of the critic (if any): non-saturating GAN loss and R1 on the data."""
        if self.critic is None or self._fake is None:
            return {}
        real = self._real.detach().requires_grad_(True)
        d_real = self.critic(real)
        (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        r1 = grad.pow(2).flatten(1).sum(1).mean()
        loss = (F.softplus(-d_real).mean() + F.softplus(self.critic(self._fake)).mean()
                + 0.5 * CRITIC["r1"] * r1)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.critic.parameters():  # one critic for all ranks, as for f
            if p.grad is not None:
                p.grad = all_reduce_mean(p.grad)
        self.critic_opt.step()
        self._fake = self._real = None
        return {"critic": loss.detach()}

    def state_dict(self) -> dict[str, Tensor]:
        if self.critic is None:
            return {}
        opt, meta = io.flatten_optimizer(self.critic_opt.state_dict())
        if meta["scalars"]:
            raise RuntimeError(f"the critic's optimizer holds non-tensor state {meta['scalars']}")
        return {**{f"critic.{k}": v for k, v in self.critic.state_dict().items()},
                **{f"critic_opt.{k}": v for k, v in opt.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        has = any(k.startswith("critic.") for k in state)
        if (self.critic is None) == has:
            raise ValueError(
                "this checkpoint was written " + ("with" if has else "without")
                + f" the realism term's critic, but this run has l_adv = {self.w.l_adv}"
            )
        if self.critic is None:
            return
        self.critic.load_state_dict({k[len("critic."):]: v for k, v in state.items() if k.startswith("critic.")})
        opt = {k[len("critic_opt."):]: v for k, v in state.items() if k.startswith("critic_opt.")}
        groups = self.critic_opt.state_dict()["param_groups"]
        self.critic_opt.load_state_dict(io.unflatten_optimizer(opt, {"param_groups": groups, "scalars": {}}))


@torch.no_grad()
def evaluate_terms(
    mirror: MirrorMap, x: Tensor, constraint: Distance, sigma_max: float, seed: int = 0
) -> dict[str, float]:
    """The NAMM loss terms on a fixed batch ``x`` with fixed noise (for tests and progress checks)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    with torch.enable_grad():  # g(x) needs autograd for grad Psi, but no graph is kept
        terms = mirror(x, _sigma_noise(x.shape, sigma_max, g, x))
        parts = namm_terms(terms, x, constraint)
    return {k: float(v) for k, v in parts.items()}
