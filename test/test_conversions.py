"""mace_ros.conversions and mace_ros.params without a running ROS graph."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from geometry_msgs.msg import Pose
from sensor_msgs.msg import JointState, PointCloud2, PointField
from shape_msgs.msg import SolidPrimitive
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from mace_core.config import ServiceConfig, load_service_config, to_flat
from mace_core.errors import InvalidRequestError
from mace_core.ik.request import IKAdaptResult, IKRequest, IKSolution, IKTimings
from mace_core.robot.kinematics import PANDA_JOINTS, RobotKinematics
from mace_core.robot.scenes import Obstacle, quaternion_xyzw_to_matrix
from mace_core.shape.completion import (ShapeCompletionConfig, ShapeCompletionRequest,
                                        ShapeCompletionResult)
from mace_core.tensor import TensorSpec
from mace_ros import conversions as conv
from mace_ros import params
from mace_ros.msg import CollisionObject
from mace_ros.srv import AdaptIK, CompleteShape

ROT_Z90 = np.asarray(quaternion_xyzw_to_matrix([0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.fixture(scope="module")
def kin():
    return RobotKinematics.panda(TensorSpec())


def full_request() -> IKRequest:
    """A request that sets every field: three kinds of obstacles, orientation, overrides."""
    obstacles = [
        Obstacle("table", "box", (0.6, 0.8, 0.02), (0.5, 0.0, -0.01)),
        Obstacle("ball", "sphere", (0.05,), (0.4, 0.2, 0.3)),
        Obstacle("post", "cylinder", (0.4, 0.03), (0.3, -0.3, 0.2),
                 tuple(tuple(r) for r in ROT_Z90.tolist())),
    ]
    return IKRequest(position=np.array([0.5, 0.1, 0.3]), obstacles=obstacles, rotation=ROT_Z90,
                     orientation_tolerance=0.05, num_solutions=5, time_budget_s=0.7,
                     iterations=0, refinement="tracik", objective="is", num_samples=256,
                     quantile=0.1, gradient_steps=2, learning_rate=1e-3, seed=11,
                     seed_state=np.array([0.1, -0.7, 0.2, -2.3, 0.0, 1.6, 0.8]),
                     ik_link="panda_link8")


def assert_requests_equal(a: IKRequest, b: IKRequest) -> None:
    np.testing.assert_allclose(a.position, b.position)
    assert (a.rotation is None) == (b.rotation is None)
    if a.rotation is not None:
        np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-9)
    for name in ("orientation_tolerance", "num_solutions", "time_budget_s", "iterations",
                 "refinement", "objective", "num_samples", "quantile", "gradient_steps",
                 "learning_rate", "seed"):
        assert getattr(a, name) == pytest.approx(getattr(b, name)), name
    assert a.ik_link == b.ik_link
    assert (a.seed_state is None) == (b.seed_state is None)
    if a.seed_state is not None:
        np.testing.assert_allclose(a.seed_state, b.seed_state)
    assert len(a.obstacles) == len(b.obstacles)
    for oa, ob in zip(a.obstacles, b.obstacles):
        assert (oa.name, oa.kind) == (ob.name, ob.kind)
        np.testing.assert_allclose(oa.size, ob.size)
        np.testing.assert_allclose(oa.position, ob.position)
        np.testing.assert_allclose(oa.rotation, ob.rotation, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------

def test_request_round_trip_keeps_every_field():
    request = full_request()
    msg = conv.ik_request_to_msg(request)
    assert msg.target.header.frame_id == "panda_link0" and msg.use_orientation
    assert [o.primitives[0].type for o in msg.obstacles] == [
        SolidPrimitive.BOX, SolidPrimitive.SPHERE, SolidPrimitive.CYLINDER]
    assert_requests_equal(conv.ik_request_from_msg(msg), request)


def test_unset_overrides_travel_as_defaults():
    request = IKRequest(position=np.array([0.4, 0.0, 0.4]), num_solutions=3, time_budget_s=1.0)
    msg = conv.ik_request_to_msg(request)
    assert (msg.iterations, msg.seed, msg.refinement, msg.num_samples, msg.quantile) == (
        -1, -1, "", 0, 0.0)
    back = conv.ik_request_from_msg(msg)
    assert_requests_equal(back, request)
    assert back.rotation is None and back.iterations is None and back.seed is None


def test_iterations_zero_means_prior_only_and_empty_frame_means_base():
    msg = conv.ik_request_to_msg(IKRequest(position=np.array([0.4, 0.0, 0.4]),
                                           num_solutions=1, time_budget_s=1.0, iterations=0))
    msg.target.header.frame_id = ""
    assert conv.ik_request_from_msg(msg).iterations == 0


def test_orientation_is_ignored_unless_asked_for():
    msg = conv.ik_request_to_msg(IKRequest(position=np.array([0.4, 0.0, 0.4]),
                                           num_solutions=1, time_budget_s=1.0))
    q = msg.target.pose.orientation
    q.x = q.y = q.z = q.w = 0.0
    request = conv.ik_request_from_msg(msg)
    assert request.rotation is None and request.orientation_tolerance == 0.0


def test_quaternion_order_is_xyzw():
    msg = conv.ik_request_to_msg(full_request())
    q = msg.target.pose.orientation
    assert (q.x, q.y) == pytest.approx((0.0, 0.0))
    assert (q.z, q.w) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    np.testing.assert_allclose(conv.ik_request_from_msg(msg).rotation @ [1.0, 0.0, 0.0],
                               [0.0, 1.0, 0.0], atol=1e-12)


def test_several_primitives_in_one_object_are_named_by_index():
    obj = CollisionObject(id="shelf", primitives=[
        SolidPrimitive(type=SolidPrimitive.BOX, dimensions=[0.1, 0.2, 0.3]),
        SolidPrimitive(type=SolidPrimitive.SPHERE, dimensions=[0.1])],
        primitive_poses=[Pose(), Pose()])
    obstacles = conv.obstacles_from_msgs([obj])
    assert [(o.name, o.kind) for o in obstacles] == [("shelf/0", "box"), ("shelf/1", "sphere")]


def _set_dims(i, dims):
    def mutate(msg):
        msg.obstacles[i].primitives[0].dimensions = dims
    return mutate


def _set(path, value):
    def mutate(msg):
        *parents, leaf = path.split(".")
        obj = msg
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        setattr(obj, leaf, value)
    return mutate


def _zero_orientation(msg):
    q = msg.target.pose.orientation
    q.x = q.y = q.z = q.w = 0.0


def _cone(msg):
    msg.obstacles[0].primitives[0] = SolidPrimitive(type=SolidPrimitive.CONE,
                                                    dimensions=[0.1, 0.1])


def _extra_pose(msg):
    msg.obstacles[0].primitive_poses.append(Pose())


BAD = [
    ("nan_target", _set("target.pose.position.y", math.nan), "target position must be finite"),
    ("inf_target", _set("target.pose.position.z", math.inf), "target position must be finite"),
    ("frame", _set("target.header.frame_id", "world"),
     "unknown frame 'world': targets must be in panda_link0"),
    ("obstacle_frame", _set("obstacles.1.header.frame_id", "camera"), "unknown frame 'camera'"),
    ("zero_quaternion", _zero_orientation, "target orientation quaternion (x, y, z, w) is zero"),
    ("nan_quaternion", _set("target.pose.orientation.w", math.nan), "must be finite"),
    ("non_unit_quaternion", _set("target.pose.orientation.w", 3.0), "not unit"),
    ("box_two_dims", _set_dims(0, [0.1, 0.2]), "a box needs 3 dimensions, got 2"),
    ("sphere_two_dims", _set_dims(1, [0.1, 0.2]), "a sphere needs 1 dimensions, got 2"),
    ("cylinder_one_dim", _set_dims(2, [0.1]), "a cylinder needs 2 dimensions, got 1"),
    ("negative_size", _set_dims(0, [0.1, -0.2, 0.3]), "box dimensions must be > 0"),
    ("zero_radius", _set_dims(1, [0.0]), "sphere dimensions must be > 0"),
    ("nan_size", _set_dims(2, [math.nan, 0.1]), "cylinder dimensions must be finite"),
    ("cone", _cone, "primitive type 4 not supported (box, sphere, cylinder)"),
    ("pose_count", _extra_pose, "1 primitives but 2 primitive_poses"),
    ("nan_obstacle_position", _set("obstacles.0.primitive_poses.0.position.x", math.nan),
     "position must be finite"),
    ("zero_obstacle_quaternion", _set("obstacles.0.primitive_poses.0.orientation.w", 0.0),
     "obstacle 'table' primitive 0: orientation quaternion (x, y, z, w) is zero"),
    ("iterations", _set("iterations", -2), "iterations must be -1"),
    ("seed", _set("seed", -5), "seed must be -1"),
    ("seed_state_count", _set("seed_state.name", ["panda_joint1"]),
     "seed_state has 1 names and 7 positions"),
    ("seed_state_missing_joint", _set("seed_state.name", [f"j{i}" for i in range(7)]),
     "seed_state lacks panda_joint1, panda_joint2"),
    ("seed_state_unnamed_six", _set("seed_state", JointState(position=[0.0] * 6)),
     "seed_state without joint names must hold 7 positions"),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_fields_raise_invalid_request(mutate, expected):
    msg = conv.ik_request_to_msg(full_request())
    mutate(msg)
    with pytest.raises(InvalidRequestError) as err:
        conv.ik_request_from_msg(msg)
    assert expected in str(err.value)


def test_request_without_k_or_budget_cannot_be_sent():
    with pytest.raises(ValueError, match="num_solutions and time_budget_s"):
        conv.ik_request_to_msg(IKRequest(position=np.zeros(3)))


# ------------------------------------------------------------------------------------------------
# Results and markers
# ------------------------------------------------------------------------------------------------

def make_result(k: int = 3) -> IKAdaptResult:
    rng = np.random.default_rng(0)
    sols = [IKSolution(q=rng.uniform(-1.0, 1.0, 7), score=0.9 - 0.1 * i, position_error=1e-5 * i,
                       orientation_error=0.0, collision_free=i < k - 1, clearance=0.01)
            for i in range(k)]
    return IKAdaptResult(solutions=sols, joint_names=list(PANDA_JOINTS), num_requested=k,
                         num_found=k - 1, valid_fraction_prior=0.25, valid_fraction_adapted=0.75,
                         iterations_run=7, timings=IKTimings(0.1, 0.2, 0.3, 0.65),
                         message="found 2 of 3")


def test_result_round_trip():
    result = make_result()
    response = conv.ik_result_to_msg(result, AdaptIK.Response())
    assert response.success and response.message == "found 2 of 3"
    assert list(response.solutions[0].joint_names) == list(PANDA_JOINTS)
    assert (response.iterations_run, response.total_time) == (7, pytest.approx(0.65))
    back = conv.ik_result_from_msg(response)
    for a, b in zip(result.solutions, back.solutions):
        np.testing.assert_allclose(a.q, b.q)
        assert (a.score, a.position_error, a.collision_free, a.clearance) == (
            pytest.approx(b.score), pytest.approx(b.position_error), b.collision_free,
            pytest.approx(b.clearance))
    assert back.timings == result.timings
    assert back.valid_fraction_adapted == pytest.approx(0.75)


def test_empty_result_is_a_failure():
    result = make_result(0)
    response = conv.ik_result_to_msg(result, AdaptIK.Response())
    assert not response.success and not response.solutions
    assert conv.ik_result_from_msg(response).solutions == []


def test_arm_points_run_from_base_to_end_effector(kin):
    q = np.zeros((2, 7))
    pts = conv.arm_points(kin, q)
    assert pts.shape[0] == 2 and pts.shape[2] == 3
    np.testing.assert_allclose(pts[:, 0], 0.0, atol=1e-6)
    ee = kin.ee_position(torch.zeros(1, 7)).numpy()[0]
    np.testing.assert_allclose(pts[0, -1], ee, atol=1e-6)


def test_markers_clear_then_draw_each_solution_and_the_target(kin):
    result = make_result()
    header = Header(frame_id="panda_link0")
    markers = conv.markers_from_ik_result(result, kin, header, target=[0.5, 0.0, 0.2]).markers
    assert markers[0].action == Marker.DELETEALL
    strips = markers[1:-1]
    assert [m.type for m in strips] == [Marker.LINE_STRIP] * 3
    assert [m.id for m in strips] == [0, 1, 2]
    chain = conv.arm_points(kin, result.solutions[0].q[None])[0]
    assert len(strips[0].points) == len(chain)
    assert strips[0].points[-1].x == pytest.approx(chain[-1][0])
    assert strips[0].color.g > strips[1].color.g  # best is greenest
    assert strips[2].color.r > 0.8  # the colliding one is red
    assert markers[-1].type == Marker.SPHERE and markers[-1].pose.position.x == 0.5


# ------------------------------------------------------------------------------------------------
# MoveIt /compute_ik (messages faked: moveit_msgs is not installed here)
# ------------------------------------------------------------------------------------------------

def _ns(**kw):
    return SimpleNamespace(**kw)


def test_compute_ik_request_is_seeded_and_position_only_without_collisions():
    req = _ns(ik_request=_ns(group_name="", robot_state=_ns(joint_state=_ns(name=[], position=[])),
                             avoid_collisions=True, ik_link_name="",
                             pose_stamped=_ns(header=_ns(frame_id=""), pose=None),
                             timeout=_ns(sec=0, nanosec=0)))
    seed = np.arange(7) * 0.1
    conv.fill_compute_ik_request(req, seed, PANDA_JOINTS, [0.5, 0.0, 0.3], ROT_Z90, "panda_arm",
                                 "panda_grasptarget", 0.005)
    ik = req.ik_request
    assert ik.robot_state.joint_state.position == pytest.approx(seed.tolist())
    assert not ik.avoid_collisions and ik.ik_link_name == "panda_grasptarget"
    assert ik.pose_stamped.pose.orientation.z == pytest.approx(math.sqrt(0.5))
    assert (ik.timeout.sec, ik.timeout.nanosec) == (0, 5_000_000)


def test_compute_ik_response_is_read_in_joint_order():
    names = list(reversed(PANDA_JOINTS)) + ["panda_finger_joint1"]
    response = _ns(error_code=_ns(val=1), solution=_ns(joint_state=_ns(
        name=names, position=[float(i) for i in range(8)])))
    np.testing.assert_allclose(conv.joints_from_compute_ik(response, PANDA_JOINTS),
                               [6, 5, 4, 3, 2, 1, 0])
    response.error_code.val = -31  # NO_IK_SOLUTION
    assert conv.joints_from_compute_ik(response, PANDA_JOINTS) is None


# ------------------------------------------------------------------------------------------------
# PointCloud2
# ------------------------------------------------------------------------------------------------

def test_cloud_round_trip():
    pts = np.random.default_rng(1).normal(size=(100, 3))
    msg = conv.cloud_from_points(pts, Header(frame_id="camera"))
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 100, 12, 1200)
    assert not msg.is_bigendian and msg.is_dense
    np.testing.assert_allclose(conv.points_from_cloud(msg), pts.astype(np.float32))


def _cloud(points, point_step=16, row_pad=0, height=1, big_endian=False, extra="rgb"):
    """A cloud with padding after z, an extra field and optional row padding."""
    pts = np.asarray(points, dtype=np.float32).reshape(height, -1, 3)
    width = pts.shape[1]
    order = ">" if big_endian else "<"
    rows = []
    for row in pts:
        buf = bytearray()
        for p in row:
            buf += p.astype(order + "f4").tobytes() + b"\x07" * (point_step - 12)
        rows.append(bytes(buf) + b"\x00" * row_pad)
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, n in enumerate("xyz")]
    fields.append(PointField(name=extra, offset=12, datatype=PointField.UINT32, count=1))
    return PointCloud2(height=height, width=width, fields=fields, is_bigendian=big_endian,
                       point_step=point_step, row_step=width * point_step + row_pad,
                       data=b"".join(rows), is_dense=False)


def test_cloud_with_padding_rows_and_big_endian_is_read():
    pts = np.arange(24, dtype=float).reshape(8, 3)
    for kw in ({}, {"row_pad": 5, "height": 2}, {"big_endian": True, "height": 4}):
        np.testing.assert_allclose(conv.points_from_cloud(_cloud(pts, **kw)), pts)


def test_cloud_nans_are_dropped_unless_kept():
    pts = np.array([[0.0, 0.0, 1.0], [np.nan, 0.0, 0.0], [1.0, 2.0, 3.0]])
    assert conv.points_from_cloud(_cloud(pts)).shape == (2, 3)
    assert conv.points_from_cloud(_cloud(pts), skip_nans=False).shape == (3, 3)


def test_empty_cloud_gives_no_points():
    msg = conv.cloud_from_points(np.zeros((0, 3)), Header())
    assert conv.points_from_cloud(msg).shape == (0, 3)


def _without_z(msg):
    msg.fields = [f for f in msg.fields if f.name != "z"]


def _float64_x(msg):
    msg.fields[0].datatype = PointField.FLOAT64


def _offset_outside(msg):
    msg.fields[2].offset = 14


def _short_rows(msg):
    msg.row_step = 10


def _short_data(msg):
    msg.data = bytes(msg.data)[:-1]


@pytest.mark.parametrize("mutate,expected", [
    (_without_z, "no field(s) ['z']"),
    (_float64_x, "field 'x' must be one FLOAT32"),
    (_offset_outside, "does not fit in point_step 16"),
    (_short_rows, "row_step 10 is smaller"),
    (_short_data, "expected row_step * height"),
], ids=["missing_field", "float64", "offset", "row_step", "data_size"])
def test_malformed_cloud_is_rejected(mutate, expected):
    msg = _cloud(np.zeros((4, 3)))
    mutate(msg)
    with pytest.raises(InvalidRequestError) as err:
        conv.points_from_cloud(msg)
    assert expected in str(err.value)


def test_cloud_from_points_rejects_bad_shapes():
    with pytest.raises(InvalidRequestError, match=r"\(P, 3\)"):
        conv.cloud_from_points(np.zeros((4, 2)), Header())


# ------------------------------------------------------------------------------------------------
# Parameters (mace_ros.params)
# ------------------------------------------------------------------------------------------------

def test_parameter_defaults_build_the_default_config():
    assert params.config_from_parameters(params.parameter_defaults()) == ServiceConfig()


def test_params_file_sets_only_known_parameters():
    flat = to_flat(load_service_config("config/panda.yaml"))
    assert set(flat) == set(params.parameter_defaults())
    assert params.config_from_parameters(flat) == load_service_config("config/panda.yaml")


@pytest.mark.parametrize("name,value,expected", [
    ("ik.num_solutions", 0, "ik.num_solutions"),
    ("ik.num_solutions", 65, "limits.max_solutions = 64"),
    ("ik.time_budget_s", -1.0, "ik.time_budget_s"),
    ("ik.refinement_mode", "bfgs", "ik.refinement_mode"),
    ("ik.mace.quantile", 0.0, "quantile"),
    ("ik.mace.num_samples", 100000, "ik.mace.num_samples"),
    ("ik.refinement.damping", math.nan, "ik.refinement.damping"),
    ("max_concurrent_waiting", -1, "max_concurrent_waiting"),
    ("device", "tpu", "device"),
    ("ik.time_budget_s", "fast", "ik.time_budget_s"),
])
def test_invalid_parameter_is_named(name, value, expected):
    values = params.parameter_defaults()
    values[name] = value
    with pytest.raises(params.ParameterError) as err:
        params.config_from_parameters(values)
    assert expected in str(err.value)


def test_off_read_by_yaml_as_a_boolean_still_means_off():
    """``-p service_introspection:=off`` (and ``off`` in a params file) reaches the node as the
    boolean false: it means the word, not a type error at start."""
    import rclpy
    from rclpy.parameter import Parameter

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("mace_params_probe", context=context, parameter_overrides=[
            Parameter("service_introspection", value=False)])
        try:
            assert params.declare_parameters(node).service_introspection == "off"
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert params.as_declared("service_introspection", True) == "on"  # then refused by name
    assert params.as_declared("ik.early_stop", False) is False


def test_unknown_overrides_are_reported():
    assert params.unknown_overrides(["ik.mace.num_sample", "device", "use_sim_time"]) == [
        "ik.mace.num_sample"]


# ------------------------------------------------------------------------------------------------
# CompleteShape requests and responses
# ------------------------------------------------------------------------------------------------

def _shape_cloud_request(**kw) -> ShapeCompletionRequest:
    pts = np.random.default_rng(2).uniform(-0.2, 0.2, size=(50, 3))
    fields = dict(prior="boxes", points=pts, viewpoint=np.array([1.0, 0.5, 0.8]),
                  num_completions=4, time_budget_s=2.5, iterations=3, seed=7)
    fields.update(kw)
    return ShapeCompletionRequest(**fields)


def _shape_contacts_request(**kw) -> ShapeCompletionRequest:
    fields = dict(prior="objects", contacts=np.eye(3) * 0.3, directions=-np.eye(3),
                  finger_radius=0.05, num_completions=2, time_budget_s=1.0)
    fields.update(kw)
    return ShapeCompletionRequest(**fields)


def test_shape_cloud_request_round_trip():
    request = _shape_cloud_request()
    msg = conv.shape_request_to_msg(request, "camera_optical")
    assert msg.cloud.width == 50 and msg.has_viewpoint and not msg.contact_points
    back = conv.shape_request_from_msg(msg)
    np.testing.assert_allclose(back.points, request.points.astype(np.float32))
    np.testing.assert_allclose(back.viewpoint, request.viewpoint)
    assert back.contacts is None and back.directions is None
    for name in ("prior", "num_completions", "time_budget_s", "iterations", "seed"):
        assert getattr(back, name) == getattr(request, name), name
    assert conv.shape_request_header(msg).frame_id == "camera_optical"


def test_shape_request_defaults_travel_as_minus_one_and_zero():
    msg = conv.shape_request_to_msg(_shape_contacts_request(finger_radius=None), "hand")
    assert (msg.iterations, msg.seed, msg.finger_radius) == (-1, -1, 0.0)
    assert msg.contacts_frame == "hand" and not msg.cloud.fields and not msg.has_viewpoint
    back = conv.shape_request_from_msg(msg)
    assert back.iterations is None and back.seed is None and back.finger_radius is None
    assert back.points is None
    np.testing.assert_allclose(back.contacts, np.eye(3) * 0.3)
    np.testing.assert_allclose(back.directions, -np.eye(3))
    np.testing.assert_allclose(back.grasp_center, np.zeros(3))  # the frame's origin
    assert conv.shape_request_header(msg).frame_id == "hand"
    moved = conv.shape_request_from_msg(conv.shape_request_to_msg(
        _shape_contacts_request(grasp_center=np.array([0.0, 0.1, 0.05]))))
    np.testing.assert_allclose(moved.grasp_center, [0.0, 0.1, 0.05])


def test_shape_request_keeps_a_given_finger_radius_and_zero_iterations():
    back = conv.shape_request_from_msg(conv.shape_request_to_msg(
        _shape_contacts_request(iterations=0, seed=0)))
    assert back.finger_radius == pytest.approx(0.05)
    assert (back.iterations, back.seed) == (0, 0)


def test_shape_header_echoes_the_cloud_stamp():
    msg = conv.shape_request_to_msg(_shape_cloud_request(), "cam")
    msg.cloud.header.stamp.sec, msg.cloud.header.stamp.nanosec = 12, 34
    header = conv.shape_request_header(msg)
    assert (header.frame_id, header.stamp.sec, header.stamp.nanosec) == ("cam", 12, 34)


def _add_contacts(msg):
    contacts = conv.shape_request_to_msg(_shape_contacts_request())
    msg.contact_points, msg.contact_directions = contacts.contact_points, \
        contacts.contact_directions


def _empty_cloud(msg):
    msg.cloud = conv.cloud_from_points(np.zeros((0, 3)), Header(frame_id="cam"))


def _no_observation(msg):
    msg.cloud = PointCloud2()


def _cloud_points(points):
    def mutate(msg):
        msg.cloud = conv.cloud_from_points(np.asarray(points, dtype=float), Header())
    return mutate


def _cloud_field(mutate_cloud):
    def mutate(msg):
        mutate_cloud(msg.cloud)
    return mutate


def _drop_z(cloud):
    cloud.fields = [f for f in cloud.fields if f.name != "z"]


def _short_point_step(cloud):
    cloud.point_step = 8


def _short_row_step(cloud):
    cloud.row_step = 12


def _truncated_data(cloud):
    cloud.data = bytes(cloud.data)[:-3]


SHAPE_BAD = [
    ("both", _add_contacts, "not both"),
    ("neither", _no_observation, "no observation"),
    ("empty_cloud", _empty_cloud, "cloud is empty"),
    ("nan_point", _cloud_points([[0.0, 0.1, 0.2], [math.nan, 0.0, 0.0]]),
     "cloud has 1 of 2 points with a NaN or inf"),
    ("inf_point", _cloud_points([[0.0, 0.1, math.inf]]), "NaN or inf"),
    ("missing_z", _cloud_field(_drop_z), "cloud: point cloud has no field(s) ['z']"),
    ("point_step", _cloud_field(_short_point_step), "does not fit in point_step 8"),
    ("row_step", _cloud_field(_short_row_step), "row_step 12 is smaller"),
    ("data_size", _cloud_field(_truncated_data), "expected row_step * height"),
    ("nan_viewpoint", _set("viewpoint.x", math.nan), "viewpoint must be finite"),
    ("iterations", _set("iterations", -2), "iterations must be -1"),
    ("seed", _set("seed", -3), "seed must be -1"),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in SHAPE_BAD],
                         ids=[b[0] for b in SHAPE_BAD])
def test_bad_shape_cloud_request_raises_invalid_request(mutate, expected):
    msg = conv.shape_request_to_msg(_shape_cloud_request(), "cam")
    mutate(msg)
    with pytest.raises(InvalidRequestError) as err:
        conv.shape_request_from_msg(msg)
    assert expected in str(err.value)


def _drop_direction(msg):
    msg.contact_directions = msg.contact_directions[:-1]


SHAPE_CONTACT_BAD = [
    ("fewer_directions", _drop_direction, "3 contact_points but 2 contact_directions"),
    ("no_directions", _set("contact_directions", []), "3 contact_points but 0"),
    ("viewpoint", _set("has_viewpoint", True), "viewpoint belongs to a cloud"),
    ("nan_contact", _set("contact_points.1.y", math.nan), "contact_points must be finite"),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in SHAPE_CONTACT_BAD],
                         ids=[b[0] for b in SHAPE_CONTACT_BAD])
def test_bad_shape_contacts_request_raises_invalid_request(mutate, expected):
    msg = conv.shape_request_to_msg(_shape_contacts_request(), "hand")
    mutate(msg)
    with pytest.raises(InvalidRequestError) as err:
        conv.shape_request_from_msg(msg)
    assert expected in str(err.value)


def _shape_result(k: int = 3) -> ShapeCompletionResult:
    clouds = torch.arange(k * 20 * 3, dtype=torch.float32).reshape(k, 20, 3) / 100.0
    return ShapeCompletionResult(
        completions=clouds, scores=torch.linspace(0.9, 0.5, k), iterations_run=5,
        sampling_time_s=0.25, adaptation_time_s=0.5, total_time_s=0.8,
        stopped_by_deadline=True, notes=["time budget reached after 5 of 12 iterations"])


def test_shape_result_to_msg_and_back():
    result = _shape_result()
    header = Header(frame_id="camera_optical")
    header.stamp.sec = 5
    response = conv.shape_result_to_msg(result, header, CompleteShape.Response())
    assert response.success
    assert response.message.startswith("3 completions, best S = 0.900, 5 MACE iterations")
    assert "time budget reached" in response.message
    assert [c.header.frame_id for c in response.completions] == ["camera_optical"] * 3
    assert all(c.header.stamp.sec == 5 and c.width == 20 for c in response.completions)
    assert response.scores == pytest.approx([0.9, 0.7, 0.5])
    assert (response.iterations_run, response.sampling_time, response.adaptation_time,
            response.total_time) == (5, 0.25, 0.5, pytest.approx(0.8))
    back = conv.shape_result_from_msg(response)
    np.testing.assert_allclose(back.completions.numpy(), result.completions.numpy(), atol=1e-7)
    np.testing.assert_allclose(back.scores.numpy(), result.scores.numpy(), atol=1e-7)
    assert back.iterations_run == 5 and back.notes == [response.message]


def test_empty_shape_result_is_a_failure():
    result = _shape_result(0)
    result.completions = torch.zeros(0, 20, 3)
    response = conv.shape_result_to_msg(result, Header(), CompleteShape.Response())
    assert not response.success and not response.completions
    assert conv.shape_result_from_msg(response).completions.shape[0] == 0


def test_shape_parameters_map_one_to_one():
    defaults = params.parameter_defaults()
    shape = {k: v for k, v in defaults.items() if k.startswith("shape.")}
    assert shape == {f"shape.{k}": v for k, v in to_flat(ShapeCompletionConfig()).items()}
    values = dict(defaults, **{"shape.iterations": 3, "shape.objective": "is"})
    config = params.config_from_parameters(values)
    assert (config.shape.iterations, config.shape.objective) == (3, "is")
    assert isinstance(load_service_config("config/panda.yaml").shape, ShapeCompletionConfig)


# ------------------------------------------------------------------------------------------------
# CompleteShape in the support frame (infer_placement)
# ------------------------------------------------------------------------------------------------

_YAW = math.radians(90.0)
#: the table's pose in the camera's frame: at (1, 2, 0.5), turned by 90 degrees about z
_SUPPORT = dict(position=(1.0, 2.0, 0.5), orientation=(0.0, 0.0, math.sin(_YAW / 2),
                                                       math.cos(_YAW / 2)))


def _placed_request(support=_SUPPORT) -> CompleteShape.Request:
    # support-frame points (0.1, 0, 0.2) and (0, 0.1, 0) as the camera sees them
    cloud = np.array([[1.0, 2.1, 0.7], [0.9, 2.0, 0.5]])
    msg = conv.shape_request_to_msg(ShapeCompletionRequest(prior="boxes", points=cloud),
                                    "camera")
    msg.infer_placement = True
    pose = msg.support_pose
    pose.position.x, pose.position.y, pose.position.z = support["position"]
    (pose.orientation.x, pose.orientation.y, pose.orientation.z,
     pose.orientation.w) = support["orientation"]
    return msg


def test_a_placed_cloud_is_moved_into_the_support_frame():
    request = conv.shape_request_from_msg(_placed_request())
    assert request.frame == "support"
    np.testing.assert_allclose(np.asarray(request.points), [[0.1, 0.0, 0.2], [0.0, 0.1, 0.0]],
                               atol=1e-6)  # the cloud carries float32
    unset = _placed_request(dict(position=(0.0, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 0.0)))
    np.testing.assert_allclose(np.asarray(conv.shape_request_from_msg(unset).points),
                               [[1.0, 2.1, 0.7], [0.9, 2.0, 0.5]], atol=1e-6)  # its own frame


@pytest.mark.parametrize("support, expected", [
    (dict(position=(math.nan, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 1.0)), "support_pose"),
    (dict(position=(0.0, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 2.0)), "support_pose"),
    (dict(position=(0.1, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 0.0)), "support_pose"),
    (dict(position=(0.0, 0.0, 0.0), orientation=(math.inf, 0.0, 0.0, 1.0)), "support_pose"),
])
def test_bad_support_poses_are_refused(support, expected):
    with pytest.raises(InvalidRequestError, match=expected):
        conv.shape_request_from_msg(_placed_request(support))


def test_placed_completions_come_back_in_the_clouds_frame():
    result = _shape_result(2)
    support_points = result.completions.clone()
    result.placements = torch.tensor([[0.1, 0.0, 1.0], [0.0, -0.2, 1.0]])
    support = conv.support_transform(_placed_request())
    response = conv.shape_result_to_msg(result, Header(frame_id="camera"),
                                        CompleteShape.Response(), support)
    back = conv.shape_result_from_msg(response)
    expected = support_points.numpy() @ support[:3, :3].T + support[:3, 3]
    np.testing.assert_allclose(back.completions.numpy(), expected, atol=1e-6)
    first = response.placements[0]
    assert (first.position.x, first.position.y, first.position.z) == pytest.approx(
        (1.0, 2.1, 0.5))  # (0.1, 0) on the table, turned with it
    assert first.orientation.z == pytest.approx(math.sin(_YAW / 2))
    assert list(response.scales) == [1.0, 1.0]


def test_placed_contacts_are_moved_into_the_support_frame():
    msg = CompleteShape.Request(prior="boxes", num_completions=2, time_budget=1.0,
                                infer_placement=True, contacts_frame="camera")
    msg.contact_points = [conv.Point(x=1.0, y=2.1, z=0.7)]  # (0.1, 0, 0.2) on the table
    msg.contact_directions = [conv.Vector3(x=0.0, y=-1.0, z=0.0)]  # -x on the table
    msg.grasp_center = conv.Point(x=1.0, y=2.0, z=0.6)  # (0, 0, 0.1) on the table
    pose = _placed_request().support_pose
    msg.support_pose = pose
    request = conv.shape_request_from_msg(msg)
    assert request.frame == "support"
    np.testing.assert_allclose(request.contacts, [[0.1, 0.0, 0.2]], atol=1e-9)
    np.testing.assert_allclose(request.directions, [[-1.0, 0.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(request.grasp_center, [0.0, 0.0, 0.1], atol=1e-9)


def test_every_parameter_has_a_description():
    """Each parameter's description (``ros2 param describe``) is its field's ``#:`` comment, on
    the field's line or on the comment lines above it."""
    from mace_core.config import ServiceConfig, flat_docs

    docs = flat_docs(ServiceConfig)
    assert len(docs) == len(params.parameter_defaults())
    assert all(docs.values()), [name for name, text in docs.items() if not text]
    assert "debug" in docs["request_log_level"] and "contents" in docs["service_introspection"]


def test_seed_state_is_read_by_joint_name_with_other_joints_ignored():
    """A robot's /joint_states as it comes: another order, the fingers in it; or seven
    positions without names; or nothing (no seed)."""
    q = [0.1, -0.7, 0.2, -2.3, 0.0, 1.6, 0.8]
    names = [f"panda_joint{i}" for i in range(1, 8)]
    order = [6, 0, 5, 1, 4, 2, 3]
    state = JointState(name=["panda_finger_joint1"] + [names[i] for i in order],
                       position=[0.04] + [q[i] for i in order])
    np.testing.assert_allclose(conv.seed_state_from_msg(state), q)
    np.testing.assert_allclose(conv.seed_state_from_msg(JointState(position=q)), q)
    assert conv.seed_state_from_msg(JointState()) is None
    msg = conv.ik_request_to_msg(IKRequest(position=np.array([0.4, 0.0, 0.4]),
                                           num_solutions=1, time_budget_s=1.0))
    assert conv.ik_request_from_msg(msg).seed_state is None


def test_a_batch_request_becomes_one_request_per_target():
    """AdaptIKBatch: the shared fields in every target's request, target i seeded seed + i; a
    malformed target becomes its reason, the others are kept; positions alone stay
    position-only."""
    poses = np.array([[0.5, 0.1, 0.3, 0.0, 0.0, 0.0, 1.0], [0.4, -0.1, 0.2, 1.0, 0.0, 0.0, 0.0],
                      [0.4, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0]])  # a zero quaternion
    request = full_request()
    msg = conv.ik_batch_request_to_msg(poses, request.obstacles, num_solutions=5,
                                       time_budget_s=2.5, orientation_tolerance=0.01,
                                       ik_link="panda_link8", seed=7,
                                       seed_state=request.seed_state)
    requests, budget = conv.ik_batch_requests_from_msg(msg)
    assert budget == 3 * 2.5 and len(requests) == 3
    msg.total_time_budget = 4.0
    assert conv.ik_batch_requests_from_msg(msg)[1] == 4.0
    msg.total_time_budget = 0.0
    assert conv.ik_batch_requests_from_msg(msg, max_total_s=6.0)[1] == 6.0
    assert isinstance(requests[2], str) and "target 2 orientation" in requests[2]
    for i, r in enumerate(requests[:2]):
        np.testing.assert_allclose(r.position, poses[i, :3])
        assert (r.num_solutions, r.seed, r.ik_link, r.orientation_tolerance, r.time_budget_s) == (
            5, 7 + i, "panda_link8", 0.01, 2.5)
        np.testing.assert_allclose(r.seed_state, request.seed_state)
        assert len(r.obstacles) == 3
    np.testing.assert_allclose(requests[1].rotation, np.diag([1.0, -1.0, -1.0]), atol=1e-12)
    positions, _ = conv.ik_batch_requests_from_msg(conv.ik_batch_request_to_msg(poses[:, :3]))
    assert all(r.rotation is None and r.seed is None for r in positions)
    with pytest.raises(ValueError, match="targets must be"):
        conv.ik_batch_request_to_msg(poses[:, :4])
    for budget in (0.0, float("nan"), 31.0):
        msg.time_budget = budget
        with pytest.raises(InvalidRequestError, match="each target's"):
            conv.ik_batch_requests_from_msg(msg, max_total_s=30.0)
