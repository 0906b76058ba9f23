"""A small Python API and CLI for the mace node's ``/mace/adapt_ik``.

    client = MaceClient()                      # after rclpy.init()
    response = client.adapt_ik([0.55, 0.0, 0.12], scene="config/scenes/box.yaml", num_solutions=4)

    mace-client ik --scene config/scenes/box.yaml --target 0.55 0 0.12 -k 8
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.utilities import remove_ros_args

from mace_core.errors import MaceError
from mace_core.ik import IKRequest
from mace_core.scenes import Obstacle, load_scene, quaternion_xyzw_to_matrix
from mace_ros.conversions import BASE_FRAME, ik_request_to_msg
from mace_ros.srv import AdaptIK

#: Seconds a call may wait beyond its time budget (queueing behind other requests, transport).
CALL_MARGIN_S = 30.0


class MaceClient:
    """Calls ``/mace/adapt_ik`` from its own node and executor (safe to use one per thread).

    Call :func:`rclpy.init` first; :meth:`close` destroys the node.
    """

    def __init__(self, service: str = "/mace/adapt_ik", node_name: str = "mace_client",
                 base_frame: str = BASE_FRAME):
        self.node = Node(node_name)
        self.base_frame = base_frame
        self._client = self.node.create_client(AdaptIK, service)
        self._executor = SingleThreadedExecutor(context=self.node.context)
        self._executor.add_node(self.node)

    def wait(self, timeout_s: float = 30.0) -> bool:
        """True once the service is available (False after ``timeout_s``)."""
        return self._client.wait_for_service(timeout_sec=timeout_s)

    def call(self, request: AdaptIK.Request, timeout_s: float) -> AdaptIK.Response:
        """Send a ready-made request and wait for its response.

        Waits for the service first: a request sent before the server is discovered is lost.

        Raises:
            TimeoutError: no service, or no response within ``timeout_s``.
        """
        if not self._client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"{self._client.srv_name} is not available (is the node running, "
                               f"with the same ROS_DOMAIN_ID?)")
        future = self._client.call_async(request)
        self._executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if not future.done():
            self._client.remove_pending_request(future)
            raise TimeoutError(f"no response from {self._client.srv_name} in {timeout_s:.0f} s")
        return future.result()

    def adapt_ik(self, position: Sequence[float], obstacles: Sequence[Obstacle] = (),
                 scene: str | None = None, rotation: np.ndarray | None = None,
                 num_solutions: int = 8, time_budget_s: float = 1.0,
                 **overrides) -> AdaptIK.Response:
        """Ask for ``num_solutions`` configurations reaching ``position`` (base frame, m).

        Args:
            position: (3,) target of the end effector.
            obstacles: obstacles in the base frame; a ``scene`` file's obstacles are added.
            scene: path of a scene YAML (``config/scenes/*.yaml``).
            rotation: (3, 3) target orientation, or None for position-only.
            num_solutions: K.
            time_budget_s: wall-clock budget of the request, s.
            **overrides: other :class:`~mace_core.ik.IKRequest` fields (iterations, refinement,
                objective, num_samples, quantile, gradient_steps, learning_rate, seed,
                orientation_tolerance).
        """
        obstacles = list(obstacles) + (list(load_scene(scene).obstacles) if scene else [])
        request = IKRequest(position=np.asarray(position, dtype=float), obstacles=obstacles,
                            rotation=rotation, num_solutions=num_solutions,
                            time_budget_s=time_budget_s, **overrides)
        return self.call(ik_request_to_msg(request, self.base_frame),
                         timeout_s=time_budget_s + CALL_MARGIN_S)

    def close(self) -> None:
        """Destroy the client's node."""
        self._executor.shutdown()
        self.node.destroy_node()


def format_solutions(response: AdaptIK.Response) -> str:
    """A text table of a response: one row per solution, then the stage timings."""
    lines = [f"success: {response.success}  message: {response.message}"]
    if not response.solutions:
        return lines[0]
    lines.append(f"{'#':>2} {'free':>5} {'pos err mm':>10} {'rot err deg':>11}  joints (rad)")
    for i, sol in enumerate(response.solutions):
        joints = " ".join(f"{v:+.3f}" for v in sol.positions)
        lines.append(f"{i + 1:>2} {str(sol.collision_free):>5} "
                     f"{sol.position_error * 1e3:>10.4f} "
                     f"{np.degrees(sol.orientation_error):>11.3f}  {joints}")
    lines.append(
        f"valid fraction: prior {response.valid_fraction_prior:.3f} -> adapted "
        f"{response.valid_fraction_adapted:.3f} ({response.iterations_run} MACE iterations)")
    lines.append(f"{'stage':<11} {'ms':>7}")
    for stage in ("sampling", "adaptation", "refinement", "total"):
        lines.append(f"{stage:<11} {getattr(response, stage + '_time') * 1e3:>7.1f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ik = sub.add_parser("ik", help="call /mace/adapt_ik and print the solutions")
    ik.add_argument("--scene", help="scene YAML: its obstacles (and its targets' centre)")
    ik.add_argument("--target", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help="end-effector target in panda_link0, m (default: the scene's centre)")
    ik.add_argument("--orientation", type=float, nargs=4, metavar=("QX", "QY", "QZ", "QW"),
                    help="target orientation (x, y, z, w); default: position-only")
    ik.add_argument("--orientation-tolerance", type=float, default=0.0, help="rad")
    ik.add_argument("-k", "--num-solutions", type=int, default=8)
    ik.add_argument("--time-budget", type=float, default=1.0, help="s")
    ik.add_argument("--iterations", type=int, help="MACE iterations T (0: prior only)")
    ik.add_argument("--refinement", choices=("none", "dls", "tracik", "moveit"))
    ik.add_argument("--seed", type=int)
    ik.add_argument("--service", default="/mace/adapt_ik")
    ik.add_argument("--wait", type=float, default=10.0, help="s to wait for the service")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mace-client ik ...``: exit status 0 on success, 1 on a failed request, 2 otherwise."""
    argv = sys.argv if argv is None else argv
    args = _parser().parse_args(remove_ros_args(argv)[1:])
    try:
        scene = load_scene(args.scene) if args.scene else None
        if args.target is None and scene is None:
            print("mace-client: give --target or --scene", file=sys.stderr)
            return 2
        target = args.target if args.target is not None else (
            (np.asarray(scene.targets.min) + np.asarray(scene.targets.max)) / 2.0)
        rotation = (None if args.orientation is None
                    else np.asarray(quaternion_xyzw_to_matrix(args.orientation)))
    except MaceError as exc:
        print(f"mace-client: {exc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("iterations", args.iterations),
                                   ("refinement", args.refinement), ("seed", args.seed))
                 if v is not None}
    rclpy.init(args=argv)
    client = MaceClient(args.service)
    try:
        if not client.wait(args.wait):
            print(f"mace-client: {args.service} is not available (is the node running, "
                  f"with the same ROS_DOMAIN_ID?)", file=sys.stderr)
            return 2
        response = client.adapt_ik(
            target, obstacles=scene.obstacles if scene else (), rotation=rotation,
            orientation_tolerance=args.orientation_tolerance, num_solutions=args.num_solutions,
            time_budget_s=args.time_budget, **overrides)
        print(format_solutions(response))
        return 0 if response.success else 1
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"mace-client: {exc or 'interrupted'}", file=sys.stderr)
        return 2
    finally:
        client.close()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
