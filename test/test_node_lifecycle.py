"""The node's process from outside: signals mid-request and during start, namespaces and
parameters files. Each test starts its own node (``conftest.NodeProcess``) and talks to it over
DDS."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from conftest import PARAMS_FILE, NodeProcess, wait_for_service
from mace_core.ik.request import IKRequest
from mace_core.robot.scenes import load_scene
from mace_ros.client import MaceClient
from mace_ros.conversions import ik_request_to_msg
from mace_ros.node import SHUTTING_DOWN

#: Seconds within which SIGINT / SIGTERM must end the node's process (issue #15).
EXIT_WITHIN_S = 2.0


def long_request(budget_s: float = 20.0):
    """An IK request that keeps the node busy for its whole budget: no refinement, K = 64 in
    the cabinet, T = 2000 (the node runs with early stop off)."""
    scene = load_scene("config/scenes/cabinet.yaml")
    target = (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0
    return ik_request_to_msg(IKRequest(
        position=target, obstacles=list(scene.obstacles), num_solutions=64,
        time_budget_s=budget_s, iterations=2000, refinement="none", seed=0))


@pytest.mark.parametrize("signals", [
    (signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)],
    ids=["sigint", "sigterm", "sigint_twice"])
def test_signal_mid_request_stops_the_node_within_2_s(rclpy_context, tmp_path, signals):
    """A 20 s request is running and another is waiting when the signal comes (twice, as
    under ``ros2 launch`` in a terminal): the process exits 0 within 2 s, with no traceback,
    and both requests are answered "node shutting down"."""
    node = NodeProcess(str(tmp_path / "node.log"),
                       params={"ik.early_stop": "false"}, ros_args=["-r", "__ns:=/sig"])
    clients = [MaceClient("/sig/mace/adapt_ik", node_name=f"mace_sig_{i}") for i in range(2)]
    answers = [None, None]

    def call(i):
        answers[i] = clients[i].call(long_request(), timeout_s=40.0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    try:
        wait_for_service(node, clients[0])
        assert clients[1].wait(10.0)
        for t in threads:
            t.start()
            time.sleep(1.0)  # the first is running, the second waiting
        t0 = time.monotonic()
        for signum in signals:
            node.proc.send_signal(signum)
            time.sleep(0.05)
        status = node.wait_exit(10.0)
        took = time.monotonic() - t0
        for t in threads:
            t.join(10.0)
    finally:
        for c in clients:
            c.close()
        node.stop()
    log = node.log()
    assert status == 0, log
    assert took < EXIT_WITHIN_S, f"exited {took:.2f} s after the signal:\n{log}"
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "shutting down" in log
    for answer in answers:
        assert answer is not None and not answer.success
        assert answer.message == SHUTTING_DOWN


def test_sigint_during_start_exits_cleanly(rclpy_context, tmp_path):
    """Ctrl-C while the models load and warm up: exit 0 at once, no traceback."""
    node = NodeProcess(str(tmp_path / "node.log"))
    try:
        assert node.wait_for_log("starting: loading the models"), node.log()
        node.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        status = node.wait_exit(10.0)
        took = time.monotonic() - t0
    finally:
        node.stop()
    log = node.log()
    assert status == 0, log
    assert took < EXIT_WITHIN_S, f"exited {took:.2f} s after the signal:\n{log}"
    assert "Traceback" not in log and "start abandoned" in log, log


def test_parameters_file_applies_under_any_namespace(rclpy_context, tmp_path):
    """The shipped file's sections apply to the node under a namespace (a copy with one value
    changed shows it is the file that applies), and a file whose only section names another
    node is warned about."""
    import rclpy
    from rclpy.parameter_client import AsyncParameterClient

    shipped = open(PARAMS_FILE).read()
    assert "      num_solutions: 8\n" in shipped
    changed = tmp_path / "panda_k5.yaml"
    changed.write_text(shipped.replace("      num_solutions: 8\n", "      num_solutions: 5\n"))
    elsewhere = tmp_path / "other_node.yaml"
    elsewhere.write_text("mace:\n  ros__parameters:\n    publish_markers: false\n")
    node = NodeProcess(str(tmp_path / "node.log"), params_files=(str(changed), str(elsewhere)),
                       ros_args=["-r", "__ns:=/robot1"])
    client = MaceClient("/robot1/mace/adapt_ik", node_name="mace_ns_probe")
    try:
        wait_for_service(node, client)
        params = AsyncParameterClient(client.node, "/robot1/mace")
        assert params.wait_for_services(10.0)
        future = params.get_parameters(["ik.num_solutions", "publish_markers"])
        rclpy.spin_until_future_complete(client.node, future, timeout_sec=10.0)
        values = [v.integer_value if v.type == 2 else v.bool_value
                  for v in future.result().values]
    finally:
        client.close()
        status = node.stop()
    log = node.log()
    assert status == 0, log
    assert values == [5, True], log
    assert f"parameters file {elsewhere}: none of its sections ['mace'] applies" in log, log
    assert f"parameters file {changed}" not in log, log


def test_the_robots_joint_states_seed_requests_that_carry_none(rclpy_context, tmp_path):
    """``joint_states_topic``: the latest JointState a robot publishes there seeds the requests
    without a ``seed_state`` (one solution near it: the published configuration itself, a free
    solution of the pose asked for); a state older than ``joint_states_max_age_s`` seeds
    nothing, and a request's own seed state wins."""
    import torch
    from sensor_msgs.msg import JointState

    from mace_core.robot.kinematics import PANDA_JOINTS, RobotKinematics
    from mace_core.tensor import TensorSpec

    q = np.array([0.1, 0.5, -0.1, -1.9, 0.1, 2.4, 0.6])
    pose = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64)).ee_pose(
        torch.tensor(q[None]))[0].numpy()
    request = ik_request_to_msg(IKRequest(position=pose[:3, 3], rotation=pose[:3, :3],
                                          orientation_tolerance=1e-3, num_solutions=1,
                                          time_budget_s=2.0, seed=0))
    node = NodeProcess(str(tmp_path / "node.log"), params={
        "joint_states_topic": "/mace_test/robot/joint_states", "joint_states_max_age_s": 0.5})
    client = MaceClient(node_name="mace_joint_states_probe")
    publisher = client.node.create_publisher(JointState, "/mace_test/robot/joint_states", 10)
    try:
        wait_for_service(node, client)
        deadline = time.monotonic() + 10.0
        seeded = None
        while time.monotonic() < deadline:  # until the node's subscription has matched
            publisher.publish(JointState(name=["panda_finger_joint1"] + list(PANDA_JOINTS),
                                         position=[0.04] + q.tolist()))
            time.sleep(0.05)
            seeded = client.call(request, timeout_s=10.0)
            if "from the seed state" in seeded.message:
                break
        assert seeded is not None and "from the seed state" in seeded.message
        assert np.linalg.norm(np.asarray(seeded.solutions[0].positions) - q) < 1e-4
        own = ik_request_to_msg(IKRequest(position=pose[:3, 3], rotation=pose[:3, :3],
                                          orientation_tolerance=1e-3, num_solutions=1,
                                          time_budget_s=2.0, seed=0,
                                          seed_state=np.array([0.0, -0.785, 0.0, -2.356, 0.0,
                                                               1.571, 0.785])))
        publisher.publish(JointState(name=list(PANDA_JOINTS), position=q.tolist()))
        assert np.linalg.norm(np.asarray(client.call(own, timeout_s=10.0).solutions[0]
                                         .positions) - q) > 0.1  # its own seed, not the topic's
        time.sleep(1.0)  # the last state is now older than 0.5 s
        stale = client.call(request, timeout_s=10.0)
        assert stale.success and "seed state" not in stale.message
    finally:
        client.close()
        status = node.stop()
    assert status == 0, node.log()
    assert "seeded from /mace_test/robot/joint_states" in node.log()
