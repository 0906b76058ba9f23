"""Pictures of shape completions in the style of the paper's Fig. 16 (App. C).

Each panel shows one completion in grey with the observation over it in orange (a partial cloud
as points, fingertip contacts as large markers with their approach directions). matplotlib is
imported here only, with the Agg backend, so the rest of the core does not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _np(a) -> np.ndarray | None:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float32).numpy()
    return np.asarray(a, dtype=np.float32)


def plot_completions(completions, observation=None, contact_directions=None,
                     scores=None, title: str = "", columns: int = 4,
                     max_points: int = 1024, path: str | Path | None = None):
    """Draw an observation over a few completions (paper Fig. 16).

    Args:
        completions: ``(K, Q, 3)`` clouds (tensor or array), drawn in grey, one panel each.
        observation: ``(P, 3)`` partial cloud or ``(k, 3)`` contacts, drawn in orange on every
            panel; None for plain samples (e.g. a model card's prior samples).
        contact_directions: ``(k, 3)``; when given, ``observation`` holds contacts and each
            finger's approach is drawn as a line ending at its contact.
        scores: ``(K,)`` shown in the panel titles.
        title: figure title.
        columns: panels per row.
        max_points: points drawn per completion (strided subsample).
        path: PNG file to write (the figure is then closed); it is returned either way.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clouds = _np(completions)
    obs = _np(observation)
    dirs = _np(contact_directions)
    sc = _np(scores)
    k = clouds.shape[0]
    cols = max(1, min(columns, k))
    rows = (k + cols - 1) // cols
    fig = plt.figure(figsize=(3.2 * cols, 3.2 * rows + (0.4 if title else 0.0)))
    everything = clouds.reshape(-1, 3) if obs is None else np.concatenate(
        [clouds.reshape(-1, 3), obs])
    lo, hi = everything.min(axis=0), everything.max(axis=0)
    centre, half = 0.5 * (lo + hi), 0.5 * float((hi - lo).max()) + 1e-6
    stride = max(1, clouds.shape[1] // max_points)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        c = clouds[i, ::stride]
        ax.scatter(c[:, 0], c[:, 1], c[:, 2], s=1.5, c="0.45", alpha=0.5, depthshade=False)
        if obs is not None and dirs is None:
            ax.scatter(obs[:, 0], obs[:, 1], obs[:, 2], s=2.5, c="tab:orange", depthshade=False)
        elif obs is not None:
            unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True).clip(1e-9)
            start = obs - unit * half * 0.6
            for p, s0 in zip(obs, start):
                ax.plot(*zip(s0, p), c="tab:orange", lw=2.5)
            ax.scatter(obs[:, 0], obs[:, 1], obs[:, 2], s=40, c="tab:orange", depthshade=False)
        for setter, m in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(m - half, m + half)
        ax.set_box_aspect((1, 1, 1))
        ax.tick_params(labelsize=5)
        if sc is not None:
            ax.set_title(f"#{i}  S={sc[i]:.3f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(str(path), dpi=90)
        plt.close(fig)
    return fig
