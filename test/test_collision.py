"""Collision checks: primitives by hand, the sphere checker against PyBullet on every scene."""

import math
import multiprocessing
import os

import numpy as np
import pytest
import torch

from mace_core.errors import InvalidRequestError, ModelLoadError
from mace_core.robot.collision import adjacent_link_pairs, self_collision_link_pairs
from mace_core.robot.collision_benchmark import main as benchmark_main
from mace_core.robot.kinematics import RobotKinematics
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker, exact_self_collision_free
from mace_core.robot.scenes import Obstacle, load_scene, quaternion_xyzw_to_matrix
from mace_core.robot.spheres import (CollisionWorld, PairTable, RobotSpheres,
                                     SphereCollisionChecker, default_spheres_path)
from mace_core.tensor import TensorSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = [os.path.join(ROOT, "config", "scenes", f"{n}.yaml")
          for n in ("box", "cabinet", "wall", "window")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROT_Z90 = quaternion_xyzw_to_matrix([0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)])
ROT_X90 = quaternion_xyzw_to_matrix([math.sqrt(0.5), 0.0, 0.0, math.sqrt(0.5)])


@pytest.fixture(scope="module", params=DEVICES)
def spec(request):
    torch.set_num_threads(1)
    return TensorSpec(torch.device(request.param), torch.float32)


@pytest.fixture(scope="module")
def kin(spec):
    return RobotKinematics.panda(spec)


@pytest.fixture(scope="module")
def checker(kin, spec):
    return SphereCollisionChecker.from_file(kin, spec, default_spheres_path())


# -- primitives ---------------------------------------------------------------------------------

def _world(spec, *obstacles):
    return CollisionWorld.from_obstacles(list(obstacles), spec)


@pytest.mark.parametrize("obstacle, point, radius, expected", [
    # box, half extents (0.1, 0.2, 0.3) at (1, 0, 0)
    (Obstacle("b", "box", (0.2, 0.4, 0.6), (1.0, 0.0, 0.0)), (1.5, 0.0, 0.0), 0.1, 0.3),
    (Obstacle("b", "box", (0.2, 0.4, 0.6), (1.0, 0.0, 0.0)), (1.0, 0.0, 0.0), 0.05, -0.15),
    (Obstacle("b", "box", (0.2, 0.4, 0.6), (1.0, 0.0, 0.0)), (1.2, 0.3, 0.0), 0.0,
     math.sqrt(0.02)),
    # the same box turned 90 deg about z: 0.4 m long along x
    (Obstacle("b", "box", (0.2, 0.4, 0.6), (1.0, 0.0, 0.0), ROT_Z90), (1.25, 0.0, 0.0), 0.0,
     0.05),
    (Obstacle("b", "box", (0.2, 0.4, 0.6), (1.0, 0.0, 0.0), ROT_Z90), (1.0, 0.15, 0.0), 0.0,
     0.05),
    # sphere of radius 0.2 at (0, 0, 1)
    (Obstacle("s", "sphere", (0.2,), (0.0, 0.0, 1.0)), (0.0, 0.0, 1.5), 0.1, 0.2),
    (Obstacle("s", "sphere", (0.2,), (0.0, 0.0, 1.0)), (0.0, 0.1, 1.0), 0.0, -0.1),
    # cylinder of height 0.4 and radius 0.1 at the origin, axis z
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0)), (0.3, 0.0, 0.0), 0.0, 0.2),
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0)), (0.0, 0.0, 0.5), 0.0, 0.3),
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0)), (0.2, 0.0, 0.3), 0.0,
     math.sqrt(0.02)),
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0)), (0.0, 0.0, 0.0), 0.0, -0.1),
    # turned 90 deg about x: axis along -y, so 0.2 m half height along y
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0), ROT_X90), (0.0, 0.5, 0.0), 0.0, 0.3),
    (Obstacle("c", "cylinder", (0.4, 0.1), (0.0, 0.0, 0.0), ROT_X90), (0.0, 0.0, 0.25), 0.0,
     0.15),
])
def test_primitive_signed_distance(spec, obstacle, point, radius, expected):
    world = _world(spec, obstacle)
    pts, r = spec.tensor([point]), spec.tensor([radius])
    assert world.signed_distance(pts, r).item() == pytest.approx(expected, abs=1e-6)
    assert bool(world.overlap_matrix(pts, r).any()) == (expected <= 0)


def test_overlap_forms_agree(spec):
    """overlap_matrix, pair_overlaps and signed_distance <= 0 agree on random spheres."""
    world = _world(spec, Obstacle("b", "box", (0.3, 0.2, 0.1), (0.1, 0.0, 0.2), ROT_Z90),
                   Obstacle("s", "sphere", (0.15,), (-0.2, 0.1, 0.0)),
                   Obstacle("c", "cylinder", (0.3, 0.08), (0.0, -0.2, 0.1), ROT_X90))
    gen = spec.generator(0)
    pts = spec.tensor(torch.rand(4000, 3, generator=gen, device=spec.device) - 0.5)
    radii = 0.05 * torch.rand(4000, generator=gen, device=spec.device, dtype=spec.dtype)
    sd = world.signed_distance(pts, radii)
    mat = world.overlap_matrix(pts, radii)
    clear = sd.abs() > 1e-5  # away from the exact boundary
    assert torch.equal((sd <= 0)[clear], mat[clear])
    assert mat.any(0).all() and not mat.all(0).any()  # every obstacle hit by some, not all
    for k in range(3):
        index = torch.full((1000,), k, device=spec.device)
        pair = world.pair_overlaps(pts.view(1000, 4, 3), radii.view(1000, 4), index)
        assert torch.equal(pair, mat.view(1000, 4, 3)[:, :, k])


def test_penetration_matches_autograd_of_signed_distance():
    """The closed-form penetration cost and gradient equal autograd through signed_distance."""
    spec = TensorSpec(torch.device("cpu"), torch.float64)
    world = _world(spec, Obstacle("b", "box", (0.3, 0.2, 0.1), (0.1, 0.0, 0.2), ROT_Z90),
                   Obstacle("s", "sphere", (0.15,), (-0.2, 0.1, 0.0)),
                   Obstacle("c", "cylinder", (0.3, 0.08), (0.0, -0.2, 0.1), ROT_X90))
    gen = spec.generator(1)
    pts = (torch.rand(4000, 3, generator=gen, dtype=spec.dtype) - 0.5).requires_grad_(True)
    radii = 0.05 * torch.rand(4000, generator=gen, dtype=spec.dtype)
    margin = 0.01
    ref = torch.relu(margin - world.signed_distance(pts, radii)).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), pts)
    cost, grad = world.penetration(pts.detach(), radii, margin)
    assert (cost > 0).sum() > 100  # a fair number of the spheres is in contact
    assert torch.allclose(cost, ref.detach(), atol=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-9)
    # on a cube's diagonal plane two faces are nearest: the gradient is one face's unit normal
    cube = _world(spec, Obstacle("c", "box", (0.2, 0.2, 0.2), (0.0, 0.0, 0.0)))
    _, grad = cube.penetration(spec.tensor([[0.05, 0.05, 0.0]]), spec.tensor([0.01]))
    assert float(grad.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("scene_name", ["mixed", "cabinet"])
def test_checker_penetration_equals_dense_sum(scene_name):
    """The checker's penetration (broad phase, per-link sums) equals the dense closed form over
    every non-base sphere, on boxes, spheres and cylinders together and on the cabinet."""
    spec = TensorSpec(torch.device("cpu"), torch.float64)
    kin = RobotKinematics.panda(spec)
    checker = SphereCollisionChecker.from_file(kin, spec, default_spheres_path())
    if scene_name == "mixed":
        obstacles = [Obstacle("b", "box", (0.3, 0.2, 0.1), (0.4, 0.0, 0.4), ROT_Z90),
                     Obstacle("s", "sphere", (0.15,), (0.3, 0.3, 0.5)),
                     Obstacle("c", "cylinder", (0.5, 0.08), (0.3, -0.3, 0.4), ROT_X90)]
    else:
        obstacles = load_scene(SCENES[1]).obstacles
    world = CollisionWorld.from_obstacles(obstacles, spec)
    gen = spec.generator(3)
    q = kin.lower + (kin.upper - kin.lower) * torch.rand(300, 7, generator=gen, dtype=spec.dtype)
    poses = kin.link_poses(q)
    margin = 0.005
    cost, wrench = checker.penetration(q, world, margin, poses)
    force, torque = wrench[..., :3], wrench[..., 3:]
    keep = [s for s, link in enumerate(checker.spheres.links) if link != kin.base_link]
    x = checker.sphere_positions(q, poses)[:, keep]  # (B, S, 3)
    radii = spec.tensor(checker.spheres.radii)[keep]
    ref_cost, dx = world.penetration(x.reshape(-1, 3), radii.repeat(q.shape[0]), margin)
    dx = dx.view(x.shape)
    link_of = torch.tensor([kin.link_names.index(checker.spheres.links[s]) for s in keep])
    per_link = torch.zeros(len(kin.link_names), len(keep), dtype=spec.dtype)
    per_link[link_of, torch.arange(len(keep))] = 1.0
    assert int((ref_cost.view(q.shape[0], -1).sum(-1) > 0).sum()) > 50
    assert torch.allclose(cost, ref_cost.view(q.shape[0], -1).sum(-1), atol=1e-12)
    assert torch.allclose(force, torch.einsum("ls,bsc->blc", per_link, dx), atol=1e-9)
    assert torch.allclose(torque, torch.einsum("ls,bsc->blc", per_link,
                                               torch.cross(x, dx, dim=-1)), atol=1e-9)


def test_pybullet_primitives_match_hand_cases():
    """Probe obstacles around the gripper: both backends agree with the expected answer."""
    spec = TensorSpec()
    kin = RobotKinematics.panda(spec)
    checker = SphereCollisionChecker.from_file(kin, spec)
    q = torch.tensor([[0.0, 0.0, 0.0, -1.5, 0.0, 1.5, 0.8]])  # gripper pointing down
    poses = kin.link_poses(q)[0]
    tip = tuple(poses[kin.ee_index, :3, 3].tolist())  # between the open fingertips
    hand = tuple(poses[kin.link_names.index("panda_hand"), :3, 3].tolist())
    below = (tip[0], tip[1], tip[2] - 0.3)
    for obstacle, colliding in [
            (Obstacle("s", "sphere", (0.02,), tip), False),  # fits between the fingers
            (Obstacle("s", "sphere", (0.02,), hand), True),
            (Obstacle("s", "sphere", (0.02,), below), False),
            (Obstacle("b", "box", (0.3, 0.3, 0.02), tip), True),  # a plate through the fingers
            (Obstacle("b", "box", (0.3, 0.3, 0.02), below, ROT_Z90), False),
            (Obstacle("c", "cylinder", (0.3, 0.01), tip, ROT_X90), True),  # a rod across them
            (Obstacle("c", "cylinder", (0.3, 0.01), below, ROT_X90), False)]:
        with PyBulletCollisionChecker([obstacle]) as pb:
            assert bool(pb.world_collision(q)[0]) == colliding, obstacle
        world = CollisionWorld.from_obstacles([obstacle], spec)
        if colliding:  # conservative: the spheres must see it too
            assert bool(checker.world_collision(q, world)[0]), obstacle


# -- which link pairs -----------------------------------------------------------------------

def test_adjacency_rule():
    kin = RobotKinematics.panda(TensorSpec())
    adjacent = adjacent_link_pairs(kin.urdf)
    expected = [(f"panda_link{i}", f"panda_link{i + 1}") for i in range(7)] + [
        ("panda_link7", "panda_hand"), ("panda_hand", "panda_leftfinger"),
        ("panda_hand", "panda_rightfinger")]
    assert sorted(adjacent) == sorted(expected)
    pairs = self_collision_link_pairs(kin.urdf, kin.link_names)
    assert len(pairs) == 11 * 10 // 2 - len(expected)
    assert ("panda_leftfinger", "panda_rightfinger") in pairs


def test_adjacent_pairs_always_touch_in_pybullet():
    """The excluded pairs are in contact at every configuration; no checked pair is."""
    kin = RobotKinematics.panda(TensorSpec())
    q = kin.sample_uniform(40, torch.Generator().manual_seed(1)).numpy()
    with PyBulletCollisionChecker() as pb:
        p, names = pb._p, list(pb.link_index)
        geometric = [n for n in names if kin.urdf.collisions.get(n)]
        counts = {}
        for x in q:
            pb._set(x)
            for i, a in enumerate(geometric):
                for b in geometric[i + 1:]:
                    touch = p.getClosestPoints(pb.robot, pb.robot, 0.0,
                                               linkIndexA=pb.link_index[a],
                                               linkIndexB=pb.link_index[b],
                                               physicsClientId=pb.client)
                    counts[(a, b)] = counts.get((a, b), 0) + bool(touch)
    always = {pair for pair, c in counts.items() if c == len(q)}
    assert always == {tuple(pr) for pr in adjacent_link_pairs(kin.urdf)}


# -- sphere checker against PyBullet --------------------------------------------------------

@pytest.fixture(scope="module")
def pybullet_truth():
    """Per scene: uniform configurations and PyBullet-free ones moved a little (near contact)."""
    gen = torch.Generator().manual_seed(0)
    cpu = RobotKinematics.panda(TensorSpec())
    out = {}
    for path in SCENES:
        scene = load_scene(path)
        q = cpu.sample_uniform(1000, gen)
        with PyBulletCollisionChecker(scene.obstacles) as pb:
            free = pb.valid(q)
            near = q[torch.from_numpy(free)]
            near = near + 0.1 * torch.randn(near.shape, generator=gen)
            near = torch.maximum(torch.minimum(near, cpu.upper), cpu.lower)
            q_all = torch.cat([q, near])
            out[scene.name] = (scene, q_all, np.concatenate([free, pb.valid(near)]))
    return out


@pytest.mark.parametrize("name", ["box", "cabinet", "wall", "window"])
def test_spheres_conservative_against_pybullet(spec, checker, pybullet_truth, name):
    scene, q, truth = pybullet_truth[name]
    world = CollisionWorld.from_obstacles(scene.obstacles, spec)
    ours = checker.valid(q.to(spec.device), world).cpu().numpy()
    assert int((ours & ~truth).sum()) == 0, "the sphere checker called a colliding config free"
    rate = (~ours & truth).sum() / truth.sum()
    assert truth.sum() > 1000 and rate <= 0.05, f"false colliding rate {rate:.3f}"


def test_given_poses_and_parts_agree(kin, checker, pybullet_truth):
    scene, q, _ = pybullet_truth["cabinet"]
    q = q.to(kin.spec.device)
    world = CollisionWorld.from_obstacles(scene.obstacles, kin.spec)
    poses = kin.link_poses(q)
    valid = checker.valid(q, world)
    assert torch.equal(valid, checker.valid(q, world, poses=poses))
    parts = kin.within_limits(q) & ~checker.self_collision(q) & ~checker.world_collision(q, world)
    assert torch.equal(valid, parts)
    clearance = checker.clearance(q, world, poses=poses)
    assert torch.equal(clearance <= 0, checker.world_collision(q, world, poses=poses))
    outside = q[:3].clone()
    outside[:, 3] = 0.5  # joint 4 above its upper limit (0 rad)
    assert not checker.valid(outside, world).any()
    outside[:, 5] = 4.0  # joint 6 beyond the wrist table: conservatively self-colliding
    assert checker.self_collision(outside).all()
    with pytest.raises(InvalidRequestError):
        checker.valid(q[:, :6], world)
    empty = CollisionWorld.from_obstacles([], kin.spec)
    assert not checker.world_collision(q, empty).any()
    assert torch.isinf(checker.clearance(q[:4], empty)).all()


def test_pybullet_screen_matches_pairwise(pybullet_truth):
    scene, q, truth = pybullet_truth["window"]
    q = q[:250]
    with PyBulletCollisionChecker(scene.obstacles, screen=False) as slow:
        expected = slow.collisions(q)
    with PyBulletCollisionChecker(scene.obstacles) as fast:
        assert np.array_equal(fast.collisions(q), expected)
        assert np.array_equal(fast.valid(q.numpy()), truth[:250])
    assert np.array_equal(exact_self_collision_free(q), ~expected[:, 0])


def test_pybullet_obstacles_replaced_in_place(pybullet_truth):
    """set_obstacles gives the verdicts of a checker built with the new obstacles: the old
    ones are gone (a benchmark judges each request's changed scene in one client)."""
    window, q, truth = pybullet_truth["window"]
    wall, q_wall, truth_wall = pybullet_truth["wall"]
    q, q_wall = q[:150].numpy(), q_wall[:150].numpy()
    with PyBulletCollisionChecker(wall.obstacles) as pb:
        assert np.array_equal(pb.valid(q_wall), truth_wall[:150])
        pb.set_obstacles(window.obstacles)
        assert pb.obstacles == tuple(window.obstacles)
        assert np.array_equal(pb.valid(q), truth[:150])
        pb.set_obstacles(())
        with PyBulletCollisionChecker() as empty:
            assert np.array_equal(pb.valid(q), empty.valid(q))
        with pytest.raises(InvalidRequestError):
            pb.set_obstacles([Obstacle("a", "box", (1.0, 1.0), (0.0, 0.0, 0.0))])


def _worker_valid(args):
    obstacles, q = args
    with PyBulletCollisionChecker(obstacles) as pb:
        return pb.valid(q)


def test_pybullet_in_another_process(pybullet_truth):
    scene, q, truth = pybullet_truth["wall"]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result = pool.map(_worker_valid, [(scene.obstacles, q[:50].numpy())])[0]
    assert np.array_equal(result, truth[:50])


# -- spheres file -----------------------------------------------------------------------------

def test_spheres_file_round_trip(tmp_path):
    spheres = RobotSpheres.load(default_spheres_path())
    assert 40 <= len(spheres) <= 150
    path = tmp_path / "spheres.yaml"
    spheres.save(str(path), header="test")
    again = RobotSpheres.load(str(path))
    assert again.links == spheres.links and again.never_colliding == spheres.never_colliding
    np.testing.assert_allclose(again.centers, spheres.centers, atol=1e-6)
    for a, b in zip(again.tables, spheres.tables):
        assert np.array_equal(a.cells, b.cells) and a.pairs == b.pairs
    bad = tmp_path / "bad.yaml"
    bad.write_text("links: {}\nunknown: 1\n")
    with pytest.raises(ModelLoadError):
        RobotSpheres.load(str(bad))
    with pytest.raises(ModelLoadError):
        RobotSpheres.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(ModelLoadError):
        PairTable.from_dict({"pairs": []})


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = benchmark_main(["--backends", "spheres,mujoco", "--configs", "40", "--scenes",
                          SCENES[2], "--batches", "16,64", "--repeats", "1", "--json", str(out)])
    rows = res["scenes"]["wall"]["sets"]
    assert set(rows) == {"uniform", "near", "ik"} and out.exists()
    assert all(set(r["backends"]) == {"spheres", "mujoco"} for r in rows.values())
    assert all(b["false_free"] == 0 for r in rows.values() for b in r["backends"].values())
    assert set(res["scenes"]["wall"]["timing_ms"]["mujoco"]) == {"16", "64"}
