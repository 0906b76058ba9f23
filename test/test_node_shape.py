"""End-to-end tests of /mace/complete_shape over DDS, against the node in its own process.

Observations are made with the core's data functions (a test box cut by a plane, the contacts of
5 fingers on it); the answers are judged by their form (K clouds of 2048 points in the
observation's frame, scores sorted in [0, 1]) and by fitting the observation.
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pytest
from std_msgs.msg import Header

from conftest import MODELS_DIR, NodeProcess, exit_results, wait_for_service
from mace_core.shape.benchmark import GRASP_DIRECTIONS, grasp_contacts, partial_box
from mace_core.shape.completion import ShapeCompletionConfig, ShapeCompletionRequest
from mace_core.tensor import TensorSpec
from mace_ros import conversions as conv
from mace_ros.client import MaceClient
from mace_ros.params import ParameterError
from mace_ros.srv import CompleteShape

POINTS = 2048  #: points of every decoded completion
FINGER_RADIUS_M = 0.02
#: A small budget keeps the module fast; the node answers within it (plus transport).
BUDGET_S = 1.5


@pytest.fixture(scope="module")
def box():
    """A test box (seeded) and what a random plane cut leaves of it, m."""
    case, observed = partial_box("random", 3, TensorSpec())
    return case, observed.numpy()


@pytest.fixture(scope="module")
def shape_client(mace_node):
    """A client of /mace/complete_shape (and /mace/adapt_ik) with its own ROS node."""
    client = MaceClient(node_name="mace_test_shape_client")
    assert client.wait(30.0, shape=True), "/mace/complete_shape is not offered"
    yield client
    client.close()


def cloud_request(box, frame: str = "object", **kw) -> CompleteShape.Request:
    """A valid partial-cloud request (K = 4, small budget); ``kw`` overrides the core request."""
    fields = dict(prior="boxes", points=box[1], num_completions=4, time_budget_s=BUDGET_S,
                  seed=0)
    fields.update(kw)
    return conv.shape_request_to_msg(ShapeCompletionRequest(**fields), frame)


def contacts_request(box, frame: str = "hand", **kw) -> CompleteShape.Request:
    """A valid request with the contacts of 5 fingers (paper Sec. 4.1 pattern) on the box."""
    directions = np.asarray(GRASP_DIRECTIONS)
    contacts = grasp_contacts(box[0].dense, directions, FINGER_RADIUS_M).numpy()
    fields = dict(prior="boxes", contacts=contacts, directions=directions,
                  finger_radius=FINGER_RADIUS_M, num_completions=3, time_budget_s=BUDGET_S,
                  seed=1)
    fields.update(kw)
    return conv.shape_request_to_msg(ShapeCompletionRequest(**fields), frame)


def assert_completions(response, k: int, frame: str):
    assert response.success, response.message
    assert len(response.completions) == k and len(response.scores) == k
    for cloud in response.completions:
        assert cloud.header.frame_id == frame
        assert cloud.width * cloud.height == POINTS
        assert np.isfinite(conv.points_from_cloud(cloud, skip_nans=False)).all()
    scores = np.asarray(response.scores)
    assert ((scores >= 0.0) & (scores <= 1.0)).all()
    assert (np.diff(scores) <= 1e-12).all(), f"scores not sorted best first: {scores}"
    assert response.iterations_run >= 0
    assert 0.0 < response.total_time and response.sampling_time <= response.total_time + 1e-6


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each point of ``a`` to its nearest point of ``b``."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).min(axis=1))


# ------------------------------------------------------------------------------------------------
# Valid requests
# ------------------------------------------------------------------------------------------------

def test_partial_cloud_is_completed_in_its_frame(shape_client, box):
    request = cloud_request(box, frame="camera_depth_optical_frame")
    request.cloud.header.stamp.sec = 42
    t0 = time.monotonic()
    response = shape_client.call(request, timeout_s=30.0)
    round_trip = time.monotonic() - t0
    assert_completions(response, 4, "camera_depth_optical_frame")
    assert all(c.header.stamp.sec == 42 for c in response.completions)
    assert response.iterations_run >= 1
    assert response.total_time <= BUDGET_S + 0.5 and round_trip < BUDGET_S + 5.0
    # the best completion covers what was observed (a few cm: a 2048-point model of a box)
    best = conv.points_from_cloud(response.completions[0])
    observed = box[1][::8]
    assert np.median(nearest_distances(observed, best)) < 0.03
    # and is the size of the box, not a unit-size shape: centred on the z axis, on the floor
    assert abs(best[:, 2].min()) < 0.05 and np.abs(best[:, :2].mean(axis=0)).max() < 0.05


def test_a_cloud_on_a_table_is_completed_where_the_box_stands(shape_client, box):
    """infer_placement: the cut box moved to (0.15, -0.1) on a table whose pose in the camera's
    frame is turned by 30 degrees and raised; the answer, in the camera's frame, covers the
    observation and says where on the table each completion stands."""
    yaw, table = math.radians(30.0), np.array([0.3, -0.2, 0.4])
    turn = np.array([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0],
                     [0.0, 0.0, 1.0]])
    where = np.array([0.15, -0.1, 0.0])
    seen = (box[1] + where) @ turn.T + table  # the camera's view of the placed box
    request = cloud_request((box[0], seen), frame="camera", num_completions=3)
    request.infer_placement = True
    pose = request.support_pose
    pose.position.x, pose.position.y, pose.position.z = table.tolist()
    pose.orientation.z, pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
    response = shape_client.call(request, timeout_s=30.0)
    assert_completions(response, 3, "camera")
    assert len(response.placements) == 3 and list(response.scales) == [1.0, 1.0, 1.0]
    best = conv.points_from_cloud(response.completions[0])
    assert np.median(nearest_distances(seen[::8], best)) < 0.03
    spot = response.placements[0].position
    truth = where @ turn.T + table
    assert np.linalg.norm(np.array([spot.x, spot.y, spot.z]) - truth) < 0.08
    assert abs(spot.z - table[2]) < 1e-6  # on the table
    assert response.placements[0].orientation.z == pytest.approx(math.sin(yaw / 2))


def test_partial_cloud_with_a_viewpoint(shape_client, box):
    request = cloud_request(box, num_completions=2, iterations=2)
    request.has_viewpoint = True
    request.viewpoint.x, request.viewpoint.y, request.viewpoint.z = 1.0, 0.3, 0.8
    response = shape_client.call(request, timeout_s=30.0)
    assert_completions(response, 2, "object")


def test_contacts_are_completed_in_the_contacts_frame(shape_client, box):
    response = shape_client.call(contacts_request(box), timeout_s=30.0)
    assert_completions(response, 3, "hand")
    assert response.scores[0] > 0.5  # the fingers touch the completion near the observed contacts


def test_zero_iterations_answer_prior_samples(shape_client, box):
    response = shape_client.call(cloud_request(box, num_completions=2, iterations=0),
                                 timeout_s=30.0)
    assert_completions(response, 2, "object")
    assert response.iterations_run == 0


# ------------------------------------------------------------------------------------------------
# Bad requests: success = false with a message naming the problem, at once, node keeps serving
# ------------------------------------------------------------------------------------------------

def _empty_cloud(req, box):
    req.cloud = conv.cloud_from_points(np.zeros((0, 3)), Header(frame_id="object"))


def _neither(req, box):
    req.cloud = CompleteShape.Request().cloud


def _both(req, box):
    other = contacts_request(box)
    req.contact_points, req.contact_directions = other.contact_points, other.contact_directions


def _nan_point(req, box):
    pts = box[1].copy()
    pts[5] = math.nan
    req.cloud = conv.cloud_from_points(pts, req.cloud.header)


def _inf_point(req, box):
    pts = box[1].copy()
    pts[0, 2] = -math.inf
    req.cloud = conv.cloud_from_points(pts, req.cloud.header)


def _missing_field(req, box):
    req.cloud.fields = [f for f in req.cloud.fields if f.name != "y"]


def _point_step(req, box):
    req.cloud.point_step = 8


def _row_step(req, box):
    req.cloud.row_step -= 12


def _unknown_prior(req, box):
    req.prior = "airplanes"


def _directions_missing(req, box):
    other = contacts_request(box)
    req.cloud = CompleteShape.Request().cloud
    req.contact_points, req.contact_directions = other.contact_points, \
        other.contact_directions[:4]


def _zero_direction(req, box):
    other = contacts_request(box)
    req.cloud = CompleteShape.Request().cloud
    req.contact_points, req.contact_directions = other.contact_points, \
        other.contact_directions
    d = req.contact_directions[2]
    d.x = d.y = d.z = 0.0


def _zero_k(req, box):
    req.num_completions = 0


def _k_above_limit(req, box):
    req.num_completions = 1000


def _zero_budget(req, box):
    req.time_budget = 0.0


def _negative_budget(req, box):
    req.time_budget = -2.0


def _iterations(req, box):
    req.iterations = -5


def _huge_finger(req, box):
    other = contacts_request(box)
    req.cloud = CompleteShape.Request().cloud
    req.contact_points, req.contact_directions = other.contact_points, other.contact_directions
    req.finger_radius = 1e160


def _cloud_scaled(factor):
    def scaled(req, box):
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow is the point
            req.cloud = conv.cloud_from_points(box[1] * factor, req.cloud.header)
    scaled.__name__ = f"_cloud_times_{factor:.0e}"
    return scaled


def _huge_budget(req, box):
    req.time_budget = 1e9


def _huge_iterations(req, box):
    req.iterations = 2147483647


def _long_prior(req, box):
    req.prior = "p" * 10_000


limit = min(ShapeCompletionConfig().max_completions, ShapeCompletionConfig().num_samples)
BAD_REQUESTS = [
    (_empty_cloud, "cloud is empty"),
    (_neither, "no observation"),
    (_both, "not both"),
    (_nan_point, "cloud has 1 of"),
    (_inf_point, "NaN or inf"),
    (_missing_field, "no field(s) ['y']"),
    (_point_step, "does not fit in point_step 8"),
    (_row_step, "is smaller than width * point_step"),
    (_unknown_prior, "unknown prior 'airplanes'"),
    (_directions_missing, "5 contact_points but 4 contact_directions"),
    (_zero_direction, "directions must be non-zero"),
    (_zero_k, "num_completions must be > 0, got 0"),
    (_k_above_limit, f"num_completions must be <= {limit}, got 1000"),
    (_zero_budget, "time_budget_s must be in (0, shape.max_time_budget_s = 30] s, got 0"),
    (_negative_budget, "time_budget_s must be in (0"),
    (_iterations, "iterations must be -1"),
    (_huge_finger, "finger_radius must be in (0, shape.max_finger_radius"),
    (_cloud_scaled(1e39), "NaN or inf"),  # float32 on the wire: 1e39 is inf
    (_cloud_scaled(1e30), "beyond shape.max_coordinate"),
    (_huge_budget, "time_budget_s must be in (0, shape.max_time_budget_s = 30] s, got 1e+09"),
    (_huge_iterations, "iterations must be in [0, shape.max_iterations = 1000]"),
    (_long_prior, "unknown prior 'pppp"),
]


@pytest.mark.parametrize("mutate,expected", BAD_REQUESTS,
                         ids=[m.__name__[1:] for m, _ in BAD_REQUESTS])
def test_bad_shape_request_is_rejected_with_a_reason(shape_client, box, mutate, expected):
    request = cloud_request(box)
    mutate(request, box)
    t0 = time.monotonic()
    response = shape_client.call(request, timeout_s=30.0)
    assert not response.success
    assert len(response.message) < 400, "a rejection quotes its input briefly"
    assert expected in response.message
    assert not response.completions and not response.scores
    assert time.monotonic() - t0 < 5.0, "a rejected request should answer at once"


def test_too_many_points_are_subsampled_and_said_so(shape_client, box):
    limit = ShapeCompletionConfig().max_input_points
    many = np.concatenate([box[1]] * (limit // len(box[1]) + 2))
    many = many + np.random.default_rng(0).normal(0.0, 1e-4, size=many.shape)
    response = shape_client.call(cloud_request((box[0], many), num_completions=1,
                                               iterations=1), timeout_s=30.0)
    assert_completions(response, 1, "object")
    assert f"more than shape.max_input_points = {limit}" in response.message
    assert f"{len(many)} points" in response.message


def test_both_services_still_serve_after_bad_requests(shape_client, box):
    response = shape_client.call(cloud_request(box, num_completions=2, seed=5), timeout_s=30.0)
    assert_completions(response, 2, "object")
    ik = shape_client.adapt_ik([0.4, 0.0, 0.4], num_solutions=1, time_budget_s=1.0, seed=0)
    assert_ik_served(ik)


def assert_ik_served(response):
    """The IK service answered the request itself (its success depends on the IK prior)."""
    assert "busy" not in response.message and "internal error" not in response.message
    assert response.solutions and response.total_time > 0.0, response.message


# ------------------------------------------------------------------------------------------------
# Both services share one gate: a heavy shape request makes IK wait (here: "busy")
# ------------------------------------------------------------------------------------------------

def test_one_heavy_request_at_a_time_across_services(rclpy_context, tmp_path, box):
    node = NodeProcess(str(tmp_path / "gate.log"),
                       params={"max_concurrent_waiting": 0, "shape_priors": "boxes",
                               "publish_markers": "false"},
                       ros_args=["-r", "__ns:=/gate"])
    client = MaceClient("/gate/mace/adapt_ik", node_name="mace_gate_client")
    other = MaceClient("/gate/mace/adapt_ik", node_name="mace_gate_other")
    answers = {}

    def long_shape():
        answers["shape"] = client.call(
            cloud_request(box, num_completions=2, time_budget_s=6.0, iterations=1000),
            timeout_s=60.0)

    try:
        wait_for_service(node, client)
        assert client.wait(10.0, shape=True) and other.wait(10.0)
        thread = threading.Thread(target=long_shape)
        thread.start()
        time.sleep(2.0)  # the shape request is being served: 4 s of it remain
        answers["ik"] = other.adapt_ik([0.4, 0.0, 0.4], num_solutions=1, time_budget_s=0.5)
        answers["shape2"] = other.call(cloud_request(box, num_completions=1), timeout_s=30.0)
        thread.join(60.0)
        answers["ik_after"] = other.adapt_ik([0.4, 0.0, 0.4], num_solutions=1,
                                             time_budget_s=1.0, seed=0)
    finally:
        client.close()
        other.close()
        status = node.stop()
    assert status == 0, node.log()
    assert answers["shape"].success and len(answers["shape"].completions) == 2
    assert not answers["ik"].success and answers["ik"].message == "busy: 0 requests waiting"
    assert not answers["shape2"].success and answers["shape2"].message.startswith("busy")
    assert_ik_served(answers["ik_after"])


# ------------------------------------------------------------------------------------------------
# Start failures and parameters
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_shape_starts(rclpy_context, tmp_path_factory):
    """Nodes started without a prior's weights, or with an unknown prior name: name -> (status,
    s, log)."""
    root = tmp_path_factory.mktemp("broken_shape")
    missing = root / "missing"
    missing.mkdir()
    for name in os.listdir(MODELS_DIR):
        if not name.startswith("shape_boxes"):
            os.symlink(os.path.join(MODELS_DIR, name), missing / name)
    nodes = {
        "missing_weights": NodeProcess(str(root / "missing.log"), models_dir=str(missing),
                                       params={"shape_priors": "boxes"}),
        "unknown_prior": NodeProcess(str(root / "unknown.log"),
                                     params={"shape_priors": "boxes,airplanes"}),
        "bad_param": NodeProcess(str(root / "bad_param.log"),
                                 params={"shape_priors": "boxes", "shape.quantile": 1.5}),
    }
    return exit_results(nodes)


@pytest.mark.parametrize("name,expected", [
    ("missing_weights", "prior 'boxes': weights file"),
    ("unknown_prior", "priors ['airplanes'] not in"),
    ("bad_param", "shape.quantile"),
])
def test_node_refuses_to_start_without_its_shape_priors(failed_shape_starts, name, expected):
    status, seconds, log = failed_shape_starts[name]
    assert status is not None and status != 0, f"the node kept running:\n{log}"
    assert "cannot start" in log and expected in log, log
    assert seconds < 45.0, f"took {seconds:.1f} s to fail"


@pytest.mark.parametrize("name,value", [
    ("num_samples", 0), ("quantile", 0.0), ("quantile", 2.0), ("contact_quantile", 0.0),
    ("contact_num_samples", 0), ("temperature", -0.1),
    ("objective", "adam"), ("learning_rate", math.nan), ("max_input_points", 0),
])
def test_invalid_shape_parameter_is_named(name, value):
    from dataclasses import replace

    from mace_core.config import ServiceConfig
    from mace_ros.params import validate

    def check_shape_config(shape):
        validate(ServiceConfig(shape=shape))

    with pytest.raises(ParameterError, match=f"shape.{name}"):
        check_shape_config(replace(ShapeCompletionConfig(), **{name: value}))
    check_shape_config(ShapeCompletionConfig())


def test_shape_parameters_are_validated_at_run_time(mace_node, rclpy_context):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    node = Node("mace_test_shape_params")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        client = AsyncParameterClient(node, "/mace")
        assert client.wait_for_services(10.0)

        def set_one(name, value):
            future = client.set_parameters([Parameter(name, value=value)])
            executor.spin_until_future_complete(future, timeout_sec=10.0)
            return future.result().results[0]

        bad = set_one("shape.quantile", 0.0)
        assert not bad.successful and "shape.quantile" in bad.reason
        assert not set_one("shape_priors", "boxes").successful  # read-only
        assert set_one("shape.iterations", 6).successful
        assert set_one("shape.iterations", ShapeCompletionConfig().iterations).successful
    finally:
        executor.shutdown()
        node.destroy_node()


def test_a_bag_of_shape_calls_replays_in_process_and_against_the_node(
        shape_client, box, tmp_path):
    """``mace-bench replay --node`` on a bag with ``/mace/complete_shape`` calls: each
    recorded request runs in process and goes to the node, in turns; the summary and the
    Markdown section come from the per-request records."""
    from mace_core.shape.completion import ShapeCompleter
    from mace_core.shape.vae import load_shape_priors
    from mace_ros.bags import ServiceEventBag, events_of, read_shape_requests
    from mace_ros.replay import markdown_report
    from mace_ros.shape_replay import replay_shape_calls

    sent = [cloud_request(box, seed=1), cloud_request(box, seed=2, prior="nope")]
    with ServiceEventBag(tmp_path / "bag") as bag:
        for k, event in enumerate(events_of(sent, "/mace/complete_shape")):
            bag.write_event("/mace/complete_shape", event, k + 1)
    messages = read_shape_requests(tmp_path / "bag")
    assert [m.prior for m in messages] == ["boxes", "nope"]
    spec = TensorSpec()
    registry = os.path.join(MODELS_DIR, "shape_registry.yaml")
    completer = ShapeCompleter(load_shape_priors(registry, spec, ["boxes"]),
                               ShapeCompletionConfig(), spec)
    section = replay_shape_calls(messages, completer, shape_client)
    records = section["records"]
    assert [(r["index"], r["method"]) for r in records] == [
        (0, "mace"), (0, "mace_node"), (1, "mace_node"), (1, "mace")]  # in turns
    for r in records:
        assert r["success"] == (r["index"] == 0), r  # an unknown prior: success = false
        if r["success"]:
            assert 0.0 < r["best_score"] <= 1.0 and r["completions"] == 4
            assert 0.0 < r["time_s"] < BUDGET_S + 5.0
    for method in ("mace", "mace_node"):
        m = section["methods"][method]
        assert m["requests"] == 2 and m["success"] == 0.5
        ok = [r for r in records if r["method"] == method and r["success"]]
        assert m["median_time_s"] == ok[0]["time_s"]
        assert m["mean_best_score"] == ok[0]["best_score"]
    text = markdown_report({"bag": "bag", "requests": 2, "groups": [], "shape": section})
    assert "## /mace/complete_shape: 2 requests" in text
    node_ms = section["methods"]["mace_node"]["median_time_s"] * 1e3
    assert f"| mace_node | 2 | 0.50 | {node_ms:.0f} / " in text
