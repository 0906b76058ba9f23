"""Shared fixtures: a private ROS domain, the mace node in its own process, ROS clients.

The node runs as ``python -m mace_ros.node --ros-args --params-file config/panda.yaml`` with the
shipped models (``models/``); ``MACE_TEST_MODELS_DIR`` points it at another folder (development
only). ``ROS_DOMAIN_ID`` is taken from the environment (``make test`` sets one per run) or derived
from the pid, and discovery stays on this machine, so parallel runs do not see each other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS_FILE = os.path.join(REPO, "config", "panda.yaml")
MODELS_DIR = os.environ.get("MACE_TEST_MODELS_DIR", os.path.join(REPO, "models"))
#: Seconds the node may take to load its models, warm up and offer its service.
NODE_START_TIMEOUT_S = 60.0

# Set before anything calls rclpy.init() (here and in the node processes, which inherit them).
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 90 + 10))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


class NodeProcess:
    """The mace node in a child process, its output in a log file."""

    def __init__(self, log_path: str, params: dict[str, object] | None = None,
                 ros_args: list[str] | None = None, models_dir: str = MODELS_DIR,
                 params_files: tuple[str, ...] = (PARAMS_FILE,)):
        self.log_path = log_path
        cmd = [sys.executable, "-m", "mace_ros.node", "--ros-args"]
        for path in params_files:
            cmd += ["--params-file", path]
        cmd += ["-p", f"models_dir:={models_dir}"]
        for name, value in (params or {}).items():
            cmd += ["-p", f"{name}:={value}"]
        cmd += ros_args or []
        self.started = time.monotonic()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def log(self) -> str:
        """Everything the node printed so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for_log(self, text: str, timeout_s: float = NODE_START_TIMEOUT_S) -> bool:
        """Wait until the node has printed ``text``; False on timeout or exit."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and self.proc.poll() is None:
            if text in self.log():
                return True
            time.sleep(0.05)
        return text in self.log()

    def wait_exit(self, timeout_s: float) -> int | None:
        """Exit status, or None if still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGINT (like Ctrl-C), then SIGKILL after ``timeout_s``: the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            if self.wait_exit(timeout_s) is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_service(node: NodeProcess, client, timeout_s: float = NODE_START_TIMEOUT_S) -> None:
    """Wait until ``client``'s service is up; fail early if the node process exits."""
    while not client.wait(0.5):
        if node.proc.poll() is not None:
            pytest.fail(f"the mace node exited with status {node.proc.returncode}:\n{node.log()}")
        if time.monotonic() - node.started > timeout_s:
            node.stop()
            pytest.fail(f"the mace node offered no service within {timeout_s:.0f} s:\n"
                        f"{node.log()}")


def exit_results(nodes: dict[str, "NodeProcess"]) -> dict[str, tuple]:
    """Wait for nodes expected to fail at start: name -> (exit status, seconds, log)."""
    results = {}
    for name, node in nodes.items():
        status = node.wait_exit(60.0)
        results[name] = (status, time.monotonic() - node.started, node.log())
        node.stop()
    return results


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread in the test process: on a 2-core machine that also runs the node,
    more threads spin against each other (the node itself defaults to one, torch_threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rclpy_context():
    """rclpy initialised once for the test process."""
    import rclpy

    rclpy.init()
    yield
    rclpy.try_shutdown()


@pytest.fixture(scope="session")
def mace_node(rclpy_context, tmp_path_factory):
    """The node with config/panda.yaml and the shipped models, serving /mace/adapt_ik."""
    from mace_ros.client import MaceClient

    node = NodeProcess(str(tmp_path_factory.mktemp("mace_node") / "node.log"))
    probe = MaceClient(node_name="mace_test_probe")
    try:
        wait_for_service(node, probe)
    finally:
        probe.close()
    yield node
    status = node.stop()
    assert status == 0, f"the node did not shut down cleanly (status {status}):\n{node.log()}"


@pytest.fixture(scope="session")
def ik_client(mace_node):
    """A client of /mace/adapt_ik (its own ROS node and executor)."""
    from mace_ros.client import MaceClient

    client = MaceClient(node_name="mace_test_client")
    yield client
    client.close()
