"""Smoke tests of ``mace-bench ik``: JSON schema, and figures consistent with PyBullet re-checks.

Tiny settings (2 targets, K = 2, short budgets, a tiny random-init prior written to a temporary
folder), so the numbers mean nothing; what is asserted is that every figure can be recomputed
from the returned solutions with an independent exact checker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from mace_core.errors import InvalidRequestError
from mace_core.ik.adapter import IKAdapter
from mace_core.ik.baselines import TracIKRestarts, TracIKRestartsConfig
from mace_core.ik.benchmark import (METHODS, TABLE1_METHODS, IKBenchmarkConfig, SolutionJudge,
                                    run_benchmark, sample_targets, table1_service_config)
from mace_core.ik.benchmark_report import format_table
from mace_core.ik.prior import ARGMMConfig, ARGMMPrior
from mace_core.ik.registry import save_ik_prior
from mace_core.ik.request import IKAdaptConfig
from mace_core.mace import MACEConfig
from mace_core.robot.kinematics import RobotKinematics, panda_urdf_path
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import load_scene
from mace_core.robot.spheres import default_spheres_path
from mace_core.tensor import TensorSpec
from mace_ros.bench import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENE = os.path.join(ROOT, "config", "scenes", "box.yaml")
TOL = 1e-4

SUMMARY_KEYS = {
    "success_rate", "k_success_rate", "median_time_s", "p90_time_s", "time_basis",
    "median_time_first_s", "p90_time_first_s", "mean_position_error_m",
    "mean_orientation_error_rad", "mean_checks_per_target", "median_projection_distance_rad",
    "projectable_fraction", "mean_pairwise_joint_distance_rad",
    "mean_pairwise_joint_distance_valid_rad",
    "mean_valid_per_target", "collision_free_fraction", "valid_fraction_prior",
    "valid_fraction_adapted", "mean_iterations", "mean_attempts", "median_seed_distance_rad",
    "per_target", "solutions"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> str:
    """A models folder: registry, a tiny random-init IK prior (normalized to the Panda's joint
    limits) and the repository's robot spheres."""
    spec = TensorSpec()
    kin = RobotKinematics.panda(spec)
    torch.manual_seed(0)
    prior = ARGMMPrior(ARGMMConfig(hidden=16, layers=1), spec)
    prior.set_normalization(kin.lower, kin.upper, spec.tensor([0.4, 0.0, 0.4]),
                            spec.tensor([0.3, 0.3, 0.3]))
    folder = tmp_path_factory.mktemp("models")
    save_ik_prior(prior, str(folder / "tiny.safetensors"))
    (folder / "registry.yaml").write_text(
        "models:\n  panda_ik: {kind: ik_argmm, file: tiny.safetensors}\n")
    shutil.copy(default_spheres_path(), folder / "panda_spheres.yaml")
    return str(folder)


def _rejudge(scene, solutions: list, targets: np.ndarray) -> tuple[list, list, list]:
    """Independent re-check: a fresh PyBullet checker and float64 FK."""
    kin = RobotKinematics.panda(TensorSpec(dtype=torch.float64))
    valid, free, err = [], [], []
    with PyBulletCollisionChecker(scene.obstacles) as checker:
        for sols, target in zip(solutions, targets):
            q = np.asarray(sols, dtype=float).reshape(-1, 7)
            f = checker.valid(q) if len(q) else np.zeros(0, dtype=bool)
            e = (np.linalg.norm(kin.ee_position(torch.as_tensor(q)).numpy() - target, axis=1)
                 if len(q) else np.zeros(0))
            valid.append(f & (e <= TOL))
            free.append(f)
            err.append(e)
    return valid, free, err


#: the service's defaults on the tiny models folder, which has no pose prior
TINY_FOLDER_CONFIG = IKAdaptConfig(pose_prior="")


def test_requests_report_schema_and_consistency(models_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    config = tmp_path / "service.yaml"
    config.write_text("ik:\n  num_solutions: 2\n  refine_seeds: 8\n"
                      "  mace: {num_samples: 64, iterations: 3, pool_size: 64}\n")
    rc = main(["ik", "--scene", SCENE, "--targets", "2", "--seed", "3", "--json", str(out),
               "--models-dir", models_dir, "--config", str(config), "--num-solutions", "2",
               "--budget", "0.3", "--tracik-timeout", "1.0", "--no-warmup",
               "--ik-prior", "panda_ik", "--pose-prior", "none"])
    assert rc == 0
    assert "tracik_restarts" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["ik_prior"] == "panda_ik" and report["pose_prior"] == "none"
    scene = load_scene(SCENE)
    targets = np.asarray(report["targets"])
    assert targets.shape == (2, 3)
    np.testing.assert_allclose(targets, sample_targets(scene, 2, 3), atol=1e-8)
    lo, hi = np.asarray(scene.targets.min), np.asarray(scene.targets.max)
    assert np.all(targets >= lo) and np.all(targets <= hi)
    assert list(report["methods"]) == list(METHODS)
    for name, m in report["methods"].items():
        assert set(m) == SUMMARY_KEYS, name
        assert len(m["solutions"]) == 2 and len(m["per_target"]) == 2
        assert all(len(q) == 7 for sols in m["solutions"] for q in sols)
        valid, free, err = _rejudge(scene, m["solutions"], targets)
        assert m["success_rate"] == pytest.approx(np.mean([v.any() for v in valid])), name
        assert m["k_success_rate"] == pytest.approx(np.mean([v.sum() >= 2 for v in valid]))
        flat_err = np.concatenate(err)
        if len(flat_err):
            assert m["mean_position_error_m"] == pytest.approx(flat_err.mean(), abs=1e-7)
            assert m["collision_free_fraction"] == pytest.approx(np.concatenate(free).mean())
        for row, v in zip(m["per_target"], valid):
            assert row["valid"] == int(v.sum())
            assert 0.0 <= row["time_first_s"] <= row["time_s"] + 1e-9
        assert m["median_time_s"] <= m["p90_time_s"] + 1e-12
        if name == "tracik_restarts":
            # Kept only after an exact check inside the loop; TRAC-IK converges to 1e-5 m.
            assert m["success_rate"] == 1.0
            assert all(v.all() for v in valid)
            assert m["valid_fraction_prior"] is None and m["mean_attempts"] >= 1
        else:
            assert 0.0 <= m["valid_fraction_prior"] <= 1.0
            assert 0.0 <= m["valid_fraction_adapted"] <= 1.0
    assert report["methods"]["prior"]["mean_iterations"] == 0.0
    c = report["comparison"]
    mace, tracik = report["methods"]["mace_refine"], report["methods"]["tracik_restarts"]
    assert c["time_ratio"] == pytest.approx(mace["median_time_s"] / tracik["median_time_s"])
    assert c["mace_success"] == mace["success_rate"]


def test_table1_report(models_dir):
    service = replace(TINY_FOLDER_CONFIG, mace=MACEConfig(
        num_samples=64, quantile=0.125, gradient_steps=2, iterations=3, learning_rate=1e-3,
        pool_size=64))
    adapter = IKAdapter.from_models(models_dir, "panda_ik", table1_service_config(service),
                                    TensorSpec())
    cfg = IKBenchmarkConfig(num_targets=2, protocol="table1", methods=TABLE1_METHODS,
                            table1_samples=50, table1_budget_s=0.5, table1_iterations=3,
                            warmup=False)
    scene = load_scene(os.path.join(ROOT, "config", "scenes", "wall.yaml"))
    report = run_benchmark(adapter, scene, cfg)
    assert report["protocol"] == "table1" and len(report["targets"]) == 2
    for name in TABLE1_METHODS:
        m = report["methods"][name]
        assert 0.0 <= m["valid_fraction"] <= 1.0 and 0.0 <= m["score"] <= m["valid_fraction"]
        assert len(m["per_target"]) == 2
        assert m["mean_iterations"] <= 3 and (name != "prior" or m["mean_iterations"] == 0)
        for row in m["per_target"]:
            assert row["adaptation_time_s"] <= row["request_time_s"]


def test_judge_position_error_matches_pybullet():
    scene = load_scene(SCENE)
    judge = SolutionJudge(scene, TOL)
    try:
        kin = judge.kin
        q = kin.sample_uniform(4, torch.Generator().manual_seed(0)).numpy()
        p, checker = judge.checker._p, judge.checker
        ee = checker.link_index[kin.ee_link]
        for row in q:
            for k, j in enumerate(checker._joints):
                p.resetJointState(checker.robot, j, float(row[k]), physicsClientId=checker.client)
            pos = p.getLinkState(checker.robot, ee, computeForwardKinematics=True,
                                 physicsClientId=checker.client)[4]
            assert judge.position_error(row[None], np.asarray(pos))[0] < 1e-6
    finally:
        judge.close()


def test_tracik_free_wrist_is_position_only():
    """The virtual ball joint lets TRAC-IK reach a position with any hand orientation."""
    kin = RobotKinematics.panda(TensorSpec(dtype=torch.float64))
    with open(panda_urdf_path()) as f:
        urdf = f.read()
    with PyBulletCollisionChecker([]) as checker:
        base = TracIKRestarts(kin, urdf, checker, TracIKRestartsConfig(
            num_solutions=4, timeout_s=1.0, orientation="free"))
        target = np.array([0.5, 0.1, 0.3])
        out = base.solve(target, np.random.default_rng(0))
    assert len(out.solutions) >= 1
    ee = kin.ee_pose(torch.as_tensor(out.solutions)).numpy()
    assert np.linalg.norm(ee[:, :3, 3] - target, axis=1).max() < TOL
    # Different restarts end with different hand orientations: orientation is left free.
    if len(out.solutions) >= 2:
        z = ee[:, :3, 2]
        assert math.degrees(math.acos(np.clip(abs(z[0] @ z[1]), 0, 1))) > 1.0


def test_pose_targets_report_exact_answers_from_every_method(models_dir):
    """``target_kind = "pose"``: the targets are hand poses of PyBullet-valid configurations;
    the closed-form floor and MACE's closed-form refinement answer every one with solutions the
    judge (PyBullet, 0.1 mm, 1e-3 rad) calls valid; TRAC-IK solves the full pose."""
    from mace_core.ik.benchmark import POSE_METHODS, sample_pose_targets

    adapter = IKAdapter.from_models(models_dir, "panda_ik", TINY_FOLDER_CONFIG, TensorSpec())
    scene = load_scene(os.path.join(ROOT, "config", "scenes", "box.yaml"))
    cfg = IKBenchmarkConfig(num_targets=3, target_kind="pose", warmup=False,
                            methods=("mace_refine", "tracik_restarts", "batched_restarts",
                                     "analytic_restarts"))
    report = run_benchmark(adapter, scene, cfg)
    targets = np.asarray(report["targets"])
    assert targets.shape == (3, 7)
    assert np.allclose(np.linalg.norm(targets[:, 3:], axis=1), 1.0)
    for name in cfg.methods:
        m = report["methods"][name]
        assert m["success_rate"] == 1.0, name
        assert m["mean_valid_per_target"] >= 1.0, name
        assert 0.0 <= m["mean_orientation_error_rad"] < 1e-3, name  # judged, not claimed
        if name == "mace_refine":  # how far the prior's samples are from the pose's solutions
            assert 0.0 < m["projectable_fraction"] <= 1.0
            assert 0.0 <= m["median_projection_distance_rad"] < 2 * math.pi
        assert all(row["checks"] is not None for row in m["per_target"]), name
        if name.endswith("_restarts"):  # every answer kept was checked (MACE: only those the
            # spheres refuse go to the exact check)
            assert m["mean_checks_per_target"] >= m["mean_valid_per_target"], name
    assert "comparison_analytic" in report and "comparison" in report
    with PyBulletCollisionChecker(scene.obstacles) as pb:  # the targets: free solutions exist
        again = sample_pose_targets(scene, 3, 0, pb)
    assert np.allclose(again, targets, atol=1e-9)
    assert set(POSE_METHODS) >= set(cfg.methods)
    with pytest.raises(InvalidRequestError, match="target_kind"):
        IKBenchmarkConfig(target_kind="joint").validate()


def test_a_seed_state_is_sent_and_the_answers_nearest_it_are_measured():
    """``seed_state``: MACE's requests carry it, TRAC-IK starts there; every method's nearest
    valid answer is measured from it, and MACE's (the solution nearest the seed, sought first)
    is nearer at the median than the closed-form floor's nearest of K from random q7."""
    ready = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
    adapter = IKAdapter.from_models(os.path.join(ROOT, "models"), "panda_ik", IKAdaptConfig(),
                                    TensorSpec())
    cfg = IKBenchmarkConfig(num_targets=6, target_kind="pose", warmup=False, seed_state=ready,
                            methods=("mace_refine", "tracik_restarts", "analytic_restarts"))
    report = run_benchmark(adapter, load_scene(SCENE), cfg)
    m = report["methods"]
    for name in cfg.methods:
        rows = [r["seed_distance"] for r in m[name]["per_target"]]
        assert all(r is not None and 0.0 <= r < 10.0 for r in rows), name
        assert m[name]["median_seed_distance_rad"] == pytest.approx(np.median(rows)), name
    assert (m["mace_refine"]["median_seed_distance_rad"]
            < m["analytic_restarts"]["median_seed_distance_rad"])
    assert "seed d" in format_table(report)
    with pytest.raises(InvalidRequestError, match="seed_state must be 7"):
        IKBenchmarkConfig(seed_state=(0.0, 1.0)).validate()
    unseeded = run_benchmark(adapter, load_scene(SCENE), replace(
        cfg, seed_state=(), num_targets=1, methods=("mace_refine",)))
    assert unseeded["methods"]["mace_refine"]["median_seed_distance_rad"] is None
    assert "seed d" not in format_table(unseeded)
    # seeds near each target's own configuration: MACE's nearest is near (the noise's size)
    near = run_benchmark(adapter, load_scene(SCENE), replace(
        cfg, seed_state=(), seed_near_rad=0.1, num_targets=3, methods=("mace_refine",)))
    assert 0.0 < near["methods"]["mace_refine"]["median_seed_distance_rad"] < 0.5
    for bad in (dict(seed_near_rad=-1.0), dict(seed_near_rad=0.1, seed_state=ready),
                dict(seed_near_rad=0.1, target_kind="position", methods=("mace_refine",))):
        with pytest.raises(InvalidRequestError, match="seed_near_rad"):
            replace(cfg, **{"seed_state": (), **bad}).validate()


def test_a_users_pose_targets_file(models_dir, tmp_path):
    """``targets_file``: the poses of a YAML list are the targets, quaternions normalized; bad
    entries are refused with their index."""
    from mace_core.ik.benchmark import load_pose_targets, sample_pose_targets

    scene = load_scene(os.path.join(ROOT, "config", "scenes", "wall.yaml"))
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        poses = sample_pose_targets(scene, 2, 3, pb)
    scaled = poses.copy()
    scaled[1, 3:] *= 1.0005  # a quaternion a little off unit: normalized
    path = tmp_path / "targets.yaml"
    path.write_text("\n".join(f"- [{', '.join(repr(float(v)) for v in row)}]" for row in scaled))
    assert np.allclose(load_pose_targets(str(path)), poses, atol=1e-12)
    adapter = IKAdapter.from_models(models_dir, "panda_ik", TINY_FOLDER_CONFIG, TensorSpec())
    cfg = IKBenchmarkConfig(num_targets=2, target_kind="pose", targets_file=str(path),
                            warmup=False, methods=("analytic_restarts",))
    report = run_benchmark(adapter, scene, cfg)
    assert np.allclose(report["targets"], poses, atol=1e-8)
    assert report["methods"]["analytic_restarts"]["success_rate"] == 1.0
    for text, words in (("- [0.5, 0.0, 0.4]", "entry 0"), ("- [0.5, 0, 0.4, 0, 0, 0, 2]", "unit"),
                        ("{}", "non-empty list"), ("- [.nan, 0, 0.4, 0, 0, 0, 1]", "entry 0")):
        path.write_text(text)
        with pytest.raises(InvalidRequestError, match=words):
            load_pose_targets(str(path))
    with pytest.raises(InvalidRequestError, match="target_kind 'pose'"):
        IKBenchmarkConfig(targets_file=str(path)).validate()


def test_prior_accuracy_reads_both_kinds_of_ik_prior_and_draws_their_samples(tmp_path):
    """``--protocol prior-accuracy`` takes the autoregressive and the aVIPS priors by name; its
    ``--figure`` writes one PNG of raw samples per prior."""
    out = tmp_path / "acc.json"
    figure = tmp_path / "samples.png"
    assert main(["ik", "--protocol", "prior-accuracy", "--ik-prior",
                 "panda_ik_pose,panda_ik_avips", "--poses", "16", "--samples-per-pose", "3",
                 "--json", str(out), "--figure", str(figure)]) == 0
    priors = json.loads(out.read_text())["priors"]
    assert [p["prior"] for p in priors] == ["panda_ik_pose", "panda_ik_avips"]
    assert all(p["poses"] == 16 and p["mean_position_error_mm"] > 0 for p in priors)
    for name in ("panda_ik_pose", "panda_ik_avips"):
        assert (tmp_path / f"samples_{name}.png").stat().st_size > 10_000


def test_ik_prior_defaults_to_the_services_ik_model(tmp_path):
    """Without ``--ik-prior`` the benchmark draws from the prior the node serves with:
    ``--config``'s ``ik_model``, else the service default (``panda_ik_small``)."""
    from mace_core.config import ServiceConfig

    assert ServiceConfig().ik_model == "panda_ik_small"
    out, config = tmp_path / "acc.json", tmp_path / "service.yaml"
    common = ["ik", "--protocol", "prior-accuracy", "--poses", "4", "--samples-per-pose", "2",
              "--json", str(out)]
    for extra, expected in (([], "panda_ik_small"), (["--config", str(config)], "panda_ik")):
        config.write_text("ik_model: panda_ik\n")
        assert main(common + extra) == 0
        assert [p["prior"] for p in json.loads(out.read_text())["priors"]] == [expected]


def test_extra_obstacles_are_seeded_near_the_target_and_clear_of_it():
    from mace_core.ik.benchmark import with_extra_obstacles

    scene = load_scene(os.path.join(ROOT, "config", "scenes", "cabinet.yaml"))
    target = np.array([0.5, 0.1, 0.4, 0.0, 0.0, 0.0, 1.0])
    changed = with_extra_obstacles(scene, target, 2, seed=0, index=3)
    extra = changed.obstacles[len(scene.obstacles):]
    assert changed.obstacles[:len(scene.obstacles)] == scene.obstacles and len(extra) == 2
    for box in extra:
        box.validate()
        gap = np.linalg.norm(np.asarray(box.position) - target[:3])
        assert 0.06 + 0.5 * np.linalg.norm(box.size) <= gap <= 0.25 * math.sqrt(3)
        assert all(0.04 <= s <= 0.08 for s in box.size)
    assert with_extra_obstacles(scene, target, 2, seed=0, index=3) == changed
    assert with_extra_obstacles(scene, target, 2, seed=0, index=4) != changed


def test_extra_obstacles_are_seen_by_the_baselines_too(models_dir):
    """A changed workcell is the same for every method: the baselines' exact checks see each
    request's extra boxes, so everything they answer is free by the judge of that scene."""
    adapter = IKAdapter.from_models(models_dir, "panda_ik", TINY_FOLDER_CONFIG, TensorSpec())
    cfg = IKBenchmarkConfig(num_targets=4, target_kind="pose", warmup=False, extra_obstacles=4,
                            methods=("analytic_restarts", "tracik_restarts", "mace_refine"))
    report = run_benchmark(adapter, load_scene(SCENE), cfg)
    for name in cfg.methods:
        rows = report["methods"][name]["per_target"]
        assert all(r["collision_free"] == r["returned"] for r in rows), (name, rows)
    assert sum(r["valid"] for r in report["methods"]["analytic_restarts"]["per_target"]) > 0


def test_a_batch_of_pose_targets_reports_valid_solutions_per_second(models_dir):
    """``--protocol batch``: the drawn targets in one batch; every answer judged by PyBullet,
    and the figures follow from the per-target records."""
    from mace_core.ik.batch_benchmark import format_batch, run_batch_benchmark

    adapter = IKAdapter.from_models(models_dir, "panda_ik", TINY_FOLDER_CONFIG, TensorSpec())
    report = run_batch_benchmark(adapter, load_scene(SCENE), 3, 0, "pose", num_solutions=4)
    valid = [r["valid"] for r in report["per_target"]]
    assert len(report["targets"]) == 3 and all(len(t) == 7 for t in report["targets"])
    assert report["k_success_rate"] == np.mean([v >= 4 for v in valid]) == 1.0
    assert report["valid_solutions_per_s"] == pytest.approx(sum(valid) / report["wall_s"])
    assert "valid solutions/s" in format_batch(report)
    assert main(["ik", "--protocol", "batch", "--scene", SCENE, "--targets", "2",
                 "--target-kind", "position", "--num-solutions", "2"]) == 0  # shipped models
