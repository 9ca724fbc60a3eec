"""Dual training: diffusion models trained under distributional constraints (Khalafi, Ding, Ribeiro, NeurIPS 2024).

``min KL(q_0 || p)  s.t.  KL(q_i || p) <= b_i``, each KL replaced by its denoising-loss surrogate and
solved by alternating primal steps on the Lagrangian with projected dual ascent on ``lambda``.
:class:`DualObjective` plugs into :class:`condiff.train.Trainer`, which supplies EMA, checkpoints
(``lambda`` included), exact resume, progress and DDP.
"""

from .data import class_frequencies, keep_fraction, model_samples, select
from .objective import (
    Constraint,
    DualConfig,
    DualObjective,
    estimate_losses,
    fixed_timesteps,
    reference_losses,
)
from .theory import (
    GaussianMixtureDenoiser,
    log_mass_bounds,
    mixture_weights,
    mode_weights,
    refine_log_mass_bounds,
)

__all__ = [
    "Constraint",
    "DualConfig",
    "DualObjective",
    "GaussianMixtureDenoiser",
    "class_frequencies",
    "estimate_losses",
    "fixed_timesteps",
    "keep_fraction",
    "log_mass_bounds",
    "mixture_weights",
    "mode_weights",
    "model_samples",
    "reference_losses",
    "refine_log_mass_bounds",
    "select",
]
