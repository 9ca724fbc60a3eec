"""Raw networks (no diffusion logic) and the registry that builds them from a config dict.

Every registered net stores its constructor arguments, plus ``"name"``, as a JSON-serialisable dict
``net.config``, so ``build_net(net.config)`` rebuilds the same architecture and a checkpoint's
``config.json`` is enough to recreate the module before loading its weights.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable

from torch import nn

from ..checks import check_setting
from ..userfile import absolute_spec, load_from_file
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


def net_class(name: str, saved_by: str | None = None) -> tuple[type, str, str | None]:
    """What a net config's ``name`` builds: ``(class, name as recorded, file SHA-256)``. A registered name
    gives its class (and no SHA); ``FILE.py:NAME`` runs the file (the user's own code) and gives its class
    ``NAME``, recorded under the file's absolute path so that a model rebuilds from any working directory.
    ``saved_by``: what names it, where a saved model does: the file then runs only if it is trusted
    (:func:`condiff.userfile.load_from_file`)."""
    if isinstance(name, os.PathLike):  # FILE.py:NAME given as a path
        name = os.fspath(name)
    if name in NETS:
        return NETS[name], name, None
    full = absolute_spec(name, "model.name", "an nn.Module class") if isinstance(name, str) else None
    if full is None:
        raise ValueError(f"unknown net {name!r}; known nets: {', '.join(sorted(NETS))}, or FILE.py:NAME for a "
                         "class of your own (a class registered with register_net is known once the module that "
                         "registers it is imported)")
    path, _, attr = full.rpartition(":")
    cls, sha = load_from_file(path, attr, "net", saved_by, once=True)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"net {full} is a {type(cls).__name__}, not a torch.nn.Module class")
    return cls, full, sha


def build_net(config: dict, saved_by: str | None = None) -> nn.Module:
    """Build a net from ``{"name": NAME, **constructor_kwargs}``: a registered name, or ``FILE.py:NAME`` for a
    class of one's own (:func:`net_class`), whose config records the file's SHA-256 (``file_sha256``): a
    model rebuilt after the file was edited gets a warning, since its weights may not mean what they did.
    ``saved_by``: what the config was read from (``"the model at DIR"``), where a file's class runs only if
    the file is trusted (:func:`condiff.userfile.trust_file`): loading must not run code a saved file names."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a net config must be a dict with a 'name' key, got {config!r}")
    kwargs = dict(config)
    cls, name, sha = net_class(kwargs.pop("name"), saved_by)
    recorded = kwargs.pop("file_sha256", None) if sha is not None else None
    if recorded is not None and recorded != sha:
        warnings.warn(f"net file {name.rpartition(':')[0]} has changed since this net's settings were recorded "
                      "(its SHA-256 differs): the weights are loaded into the edited code", stacklevel=2)
    sig = inspect.signature(cls)
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(sig.parameters)
        why = ("; labelled data (data.labels = true) give a net num_classes, the number of classes, which a "
               "class-conditional net takes" if "num_classes" in kwargs and "num_classes" not in sig.parameters
               else "")
        raise ValueError(f"bad arguments for net {name!r}: {err}; it accepts: {accepted}{why}") from None
    # each argument of the kind of its default, as config settings are ("maybe" for a switch was taken
    # as true, 3 for a list failed deep inside)
    kwargs = {k: check_setting(f"{name}.{k}", sig.parameters[k].default, v) if k in sig.parameters else v
              for k, v in kwargs.items()}  # a key only **kwargs takes has no default to be checked against
    try:
        net = cls(**kwargs)
    except Exception as err:
        if sha is None:
            raise
        raise ValueError(f"net {name} failed to build: {type(err).__name__}: {err}") from None
    if sha is not None:  # the file's class: the config names the file
        own = getattr(net, "config", None)
        if own is None:
            net.config = {"name": name, **kwargs, "file_sha256": sha}
        elif isinstance(own, dict) and "name" in own and "config" in vars(net):
            # a subclass of a condiff net: the record its parent keeps (every setting, some read back later),
            # under the file's name
            net.config = {**own, **kwargs, "name": name, "file_sha256": sha}
        else:
            raise ValueError(f"net {name} has a .config of its own, where condiff keeps what rebuilds the net (the "
                             "file, the class and its settings): rename it")
    elif not hasattr(net, "config"):  # a class of one's own that keeps none: what built it
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
    "net_class",
    "register_net",
    "timestep_embedding",
]

from .classifier import DigitsCNN  # noqa: E402,F401  (registers "digits_cnn")
from .icnn import ICNN  # noqa: E402,F401  (registers "icnn")
from .resnet import ResNetGenerator  # noqa: E402,F401  (registers "resnet")
