"""The services' own loop (mace_ros.serving): requests taken by its thread, answered by its
workers, never by the node's executor; concurrent callbacks; refusing a service of another group.
"""

import threading

import pytest


@pytest.fixture
def served(rclpy_context):
    """A node whose ``/serving_test/adapt_ik`` is served by a ServiceLoop of 3 workers, a
    single-threaded executor spinning the node, and a client node."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from mace_ros.client import MaceClient
    from mace_ros.serving import ServiceLoop
    from mace_ros.srv import AdaptIK

    node = Node("serving_test_server")
    loop = ServiceLoop(node, workers=3)
    release = threading.Event()

    def callback(request, response):
        if request.num_solutions == 2:  # held until released: shows concurrent callbacks
            release.wait(timeout=10.0)
        if request.num_solutions == 3:
            raise RuntimeError("a bug in the callback")
        response.success = True
        response.message = threading.current_thread().name
        response.iterations_run = request.iterations  # which request this answers
        return response

    loop.add(node.create_service(AdaptIK, "/serving_test/adapt_ik", callback,
                                 callback_group=loop.callback_group))
    loop.start()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    clients = [MaceClient("/serving_test/adapt_ik", node_name=f"serving_test_client_{i}")
               for i in range(2)]
    yield clients, release, AdaptIK
    release.set()
    for client in clients:
        client.close()
    loop.stop()
    executor.shutdown(timeout_sec=1.0)
    node.destroy_node()


def test_the_loops_workers_answer_not_the_nodes_executor(served):
    clients, _, AdaptIK = served
    request = AdaptIK.Request()
    request.num_solutions = 1
    response = clients[0].call(request, timeout_s=10.0)
    assert response.success and response.message.startswith("mace_request")


def test_a_request_is_answered_while_another_one_is_in_its_callback(served):
    clients, release, AdaptIK = served
    slow, fast = AdaptIK.Request(), AdaptIK.Request()
    slow.num_solutions, fast.num_solutions = 2, 1
    answers = {}
    caller = threading.Thread(target=lambda: answers.update(slow=clients[0].call(slow, 10.0)))
    caller.start()
    answers["fast"] = clients[1].call(fast, timeout_s=10.0)  # while the slow one is held
    assert "slow" not in answers
    release.set()
    caller.join(timeout=10.0)
    assert answers["fast"].success and answers["slow"].success


def test_a_late_answer_to_a_timed_out_call_is_not_taken_for_the_next_ones(served):
    clients, release, AdaptIK = served
    slow, fast = AdaptIK.Request(), AdaptIK.Request()
    slow.num_solutions, fast.num_solutions = 2, 1
    slow.iterations, fast.iterations = 111, 222  # not read by the callback: tells them apart
    with pytest.raises(TimeoutError, match="no response"):
        clients[0].call(slow, timeout_s=0.3)
    release.set()  # its answer now arrives, late
    answer = clients[0].call(fast, timeout_s=10.0)
    assert answer.success and answer.message.startswith("mace_request")
    assert answer.iterations_run == 222


def test_a_callback_that_raises_is_answered_and_the_loop_goes_on(served):
    clients, _, AdaptIK = served
    broken, fine = AdaptIK.Request(), AdaptIK.Request()
    broken.num_solutions, fine.num_solutions = 3, 1
    answer = clients[0].call(broken, timeout_s=10.0)
    assert not answer.success
    assert answer.message == "internal error: RuntimeError: a bug in the callback"
    assert clients[0].call(fine, timeout_s=10.0).success


def test_a_service_of_another_callback_group_is_refused(rclpy_context):
    from rclpy.node import Node

    from mace_ros.serving import ServiceLoop
    from mace_ros.srv import AdaptIK

    node = Node("serving_test_refusal")
    loop = ServiceLoop(node, workers=1)
    try:
        with pytest.raises(ValueError, match="callback group"):
            loop.add(node.create_service(AdaptIK, "/serving_test/refused", lambda a, b: b))
    finally:
        loop.stop()
        node.destroy_node()
