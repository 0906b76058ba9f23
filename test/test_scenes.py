"""Scene files, obstacle validation and quaternion conversion."""

import math
import os

import numpy as np
import pytest
import torch
import yaml

from mace_core.errors import InvalidRequestError
from mace_core.robot.scenes import (Obstacle, Scene, TargetRegion, load_scene,
                                    quaternion_xyzw_to_matrix, scene_from_dict,
                                    validate_obstacles)
from mace_core.tensor import TensorSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = sorted(os.path.join(ROOT, "config", "scenes", f)
                for f in os.listdir(os.path.join(ROOT, "config", "scenes")) if f.endswith(".yaml"))


def _scene_dict() -> dict:
    return {"name": "s", "ee_link": "panda_grasptarget",
            "obstacles": [{"name": "floor", "type": "box", "center": [0, 0, -0.01],
                           "size": [2, 2, 0.02]}],
            "targets": {"min": [0.4, -0.1, 0.1], "max": [0.5, 0.1, 0.2]}}


def test_shared_scenes_load():
    expected = {"box": 6, "cabinet": 11, "wall": 2, "window": 5}
    assert sorted(os.path.basename(p)[:-5] for p in SCENES) == sorted(expected)
    for path in SCENES:
        scene = load_scene(path)
        assert len(scene.obstacles) == expected[scene.name]
        assert scene.ee_link == "panda_grasptarget"
        floor = next(o for o in scene.obstacles if o.name == "floor")
        assert floor.kind == "box" and floor.size == (2.0, 2.0, 0.02)
        assert np.allclose(floor.rotation_matrix, np.eye(3))
        assert all(lo <= hi for lo, hi in zip(scene.targets.min, scene.targets.max))


def test_quaternion_to_matrix():
    assert np.allclose(quaternion_xyzw_to_matrix([0, 0, 0, 1]), np.eye(3))
    s = math.sqrt(0.5)
    rz = np.asarray(quaternion_xyzw_to_matrix([0, 0, s, s]))  # +90 deg about z
    assert np.allclose(rz @ [1, 0, 0], [0, 1, 0])
    rx = np.asarray(quaternion_xyzw_to_matrix([1, 0, 0, 0]))  # 180 deg about x
    assert np.allclose(rx, np.diag([1, -1, -1]))
    # Slightly off unit is normalized; far off, zero and NaN are rejected.
    near = np.asarray(quaternion_xyzw_to_matrix([0, 0, 0, 1.0005]))
    assert np.allclose(near @ near.T, np.eye(3), atol=1e-12)
    for bad in ([0, 0, 0, 0], [0, 0, 0, 2], [0, 0, float("nan"), 1], [0, 0, 1]):
        with pytest.raises(InvalidRequestError):
            quaternion_xyzw_to_matrix(bad)


def test_yaml_quat_and_other_kinds(tmp_path):
    data = _scene_dict()
    s = math.sqrt(0.5)
    data["obstacles"] += [
        {"name": "rotated", "type": "box", "center": [0.5, 0, 0.2], "size": [0.1, 0.2, 0.3],
         "quat": [0, 0, s, s]},
        {"name": "ball", "type": "sphere", "center": [0.5, 0.3, 0.2], "size": [0.05]},
        {"name": "can", "type": "cylinder", "center": [0.5, -0.3, 0.2], "size": [0.2, 0.04]}]
    path = tmp_path / "scene.yaml"
    path.write_text(yaml.safe_dump(data))
    scene = load_scene(str(path))
    rotated = scene.obstacles[1]
    assert np.allclose(rotated.rotation_matrix @ [1, 0, 0], [0, 1, 0])
    assert scene.obstacles[2].size == (0.05,) and scene.obstacles[3].size == (0.2, 0.04)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["obstacles"][0].update(colour="red"), "unknown key"),
    (lambda d: d["targets"].update(mean=[0, 0, 0]), "unknown key"),
    (lambda d: d.pop("targets"), "missing key"),
    (lambda d: d["obstacles"][0].update(type="cone"), "type must be one of"),
    (lambda d: d["obstacles"][0].update(size=[1, 1]), "size must be 3 numbers"),
    (lambda d: d["obstacles"][0].update(size=[1, 0, 1]), "sizes must be > 0"),
    (lambda d: d["obstacles"][0].update(center=[0, float("nan"), 0]), "finite"),
    (lambda d: d["obstacles"][0].update(quat=[0, 0, 0, 0]), "not unit"),
    (lambda d: d["targets"].update(min=[1, 0, 0]), "exceeds"),
    (lambda d: d["obstacles"].append(dict(d["obstacles"][0])), "not unique"),
])
def test_scene_validation_errors(mutate, message):
    data = _scene_dict()
    mutate(data)
    with pytest.raises(InvalidRequestError, match=message):
        scene_from_dict(data)


def test_load_scene_unreadable(tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_scene(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_scene(str(bad))


@pytest.mark.parametrize("obstacle, message", [
    (Obstacle("a", "box", (1.0, 1.0), (0.0, 0.0, 0.0)), "size must be 3"),
    (Obstacle("a", "sphere", (-0.1,), (0.0, 0.0, 0.0)), "> 0"),
    (Obstacle("a", "cylinder", (0.1, float("inf")), (0.0, 0.0, 0.0)), "finite"),
    (Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0)), "position"),
    (Obstacle("a", "prism", (1.0,), (0.0, 0.0, 0.0)), "kind"),
    (Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
              ((1.0, 0.1, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))), "orthonormal"),
    (Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
              ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))), "det"),
])
def test_obstacle_validate(obstacle, message):
    with pytest.raises(InvalidRequestError, match=message):
        obstacle.validate()


GOOD_OBSTACLES = (
    Obstacle("box", "box", (0.1, 0.2, 0.3), (0.5, 0.0, 0.2),
             quaternion_xyzw_to_matrix((0.0, 0.0, math.sin(0.3), math.cos(0.3)))),
    Obstacle("ball", "sphere", (0.05,), (0.4, 0.1, 0.3)),
    Obstacle("can", "cylinder", (0.2, 0.04), (0.3, -0.2, 0.1)),
    Obstacle("arrays", "box", np.array([0.1, 0.1, 0.1]), np.zeros(3), np.eye(3)),
)


@pytest.mark.parametrize("bad", [
    Obstacle("a", "box", (1.0, 1.0), (0.0, 0.0, 0.0)),
    Obstacle("a", "sphere", (-0.1,), (0.0, 0.0, 0.0)),
    Obstacle("a", "sphere", 0.1, (0.0, 0.0, 0.0)),
    Obstacle("a", "cylinder", (0.1, float("nan")), (0.0, 0.0, 0.0)),
    Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0)),
    Obstacle("a", "box", (1.0, 1.0, 1.0), ("x", 0.0, 0.0)),
    Obstacle("a", "prism", (1.0,), (0.0, 0.0, 0.0)),
    Obstacle("a", ["box"], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
             ((1.0, 0.1, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))),
    Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
             ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))),
    Obstacle("a", "box", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0.0), (0.0, 1.0))),
])
def test_obstacles_validated_at_once_as_one_at_a_time(bad):
    """The batched validation (a request's world) accepts what Obstacle.validate accepts and
    refuses, with its message, the first obstacle it refuses."""
    validate_obstacles(GOOD_OBSTACLES)
    validate_obstacles(())
    with pytest.raises(InvalidRequestError) as one:
        bad.validate()
    for where in range(len(GOOD_OBSTACLES) + 1):
        obstacles = GOOD_OBSTACLES[:where] + (bad,) + GOOD_OBSTACLES[where:]
        with pytest.raises(InvalidRequestError) as batched:
            validate_obstacles(obstacles)
        assert str(batched.value) == str(one.value)


def test_sample_targets_inside_region():
    spec = TensorSpec()
    scene = Scene("s", "panda_grasptarget", (), TargetRegion((0.4, -0.1, 0.1), (0.5, 0.1, 0.2)))
    pts = scene.sample_targets(1000, spec.generator(0), spec)
    assert pts.shape == (1000, 3) and pts.dtype == spec.dtype
    lo, hi = torch.tensor(scene.targets.min), torch.tensor(scene.targets.max)
    assert bool(((pts >= lo) & (pts <= hi)).all())
    assert torch.equal(pts, scene.sample_targets(1000, spec.generator(0), spec))
