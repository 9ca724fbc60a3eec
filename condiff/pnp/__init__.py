"""Plug-and-play priors (Graikos et al. 2022): inference with a fixed diffusion model under a constraint.

:func:`infer` (the optimisation over a latent), :func:`finish` (a few guided sampler steps after it) and
:class:`PnPResult` come from :mod:`.engine`; the time and weight schedules from :mod:`.schedules`;
the tasks from :mod:`.conditional`, :mod:`.segmentation` and :mod:`.tsp`.
"""

from .engine import PnPResult, finish, infer

__all__ = ["PnPResult", "finish", "infer"]
