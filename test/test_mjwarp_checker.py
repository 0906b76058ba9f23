"""The MJWarp checker (MuJoCo Warp, one world per configuration): MuJoCo's verdicts, batched.

The ``cpu`` cases run MJWarp on Warp's CPU device (the dev venv installs mujoco-warp: the same
kernels as on CUDA), everywhere; the ``cuda`` cases run where CUDA is present (a lent GPU) and
are skipped for that reason only.
"""

from __future__ import annotations

import glob
import sys

import numpy as np
import pytest
import torch

from mace_core.errors import ModelLoadError
from mace_core.robot.backends import exact_checker, warp_device
from mace_core.robot.collision_benchmark import configuration_sets
from mace_core.robot.kinematics import RobotKinematics
from mace_core.robot.mujoco_checker import MuJoCoCollisionChecker
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import Obstacle, load_scene
from mace_core.tensor import TensorSpec

SPEC = TensorSpec.resolve("cpu")
SCENES = sorted(glob.glob("config/scenes/*.yaml"))


@pytest.fixture(scope="module", params=[
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA not present (MJWarp's GPU path)")),
    "cpu",  # Warp's CPU device: the same kernels, in the dev venv (requirements.txt)
])
def warp_checker(request):
    from mace_core.robot.mjwarp_checker import MJWarpCollisionChecker
    return MJWarpCollisionChecker(device=request.param, max_worlds=512)


@pytest.fixture(scope="module")
def kin() -> RobotKinematics:
    return RobotKinematics.panda(SPEC)


@pytest.fixture(scope="module")
def cpu_checker() -> MuJoCoCollisionChecker:
    return MuJoCoCollisionChecker()


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.split("/")[-1])
def test_same_verdicts_as_mujoco_and_never_free_where_pybullet_collides(
        kin, warp_checker, cpu_checker, path):
    scene = load_scene(path)
    warp_checker.set_obstacles(scene.obstacles)
    cpu_checker.set_obstacles(scene.obstacles)
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        sets = configuration_sets(kin, scene, pb, 600, 0.1, SPEC.generator(5))
        for name, q in sets.items():
            ours = warp_checker.collisions(q)  # more rows than max_worlds: run in chunks
            assert np.array_equal(ours, cpu_checker.collisions(q)), name
            truth = pb.collisions(q)
            assert not (~ours & truth).any(), f"{name}: free where PyBullet collides"


def test_slots_follow_the_scene_and_the_pool_grows(kin, warp_checker):
    many = [Obstacle(name=f"b{k}", kind="box", size=(0.1, 0.1, 0.1),
                     position=(0.3 + 0.05 * (k % 10), -0.4 + 0.1 * (k // 10), 0.3))
            for k in range(40)]  # more boxes than the pool starts with
    small = load_scene("config/scenes/wall.yaml").obstacles
    q = kin.sample_uniform(300, SPEC.generator(9))
    warp_checker.set_obstacles(many)
    assert warp_checker.slots_per_kind >= 40
    assert np.array_equal(warp_checker.collisions(q), MuJoCoCollisionChecker(many).collisions(q))
    warp_checker.set_obstacles(small)
    assert np.array_equal(warp_checker.collisions(q),
                          MuJoCoCollisionChecker(small).collisions(q))
    warp_checker.set_obstacles([])
    assert not warp_checker.world_collision(q).any()


def test_a_full_contact_buffer_grows_instead_of_dropping_contacts(kin, warp_checker,
                                                                  cpu_checker):
    # every link within the detection distance of a box around the whole arm: several contacts
    # in every world
    engulfing = [Obstacle(name="all", kind="box", size=(3.0, 3.0, 3.0), position=(0.0, 0.0, 1.6))]
    cpu_checker.set_obstacles(engulfing)
    warp_checker.set_obstacles(engulfing)
    q = kin.sample_uniform(100, SPEC.generator(2))
    before = warp_checker.contacts_per_world
    warp_checker.contacts_per_world = 1
    warp_checker._worlds, warp_checker._placed = {}, {}
    try:
        ours = warp_checker.collisions(q)
        assert warp_checker.contacts_per_world > 1
    finally:
        warp_checker.contacts_per_world = before
        warp_checker._worlds, warp_checker._placed = {}, {}
    assert ours[:, 1].all()
    assert np.array_equal(ours, cpu_checker.collisions(q))


def test_asked_for_without_the_package_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco_warp", None)  # import fails as if not installed
    with pytest.raises(ModelLoadError, match="requirements-gpu.txt"):
        exact_checker("mjwarp", "cpu")


def test_warp_device_names():
    assert warp_device("cuda") == "cuda"
    assert warp_device("cuda:1") == "cuda:1"
    assert warp_device("cpu") == "cpu"


def test_overstated_contacts_are_measured_again(warp_checker, cpu_checker):
    """The configurations whose mesh contacts overstate a distance past its threshold
    (test_mujoco_checker): MJWarp's verdicts are the re-measured ones too."""
    from test_mujoco_checker import _OVERSTATED
    for scene_name, part, q in _OVERSTATED:
        scene = load_scene(f"config/scenes/{scene_name}.yaml")
        warp_checker.set_obstacles(scene.obstacles)
        cpu_checker.set_obstacles(scene.obstacles)
        rows = np.array([q, q])  # two worlds
        assert warp_checker.collisions(rows)[:, part].all()
        assert np.array_equal(warp_checker.collisions(rows), cpu_checker.collisions(rows))
