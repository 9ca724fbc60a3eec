"""Constraints for conditional generation with a plug-and-play prior, and a diversity measure.

A constraint is a callable ``x -> (B,)`` to minimise (``-log c(x, y)`` in the paper's notation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import checks
from ..constraints import at_least_float32

# The finish of a classifier-constrained digits search (condiff.pnp.engine.finish): re-noise to t = 0.4 T
# (400 of 1000) and sample back with DPS (zeta 0.25) on the same constraint. Chosen on a selection draw
# (other seeds) of 500: success 0.99 and Fréchet ratio 0.88, against 0.92 and 3.7 for the PnP result
# itself (docs/pnp.md).
DIGITS_FINISH_AT, DIGITS_FINISH_ZETA = 0.4, 0.25


class ClassConstraint:
    """``-log p(label | x)`` from a differentiable classifier's ``log_prob(x, labels) -> (B,)``, e.g.
    :meth:`condiff.classifier.DigitsJudge.log_prob`. ``labels``: an int (all chains) or a ``(B,)`` tensor."""

    def __init__(self, log_prob: Callable[[Tensor, Tensor], Tensor], labels: int | Tensor) -> None:
        one = checks.scalar(labels)  # a 0-d tensor or array: one label, as NetDenoiser takes it
        if checks.is_integer(one, 0):
            labels = int(one)
        elif not (isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point()
                  and labels.dtype != torch.bool):
            raise ValueError(f"ClassConstraint: labels must be one class (an integer >= 0) or a (B,) integer tensor, "
                             f"got {labels!r}")
        self.log_prob, self.labels = log_prob, labels

    def __call__(self, x: Tensor) -> Tensor:
        y = self.labels
        y = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device) if isinstance(y, int) else y
        if y.shape != (x.shape[0],):
            raise ValueError(f"ClassConstraint: {tuple(y.shape)} labels for a batch of {x.shape[0]}")
        return -self.log_prob(x, y.to(x.device))


class MirrorSymmetry:
    """Mean squared difference between ``x`` ``(B, C, H, W)`` and its mirror image: ``(B,)``, zero exactly on
    mirror-symmetric pictures. ``axis=-1`` mirrors left-right, ``axis=-2`` top-bottom."""

    def __init__(self, axis: int = -1) -> None:
        if axis not in (-1, -2):
            raise ValueError(f"MirrorSymmetry: axis must be -1 (left-right) or -2 (top-bottom), got {axis}")
        self.axis = axis

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # on (B, D) vectors axis -2 is the batch: samples were compared with each other
            raise ValueError(f"MirrorSymmetry: expected pictures (B, C, H, W), got shape {tuple(x.shape)}")
        x = at_least_float32(x)  # a half-precision mean of squares rounds small asymmetries away
        return (x - x.flip(self.axis)).pow(2).flatten(1).mean(1)


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean Euclidean distance between distinct samples of ``x`` ``(N >= 2, ...)``: a diversity measure."""
    if x.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {x.shape[0]}")
    f = x.flatten(1).double()
    d = torch.cdist(f, f)
    n = f.shape[0]
    return float(d.sum() / (n * (n - 1)))


def within_class_diversity(x: Tensor, labels: Tensor) -> float:
    """:func:`mean_pairwise_distance` within each class of ``labels`` ``(N,)`` (classes with at least 2
    samples), averaged over the classes."""
    per = [mean_pairwise_distance(x[labels == c]) for c in labels.unique() if int((labels == c).sum()) > 1]
    if not per:
        raise ValueError("within_class_diversity needs a class with at least 2 samples")
    return float(sum(per) / len(per))


def independent_digits_classifier(seed: int = 1, device: str | torch.device = "cpu"):
    """A digits classifier trained like the project's judge but from another seed (cached under
    ``io.cache_dir()``), to *steer* generation while the judge (seed 0) *scores* it: a constraint
    optimised against the scoring network itself would inflate the success rate adversarially.

    Returns a :class:`~condiff.classifier.DigitsJudge` wrapping it (for its differentiable ``log_prob``).
    """
    from .. import io
    from ..classifier import DigitsJudge, digits_accuracy, train_digits_classifier
    from ..nets.classifier import DigitsCNN

    if seed == 0:
        raise ValueError("seed 0 is the judge's own classifier; pick another seed for the constraint")
    path = io.cache_dir() / f"digits_classifier_seed{seed}"
    if (path / io.CONFIG).is_file():
        cfg = dict(io.load_config(path)["net"])
        cfg.pop("name", None)
        net = DigitsCNN(**cfg)
        io.load_state_into(net, path)
    else:
        net = train_digits_classifier(seed=seed)
        io.save_module(path, net, {"net": net.config, "seed": seed, "heldout_accuracy": digits_accuracy(net)})
    return DigitsJudge(net.eval(), device=device)
