"""End-to-end tests of /mace/adapt_ik over DDS, against the node in its own process.

Solutions are judged independently of the node: forward kinematics of the returned joints must
reach the target, and PyBullet (exact meshes) must find them collision-free.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from geometry_msgs.msg import Pose
from shape_msgs.msg import SolidPrimitive

from conftest import MODELS_DIR, NodeProcess, exit_results, wait_for_service
from mace_core.ik.request import IKRequest
from mace_core.robot.kinematics import PANDA_JOINTS, RobotKinematics
from mace_core.robot.pybullet_checker import PyBulletCollisionChecker
from mace_core.robot.scenes import Obstacle, load_scene
from mace_core.tensor import TensorSpec
from mace_ros.client import MaceClient
from mace_ros.conversions import ik_request_to_msg
from mace_ros.msg import CollisionObject
from mace_ros.srv import AdaptIK
from mace_core.errors import InvalidRequestError
from mace_ros.node import BusyError, MaceNode, RequestGate, ShuttingDownError

BOX_SCENE = "config/scenes/box.yaml"


@pytest.fixture(scope="module")
def box():
    scene = load_scene(BOX_SCENE)
    target = (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0
    return scene, target


def box_request(box, **kw):
    """A valid AdaptIK request in the box scene (K = 4, 1 s); ``kw`` overrides IKRequest."""
    scene, target = box
    fields = dict(position=target, obstacles=list(scene.obstacles), num_solutions=4,
                  time_budget_s=1.0, seed=0)
    fields.update(kw)
    return ik_request_to_msg(IKRequest(**fields))


def assert_valid_solutions(response, scene, target, k):
    assert response.success, response.message
    assert 1 <= len(response.solutions) <= k
    kin = RobotKinematics.panda(TensorSpec())
    q = np.array([s.positions for s in response.solutions])
    ee = kin.ee_position(torch.as_tensor(q, dtype=torch.float32)).double().numpy()
    with PyBulletCollisionChecker(scene.obstacles) as exact:
        free = exact.valid(q)
    for sol, p, ok in zip(response.solutions, ee, free):
        assert list(sol.joint_names) == list(PANDA_JOINTS)
        assert sol.collision_free and ok, "a returned solution collides (PyBullet)"
        assert sol.position_error < 1e-4
        assert np.linalg.norm(p - target) < 2e-4  # float32 forward kinematics here
        assert 0.0 < sol.score <= 1.0


# ------------------------------------------------------------------------------------------------
# Valid requests
# ------------------------------------------------------------------------------------------------

def test_box_scene_returns_collision_free_solutions(ik_client, box):
    scene, target = box
    response = ik_client.call(box_request(box), timeout_s=30.0)
    assert_valid_solutions(response, scene, target, 4)
    # each solution's clearance is PyBullet's distance to the obstacles, ranked largest first
    clearance = [s.clearance for s in response.solutions]
    assert clearance == sorted(clearance, reverse=True)
    q = np.array([s.positions for s in response.solutions])
    with PyBulletCollisionChecker(scene.obstacles) as exact:
        np.testing.assert_allclose(clearance, exact.clearance(q, reach_m=1.0), atol=2e-4)
    assert all(0.0 < c <= 1.0 for c in clearance)
    assert response.total_time > 0.0 and response.sampling_time > 0.0
    assert response.total_time >= response.sampling_time
    assert 0.0 <= response.valid_fraction_prior <= 1.0
    assert 0.0 <= response.valid_fraction_adapted <= 1.0


def test_start_up_line_names_the_checkers_and_the_pose_solver(mace_node):
    assert mace_node.wait_for_log("ready in", 30.0)
    line = next(x for x in mace_node.log().splitlines() if "ready in" in x)
    assert "collision backend mujoco" in line
    assert "pose requests: closed form (the URDF is the Panda's chain)" in line


def test_pose_request_is_answered_exactly(ik_client, box):
    """``use_orientation``: the closed form answers (the default on a Panda); the solutions
    reach the hand pose of a valid configuration within the tolerance, PyBullet calls them
    free."""
    scene, _ = box
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    pose = kin64.ee_pose(torch.tensor([[0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6]],
                                      dtype=torch.float64))[0].numpy()
    request = box_request(box, position=pose[:3, 3], rotation=pose[:3, :3],
                          orientation_tolerance=1e-3)
    assert request.use_orientation
    response = ik_client.call(request, timeout_s=30.0)
    assert_valid_solutions(response, scene, pose[:3, 3], 4)
    q = torch.tensor([s.positions for s in response.solutions], dtype=torch.float64)
    reached = kin64.ee_pose(q)[:, :3, :3].numpy()
    cos = (np.einsum("sji,jk->sik", reached, pose[:3, :3]).trace(axis1=1, axis2=2) - 1) / 2
    assert np.arccos(np.clip(cos, -1, 1)).max() <= 1e-3
    assert all(s.orientation_error <= 1e-3 for s in response.solutions)


def test_a_pose_for_the_flange_is_reached_by_the_flange(ik_client, box):
    """``ik_link_name`` (as MoveIt's): the target is the flange's pose, and the flange reaches
    it; a link across a joint gets success = false and the links that may be named."""
    scene, _ = box
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    flange = kin64.link_names.index("panda_link8")
    q = torch.tensor([[0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6]], dtype=torch.float64)
    pose = kin64.link_poses(q)[0, flange].numpy()
    request = box_request(box, position=pose[:3, 3], rotation=pose[:3, :3],
                          orientation_tolerance=1e-3, ik_link="panda_link8")
    assert request.ik_link_name == "panda_link8"
    response = ik_client.call(request, timeout_s=30.0)
    assert response.success and len(response.solutions) == 4, response.message
    reached = kin64.link_poses(torch.tensor([s.positions for s in response.solutions],
                                            dtype=torch.float64))[:, flange].numpy()
    assert np.abs(reached[:, :3, 3] - pose[:3, 3]).max() < 1e-6
    assert np.abs(reached[:, :3, :3] - pose[:3, :3]).max() < 1e-5
    request.ik_link_name = "panda_link6"
    response = ik_client.call(request, timeout_s=30.0)
    assert not response.success and "panda_link8" in response.message, response.message


def test_a_batch_of_targets_is_answered_in_one_call(ik_client, box):
    """``/mace/adapt_ik_batch``: one answer per target, in order, each as ``adapt_ik`` would
    give it (valid for PyBullet, on the pose); a malformed target gets its own refusal; an
    empty batch is refused as a whole."""
    from mace_core.ik.benchmark import sample_pose_targets
    from mace_ros.srv import AdaptIKBatch

    scene, _ = box
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        poses = sample_pose_targets(scene, 3, 1, pb)
    targets = np.concatenate([poses[:1], [[np.nan, 0.0, 0.3, 0.0, 0.0, 0.0, 1.0]], poses[1:]])
    response = ik_client.adapt_ik_batch(targets, obstacles=scene.obstacles, num_solutions=4,
                                        time_budget_s=0.5, total_time_budget_s=2.0,
                                        orientation_tolerance=1e-3, seed=0)
    assert response.success and len(response.answers) == 4, response.message
    assert [a.success for a in response.answers] == [True, False, True, True]
    assert "target 1 position must be finite" in response.answers[1].message
    assert "3 of 4 targets" in response.message and response.total_time < 2.1
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    for answer, pose in zip(np.array(response.answers)[[0, 2, 3]], poses):
        q = np.array([s.positions for s in answer.solutions])
        assert len(q) == 4
        with PyBulletCollisionChecker(scene.obstacles) as pb:
            assert pb.valid(q).all()
        reached = kin64.ee_pose(torch.as_tensor(q))[:, :3, 3].numpy()
        assert np.abs(reached - pose[:3]).max() < 1e-6
    empty = ik_client.call(AdaptIKBatch.Request(num_solutions=4, time_budget=1.0), 30.0)
    assert not empty.success and "1 to limits.max_batch_targets" in empty.message


def test_the_client_sends_a_file_of_poses_as_one_batch(mace_node, box, tmp_path):
    """``mace-client ik --targets-file``: the poses in one ``/mace/adapt_ik_batch`` call, a row
    per target; exit status 0 when some target has a solution."""
    import subprocess
    import sys

    import yaml

    from mace_core.ik.benchmark import sample_pose_targets

    scene, _ = box
    with PyBulletCollisionChecker(scene.obstacles) as pb:
        poses = sample_pose_targets(scene, 2, 2, pb)
    path = tmp_path / "grasps.yaml"
    path.write_text(yaml.safe_dump(poses.tolist()))
    done = subprocess.run([sys.executable, "-m", "mace_ros.client", "ik", "--scene", BOX_SCENE,
                           "--targets-file", str(path), "-k", "2", "--time-budget", "0.5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 targets have a solution" in done.stdout
    assert sum(" True  2 solutions" in line for line in done.stdout.splitlines()) == 2


def test_a_seed_state_gets_the_nearest_solution_first(ik_client, box):
    """``seed_state`` as a robot publishes it (its joints by name, the fingers too): for a pose
    whose free solution the seed is, that solution comes first and the rest by distance."""
    from sensor_msgs.msg import JointState

    scene, _ = box
    q = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    kin64 = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    pose = kin64.ee_pose(torch.tensor(q[None], dtype=torch.float64))[0].numpy()
    request = box_request(box, position=pose[:3, 3], rotation=pose[:3, :3],
                          orientation_tolerance=1e-3, num_solutions=8)
    request.seed_state = JointState(name=["panda_finger_joint1"] + list(PANDA_JOINTS[::-1]),
                                    position=[0.04] + q[::-1].tolist())
    response = ik_client.call(request, timeout_s=30.0)
    assert_valid_solutions(response, scene, pose[:3, 3], 8)
    away = [np.linalg.norm(np.asarray(s.positions) - q) for s in response.solutions]
    assert away[0] < 1e-4 and away == sorted(away)
    assert "from the seed state" in response.message


@pytest.fixture
def ros_node(rclpy_context):
    """A plain ROS node with its own executor, for subscriptions and parameter calls."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    node = Node("mace_test_helper")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()


def test_the_client_takes_the_seed_state_from_a_joint_states_topic(ik_client, ros_node):
    """``MaceClient.joint_state`` (``mace-client ik --seed-from``): the arm's joints, in
    panda_joint1..7 order, from the next JointState a robot publishes (fingers first, joints
    in another order); no publisher: a timeout, not a hang."""
    from sensor_msgs.msg import JointState

    node, _ = ros_node
    q = [0.1, -0.7, 0.2, -2.3, 0.0, 1.6, 0.8]
    publisher = node.create_publisher(JointState, "/mace_test/joint_states", 10)
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            publisher.publish(JointState(name=["panda_finger_joint1"] + list(PANDA_JOINTS[::-1]),
                                         position=[0.04] + q[::-1]))
            time.sleep(0.02)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        np.testing.assert_allclose(ik_client.joint_state("/mace_test/joint_states", 10.0), q)
    finally:
        stop.set()
        thread.join()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no sensor_msgs/JointState on /mace_test/silent"):
        ik_client.joint_state("/mace_test/silent", 0.3)
    assert time.monotonic() - t0 < 5.0


def test_markers_follow_each_answer(ik_client, ros_node, box):
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from visualization_msgs.msg import Marker, MarkerArray

    node, executor = ros_node
    received = []
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(MarkerArray, "/mace/ik_solutions", received.append, qos)

    def matching():
        return [m for m in received if len(m.markers) == expected]

    # the node builds markers only once it has seen a subscriber: ask again until it has
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and not matching():
        response = ik_client.call(box_request(box, num_solutions=2), timeout_s=30.0)
        expected = len(response.solutions) + 2  # DELETEALL, one strip per solution, the target
        until = time.monotonic() + 1.0
        while time.monotonic() < until and not matching():
            executor.spin_once(timeout_sec=0.1)
    assert matching(), f"no MarkerArray of {expected} markers on /mace/ik_solutions"
    markers = matching()[-1].markers
    assert markers[0].action == Marker.DELETEALL
    assert [m.type for m in markers[1:-1]] == [Marker.LINE_STRIP] * len(response.solutions)
    assert markers[-1].type == Marker.SPHERE
    assert markers[-1].pose.position.x == pytest.approx(box[1][0])
    assert all(m.header.frame_id == "panda_link0" for m in markers)


def test_calls_are_published_as_service_events_for_bags(ik_client, ros_node, box, tmp_path):
    """Service introspection (``service_introspection: contents``): a call to
    ``/mace/adapt_ik`` appears on ``/mace/adapt_ik/_service_event`` as a request event with
    the request and a response event with the response, what ``ros2 bag record`` captures."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from service_msgs.msg import ServiceEventInfo

    node, executor = ros_node
    events = []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(AdaptIK.Event, "/mace/adapt_ik/_service_event", events.append, qos)
    deadline = time.monotonic() + 10.0  # discovery of the node's event publisher, both ways
    while time.monotonic() < deadline and not node.count_publishers(
            "/mace/adapt_ik/_service_event"):
        executor.spin_once(timeout_sec=0.05)
    time.sleep(1.0)
    request = box_request(box, num_solutions=2, seed=7)
    response = ik_client.call(request, timeout_s=30.0)

    def kinds():
        return {e.info.event_type for e in events if e.request and e.request[0].seed == 7
                or e.response and len(e.response[0].solutions) == len(response.solutions)}

    deadline = time.monotonic() + 10.0
    wanted = {ServiceEventInfo.REQUEST_RECEIVED, ServiceEventInfo.RESPONSE_SENT}
    while time.monotonic() < deadline and not wanted <= kinds():
        executor.spin_once(timeout_sec=0.1)
    assert wanted <= kinds(), f"events seen: {[e.info.event_type for e in events]}"
    got = [e for e in events if e.info.event_type == ServiceEventInfo.REQUEST_RECEIVED
           and e.request and e.request[0].seed == 7][0].request[0]
    assert got.num_solutions == 2
    assert got.target.pose.position.x == pytest.approx(float(request.target.pose.position.x))
    sent = [e for e in events if e.info.event_type == ServiceEventInfo.RESPONSE_SENT
            and e.response][-1].response[0]
    assert sent.success == response.success
    # what a recorder writes of them reads back as received
    from mace_ros.bags import ServiceEventBag, read_service_events

    with ServiceEventBag(tmp_path / "bag") as bag:
        for k, event in enumerate(events):
            bag.write_event("/mace/adapt_ik", event, k + 1)
    assert [e for _, e in read_service_events(tmp_path / "bag")] == events


def test_two_concurrent_clients_are_both_served(mace_node, box):
    responses = {}

    def call(name):
        client = MaceClient(node_name=f"mace_test_{name}")
        try:
            assert client.wait(10.0)
            responses[name] = client.call(box_request(box, num_solutions=2, seed=None),
                                          timeout_s=60.0)
        finally:
            client.close()

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90.0)
    assert sorted(responses) == ["a", "b"]
    for response in responses.values():
        assert_valid_solutions(response, box[0], box[1], 2)


# ------------------------------------------------------------------------------------------------
# Bad requests: success = false with a message naming the problem, and the node keeps serving
# ------------------------------------------------------------------------------------------------

def _nan_target(req):
    req.target.pose.position.x = math.nan


def _frame(req):
    req.target.header.frame_id = "world"


def _unreachable(req):
    req.target.pose.position.x = 2.0


def _box_two_dims(req):
    req.obstacles[1].primitives[0].dimensions = [0.3, 0.3]


def _negative_size(req):
    req.obstacles[1].primitives[0].dimensions = [0.3, -0.3, 0.1]


def _zero_k(req):
    req.num_solutions = 0


def _k_above_limit(req):
    req.num_solutions = 65


def _zero_budget(req):
    req.time_budget = 0.0


def _negative_budget(req):
    req.time_budget = -1.0


def _zero_quaternion(req):
    req.use_orientation = True
    q = req.target.pose.orientation
    q.x = q.y = q.z = q.w = 0.0


def _moveit(req):
    req.refinement = "moveit"


def _cone(req):
    req.obstacles.append(CollisionObject(
        id="cone", primitives=[SolidPrimitive(type=SolidPrimitive.CONE, dimensions=[0.1, 0.1])],
        primitive_poses=[Pose()]))


def _missing_pose(req):
    req.obstacles[1].primitive_poses = []


def _nan_obstacle(req):
    req.obstacles[2].primitive_poses[0].position.z = math.inf


def _long_refinement(req):
    req.refinement = "x" * 10_000


def _non_unit_quaternion(req):
    req.use_orientation = True
    req.target.pose.orientation.w = 2.0


def _orientation_tolerance_out_of_range(req):
    req.use_orientation = True
    req.orientation_tolerance = 4.0


def _huge_obstacle(req):
    req.obstacles[1].primitives[0].dimensions = [1e300, 0.3, 0.1]


def _huge_learning_rate(req):
    req.learning_rate = 1e38


def _seed_state_in_degrees(req):
    req.seed_state.position = [0.0, -45.0, 0.0, -135.0, 0.0, 90.0, 45.0]


def _seed_state_without_the_arm(req):
    req.seed_state.name = ["panda_finger_joint1"]
    req.seed_state.position = [0.04]


BAD_REQUESTS = [
    (_nan_target, "target position must be finite"),
    (_long_refinement, "'... (10000 characters)"),
    (_non_unit_quaternion, "quaternion (x, y, z, w) [0, 0, 0, 2] is not unit (norm 2)"),
    (_orientation_tolerance_out_of_range, "orientation tolerance must be in [0, pi] rad"),
    (_huge_obstacle, "must be within limits.max_coordinate_m = 100 m"),
    (_huge_learning_rate, "learning_rate must be at most limits.max_learning_rate = 0.1"),
    (_frame, "unknown frame 'world'"),
    (_unreachable, "unreachable"),
    (_box_two_dims, "needs 3 dimensions, got 2"),
    (_negative_size, "must be > 0"),
    (_zero_k, "num_solutions must be in [1, 64], got 0"),
    (_k_above_limit, "num_solutions must be in [1, 64], got 65"),
    (_zero_budget, "time_budget"),
    (_negative_budget, "time_budget"),
    (_zero_quaternion, "quaternion (x, y, z, w) is zero"),
    (_moveit, "refinement 'moveit' is not available"),
    (_cone, "primitive type 4 not supported (box, sphere, cylinder)"),
    (_missing_pose, "primitive_poses"),
    (_nan_obstacle, "must be finite"),
    (_seed_state_in_degrees, "seed_state: panda_joint2 = -45 rad is outside its limits"),
    (_seed_state_without_the_arm, "seed_state lacks panda_joint1"),
]


@pytest.mark.parametrize("mutate,expected", BAD_REQUESTS,
                         ids=[m.__name__[1:] for m, _ in BAD_REQUESTS])
def test_bad_request_is_rejected_with_a_reason(ik_client, box, mutate, expected):
    request = box_request(box)
    mutate(request)
    t0 = time.monotonic()
    response = ik_client.call(request, timeout_s=30.0)
    assert not response.success
    assert expected in response.message
    assert len(response.message) < 400, "a rejection quotes its input briefly"
    assert not response.solutions
    assert time.monotonic() - t0 < 5.0, "a rejected request should answer at once"


def test_target_inside_an_obstacle_is_no_success(ik_client, box):
    """A block around the target: nothing reaches it; the answer says so, and lists no
    best-effort entry as a solution."""
    scene, target = box
    block = Obstacle(name="block", kind="box", size=(0.3, 0.3, 0.3),
                     position=tuple(float(v) for v in target))
    response = ik_client.call(box_request(box, obstacles=[block], iterations=0,
                                          time_budget_s=0.3), timeout_s=30.0)
    assert not response.success
    assert "found 0 of 4" in response.message
    assert all(s.position_error > 1e-4 for s in response.solutions)


def test_node_still_serves_after_bad_requests(ik_client, box):
    response = ik_client.call(box_request(box, num_solutions=1, seed=3), timeout_s=30.0)
    assert_valid_solutions(response, box[0], box[1], 1)


# ------------------------------------------------------------------------------------------------
# Parameters at run time
# ------------------------------------------------------------------------------------------------

def parameter_setter(ros_node):
    """``set_one(name, value)``: sets one parameter of /mace, returns its SetParametersResult."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    node, executor = ros_node
    params = AsyncParameterClient(node, "/mace")
    assert params.wait_for_services(10.0)

    def set_one(name, value):
        future = params.set_parameters([Parameter(name, value=value)])
        executor.spin_until_future_complete(future, timeout_sec=10.0)
        return future.result().results[0]
    return set_one


def test_parameters_are_validated_at_run_time(mace_node, ros_node):
    set_one = parameter_setter(ros_node)
    bad = set_one("ik.num_solutions", 0)
    assert not bad.successful and "ik.num_solutions" in bad.reason
    assert not set_one("device", "cuda").successful  # read-only
    assert set_one("ik.mace.num_samples", 256).successful
    assert set_one("ik.mace.num_samples", 512).successful
    loud = set_one("service_introspection", "loud")
    assert not loud.successful and "service_introspection" in loud.reason


def test_request_summaries_are_logged_at_the_level_asked_for(mace_node, ros_node, ik_client,
                                                             box):
    """An answered request's one-line summary goes to the debug level by default (none in the
    node's output), to the info level with ``request_log_level: info``; other levels are
    refused. A refusal is a warning whatever the level."""
    set_one = parameter_setter(ros_node)
    summary = "adapt_ik: target"
    assert ik_client.call(box_request(box), timeout_s=30.0).success
    assert ik_client.call(box_request(box, num_solutions=0), timeout_s=30.0).success is False
    assert summary not in mace_node.log() and "adapt_ik: rejected" in mace_node.log()
    loud = set_one("request_log_level", "loud")
    assert not loud.successful and "request_log_level" in loud.reason
    assert set_one("request_log_level", "info").successful
    try:
        assert ik_client.call(box_request(box), timeout_s=30.0).success
        assert mace_node.wait_for_log(summary, 5.0), mace_node.log()
    finally:
        assert set_one("request_log_level", "debug").successful


# ------------------------------------------------------------------------------------------------
# Concurrency: one at a time, the rest wait, above max_concurrent_waiting "busy"
# ------------------------------------------------------------------------------------------------

def test_request_gate_serves_in_order_and_refuses_when_full():
    gate = RequestGate(max_waiting=1)
    order, release = [], threading.Event()

    def holder():
        with gate.turn():
            order.append("first")
            release.wait(10.0)

    def waiter():
        with gate.turn():
            order.append("second")

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    while gate.waiting == 0 and not order:
        time.sleep(0.01)
    threads.append(threading.Thread(target=waiter))
    threads[1].start()
    while gate.waiting < 1:
        time.sleep(0.01)
    with pytest.raises(BusyError, match="busy: 1 requests waiting"):
        with gate.turn():
            pass
    release.set()
    for t in threads:
        t.join(10.0)
    assert order == ["first", "second"]
    with gate.turn():  # free again
        pass


class _FakeLogger:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda text: self.lines.append((level, text))


@pytest.mark.parametrize("error,message,level", [
    (BusyError("busy: 3 requests waiting"), "busy: 3 requests waiting", "warning"),
    (ShuttingDownError(), "node shutting down: the request was abandoned", "warning"),
    (InvalidRequestError("target is unreachable"), "target is unreachable", "warning"),
    (ZeroDivisionError("division by zero"), "internal error: ZeroDivisionError: division by zero",
     "error"),
])
def test_failures_become_fresh_unsuccessful_responses(error, message, level):
    logger = _FakeLogger()
    fake_node = type("FakeNode", (), {"get_logger": lambda self: logger,
                                      "_in_flight_lock": threading.Lock(), "_in_flight": 0})()

    def handler(request, response, arrival):
        response.success = True  # half-filled when the error strikes
        raise error

    response = MaceNode._serve(fake_node, "adapt_ik", handler, None, AdaptIK.Response())
    assert not response.success and response.message == message and not response.solutions
    assert logger.lines[-1][0] == level
    assert fake_node._in_flight == 0


def test_busy_node_answers_busy_and_serves_the_waiting_one(rclpy_context, tmp_path, box):
    """A node allowing 1 waiting request: 1 runs, 1 waits, the third is told "busy". A budget
    counts from the request's arrival: one that runs out while waiting is answered so."""
    node = NodeProcess(str(tmp_path / "busy.log"),
                       params={"max_concurrent_waiting": 1, "ik.early_stop": "false",
                               "publish_markers": "false"},
                       ros_args=["-r", "__ns:=/busy"])
    clients = [MaceClient("/busy/mace/adapt_ik", node_name=f"mace_busy_{i}") for i in range(3)]
    responses = [None] * 3

    def call(i, budget):
        # The first request adapts without refinement and without early stop: it keeps the
        # node busy for its whole budget.
        responses[i] = clients[i].call(
            box_request(box, num_solutions=64, time_budget_s=budget, iterations=2000,
                        refinement="none" if i == 0 else None),
            timeout_s=60.0)

    def run(budgets):
        threads = [threading.Thread(target=call, args=(i, b)) for i, b in enumerate(budgets)]
        for i, t in enumerate(threads):
            t.start()
            time.sleep((1.0, 0.5, 0.0)[i])
        for t in threads:
            t.join(90.0)
        return list(responses[:len(budgets)])

    try:
        wait_for_service(node, clients[0])
        for c in clients[1:]:
            assert c.wait(10.0)
        first, second, third = run((4.0, 6.0, 0.5))
        long, short = run((2.5, 0.5))
    finally:
        for c in clients:
            c.close()
        status = node.stop()
    assert status == 0, node.log()
    assert first.success and "busy" not in first.message
    assert "busy" not in second.message and second.solutions
    assert not third.success and third.message == "busy: 1 requests waiting"
    assert long.success
    assert not short.success and "ran out while the request waited" in short.message


def test_huge_overrides_are_refused_or_answered_within_budget(ik_client, box):
    """gradient_steps = 2^32 - 1 (which hung the node for good) is refused at once; the largest
    M, N and T the limits allow, with the importance-sampling objective, answer near the
    budget."""
    request = box_request(box, num_solutions=64, refinement="none", time_budget_s=1.0)
    request.gradient_steps = 4294967295
    response = ik_client.call(request, timeout_s=30.0)
    assert not response.success and "gradient_steps must be at most" in response.message
    request = box_request(box, num_solutions=64, refinement="none", time_budget_s=1.0,
                          objective="is", num_samples=16384, gradient_steps=256,
                          iterations=2000)
    t0 = time.monotonic()
    response = ik_client.call(request, timeout_s=30.0)
    wall = time.monotonic() - t0
    assert response.solutions
    assert all(math.isfinite(v) for sol in response.solutions for v in sol.positions)
    assert wall < 1.0 + 2.0, f"answered after {wall:.2f} s on a 1 s budget"  # not a hang


# ------------------------------------------------------------------------------------------------
# Start failures: clear message, non-zero exit, within seconds
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_starts(tmp_path_factory):
    """Nodes started with broken models or parameters (all at once): name -> (status, s, log)."""
    root = tmp_path_factory.mktemp("broken")
    missing, corrupt = root / "missing", root / "corrupt"
    for folder in (missing, corrupt):
        folder.mkdir()
        for name in ("registry.yaml", "panda_spheres.yaml"):
            (folder / name).write_text(open(f"{MODELS_DIR}/{name}").read())
    (corrupt / "panda_ik.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    nodes = {
        "missing": NodeProcess(str(root / "missing.log"), models_dir=str(missing)),
        "corrupt": NodeProcess(str(root / "corrupt.log"), models_dir=str(corrupt)),
        "bad_param": NodeProcess(str(root / "bad_param.log"),
                                 params={"ik.time_budget_s": -1.0}),
    }
    return exit_results(nodes)


@pytest.mark.parametrize("name,expected", [
    ("missing", "IK prior weights not found"),
    ("corrupt", "corrupt"),
    ("bad_param", "ik.time_budget_s"),
])
def test_node_refuses_to_start(failed_starts, name, expected):
    status, seconds, log = failed_starts[name]
    assert status is not None and status != 0, f"the node kept running:\n{log}"
    assert "cannot start" in log and expected in log, log
    assert seconds < 30.0, f"took {seconds:.1f} s to fail"


def test_a_live_recording_holds_the_calls_made_meanwhile(ik_client, box, tmp_path):
    """``mace-bench record --live``: a recorder subscribed to the running node writes each
    call's request and response events, as received, into a bag that reads back."""
    from mace_ros.bags import read_ik_requests, read_service_events, record_live
    from service_msgs.msg import ServiceEventInfo

    ready, counts = threading.Event(), {}
    thread = threading.Thread(target=lambda: counts.update(
        record_live(tmp_path / "live", 12.0, services=("/mace/adapt_ik",), ready=ready)))
    thread.start()
    assert ready.wait(15.0)
    time.sleep(1.0)  # the node's side of the discovery
    calls = []  # two calls 2 s apart: one at least after the node matched the recorder
    for seed in (11, 12):
        request = box_request(box, num_solutions=2, seed=seed)
        calls.append((request, ik_client.call(request, timeout_s=30.0)))
        time.sleep(2.0)
    thread.join(30.0)
    assert counts["/mace/adapt_ik"] >= 2
    events = [e for _, e in read_service_events(tmp_path / "live")]
    kinds = {e.info.event_type for e in events}
    assert {ServiceEventInfo.REQUEST_RECEIVED, ServiceEventInfo.RESPONSE_SENT} <= kinds
    recorded = read_ik_requests(tmp_path / "live")
    assert recorded and all(r in [c[0] for c in calls] for r in recorded)
    request, response = calls[-1]
    assert request in recorded
    sent = [e.response[0] for e in events if e.response]
    assert any(len(r.solutions) == len(response.solutions) for r in sent)


def test_a_bag_replays_against_the_running_node(ik_client, tmp_path):
    """``mace-bench replay --node``: each recorded request also goes to the node over DDS
    (method ``mace_node``), its answers judged like the in-process methods'."""
    from mace_core.ik.adapter import IKAdapter
    from mace_core.ik.request import IKAdaptConfig
    from mace_ros.bags import record_drawn_requests
    from mace_ros.replay import markdown_report, node_solve_share, replay_bag

    record_drawn_requests(tmp_path / "bag", load_scene(BOX_SCENE), 2, 3, num_solutions=2)
    adapter = IKAdapter.from_models(MODELS_DIR, "panda_ik", IKAdaptConfig(), TensorSpec())
    report = replay_bag(str(tmp_path / "bag"), adapter, ("mace_refine",), client=ik_client,
                        node_batch=True)
    (group,) = report["groups"]
    batch = group["methods"]["mace_node_batch"]  # the same requests in one batch call
    assert batch["k_success_rate"] == 1.0 and "adapt_ik_batch" in batch["time_basis"]
    assert len({row["time_s"] for row in batch["per_target"]}) == 1  # the call's share each
    node = group["methods"]["mace_node"]
    assert node["success_rate"] == 1.0 and node["k_success_rate"] == 1.0
    assert all(0.0 < row["time_s"] < 30.0 for row in node["per_target"])
    assert "over DDS" in node["time_basis"]
    # the node's own solve time is what it answered with, less than the call end to end
    solves = [row["stage_times"]["total"] for row in node["per_target"]]
    assert all(0.0 < s < row["time_s"] for s, row in zip(solves, node["per_target"]))
    solve, end_to_end = node_solve_share(group)
    assert solve == float(np.median(solves)) and solve < end_to_end
    assert f"took a median {solve * 1e3:,.1f} ms of the" in markdown_report(report)


def test_markers_wait_for_a_quiet_node_and_only_the_newest_is_drawn():
    """Markers are published off the answers' path: not while a request is in flight, nor
    before the node has been quiet for the delay (a client asking back to back leaves gaps of
    well under a millisecond), and of a burst of answers only the newest (the topic keeps one
    array)."""
    from mace_ros.latest import LatestMarkers

    published, quiet_since = [], [None]

    class Publisher:
        def publish(self, msg):
            published.append((time.monotonic(), msg))

        def get_subscription_count(self):
            return 1

    markers = LatestMarkers(Publisher(), quiet_since=lambda: quiet_since[0], delay_s=0.05)
    try:
        for k in range(5):
            markers.offer(lambda k=k: f"answer {k}")
            time.sleep(0.005)
        assert published == []  # a request is still in flight
        for _ in range(10):  # answers 0.01 s apart: never quiet for 0.05 s
            quiet_since[0] = time.monotonic()
            time.sleep(0.01)
        assert published == []
        quiet_since[0] = ended = time.monotonic()
        deadline = ended + 2.0
        while not published and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)
        assert [msg for _, msg in published] == ["answer 4"]
        assert published[0][0] >= ended + 0.05
    finally:
        markers.close()


def test_markers_are_not_built_while_nothing_subscribes():
    from mace_ros.latest import LatestMarkers

    built, subscribers = [], [0]

    class Publisher:
        def publish(self, msg):
            built.append(("published", msg))

        def get_subscription_count(self):
            return subscribers[0]

    markers = LatestMarkers(Publisher(), quiet_since=lambda: 0.0, delay_s=0.001)
    try:
        markers.offer(lambda: built.append("built") or "answer 0")
        time.sleep(0.1)
        assert built == []
        subscribers[0] = 1
        markers.offer(lambda: built.append("built") or "answer 1")
        deadline = time.monotonic() + 2.0
        while len(built) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert built == ["built", ("published", "answer 1")]
    finally:
        markers.close()
