"""3D pictures of IK solutions in a scene and of shape completions, and a replay's curves of
success against time budget, drawn with matplotlib.

Only this module (and :mod:`mace_core.shape.plotting`) imports matplotlib. It draws arrays and
obstacles; it knows no ROS message and no kinematics (:func:`mace_ros.conversions.arm_points`
turns joint values into arm polylines). IK figures use no pyplot and no global backend change:
they are rendered straight to a PNG file, as are the replay's. Shape figures are the core's
Fig. 16-style panels (:func:`mace_core.shape.plotting.plot_completions`, pyplot on Agg),
titled and saved here.
"""

from __future__ import annotations

import os
from itertools import product
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mace_core.robot.scenes import Obstacle

#: Obstacles with a side longer than this (m) are clipped to the view (the floor, walls).
_LARGE_M = 1.0
_OBSTACLE_COLOR = "0.35"
#: Colors of the solutions by rank (matplotlib's cycle without orange, the target's color).
_PALETTE = ("C0", "C2", "C4", "C9", "C6", "C5", "C8", "C3", "C7")


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(8, 3) corners of an axis-aligned box; corner k has bit i set when axis i is at hi."""
    return np.array([[hi[i] if (k >> i) & 1 else lo[i] for i in range(3)] for k in range(8)])


_BOX_EDGES = [(a, b) for a, b in product(range(8), range(8))
              if a < b and bin(a ^ b).count("1") == 1]  # 12 edges: corners one bit apart


def _obstacle_lines(obstacle: Obstacle, view_lo: np.ndarray,
                    view_hi: np.ndarray) -> list[np.ndarray]:
    """Wireframe polylines ``(n, 3)`` of one obstacle, large axis-aligned boxes clipped."""
    rot, pos = obstacle.rotation_matrix, np.asarray(obstacle.position, dtype=float)
    if obstacle.kind == "box":
        half = np.asarray(obstacle.size, dtype=float) / 2.0
        lo, hi = -half, half
        if np.allclose(rot, np.eye(3)) and half.max() * 2 > _LARGE_M:
            lo = np.maximum(pos - half, view_lo) - pos
            hi = np.minimum(pos + half, view_hi) - pos
            if np.any(hi < lo):
                return []
        corners = _box_corners(lo, hi) @ rot.T + pos
        return [corners[[a, b]] for a, b in _BOX_EDGES]
    t = np.linspace(0.0, 2.0 * np.pi, 48)
    circle = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], -1)
    if obstacle.kind == "sphere":
        r = obstacle.size[0]
        rings = [circle, circle[:, [0, 2, 1]], circle[:, [2, 0, 1]]]
        return [r * ring @ rot.T + pos for ring in rings]
    height, r = obstacle.size  # cylinder, axis along local z
    rings = [r * circle + [0.0, 0.0, s * height / 2.0] for s in (-1.0, 1.0)]
    sides = [np.array([[r * np.cos(a), r * np.sin(a), -height / 2.0],
                       [r * np.cos(a), r * np.sin(a), height / 2.0]])
             for a in np.linspace(0.0, 2.0 * np.pi, 4, endpoint=False)]
    return [line @ rot.T + pos for line in rings + sides]


def _view_box(arms: np.ndarray, target: np.ndarray, obstacles: Sequence[Obstacle],
              margin: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """A cube around the arms, the target and the small obstacles: (lo, hi) corners, m."""
    pts = [arms.reshape(-1, 3), target.reshape(1, 3)]
    for o in obstacles:
        if max(o.size) * (2 if o.kind == "sphere" else 1) <= _LARGE_M:
            r = np.max(o.size)
            pts.append(np.asarray(o.position) + np.array([[-r] * 3, [r] * 3]) / 2.0)
    allp = np.concatenate(pts)
    lo, hi = allp.min(0) - margin, allp.max(0) + margin
    centre, half = (lo + hi) / 2.0, (hi - lo).max() / 2.0
    return centre - half, centre + half


def plot_ik_solutions(path: str, arms: np.ndarray, collision_free: Sequence[bool],
                      obstacles: Sequence[Obstacle], target: Sequence[float], title: str = "",
                      labels: Sequence[str] | None = None, elev: float = 24.0,
                      azim: float = -58.0, legend: bool = True) -> str:
    """Draw arm polylines (best first) over the scene's wireframes and the target; write a PNG.

    Args:
        path: PNG file to write (folders are created).
        arms: ``(K, C, 3)`` link origins of each solution, base frame, m.
        collision_free: ``(K,)`` flags; colliding arms are drawn dashed.
        obstacles: obstacles to draw as wireframes.
        target: ``(3,)`` end-effector target, m.
        title: figure title.
        labels: ``(K,)`` legend entries (default "solution i").
        elev, azim: view angles, degrees.
        legend: draw the legend (many arms: leave it out).

    Returns:
        ``path``.
    """
    arms = np.asarray(arms, dtype=float)
    if arms.size == 0:
        arms = np.zeros((0, 1, 3))
    target = np.asarray(target, dtype=float)
    lo, hi = _view_box(arms, target, obstacles)
    fig = Figure(figsize=(9.0, 8.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    for obstacle in obstacles:
        for line in _obstacle_lines(obstacle, lo, hi):
            ax.plot(*line.T, color=_OBSTACLE_COLOR, linewidth=0.9, alpha=0.8)
    handles = []
    for k, (pts, free) in enumerate(zip(arms, collision_free)):
        color = _PALETTE[k % len(_PALETTE)]
        label = labels[k] if labels else f"solution {k + 1}"
        ax.plot(*pts.T, color=color, linewidth=4.0 if k == 0 else 2.5, alpha=0.95,
                linestyle="-" if free else "--", marker="o", markersize=3.5,
                solid_capstyle="round", zorder=3)
        handles.append(Line2D([], [], color=color, linewidth=3, linestyle="-" if free else "--",
                              label=label))
    ax.scatter(*target, color="orange", edgecolor="black", marker="*", s=320, zorder=5,
               depthshade=False)
    handles.append(Line2D([], [], color="orange", marker="*", markeredgecolor="black",
                          markersize=14, linestyle="", label="target"))
    handles.append(Line2D([], [], color=_OBSTACLE_COLOR, linewidth=1, label="obstacles"))
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_zlim(lo[2], hi[2])
    ax.set_box_aspect((1.0, 1.0, 1.0))
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.view_init(elev=elev, azim=azim)
    if legend:
        ax.legend(handles=handles, loc="upper left", fontsize=9, framealpha=0.9)
    return _titled_png(fig, ax, path, title, 11)


def plot_shape_completions(path: str, completions: np.ndarray, scores: Sequence[float],
                           observation: np.ndarray, prior_samples: np.ndarray | None = None,
                           prior_scores: Sequence[float] | None = None,
                           truth: np.ndarray | None = None,
                           contact_directions: np.ndarray | None = None, title: str = "",
                           columns: int = 4, dpi: int = 100, max_observation_points: int = 300,
                           elev: float = 22.0, azim: float = -60.0) -> str:
    """The observation (orange) over completions (grey), as the paper's Fig. 16; write a PNG.

    Panels in order: the hidden truth (if given), the prior's samples (if given), then the
    completions, each titled with what it is and its score S. Every panel has the same limits.

    Args:
        path: PNG file to write (folders are created).
        completions: ``(K, P, 3)`` adapted completions, best first.
        scores: ``(K,)`` their scores.
        observation: ``(P', 3)`` partial cloud, or ``(k, 3)`` contacts with
            ``contact_directions`` ``(k, 3)``.
        prior_samples, prior_scores: ``(J, P, 3)`` / ``(J,)`` samples without adaptation.
        truth: ``(Q, 3)`` the full shape the observation was taken from.
        title: figure title.
        columns: panels per row.
        dpi: resolution of the PNG.
        max_observation_points: a larger observed cloud is drawn as a random subset of this
            size, so that the completions behind it stay visible.
        elev, azim: view angles, degrees.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt

    from mace_core.shape.plotting import plot_completions

    completions = np.asarray(completions, dtype=float)
    panels, labels = [], []
    if truth is not None:
        truth = np.asarray(truth, dtype=float)
        panels.append(truth[None, : completions.shape[1]])
        labels.append("hidden truth")
    if prior_samples is not None and len(prior_samples):
        panels.append(np.asarray(prior_samples, dtype=float))
        labels += [f"prior #{i + 1}  S={s:.3f}" for i, s in enumerate(prior_scores or [])]
    panels.append(completions)
    labels += [f"MACE #{i + 1}  S={s:.3f}" for i, s in enumerate(scores)]
    points = min(p.shape[1] for p in panels)
    clouds = np.concatenate([p[:, :points] for p in panels])
    observation = np.asarray(observation, dtype=float)
    if contact_directions is None and len(observation) > max_observation_points:
        # a dense observation would hide the completion behind it: draw an even subset
        pick = np.random.default_rng(0).choice(len(observation), max_observation_points,
                                               replace=False)
        observation = observation[np.sort(pick)]
    fig = plot_completions(clouds, observation=observation,
                           contact_directions=contact_directions, title=title,
                           columns=columns)
    try:
        for ax, label in zip(fig.axes, labels):
            ax.set_title(label, fontsize=9, color="tab:blue" if label.startswith("MACE")
                         else "0.2")
            cloud = ax.collections[0]  # the completion, drawn first
            cloud.set_color("0.25")
            cloud.set_alpha(0.55)
            cloud.set_sizes([2.0])
            ax.view_init(elev=elev, azim=azim)
        if title:  # keep the figure's title clear of the panels' titles
            fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.95))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def _titled_png(fig: Figure, ax, path: str, title: str, size: int) -> str:
    """Title ``ax`` (when ``title``), lay ``fig`` out and write it to the PNG ``path``."""
    if title:
        ax.set_title(title, fontsize=size)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_success_against_budget(path: str, first_s: dict[str, np.ndarray],
                                all_k_s: dict[str, np.ndarray], budget_s: float, k: int,
                                title: str = "") -> str:
    """Share of requests answered within a time budget, per method: with K valid solutions
    (solid) and with a first valid one (dashed); write a PNG.

    Args:
        first_s, all_k_s: method -> ``(R,)`` s, when each request had its first valid solution
            / K valid ones (inf: never).
        budget_s: the requests' budget, the right end of the axis (and a vertical line).
    """
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    finite = np.concatenate([t[np.isfinite(t)] for t in list(first_s.values())
                             + list(all_k_s.values())] + [np.array([budget_s])])
    grid = np.geomspace(max(float(finite.min()) * 0.8, 1e-4), max(budget_s, finite.max()) * 1.1,
                        200)
    for i, method in enumerate(first_s):
        color = _PALETTE[i % len(_PALETTE)]
        ax.plot(grid, [(all_k_s[method] <= t).mean() for t in grid], color=color,
                label=f"{method}: {k} valid")
        ax.plot(grid, [(first_s[method] <= t).mean() for t in grid], color=color,
                linestyle="--", label=f"{method}: first valid")
    ax.axvline(budget_s, color="0.5", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time budget (s)")
    ax.set_ylabel("share of requests answered")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _titled_png(fig, ax, path, title, 10)


def plot_first_valid_times(path: str, first_s: dict[str, np.ndarray], title: str = "") -> str:
    """Distribution of the time to the first valid solution, per method (log-spaced bins;
    requests that got none are counted in the legend); write a PNG.

    Args:
        first_s: method -> ``(R,)`` s (inf: no valid solution).
    """
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    finite = [t[np.isfinite(t)] for t in first_s.values()]
    every = np.concatenate(finite) if finite else np.zeros(0)
    if every.size:
        bins = np.geomspace(max(float(every.min()) * 0.9, 1e-4), float(every.max()) * 1.1, 30)
        for i, (method, times) in enumerate(zip(first_s, finite)):
            missing = int(len(first_s[method]) - len(times))
            ax.hist(times, bins=bins, histtype="step", linewidth=1.6,
                    color=_PALETTE[i % len(_PALETTE)],
                    label=method + (f" ({missing} without one)" if missing else ""))
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("time to the first valid solution (s)")
    ax.set_ylabel("requests")
    ax.grid(True, which="both", alpha=0.3)
    return _titled_png(fig, ax, path, title, 10)
