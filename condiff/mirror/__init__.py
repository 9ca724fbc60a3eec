"""Neural approximate mirror maps (NAMM; Feng, Baptista & Bouman, ICLR 2025).

A learned mirror map ``g(x) = (1 - a) grad Psi(x) + a x`` (``Psi`` an ICNN) and an inverse ``f`` turn
any constraint with a differentiable distance ``l(x)`` into a diffusion model whose samples satisfy
it: train an ordinary diffusion model on ``g(x)`` (the mirror diffusion model, MDM), sample in mirror
space and return ``f(y)``. Pieces:

- :mod:`.map`: :class:`MirrorMap`, :func:`save_mirror`, :func:`load_mirror`;
- :mod:`.objective`: the NAMM loss and the fine-tuning loss as core-trainer objectives;
- :mod:`.fit`: :func:`fit_mirror_map`, :func:`train_diffusion`, :func:`finetune_inverse`;
- :mod:`.informed`: :class:`InformedInverse`, an inverse map told its constraint's distance (not in the paper);
- :mod:`.sample`: :func:`mirror_generate`;
- :mod:`.dps` / :mod:`.assimilate`: mirror DPS and constraint-guided DPS (on :class:`condiff.guidance.DPS`),
  data assimilation.
"""

from condiff.mirror.assimilate import assimilate, first_rows, frames, sparse_points
from condiff.mirror.dps import mirror_dps, normalised_measurement_loss, with_constraint
from condiff.mirror.fit import build_mirror, finetune_inverse, fit_mirror_map, train_diffusion
from condiff.mirror.informed import InformedInverse
from condiff.mirror.map import MirrorMap, MirrorTerms, load_mirror, save_mirror
from condiff.mirror.objective import FinetuneObjective, NAMMLoss, NAMMObjective, evaluate_terms
from condiff.mirror.sample import batched_distance, data_violation, mirror_generate

__all__ = [
    "FinetuneObjective",
    "InformedInverse",
    "MirrorMap",
    "MirrorTerms",
    "NAMMLoss",
    "NAMMObjective",
    "assimilate",
    "batched_distance",
    "data_violation",
    "build_mirror",
    "evaluate_terms",
    "finetune_inverse",
    "first_rows",
    "frames",
    "fit_mirror_map",
    "load_mirror",
    "mirror_dps",
    "mirror_generate",
    "normalised_measurement_loss",
    "save_mirror",
    "sparse_points",
    "train_diffusion",
    "with_constraint",
]
