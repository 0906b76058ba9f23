"""Where an observed object stands, amortized: a Gaussian over its placement from one look.

:func:`.placement.initial_placement` starts θ_p at what the observation says by rule: the
seen points' bounding-box centre and, for a prior without metric scale, their widest pair over
a fixed share. A partial view biases both (the centre toward the seen side, the size short of
the object's), and by how much depends on what was seen: a flat cut face, a camera's side, the
fingers' pattern. :class:`PlacementEstimator` learns that dependence: a PointNet (Qi et al.,
CVPR 2017) over the observation in the support frame that outputs a Gaussian q(x, y, log s |
observation), trained by maximum likelihood on the prior's own training shapes placed and
observed as the placed benchmark does (:mod:`.placement_training`). MACE then starts its
placement from that Gaussian (the same place the rule's would take), so the CEM adapts shape
and placement from an informed start instead of the seen side's centre.

Inputs, made invariant to where the object stands and to its size: each observed point (or
contact) relative to the observation's bounding-box centre in x, y and divided by its extent
d (the widest pair of points), with z / d (the support surface is z = 0); a contact's finger
direction as three more channels; globally log d, the direction to the viewpoint (a camera
view) and the grasp centre relative to the points (a grasp), each with a flag. Outputs
(:meth:`PlacementEstimator.gaussian`): the mean and std of (x, y, log s) in the support frame.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..tensor import TensorSpec

#: points the network reads of an observation (drawn at random when there are more, repeated
#: when fewer: the max-pool does not count copies)
INPUT_POINTS = 128
#: global inputs: log d, viewpoint direction (3) and its flag, grasp centre (3) and its flag
GLOBAL_FEATURES = 9
#: per-point inputs: position (3) and finger direction (3; 0 for a cloud's points)
POINT_FEATURES = 6
#: bounds of the predicted log-std (normalised units), for a stable likelihood
LOG_STD_RANGE = (-6.0, 1.0)


def observation_features(points: torch.Tensor, directions: torch.Tensor | None = None,
                         viewpoint: torch.Tensor | None = None,
                         grasp_center: torch.Tensor | None = None,
                         generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One observation in the support frame as the network's inputs.

    Args:
        points: ``(P, 3)`` observed points or fingertip contacts, m.
        directions: ``(P, 3)`` the fingers' directions (contacts), or None.
        viewpoint: ``(3,)`` the camera's position, or None.
        grasp_center: ``(3,)`` the point the fingers closed on, or None.
        generator: draws the :data:`INPUT_POINTS` points read (None: the first ones, evenly).

    Returns:
        per-point features ``(INPUT_POINTS, 6)``, global features ``(9,)``, the normaliser's
        centre ``(2,)`` (x, y) and extent ``()`` (m).
    """
    pts = points.to(torch.float32)
    lo, hi = pts.amin(dim=0), pts.amax(dim=0)
    centre = 0.5 * (lo[:2] + hi[:2])
    extent = (torch.cdist(pts, pts).max() if pts.shape[0] <= 2048 else (hi - lo).norm()
              ).clamp_min(1e-3)
    rel = torch.cat([pts[:, :2] - centre, pts[:, 2:3]], dim=1) / extent
    per_point = torch.cat([rel, torch.zeros_like(rel) if directions is None
                           else directions.to(torch.float32)], dim=1)
    n = per_point.shape[0]
    if generator is None:
        pick = torch.linspace(0, n - 1, INPUT_POINTS, device=pts.device).round().long()
    else:
        pick = (torch.randint(n, (INPUT_POINTS,), generator=generator, device=pts.device)
                if n < INPUT_POINTS else
                torch.randperm(n, generator=generator, device=pts.device)[:INPUT_POINTS])
    glob = torch.zeros(GLOBAL_FEATURES, device=pts.device)
    glob[0] = extent.log()
    if viewpoint is not None:
        toward = viewpoint.to(torch.float32) - torch.cat([centre, pts[:, 2].mean()[None]])
        glob[1:4] = toward / toward.norm().clamp_min(1e-9)
        glob[4] = 1.0
    if grasp_center is not None:
        g = grasp_center.to(torch.float32)
        glob[5:8] = torch.cat([g[:2] - centre, g[2:3]]) / extent
        glob[8] = 1.0
    return per_point[pick], glob, centre, extent


class PlacementEstimator(nn.Module):
    """q(x, y, log s | observation): a PointNet (shared per-point MLP, max-pool, MLP head).

    Args:
        hidden: width of the per-point layers (the pooled feature is twice it).
        metric: the prior is in metres (its scale is known: log s is not predicted).
    """

    def __init__(self, hidden: int = 128, metric: bool = True):
        super().__init__()
        self.hidden, self.metric = hidden, metric
        self.point_mlp = nn.Sequential(
            nn.Linear(POINT_FEATURES, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * hidden))
        self.head = nn.Sequential(
            nn.Linear(2 * hidden + GLOBAL_FEATURES, 2 * hidden), nn.ReLU(),
            nn.Linear(2 * hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 6))

    def forward(self, per_point: torch.Tensor, glob: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, M, 6)`` and ``(B, 9)`` -> mean and log-std ``(B, 3)`` of the normalised
        placement ((x - c_x) / d, (y - c_y) / d, log(s / d))."""
        pooled = self.point_mlp(per_point).amax(dim=1)
        out = self.head(torch.cat([pooled, glob], dim=-1))
        return out[:, :3], out[:, 3:].clamp(*LOG_STD_RANGE)

    def nll(self, per_point: torch.Tensor, glob: torch.Tensor, target: torch.Tensor
            ) -> torch.Tensor:
        """Mean Gaussian negative log-likelihood of normalised placements ``(B, 3)`` (the
        log-scale left out for a metric prior): the training loss."""
        mean, log_std = self(per_point, glob)
        z = (target - mean) / log_std.exp()
        per_dim = 0.5 * z * z + log_std + 0.5 * math.log(2.0 * math.pi)
        return (per_dim[:, :2] if self.metric else per_dim).sum(dim=-1).mean()

    @torch.no_grad()
    def gaussian(self, points: torch.Tensor, directions: torch.Tensor | None = None,
                 viewpoint: torch.Tensor | None = None,
                 grasp_center: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``(3,)`` of (x [m], y [m], log s) for one observation in the support
        frame (inputs as :func:`observation_features`); the log-scale's are 0 for a metric
        prior."""
        device = next(self.parameters()).device
        per_point, glob, centre, extent = observation_features(
            points.to(device), None if directions is None else directions.to(device),
            None if viewpoint is None else viewpoint.to(device),
            None if grasp_center is None else grasp_center.to(device))
        mean, log_std = self(per_point[None], glob[None])
        mean, std = mean[0], log_std[0].exp()
        xy = centre + extent * mean[:2]
        if self.metric:
            zero = xy.new_zeros(1)
            return torch.cat([xy, zero]), torch.cat([extent * std[:2], zero])
        return (torch.cat([xy, (mean[2] + extent.log())[None]]),
                torch.cat([extent * std[:2], std[2:]]))


def load_placement_estimator(entry, models_dir: str | Path, spec: TensorSpec
                             ) -> PlacementEstimator | None:
    """The estimator of a shape registry entry (``placement_weights``, ``placement_hidden``,
    ``metric``), frozen on ``spec``'s device in float32; None where the entry names none.

    Raises:
        ModelLoadError: a missing or unreadable file, tensors that do not match the width, or
            non-finite values.
    """
    if not entry.placement_weights:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(models_dir) / entry.placement_weights
    what = f"prior '{entry.name}': placement estimator {path}"
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: cannot read it: {exc}") from exc
    model = PlacementEstimator(entry.placement_hidden, metric=entry.metric)
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(
            tensors[k].shape != expected[k].shape for k in expected):
        raise ModelLoadError(f"{what} does not match placement_hidden = "
                             f"{entry.placement_hidden}")
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
        raise ModelLoadError(f"{what} has non-finite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.to(spec.device).eval().requires_grad_(False)
    return model
