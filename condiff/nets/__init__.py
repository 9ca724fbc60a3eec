"""Raw networks (no diffusion logic) and the registry that builds them from a config dict.

Every registered net stores its constructor arguments, plus ``"name"``, as a JSON-serialisable dict
``net.config``, so ``build_net(net.config)`` rebuilds the same architecture and a checkpoint's
``config.json`` is enough to recreate the module before loading its weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..checks import check_setting
from .embed import LabelEmbedding, TimeEmbedding, timestep_embedding
from .mlp import TimeMLP
from .unet import UNet

NETS: dict[str, type] = {}


def register_net(name: str) -> Callable[[type], type]:
    """Class decorator: make ``build_net({"name": name, ...})`` construct this class."""

    def deco(cls: type) -> type:
        if NETS.get(name, cls) is not cls:
            raise ValueError(f"net name {name!r} is already registered to {NETS[name].__qualname__}")
        NETS[name] = cls
        return cls

    return deco


def build_net(config: dict) -> nn.Module:
    """Build a registered net from ``{"name": NAME, **constructor_kwargs}``."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a net config must be a dict with a 'name' key, got {config!r}")
    kwargs = dict(config)
    name = kwargs.pop("name")
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; known nets: {', '.join(sorted(NETS))} (a net of your own is known "
                         "once the module that registers it, with register_net, is imported)")
    cls = NETS[name]
    sig = inspect.signature(cls)
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(sig.parameters)
        raise ValueError(f"bad arguments for net {name!r}: {err}; it accepts: {accepted}") from None
    # each argument of the kind of its default, as config settings are ("maybe" for a switch was taken
    # as true, 3 for a list failed deep inside)
    kwargs = {k: check_setting(f"{name}.{k}", sig.parameters[k].default, v) for k, v in kwargs.items()}
    net = cls(**kwargs)
    if not hasattr(net, "config"):  # a class of one's own that keeps none: what built it
        net.config = {"name": name, **kwargs}
    return net


register_net("mlp")(TimeMLP)
register_net("unet")(UNet)

__all__ = [
    "NETS",
    "LabelEmbedding",
    "TimeEmbedding",
    "TimeMLP",
    "UNet",
    "build_net",
    "register_net",
    "timestep_embedding",
]

from .classifier import DigitsCNN  # noqa: E402,F401  (registers "digits_cnn")
from .icnn import ICNN  # noqa: E402,F401  (registers "icnn")
from .resnet import ResNetGenerator  # noqa: E402,F401  (registers "resnet")
