"""Running code so that its result does not depend on the machine's core count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread, then restore the caller's count. A float sum's order depends on
    the thread count; where the result is cached, or amplified (a chaotic solver, adversarial training
    steps), a 1e-7 difference becomes a different data set or network, fixed by whichever process made
    it first. Usable as a decorator."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cuda_devices() -> list[int]:
    """The GPUs whose streams a block may move: every one, once CUDA is initialised in this process; none
    before (reading a GPU's stream would start CUDA on it, a context on each GPU for a run on the CPU)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextmanager
def kept_streams() -> Iterator[None]:
    """Run the block, then give torch's global random streams back as they were: the CPU's and, where CUDA has
    started, every GPU's (``torch.random.fork_rng(devices=[])`` keeps the CPU's only, so a block that draws on
    a GPU, or seeds, moved the caller's GPU stream). Before CUDA starts there is no GPU stream to keep."""
    with torch.random.fork_rng(devices=_cuda_devices()):
        yield


@contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's global random streams seeded with ``seed`` (the CPU's, and every GPU's once CUDA
    has started), then give the caller's streams back as they were (:func:`kept_streams`). A block that draws on
    a GPU names it as ``device``: CUDA is then started first, so that the GPU's stream is seeded and given back
    too (started inside the block, it would draw unseeded and keep what it drew)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.init()  # (without CUDA, the block's own check names the device)
    with kept_streams():
        if torch.cuda.is_initialized():
            torch.manual_seed(seed)
        else:  # torch.manual_seed would queue a GPU seed that lands when CUDA starts, after the block
            torch.default_generator.manual_seed(seed)
        yield
