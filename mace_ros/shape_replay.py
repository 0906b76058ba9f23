"""Replay a bag's ``/mace/complete_shape`` calls: in process, and against a running node.

A user's bag holds the observations their pipeline sent (clouds, contacts, support poses), not
the hidden shapes, so a replay measures what can be measured without them: whether each
request is answered, how long it takes (in process, method ``mace``; end to end over DDS as a
client sees it, method ``mace_node``), and how well the best completion explains the
observation (its score S of App. C, in [0, 1]). Both methods take turns on each request.
``mace-bench replay BAG [--node]`` runs it beside the IK replay (:mod:`mace_ros.replay`) when
the bag holds such calls; the held-out benchmark with the true shapes is ``mace-bench shape``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from mace_core.errors import MaceError
from mace_core.shape.completion import ShapeCompleter
from mace_ros.conversions import shape_request_from_msg

#: s a node's answer may take beyond the request's budget (DDS and conversions)
NODE_MARGIN_S = 5.0
SHAPE_METHODS = ("mace", "mace_node")


@dataclass
class ShapeCallRecord:
    """One method's answer to one recorded request."""

    index: int  #: the request's position in the bag
    method: str  #: "mace" (in process) or "mace_node" (over DDS)
    success: bool
    time_s: float  #: s, wall clock of the call
    best_score: float  #: S of the first completion (nan: none)
    completions: int
    iterations: int  #: MACE iterations run
    message: str = ""


def _in_process(completer: ShapeCompleter, index: int, msg) -> ShapeCallRecord:
    t0 = time.perf_counter()
    try:
        result = completer.complete(shape_request_from_msg(msg))
    except MaceError as exc:  # the node answers these with success = false
        return ShapeCallRecord(index, "mace", False, time.perf_counter() - t0, math.nan, 0, 0,
                               str(exc))
    elapsed = time.perf_counter() - t0
    scores = result.scores.detach().cpu().numpy()
    return ShapeCallRecord(index, "mace", True, elapsed,
                           float(scores[0]) if scores.size else math.nan, int(scores.size),
                           int(result.iterations_run))


def _over_dds(client, index: int, msg) -> ShapeCallRecord:
    t0 = time.perf_counter()
    response = client.call(msg, timeout_s=float(msg.time_budget) + NODE_MARGIN_S)
    elapsed = time.perf_counter() - t0
    scores = np.asarray(response.scores, dtype=float)
    return ShapeCallRecord(index, "mace_node", bool(response.success), elapsed,
                           float(scores[0]) if scores.size else math.nan,
                           len(response.completions), int(response.iterations_run),
                           "" if response.success else response.message)


def summarize(records: list[ShapeCallRecord]) -> dict:
    """Per method: requests, success share, median and p90 time (s) of the answered ones, mean
    best score and iterations."""
    out = {}
    for method in SHAPE_METHODS:
        rows = [r for r in records if r.method == method]
        if not rows:
            continue
        ok = [r for r in rows if r.success]
        times = np.array([r.time_s for r in ok]) if ok else np.array([math.nan])
        out[method] = {
            "requests": len(rows), "success": len(ok) / len(rows),
            "median_time_s": float(np.median(times)),
            "p90_time_s": float(np.percentile(times, 90)),
            "mean_best_score": float(np.nanmean([r.best_score for r in ok])) if ok else math.nan,
            "mean_iterations": float(np.mean([r.iterations for r in ok])) if ok else math.nan}
    return out


def replay_shape_calls(messages: list, completer: ShapeCompleter, client=None,
                       log=lambda _s: None) -> dict:
    """Every recorded ``CompleteShape`` request, in process and (with ``client``, a
    :class:`~mace_ros.client.MaceClient`) to the node, in turns: the JSON-ready section
    (``requests``, ``methods``: :func:`summarize`, ``records``: one per request and method)."""
    records: list[ShapeCallRecord] = []
    for i, msg in enumerate(messages):
        runs = [lambda: _in_process(completer, i, msg)]
        if client is not None:
            runs.append(lambda: _over_dds(client, i, msg))
        for run in runs if i % 2 == 0 else runs[::-1]:
            records.append(run())
        log(f"[shape] request {i}: " + ", ".join(
            f"{r.method} {r.time_s * 1e3:.0f} ms, S = {r.best_score:.3f}"
            for r in records[-len(runs):]))
    return {"requests": len(messages), "methods": summarize(records),
            "records": [asdict(r) for r in records]}


def format_shape_replay(section: dict) -> str:
    """The summary as a text table."""
    lines = [f"/mace/complete_shape: {section['requests']} requests",
             f"{'method':10s} {'requests':>8s} {'success':>8s} {'med s':>7s} {'p90 s':>7s} "
             f"{'best S':>7s} {'iters':>6s}"]
    for method, m in section["methods"].items():
        lines.append(f"{method:10s} {m['requests']:8d} {m['success']:8.2f} "
                     f"{m['median_time_s']:7.3f} {m['p90_time_s']:7.3f} "
                     f"{m['mean_best_score']:7.3f} {m['mean_iterations']:6.1f}")
    return "\n".join(lines)


def shape_markdown(section: dict) -> str:
    """The summary as a Markdown section."""
    rows = [f"## /mace/complete_shape: {section['requests']} requests\n\n"
            "| method | requests | success | time, median / p90 (ms) | best score S | "
            "MACE iterations |\n| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, m in section["methods"].items():
        rows[-1] += (f"\n| {method} | {m['requests']} | {m['success']:.2f} | "
                     f"{m['median_time_s'] * 1e3:.0f} / {m['p90_time_s'] * 1e3:.0f} | "
                     f"{m['mean_best_score']:.3f} | {m['mean_iterations']:.1f} |")
    rows.append("S: how well the best completion explains the observation (App. C; 1 is a "
                "perfect fit). The hidden shapes are not in a bag: `mace-bench shape` measures "
                "the distance to them on held-out shapes.")
    return "\n\n".join(rows)
