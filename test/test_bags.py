"""Bags of mace's service calls: written as ``ros2 bag record`` captures the node's service
events (MCAP, definitions inside), read back into the requests a replay sends."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from rosbags.rosbag2 import Reader

from mace_core.ik.benchmark import sample_pose_targets, sample_targets
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import load_scene
from mace_ros.bags import (RESPONSE_SENT, ServiceEventBag, read_ik_requests,
                           read_service_events, record_drawn_requests)
from mace_ros.msg import IKSolution
from mace_ros.srv import AdaptIK

WALL = "config/scenes/wall.yaml"


def test_recorded_requests_read_back_as_sent(tmp_path):
    scene = load_scene(WALL)
    written = record_drawn_requests(tmp_path / "bag", scene, 3, 5, target_kind="pose")
    read = read_ik_requests(tmp_path / "bag")
    assert read == written and len(read) == 3
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        poses = sample_pose_targets(scene, 3, 5, pb)
    for request, pose in zip(read, poses):
        p, o = request.target.pose.position, request.target.pose.orientation
        assert np.allclose([p.x, p.y, p.z], pose[:3])
        assert np.allclose(np.abs(np.dot([o.x, o.y, o.z, o.w], pose[3:])), 1.0)
        assert request.use_orientation and request.num_solutions == 8
        assert len(request.obstacles) == len(scene.obstacles)
    seeded = record_drawn_requests(tmp_path / "seeded", scene, 2, 5, target_kind="pose",
                                   seed_near_rad=0.3)
    assert read_ik_requests(tmp_path / "seeded") == seeded
    assert all(len(r.seed_state.position) == 7 for r in seeded)
    assert not any(len(r.seed_state.position) for r in read)
    positions = record_drawn_requests(tmp_path / "positions", scene, 2, 1)
    assert not any(r.use_orientation for r in positions)
    xyz = [[r.target.pose.position.x, r.target.pose.position.y, r.target.pose.position.z]
           for r in positions]
    assert np.allclose(xyz, sample_targets(scene, 2, 1))


def test_a_request_recorded_before_a_field_existed_reads_with_its_default():
    """Bags keep the definitions they were recorded with: an AdaptIK request from before
    ``seed_state`` was added decodes without it (no seed state), every other field kept."""
    from types import SimpleNamespace

    from mace_ros.bags import draw_requests, from_rosbags, mace_typestore, to_rosbags
    from mace_ros.conversions import ik_request_from_msg, ik_request_to_msg

    store, _ = mace_typestore()
    sent = ik_request_to_msg(draw_requests(load_scene(WALL), 1, 0, target_kind="pose")[0])
    typename = "mace_ros/srv/AdaptIK_Request"
    new = to_rosbags(sent, typename, store)
    old = SimpleNamespace(**{f: getattr(new, f) for f in new.__dataclass_fields__
                             if f != "seed_state"})
    read = from_rosbags(old, AdaptIK.Request)
    assert read == sent and len(read.seed_state.position) == 0
    assert ik_request_from_msg(read).seed_state is None


def test_the_bag_carries_its_definitions_and_rosidl_hashes(tmp_path):
    """MCAP with ``ros2idl`` schemas of every type the event needs, under the RIHS01 hash
    rosidl generated (what ROS 2 tools check), and responses round-trip too."""
    event = AdaptIK.Event()
    event.info.event_type = RESPONSE_SENT
    event.info.sequence_number = 9
    event.info.client_gid = list(range(16))
    response = AdaptIK.Response(success=True, message="found 1 of 1")
    response.solutions = [IKSolution(joint_names=["a"] * 7, positions=[0.1] * 7, score=0.5)]
    event.response = [response]
    with ServiceEventBag(tmp_path / "bag") as bag:
        bag.write_event("/mace/adapt_ik", event, 42)
    (stamp, back), = list(read_service_events(tmp_path / "bag"))
    assert stamp == 42 and back == event
    assert os.path.exists(tmp_path / "bag" / "bag.mcap")
    share = os.path.join(os.environ["VIRTUAL_ENV"], "share", "mace_ros", "srv", "AdaptIK.json")
    hashes = {h["type_name"]: h["hash_string"] for h in json.load(open(share))["type_hashes"]}
    with Reader(tmp_path / "bag") as reader:
        (connection,) = reader.connections
        assert connection.topic == "/mace/adapt_ik/_service_event"
        assert connection.msgtype == "mace_ros/srv/AdaptIK_Event"
        assert connection.digest == hashes["mace_ros/srv/AdaptIK_Event"]
        text = connection.msgdef.data
        for block in ("mace_ros/srv/AdaptIK", "mace_ros/msg/IKSolution",
                      "service_msgs/msg/ServiceEventInfo", "geometry_msgs/msg/PoseStamped"):
            assert f"IDL: {block}\n" in text, block


def test_a_bag_replays_against_mace_and_the_baselines(tmp_path):
    """``replay_bag``: requests grouped by scene and kind, each group run as the benchmark
    runs a scene with the recorded targets, every answer judged by PyBullet."""
    from mace_core.ik.adapter import IKAdapter
    from mace_core.ik.request import IKAdaptConfig
    from mace_core.tensor import TensorSpec
    from mace_ros.bags import events_of
    from mace_ros.replay import replay_bag

    box, wall = load_scene("config/scenes/box.yaml"), load_scene(WALL)
    positions = record_drawn_requests(tmp_path / "a", box, 2, 0, num_solutions=2)
    poses = record_drawn_requests(tmp_path / "b", wall, 2, 0, target_kind="pose",
                                  num_solutions=2)
    with ServiceEventBag(tmp_path / "both") as bag:
        for k, event in enumerate(events_of(positions + poses)):
            bag.write_event("/mace/adapt_ik", event, k + 1)
    adapter = IKAdapter.from_models("models", "panda_ik", IKAdaptConfig(), TensorSpec())
    report = replay_bag(str(tmp_path / "both"), adapter,
                        ("mace_refine", "tracik_restarts", "analytic_restarts"))
    assert report["requests"] == 4 and len(report["groups"]) == 2
    first, second = report["groups"]
    assert first["config"]["target_kind"] == "position"
    assert set(first["methods"]) == {"mace_refine", "tracik_restarts"}  # no closed form
    assert np.allclose(first["targets"], sample_targets(box, 2, 0))
    assert second["config"]["target_kind"] == "pose" and len(second["targets"][0]) == 7
    assert set(second["methods"]) == {"mace_refine", "tracik_restarts", "analytic_restarts"}
    for group in report["groups"]:
        assert group["config"]["num_solutions"] == 2
        for name, m in group["methods"].items():
            assert m["success_rate"] == 1.0, name
    # the Markdown tables and the plots come from the per-request records
    from mace_ros.replay import markdown_report, time_to_first, time_to_k, write_outputs

    written = write_outputs(report, str(tmp_path / "out" / "replay.md"),
                            str(tmp_path / "out" / "plots"))
    assert len(written) == 1 + 2 * len(report["groups"])
    assert all(os.path.getsize(p) > 1000 for p in written if p.endswith(".png"))
    text = (tmp_path / "out" / "replay.md").read_text()
    assert text == markdown_report(report)
    assert "## bag-1-box: 2 position requests" in text and "## bag-2-wall: 2 pose" in text
    for group in report["groups"]:
        k = group["config"]["num_solutions"]
        section = text.split(f"## {group['scene']}:")[1].split("\n## ")[0]
        for name, m in group["methods"].items():
            (line,) = [row for row in section.splitlines() if row.startswith(f"| {name} |")]
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows = m["per_target"]
            first = np.array([r["time_first_s"] if r["valid"] else np.inf for r in rows])
            full = np.array([r["time_s"] if r["valid"] >= k else np.inf for r in rows])
            assert [time_to_first(r) for r in rows] == first.tolist()
            assert [time_to_k(r, k) for r in rows] == full.tolist()
            assert cells[1] == str(len(rows))
            assert float(cells[2]) == m["success_rate"] and float(cells[3]) == m["k_success_rate"]
            assert cells[4] == (f"{np.median(first) * 1e3:,.1f} / "
                                f"{np.percentile(first, 90) * 1e3:,.1f}")
            assert cells[5] == (f"{np.median(full) * 1e3:,.1f} / "
                                f"{np.percentile(full, 90) * 1e3:,.1f}")
            assert float(cells[6]) == round(m["mean_position_error_m"] * 1e3, 3)
            assert float(cells[7]) == round(m["mean_orientation_error_rad"] * 1e3, 3)
            assert float(cells[8]) == round(m["mean_pairwise_joint_distance_rad"], 2)


def test_a_moveit_bag_replays_with_its_scene_and_answers(tmp_path):
    """A bag as a MoveIt pipeline records it (``/compute_ik`` events under moveit_msgs' type
    names, ``/monitored_planning_scene`` beside them) decodes from its own definitions and
    replays: the pose asked for panda_link8 becomes the end effector's, the scene is the
    one recorded, and MoveIt's recorded answers are judged like every method's."""
    from mace_core.ik.adapter import IKAdapter
    from mace_core.ik.request import IKAdaptConfig, IKRequest
    from mace_core.robot.scenes import quaternion_xyzw_to_matrix
    from mace_core.tensor import TensorSpec
    from mace_ros.moveit_bags import read_moveit_ik_calls, write_moveit_style_bag
    from mace_ros.replay import markdown_report, replay_bag

    box = load_scene("config/scenes/box.yaml")
    with PyBulletCollisionChecker(box.obstacles) as checker:
        targets = sample_pose_targets(box, 2, 5, checker)
    ready = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])  # the robot_state
    requests = [IKRequest(position=t[:3], rotation=np.asarray(quaternion_xyzw_to_matrix(t[3:])),
                          obstacles=list(box.obstacles), orientation_tolerance=1e-3,
                          seed_state=ready)
                for t in targets]
    adapter = IKAdapter.from_models("models", "panda_ik", IKAdaptConfig(), TensorSpec())
    solved = adapter.solve(IKRequest(**{**requests[0].__dict__, "num_solutions": 1,
                                        "time_budget_s": 5.0, "seed": 0, "seed_state": None}))
    answers = [(solved.solutions[0].q, 0.004), (None, 0.05)]  # one success, one failure
    write_moveit_style_bag(tmp_path / "moveit", requests, adapter.kin, answers=answers)
    with Reader(tmp_path / "moveit") as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {"/compute_ik/_service_event": "moveit_msgs/srv/GetPositionIK_Event",
                         "/monitored_planning_scene": "moveit_msgs/msg/PlanningScene"}
    calls = read_moveit_ik_calls(tmp_path / "moveit", adapter.kin)
    assert [c.error_code for c in calls] == [1, -31]
    assert [c.latency_s for c in calls] == pytest.approx([0.004, 0.05])
    np.testing.assert_allclose(calls[0].solution, solved.solutions[0].q)
    for call, request in zip(calls, requests):
        assert call.ik_link_name == "panda_link8" and call.unsupported == []
        np.testing.assert_allclose(call.request.position, request.position, atol=1e-7)
        np.testing.assert_allclose(call.request.rotation, request.rotation, atol=1e-6)
        assert [o.kind for o in call.request.obstacles] == [o.kind for o in box.obstacles]
        np.testing.assert_allclose(call.request.seed_state, ready)  # robot_state, by name
    report = replay_bag(str(tmp_path / "moveit"), adapter, ("mace_refine",))
    (group,) = report["groups"]
    assert group["scene"] == "moveit-1-box" and group["config"]["target_kind"] == "pose"
    assert report["moveit"] == {"calls": 2, "replayed": 2, "unsupported": []}
    recorded = group["methods"]["moveit_recorded"]
    assert recorded["success_rate"] == 0.5  # its failure counts, its success is judged valid
    assert [r["time_s"] for r in recorded["per_target"]] == pytest.approx([0.004, 0.05])
    assert group["methods"]["mace_refine"]["k_success_rate"] == 1.0
    assert "| moveit_recorded | 2 | 0.50 | 0.00 | - / - |" in markdown_report(report)
    # the answers nearest the robot's joints: MoveIt's one solution, and MACE's first
    assert recorded["per_target"][0]["seed_distance"] == pytest.approx(
        np.linalg.norm(solved.solutions[0].q - ready))
    assert group["methods"]["mace_refine"]["median_seed_distance_rad"] is not None
    assert "nearest valid from the seed state (rad) |" in markdown_report(report)


def test_the_planning_scene_follows_moveits_diffs():
    """Full scenes replace the world; diffs add, move, append and remove objects; meshes and
    foreign frames are reported, not dropped silently. Fields are read by name."""
    from types import SimpleNamespace as NS

    from mace_ros.moveit_bags import PlanningSceneState

    def pose(x=0.0, y=0.0, z=0.0):
        return NS(position=NS(x=x, y=y, z=z), orientation=NS(x=0.0, y=0.0, z=0.0, w=1.0))

    def obj(oid, op, frame="panda_link0", prims=(), meshes=0, at=pose()):
        return NS(id=oid, operation=op, header=NS(frame_id=frame), pose=at,
                  primitives=[NS(type=t, dimensions=d) for t, d, _ in prims],
                  primitive_poses=[p for _, _, p in prims], meshes=[None] * meshes, planes=[])

    def scene(objects, diff):
        return NS(is_diff=diff, world=NS(collision_objects=objects))

    state = PlanningSceneState("panda_link0")
    state.apply(scene([obj("table", 0, prims=[(1, [1.0, 1.0, 0.1], pose(z=-0.05))]),
                       obj("ball", 0, prims=[(2, [0.1], pose())], at=pose(x=0.5))], False))
    obstacles, missing = state.obstacles()
    assert [(o.name, o.kind) for o in obstacles] == [("table", "box"), ("ball", "sphere")]
    assert obstacles[1].position == (0.5, 0.0, 0.0) and missing == []
    state.apply(scene([obj("ball", 3, at=pose(y=0.2)),  # MOVE
                       obj("ball", 2, prims=[(3, [0.2, 0.05], pose(z=0.3))]),  # APPEND
                       obj("part", 0, meshes=1),  # a mesh
                       obj("far", 0, frame="camera", prims=[(2, [0.1], pose())])], True))
    obstacles, missing = state.obstacles()
    assert [(o.name, o.kind) for o in obstacles] == [
        ("table", "box"), ("ball/0", "sphere"), ("ball/1", "cylinder")]
    assert obstacles[2].position == (0.0, 0.2, 0.3)
    assert missing == ["part: 1 mesh(es)", "far: frame 'camera' is not the robot's base"]
    state.apply(scene([obj("ball", 1)], True))  # REMOVE
    assert [o.name for o in state.obstacles()[0]] == ["table"]
    state.apply(scene([], False))  # a full, empty scene
    assert state.obstacles() == ([], [])
