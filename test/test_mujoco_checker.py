"""The MuJoCo checker against PyBullet's exact checks: never free where PyBullet collides.

Every scene of ``config/scenes/`` (copies of the benchmark scenes), on the benchmark's three
configuration sets (uniform, near free ones, hand in the target region), and scenes of spheres
and cylinders; the full counts are ``python -m mace_core.robot.collision_benchmark``'s.
"""

from __future__ import annotations

import glob
import inspect

import numpy as np
import pytest

from mace_core.robot.collision import ExactCollisionChecker
from mace_core.robot.collision_benchmark import configuration_sets
from mace_core.robot.kinematics import RobotKinematics
from mace_core.robot.mujoco_checker import MuJoCoCollisionChecker
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import Obstacle, load_scene
from mace_core.tensor import TensorSpec

SPEC = TensorSpec.resolve("cpu")
SCENES = sorted(glob.glob("config/scenes/*.yaml"))


@pytest.fixture(scope="module")
def kin() -> RobotKinematics:
    return RobotKinematics.panda(SPEC)


@pytest.fixture(scope="module")
def checker() -> MuJoCoCollisionChecker:
    return MuJoCoCollisionChecker()


@pytest.mark.parametrize("path", SCENES, ids=lambda p: p.split("/")[-1])
def test_never_free_where_pybullet_collides(kin, checker, path):
    scene = load_scene(path)
    checker.set_obstacles(scene.obstacles)
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        sets = configuration_sets(kin, scene, pb, 1000, 0.1, SPEC.generator(3))
        for name, q in sets.items():
            truth_pair, ours_pair = pb.collisions(q), checker.collisions(q)
            truth = pb.within_limits(q) & ~truth_pair.any(1)
            ours = checker.valid(q)
            assert np.array_equal(ours, checker.within_limits(q) & ~ours_pair.any(1))
            assert not (ours & ~truth).any(), f"{name}: free where PyBullet collides"
            assert not (~ours_pair[:, 0] & truth_pair[:, 0]).any(), f"{name}: self"
            assert not (~ours_pair[:, 1] & truth_pair[:, 1]).any(), f"{name}: world"
            # stricter than PyBullet only within the safety margin (or by its own error)
            false_colliding = int((~ours & truth).sum())
            assert false_colliding <= max(2, 0.03 * truth.sum()), (name, false_colliding)


def _primitives(seed: int, count: int) -> list[Obstacle]:
    """Spheres and cylinders (tilted) around the arm's workspace, clear of the shoulder: one
    that grazes link 1 (which only turns about z) sits at the same distance from it in every
    configuration, within the checkers' 0.1 mm disagreement."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        centre = rng.uniform([-0.6, -0.6, 0.0], [0.8, 0.6, 1.0])
        while np.linalg.norm(centre - np.array([0.0, 0.0, 0.2])) < 0.5:
            centre = rng.uniform([-0.6, -0.6, 0.0], [0.8, 0.6, 1.0])
        centre = tuple(centre)
        if k % 2:
            out.append(Obstacle(name=f"s{k}", kind="sphere", size=(rng.uniform(0.03, 0.15),),
                                position=centre))
        else:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            rot = _rotation_taking_z_to(axis)
            out.append(Obstacle(name=f"c{k}", kind="cylinder",
                                size=(rng.uniform(0.1, 0.5), rng.uniform(0.02, 0.1)),
                                position=centre, rotation=tuple(map(tuple, rot))))
    return out


def _rotation_taking_z_to(axis: np.ndarray) -> np.ndarray:
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(z, axis), float(z @ axis)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


@pytest.mark.parametrize("seed", [0, 1])
def test_spheres_and_cylinders_agree_with_pybullet(kin, checker, seed):
    obstacles = _primitives(seed, 8)
    checker.set_obstacles(obstacles)
    q = kin.sample_uniform(1500, SPEC.generator(seed))
    with PyBulletCollisionChecker(obstacles) as pb:
        truth = pb.collisions(q)
    ours = checker.collisions(q)
    assert truth[:, 1].sum() > 100  # the obstacles are in the way
    assert not (~ours[:, 1] & truth[:, 1]).any()
    assert (ours[:, 1] & ~truth[:, 1]).sum() <= 0.01 * (~truth[:, 1]).sum()


def test_the_slot_pool_keeps_nothing_of_the_last_scene(kin, checker):
    """A scene after a larger one (and one that makes the pool grow) answers as a checker built
    for it alone."""
    many = [Obstacle(name=f"b{k}", kind="box", size=(0.1, 0.1, 0.1),
                     position=(0.3 + 0.05 * (k % 10), -0.4 + 0.1 * (k // 10), 0.3))
            for k in range(40)]  # more boxes than the pool starts with
    small = load_scene("config/scenes/wall.yaml").obstacles
    q = kin.sample_uniform(800, SPEC.generator(9))
    checker.set_obstacles(many)
    assert checker.slots_per_kind >= 40
    crowded = checker.collisions(q)
    checker.set_obstacles(small)
    after = checker.collisions(q)
    fresh = MuJoCoCollisionChecker(small).collisions(q)
    assert np.array_equal(after, fresh)
    assert not np.array_equal(after[:, 1], crowded[:, 1])
    checker.set_obstacles([])
    assert not checker.world_collision(q).any()


@pytest.mark.parametrize("cls", [MuJoCoCollisionChecker, PyBulletCollisionChecker])
def test_implements_the_exact_checker_interface(cls):
    """Every method of :class:`ExactCollisionChecker`, with the same parameters."""
    for name, member in vars(ExactCollisionChecker).items():
        if name.startswith("_") or not callable(member):
            continue
        theirs = getattr(cls, name)
        assert (list(inspect.signature(theirs).parameters)
                == list(inspect.signature(member).parameters)), name


def test_rejects_bad_batches_and_obstacles(checker):
    from mace_core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"\(B, 7\)"):
        checker.valid(np.zeros((3, 6)))
    with pytest.raises(InvalidRequestError):
        checker.set_obstacles([Obstacle(name="b", kind="box", size=(0.1, -0.1, 0.1),
                                        position=(0.5, 0.0, 0.2))])


def test_clearance_is_pybullets_distance(kin, checker):
    """The distance from the links to the obstacles matches PyBullet's (its 1 mm margin and its
    rounded box edges included) to 0.1 mm (0.02 mm seen)."""
    scene = load_scene("config/scenes/window.yaml")
    checker.set_obstacles(scene.obstacles)
    q = kin.sample_uniform(40, SPEC.generator(4))
    ours = checker.clearance(q, reach_m=0.5)
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        theirs = pb.clearance(q, reach_m=0.5)
    apart = theirs > 0
    assert apart.sum() > 10 and (~apart).sum() > 3
    assert np.abs(ours[apart] - theirs[apart]).max() < 1e-4
    assert (ours[~apart] <= 1e-4).all()  # overlapping: negative, or within the tolerance


def test_clearance_follows_the_obstacles_set(kin, checker):
    """The clearance reads the obstacles' boxes it planned for the last set: a new set (a box
    moved close, the window's, the box's, none) is measured as a checker built for it does."""
    q = kin.sample_uniform(12, SPEC.generator(5))
    far, near = (Obstacle(name="b", kind="box", size=(0.1, 0.1, 0.1), position=p)
                 for p in ((2.0, 0.0, 0.5), (0.4, 0.0, 0.5)))
    scenes = [load_scene(f"config/scenes/{name}.yaml").obstacles for name in ("window", "box")]
    for obstacles in [(far,), (near,)] + scenes + [()] + scenes[:1]:
        checker.set_obstacles(obstacles)
        ours = checker.clearance(q, reach_m=0.5)
        with MuJoCoCollisionChecker(obstacles) as fresh:
            np.testing.assert_allclose(ours, fresh.clearance(q, reach_m=0.5), atol=1e-9)
        if obstacles in ((), (far,)):  # nothing within reach
            assert (ours == 0.5).all()
        else:
            assert (ours < 0.5).any()


# Configurations where mj_collision's mesh contacts overstated the distance past the threshold
# (found by bisecting to the checker's boundary): links 5 and 7 1.98 mm apart, reported at
# 2.18 mm; the hand 1.80 mm from the cabinet's top, reported at 2.11 mm. PyBullet and the
# convex-program referee both call them colliding.
_OVERSTATED = [
    ("box", 0, [-0.277302, 1.380575, -0.412081, -1.035114, 1.408263, 0.116365, -2.238033]),
    ("cabinet", 1, [1.220607, -1.560114, -1.112224, -2.170694, -1.687224, 2.673501, -0.43133]),
]


@pytest.mark.parametrize("scene_name, part, q", _OVERSTATED, ids=["self", "world"])
def test_overstated_contacts_are_measured_again(checker, scene_name, part, q):
    scene = load_scene(f"config/scenes/{scene_name}.yaml")
    checker.set_obstacles(scene.obstacles)
    q = np.array([q])
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        assert pb.collisions(q)[0, part]
    assert checker.collisions(q)[0, part]
    # MuJoCo's contacts alone say free: the verdict is the re-measured distance's
    import mujoco
    model, data = checker.model, checker.data
    data.qpos[checker._arm_qpos] = q[0]
    mujoco.mj_kinematics(model, data)
    mujoco.mj_collision(model, data)
    geom = data.contact.geom[:data.ncon]
    world = checker._obstacle_geom[geom[:, 0]] | checker._obstacle_geom[geom[:, 1]]
    rows = world if part else ~world
    limit = checker._threshold[geom[rows, 0], geom[rows, 1]]
    assert rows.any() and (data.contact.dist[:data.ncon][rows] > limit).all()


def test_an_arena_too_small_for_the_contacts_grows(kin, checker):
    """Contacts and MuJoCo's stack share the arena: when a configuration's do not fit, the
    checker doubles it and checks again (dropped contacts would call collisions free)."""
    scene = load_scene("config/scenes/cabinet.yaml")
    checker.set_obstacles(scene.obstacles)
    q = kin.sample_uniform(300, SPEC.generator(8))
    small = MuJoCoCollisionChecker(scene.obstacles, memory_bytes=36_000)
    assert np.array_equal(small.collisions(q), checker.collisions(q))
    assert small.model.narena > 36_000
