"""The training loop: AdamW with warm-up, gradient clipping, EMA, atomic checkpoints, exact resume,
JSONL log, progress bar, and DistributedDataParallel under ``torchrun``.

What is optimised is an :class:`Objective`; the plain denoising loss is :class:`DenoisingObjective`.
Dual training and NAMM plug in their own objectives and reuse everything else.

Randomness: every step re-seeds one generator from ``(seed, step, rank)``, so a run resumed from a
checkpoint draws exactly the batches, timesteps and noise an uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checks, io
from .checks import check_setting
from .data import value_range
from .denoiser import check_call, check_prediction
from .nets.embed import check_labels_fit
from .sample import progress_bar
from .schedule import Schedule, check_schedule


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 128          # for objectives built from this config (CLI, NAMM); one given its own keeps it
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100
    lr_decay: str = "cosine"      # "cosine" (to 10%) or "constant" after warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ckpt_every: int = 1000
    keep: int = 2                  # checkpoints kept on disk
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict, section: str = "train") -> TrainConfig:
        """``section``: the settings table ``d`` came from, named in the errors (``finetune.steps``)."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            where = "" if section == "train" else f" in {section}"
            raise ValueError(f"unknown training option(s) {bad}{where}; known: {sorted(known)}")
        d = {k: check_setting(f"{section}.{f.name}", f.default, d[k])
             for f in fields(cls) if (k := f.name) in d}
        try:
            return cls(**d)
        except ValueError as e:  # named after the table the settings came from
            raise ValueError(str(e).replace("TrainConfig.", f"{section}.", 1)) from None

    def __post_init__(self) -> None:
        """The settings' kinds and ranges, checked however the config was made."""
        cfg, section = self, "TrainConfig"
        cfg.seed = checks.seed(f"{section}.seed", cfg.seed)
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "keep"):
            setattr(cfg, name, checks.integer(f"{section}.{name}", getattr(cfg, name), 1))
        cfg.warmup = checks.integer(f"{section}.warmup", cfg.warmup, 0)
        for name, within in (("lr", "> 0"), ("weight_decay", ">= 0"), ("grad_clip", "> 0"),
                             ("ema_decay", "[0, 1)")):
            setattr(cfg, name, checks.number(f"{section}.{name}", getattr(cfg, name), within))
        b = checks.pair(cfg.betas)
        if b is None or not all(0 <= v < 1 for v in b):
            raise ValueError(f"{section}.betas must be two numbers in [0, 1), got {cfg.betas!r}")
        cfg.betas = b
        if cfg.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"{section}.lr_decay must be 'cosine' or 'constant', got {cfg.lr_decay!r}")
        if not checks.is_device(cfg.device):
            raise ValueError(f"{section}.device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
        cfg.device = str(cfg.device)  # a torch.device too; the trainer reads it as a name
        if not isinstance(cfg.progress, (bool, np.bool_)):
            raise ValueError(f"{section}.progress must be true or false, got {cfg.progress!r}")
        cfg.progress = bool(cfg.progress)


class Objective(Protocol):
    """What a training step minimises. ``loss`` draws its own minibatch from ``generator``.

    The logs ``loss`` and ``after_step`` return may hold floats or 0-dim tensors; the trainer reads
    tensors back only for the records it writes (a read each step would wait for a GPU each step).
    An objective may also define ``check()``: the trainer calls it wherever it reads its own losses
    back (each step on the CPU, at log lines and before checkpoints elsewhere), for checks on values
    the objective kept on the device; it raises to stop training."""

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float | Tensor]]: ...

    def after_step(self, model: nn.Module, step: int) -> dict[str, float | Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...  # {}: the checkpoint holds none


def denoising_loss(net: Callable, schedule: Schedule, x0: Tensor, y: Tensor | None,
                   generator: torch.Generator | None, t: Tensor | None = None) -> Tensor:
    """Per-sample epsilon-MSE ``||eps - eps_theta(x_t, t)||^2 / n``, shape ``(B,)``.

    ``t`` defaults to uniform draws in ``[0, T)``; pass fixed timesteps for low-variance estimates.
    """
    B = x0.shape[0]
    gdev = x0.device if generator is None else generator.device
    if t is None:
        t = torch.randint(0, schedule.T, (B,), generator=generator, device=gdev).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=gdev).to(x0)
    x_t = schedule.add_noise(x0, eps, t)
    pred = check_prediction(net(x_t, t) if y is None else net(x_t, t, y), x_t)
    return (pred - eps).pow(2).flatten(1).mean(1)


def resumed_line(step: int, steps: int, extra: str = "") -> str:
    """What a resumed run says of where it goes on from (a finished one: that there is nothing left to train)."""
    if step >= steps:
        return (f"the run is already trained ({step} of {steps} steps{extra}): its model is saved again from the "
                "last checkpoint")
    return f"resumed from step {step} of {steps}{extra}"


def check_train_config(where: str, cfg: object) -> None:
    """Refuse training settings that are not a :class:`TrainConfig` (a dict, say), in one line."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{where} needs its training settings as a TrainConfig (TrainConfig(steps=...), or "
                        f"TrainConfig.from_dict(d) for a dict), got {type(cfg).__name__}")


class DenoisingObjective:
    """The DDPM objective on an in-memory dataset ``x`` (N, ...) with optional labels ``y``.

    ``label_drop``: probability of replacing a label by the null class (-1) so that one network
    learns both the conditional and the unconditional model (classifier-free guidance).
    """

    def __init__(self, x: Tensor, schedule: Schedule, batch_size: int, y: Tensor | None = None,
                 label_drop: float = 0.0) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"training data must be a non-empty (N, ...) tensor, got {shape}")
        checks.finite_rows("training data", x)
        check_schedule("DenoisingObjective", schedule)
        if y is not None and (not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point()):
            raise ValueError(f"labels y must be a ({x.shape[0]},) integer tensor, one per training sample, got "
                             + (f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, Tensor) else repr(y)))
        self.x, self.y, self.schedule = x, y, schedule
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.label_drop = checks.number("label_drop", label_drop, "[0, 1)")
        if self.label_drop > 0 and y is None:
            raise ValueError("label_drop drops labels for classifier-free guidance, but no labels y were given")

    def to(self, device: torch.device | str) -> DenoisingObjective:
        self.x = self.x.to(device)
        self.y = None if self.y is None else self.y.to(device)
        return self

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=generator,
                            device=generator.device).to(self.x.device)
        y = None if self.y is None else self.y[idx]
        if y is not None and self.label_drop > 0:
            drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device)
            y = torch.where(drop < self.label_drop, torch.full_like(y, -1), y)
        return self.x[idx], y

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x0, y = self.batch(generator)
        loss = denoising_loss(model, self.schedule, x0, y, generator).mean()
        return loss, {}

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


def all_reduce_mean(v: Tensor) -> Tensor:
    """``v`` averaged over the DDP ranks (a new tensor; ``v`` itself outside a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = v.clone()
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= dist.get_world_size()
    return v


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for one training step of one process."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 64)
    h ^= h >> 31
    return h % (1 << 63)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_joined = False  # whether init_distributed made the process group (the commands leave only that one)
GROUP_TIMEOUT: datetime.timedelta | None = None  # the group's collectives (None: torch's, 30 min gloo, 10 min NCCL)
# The wait at the end for rank 0's work after training (saving, sampling, scoring, plots) has a group of its own:
# with the training group's timeout, a rank 0 that sampled for longer failed the other ranks' exit barrier. A rank
# that fails ends the job anyway (torchrun stops the others), so this only bounds a hang.
EXIT_TIMEOUT = datetime.timedelta(hours=24)
_exit_group = None


def leave_process_group(only_joined: bool = False) -> None:
    """End a ``torchrun`` job's process group the way torch asks: every rank waits for the others (rank 0's
    saving and plotting after training, say), then leaves. Call it on every rank once all are done; a no-op
    outside a process group. A rank that exits without leaving, or while another is busy, can abort in the
    interpreter's teardown (SIGABRT) after its work is done. ``only_joined``: only a group that
    :func:`init_distributed` made (the condiff commands, when they succeed), not a caller's own."""
    global _joined, _exit_group
    if dist.is_available() and dist.is_initialized() and (_joined or not only_joined):
        dist.barrier(group=_exit_group)  # (None, for a caller's own group: its default group)
        dist.destroy_process_group()
        _joined, _exit_group = False, None


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):  # every process would take that one GPU (NCCL: "Duplicate GPU detected")
        raise ValueError(f"device {device} under torchrun: each of the {world} processes takes the GPU of its "
                         "local rank, so give the device as cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if device.startswith("cuda") and local >= torch.cuda.device_count():
        raise ValueError(f"process {local} of this machine needs its own GPU, but {torch.cuda.device_count()} "
                         "are visible: start at most that many processes per machine (torchrun "
                         "--nproc_per_node), or train on the CPU (--device cpu)")
    global _joined, _exit_group
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                **({"timeout": GROUP_TIMEOUT} if GROUP_TIMEOUT is not None else {}))
        _joined = True
        try:  # every rank makes it, here
            _exit_group = dist.new_group(backend="gloo", timeout=EXIT_TIMEOUT)
        except Exception as e:  # gloo's sockets on a host NCCL alone can run (the wrong network interface)
            warnings.warn(f"no gloo group for the wait at the end ({type(e).__name__}: {e}); the ranks wait for "
                          "rank 0 within the training group's timeout (set GLOO_SOCKET_IFNAME to the network "
                          "interface between the machines for a group of its own)", stacklevel=2)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local)
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


TRAINED_ON = ("shape", "value_range")  # the entries of a Trainer's meta that its nets carry as .trained_on


class Trainer:
    """Optimise ``model`` for ``objective`` with checkpoints in ``run_dir/checkpoints``.

    ``meta`` is stored in every checkpoint's ``config.json`` (net config, schedule, data) so a
    checkpoint alone is enough to rebuild the model (:func:`condiff.models.load_denoiser` loads
    ``run_dir/checkpoints/step_*``). Left out, it is the model's ``config``, the objective's
    ``schedule`` and its data's per-sample ``shape`` and ``value_range``, where they have them. Those two
    are also kept on the network (and its EMA copy) as ``.trained_on``, which :func:`condiff.models.save_model`
    and :class:`~condiff.denoiser.NetDenoiser` read where they are not given.
    """

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig,
                 run_dir: str | Path | None = None, meta: dict | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer trains a network, a torch.nn.Module, got {type(model).__name__}")
        if not callable(getattr(objective, "loss", None)):
            raise TypeError("Trainer needs an objective with a loss(model, step, generator) method (e.g. "
                            f"condiff.train.DenoisingObjective), got {type(objective).__name__}")
        check_train_config("Trainer", cfg)
        if isinstance(objective, DenoisingObjective):  # (other objectives call their model in their own way)
            check_call(model, labelled=objective.y is not None)
        checks.device("TrainConfig.device", cfg.device)
        data = getattr(objective, "x", None)
        if meta is None:
            meta = {}
            if isinstance(getattr(model, "config", None), dict) and io.json_safe(model.config):
                meta["net"] = model.config
            if hasattr(getattr(objective, "schedule", None), "config"):
                meta["schedule"] = objective.schedule.config()
            meta.update(io.dtype_entry(model))  # load_denoiser restores it, as for save_model's models
            if getattr(objective, "y", None) is not None and checks.is_number(getattr(objective, "label_drop", None)):
                meta["label_drop"] = float(objective.label_drop)  # a labelled model: whether it guides (CFG)
            if isinstance(data, Tensor) and data.is_floating_point() and data.dim() >= 2:  # what `condiff sample`
                meta["shape"], meta["value_range"] = list(data.shape[1:]), value_range(data)
        self.cfg, self.objective, self.meta = cfg, objective, meta
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if isinstance(data, Tensor) and data.is_floating_point():  # float64 data failed inside a float32 layer
            checks.weights_dtype("the training data", data, model)
        # once, before any step: a label the network cannot take (its null label's index, from data labelled
        # 1..K, or beyond) or labels for a network without classes
        check_labels_fit(getattr(objective, "y", None), model, "the training data's labels y")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters (requires_grad is off for all of them), so "
                             "training would change nothing; call model.requires_grad_(True)")
        self.dist = init_distributed(cfg.device)
        self.device = torch.device(
            f"cuda:{self.dist.local_rank}" if cfg.device == "cuda" and self.dist.world > 1 else cfg.device)
        self.model = model.to(self.device)
        # what the net was trained on, read by save_model and NetDenoiser where not given to them (the guided
        # samplers' default clip of x0_hat, the plug-and-play engine's picture size); the EMA copy inherits it
        self.model.trained_on = {k: meta[k] for k in TRAINED_ON if meta.get(k) is not None}
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # the tensors the EMA update pairs up, listed once: walking the modules at every step costs
        # 0.7 ms for the digits UNet (a twentieth of its step on an H200)
        self._ema_pairs = ((list(self.ema.parameters()), list(self.model.parameters())),
                           (list(self.ema.buffers()), list(self.model.buffers())))
        # fused: one kernel for all parameters (on the CPU the default is a Python loop per tensor); other
        # devices get torch's default
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay,
                                     fused=True if self.device.type in ("cpu", "cuda") else None)
        self.step = 0
        self.seconds = 0.0  # training time over every session of the run (kept in checkpoints)
        # the loss sum and step count since the last log line, kept in checkpoints so that a resumed
        # run writes the same log as an uninterrupted one
        self._log_acc: tuple[float, int] = (0.0, 0)
        if hasattr(objective, "to"):
            objective.to(self.device)
        if hasattr(objective, "warn_if_idle"):  # e.g. a dual objective whose first update comes after the end
            objective.warn_if_idle(cfg.steps)
        self.train_model: nn.Module = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.gen = torch.Generator(device=self.device)
        # Losses stay on the device and are read (and checked for non-finite values) once per log
        # interval and before each checkpoint: on a GPU a read each step waits for the device every
        # step (10% of a small model's step time on an H200). On the CPU a read costs nothing, so
        # there each loss is checked before its update.
        self.check_each_step = self.device.type == "cpu"

    # --- schedule ------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        if c.lr_decay == "constant":
            return c.lr
        p = (step - c.warmup) / max(1, c.steps - c.warmup)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))

    # --- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        if self.ckpt_root is None or not self.dist.main:
            return None
        opt_tensors, opt_meta = io.flatten_optimizer(self.opt.state_dict())
        groups = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optim": opt_tensors,
                  "rng": self._rng_states()}
        extra = self.objective.state_dict()
        if extra:
            groups["objective"] = extra
        config = {"step": self.step, "train": asdict(self.cfg), "optim": opt_meta,
                  "log_acc": list(self._log_acc), "train_seconds": round(self.seconds, 2), **self.meta}
        path = io.save_checkpoint(self.ckpt_root / f"step_{self.step:08d}", groups, config)
        for old in list_checkpoints(self.ckpt_root)[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def _rng_states(self) -> dict[str, Tensor]:
        """The global random streams a step draws from (a net's dropout): the CPU's, and the GPU's it trains on."""
        states = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def load(self, path: str | Path) -> dict:
        """Load the checkpoint at ``path`` into the model, EMA, optimiser, objective and RNG; returns its
        config.json."""
        path = Path(path)
        cfg = io.load_config(path)
        io.load_state_into(self.model, path, "model")
        io.load_state_into(self.ema, path, "ema")
        with io.reading_config(path):
            optim = io.unflatten_optimizer(io.load_group(path, "optim", self.device), cfg["optim"])
            self.opt.load_state_dict(optim)
            step = checks.integer("step", cfg["step"], 0)
            acc = cfg.get("log_acc") or (0.0, 0)  # absent in checkpoints written before it was kept
            log_acc = (float(acc[0]), int(acc[1]))
            seconds = float(cfg.get("train_seconds") or 0.0)  # absent before it was kept: counted from here
        # always called, with {} when the checkpoint holds no objective state, so that an objective
        # with state of its own can refuse a checkpoint written without it
        has = io.has_group(path, "objective")
        self.objective.load_state_dict(io.load_group(path, "objective", self.device) if has else {})
        rng = io.load_group(path, "rng")
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and self.device.type == "cuda":  # the GPU's dropout resumes exactly too
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.step, self._log_acc, self.seconds = step, log_acc, seconds
        return cfg

    def _differing(self, cfg: dict) -> list[str]:
        """The ``meta`` entries a checkpoint's config.json ``cfg`` records otherwise (those it lacks not compared)."""
        return [k for k, v in self.meta.items()
                if k in cfg and io.json_safe(v) and _code_apart(cfg[k])[0] != _code_apart(json.loads(json.dumps(v)))[0]]

    def _check_same_run(self, cfg: dict, path: Path) -> None:
        """Refuse a checkpoint (at ``path``, with config.json ``cfg``) written with other ``meta`` (another
        constraint, data range, network...): the weights may load, and training would go on, silently,
        towards another objective. Entries the checkpoint lacks (written before they were recorded) are not
        compared."""
        differ = self._differing(cfg)
        (_, was), (net, now) = _code_apart(cfg.get("net")), _code_apart(self.meta.get("net"))
        if was is not None and now is not None and was != now and "net" not in differ:
            warnings.warn(f"net file {str(net.get('name')).rpartition(':')[0]} was edited since the newest checkpoint, "
                          f"{path.name}: training goes on with the edited code", stacklevel=3)
        if differ:
            raise ValueError(f"the newest checkpoint, {path}, was written with other settings ({', '.join(differ)} "
                             "differ): resume with the settings it was made with, or start over (without resume, "
                             "or --fresh on the command line)")

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in ``run_dir``; False if there is none."""
        if self.ckpt_root is None:
            return False
        for leftover in self.ckpt_root.glob(".step_*"):  # a write killed half-way
            if self.dist.main:
                shutil.rmtree(leftover, ignore_errors=True)
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            return False
        # loaded first: its refusals of weights of another shape are the more precise
        try:
            loaded = self.load(ckpts[-1])
        except io.CheckpointDamaged as e:  # damaged outside condiff (its writes are atomic): name the way on
            if len(ckpts) < 2:
                raise
            raise io.CheckpointError(f"{e}; delete {ckpts[-1]} to resume from {ckpts[-2].name}") from None
        except io.CheckpointError as e:  # weights of another shape: say which recorded settings differ, if any
            if differ := self._differing(io.load_config(ckpts[-1])):
                raise io.CheckpointError(f"{e}; it was written with other settings ({', '.join(differ)} differ)") \
                    from None
            raise
        self._check_same_run(loaded, ckpts[-1])
        if self.step > self.cfg.steps:  # it would stop at once and save a model of more steps than asked
            raise ValueError(f"the newest checkpoint, {ckpts[-1].name}, is at step {self.step}, beyond the "
                             f"{self.cfg.steps} steps asked for: ask for at least {self.step} (train.steps), or "
                             "start over (--fresh on the command line; in Python, a new run_dir)")
        was = (loaded.get("train") or {}).get("steps")
        if (isinstance(was, int) and was != self.cfg.steps and self.step < self.cfg.steps
                and self.cfg.lr_decay != "constant" and self.dist.main):
            warnings.warn(f"the run was set for {was} steps and now goes on to {self.cfg.steps}: its learning rate "
                          f"now decays over {self.cfg.steps} steps, so the model will differ from one trained for "
                          f"{self.cfg.steps} steps from the start (exact resume holds for the same step count)",
                          stacklevel=2)
        if self.dist.main and self.run_dir is not None:  # drop log records the killed run wrote past it
            keep = [r for r in read_log(self.run_dir / "log.jsonl") if r.get("step", 0) <= self.step]
            io.write_text_atomic(self.run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in keep))
        return True

    # --- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        # one fused call per group rather than a kernel per tensor (a UNet has hundreds)
        (ema_p, model_p), (ema_b, model_b) = self._ema_pairs
        torch._foreach_lerp_(ema_p, model_p, 1 - d)
        if ema_b:
            torch._foreach_copy_(ema_b, model_b)

    def fit(self) -> nn.Module:
        """Train until ``cfg.steps``; returns the EMA model."""
        checks.gradients_on("Trainer.fit")
        cfg = self.cfg
        log = None
        if cfg.warmup > cfg.steps > max(1, self.step) and self.dist.main:  # said when training starts, not before
            warnings.warn(f"the learning-rate warm-up ({cfg.warmup} steps) is longer than the run ({cfg.steps} "
                          f"steps), so the learning rate never reaches {cfg.lr:g}: set a shorter warm-up "
                          "(TrainConfig.warmup; --set train.warmup=0 on the command line)", stacklevel=2)
        # a run from step 0 would prune its own checkpoints under higher ones of another run and overwrite the log.
        # Rank 0 looks (under torchrun it alone sets a --fresh aside) and tells the others, so that all stop together
        ahead = [c.name for c in list_checkpoints(self.ckpt_root) if _step_of(c) > self.step] if (
            self.step == 0 and self.ckpt_root is not None and self.dist.main) else []
        if self.dist.world > 1 and self.step == 0 and self.ckpt_root is not None:
            said = [ahead[-1] if ahead else None]
            dist.broadcast_object_list(said, src=0)
            ahead = [said[0]] if said[0] else []
        if ahead:
            raise FileExistsError(f"{self.run_dir} holds the checkpoints of another run (the newest {ahead[-1]}): "
                                  "call resume() first to go on from them (resume=True where a function takes it), "
                                  "or give an empty directory")
        if self.run_dir is not None and self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # from step 0 the log starts afresh (a run killed before its first checkpoint left lines)
            log = open(self.run_dir / "log.jsonl", "a" if self.step > 0 else "w")
        bar = progress_bar(cfg.steps, cfg.progress and self.dist.main and self.step < cfg.steps, unit="it",
                           desc="train", initial=self.step, leave=True)
        self.model.train()
        t0, pending, first, timed = time.perf_counter(), [], self.step, 0
        started, before = t0, self.seconds
        # the examples a step draws: the objective's own count where it has one (DualObjective: its data
        # and every constraint's), else its batch size (DenoisingObjective), which cfg.batch_size does not set
        per_step = getattr(self.objective, "examples_per_step", getattr(self.objective, "batch_size", None))
        per_step = per_step if isinstance(per_step, int) else cfg.batch_size
        own_checks = getattr(self.objective, "check", None) or (lambda: None)
        run_loss, seen = self._log_acc
        stop, prev_handler = self._defer_interrupt()
        try:
            while self.step < cfg.steps:
                self.gen.manual_seed(step_seed(cfg.seed, self.step, self.dist.rank))
                lr = self.lr_at(self.step)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                loss, logs = self.objective.loss(self.train_model, self.step, self.gen)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                # the step's loss and gradient norm, read with the others at the next check: a finite loss
                # can have a non-finite gradient, whose update would leave NaN weights for the next save
                # and the step's logged values, detached, to name a term gone bad (not the dict after_step adds to)
                pending.append((loss.detach(), gnorm.detach(),
                                {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}))
                if self.check_each_step:  # before the update
                    own_checks()  # first: a sign error in a term is the cause of a non-finite loss it leads to
                    run_loss += _finite_sum(pending, first)
                    pending, first = [], self.step + 1
                self.opt.step()
                logs.update(self.objective.after_step(self.model, self.step))
                self.step += 1
                self._ema_update()
                seen, timed = seen + 1, timed + 1
                if bar is not None:
                    bar.update(1)
                save = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop
                if pending and (save or self.step % cfg.log_every == 0):
                    own_checks()
                    run_loss += _finite_sum(pending, first)
                    pending, first = [], self.step
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, "loss": run_loss / seen, "lr": lr, "grad_norm": float(gnorm),
                           "samples_per_s": timed * per_step * self.dist.world / max(dt, 1e-9),
                           **{str(k): _loggable(v) for k, v in logs.items()}}
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.0f}",
                                        refresh=False)  # shown at the bar's own refresh (every 10 s in a log)
                    if log is not None:
                        log.write(json.dumps(io.no_nan(rec)) + "\n")  # a NaN grad norm: null
                        log.flush()
                    t0, seen, timed, run_loss = time.perf_counter(), 0, 0, 0.0
                if save:
                    self._log_acc = (run_loss, seen)
                    self.seconds = before + time.perf_counter() - started
                    self.save()
                if stop:
                    raise TrainingInterrupted(stop[0])
        finally:
            self.seconds = before + time.perf_counter() - started
            for signum, handler in prev_handler.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return self.ema

    def _defer_interrupt(self) -> tuple[list, dict]:
        """Ctrl-C (SIGINT) or SIGTERM while training finishes the current step, saves a checkpoint there
        (so ``--resume`` continues exactly) and then raises :class:`TrainingInterrupted`; a second
        signal acts at once. Only for a single process on the main thread (DDP ranks keep the default
        behaviour), and not for a signal the process ignores (a background job's SIGINT).
        Returns the flag list (non-empty once interrupted) and the handlers to restore."""
        stop: list = []
        if self.dist.world != 1 or threading.current_thread() is not threading.main_thread():
            return stop, {}
        prev = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is None or handler is signal.SIG_IGN:
                continue
            prev[signum] = handler

            def on_signal(got, frame, handler=handler):
                stop.append(got)
                signal.signal(got, handler)

            signal.signal(signum, on_signal)
        return stop, prev


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training, raised once the step in progress is finished and checkpointed;
    ``signum``: the signal that stopped it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.signum = int(signum)


def _finite_number(v: object) -> bool:
    """False for a logged value that is a float (as the log holds it, :func:`_loggable`) and not finite."""
    v = _loggable(v)
    return not isinstance(v, float) or math.isfinite(v)


def _loggable(v: object) -> object:
    """A logged value as log.jsonl holds it: a tensor or numpy value as a number (one element) or a list."""
    if isinstance(v, Tensor):
        v = v.detach().cpu()
    if isinstance(v, Tensor | np.ndarray | np.generic):
        return v.item() if (v.numel() if isinstance(v, Tensor) else v.size) == 1 else v.tolist()
    return v


def _finite_sum(rows: list[tuple[Tensor, Tensor, dict]], first: int) -> float:
    """The sum of the losses of steps ``first, first + 1, ...`` from their ``(loss, gradient norm, logs)``
    (stacked here, not per step, and read from the device once); a non-finite loss, or a non-finite
    gradient under a finite loss, stops training with the step it came from and the logged terms that
    were not finite there."""
    losses, gnorms, logs = zip(*rows)
    vals = torch.stack([torch.stack(losses).double(), torch.stack(gnorms).double()], 1).cpu()
    bad = (~torch.isfinite(vals)).any(1).nonzero()
    if len(bad):
        k = int(bad[0])
        step, (value, gnorm) = first + k, vals[k].tolist()
        terms = [str(name) for name, v in logs[k].items() if not _finite_number(v)]
        said = f" ({', '.join(terms)} not finite there)" if terms else ""
        if step == 0:  # no update yet, so the learning rate is not the cause
            what = f"training loss is {value}" if not math.isfinite(value) else \
                f"the gradient norm is {gnorm} (the loss is {value:.4g})"
            raise FloatingPointError(f"{what} at step 0{said}, before any update: the network's output (its "
                                     "weights), the training data or the objective are not finite")
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}{said}; try a lower learning "
                                     "rate")
        raise FloatingPointError(f"the gradient norm became {gnorm} at step {step} (the loss is {value:.4g}); "
                                 "try a lower learning rate")
    return float(vals[:, 0].sum())


def _step_of(checkpoint: Path) -> int:
    """The step of a checkpoint directory ``step_XXXXXXXX`` (-1 for a name that holds none)."""
    tail = checkpoint.name.removeprefix("step_")
    return int(tail) if tail.isdigit() else -1


def _code_apart(entry: object) -> tuple[object, object]:
    """A recorded ``net`` entry as ``(settings, file SHA-256)``: a net of one's own carries its file's hash."""
    if isinstance(entry, dict) and "file_sha256" in entry:
        return {k: v for k, v in entry.items() if k != "file_sha256"}, entry["file_sha256"]
    return entry, None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root`` (a ``checkpoints/`` directory, or the run directory
    holding one), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / "checkpoints").is_dir() and not any(root.glob("step_*")):  # a run directory
        root = root / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / io.CONFIG).is_file())


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``log.jsonl`` file (a torn last line from a killed run is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(errors="replace").splitlines():  # a garbled line is skipped like a torn one
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
