"""The Panda's closed-form IK against the URDF's forward kinematics (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from mace_core.array_ops import NUMPY_OPS, TORCH_OPS
from mace_core.robot.closed_form_ik import PandaClosedFormIK
from mace_core.robot.kinematics import RobotKinematics, URDFModel, panda_urdf_path
from mace_core.tensor import TensorSpec

#: where the closed form runs: NumPy on the CPU (the default there), torch on the CPU (the
#: code path CUDA takes, checked where there is no GPU), CUDA
PATHS = ["cpu", "cpu-torch"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=PATHS)
def path(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def kin(path) -> RobotKinematics:
    return RobotKinematics.panda(TensorSpec(torch.device(path.split("-")[0]), torch.float64))


@pytest.fixture(scope="module")
def ik(kin, path) -> PandaClosedFormIK:
    return PandaClosedFormIK(kin, ops=TORCH_OPS if path == "cpu-torch" else None)


def _uniform(kin: RobotKinematics, n: int, seed: int) -> torch.Tensor:
    return kin.sample_uniform(n, torch.Generator(device=kin.spec.device).manual_seed(seed))


def _recovery_error(sols: torch.Tensor, ok: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N,)`` max-norm distance from each ``q`` to the nearest valid solution (inf: none)."""
    return (sols - q[:, None]).abs().amax(-1).masked_fill(~ok, math.inf).amin(-1)


def test_recovers_uniform_configurations_from_their_own_q7(kin, ik):
    """At least 99 % of configurations uniform within the limits are among the solutions of
    their own pose and q7 (the misses are singular: a straight or exactly folded elbow, a wrist
    at +-pi/2), straighter elbows (q4 > -0.4664, the mirrored branch) included."""
    q = _uniform(kin, 4000, 0)
    sols, ok = ik.solve(kin.ee_pose(q), q[:, 6])
    recovered = _recovery_error(sols, ok, q) < 1e-6
    assert recovered.float().mean() >= 0.99
    straight = q[:, 3] > -0.4664
    assert straight.sum() > 300 and recovered[straight].float().mean() >= 0.99
    assert ok.sum(-1).float().mean() > 2.0  # several solutions per pose and q7


def test_every_solution_reproduces_the_pose(kin, ik):
    q = _uniform(kin, 2000, 1)
    pose = kin.ee_pose(q)
    sols, ok = ik.solve(pose, q[:, 6])
    reached = kin.ee_pose(sols[ok])
    target = pose[:, None].expand(-1, 8, -1, -1)[ok]
    pos_err = (reached[:, :3, 3] - target[:, :3, 3]).norm(dim=-1)
    rot_err = (reached[:, :3, :3] - target[:, :3, :3]).abs().amax((-1, -2))
    assert pos_err.max() < 1e-9 and rot_err.max() < 1e-9
    assert ((sols[ok] >= kin.lower) & (sols[ok] <= kin.upper)).all()
    assert (sols[ok][:, 6] == q[:, None, 6].expand(-1, 8)[ok]).all()  # q7 as asked


def test_projection_takes_the_nearest_branch_at_the_samples_q7(kin, ik):
    """``project``: each configuration onto one pose, the branch nearest it at its own q7;
    rows with no branch come back unchanged."""
    pose = kin.ee_pose(_uniform(kin, 1, 3))[0].to(torch.float64)
    q = _uniform(kin, 500, 4).to(torch.float64)
    projected, found = ik.project(pose, q)
    assert found.float().mean() > 0.5
    reached = ik.kin64.ee_pose(projected[found])
    assert (reached[:, :3, 3] - pose[:3, 3]).norm(dim=-1).max() < 1e-9
    assert (projected[:, 6] == q[:, 6]).all()
    assert torch.equal(projected[~found], q[~found])
    sols, ok = ik.solve(pose.expand(q.shape[0], 4, 4), q[:, 6])
    nearest = _recovery_error(sols, ok, q)
    assert torch.allclose((projected - q).abs().amax(-1)[found], nearest[found])


def test_both_elbows_and_both_shoulders_come_out(kin, ik):
    """One reachable pose has solutions on both sides of the published elbow limit and with
    both signs of q2."""
    q = kin.spec.tensor([[0.3, 0.4, -0.2, -0.3, 0.3, 1.4, 0.5]])
    sols, ok = ik.solve(kin.ee_pose(q), q[:, 6])
    valid = sols[ok]
    assert valid.shape[0] >= 4
    assert (valid[:, 3] > -0.4664).any() and (valid[:, 3] <= -0.4664).any()
    assert (valid[:, 1] > 0).any() and (valid[:, 1] < 0).any()


def test_singular_unreachable_and_malformed_poses_give_masked_rows(kin, ik):
    q = kin.spec.tensor([[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.7],   # shoulder singular (q2 = 0)
                         [0.2, 0.3, 0.1, -2.0, 0.1, 1.8, 0.2]])
    pose = kin.ee_pose(q)
    far = pose[1].clone()
    far[:3, 3] = kin.spec.tensor([2.0, 0.0, 0.5])  # beyond the arm's reach
    broken = pose[1].clone()
    broken[0, 0] = float("nan")
    poses = torch.stack([pose[0], far, broken, pose[1]])
    q7 = torch.cat([q[:, 6], q[1:, 6], q[1:, 6]])[[0, 2, 3, 1]]
    sols, ok = ik.solve(poses, q7)
    assert torch.isfinite(sols).all()
    assert not ok[1].any() and not ok[2].any()
    assert (sols[~ok] == 0).all()
    assert ok[3].any()
    # a batch with no solution at all
    sols, ok = ik.solve(torch.stack([far, broken]), q7[1:3])
    assert not ok.any() and (sols == 0).all()
    # the singular pose: whatever comes out reproduces it
    if ok[0].any():
        reached = kin.ee_pose(sols[0][ok[0]])
        assert (reached[:, :3, 3] - pose[0, :3, 3]).norm(dim=-1).max() < 1e-6


def test_numpy_and_torch_solve_alike():
    """The CPU's NumPy path and CUDA's torch path are one construction: same answers."""
    kin = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    q = _uniform(kin, 1000, 3)
    q7 = torch.cat([q[:, 6], torch.linspace(-2.9, 2.9, 1000, dtype=torch.float64)])
    pose = kin.ee_pose(q).repeat(2, 1, 1)
    sols, ok = PandaClosedFormIK(kin, ops=NUMPY_OPS).solve(pose, q7)
    sols_t, ok_t = PandaClosedFormIK(kin, ops=TORCH_OPS).solve(pose, q7)
    assert sols.dtype == sols_t.dtype == torch.float64 and ok.dtype == ok_t.dtype == torch.bool
    assert (ok == ok_t).float().mean() > 0.999  # a pose check at its tolerance may differ
    both = ok & ok_t
    assert both.sum() > 4000 and (sols[both] - sols_t[both]).abs().max() < 1e-9


def test_knows_the_panda_from_another_chain(kin, ik):
    assert ik.matches()
    with open(panda_urdf_path()) as f:
        text = f.read()
    # a longer forearm: joint 5 at 0.40 m from joint 4 instead of 0.384
    other = text.replace('xyz="-0.0825 0.384 0"', 'xyz="-0.0825 0.40 0"')
    assert other != text
    changed = RobotKinematics(URDFModel.from_text(other), kin.spec)
    assert not PandaClosedFormIK(changed).matches()
