"""Observation simulators and scores of the shape domains (Sec. 4.1, App. A and App. C).

Both scores map a batch of candidate clouds ``(N, Q, 3)`` to ``(N,)`` values in [0, 1]:

* partial point cloud (App. C): ``S = exp(-τ CD_k)`` between what a sensor would see of the
  candidate and the observed cloud;
* fingertip contacts (Sec. 4.1, App. A): ``S = max(1 - (1/k) Σ_j ‖p_j - p'_j‖ / ℓ, 0)``.

Distances are measured in units of a length scale ℓ (the prior's ``length_scale``: 0.5 m for the
boxes, 1 for the unit-diameter objects), which is the scale the paper's numbers assume: App. C's
τ = 0.1 goes with a Chamfer distance *summed* over 2048 points of clouds of unit size. In metres
and averaged, CD_k of a 3 cm error is ~1e-3 and exp(-0.1 CD_k) ≈ 1 for every candidate; in
units of ℓ and summed over 2048 points, the same error gives CD_k ≈ 15 and S ≈ 0.2, while a 1 cm
error gives S ≈ 0.85. MACE's CEM objective uses only the ranking of scores, so this choice does
not change the adaptation, only how informative the reported scores are.
"""

from __future__ import annotations

import torch

#: Chamfer sums are taken as (mean over points) x this, the paper's cloud size (App. C).
REFERENCE_POINTS = 2048
#: Cap on squared distances (cloud units²), reached by a missing neighbour (too few visible
#: points): large enough that exp(-τ CD_k) is 0, finite so nothing turns NaN.
_MISSING_SQ_ABS = 1.0e6
#: Distance-matrix entries per block of :func:`_batch_blocks` on a CPU (4 MB of float32).
_CPU_BLOCK_ENTRIES = 1 << 20
#: Half-width, in pixels, of the z-buffer window of :func:`visible_mask`.
_HALF_GRID = 48


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i - b_j‖² for clouds ``(B, P, 3)`` and ``(B, Q, 3)``: ``(B, P, Q)``, >= 0.

    One batched matmul of points augmented with their squared norms; on a memory-bound CPU this
    is about twice as fast as ``torch.cdist(a, b) ** 2``.
    """
    one_a, one_b = torch.ones_like(a[..., :1]), torch.ones_like(b[..., :1])
    a_aug = torch.cat([a, (a * a).sum(-1, keepdim=True), one_a], dim=-1)
    b_aug = torch.cat([-2.0 * b, one_b, (b * b).sum(-1, keepdim=True)], dim=-1)
    return (a_aug @ b_aug.transpose(-1, -2)).clamp_min(0.0)


def knn_sq_distances(a: torch.Tensor, b: torch.Tensor, k: int,
                     b_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances from each point of ``a`` to its ``k`` nearest points of ``b``.

    Args:
        a: ``(B, P, 3)`` query points.
        b: ``(B, Q, 3)`` or ``(Q, 3)`` reference points (broadcast over B).
        k: neighbours per query point (clipped to Q).
        b_mask: ``(B, Q)`` bool, False for points of ``b`` to ignore.

    Returns:
        ``(B, P, k)`` ascending squared distances, at most ``1e6`` (reached where fewer than k
        points of ``b`` are unmasked: those count as 1000 units away).
    """
    if b.dim() == 2:
        b = b.expand(a.shape[0], -1, -1)
    if b_mask is not None:
        # move masked points far away, O(BQ) instead of masking the (B, P, Q) matrix
        far = 1e3 * (1.0 + b.detach().abs().amax())
        b = torch.where(b_mask[..., None], b, far)
    k = min(k, b.shape[1])
    parts = [_k_smallest(pairwise_sq_distances(a[blk], b[blk]), k)
             for blk in _batch_blocks(a.shape[0], a.shape[1] * b.shape[1], a.device)]
    return torch.cat(parts).clamp_max(_MISSING_SQ_ABS)


def _k_smallest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest values of the last dim, ascending: ``(..., k)``."""
    if k == 1:  # min is several times faster than topk on CPU
        return d2.amin(dim=-1, keepdim=True)
    return torch.topk(d2, k, dim=-1, largest=False).values


def _batch_blocks(batch: int, per_item: int, device: torch.device) -> list[slice]:
    """Slices of a batch whose distance matrices (``per_item`` entries each) stay in cache.

    On a CPU the nearest-neighbour search is memory-bound: 128 clouds of 128 x 512 distances
    take 62 ms as one matrix and 19 ms in blocks of 8. A GPU gets the whole batch at once.
    """
    step = batch if device.type != "cpu" else max(1, _CPU_BLOCK_ENTRIES // max(per_item, 1))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dim of ``(B, P)`` values where ``mask`` ``(B, P)`` is True."""
    if mask is None:
        return values.mean(dim=-1)
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)


def chamfer_k(x: torch.Tensor, y: torch.Tensor, k: int = 1, length_scale: float = 1.0,
              x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
              one_sided: bool = False) -> torch.Tensor:
    """Top-k Chamfer distance CD_k of App. C (Chen et al.'s k-nearest variant), batched.

    With ``NN_k(p, A)`` the k nearest points of A to p::

        CD_k(x, y) = 2048 * ( mean_{p in x} (1/k) Σ_{p' in NN_k(p, y)} ‖p' - p‖² / ℓ²
                            + mean_{p' in y} (1/k) Σ_{p in NN_k(p', x)} ‖p - p'‖² / ℓ² )

    i.e. App. C's sums over points, rescaled to 2048 points so that downsampling does not change
    the value, in units of ℓ = ``length_scale``. k = 1 is the usual Chamfer distance.
    ``one_sided`` keeps the first term only (every point of ``x`` must lie near ``y``, not vice
    versa), for a partial ``x`` against a full ``y``.

    Args:
        x: ``(B, P, 3)`` or ``(P, 3)`` (broadcast).
        y: ``(B, Q, 3)`` or ``(Q, 3)``.
        x_mask, y_mask: ``(B, P)`` / ``(B, Q)`` bool: points that take part (e.g. visible).

    Returns:
        ``(B,)`` CD_k >= 0.
    """
    batch = max(x.shape[0] if x.dim() == 3 else 1, y.shape[0] if y.dim() == 3 else 1)
    x = x.expand(batch, -1, -1) if x.dim() == 2 else x
    y = y.expand(batch, -1, -1) if y.dim() == 2 else y
    scale = REFERENCE_POINTS / (length_scale ** 2)
    fwd = _masked_mean(knn_sq_distances(x, y, k, y_mask).mean(dim=-1), x_mask)
    if one_sided:
        return scale * fwd
    bwd = _masked_mean(knn_sq_distances(y, x, k, x_mask).mean(dim=-1), y_mask)
    return scale * (fwd + bwd)


def farthest_point_indices(points: torch.Tensor, m: int) -> torch.Tensor:
    """Choose ``m`` points of a cloud ``(P, 3)`` by farthest-point sampling: indices ``(m,)``.

    Deterministic (starts at the point farthest from the centroid); evenly covers the cloud,
    unlike a random subset. Returns all indices when ``P <= m``.
    """
    p = points.shape[0]
    if p <= m:
        return torch.arange(p, device=points.device)
    chosen = torch.empty(m, dtype=torch.long, device=points.device)
    d2 = ((points - points.mean(dim=0)) ** 2).sum(-1)
    best = d2.argmax()
    d2 = torch.full_like(d2, float("inf"))
    for i in range(m):  # m sequential picks, each vectorised over the P points
        chosen[i] = best
        d2 = torch.minimum(d2, ((points - points[best]) ** 2).sum(-1))
        best = d2.argmax()
    return chosen


def visible_mask(clouds: torch.Tensor, viewpoint: torch.Tensor, target: torch.Tensor,
                 pixel: float, depth_tolerance: float) -> torch.Tensor:
    """Which points a depth camera at ``viewpoint`` sees: a z-buffer on a coarse pinhole grid.

    The camera looks from ``viewpoint`` at ``target``. Points are projected onto its image
    plane with pixels of size ``pixel`` at the target's distance (in cloud units, i.e. an
    angular grid of ``pixel / ‖target - viewpoint‖`` rad); a point is visible when its depth is
    within ``depth_tolerance`` of the nearest depth in its pixel and it is in front of the
    camera. The pixel must be a few times the point spacing, or back-facing points leak through
    gaps between front points.

    Args:
        clouds: ``(N, Q, 3)`` candidate clouds in the observation's frame.
        viewpoint: ``(3,)`` camera position, same frame.
        target: ``(3,)`` point the camera looks at (e.g. the observation's centroid).
        pixel, depth_tolerance: cloud units.

    Returns:
        ``(N, Q)`` bool.
    """
    n, q, _ = clouds.shape
    axis = target - viewpoint
    dist = axis.norm().clamp_min(1e-9)
    w = axis / dist
    helper = torch.zeros_like(w)
    helper[int(torch.argmin(w.abs()))] = 1.0
    u = torch.linalg.cross(w, helper)
    u = u / u.norm()
    v = torch.linalg.cross(w, u)
    rel = clouds - viewpoint
    depth = rel @ w  # (N, Q)
    in_front = depth > 1e-6
    safe = depth.clamp_min(1e-6)
    scale = dist / pixel
    iu = torch.floor((rel @ u) / safe * scale).long()
    iv = torch.floor((rel @ v) / safe * scale).long()
    # a window of (2 * _HALF_GRID + 1)² pixels around the target; points beyond it (far
    # off-axis) share the border pixels, which only matters for absurdly large candidates
    width = 2 * _HALF_GRID + 1
    iu = iu.clamp(-_HALF_GRID, _HALF_GRID) + _HALF_GRID
    iv = iv.clamp(-_HALF_GRID, _HALF_GRID) + _HALF_GRID
    cells = width * width
    cell = iu * width + iv + torch.arange(n, device=clouds.device)[:, None] * cells
    masked_depth = torch.where(in_front, depth, torch.full_like(depth, float("inf")))
    zmin = torch.full((n * cells,), float("inf"), device=clouds.device, dtype=clouds.dtype)
    zmin = zmin.scatter_reduce(0, cell.reshape(-1), masked_depth.reshape(-1), reduce="amin")
    return in_front & (depth <= zmin[cell] + depth_tolerance)


def partial_cloud_scores(candidates: torch.Tensor, observation: torch.Tensor, k: int,
                         temperature: float, length_scale: float,
                         visible: torch.Tensor | None = None,
                         held_out: torch.Tensor | None = None) -> torch.Tensor:
    """Partial point-cloud score S = exp(-τ CD_k) of App. C: ``(N,)`` in [0, 1].

    With ``visible`` (the candidates' points a camera at the request's viewpoint would see),
    CD_k is symmetric between the observation and the visible part. Without it, it is one-sided,
    observation to candidate: every observed point must lie on the candidate's surface, while
    the candidate may extend where nothing was observed (a partial-to-full comparison),
    corrected for the candidates' point density when ``held_out`` points of the same
    candidates are given (:func:`one_sided_chamfer`).

    Args:
        candidates: ``(N, Q, 3)`` (downsampled) candidate clouds.
        observation: ``(P, 3)`` observed partial cloud, same frame.
        k: neighbours of CD_k (App. C: 5).
        temperature: τ (App. C: 0.1).
        length_scale: ℓ, the unit of distances (see the module docstring).
        visible: ``(N, Q)`` bool or None.
        held_out: ``(N, H, 3)`` other points of the candidates, for the one-sided score.
    """
    if visible is None and held_out is not None:
        cd = one_sided_chamfer(observation, candidates, held_out, k, length_scale)
    else:
        cd = chamfer_k(observation, candidates, k=k, length_scale=length_scale, y_mask=visible,
                       one_sided=visible is None)
    return torch.exp(-temperature * cd)


def one_sided_chamfer(observation: torch.Tensor, candidates: torch.Tensor,
                      held_out: torch.Tensor, k: int, length_scale: float) -> torch.Tensor:
    """One-sided CD_k from a partial cloud to full candidates, corrected for point density.

    A perfect candidate still scores a positive distance: its points are samples of its
    surface, and the squared distance from a surface point to its j-th nearest of n samples
    spread over an area A averages about j A / (π n). Smaller candidates (denser points) would
    score better: with the top half of a box hidden, MACE shrank every answer to the cut. So
    each observed point's term subtracts that of the candidate's own nearest held-out point
    (decoded, but not among the scored ones), a sample of the same surface at the same place::

        CD = 2048 / ℓ² * max(0, mean_o (1/k) Σ_{j<=k} (‖o - NN_j(o)‖² - ‖h_o - NN_j(h_o)‖²))

    with NN_j among the scored points and h_o the held-out point nearest to o. What is left
    measures how far the observation lies off the candidate's surface, whatever its density;
    candidates that fit within sampling noise all score 0. (A scored point's distance to its
    nearest other one over-corrects: the points nearest to observations are the isolated ones,
    about 30 % farther from their neighbours.)

    Args:
        observation: ``(P, 3)`` observed partial cloud.
        candidates: ``(N, Q, 3)`` scored points of the candidate clouds, same frame.
        held_out: ``(N, H, 3)`` other points of the same clouds, drawn as the scored ones.
        k: neighbours of CD_k.
        length_scale: ℓ, the unit of distances.

    Returns:
        ``(N,)`` density-corrected one-sided CD_k >= 0.
    """
    n, q, _ = candidates.shape
    k = min(k, q)
    obs = observation.expand(n, -1, -1)
    both = torch.cat([candidates, held_out], dim=1)

    def block_excess(blk: slice) -> torch.Tensor:
        d2 = pairwise_sq_distances(obs[blk], both[blk])  # (n', P, Q + H)
        to_obs = _k_smallest(d2[..., :q], k)  # (n', P, k)
        nearest = d2[..., q:].argmin(dim=-1)[..., None].expand(-1, -1, 3)
        proxy = held_out[blk].gather(1, nearest)  # (n', P, 3)
        baseline = _k_smallest(pairwise_sq_distances(proxy, candidates[blk]), k)
        return (to_obs.mean(dim=-1) - baseline.mean(dim=-1)).mean(dim=-1).clamp_min(0.0)

    blocks = _batch_blocks(n, obs.shape[1] * both.shape[1], candidates.device)
    excess = torch.cat([block_excess(blk) for blk in blocks])
    return REFERENCE_POINTS / length_scale ** 2 * excess


def simulate_contacts(clouds: torch.Tensor, directions: torch.Tensor,
                      finger_radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fingertip contacts of k fingers closing on the origin (App. A), batched over clouds.

    Finger j moves along the unit direction ``d_j`` toward the origin, on the line through the
    origin. Its contact is the point of the cloud within ``finger_radius`` of that line that is
    farthest from the origin on the finger's side, i.e. that maximises ``p · (-d_j)``. A finger
    with no point within its radius misses: its contact is the origin and ``hit`` is False.

    Args:
        clouds: ``(N, Q, 3)``.
        directions: ``(k, 3)`` finger directions (normalised here; must be non-zero).
        finger_radius: cloud units.

    Returns:
        contacts ``(N, k, 3)`` and hit ``(N, k)`` bool.
    """
    approach = -directions / directions.norm(dim=-1, keepdim=True)  # (k, 3)
    along = clouds @ approach.T  # (N, Q, k)
    radial2 = (clouds * clouds).sum(-1, keepdim=True) - along ** 2
    inside = radial2 <= finger_radius ** 2
    key = torch.where(inside, along, torch.full_like(along, -float("inf")))
    best = key.argmax(dim=1)  # (N, k)
    hit = inside.any(dim=1)
    contacts = clouds.gather(1, best[..., None].expand(-1, -1, 3))
    return torch.where(hit[..., None], contacts, torch.zeros_like(contacts)), hit


def contact_scores(candidates: torch.Tensor, contacts: torch.Tensor, directions: torch.Tensor,
                   finger_radius: float, length_scale: float) -> torch.Tensor:
    """Grasp score of Sec. 4.1: S = max(1 - (1/k) Σ_j ‖p_j - p'_j‖ / ℓ, 0): ``(N,)``.

    ``p'_j`` are the contacts simulated on each candidate ``(N, Q, 3)`` by
    :func:`simulate_contacts`, ``p_j`` the observed ``contacts`` ``(k, 3)``. Distances are in
    units of ℓ (the paper's clouds are of unit size; 1 - distance in metres would hardly move).
    """
    sim, _ = simulate_contacts(candidates, directions, finger_radius)
    err = (sim - contacts).norm(dim=-1).mean(dim=-1) / length_scale
    return (1.0 - err).clamp_min(0.0)
