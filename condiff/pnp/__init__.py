"""Plug-and-play priors (Graikos et al. 2022): inference with a fixed diffusion model under a constraint."""
