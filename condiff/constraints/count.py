"""Object count: exactly ``k`` sources, as judged by a counting CNN the project trains itself.

:class:`CountingCNN` maps an image ``(B, 1, H, W)`` in ``[-1, 1]`` to a non-negative density map whose
sum is the count; it is trained on generated images with 0 to ``2k`` sources (:mod:`condiff.data.sources`),
faint non-source blobs and varied noise, against Gaussian density targets and the true counts, with
adversarial (PGD) training (``COUNTER_RECIPE``), and cached under
``condiff.io.cache_dir() / "counters"``. The distance is ``l(x) = |count(x) - k|`` (as in the NAMM paper).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff import checks, io
from condiff.constraints import Constraint, register_constraint
from condiff.determinism import one_thread, seeded

COUNTER_FORMAT = "condiff-counter"


class CountingCNN(nn.Module):
    """``(B, 1, H, W) -> (B, 1, H, W)`` density (softplus); ``count(x) = density.sum``.

    Dilated 3x3 convolutions (dilations 1, 1, 2, 4, 1) give a receptive field of 19 pixels with
    no pooling, so the density map stays at full resolution and shows where sources are counted.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.config = {"width": int(width)}
        layers, cin = [], 1
        for d in (1, 1, 2, 4, 1):
            layers += [nn.Conv2d(cin, width, 3, padding=d, dilation=d), nn.SiLU()]
            cin = width
        layers.append(nn.Conv2d(width, 1, 1))
        self.body = nn.Sequential(*layers)

    def density(self, x: Tensor) -> Tensor:
        return F.softplus(self.body(x) - 4.0)  # the offset starts the density near zero

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B,) predicted counts."""
        return self.density(x).flatten(1).sum(1)


# How the project's counter is trained (train_counter's keywords). A counter trained on clean images
# alone was easy to fool: a mirror map fine-tuned against it took the counter's mean error on its
# samples from 0.44 to 0.17 by painting faint smudges, while the number of sources in them did not
# change (docs/namm-count.md). Faint non-source blobs, a range of noise levels and adversarial (PGD)
# training make it count sources rather than brightness.
COUNTER_RECIPE = {"faint": 1.5, "noise": [0.03, 0.1], "adv_eps": 0.2, "adv_steps": 3, "v": 2}


SAVE_EVERY = 250  # steps between saves of a first use's training state (about 15 s of one core at 16x16)


def counter_key(k: int, size: int, steps: int, seed: int, width: int, device: str = "cpu") -> str:
    spec = {"k": k, "size": size, "steps": steps, "seed": seed, "width": width, **COUNTER_RECIPE}
    if device != "cpu":  # a GPU-trained counter differs in its rounding: cached apart (CPU keys unchanged)
        spec["device"] = device
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@one_thread()  # the cached counter (and every count figure) must not depend on the cores
def train_counter(
    k: int = 8,
    size: int = 32,
    steps: int = 3000,
    seed: int = 0,
    width: int = 16,
    batch_size: int = 32,
    lr: float = 3e-3,
    pool: int = 4096,
    faint: float = 0.0,
    noise: Sequence[float] | None = None,
    adv_eps: float = 0.0,
    adv_steps: int = 3,
    progress: bool = True,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    every: int = 250,
) -> CountingCNN:
    """Train a :class:`CountingCNN` on a pool of generated images with 0 to ``2k`` sources.

    ``faint``, ``noise``: faint non-source blobs and a background-noise range in the training images
    (:func:`~condiff.data.sources.render_sources`). ``adv_eps > 0``: adversarial training, each batch
    replaced by a PGD perturbation (``adv_steps`` steps, max-norm ``adv_eps`` in the ``[-1, 1]``
    image scale) that maximises the count error, so that a small change cannot move the count.
    ``progress``: a progress bar on stderr (:func:`~condiff.sample.progress_bar`, as the ``Trainer`` shows:
    written to a file or pipe rather than a terminal it refreshes every 10 s). On the CPU it trains on
    one thread whatever the caller's setting, so the same settings give the same counter on any core
    count; ``device`` (e.g. ``"cuda"``) trains it there instead (the pool is drawn on the CPU either
    way), with deterministic cuDNN kernels. ``checkpoint``: a folder where the training state is saved
    every ``every`` steps (and removed by the caller once the counter is kept); a training that finds one
    there made with the same settings goes on from it, to the counter an uninterrupted run makes. A state
    of other settings, or a damaged one, is deleted with a line on stderr and training starts over.
    Returns the counter on the CPU.
    """
    from condiff.data.sources import NOISE, density_target, render_sources  # data imports constraints
    from condiff.sample import progress_bar

    every = checks.integer("every", every)  # before the pool is rendered and the net built
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * k + 1, (pool,), generator=g)
    x, centres = render_sources(counts, size, g, noise=noise or NOISE, faint=faint)
    dens = density_target(centres, size)
    x, dens, counts = x.to(device), dens.to(device), counts.to(device)
    with seeded(seed):
        net = CountingCNN(width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    spec = {"k": k, "size": size, "steps": steps, "seed": seed, "width": width, "batch_size": batch_size,
            "lr": lr, "pool": pool, "faint": faint, "noise": list(noise) if noise else None, "adv_eps": adv_eps,
            "adv_steps": adv_steps, "device": torch.device(device).type}
    state = _CounterState(Path(checkpoint), spec, net, opt, sched, g) if checkpoint is not None else None
    start = state.restore() if state is not None else 0
    bar = progress_bar(steps, progress, unit="it", desc="counting CNN (first use)", initial=start)
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        for step in range(start, steps):
            _counter_step(net, opt, sched, x, dens, counts, batch_size, adv_eps, adv_steps, g)
            if bar is not None:
                bar.update(1)
            if state is not None and (step + 1) % every == 0 and step + 1 < steps:
                state.save(step + 1)
    finally:
        cudnn.deterministic, cudnn.benchmark = before
        if bar is not None:
            bar.close()
    return net.cpu().eval()


def _counter_step(net: CountingCNN, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                  x: Tensor, dens: Tensor, counts: Tensor, batch_size: int, adv_eps: float, adv_steps: int,
                  g: torch.Generator) -> None:
    idx = torch.randint(0, len(x), (batch_size,), generator=g).to(x.device)
    xb = x[idx] if adv_eps <= 0 else _pgd(net, x[idx], counts[idx].float(), adv_eps, adv_steps, g)
    d = net.density(xb)
    # Local counts in 4x4 cells localise the sources without demanding the target's exact shape
    # (3-4x lower count error than per-pixel density or count-only losses); the count term
    # fixes the total.
    cells = 10 * F.mse_loss(16 * F.avg_pool2d(d, 4), 16 * F.avg_pool2d(dens[idx], 4))
    loss = cells + 0.1 * F.mse_loss(d.flatten(1).sum(1), counts[idx].float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


class _CounterState:
    """The counter's training state in the folder ``path`` (safetensors + JSON, written atomically): the
    network, Adam's state, the schedule and the generator that draws batches and PGD starts, so that a
    training cut short goes on where its last save left it."""

    FORMAT = "condiff-counter-training"

    def __init__(self, path: Path, spec: dict, net: CountingCNN, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, g: torch.Generator) -> None:
        self.path, self.spec, self.net, self.opt, self.sched, self.g = path, spec, net, opt, sched, g

    def save(self, step: int) -> None:
        tensors, meta = io.flatten_optimizer(self.opt.state_dict())
        io.save_checkpoint(self.path, {"model": self.net.state_dict(), "optim": tensors,
                                       "rng": {"batches": self.g.get_state()}},
                           {"format": self.FORMAT, "spec": self.spec, "step": step, "optim": meta,
                            "sched": self.sched.state_dict()})

    def restore(self) -> int:
        """Load the saved state if there is one of these settings; returns the step it was saved at (0:
        none, and training starts from the beginning)."""
        if not (self.path / io.CONFIG).is_file():
            return 0
        fresh = (copy.deepcopy(self.net.state_dict()), copy.deepcopy(self.opt.state_dict()),
                 dict(self.sched.state_dict()), self.g.get_state())
        try:
            cfg = io.load_config(self.path)
            if cfg.get("format") != self.FORMAT or cfg.get("spec") != json.loads(json.dumps(self.spec)):
                raise ValueError("it was saved with other settings")
            with io.reading_config(self.path):
                step = checks.integer("step", cfg["step"], 1, self.spec["steps"] - 1)
                io.load_state_into(self.net, self.path)
                self.opt.load_state_dict(io.unflatten_optimizer(io.load_group(self.path, "optim"), cfg["optim"]))
                self.sched.load_state_dict(cfg["sched"])
                self.g.set_state(io.load_group(self.path, "rng")["batches"])
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, io.CheckpointError) as e:
            self.net.load_state_dict(fresh[0])  # what a part-loaded state changed is put back
            self.opt.load_state_dict(fresh[1])
            self.sched.load_state_dict(fresh[2])
            self.g.set_state(fresh[3])
            print(f"the counting CNN's saved training state in {self.path} is not used ({e}); its training "
                  "starts over", file=sys.stderr, flush=True)
            io.remove(self.path)
            return 0
        print(f"the counting CNN's training goes on from step {step} (saved in {self.path})", file=sys.stderr,
              flush=True)
        return step


def _pgd(net: CountingCNN, x: Tensor, counts: Tensor, eps: float, steps: int, g: torch.Generator) -> Tensor:
    """A max-norm ``eps`` perturbation of ``x`` (random start, signed-gradient ascent) that pushes the
    predicted counts away from the true ``counts``."""
    net.requires_grad_(False)
    delta = eps * (2 * torch.rand(x.shape, generator=g) - 1).to(x.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        err = (net(x + delta) - counts).abs().sum()
        (grad,) = torch.autograd.grad(err, delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    net.requires_grad_(True)
    return (x + delta).detach()


def load_counter(
    k: int = 8,
    size: int = 32,
    steps: int = 3000,
    seed: int = 0,
    width: int = 16,
    path: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> CountingCNN:
    """The cached counter for these settings (on the CPU), trained if missing: a line on stderr says so
    first, then a progress bar follows unless ``progress`` is false (on a terminal or, refreshed every 10 s,
    in a log: minutes of training are never silent).

    ``device``: where a missing counter trains; default ``"cuda"`` when a GPU is available, else
    ``"cpu"``. On one CPU core the 3000 steps take about 3 minutes at 16x16, half an hour at 32x32
    and about an hour at 64x64 (2-core development machine, 2026-12-04); counters trained on a GPU
    are cached apart from CPU ones. The training state is saved every ``SAVE_EVERY`` steps beside
    ``path`` (``.<name>.training``), so a training cut short goes on from there at the next call; a
    second process that needs the same counter meanwhile waits for the first.
    """
    # trained on the device given (cuda:1 stays cuda:1), cached by its type (a GPU's counter serves any GPU)
    device = checks.device("load_counter: device", device) if device is not None else counter_device(None)
    path = (
        Path(path)
        if path is not None
        else io.cache_dir() / "counters" / counter_key(k, size, steps, seed, width, counter_device(device))
    )
    if (path / io.CONFIG).is_file():
        io.remove(path.with_name(f".{path.name}.training"))  # left by a process killed as it kept the counter
        return _cached_counter(path)
    # a second process that needs it waits, then loads it, rather than training it again beside the first
    # (and racing it for the saved training state)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(io.waiting_lock(path.with_name(f".{path.name}.lock"),
                                               f"waiting for another process, which is training the counting CNN "
                                               f"for {path}"))
        except OSError as e:  # a read-only cache, say: said now, not after minutes of training
            raise ValueError(f"the counting CNN for {path} is not cached, and cannot be trained into that folder "
                             f"({e}): set CONDIFF_CACHE to a folder you can write") from None
        if (path / io.CONFIG).is_file():  # made by the process this one waited for
            return _cached_counter(path)
        return _train_and_keep(path, k, size, steps, seed, width, device, progress)


def counter_device(device: str | torch.device | None) -> str:
    """The kind of device a missing counter trains on (the cache key's part, and what a run records):
    ``device``'s type, or ``"cuda"`` when a GPU is available and none is given."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _cached_counter(path: Path) -> CountingCNN:
    cfg = io.load_config(path)
    with io.reading_config(path):
        net = CountingCNN(**cfg["net"])
    io.load_state_into(net, path)
    return net.eval()


def _train_and_keep(path: Path, k: int, size: int, steps: int, seed: int, width: int, device: str,
                    progress: bool) -> CountingCNN:
    partial = path.with_name(f".{path.name}.training")
    print(f"training the counting CNN (k = {k}, {size}x{size}, {steps} steps on {device}) on first use; it is "
          f"cached in {path}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    recipe = {key: value for key, value in COUNTER_RECIPE.items() if key != "v"}  # "v": the key's version
    try:
        net = train_counter(k, size, steps, seed, width, **recipe, device=device, progress=progress,
                            checkpoint=partial, every=SAVE_EVERY)
    except KeyboardInterrupt:
        if (partial / io.CONFIG).is_file():
            print(f"the counting CNN's training was stopped; its next use goes on from the state saved in "
                  f"{partial}", file=sys.stderr, flush=True)
        raise
    io.save_module(
        path,
        net,
        {
            "format": COUNTER_FORMAT,
            "net": net.config,
            "k": k,
            "size": size,
            "steps": steps,
            "seed": seed,
            "recipe": COUNTER_RECIPE,
            "device": device,
            "train_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    io.remove(partial)
    return net


@register_constraint("count")
class CountConstraint(Constraint):
    """``x (B, 1, H, W) -> (B,)``: ``|count(x) - k|`` with a frozen counting CNN.

    ``counter``: a trained :class:`CountingCNN` (or any ``x -> (B,)`` counter module); by default the
    project's cached counter for ``(k, size, counter_steps, seed)``. A counter of one's own is named in
    the config by a fingerprint of its class and weights (``"counter": "custom ..."``), and such a
    config is not rebuilt by :func:`~condiff.constraints.build_constraint`: pass the counter again.
    ``progress``: a progress bar while a missing counter trains (not part of the config).
    """

    def __init__(
        self,
        k: int = 8,
        size: int = 32,
        counter_steps: int = 3000,
        seed: int = 0,
        width: int = 16,
        counter: nn.Module | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        """``device``: where the project's counter trains if it is not cached (:func:`load_counter`; default
        ``"cuda"`` when a GPU is available). A counter trained on a GPU is another counter (cached apart), so
        :meth:`learned_parts` records where it was trained, unless that was the CPU."""
        super().__init__()
        for name, v, lo in (("k", k, 0), ("size", size, 1), ("counter_steps", counter_steps, 1), ("width", width, 1)):
            checks.integer(f"count: {name}", v, lo)
        seed = checks.seed("count: seed", seed)
        self.k = int(k)
        self.config = {
            "name": type(self).family,
            "k": self.k,
            "size": int(size),
            "counter_steps": int(counter_steps),
            "seed": int(seed),
            "width": int(width),
        }
        if counter is not None and not isinstance(counter, nn.Module):
            raise ValueError(f"count: counter must be a network (an nn.Module) that maps (B, 1, H, W) to (B,) counts, "
                             f"got {counter!r}: a constraint with a counter of one's own is rebuilt by passing it "
                             "again, not from its config")
        self._own_counter = counter is None
        self._trained_on = counter_device(device)
        self.counter = (
            counter if counter is not None else load_counter(self.k, size, counter_steps, seed, width,
                                                             device=device, progress=progress)
        )
        self.counter.eval().requires_grad_(False)
        if counter is not None:  # the config names it, not the project's counter it would otherwise rebuild
            digest = hashlib.sha256(type(counter).__qualname__.encode())
            for name, t in sorted(counter.state_dict().items()):
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    digest.update(name.encode())
                    digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self.config = {**self.config, "counter": f"custom {digest.hexdigest()[:16]}"}

    def learned_parts(self) -> dict | None:
        # a counter of one's own is not recorded as a learned part (stage settings would then change with
        # weights a file may draw anew in every process); its config names it by its fingerprint
        if not self._own_counter:
            return None
        return {"counter": COUNTER_RECIPE, **({"trained_on": self._trained_on} if self._trained_on != "cpu" else {})}

    def _in_counter_dtype(self, x: Tensor) -> Tensor:
        """``x`` in the dtype of the counter's weights (the project's counter is float32), so that a float64
        or half-precision batch is counted, not refused deep inside torch."""
        if any(p.is_floating_point() for p in self.counter.parameters()):
            return x.to(checks.param_dtype(self.counter))
        return x

    def count(self, x: Tensor) -> Tensor:
        self._check_image(x, 1)
        size = self.config["size"]
        if self._own_counter and tuple(x.shape[-2:]) != (size, size):  # the counter is trained for one size
            raise ValueError(f"count constraint was built for {size}x{size} images (its counter's training size), "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        out = self.counter(self._in_counter_dtype(x))
        if not self._own_counter and (not isinstance(out, Tensor) or out.shape != (x.shape[0],)):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"count: the counter must map a batch of {x.shape[0]} to ({x.shape[0]},) counts, "
                             f"got {got}")
        return out

    def forward(self, x: Tensor) -> Tensor:
        return (self.count(x) - self.k).abs()

    def violation_map(self, x: Tensor) -> Tensor | None:
        density = getattr(self.counter, "density", None)
        if density is None:
            return None
        with torch.no_grad():
            return density(self._in_counter_dtype(x))[:, 0]
