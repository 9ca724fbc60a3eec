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
