"""NAMM workflows on the core trainer: fit the mirror map, train a diffusion model on arrays,
fine-tune the inverse map. Each writes a run directory (checkpoints, ``log.jsonl``) and resumes
from its newest checkpoint when asked.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from condiff import checks, io
from condiff.constraints import Distance, check_distance, device_of
from condiff.data import value_range
from condiff.denoiser import NetDenoiser
from condiff.determinism import seeded
from condiff.mirror.informed import InformedInverse
from condiff.mirror.map import MirrorMap, check_mirror, check_own_entries, save_mirror
from condiff.mirror.objective import FinetuneObjective, NAMMLoss, NAMMObjective
from condiff.mirror.sample import data_violation
from condiff.models import save_model
from condiff.nets import build_net
from condiff.schedule import Schedule, check_schedule
from condiff.train import DenoisingObjective, TrainConfig, Trainer, check_train_config, resumed_line

# Adam with beta1 = 0.5 at a constant 2e-4, batch 16, EMA 0.999 (as in the NAMM paper)
MIRROR_TRAIN = {
    "steps": 4000,
    "batch_size": 16,
    "lr": 2e-4,
    "betas": (0.5, 0.999),
    "warmup": 0,
    "lr_decay": "constant",
    "grad_clip": 10.0,  # loose: a guard against rare double-backprop spikes, not part of the recipe
    "ema_decay": 0.999,
    "ckpt_every": 500,
}


def _check_inputs(where: str, x: object, tcfg: object, weights: object = None, meta: dict | None = None) -> None:
    """The data (a finite floating-point tensor), the settings and, where given, the loss weights of a
    fitting function, checked before the constraint is tried on the data (which blamed it for NaN data)."""
    checks.finite_rows(f"{where}: the data x", x)
    check_train_config(where, tcfg)
    check_own_entries(where, meta)  # before training, not when the map is saved after it
    if weights is not None and not isinstance(weights, NAMMLoss):
        raise TypeError(f"{where}: weights are a NAMMLoss (NAMMLoss(l_con=1.0), or NAMMLoss.from_dict(d)), got "
                        f"{type(weights).__name__}")


def _probe(constraint: Distance, x: Tensor) -> None:
    """Check a constraint on two samples, on the device its weights live on."""
    check_distance(constraint, x[:2].to(device_of(constraint)))


def off_set_warning(v: dict, constraint: Distance) -> str:
    """What is said where training data do not meet ``constraint`` (``v``: :func:`data_violation`'s measure)."""
    return (f"the training data do not meet the constraint {constraint_entry(constraint)}: their median l "
            f"({v['median']:.3g}) is not well below that of structureless noise ({v['noise_median']:.3g}); a mirror "
            "map learns a set its data lie on, so check the constraint against the data")


def constraint_entry(constraint: Distance) -> dict:
    """What names a constraint in a stage's records: its ``config`` where it has a JSON one, else the
    callable's qualified name (a resume under another constraint is then refused)."""
    config = getattr(constraint, "config", None)
    if isinstance(config, dict) and io.json_safe(config):
        return config
    fn = constraint if hasattr(constraint, "__qualname__") else type(constraint)
    return {"callable": f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"}


def _trainer(
    model: nn.Module, objective, tcfg: TrainConfig, run_dir: str | Path | None, meta: dict, resume: bool
) -> Trainer:
    tr = Trainer(model, objective, tcfg, run_dir, meta)
    if resume and tr.resume():
        print(resumed_line(tr.step, tcfg.steps), file=sys.stderr)
    return tr


def check_fittable_inverse(inverse: dict) -> None:
    """Refuse an informed inverse's settings where a map is to be fitted: one is made from a fitted map."""
    if inverse.get("name") == "informed":
        raise ValueError("mirror.inverse.name = 'informed': an informed inverse map is made from a fitted one by "
                         "fine-tuning (finetune.informed = true; finetune_inverse(..., informed=True)), not fitted; "
                         "fit a 'resnet' inverse")


def build_mirror(
    shape: tuple[int, ...], psi: dict, inverse: dict, a: float = 0.9, seed: int = 0, saved_by: str | None = None
) -> MirrorMap:
    """A fresh mirror map for per-sample ``shape = (C, H, W)``; ``psi`` / ``inverse`` are net configs
    whose channel entries are filled in from ``shape``. ``saved_by``: what they were read from, where a net of
    one's own runs its file only if trusted (:func:`condiff.nets.build_net`)."""
    if not isinstance(shape, tuple | list | torch.Size) or len(shape) != 3 or not all(
            checks.is_integer(n, 1) for n in shape):
        raise ValueError(f"build_mirror: shape is one sample's (C, H, W), whole numbers >= 1, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    for what, cfg in (("psi", psi), ("inverse", inverse)):
        if not isinstance(cfg, dict):
            raise TypeError(f"build_mirror: {what} is a net's settings, a dict such as {{'name': "
                            f"'{'icnn' if what == 'psi' else 'resnet'}'}}, got {type(cfg).__name__}")
    seed = checks.seed("build_mirror: seed", seed)
    check_fittable_inverse(inverse)
    down = inverse.get("downsamples", 2) if inverse.get("name", "resnet") == "resnet" else 0
    down = checks.integer("mirror.inverse.downsamples", down, 0)
    if any(n % 2**down for n in shape[1:]):  # before a deep net is built
        raise ValueError(f"mirror.inverse.downsamples = {down} needs H and W divisible by {2**down}, "
                         f"got {shape[1]}x{shape[2]}")
    c = shape[0]
    with seeded(seed):  # seeded weights; the caller's random streams left as they were
        mirror = MirrorMap(
            build_net({**psi, "in_channels": c}, saved_by),
            build_net({**inverse, "in_channels": c, "out_channels": c}, saved_by), a,
        )
    if hasattr(mirror.inverse, "check_size"):  # before any training: the images must pass its layers
        mirror.inverse.check_size(int(shape[1]), int(shape[2]))
    return mirror


def fit_mirror_map(
    x: Tensor,
    constraint: Distance,
    mirror: MirrorMap,
    tcfg: TrainConfig,
    weights: NAMMLoss | None = None,
    run_dir: str | Path | None = None,
    meta: dict | None = None,
    resume: bool = False,
    check_data: bool = True,
) -> MirrorMap:
    """Train ``mirror`` (``Psi`` and ``f`` jointly) on data ``x`` (N, C, H, W); returns the EMA map.

    With ``run_dir`` the map is also saved to ``run_dir/mirror``. First a warning says where the data do not
    meet the constraint themselves (:func:`~condiff.mirror.data_violation`: the map learns a set its data lie
    on); ``check_data=False`` leaves that out where the caller has measured it already (``condiff namm fit``).
    """
    _check_inputs("fit_mirror_map", x, tcfg, weights=weights, meta=meta)
    check_mirror("fit_mirror_map", mirror)
    _probe(constraint, x)
    if check_data:
        v = data_violation(constraint, x, device=device_of(constraint))
        if not v["satisfied"]:
            warnings.warn(off_set_warning(v, constraint), stacklevel=2)
    weights = weights or NAMMLoss()
    meta = {"mirror": mirror.config, "loss": vars(weights), "constraint": constraint_entry(constraint), **(meta or {})}
    with seeded(tcfg.seed, tcfg.device):  # the global streams too (its checkpoints record them); the caller's kept
        tr = _trainer(mirror, NAMMObjective(x, constraint, tcfg.batch_size, weights), tcfg, run_dir, meta, resume)
        ema = tr.fit().eval()
    if run_dir is not None and tr.dist.main:
        save_mirror(
            Path(run_dir) / "mirror",
            ema,
            loss=vars(weights),
            steps=tr.step,
            train_seconds=round(tr.seconds, 2),  # every session's
            **(meta_extra(meta)),
        )
    return ema


def meta_extra(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("mirror", "inverse", "loss", "finetune")}


def train_diffusion(
    x: Tensor,
    net_cfg: dict,
    schedule: Schedule,
    tcfg: TrainConfig,
    run_dir: str | Path | None = None,
    meta: dict | None = None,
    resume: bool = False,
    seed: int = 0,
    saved_by: str | None = None,
    mirror_space: bool = False,
) -> NetDenoiser:
    """The core denoising objective on in-memory data ``x`` (the vanilla DM on data, the MDM on ``g(x)``).
    ``saved_by``: what ``net_cfg`` was read from, where a net of one's own runs its file only if trusted
    (:func:`condiff.nets.build_net`).

    With ``run_dir`` the EMA model is saved to ``run_dir/model`` (loadable with
    :func:`condiff.models.load_denoiser`). ``mirror_space``: ``x`` are mirror data ``g(x)``, and the saved
    model is recorded as a mirror DM, which ``load_denoiser`` then loads only with ``mirror_space=True``
    (its samples are data only once the inverse map takes them back).
    """
    if mirror_space:
        meta = {**(meta or {}), "stage": "mdm"}
    _check_inputs("train_diffusion", x, tcfg)
    if not isinstance(net_cfg, dict):
        raise TypeError(f"train_diffusion: net_cfg is the net's settings, a dict such as {{'name': 'unet'}}, got "
                        f"{type(net_cfg).__name__}")
    check_schedule("train_diffusion", schedule)
    seed = checks.seed("train_diffusion: seed", seed)
    with seeded(seed, tcfg.device):  # seeded weights (and dropout, on a GPU too); the caller's streams kept
        net = build_net(net_cfg, saved_by)
        meta = {"net": net.config, "schedule": schedule.config(), "shape": list(x.shape[1:]), **(meta or {})}
        tr = _trainer(net, DenoisingObjective(x, schedule, tcfg.batch_size), tcfg, run_dir, meta, resume)
        ema = tr.fit().eval()
    if run_dir is not None and tr.dist.main:
        save_model(
            Path(run_dir) / "model",
            ema,
            schedule,
            shape=list(x.shape[1:]),
            value_range=value_range(x),
            steps=tr.step,
            train_seconds=round(tr.seconds, 2),  # every session's
            **{k: v for k, v in (meta or {}).items() if k not in ("net", "schedule", "shape")},
        )
    den = NetDenoiser(ema, schedule, value_range=value_range(x), sample_shape=x.shape[1:])
    if mirror_space:  # (otherwise unknown: an MDM may be trained on g(x) without saying so)
        den.mirror_space = True  # (Denoiser.mirror_space)
    return den


def finetune_inverse(
    mirror: MirrorMap,
    x: Tensor,
    y_mdm: Tensor,
    constraint: Distance,
    tcfg: TrainConfig,
    weights: NAMMLoss | None = None,
    run_dir: str | Path | None = None,
    meta: dict | None = None,
    resume: bool = False,
    informed: bool = False,
) -> MirrorMap:
    """Fine-tune ``f`` on mirror-model samples ``y_mdm`` (forward map frozen); returns a new
    :class:`MirrorMap`: a copy of ``Psi``, unchanged, with the fine-tuned EMA inverse (saved to
    ``run_dir/mirror``). ``mirror`` itself is left as it was. ``informed``: fine-tune an inverse that is
    also given the constraint's distance and gradient at its input (:mod:`condiff.mirror.informed`),
    started from ``mirror``'s; an inverse that is informed already stays so, given ``constraint``."""
    _check_inputs("finetune_inverse", x, tcfg, weights=weights, meta=meta)
    check_mirror("finetune_inverse", mirror)
    checks.finite_rows("the mirror-model samples y_mdm", y_mdm)
    _probe(constraint, x)
    weights = weights or NAMMLoss()
    obj = FinetuneObjective(mirror, x, y_mdm, constraint, tcfg.batch_size, weights)  # freezes a copy of psi
    with seeded(tcfg.seed, tcfg.device):  # as fit_mirror_map (an informed map's new layers drawn in it too)
        if informed and not isinstance(mirror.inverse, InformedInverse):
            f = InformedInverse.from_inverse(mirror.inverse, constraint, y_mdm)
        else:
            f = copy.deepcopy(mirror.inverse)
            if isinstance(f, InformedInverse):
                f.attach(constraint)
        f = f.train().requires_grad_(True)
        # the inverse's settings too: a resume of an informed map with another gradient scale (another pool),
        # or of a plain one as informed, is refused naming them (Trainer.resume)
        meta = {"mirror": mirror.config, "inverse": f.config, "loss": vars(weights), "finetune": True,
                "constraint": constraint_entry(constraint), **(meta or {})}
        tr = _trainer(f, obj, tcfg, run_dir, meta, resume)
        f_ema = tr.fit().eval()
    out = MirrorMap(obj.psi_map.psi, f_ema, mirror.a).eval()  # the objective's frozen psi, on f's device
    if run_dir is not None and tr.dist.main:
        save_mirror(
            Path(run_dir) / "mirror",
            out,
            loss=vars(weights),
            steps=tr.step,
            finetune=True,
            train_seconds=round(tr.seconds, 2),  # every session's
            **meta_extra(meta),
        )
    return out
