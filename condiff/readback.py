"""Per-step values kept on the device and read back in blocks.

Reading a value back from a GPU (``bool(t)``, ``float(t)``) makes the host wait until the device has
caught up; once per step, that stalls a loop every step. A loop therefore keeps each step's values
(finiteness flags, the figures an error message needs, trace values) in a :class:`DeviceRows` with the
function that interprets them, and reads the whole block in one transfer: every :func:`read_every`
steps, at its end, and before it passes on another error (a bad step kept there is its likely cause).
On the CPU a read costs nothing, so each step is read as it comes.

Used by the guided sampler (:func:`condiff.sample.ddim`), PnP inference and NAMM's sign check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# steps between reads per device type; other devices (a GPU) read every READ_EVERY_DEFAULT steps
READ_EVERY = {"cpu": 1}
READ_EVERY_DEFAULT = 50

Reader = Callable[[list[float]], None]
"""Interprets one kept row (its values as floats); raises to report a bad step."""


def read_every(device: torch.device | str) -> int:
    """How many steps' values to keep on ``device`` (a device or its name) before reading them (:data:`READ_EVERY`)."""
    return READ_EVERY.get(torch.device(device).type, READ_EVERY_DEFAULT)


class DeviceRows:
    """Rows of values kept on their device, each with its :data:`Reader`.

    ``every``: read as soon as that many rows are kept (None: only when :meth:`read` is called).
    """

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self.unread: list[tuple[Tensor, Reader]] = []

    def keep(self, values: Tensor, reader: Reader) -> None:
        self.unread.append((values.detach().flatten().to(torch.float64), reader))
        if self.every is not None and len(self.unread) >= self.every:
            self.read()

    def _fetch(self) -> list[tuple[list[float], Reader]]:
        unread, self.unread = self.unread, []
        if not unread:
            return []
        flat = torch.cat([v for v, _ in unread]).cpu().tolist()  # one transfer for the whole block
        rows, start = [], 0
        for v, reader in unread:
            rows.append((flat[start:start + v.numel()], reader))
            start += v.numel()
        return rows

    def read(self) -> None:
        """Hand each kept row to its reader, in order; the first that raises ends the read (the
        rows after it are dropped with it)."""
        for row, reader in self._fetch():
            reader(row)

    def read_before(self, err: Exception) -> None:
        """Read before ``err`` is passed on: a reader's error replaces it (raised from it). If the
        transfer itself fails (a broken device, say), ``err`` is left to be raised."""
        try:
            rows = self._fetch()
        except Exception:
            return
        try:
            for row, reader in rows:
                reader(row)
        except Exception as bad:
            raise bad from err
