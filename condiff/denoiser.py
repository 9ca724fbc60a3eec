"""The Denoiser contract: ``eps(x_t, t)`` and the Tweedie estimate ``x0(x_t, t)``.

Every sampler, guidance method and plug-and-play routine talks to a model only through this
interface, so a condiff network, a diffusers ``UNet2DModel`` or an analytic oracle drop in alike.
``t`` is the integer DDPM step as a ``(B,)`` long tensor.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checks, io
from .nets.embed import check_labels_fit
from .schedule import Schedule, check_schedule


class Denoiser(nn.Module):
    """Base class: subclasses implement :meth:`predict_eps`; ``nfe`` counts network calls."""

    #: which space the samples lie in, where known: True for a NAMM mirror diffusion model (trained on g(x)),
    #: False for a NAMM run's vanilla model, None where nothing says (condiff.mirror.sample.check_space reads it)
    mirror_space: bool | None = None

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        check_schedule("a denoiser", schedule)
        self.schedule = schedule
        self.nfe = 0

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise ``eps_hat(x_t, t)``, same shape as ``x_t``."""
        self.__dict__["nfe"] += 1  # not through nn.Module.__setattr__, which costs more than a GPU kernel launch
        return check_prediction(self.predict_eps(x_t, _as_t(t, x_t, self.schedule)), x_t)

    def x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Tweedie: ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``."""
        return self.x0_from_eps(x_t, t, self.eps(x_t, t))

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        s, s1 = self.schedule.coefs(_as_t(t, x_t, self.schedule, lo=-1), x_t)  # t = -1: clean data, x0 = x_t
        return (x_t - s1 * eps) / s

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x_t) = -eps_hat / sqrt(1 - abar_t)``."""
        _, s1 = self.schedule.coefs(_as_t(t, x_t, self.schedule), x_t)
        return -self.eps(x_t, t) / s1

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.eps(x_t, t)


def trained_on(net: object) -> dict:
    """What a :class:`~condiff.train.Trainer` recorded on the network it trained (and its EMA copy): the
    per-sample ``shape`` and the data's ``value_range``, where known; empty for any other network."""
    seen = getattr(net, "trained_on", None)
    return dict(seen) if isinstance(seen, dict) else {}


def check_call(net: nn.Module, labelled: bool | None = False) -> None:
    """Refuse a network whose ``forward`` cannot be called as condiff calls it, ``net(x, t)`` (``net(x, t, y)``
    when ``labelled``; either when ``labelled`` is None, as for a net labels may condition later), before the
    first call fails inside torch."""
    try:
        sig = inspect.signature(net.forward)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to read
        return
    counts = (2, 3) if labelled is None else (3,) if labelled else (2,)
    for k in counts:
        try:
            sig.bind(*[None] * k)
            return
        except TypeError:
            pass
    call = "net(x, t, y) (noisy x, timesteps t, labels y)" if labelled else "net(x, t) (noisy x, timesteps t)"
    raise TypeError(f"condiff calls a denoising network as {call}, which returns the predicted noise; "
                    f"{type(net).__name__}.forward{sig} cannot take that") from None


def check_prediction(pred: Tensor, x_t: Tensor) -> Tensor:
    """``pred`` (a network's noise prediction), refused unless it has ``x_t``'s shape and dtype: a
    mismatch would broadcast silently (one output channel for three) or fail a step later, blaming the input.
    Under autocast (``torch.autocast`` on ``x_t``'s device) a lower-precision prediction is expected, and is
    returned in ``x_t``'s dtype."""
    if isinstance(pred, Tensor) and pred.shape == x_t.shape and pred.dtype != x_t.dtype:
        if pred.is_floating_point() and torch.is_autocast_enabled(x_t.device.type):
            return pred.to(x_t.dtype)
        raise ValueError(f"the network returns {pred.dtype} for input x_t of {x_t.dtype}: its weights or its "
                         f"output are of another dtype than the data")
    if not isinstance(pred, Tensor) or pred.shape != x_t.shape:
        got = f"{tuple(pred.shape)} {pred.dtype}" if isinstance(pred, Tensor) else f"a {type(pred).__name__}"
        raise ValueError(f"the network's prediction must match its input x_t, {tuple(x_t.shape)} {x_t.dtype}, "
                         f"got {got} (is the model's out_channels the data's channel count?)")
    return pred


def _as_t(t: Tensor | int, x: Tensor, schedule: Schedule, lo: int = 0) -> Tensor:
    """``t`` as a ``(B,)`` long tensor on ``x``'s device, checked to be whole steps in ``[lo, T)``
    (:meth:`Schedule.check_timesteps`, before a float ``t`` is cut to a whole one)."""
    if not isinstance(t, Tensor):
        t = torch.tensor(checks.integer("timestep t", t, lo, schedule.T))
    else:
        schedule.check_timesteps(t, lo)
    t = t.to(device=x.device, dtype=torch.long)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class NetDenoiser(Denoiser):
    """Wraps a condiff epsilon-prediction network ``net(x, t, y=None)``.

    ``y`` (class labels: one ``int`` for the whole batch, or a ``(B,)`` long tensor) is fixed with
    :meth:`conditioned`. ``guidance_scale`` ``w > 0`` gives classifier-free guidance (Ho & Salimans
    2022), ``eps = (1 + w) eps(x, t, y) - w eps(x, t, null)``, for a network trained with label drop;
    both predictions come from one batched call, counted as one network evaluation.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, y: Tensor | int | None = None,
                 guidance_scale: float = 0.0, label_drop: float | None = None,
                 value_range: Sequence[float] | None = None, sample_shape: Sequence[int] | None = None) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"NetDenoiser wraps a network, a torch.nn.Module net(x, t[, y]) -> noise, got "
                            f"{type(net).__name__}")
        super().__init__(schedule)
        self.label_drop = label_drop  # as trained, where known (load_denoiser reads it from the model)
        seen = trained_on(net)  # a Trainer's record, where the caller gives none
        value_range = seen.get("value_range") if value_range is None else value_range
        sample_shape = seen.get("shape") if sample_shape is None else sample_shape
        # the training data's [min, max], where known (load_denoiser reads it from the model): the guided
        # samplers' default clip of x0_hat (condiff.sample.default_clip)
        self.value_range = None if value_range is None else [float(v) for v in value_range]
        # the shape of one sample it was trained on, where known (load_denoiser reads it from the model): the
        # plug-and-play engine refuses to render pictures of another size for it
        self.sample_shape = None if sample_shape is None else tuple(int(v) for v in sample_shape)
        if isinstance(y, Tensor) and y.dim() == 0 and not y.is_floating_point() and y.dtype != torch.bool:
            y = int(y)  # one label for the whole batch, as an int is
        if y is not None and not isinstance(y, Tensor) and (isinstance(y, bool) or not isinstance(y, numbers.Integral)):
            raise ValueError(f"a class label must be an integer (or a (B,) long tensor), got {y!r}")
        check_call(net, labelled=True if y is not None else None)
        self.net = net
        self.y = y
        self.guidance_scale = checks.number("guidance_scale", guidance_scale, ">= 0")
        if self.guidance_scale > 0 and y is None:
            raise ValueError("classifier-free guidance (guidance_scale > 0) needs class labels y")
        if self.guidance_scale > 0 and label_drop == 0:
            raise ValueError("classifier-free guidance (guidance_scale > 0) needs a model trained with label_drop > 0; "
                             "this one never learned unconditional predictions")
        check_labels_fit(y, net)  # once, not at every call
        config = getattr(net, "config", None)
        classes = int(config.get("num_classes") or 0) if isinstance(config, dict) else 0
        self._y_on: Tensor | None = None  # y on the device of the last call
        # a labelled model trained without label drop, used without labels: said once, at its first call
        self._untrained_null = bool(classes) and y is None and label_drop == 0
        self.unconditional_hint = "condition it with .conditioned(label)"  # the CLI names its --label

    def _labels(self, x_t: Tensor) -> Tensor:
        if isinstance(self.y, Tensor):
            if self._y_on is None or self._y_on.device != x_t.device:  # a copy at every step would wait
                self._y_on = self.y.to(x_t.device)                       # for the device each time
            y = self._y_on
            if y.shape[0] != x_t.shape[0]:
                raise ValueError(f"labels have batch {y.shape[0]} but x_t has batch {x_t.shape[0]}")
            return y
        return torch.full((x_t.shape[0],), int(self.y), dtype=torch.long, device=x_t.device)

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        checks.weights_dtype("x_t", x_t, self.net, device=True)
        if self.y is None:
            if self._untrained_null:
                self._untrained_null = False
                warnings.warn(f"the model was trained on {self.net.config['num_classes']} labelled classes without "
                              "label drop, so its unconditional predictions were never trained: "
                              f"{self.unconditional_hint}", stacklevel=2)
            return self.net(x_t, t)
        y = self._labels(x_t)
        if self.guidance_scale == 0:
            return self.net(x_t, t, y)
        both = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]))
        cond, uncond = both.chunk(2)
        return (1 + self.guidance_scale) * cond - self.guidance_scale * uncond

    def conditioned(self, y: Tensor | int | None, guidance_scale: float = 0.0) -> NetDenoiser:
        """The same network with class labels ``y`` fixed (shares weights), optionally with
        classifier-free guidance of strength ``guidance_scale``."""
        return NetDenoiser(self.net, self.schedule, y, guidance_scale, self.label_drop, self.value_range,
                           self.sample_shape)


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
        out = (1 - a).sqrt() * (x_t - a.sqrt() * self.mean.to(x_t)) / var
        if out.shape != x_t.shape:
            raise ValueError(f"GaussianDenoiser: a mean of shape {tuple(self.mean.shape)} does not fit x_t of shape "
                             f"{tuple(x_t.shape)}")
        return out


# diffusers scheduler settings that would change the model's noise schedule or its sampler in a way
# condiff does not reproduce: refused rather than ignored
UNSUPPORTED_SCHEDULER = {
    "rescale_betas_zero_snr": "zero terminal SNR (abar_T = 0) breaks condiff's epsilon route to x0",
    "thresholding": "dynamic thresholding is not implemented (condiff clips x0_hat at clip_sample_range)",
}


class DiffusersDenoiser(Denoiser):
    """Adapter: a diffusers ``UNet2DModel`` (+ its scheduler config) as a condiff denoiser.

    Handles the scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) by
    converting the output to epsilon, and learned-variance UNets (``out_channels = 2 in_channels``,
    ``variance_type`` ``learned`` / ``learned_range``) by keeping the first half of the output.
    ``clip_x0`` is the scheduler's ``clip_sample_range`` when ``clip_sample`` is set, else None: the
    command line uses it as the default ``clip_x0``. condiff chooses its own timesteps (``spacing``)
    and ends every chain at clean data (``abar = 1``), whatever ``timestep_spacing``,
    ``steps_offset`` or ``set_alpha_to_one`` say.
    """

    def __init__(self, unet: nn.Module, scheduler_config: dict) -> None:
        if not isinstance(scheduler_config, dict) and isinstance(getattr(scheduler_config, "config", None), dict):
            scheduler_config = dict(scheduler_config.config)  # a diffusers scheduler object: its settings
        super().__init__(self.read_scheduler(scheduler_config))
        self.unet = unet
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.channels = self._check_unet(unet, scheduler_config)
        c = getattr(unet, "config", None) or {}
        self._in_channels = c.get("in_channels")  # what _check_input compares each x_t with
        self._halvings = max(len(c.get("down_block_types") or ()) or len(c.get("block_out_channels") or ()), 1) - 1
        clip = scheduler_config.get("clip_sample")
        self.clip_x0 = (checks.number("clip_sample_range", scheduler_config.get("clip_sample_range", 1.0), "> 0")
                        if clip else None)

    @staticmethod
    def read_scheduler(cfg: dict) -> Schedule:
        """The noise schedule of a diffusers scheduler config, after refusing settings condiff would ignore."""
        if not isinstance(cfg, dict):
            raise ValueError(f"the scheduler config must be a table of settings, got {type(cfg).__name__}")
        for key, why in UNSUPPORTED_SCHEDULER.items():
            if cfg.get(key):
                raise ValueError(f"the scheduler setting {key} = true is not supported: {why}")
        if cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {cfg['prediction_type']!r}")
        return Schedule.from_diffusers_config(cfg)

    @staticmethod
    def _check_unet(unet: nn.Module, scheduler_config: dict) -> int | None:
        """The number of output channels that are the prediction (None: all); refuses UNets that
        need inputs condiff does not give (class labels) or whose output is not one prediction."""
        c = getattr(unet, "config", None)
        if c is None:
            return None
        if c.get("num_class_embeds") is not None or c.get("class_embed_type") is not None:
            raise ValueError("class-conditional diffusers UNets (num_class_embeds / class_embed_type) are not "
                             "supported: condiff passes no class labels to them")
        cin, cout = c.get("in_channels"), c.get("out_channels")
        if cin is None or cout is None or cin == cout:
            return None
        learned = str(scheduler_config.get("variance_type", "")).startswith("learned")
        if learned and cout == 2 * cin:
            return int(cin)
        raise ValueError(f"the UNet has in_channels={cin} but out_channels={cout}: condiff needs one prediction "
                         f"per input channel (or 2x that with a learned-variance scheduler)")

    def _check_input(self, x_t: Tensor) -> None:
        """What the UNet would otherwise refuse deep inside diffusers: the rank, dtype, channels, and sides
        its downsampling stages cannot halve."""
        if x_t.dim() != 4:
            raise ValueError(f"x_t: a diffusers UNet takes images (B, C, H, W), got shape {tuple(x_t.shape)}")
        checks.weights_dtype("x_t", x_t, self.unet, device=True)
        if self._in_channels is not None and x_t.shape[1] != self._in_channels:
            raise ValueError(f"x_t has {x_t.shape[1]} channels but the UNet takes {self._in_channels}")
        f = 2 ** self._halvings
        if x_t.shape[-1] % f or x_t.shape[-2] % f:
            raise ValueError(f"x_t is {x_t.shape[-2]}x{x_t.shape[-1]} but the UNet halves its sides {self._halvings} "
                             f"time(s): height and width must be multiples of {f}")

    def predict_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        self._check_input(x_t)
        out = self.unet(x_t, t).sample
        if self.channels is not None:  # learned variance: the second half is the variance
            out = out[:, : self.channels]
        if self.prediction_type == "epsilon":
            return out
        s, s1 = self.schedule.coefs(t, x_t)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            return s * out + s1 * x_t
        return (x_t - s * out) / s1

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

        path = Path(path)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
            if cand.is_file():
                sched_cfg = io.read_json_table(cand)
                break
        else:
            raise FileNotFoundError(f"{path}: no scheduler_config.json (looked in scheduler/ and the top level)")
        if (unet_dir / "config.json").is_file():
            kind = io.read_json_table(unet_dir / "config.json").get("_class_name", "UNet2DModel")
            if kind != "UNet2DModel":
                raise ValueError(f"{unet_dir} holds a {kind}; only diffusers UNet2DModel models are supported")
        try:  # the scheduler settings, checked before the weights load
            cls.read_scheduler(sched_cfg)
        except ValueError as e:
            raise ValueError(f"{cand}: {e}") from None
        if not any(unet_dir.glob("*.safetensors")):  # diffusers would log its own line before failing
            found = sorted(p.name for p in unet_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            raise io.CheckpointError(f"{unet_dir}: no .safetensors weights" + (f" (found {', '.join(found)}: "
                                     "pickled weights are never loaded; convert them to safetensors)" if found else ""))
        # low_cpu_mem_usage=False: the default needs `accelerate` and prints a notice on every load without it
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                           low_cpu_mem_usage=False)
        return cls(unet.eval(), sched_cfg)

