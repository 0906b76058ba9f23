"""The convex-optimization referee: hull-to-primitive distances by hand, and MuJoCo's
clearance (which it referees against PyBullet's) matched on configurations near obstacles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mace_core.robot.hull_distance import (HullDistanceReference, hull_hull_distance,
                                           hull_obstacle_distance)
from mace_core.robot.kinematics import RobotKinematics
from mace_core.robot.mujoco_checker import MuJoCoCollisionChecker
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import Obstacle, load_scene
from mace_core.tensor import TensorSpec

SPEC = TensorSpec.resolve("cpu")
#: a unit cube's corners, centred at the origin, turned 45 deg about z (a corner leads along x)
_C = math.sqrt(0.5)
CUBE = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
CUBE = CUBE @ np.array([[_C, -_C, 0.0], [_C, _C, 0.0], [0.0, 0.0, 1.0]]).T


@pytest.mark.parametrize("obstacle, expected", [
    # a box 2 m off along x, 0.2 m deep: the cube's leading edge is at x = sqrt(0.5)
    (Obstacle("b", "box", (0.2, 1.0, 1.0), (2.0, 0.0, 0.0)), 2.0 - 0.1 - _C),
    # the same box above the cube: face to face
    (Obstacle("b", "box", (1.0, 1.0, 0.2), (0.0, 0.0, 1.0)), 1.0 - 0.1 - 0.5),
    # a sphere above a face's centre
    (Obstacle("s", "sphere", (0.25,), (0.0, 0.0, 1.5)), 1.5 - 0.25 - 0.5),
    # an upright cylinder beside the leading edge: radial gap
    (Obstacle("c", "cylinder", (1.0, 0.3), (1.5, 0.0, 0.0)), 1.5 - 0.3 - _C),
    # a flat cylinder under the cube: axial gap
    (Obstacle("c", "cylinder", (0.1, 2.0), (0.0, 0.0, -1.0)), 1.0 - 0.05 - 0.5),
    # overlapping
    (Obstacle("b", "box", (0.5, 0.5, 0.5), (0.4, 0.0, 0.0)), 0.0),
])
def test_distances_by_hand(obstacle, expected):
    assert hull_obstacle_distance(CUBE, obstacle) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("corner", [(1, 1, 1), (1, 1, 0)])
def test_edges_are_rounded_as_pybullets(corner):
    """PyBullet rounds box edges and corners by 1 mm: a point 5 mm off a corner along its
    diagonal reads (sqrt(3) - 1) mm farther, off an edge (sqrt(2) - 1) mm; ``rounded=False``
    gives the sharp box."""
    box = Obstacle("b", "box", (0.2, 0.4, 0.6), (0.0, 0.0, 0.0))
    direction = np.array(corner, dtype=float) / np.linalg.norm(corner)
    tip = np.array([0.1, 0.2, 0.3]) * np.array(corner) + 0.005 * direction
    # a 1 mm cube reaching the tip, outwards along the corner's axes, centred on the others
    steps = [(0.0, 1e-3) if c else (-5e-4, 5e-4) for c in corner]
    small = tip + np.array([[x, y, z] for x in steps[0] for y in steps[1] for z in steps[2]])
    extra = (math.sqrt(sum(corner)) - 1.0) * 1e-3
    assert hull_obstacle_distance(small, box, rounded=False) == pytest.approx(0.005, abs=1e-7)
    assert hull_obstacle_distance(small, box) == pytest.approx(0.005 + extra, abs=1e-7)


def test_agrees_with_mujoco_near_the_obstacles():
    """MuJoCo's distances (its 1 mm PyBullet margin removed) match to 1 µm where a link is
    within 10 cm of an obstacle; farther ones give the reach."""
    kin = RobotKinematics.panda(SPEC)
    referee = HullDistanceReference(kin)
    scene = load_scene("config/scenes/box.yaml")
    mujoco = MuJoCoCollisionChecker(scene.obstacles)
    q = kin.sample_uniform(400, SPEC.generator(4))
    theirs = mujoco.clearance(q, reach_m=0.1) + 1e-3  # hull distance, margin removed
    near = np.flatnonzero((theirs > 0.0) & (theirs < 0.1))[:8]
    far = np.flatnonzero(theirs >= 0.1)[:2]
    assert near.size == 8 and far.size == 2
    for k in near:
        ours = referee.world_distance(q[k], scene.obstacles, reach_m=0.1)
        assert ours == pytest.approx(theirs[k], abs=1e-6), k
    for k in far:
        assert referee.world_distance(q[k], scene.obstacles, reach_m=0.1) == pytest.approx(
            0.1, abs=1e-3)


def test_hull_to_hull_by_hand():
    # the turned cube's leading edge (x = sqrt(0.5)) against an upright cube's face at x = 1.5
    upright = np.array([[x, y, z] for x in (1.5, 2.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    assert hull_hull_distance(CUBE, upright) == pytest.approx(1.5 - _C, abs=1e-7)
    # edge to edge: the upright cube turned the same way and lifted clear of the first one
    lifted = CUBE + np.array([0.0, 0.0, 1.25])
    assert hull_hull_distance(CUBE, lifted) == pytest.approx(0.25, abs=1e-7)
    assert hull_hull_distance(CUBE, CUBE + 0.3) == pytest.approx(0.0, abs=1e-7)  # overlap


def test_self_distance_follows_pybullets_verdicts():
    """Deep self-collisions PyBullet finds give 0; configurations it calls far from any
    self-contact (its distance above 5 mm) give more than its 2 mm margins."""
    kin = RobotKinematics.panda(SPEC)
    referee = HullDistanceReference(kin)
    q = kin.sample_uniform(200, SPEC.generator(6))
    with PyBulletCollisionChecker([]) as pb:
        touching = pb.self_collision(q)
    hit, clear = np.flatnonzero(touching)[:3], np.flatnonzero(~touching)[:3]
    assert hit.size == 3 and clear.size == 3
    for k in hit:
        assert referee.self_distance(q[k]) <= 2e-3
    for k in clear:
        assert referee.self_distance(q[k]) > 2e-3
