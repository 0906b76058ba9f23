"""Exact refinement: seeds a few centimetres off reach the target within 0.1 mm."""

import numpy as np
import pytest
import torch

from mace_core.ik.refinement import (DLSRefiner, IKTarget, RefinementConfig, TracIKRefiner,
                                     pose_errors)
from mace_core.robot.kinematics import RobotKinematics, panda_urdf_path
from mace_core.robot.rotations import matrix_to_quaternion_xyzw
from mace_core.tensor import TensorSpec

SPEC = TensorSpec.resolve("cpu", torch.float64)
KIN = RobotKinematics.panda(SPEC)


def seeds_near_target(n=32, noise=0.1, seed=0):
    """Configurations whose end effector is a few cm from one target position."""
    gen = SPEC.generator(seed)
    q_true = KIN.sample_uniform(1, gen).expand(n, 7)
    q0 = (q_true + noise * torch.randn(n, 7, generator=gen, dtype=torch.float64)).clamp(
        KIN.lower, KIN.upper)
    return q_true[0], q0


@pytest.mark.parametrize("name", ["dls", "tracik"])
def test_position_only_refinement_reaches_a_tenth_of_a_millimetre(name):
    q_true, q0 = seeds_near_target()
    target = IKTarget(position=KIN.ee_position(q_true[None])[0])
    cfg = RefinementConfig()
    refiner = (DLSRefiner(KIN, cfg) if name == "dls"
               else TracIKRefiner(KIN, open(panda_urdf_path()).read(), cfg))
    before, _ = pose_errors(KIN, q0, target)
    assert before.min() > 1e-3  # the seeds really are off target
    q = refiner.refine(q0, target)
    err, _ = pose_errors(KIN, q, target)
    assert (err < 1e-4).float().mean() >= 0.9
    assert KIN.within_limits(q).all()
    # refinement stays near its seed: it keeps the seed's (collision-free) neighbourhood
    assert ((q - q0).abs().amax(-1) < 1.0).float().mean() >= 0.9


def test_dls_with_orientation_reaches_the_pose():
    q_true, q0 = seeds_near_target(noise=0.05, seed=3)
    pose = KIN.ee_pose(q_true[None])[0]
    target = IKTarget(position=pose[:3, 3], rotation=pose[:3, :3], orientation_tolerance=1e-3)
    q = DLSRefiner(KIN, RefinementConfig(max_iterations=80)).refine(q0, target)
    pos_err, rot_err = pose_errors(KIN, q, target)
    ok = (pos_err < 1e-4) & (rot_err < 1e-3)
    assert ok.float().mean() >= 0.9


def test_quaternion_conversion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        quat = rng.normal(size=4)
        quat /= np.linalg.norm(quat)
        x, y, z, w = quat
        r = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        back = matrix_to_quaternion_xyzw(r)
        assert min(np.abs(back - quat).max(), np.abs(back + quat).max()) < 1e-9


@pytest.mark.parametrize("with_rotation", [True, False])
def test_analytic_projection_is_the_same_in_numpy_and_torch(with_rotation):
    """The closed-form refiner's projection runs in NumPy on the CPU and in torch on CUDA (one
    construction, :mod:`mace_core.array_ops`): both give the same answers in the same order,
    for a full pose and for the seeds' own orientations (a position target)."""
    from mace_core.array_ops import TORCH_OPS
    from mace_core.ik.refinement import AnalyticRefiner
    from mace_core.robot.closed_form_ik import PandaClosedFormIK

    q_true, q0 = seeds_near_target(n=16, noise=0.05, seed=3)
    pose = KIN.ee_pose(q_true[None])[0]
    target = IKTarget(position=pose[:3, 3], rotation=pose[:3, :3] if with_rotation else None,
                      orientation_tolerance=1e-3)
    numpy_side = AnalyticRefiner(KIN, PandaClosedFormIK(KIN)).project(q0, target)
    torch_side = AnalyticRefiner(KIN, PandaClosedFormIK(KIN, ops=TORCH_OPS)).project(q0, target)
    for a, b in zip(numpy_side, torch_side):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        assert a.shape[0] > 0 and (a - b).abs().max() < 1e-9
    found = numpy_side[0]
    reached = KIN.ee_pose(found)
    assert (reached[:, :3, 3] - target.position).norm(dim=-1).max() < 1e-9
