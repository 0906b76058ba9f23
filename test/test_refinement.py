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
