"""When a request must end: the end of its time budget, and a cancel signal from outside.

Every loop of a request (MACE iterations and their gradient steps, sampling chunks, refinement
steps and rounds) asks one :class:`Deadline` whether it may go on. Cancelling (the node shutting
down) makes every such check answer "expired" at once, so a request stops within one step of
its current loop, whatever its fields.
"""

from __future__ import annotations

import math
import threading
import time


class Deadline:
    """A ``time.perf_counter()`` instant, and an optional event that ends the request earlier.

    Immutable; :meth:`earlier` makes a tighter one that shares the cancel event.
    """

    __slots__ = ("at", "cancel")

    def __init__(self, at: float, cancel: threading.Event | None = None):
        self.at = float(at)  #: s, ``time.perf_counter()`` value at which the budget ends
        self.cancel = cancel  #: set from outside (e.g. on shutdown) to end the request now

    @classmethod
    def after(cls, seconds: float, start: float | None = None,
              cancel: threading.Event | None = None) -> "Deadline":
        """``seconds`` after ``start`` (a ``time.perf_counter()`` value; None: now)."""
        return cls((time.perf_counter() if start is None else start) + seconds, cancel)

    @classmethod
    def never(cls, cancel: threading.Event | None = None) -> "Deadline":
        """No time limit (only the cancel event ends it)."""
        return cls(math.inf, cancel)

    @property
    def cancelled(self) -> bool:
        """Whether the cancel event is set."""
        return self.cancel is not None and self.cancel.is_set()

    def remaining(self) -> float:
        """Seconds left, >= 0 (0 once cancelled)."""
        if self.cancelled:
            return 0.0
        return max(self.at - time.perf_counter(), 0.0)

    def expired(self) -> bool:
        """Whether the budget has ended or the request was cancelled."""
        return self.cancelled or time.perf_counter() >= self.at

    def allows(self, seconds: float) -> bool:
        """Whether work expected to take ``seconds`` ends before the deadline."""
        return not self.cancelled and time.perf_counter() + seconds < self.at

    def earlier(self, seconds: float) -> "Deadline":
        """The deadline ``seconds`` sooner, with the same cancel event."""
        return Deadline(self.at - seconds, self.cancel)

    def __repr__(self) -> str:
        return f"Deadline(in {self.at - time.perf_counter():.3f} s, cancelled={self.cancelled})"
