"""The learned-IK literature's accuracy protocol for an IK prior's raw samples.

aVIPS thesis (Musekamp 2023), Table 5.1: hand poses of ``poses`` configurations uniform within
the Panda's joint limits, ``samples`` draws of the prior for each, the mean position error (mm)
and the mean geodesic orientation error (deg) of the drawn configurations' hand poses. A
position-conditioned prior reads the position only: its orientation error says how much the
orientation is left to chance. ``mace-bench ik --protocol prior-accuracy --ik-prior NAME``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..robot.kinematics import RobotKinematics
from ..robot.rotations import geodesic_distance
from .conditioning import context_of
from .prior import ARGMMPrior

#: The literature's figures on the Panda: (model, position error mm, orientation error deg,
#: source), in the order of the issue that asked for this protocol.
LITERATURE = (
    ("IKFlow (normalising flow)", 7.72, 2.81, "aVIPS thesis Table 5.1"),
    ("GMM by plain amortized VI", 5.80, 2.19, "aVIPS thesis Table 5.1"),
    ("aVIPS", 5.60, 2.05, "aVIPS thesis Table 5.1"),
    ("PAIK (1,000 samples x 3,000 poses)", 2.9, 1.5, "PAIK Table I, own protocol"),
    ("NODEIK (543 ms per 1,000 samples)", 3.2, 0.3, "PAIK Table I, own protocol"),
)


@dataclass
class PriorAccuracy:
    """One prior's figures under the protocol."""

    prior: str  #: registry name
    conditioning: str  #: what it reads ("position" or "pose")
    poses: int  #: target poses
    samples_per_pose: int  #: draws per pose
    mean_position_error_mm: float
    median_position_error_mm: float
    mean_orientation_error_deg: float
    median_orientation_error_deg: float
    within_limits_fraction: float  #: share of draws inside the joint limits
    sampling_time_s: float  #: wall time of all the draws (forward kinematics not included)


def prior_accuracy(prior: ARGMMPrior, kin: RobotKinematics, name: str, poses: int = 10_240,
                   samples: int = 25, seed: int = 0, chunk: int = 16_384) -> PriorAccuracy:
    """Run the protocol: ``poses`` uniform configurations' hand poses, ``samples`` draws each
    (in chunks of ``chunk`` draws), errors of the drawn configurations' hand poses."""
    spec = kin.spec
    gen = spec.generator(seed)
    targets = kin.ee_pose(kin.sample_uniform(poses, gen))  # (P, 4, 4)
    context = context_of(prior.config.conditioning, targets)  # (P, C)
    rows = context.repeat_interleave(samples, 0)  # (P * S, C): each pose's draws together
    truth = targets.repeat_interleave(samples, 0)
    drawn, elapsed = [], 0.0
    with torch.inference_mode():
        for part in rows.split(chunk):
            start = time.perf_counter()
            drawn.append(prior.sample(part, gen))
            elapsed += time.perf_counter() - start
        q = torch.cat(drawn)
        reached = torch.cat([kin.ee_pose(c) for c in q.split(chunk)])
        pos = (reached[:, :3, 3] - truth[:, :3, 3]).norm(dim=-1) * 1e3
        turn = torch.rad2deg(geodesic_distance(reached[:, :3, :3], truth[:, :3, :3]))
        inside = kin.within_limits(q).float().mean()
    return PriorAccuracy(prior=name, conditioning=prior.config.conditioning, poses=poses,
                         samples_per_pose=samples, mean_position_error_mm=float(pos.mean()),
                         median_position_error_mm=float(pos.median()),
                         mean_orientation_error_deg=float(turn.mean()),
                         median_orientation_error_deg=float(turn.median()),
                         within_limits_fraction=float(inside), sampling_time_s=elapsed)


def format_table(results: list[PriorAccuracy]) -> str:
    """The literature's rows and this project's, as a text table."""
    lines = [f"{'model':<40} {'pos mm':>8} {'rot deg':>8}  source"]
    for model, pos, rot, source in LITERATURE:
        lines.append(f"{model:<40} {pos:>8.2f} {rot:>8.2f}  {source}")
    for r in results:
        lines.append(f"{r.prior + ' (' + r.conditioning + ')':<40} "
                     f"{r.mean_position_error_mm:>8.2f} {r.mean_orientation_error_deg:>8.2f}  "
                     f"this project: {r.samples_per_pose} x {r.poses:,} poses, median "
                     f"{r.median_position_error_mm:.2f} mm / {r.median_orientation_error_deg:.2f}"
                     f" deg, within limits {r.within_limits_fraction:.3f}, sampled in "
                     f"{r.sampling_time_s:.2f} s")
    return "\n".join(lines)


def report(results: list[PriorAccuracy]) -> dict:
    """The JSON-ready report."""
    return {"protocol": "prior-accuracy",
            "literature": [dict(model=m, position_error_mm=p, orientation_error_deg=o, source=s)
                           for m, p, o, s in LITERATURE],
            "priors": [asdict(r) for r in results]}
