"""The IK engine with the shipped prior: adaptation, refinement, validation, judged by PyBullet."""

import math
import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from mace_core.errors import InvalidRequestError, ModelLoadError
from mace_core.ik.adapter import IKAdapter
from mace_core.ik.request import IKAdaptConfig, IKRequest
from mace_core.robot.kinematics import RobotKinematics
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import Obstacle, load_scene
from mace_core.tensor import TensorSpec

MODELS = "models"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def adapter(request):
    return IKAdapter.from_models(MODELS, "panda_ik", IKAdaptConfig(),
                                 TensorSpec.resolve(request.param))


@pytest.fixture(scope="module")
def wall():
    return load_scene("config/scenes/wall.yaml")


def request_in(scene, index=0, **kw):
    target = scene.sample_targets(index + 1, torch.Generator().manual_seed(7),
                                  TensorSpec.resolve("cpu"))[index]
    return IKRequest(position=target.numpy(), obstacles=list(scene.obstacles), **kw)


def test_solutions_reach_target_and_are_valid_for_pybullet(adapter, wall):
    req = request_in(wall, num_solutions=4, time_budget_s=5.0, seed=0)
    result = adapter.solve(req)
    assert result.success, result.message
    assert len(result.solutions) == 4
    q = np.stack([s.q for s in result.solutions])
    with PyBulletCollisionChecker(wall.obstacles) as exact:
        assert exact.valid(q).all()
    assert all(s.position_error <= 1e-4 and s.collision_free for s in result.solutions)
    dists = [np.abs(a.q - b.q).max() for i, a in enumerate(result.solutions)
             for b in result.solutions[i + 1:]]
    assert min(dists) >= IKAdaptConfig().min_joint_distance  # no duplicates
    assert result.timings.total > 0 and result.joint_names[0] == "panda_joint1"


@pytest.mark.parametrize("pose_target", [False, True])
def test_neighbour_seeds_follow_the_self_motion(adapter, wall, pose_target):
    """Seeds drawn around accepted solutions keep the hand on the target to first order (the
    noise is projected onto the null space of the task Jacobian: position, plus orientation for
    a pose target), unlike raw joint noise of the same size."""
    from dataclasses import replace

    from mace_core.robot.spheres import CollisionWorld
    from mace_core.ik.refinement_rounds import RefinementRounds
    from mace_core.ik.request import IKTimings
    from mace_core.ik.refinement import IKTarget

    result = adapter.solve(request_in(wall, num_solutions=4, time_budget_s=5.0, seed=3))
    assert result.success, result.message
    spec, kin = adapter.spec, adapter.kin
    base = spec.tensor(np.stack([s.q for s in result.solutions]))
    std = 0.05
    cfg = replace(adapter.config, neighbour_share=1.0, neighbour_std_rad=std, refine_seeds=64)
    pose = kin.ee_pose(base[:1])[0]
    target = IKTarget(position=pose[:3, 3], rotation=pose[:3, :3] if pose_target else None,
                      orientation_tolerance=0.01)
    rounds = RefinementRounds(adapter, cfg, target, CollisionWorld.from_obstacles([], spec),
                              deadline=math.inf, timings=IKTimings(),
                              generator=spec.generator(0))
    rounds.accepted = base
    seeds = rounds._with_neighbours(base.repeat(16, 1))  # (64, 7): all replaced
    assert seeds.shape == (64, 7)
    # the nearest accepted solution of each seed, and how far the hand moved from it
    nearest = (seeds[:, None] - base[None]).abs().amax(-1).argmin(-1)
    raw = base[nearest] + std * torch.randn(64, 7, generator=spec.generator(1),
                                            device=spec.device, dtype=spec.dtype)

    def hand_motion(q):
        a, b = kin.ee_pose(q), kin.ee_pose(base[nearest])
        turn = ((a[:, :3, :3].transpose(1, 2) @ b[:, :3, :3]).diagonal(dim1=-2, dim2=-1)
                .sum(-1).sub(1.0).mul(0.5).clamp(-1.0, 1.0).arccos())
        return (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1).mean(), turn.mean()

    moved, turned = hand_motion(seeds)
    raw_moved, raw_turned = hand_motion(raw)
    assert float((seeds - base[nearest]).norm(dim=-1).mean()) > 0.5 * std  # posture changes
    assert float(moved) < 0.2 * float(raw_moved)  # ... the hand hardly moves
    if pose_target:  # ... nor turns
        assert float(turned) < 0.2 * float(raw_turned)
    else:  # position only: the hand is free to turn
        assert float(turned) > 0.3 * float(raw_turned)


def test_corrections_reach_solutions_in_fewer_collision_tests(adapter):
    """DLS with the collision penalty through the window: a plain DLS correction after each
    avoiding step brings the hand back to the target, so K = 8 seeds converge clear of the
    obstacles after fewer penalty evaluations (the costly part of a step) than without."""
    from dataclasses import replace

    from mace_core.robot.spheres import CollisionWorld
    from mace_core.ik.refinement import DLSRefiner, IKTarget

    window = load_scene("config/scenes/window.yaml")
    spec, kin = adapter.spec, adapter.kin
    world = CollisionWorld.from_obstacles(list(window.obstacles), spec)
    penalty = adapter._penalty(world)
    for index in range(3):
        req = request_in(window, index=index)
        target = IKTarget(position=spec.tensor(req.position))
        with torch.no_grad():
            seeds = adapter.initial_prior.sample(target.position.expand(48, 3),
                                                 spec.generator(index)).clamp(kin.lower,
                                                                              kin.upper)
        calls, found = [], []
        for corrections in (0, 1):
            count = [0]

            def counted(q, poses):
                count[0] += 1
                return penalty(q, poses)

            cfg = replace(adapter.config.refinement, corrections=corrections)
            q = DLSRefiner(kin, cfg).refine(seeds, target, counted, needed=8)
            calls.append(count[0])
            ok = adapter._acceptable(replace(adapter.config, refinement=cfg), q, target, world)
            found.append(int(ok.sum()))
        assert min(found) >= 8, found
        assert calls[1] < calls[0], calls


def test_adaptation_raises_the_valid_fraction(adapter, wall):
    # Without early stopping the loop runs all T iterations: the paper's protocol (Table 1).
    adapter.config.early_stop = False
    try:
        req = request_in(wall, index=1, iterations=15, num_samples=256, time_budget_s=30.0,
                         refinement="none", seed=1)
        result = adapter.solve(req)
    finally:
        adapter.config.early_stop = True
    assert result.iterations_run == 15
    assert result.valid_fraction_adapted > result.valid_fraction_prior + 0.1


@pytest.mark.parametrize("clutter_valid_fraction, seeds",
                         [(1.0, "clutter_seeds"), (0.0, "refine_seeds")])
def test_cluttered_requests_refine_more_seeds(clutter_valid_fraction, seeds):
    """Where few prior samples are valid, rounds draw ``clutter_samples`` and refine
    ``clutter_seeds`` (the default share, 0.05, puts the cabinet there); otherwise the small fast
    path. Either way the answer is K valid solutions for PyBullet."""
    from dataclasses import replace

    class Recording:
        """The DLS refiner, recording how many seeds each round hands it."""

        def __init__(self, inner):
            self.inner, self.sizes = inner, []

        def refine(self, q0, target, penalty=None, deadline=None, needed=None, clear=None):
            self.sizes.append(q0.shape[0])
            return self.inner.refine(q0, target, penalty, deadline, needed, clear)

    spec = TensorSpec.resolve("cpu")
    cfg = replace(IKAdaptConfig(), clutter_valid_fraction=clutter_valid_fraction)
    probe = IKAdapter.from_models(MODELS, "panda_ik", cfg, spec)
    recording = Recording(probe.refiners["dls"])
    probe.refiners["dls"] = recording
    cabinet = load_scene("config/scenes/cabinet.yaml")
    result = probe.solve(request_in(cabinet, index=2, num_solutions=4, time_budget_s=5.0,
                                    seed=4))
    assert cfg.clutter_seeds != cfg.refine_seeds
    assert recording.sizes[0] == getattr(cfg, seeds)
    assert result.success and len(result.solutions) == 4, result.message
    with PyBulletCollisionChecker(cabinet.obstacles) as exact:
        assert exact.valid(np.stack([s.q for s in result.solutions])).all()


def test_prior_only_mode_runs_no_iteration(adapter, wall):
    result = adapter.solve(request_in(wall, iterations=0, num_solutions=2, seed=2))
    assert result.iterations_run == 0
    assert result.valid_fraction_adapted == result.valid_fraction_prior


def test_no_valid_sample_gives_an_empty_answer(adapter):
    """A box around the whole robot: every sample collides; an empty answer, not an error."""
    cage = Obstacle(name="cage", kind="box", size=(3.0, 3.0, 3.0), position=(0.0, 0.0, 0.0))
    result = adapter.solve(IKRequest(position=np.array([0.5, 0.0, 0.4]), obstacles=[cage],
                                     iterations=0, refinement="none", num_solutions=4, seed=0))
    assert not result.success and result.solutions == []
    assert result.valid_fraction_prior == 0.0 and "found 0 of 4" in result.message


def test_unreached_target_is_no_success(adapter):
    """The hand cannot reach a target inside a block: refinement fails, and the collision-free
    samples returned as best effort do not count as solutions."""
    block = Obstacle(name="block", kind="box", size=(0.3, 0.3, 0.3), position=(0.5, 0.0, 0.4))
    result = adapter.solve(IKRequest(position=np.array([0.5, 0.0, 0.4]), obstacles=[block],
                                     iterations=0, num_solutions=4, time_budget_s=0.3, seed=0))
    assert not result.success and result.num_found == 0
    assert all(s.position_error > IKAdaptConfig().refinement.position_tolerance
               for s in result.solutions)
    assert "found 0 of 4" in result.message and "not solutions" in result.message


def test_a_changed_scene_is_not_served_from_the_last_one(adapter):
    """The adapter reuses the last request's tensorized obstacles when they are equal: one
    moved obstacle (same name) must be seen, and equal obstacles given as new objects or as
    arrays must work."""
    target = np.array([0.5, 0.0, 0.4])

    def solve(obstacle):
        return adapter.solve(IKRequest(position=target, obstacles=[obstacle], num_solutions=2,
                                       time_budget_s=0.3, seed=0))

    far = Obstacle(name="b", kind="box", size=(0.1, 0.1, 0.1), position=(-0.6, 0.6, 0.3))
    assert solve(far).success
    cage = Obstacle(name="b", kind="box", size=(3.0, 3.0, 3.0), position=(0.0, 0.0, 0.0))
    assert not solve(cage).success
    assert solve(Obstacle(name="b", kind="box", size=(0.1, 0.1, 0.1),
                          position=(-0.6, 0.6, 0.3))).success
    assert not solve(Obstacle(name="b", kind="box", size=np.array([3.0, 3.0, 3.0]),
                              position=np.zeros(3))).success


def test_same_seed_same_answer(adapter, wall):
    a = adapter.solve(request_in(wall, num_solutions=2, seed=5, time_budget_s=5.0))
    b = adapter.solve(request_in(wall, num_solutions=2, seed=5, time_budget_s=5.0))
    assert np.allclose(a.solutions[0].q, b.solutions[0].q)


BAD = [
    (dict(position=np.array([np.nan, 0.0, 0.5])), "finite"),
    (dict(position=np.array([2.0, 0.0, 0.5])), "unreachable"),
    (dict(num_solutions=0), "num_solutions"),
    (dict(num_solutions=10_000), "num_solutions"),
    (dict(time_budget_s=0.0), "time_budget"),
    (dict(time_budget_s=math.inf), "time_budget"),
    (dict(refinement="moveit"), "moveit_msgs"),
    (dict(refinement="magic"), "refinement"),
    (dict(quantile=2.0), "quantile"),
    (dict(num_samples=10**9), "num_samples"),
    (dict(rotation=np.eye(3) * 2.0, orientation_tolerance=0.1), "rotation"),
    (dict(obstacles=[Obstacle(name="b", kind="box", size=(0.1, -0.1, 0.1),
                              position=(0.5, 0.0, 0.2))]), "size"),
    (dict(obstacles=[Obstacle(name="b", kind="box", size=(0.1, 0.1),
                              position=(0.5, 0.0, 0.2))]), "box size must be 3 numbers"),
    (dict(gradient_steps=4294967295), "gradient_steps must be at most"),
    (dict(iterations=2147483647), "iterations must be at most"),
    (dict(learning_rate=1e38), "learning_rate must be at most"),
    (dict(orientation_tolerance=1e300, rotation=np.eye(3)), "orientation tolerance"),
    (dict(obstacles=[Obstacle(name="b", kind="box", size=(1e39, 0.1, 0.1),
                              position=(0.5, 0.0, 0.2))]), "max_coordinate_m"),
    (dict(obstacles=[Obstacle(name="s", kind="sphere", size=(0.1,),
                              position=(1e30, 0.0, 0.2))]), "max_coordinate_m"),
    (dict(refinement="x" * 10_000), r"got 'x{100}'\.\.\. \(10000 characters\)$"),
    (dict(seed_state=np.zeros(6)), "seed_state must be 7 finite"),
    (dict(seed_state=np.array([0.0, 0.0, np.nan, -2.0, 0.0, 2.0, 0.0])),
     "seed_state must be 7 finite"),
    (dict(seed_state=np.array([0.0, 0.0, 0.0, -120.0, 0.0, 90.0, 45.0])),
     "panda_joint4 = -120 rad is outside its limits.*radians expected"),
]


@pytest.mark.parametrize("override,words", BAD)
def test_bad_requests_raise_clear_errors(adapter, override, words):
    req = IKRequest(position=np.array([0.5, 0.0, 0.4]))
    for key, value in override.items():
        setattr(req, key, value)
    with pytest.raises(InvalidRequestError, match=f"(?i){words}"):
        adapter.solve(req)


def test_huge_overrides_end_within_the_budget(adapter, wall):
    """The largest M, N and T the limits allow, with the importance-sampling objective (which
    fits all N samples) and no refinement: the request still ends near its budget (the
    deadline is checked inside the gradient steps and between sampling chunks), where
    M = 2,000 used to take 12 s on a 1 s budget."""
    lim = adapter.config.limits
    req = request_in(wall, num_solutions=64, time_budget_s=0.5, refinement="none",
                     objective="is", num_samples=lim.max_samples,
                     gradient_steps=lim.max_gradient_steps, iterations=lim.max_iterations,
                     seed=0)
    t0 = time.perf_counter()
    result = adapter.solve(req)
    assert time.perf_counter() - t0 < 0.5 + 2.0  # a generous bound; the benchmark measures it
    assert all(np.isfinite(s.q).all() for s in result.solutions)


def test_cancel_ends_a_request_at_once(adapter, wall):
    """A cancel event (the node shutting down) ends a 30 s request; the answer is what was
    found so far."""
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    req = request_in(wall, num_solutions=64, time_budget_s=30.0, refinement="none",
                     iterations=2000, seed=0)
    adapter.config, defaults = replace(adapter.config, early_stop=False), adapter.config
    try:
        t0 = time.perf_counter()
        timer.start()
        result = adapter.solve(req, cancel=cancel)
    finally:
        adapter.config = defaults
        timer.join()
    assert time.perf_counter() - t0 < 5.0
    assert result.iterations_run < 2000


def test_budget_counts_from_the_given_start(adapter, wall):
    """A request whose budget was spent before its turn (start in the past) answers at once
    with what one batch gives, instead of running its whole budget again."""
    req = request_in(wall, num_solutions=8, time_budget_s=1.0, seed=0, iterations=40)
    result = adapter.solve(req, start=time.perf_counter() - 5.0)
    assert result.iterations_run == 0


@pytest.mark.parametrize("backend", ["mujoco", "spheres"])
def test_padding_keeps_every_solution_that_far_from_the_obstacles(backend):
    """``collision.padding_m``: PyBullet measures at least the padding between every returned
    solution and every obstacle (MoveIt's scene padding), with either backend."""
    from mace_core.robot.collision import CollisionConfig

    pad = 0.03
    cfg = IKAdaptConfig(collision=CollisionConfig(backend=backend, padding_m=pad))
    padded = IKAdapter.from_models(MODELS, "panda_ik", cfg, TensorSpec.resolve("cpu"))
    window = load_scene("config/scenes/window.yaml")
    with PyBulletCollisionChecker(window.obstacles) as pb:
        for index in range(2):
            result = padded.solve(request_in(window, index=index, num_solutions=6, seed=index,
                                             time_budget_s=5.0))
            assert result.num_found >= 1, result.message
            q = np.stack([s.q for s in result.solutions if s.collision_free])
            assert pb.valid(q).all()
            assert pb.clearance(q, 2 * pad).min() >= pad - 1e-4
            assert all(s.clearance >= pad - 1e-6 for s in result.solutions
                       if s.collision_free)
        unpadded = adapter_for_backend(backend).solve(
            request_in(window, index=0, num_solutions=6, seed=0, time_budget_s=5.0))
        q = np.stack([s.q for s in unpadded.solutions if s.collision_free])
        assert pb.clearance(q, 2 * pad).min() < pad  # the padding is what keeps them away


def adapter_for_backend(backend: str) -> IKAdapter:
    from mace_core.robot.collision import CollisionConfig

    return IKAdapter.from_models(MODELS, "panda_ik",
                                 IKAdaptConfig(collision=CollisionConfig(backend=backend)),
                                 TensorSpec.resolve("cpu"))


def test_the_exact_backend_accepts_what_the_spheres_refuse():
    """In the cabinet the spheres call most free answers near the target colliding: with the
    MuJoCo backend the returned solutions include some the sphere model rejects, and PyBullet
    calls every one of them valid."""
    cabinet = load_scene("config/scenes/cabinet.yaml")
    exact = adapter_for_backend("mujoco")
    world = exact._world_of(list(cabinet.obstacles))
    refused = 0
    with PyBulletCollisionChecker(cabinet.obstacles) as pb:
        for index in range(3):
            result = exact.solve(request_in(cabinet, index=index, num_solutions=8, seed=index,
                                            time_budget_s=5.0))
            assert result.num_found == 8, result.message
            q = np.stack([s.q for s in result.solutions])
            assert pb.valid(q).all()
            refused += int((~exact.checker.valid(exact.spec.tensor(q), world)).sum())
    assert refused > 0


def test_collision_settings_are_validated():
    from mace_core.robot.collision import CollisionConfig

    for bad, words in ((CollisionConfig(backend="fcl"), "collision.backend"),
                       (CollisionConfig(padding_m=-0.01), "padding_m"),
                       (CollisionConfig(padding_m=float("nan")), "padding_m")):
        with pytest.raises(InvalidRequestError, match=words):
            IKAdaptConfig(collision=bad).validate()


def test_pose_requests_are_answered_exactly_by_the_closed_form(adapter):
    """A request with an orientation is refined in closed form (the default on a Panda): the
    solutions reach the pose to float precision, PyBullet calls them valid, and they spread over
    several branches."""
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    box = load_scene("config/scenes/box.yaml")
    q = torch.tensor([[0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6]], dtype=torch.float64)
    pose = kin64.ee_pose(q)[0]
    req = IKRequest(position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(),
                    orientation_tolerance=1e-3, obstacles=list(box.obstacles),
                    num_solutions=8, time_budget_s=5.0, seed=0)
    assert adapter.effective_config(req).refinement_mode == "analytic"
    result = adapter.solve(req)
    assert result.num_found == 8, result.message
    sols = torch.tensor(np.stack([s.q for s in result.solutions]), dtype=torch.float64)
    reached = kin64.ee_pose(sols)
    assert (reached[:, :3, 3] - pose[:3, 3]).norm(dim=-1).max() < 1e-5  # float32 joints
    assert (reached[:, :3, :3] - pose[:3, :3]).abs().max() < 1e-4
    with PyBulletCollisionChecker(box.obstacles) as pb:
        assert pb.valid(sols.numpy()).all()
    assert len({(bool(s.q[3] > -0.4664), bool(s.q[1] > 0), bool(s.q[5] > 1.6))
                for s in result.solutions}) >= 2  # more than one branch
    dls = adapter.solve(replace(req, refinement="dls"))
    assert dls.success  # the general path stays available


def test_pose_candidates_go_to_the_exact_checker_in_chunks():
    """A pose answered in closed form: its candidates skip the spheres and are checked exactly,
    2 x K at a time (spread out first), so in the cabinet the answers include ones the spheres
    refuse, and in the open a single chunk gives all K."""
    from mace_core.ik.benchmark import sample_pose_targets
    from mace_core.robot.scenes import quaternion_xyzw_to_matrix

    exact = adapter_for_backend("mujoco")
    for name, most_checks in (("box", 16), ("cabinet", None)):
        scene = load_scene(f"config/scenes/{name}.yaml")
        world = exact._world_of(list(scene.obstacles))
        with PyBulletCollisionChecker(scene.obstacles) as pb:
            target = sample_pose_targets(scene, 1, 0, pb)[0]
            result = exact.solve(IKRequest(
                position=target[:3], rotation=np.asarray(quaternion_xyzw_to_matrix(target[3:])),
                orientation_tolerance=1e-3, obstacles=list(scene.obstacles), num_solutions=8,
                time_budget_s=5.0, seed=0))
            assert result.num_found == 8, result.message
            q = np.stack([s.q for s in result.solutions])
            assert pb.valid(q).all()
        assert 0.0 < result.valid_fraction_prior <= 1.0  # the checked candidates' valid share
        if most_checks is not None:  # every answer checked exactly, none by the spheres alone
            assert 8 <= result.exact_checks <= most_checks
        else:
            refused = ~exact.checker.valid(exact.spec.tensor(q), world)
            assert refused.any()  # free, though the spheres call it colliding


def test_mace_adapts_on_projected_elites_for_pose_requests(adapter):
    """With the closed form, what MACE adapts samples exact solutions of the pose (the
    branch nearest each prior sample at its q7); position requests adapt the prior itself."""
    from mace_core.ik.conditioned import _ProjectedPrior
    from mace_core.ik.pipeline import RequestPipeline

    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    q = torch.tensor([[0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6]], dtype=torch.float64)
    pose = kin64.ee_pose(q)[0]
    req = IKRequest(position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(),
                    orientation_tolerance=1e-3, num_solutions=8, seed=0)
    model = RequestPipeline(adapter, req, None, None).adapted_model()
    assert isinstance(model, _ProjectedPrior)
    samples = model.sample(256, adapter.spec.generator(1)).to("cpu", torch.float64)
    err = (kin64.ee_pose(samples)[:, :3, 3] - pose[:3, 3]).norm(dim=-1)
    _, found = adapter.closed_form.project(pose, samples)
    on_pose = err < 1e-5
    assert on_pose.float().mean() > 0.2  # 29 % of this prior's q7 draws have a branch here
    assert torch.equal(on_pose, found)  # exactly the rows with a branch at their q7
    position_only = RequestPipeline(adapter, replace(req, rotation=None), None, None)
    assert not isinstance(position_only.adapted_model(), _ProjectedPrior)


def _reachable_pose():
    """The float64 kinematics and ``(4, 4)`` hand pose of a free configuration in the open."""
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    return kin64, kin64.ee_pose(torch.tensor([[0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6]],
                                             dtype=torch.float64))[0]


def _models_with_pose_prior(tmp_path, conditioning="pose", joint_order=()):
    """A models folder: the shipped files plus a small untrained prior named ``tiny_pose``
    (its factorization in ``joint_order``)."""
    from mace_core.ik.conditioning import context_dim
    from mace_core.ik.prior import ARGMMConfig, ARGMMPrior
    from mace_core.ik.registry import save_ik_prior

    for name in ("panda_ik.safetensors", "panda_spheres.yaml"):
        (tmp_path / name).symlink_to(os.path.abspath(os.path.join(MODELS, name)))
    (tmp_path / "registry.yaml").write_text(
        "models:\n  panda_ik: {kind: ik_argmm, file: panda_ik.safetensors}\n"
        "  tiny_pose: {kind: ik_argmm, file: tiny_pose.safetensors}\n")
    spec = TensorSpec.resolve("cpu")
    torch.manual_seed(0)
    tiny = ARGMMPrior(ARGMMConfig(context_dim=context_dim(conditioning),
                                  conditioning=conditioning, hidden=16, layers=1,
                                  joint_order=joint_order), spec)
    kin = RobotKinematics.panda(spec)
    tiny.set_normalization(kin.lower, kin.upper, torch.zeros(tiny.config.context_dim),
                           torch.ones(tiny.config.context_dim))
    save_ik_prior(tiny, str(tmp_path / "tiny_pose.safetensors"))
    return str(tmp_path)


def test_pose_requests_draw_from_the_pose_prior_and_it_is_restored(tmp_path):
    """``ik.pose_prior``: a full-pose request draws from (and adapts) the pose-conditioned
    prior at the target pose; position requests keep the position prior; the next request
    starts from the pose prior's pretrained weights."""
    from mace_core.ik.pipeline import RequestPipeline

    models = _models_with_pose_prior(tmp_path)
    cfg = IKAdaptConfig(pose_prior="tiny_pose")
    adapter = IKAdapter.from_models(models, "panda_ik", cfg, TensorSpec.resolve("cpu"))
    kin64, pose = _reachable_pose()
    req = IKRequest(position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(),
                    orientation_tolerance=1e-3, num_solutions=8, seed=0, time_budget_s=2.0)
    run = RequestPipeline(adapter, req, None, None)
    assert run.model.prior is adapter.pose_prior and run.model.context.shape == (9,)
    assert run.adapted_model().prior is adapter.pose_prior
    position_only = RequestPipeline(adapter, replace(req, rotation=None), None, None)
    assert position_only.model.prior is adapter.prior
    before = {k: v.clone() for k, v in adapter.pose_prior.state_dict().items()}
    # a hard request (K = 64 distinct) so that MACE adapts the pose prior
    result = adapter.solve(replace(req, num_solutions=64, iterations=2, time_budget_s=3.0))
    assert result.iterations_run > 0 and adapter._adapted is adapter.pose_prior
    RequestPipeline(adapter, req, None, None)  # the next request restores the weights
    after = adapter.pose_prior.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ModelLoadError, match="conditioned on the pose"):
        IKAdapter.from_models(models, "tiny_pose", IKAdaptConfig(), TensorSpec.resolve("cpu"))


def test_a_q7_first_pose_prior_draws_only_q7_for_the_closed_form(tmp_path, monkeypatch):
    """A pose prior whose factorization takes q7 first: the exact checker's rounds draw q7
    alone (its first network), the seeds' other joints at their range's middle, and the
    answer is exact and free all the same."""
    from mace_core.ik.pipeline import RequestPipeline
    from mace_core.ik.prior import ARGMMPrior

    models = _models_with_pose_prior(tmp_path, joint_order=(6, 0, 1, 2, 3, 4, 5))
    adapter = IKAdapter.from_models(models, "panda_ik", IKAdaptConfig(pose_prior="tiny_pose"),
                                    TensorSpec.resolve("cpu"))
    whole, leading = [], []
    for name, calls in (("sample", whole), ("sample_leading", leading)):
        method = getattr(ARGMMPrior, name)
        monkeypatch.setattr(ARGMMPrior, name, lambda self, *a, _m=method, _c=calls, **k: (
            _c.append(self) or _m(self, *a, **k)))
    kin64, pose = _reachable_pose()
    req = IKRequest(position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(),
                    orientation_tolerance=1e-3, num_solutions=8, seed=0, time_budget_s=2.0)
    run = RequestPipeline(adapter, req, None, None)
    run.draw_first_batch()
    kin = adapter.kin
    middle = 0.5 * (kin.lower + kin.upper)
    assert torch.equal(run.cand_q[:, :6], middle[:6].expand(run.cand_q.shape[0], 6))
    assert run.cand_q[:, 6].std() > 0
    result = adapter.solve(req)
    assert result.num_found == 8 and result.iterations_run == 0
    assert leading and all(p is adapter.pose_prior for p in leading)
    assert not [p for p in whole if p is adapter.pose_prior]  # no whole draw of it
    q = np.stack([s.q for s in result.solutions])
    with PyBulletCollisionChecker([]) as exact:
        assert exact.valid(q).all()
    reached = kin64.ee_pose(torch.from_numpy(q))
    assert (reached[:, :3, 3] - pose[:3, 3]).norm(dim=-1).max() < 1e-4


def test_a_pose_with_no_free_solution_answers_best_effort_on_the_pose(adapter):
    """A full pose whose every solution collides (a cage around the robot): no solution, and
    the entries returned as best effort are the prior's seeds moved onto the pose by the
    closed form, not samples off it."""
    kin64, pose = _reachable_pose()
    cage = Obstacle(name="cage", kind="box", size=(3.0, 3.0, 3.0), position=(0.0, 0.0, 0.0))
    result = adapter.solve(IKRequest(
        position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(), orientation_tolerance=1e-3,
        obstacles=[cage], iterations=0, num_solutions=4, time_budget_s=0.3, seed=0))
    assert result.num_found == 0 and result.solutions
    assert all(not s.collision_free and s.position_error < 1e-4 and s.orientation_error < 1e-3
               for s in result.solutions)


def test_a_pose_prior_must_be_registered_and_pose_conditioned(tmp_path):
    models = _models_with_pose_prior(tmp_path, conditioning="position")
    with pytest.raises(ModelLoadError, match="not the pose"):
        IKAdapter.from_models(models, "panda_ik", IKAdaptConfig(pose_prior="tiny_pose"),
                              TensorSpec.resolve("cpu"))
    with pytest.raises(ModelLoadError, match="no IK prior named 'nope'"):
        IKAdapter.from_models(models, "panda_ik", IKAdaptConfig(pose_prior="nope"),
                              TensorSpec.resolve("cpu"))


def test_rounds_explore_uniform_seeds_after_one_that_added_nothing(adapter):
    """Full poses in closed form: after a round that added no solution, the next one's seeds
    include ``pose_explore_seeds`` uniform configurations (q7 values the prior may not draw),
    and such a round runs before MACE adapts (wall and cabinet targets whose prior q7 values ran
    dry: about 120 ms with a MACE iteration, 10-30 ms with it)."""
    from mace_core.ik.pipeline import RequestPipeline

    kin64, pose = _reachable_pose()
    req = IKRequest(position=pose[:3, 3].numpy(), rotation=pose[:3, :3].numpy(),
                    orientation_tolerance=1e-3, num_solutions=8, seed=0)
    run = RequestPipeline(adapter, req, None, None)
    run.draw_first_batch()
    rounds, seeds = run.rounds, run.cand_q[:5]
    assert rounds.explore == adapter.config.pose_explore_seeds > 0
    assert rounds._with_explorers(seeds).shape[0] == 5  # no round yet
    rounds.rounds_run, rounds.last_added = 1, 0
    assert rounds._with_explorers(seeds).shape[0] == 5 + rounds.explore
    rounds.last_added = 2
    assert rounds._with_explorers(seeds).shape[0] == 5
    # a dry round without explorers is followed by one with them before MACE adapts
    rounds.last_added = 0
    rounds.explored = False
    assert rounds.worth_another
    rounds._with_explorers(seeds)
    assert rounds.explored and not rounds.worth_another
    position_only = RequestPipeline(adapter, replace(req, rotation=None), None, None)
    position_only.draw_first_batch()
    assert position_only.rounds.explore == 0
    position_only.rounds.last_added = 0
    assert not position_only.rounds.worth_another  # positions adapt after a dry round


def test_effective_config_is_validated_once_per_overrides_and_follows_new_defaults(adapter):
    """Requests with the same overrides share one validated config; new defaults (a warm-up's
    variant, then the originals back) are seen at once; a bad override is refused every time,
    and a bad target whatever config is cached."""
    req = IKRequest(position=np.array([0.5, 0.0, 0.4]), num_solutions=3, seed=1)
    first = adapter.effective_config(req)
    assert adapter.effective_config(replace(req, seed=2)) is first  # the seed is no override
    assert first.num_solutions == 3
    defaults = adapter.config
    try:
        adapter.config = replace(defaults, early_stop=not defaults.early_stop)
        assert adapter.effective_config(req).early_stop is not defaults.early_stop
    finally:
        adapter.config = defaults
    assert adapter.effective_config(req).early_stop is defaults.early_stop
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="num_solutions"):
            adapter.effective_config(replace(req, num_solutions=10_000))
    with pytest.raises(InvalidRequestError, match="3 finite numbers"):
        adapter.effective_config(replace(req, position=np.array([np.nan, 0.0, 0.4])))
    with pytest.raises(InvalidRequestError, match="not a rotation"):
        adapter.effective_config(replace(req, rotation=-np.eye(3), orientation_tolerance=0.01))


def test_pose_requests_adapt_with_their_own_gradient_steps(adapter):
    """A full pose in closed form runs MACE with ``pose_gradient_steps`` (cheap iterations
    between cheap explore rounds) unless the request sets M; positions keep ``mace``'s."""
    rot = np.eye(3)[[0, 2, 1]] * np.array([1.0, 1.0, -1.0])[:, None]  # a proper rotation
    assert np.isclose(np.linalg.det(rot), 1.0)
    pose = IKRequest(position=np.array([0.5, 0.0, 0.4]), rotation=rot, num_solutions=8)
    cfg = adapter.config
    assert adapter.effective_config(pose).mace.gradient_steps == cfg.pose_gradient_steps
    assert cfg.pose_gradient_steps != cfg.mace.gradient_steps
    assert adapter.effective_config(replace(pose, gradient_steps=7)).mace.gradient_steps == 7
    position = replace(pose, rotation=None)
    assert adapter.effective_config(position).mace.gradient_steps == cfg.mace.gradient_steps
    dls = replace(pose, refinement="dls")
    assert adapter.effective_config(dls).mace.gradient_steps == cfg.mace.gradient_steps
    with pytest.raises(InvalidRequestError, match="pose_gradient_steps"):
        replace(cfg, pose_gradient_steps=0).validate()


def test_exact_checks_take_what_is_still_needed(adapter, monkeypatch):
    """Candidates all free: K checks, and the answer is the first K of the farthest-point order
    of the first 2 K (what twice as many checks would have kept). Candidates mostly colliding:
    the chunks grow with the share found valid, and every valid one needed is found."""
    from mace_core.deadline import Deadline
    from mace_core.ik.refinement_rounds import farthest_point_order

    spec, cfg, k = adapter.spec, adapter.config, 4
    candidates = adapter.kin.sample_uniform(40, spec.generator(3))
    world = adapter._world_of([])
    asked = []
    monkeypatch.setattr(adapter, "_exact_valid", lambda q, w: (
        asked.append(q.shape[0]) or np.ones(q.shape[0], dtype=bool)))
    empty = torch.empty(0, 7, dtype=spec.dtype)
    accepted, checked, valid = adapter._accept_exact(cfg, empty, candidates, world, k,
                                                     Deadline.after(5.0))
    assert (checked, valid, asked) == (k, k, [k])
    assert torch.equal(accepted, candidates[farthest_point_order(candidates, 2 * k)[:k]])

    asked.clear()  # one row in eight free: a chunk of 4, then up to 4 x what is missing
    free = torch.arange(40) % 8 == 0
    lookup = {tuple(row.tolist()): bool(ok) for row, ok in zip(candidates, free)}
    monkeypatch.setattr(adapter, "_exact_valid", lambda q, w: (
        asked.append(q.shape[0]) or np.array([lookup[tuple(r.tolist())] for r in q])))
    accepted, checked, valid = adapter._accept_exact(cfg, empty, candidates, world, k,
                                                     Deadline.after(5.0))
    assert valid == accepted.shape[0] == k and checked == sum(asked)
    assert asked[0] == k and max(asked) > k


def test_pose_rounds_fall_back_on_the_q7_grid(adapter, monkeypatch):
    """A full pose whose seeds' answers are many but collide: the same round goes on to the
    q7 grid's answers (solved in the same batch) instead of needing a fresh one."""
    from mace_core.ik.refinement import IKTarget

    refiner = adapter.refiners["analytic"]
    spec = adapter.spec
    q = adapter.kin.sample_uniform(1, spec.generator(5))
    pose = adapter.kin.ee_pose(q)[0]
    target = IKTarget(position=pose[:3, 3], rotation=pose[:3, :3], orientation_tolerance=1e-3)
    noise = torch.randn(16, 7, generator=spec.generator(6), dtype=spec.dtype)
    seeds = q.expand(16, -1) + 0.01 * noise
    found, grid = refiner.project(seeds, target)
    assert found.shape[0] > 0 and grid.shape[0] > 0
    lists = refiner.candidate_lists(seeds, target, needed=1)
    few = refiner.candidate_lists(seeds, target, needed=found.shape[0])
    assert len(lists) == 2 and len(few) == 1  # few seeds' answers: one list, spread over both
    assert few[0].shape[0] == found.shape[0] + grid.shape[0]
    # the seeds' answers all collide, the grid's are free: one round accepts K from the grid
    from mace_core.deadline import Deadline
    from mace_core.ik.refinement_rounds import RefinementRounds
    from mace_core.ik.request import IKTimings

    seeds_answers = {tuple(r.tolist()) for r in found}  # float64, as checked
    monkeypatch.setattr(adapter, "_exact_valid", lambda q, w: np.array(
        [tuple(r.tolist()) not in seeds_answers for r in q]))
    cfg = replace(adapter.config, num_solutions=2)
    rounds = RefinementRounds(adapter, cfg, target, adapter._world_of([]), Deadline.after(5.0),
                              IKTimings(), spec.generator(0), exact_first=True)
    rounds._accept_projections(seeds)
    assert rounds.accepted.shape[0] == 2 and rounds.checked > rounds.checked_valid == 2


def _pose_request(scene, q, **kw):
    """A full-pose request for the hand pose of configuration ``q (7,)``."""
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    pose = kin64.ee_pose(torch.as_tensor(q, dtype=torch.float64)[None])[0].numpy()
    return IKRequest(position=pose[:3, 3], rotation=pose[:3, :3], orientation_tolerance=1e-3,
                     obstacles=list(scene.obstacles), num_solutions=8, time_budget_s=5.0, seed=0,
                     **kw)


def test_a_target_for_the_flange_is_answered_at_the_flange(adapter):
    """``ik_link`` (MoveIt's ``ik_link_name``): a pose given for a link rigidly attached to the
    end effector (the flange) is reached by that link; a position alone for it, a link across
    a joint and an unknown one are refused with the reason."""
    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    flange = kin64.link_names.index("panda_link8")
    pose = kin64.link_poses(torch.as_tensor(q_star)[None])[0, flange].numpy()
    req = IKRequest(position=pose[:3, 3], rotation=pose[:3, :3], orientation_tolerance=1e-3,
                    obstacles=list(box.obstacles), num_solutions=4, time_budget_s=5.0, seed=0,
                    ik_link="panda_link8")
    result = adapter.solve(req)
    assert result.num_found == 4, result.message
    q = torch.as_tensor(np.stack([s.q for s in result.solutions]))
    reached = kin64.link_poses(q)[:, flange].numpy()
    np.testing.assert_allclose(reached[:, :3, 3], np.broadcast_to(pose[:3, 3], (4, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(reached[:, :3, :3], np.broadcast_to(pose[:3, :3], (4, 3, 3)),
                               atol=1e-5)
    for bad, message in ((dict(rotation=None, orientation_tolerance=0.0), "needs its orientation"),
                         (dict(ik_link="panda_link6"), "not a link rigidly attached"),
                         (dict(ik_link="tool0"), "not a link rigidly attached")):
        with pytest.raises(InvalidRequestError, match=message):
            adapter.solve(replace(req, **bad))
    ee = _pose_request(box, q_star, ik_link="panda_grasptarget")
    assert adapter.solve(ee).num_found == 8


@pytest.mark.parametrize("pose_target", [True, False])
def test_a_seed_state_gets_the_solution_nearest_it_first(adapter, pose_target):
    """With the robot's state as ``seed_state``, the first solution is the one a local solver
    started there finds (a seed at a free solution of the target: that solution itself), the
    others follow by their distance from it, and the answer stays diverse."""
    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    req = _pose_request(box, q_star)
    if not pose_target:
        req = replace(req, rotation=None, orientation_tolerance=0.0)
    plain = adapter.solve(req)
    seeded = adapter.solve(replace(req, seed_state=q_star))
    assert seeded.num_found == 8, seeded.message
    away = [float(np.linalg.norm(s.q - q_star)) for s in seeded.solutions]
    assert away == sorted(away)  # nearest first
    assert away[0] < (1e-4 if pose_target else 0.05)  # the seed itself, or DLS's step from it
    assert away[0] < min(np.linalg.norm(s.q - q_star) for s in plain.solutions)
    assert "from the seed state" in seeded.message
    with PyBulletCollisionChecker(box.obstacles) as pb:
        assert pb.valid(np.stack([s.q for s in seeded.solutions])).all()
    spread = min(np.abs(a.q - b.q).max() for i, a in enumerate(seeded.solutions)
                 for b in seeded.solutions[i + 1:])
    assert spread >= IKAdaptConfig().min_joint_distance


def test_the_seed_states_solution_never_costs_the_answer_a_solution(adapter, monkeypatch):
    """The solution nearest the seed state replaces the accepted ones within
    ``min_joint_distance`` of it only when as many remain: one too near is replaced, two too
    near stay (K would not be reached), one apart from all is added."""
    from mace_core.ik.pipeline import RequestPipeline

    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    req = replace(_pose_request(box, q_star), num_solutions=3, seed_state=q_star)
    run = RequestPipeline(adapter, req, None, None)
    run.draw_first_batch()
    spec = adapter.spec
    near = spec.tensor(q_star)
    monkeypatch.setattr(run.rounds, "nearest_solution", lambda seed: near)
    far = [near + spec.tensor([0.0] * 6 + [d]) for d in (0.5, 1.0, 1.5)]
    close = [near + spec.tensor([0.0] * 6 + [d]) for d in (0.05, -0.05)]
    for accepted, expected in (([close[0], far[0], far[1]], [near, far[0], far[1]]),
                               ([close[0], close[1], far[0]], [close[0], close[1], far[0]]),
                               ([far[0], far[1]], [near, far[0], far[1]])):
        run.rounds.accepted = torch.stack(accepted)
        run.add_nearest_to_seed_state()
        assert torch.equal(run.rounds.accepted, torch.stack(expected))


@pytest.mark.parametrize("pose_target", [True, False])
def test_one_solution_near_a_seed_state_is_answered_without_a_draw(adapter, pose_target):
    """K = 1 with a seed state (MoveIt's question): the solution nearest the seed, found before
    any draw from the prior (the seed itself where it is a free solution of the pose)."""
    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    req = replace(_pose_request(box, q_star), num_solutions=1, seed_state=q_star)
    if not pose_target:
        req = replace(req, rotation=None, orientation_tolerance=0.0)
    result = adapter.solve(req)
    assert result.num_found == 1 and result.timings.sampling == 0.0, result.message
    assert np.linalg.norm(result.solutions[0].q - q_star) < (1e-4 if pose_target else 0.05)
    with PyBulletCollisionChecker(box.obstacles) as pb:
        assert pb.valid(result.solutions[0].q[None])[0]


def test_the_local_attempt_is_made_only_where_the_closed_form_has_none_near(
        adapter, monkeypatch):
    """TRAC-IK's one attempt from the seed (up to 8 ms on a 2-core machine) is made only where
    the closed form's nearest free solution is more than LOCAL_ATTEMPT_BEYOND_RAD from the seed:
    not for a seed near a free solution, which the closed form finds, but from the ready pose,
    far from this pose's solutions."""
    from mace_core.ik.refinement_rounds import LOCAL_ATTEMPT_BEYOND_RAD
    from mace_core.robot.kinematics import PANDA_READY

    tracik, calls = adapter.refiners["tracik"], []
    real = tracik.solve_from_seed_state
    monkeypatch.setattr(tracik, "solve_from_seed_state",
                        lambda seed, pose: calls.append(seed) or real(seed, pose))
    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    near = q_star + np.array([0.05, -0.05, 0.05, 0.05, -0.05, 0.05, -0.03])
    req = replace(_pose_request(box, q_star), num_solutions=1)
    found = adapter.solve(replace(req, seed_state=near)).solutions[0].q
    assert not calls and np.linalg.norm(found - near) < 0.2
    found = adapter.solve(replace(req, seed_state=np.asarray(PANDA_READY))).solutions[0].q
    assert len(calls) == 1
    assert np.linalg.norm(found - np.asarray(PANDA_READY)) > LOCAL_ATTEMPT_BEYOND_RAD


def test_a_seed_states_solution_at_a_joint_limit_is_found_by_the_local_attempt(monkeypatch):
    """A free solution with joints 3 and 5 at their limits is within the limits for a sliver
    of q7 the closed form's grid around the seed misses (its nearest is 3.26 rad off); the
    one TRAC-IK attempt from the seed finds it (0.45 rad). (Its clock made 5 ms here: near
    the limits the attempt took 0.4-0.9 ms on this machine, and CI's may be slower.)"""
    from mace_core.ik import refinement

    monkeypatch.setattr(refinement, "SEED_STATE_ATTEMPT_S", 0.005)
    adapter = IKAdapter.from_models(MODELS, "panda_ik", IKAdaptConfig(), TensorSpec.resolve("cpu"))
    adapter.warm_up()
    wall = load_scene("config/scenes/wall.yaml")
    at_limits = np.array([-2.683, -0.322, 2.967, -1.661, 2.967, 3.739, 0.302])
    seed = np.array([-2.469, -0.191, 2.848, -1.362, 2.967, 3.587, 0.396])
    req = replace(_pose_request(wall, at_limits), seed_state=seed)
    first = adapter.solve(req).solutions[0].q
    assert np.linalg.norm(first - at_limits) < 1e-3
    adapter.refiners.pop("tracik")
    assert np.linalg.norm(adapter.solve(req).solutions[0].q - seed) > 3.0


def test_a_seed_state_with_the_sphere_checker_alone():
    """Without an exact checker the spheres judge the pose's solutions nearest the seed: the
    first answer is still the nearest they accept, nearer than a seedless answer's."""
    spheres = adapter_for_backend("spheres")
    box = load_scene("config/scenes/box.yaml")
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    req = _pose_request(box, q_star)
    seeded = spheres.solve(replace(req, seed_state=q_star))
    assert seeded.num_found == 8, seeded.message
    away = [float(np.linalg.norm(s.q - q_star)) for s in seeded.solutions]
    assert away == sorted(away)
    assert away[0] < min(np.linalg.norm(s.q - q_star) for s in spheres.solve(req).solutions)
    assert away[0] < 0.3


def test_a_seed_state_inside_an_obstacle_moves_to_the_nearest_free_solution(adapter):
    """The seed's own configuration collides with a box put on its forearm: the first answer
    is the nearest solution that is free, still nearer than a seedless answer's nearest."""
    q_star = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    kin = adapter.kin
    elbow = kin.link_poses(torch.as_tensor(q_star, dtype=kin.spec.dtype)[None])[0, 4, :3, 3]
    blocker = Obstacle(name="blocker", kind="sphere", size=(0.06,),
                       position=tuple(float(v) for v in elbow))
    box = load_scene("config/scenes/box.yaml")
    req = replace(_pose_request(box, q_star), obstacles=list(box.obstacles) + [blocker])
    with PyBulletCollisionChecker(req.obstacles) as pb:
        assert not pb.valid(q_star[None])[0]  # the seed is not an answer
        seeded = adapter.solve(replace(req, seed_state=q_star))
        assert seeded.success, seeded.message
        assert pb.valid(np.stack([s.q for s in seeded.solutions])).all()
    plain = adapter.solve(req)
    nearest = np.linalg.norm(seeded.solutions[0].q - q_star)
    assert nearest <= min(np.linalg.norm(s.q - q_star) for s in plain.solutions) + 1e-9


def test_a_batch_answers_every_target_within_its_share_of_the_budget(adapter):
    """``solve_batch``: each target answered as alone (K valid poses), in order; a refused one
    (its reason passed through, or the adapter's) does not stop the others; target i ends
    within its own budget and by (i + 1) / n of the batch's; an empty batch or a bad budget is
    refused."""
    from mace_core.ik.batch import solve_batch
    from mace_core.ik.benchmark import sample_pose_targets

    box = load_scene("config/scenes/box.yaml")
    with PyBulletCollisionChecker(box.obstacles) as pb:  # hand poses of free configurations
        _, configurations = sample_pose_targets(box, 3, 0, pb, configurations=True)
    requests = [replace(_pose_request(box, q), num_solutions=4) for q in configurations]
    nan = replace(requests[0], position=np.array([np.nan, 0.0, 0.3]))
    t0 = time.perf_counter()
    answers = solve_batch(adapter, [requests[0], "refused upstream", nan, *requests[1:]], 1.0)
    spent = time.perf_counter() - t0
    assert [a.success for a in answers] == [True, False, False, True, True]
    assert answers[1].error == "refused upstream" and "finite" in answers[2].error
    for answer in (answers[0], *answers[3:]):
        assert answer.result.num_found == 4, answer.result.message
    assert spent < 1.0 + 0.1
    with PyBulletCollisionChecker(box.obstacles) as pb:
        assert pb.valid(np.stack([s.q for s in answers[3].result.solutions])).all()
    # a target that cannot be answered keeps to its share: the next still gets its own
    hard = replace(requests[0], num_solutions=64, time_budget_s=30.0)
    t0 = time.perf_counter()
    answers = solve_batch(adapter, [hard, requests[1]], 0.4)
    assert time.perf_counter() - t0 < 0.4 + 0.1
    assert answers[0].result.timings.total < 0.2 + 0.05 and answers[1].success
    # ... and to its own budget, where that is shorter
    answers = solve_batch(adapter, [replace(hard, time_budget_s=0.05), requests[1]], 2.0)
    assert answers[0].result.timings.total < 0.05 + 0.05 and answers[1].success
    for bad, message in (([], "1 to limits.max_batch_targets"),
                         (requests * 1001, "1 to limits.max_batch_targets")):
        with pytest.raises(InvalidRequestError, match=message):
            solve_batch(adapter, bad, 1.0)
    for budget in (0.0, float("nan"), 31.0):
        with pytest.raises(InvalidRequestError, match="for the whole batch"):
            solve_batch(adapter, requests, budget)
