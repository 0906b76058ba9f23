"""Exact collision checks in PyBullet: the ground truth of the benchmarks and tests.

:class:`PyBulletCollisionChecker` implements :class:`.collision.ExactCollisionChecker` on the
URDF's collision meshes (convex hulls grown by the 1 mm margin) in a private DIRECT client.
"""

from __future__ import annotations

import os
from itertools import combinations
from typing import Sequence

import numpy as np

from ..errors import ModelLoadError
from .collision import joint_batch, self_collision_link_pairs
from .kinematics import PANDA_FINGERS, PANDA_JOINTS, URDFModel, panda_urdf_path
from .rotations import matrix_to_quaternion_xyzw
from .scenes import Obstacle, validate_obstacles


class PyBulletCollisionChecker:
    """Exact collision checks on the URDF's collision meshes in a private PyBullet client.

    Contact is ``getClosestPoints(..., distance=0)`` returning a point with distance <= 0 for a
    checked pair (a stateless query). With ``screen=True`` (default) one
    ``performCollisionDetection`` per configuration first lists the candidate pairs (broadphase +
    narrowphase, contacts closer than ``screen_tolerance``) and only those are confirmed with
    ``getClosestPoints``: the same answer as ``screen=False`` (every pair queried), several times
    faster. The client is owned by the process that built the checker; call :meth:`close`
    (or use it as a context manager) when done. Not safe to share across a ``fork``.
    """

    def __init__(self, obstacles: Sequence[Obstacle] = (), urdf_path: str | None = None,
                 screen: bool = True, screen_tolerance: float = 1e-3):
        import pybullet as p  # imported here: the module prints its build time on import

        self._p = p
        self.screen = screen
        self.screen_tolerance = screen_tolerance
        urdf_path = urdf_path or panda_urdf_path()
        with open(urdf_path) as f:
            self.urdf = URDFModel.from_text(f.read(), os.path.dirname(urdf_path))
        validate_obstacles(obstacles)
        self.obstacles = tuple(obstacles)  #: the obstacles checked against (set_obstacles)
        self.client = p.connect(p.DIRECT)
        if self.client < 0:
            raise ModelLoadError("cannot start a PyBullet DIRECT client")
        cid = self.client
        self.robot = p.loadURDF(urdf_path, useFixedBase=True, flags=p.URDF_USE_SELF_COLLISION,
                                physicsClientId=cid)
        children = {j.child for j in self.urdf.joints.values()}
        base = next(name for name in self.urdf.links if name not in children)
        link_index = {base: -1}
        joint_index = {}
        self.lower, self.upper = np.zeros(len(PANDA_JOINTS)), np.zeros(len(PANDA_JOINTS))
        for i in range(p.getNumJoints(self.robot, physicsClientId=cid)):
            info = p.getJointInfo(self.robot, i, physicsClientId=cid)
            joint_index[info[1].decode()] = i
            link_index[info[12].decode()] = i
        self._joints = [joint_index[name] for name in PANDA_JOINTS]
        for k, name in enumerate(PANDA_JOINTS):
            self.lower[k] = self.urdf.joints[name].lower
            self.upper[k] = self.urdf.joints[name].upper
        for name, value in PANDA_FINGERS.items():
            p.resetJointState(self.robot, joint_index[name], value, physicsClientId=cid)
        self.link_index = link_index  #: link name -> PyBullet link index (base -1)
        pairs = self_collision_link_pairs(self.urdf, list(link_index))
        self._pairs = [(link_index[a], link_index[b]) for a, b in pairs]
        self._pair_set = {frozenset(pr) for pr in self._pairs}
        self.link_pairs = pairs  #: link pairs checked for self-collision
        # Excluded pairs are filtered out of the screening pass as well.
        geometric = [link_index[n] for n in link_index if self.urdf.collisions.get(n)]
        for a, b in combinations(geometric, 2):
            if frozenset((a, b)) not in self._pair_set:
                p.setCollisionFilterPair(self.robot, self.robot, a, b, 0, physicsClientId=cid)
        self._bodies: list[int] = []  #: a fixed body per obstacle
        self._add_bodies()
        self._moving = [i for i in geometric if i != -1]

    def set_obstacles(self, obstacles: Sequence[Obstacle]) -> None:
        """Check against ``obstacles`` from now on: their bodies replace the last ones in the
        same client (a new checker loads the robot's meshes again: 0.1 s and 90 MB).

        Raises:
            InvalidRequestError: an obstacle fails :meth:`Obstacle.validate`.
        """
        validate_obstacles(obstacles)
        for body in self._bodies:  # (their shapes stay: PyBullet refuses to remove those)
            self._p.removeBody(body, physicsClientId=self.client)
        self.obstacles = tuple(obstacles)
        self._add_bodies()

    def _add_bodies(self) -> None:
        """A fixed body per obstacle of :attr:`obstacles`, never colliding with the base link."""
        p, cid = self._p, self.client
        self._bodies = []
        for o in self.obstacles:
            if o.kind == "box":
                shape = p.createCollisionShape(p.GEOM_BOX, halfExtents=[s / 2 for s in o.size],
                                               physicsClientId=cid)
            elif o.kind == "sphere":
                shape = p.createCollisionShape(p.GEOM_SPHERE, radius=o.size[0],
                                               physicsClientId=cid)
            else:
                shape = p.createCollisionShape(p.GEOM_CYLINDER, height=o.size[0],
                                               radius=o.size[1], physicsClientId=cid)
            body = p.createMultiBody(0, shape, basePosition=list(o.position),
                                     baseOrientation=matrix_to_quaternion_xyzw(
                                         o.rotation_matrix), physicsClientId=cid)
            # The base link never collides with obstacles.
            p.setCollisionFilterPair(self.robot, body, -1, -1, 0, physicsClientId=cid)
            self._bodies.append(body)
        self._body_set = set(self._bodies)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect the private client (idempotent)."""
        if self.client is not None and self.client >= 0:
            try:
                self._p.disconnect(physicsClientId=self.client)
            except self._p.error:
                pass
        self.client = None

    def __enter__(self) -> "PyBulletCollisionChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- one configuration ----------------------------------------------------------------------
    def _set(self, q: np.ndarray) -> None:
        self._p.resetJointStatesMultiDof(self.robot, self._joints, [[float(v)] for v in q],
                                         physicsClientId=self.client)

    def _touch(self, body_b: int, link_a: int, link_b: int | None) -> bool:
        p = self._p
        if link_b is None:
            pts = p.getClosestPoints(self.robot, body_b, 0.0, linkIndexA=link_a,
                                     physicsClientId=self.client)
        else:
            pts = p.getClosestPoints(self.robot, body_b, 0.0, linkIndexA=link_a,
                                     linkIndexB=link_b, physicsClientId=self.client)
        return any(pt[8] <= 0.0 for pt in pts)

    def _check(self, want_self: bool, want_world: bool) -> tuple[bool, bool]:
        """(self collision, world collision) of the configuration currently set."""
        if not self.screen:
            hit_self = want_self and any(self._touch(self.robot, a, b) for a, b in self._pairs)
            hit_world = want_world and any(self._touch(body, link, None)
                                           for body in self._bodies for link in self._moving)
            return hit_self, hit_world
        p, cid, robot = self._p, self.client, self.robot
        p.performCollisionDetection(physicsClientId=cid)
        self_cands, world_cands = set(), set()
        for pt in p.getContactPoints(bodyA=robot, physicsClientId=cid):
            if pt[8] > self.screen_tolerance:
                continue
            body_a, body_b, link_a, link_b = pt[1], pt[2], pt[3], pt[4]
            if body_a == robot and body_b == robot:
                pair = (min(link_a, link_b), max(link_a, link_b))
                if frozenset(pair) in self._pair_set:
                    self_cands.add(pair)
            else:
                link, body = (link_a, body_b) if body_a == robot else (link_b, body_a)
                if link != -1 and body in self._body_set:
                    world_cands.add((body, link))
        hit_self = want_self and any(self._touch(robot, a, b) for a, b in sorted(self_cands))
        hit_world = want_world and any(self._touch(body, link, None)
                                       for body, link in sorted(world_cands))
        return hit_self, hit_world

    # -- batches --------------------------------------------------------------------------------
    def _run(self, q, want_self: bool, want_world: bool) -> np.ndarray:
        q = joint_batch(q, len(self._joints))
        out = np.zeros((q.shape[0], 2), dtype=bool)
        for k in range(q.shape[0]):
            self._set(q[k])
            out[k] = self._check(want_self, want_world)
        return out

    def within_limits(self, q) -> np.ndarray:
        """``(B,)`` bool: every joint inside the URDF limits."""
        q = joint_batch(q, len(self._joints))
        return ((q >= self.lower) & (q <= self.upper)).all(1)

    def self_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some non-adjacent link pair in contact. ``q``: numpy or torch (B, 7)."""
        return self._run(q, True, False)[:, 0]

    def world_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some link other than the base in contact with an obstacle."""
        return self._run(q, False, True)[:, 1]

    def collisions(self, q) -> np.ndarray:
        """``(B, 2)`` bool: columns (self collision, world collision)."""
        return self._run(q, True, True)

    def valid(self, q) -> np.ndarray:
        """``(B,)`` bool: within joint limits, no self-collision, no obstacle collision."""
        return self.within_limits(q) & ~self.collisions(q).any(1)

    def clearance(self, q, reach_m: float = 1.0) -> np.ndarray:
        """``(B,)`` m: the smallest distance PyBullet reports (its 1 mm mesh margin included)
        from a link other than the base to an obstacle, looked for within ``reach_m``
        (``reach_m`` where nothing is nearer)."""
        q = joint_batch(q, len(self._joints))
        p, out = self._p, np.full(q.shape[0], float(reach_m))
        for k in range(q.shape[0]):
            self._set(q[k])
            for body in self._bodies:
                for link in self._moving:
                    pts = p.getClosestPoints(self.robot, body, reach_m, linkIndexA=link,
                                             physicsClientId=self.client)
                    out[k] = min([out[k]] + [pt[8] for pt in pts])
        return out


def exact_self_collision_free(q, checker: PyBulletCollisionChecker | None = None) -> np.ndarray:
    """``(B,)`` bool: PyBullet calls the configurations ``(B, 7)`` free of self-collision.

    Joint limits are not checked. Builds (and closes) an obstacle-free checker unless one is
    given; pass one to amortize its start-up (~50 ms) over many calls.
    """
    if checker is not None:
        return ~checker.self_collision(q)
    with PyBulletCollisionChecker() as own:
        return ~own.self_collision(q)
