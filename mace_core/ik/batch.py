"""Many IK targets in one call: a grasp planner's candidate grasps, answered in turn within one
time budget.

A pipeline that asks for each of its candidate grasps in a call of its own pays the call's
overhead every time (over ROS on this 2-core CPU: 2-3 ms a call beside a full pose's 2-3 ms of
solving, README "Recording and replaying"); in one call it pays it once, and the targets share
the obstacles' world (validated and built for the first one) and the warm models. Each target
is a request of its own (:meth:`~mace_core.ik.adapter.IKAdapter.solve`, K solutions) within
its own time budget, and target ``i`` of ``n`` also ends by ``(i + 1) / n`` of the batch's: the
time an easy target leaves over goes to those after it, and no target starves the rest (a
window pose target with no 8 free solutions spent 16 s of a 20 s batch before targets had a
budget of their own).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from ..errors import InvalidRequestError
from .request import IKAdaptResult, IKRequest

if TYPE_CHECKING:
    from .adapter import IKAdapter

#: s, the least budget a target is given (one still due when the batch's time is spent is
#: answered at once with what it finds in it)
MIN_TARGET_BUDGET_S = 1e-3


def default_total_budget(num_targets: int, per_target_s: float, max_s: float) -> float:
    """s, a batch's budget where none is given: its targets' budgets, at most ``max_s`` (the
    service's ``limits.max_time_budget_s``)."""
    return min(num_targets * per_target_s, max_s)


@dataclass
class IKBatchAnswer:
    """One target's answer: its result, or why it was refused (``result`` None)."""

    result: IKAdaptResult | None
    error: str = ""

    @property
    def success(self) -> bool:
        return self.result is not None and self.result.success


def solve_batch(adapter: "IKAdapter", requests: Sequence[IKRequest | str], time_budget_s: float,
                start: float | None = None, cancel: threading.Event | None = None
                ) -> list[IKBatchAnswer]:
    """Answer ``requests`` in order within ``time_budget_s`` for the whole batch (counted from
    ``start``, a ``time.perf_counter()`` value; None: now): request ``i`` of ``n`` within its
    own ``time_budget_s`` and the time left until ``(i + 1) / n`` of the batch's, whichever
    ends first (at least :data:`MIN_TARGET_BUDGET_S`). A string stands for a target refused
    before (its reason, passed through); a request the adapter refuses is answered with its
    reason, and the others go on.

    Raises:
        InvalidRequestError: no request, more than ``limits.max_batch_targets``, or a budget
            outside (0, ``limits.max_time_budget_s``].
    """
    t0 = time.perf_counter() if start is None else start
    limits = adapter.config.limits
    n = len(requests)
    if not 1 <= n <= limits.max_batch_targets:
        raise InvalidRequestError(f"a batch holds 1 to limits.max_batch_targets = "
                                  f"{limits.max_batch_targets} targets, got {n}")
    if not 0.0 < time_budget_s <= limits.max_time_budget_s:  # NaN fails too
        raise InvalidRequestError(f"time budget must be in (0, limits.max_time_budget_s = "
                                  f"{limits.max_time_budget_s:g}] s for the whole batch, got "
                                  f"{time_budget_s:.6g}")
    answers = []
    for i, request in enumerate(requests):
        if isinstance(request, str):
            answers.append(IKBatchAnswer(None, request))
            continue
        due = t0 + time_budget_s * (i + 1) / n
        share = max(due - time.perf_counter(), MIN_TARGET_BUDGET_S)
        own = request.time_budget_s  # None: the share alone; a bad one: the adapter refuses it
        budget = (share if own is None
                  else min(own, share) if 0.0 < own <= limits.max_time_budget_s else own)
        try:
            answers.append(IKBatchAnswer(adapter.solve(replace(request, time_budget_s=budget),
                                                       cancel=cancel)))
        except InvalidRequestError as exc:
            answers.append(IKBatchAnswer(None, str(exc)))
        if cancel is not None and cancel.is_set():  # the rest is not asked (shutting down)
            answers += [IKBatchAnswer(None, "not answered: the batch was cancelled")
                        for _ in requests[i + 1:]]
            break
    return answers
