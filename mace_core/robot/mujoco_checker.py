"""Exact collision checks in MuJoCo: the URDF's collision meshes against primitive obstacles.

:class:`MuJoCoCollisionChecker` implements :class:`.collision.ExactCollisionChecker` with the
conventions PyBullet's checker follows (:mod:`.collision`), so the two give the same verdicts:

- The model is the URDF the kinematics read, loaded by MuJoCo's own URDF parser; MuJoCo
  collides with each mesh's convex hull, as PyBullet does. PyBullet grows every hull by its
  1 mm collision margin (``PYBULLET_MESH_MARGIN``) and primitives not at all, so a link touches
  an obstacle when the hulls are within 1 mm, and two links when they are within 2 mm. Boxes
  and cylinders are the shapes PyBullet collides with: their edges and corners rounded by 1 mm
  (:func:`.collision.edge_rounding`), written as the primitive shrunk by the radius with the
  radius added to its contact threshold, so a hull near a corner keeps at least 0.27 mm.
- Distances near a threshold are ``mj_geomDistance``'s: ``mj_collision``'s mesh contacts
  overstate them by up to 0.3 mm there (which had called colliding configurations free), so a
  pair it reports beyond its threshold is measured again (:meth:`_remeasured_hit`). Those
  distances agree with the convex program of :mod:`.hull_distance` to 1e-4 mm; PyBullet's
  overstate the truth by up to 0.025 mm and never understated it (24,000 configurations
  bisected to the checker's boundary: none free where PyBullet collides, even with no
  margin). The checker still counts a contact ``safety_margin_m`` (0.03 mm) early, for the
  engines' tolerances: it never calls free what PyBullet calls colliding, and calls colliding
  at most 0.26 % of what PyBullet calls free on the benchmark's sets (the configurations
  PyBullet calls free by less than the margin or by its own error).
- Self-collision is checked for exactly :func:`.collision.self_collision_link_pairs`; the base
  link, welded to the world, never touches an obstacle.
- Obstacles are written into a pool of geoms on the world body (boxes, spheres, cylinders),
  built once: a request's scene costs microseconds, not a recompilation (0.1 s). Unused slots
  collide with nothing. The pool grows (one recompilation) when a scene needs more of a kind.
  Since the slots move, the world body's midphase tree, built at compile time, is turned off.

Importing ``mujoco`` happens when a checker is built, so the core runs without it.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from ..errors import InvalidRequestError, ModelLoadError
from .collision import PYBULLET_MESH_MARGIN, edge_rounding, joint_batch, self_collision_link_pairs
from .kinematics import PANDA_FINGERS, PANDA_JOINTS, URDFModel, panda_urdf_path
from .scenes import Obstacle, validate_obstacles

#: m, contacts are counted this much before PyBullet's margins (the engines' distance tolerance)
SAFETY_MARGIN_M = 3e-5
#: m, the distance within which MuJoCo reports contacts: above every threshold in use (2.1 mm)
#: by more than its contacts overstate distances there (0.3 mm seen); 2.5 and 4 mm timed alike
_DETECTION_MARGIN_M = 4e-3
_KINDS = ("box", "sphere", "cylinder")
#: bytes, the most arena a checker grows to when a configuration's contacts do not fit
_MAX_ARENA_BYTES = 1 << 30
#: where unused slots wait (far from everything, and colliding with nothing anyway)
_PARKED = (1e3, 1e3, -1e3)


def _mujoco():
    try:
        import mujoco
    except ImportError as exc:  # pragma: no cover - the package is in requirements.txt
        raise ModelLoadError("the MuJoCo collision backend needs the 'mujoco' package "
                             "(pip install mujoco)") from exc
    return mujoco


class MuJoCoCollisionChecker:
    """Exact collision checks of joint batches on the URDF's collision meshes, in MuJoCo (CPU).

    One configuration at a time through ``mj_kinematics`` and ``mj_collision`` (15 to 75 µs
    each on this machine's CPU); the obstacles are set with :meth:`set_obstacles` (or given
    when it is built) and stay until the next call.
    """

    def __init__(self, obstacles: Sequence[Obstacle] = (), urdf_path: str | None = None,
                 safety_margin_m: float = SAFETY_MARGIN_M, slots_per_kind: int = 16,
                 memory_bytes: int = -1):
        self._mj = _mujoco()
        #: bytes of MuJoCo's arena (contacts live there; -1: MuJoCo's default, about 14 MB)
        self._memory_bytes = int(memory_bytes)
        if not (0.0 <= safety_margin_m < 1e-3):
            raise InvalidRequestError(f"safety_margin_m must be in [0, 1 mm), got "
                                      f"{safety_margin_m!r}")
        self.safety_margin_m = safety_margin_m
        self.urdf_path = urdf_path or panda_urdf_path()
        with open(self.urdf_path) as f:
            self._urdf_text = f.read()
        self.urdf = URDFModel.from_text(self._urdf_text, os.path.dirname(self.urdf_path))
        self.lower = np.array([self.urdf.joints[n].lower for n in PANDA_JOINTS])
        self.upper = np.array([self.urdf.joints[n].upper for n in PANDA_JOINTS])
        children = {j.child for j in self.urdf.joints.values()}
        links = [n for n in self.urdf.links if n not in children] + [
            j.child for j in self.urdf.joints.values()]
        #: link pairs checked for self-collision
        self.link_pairs = self_collision_link_pairs(self.urdf, links)
        self._obstacles: tuple[Obstacle, ...] | None = None
        self._given: tuple[Obstacle, ...] | None = None  #: the tuple last set, as given
        self._build(max(1, int(slots_per_kind)))
        self.set_obstacles(obstacles)

    # -- the model ------------------------------------------------------------------------------

    def _build(self, slots_per_kind: int) -> None:
        """Compile the robot with ``slots_per_kind`` obstacle slots of each kind."""
        mj = self._mj
        folder = os.path.dirname(os.path.abspath(self.urdf_path))
        # MuJoCo's URDF parser reads its options from a <mujoco> element inside <robot>; the
        # meshes' package:// prefix names no package, so they are found relative to the URDF.
        options = (f'<mujoco><compiler meshdir="{folder}" fusestatic="false" '
                   'discardvisual="true" balanceinertia="true"/></mujoco>')
        text = self._urdf_text.replace("package://", "")
        text, found = re.subn(r"(<robot\b[^>]*>)", lambda m: m.group(1) + options, text, count=1)
        if not found:
            raise ModelLoadError(f"{self.urdf_path}: no <robot> element")
        try:
            spec = mj.MjSpec.from_string(text)
        except Exception as exc:  # noqa: BLE001 - MuJoCo raises ValueError or its own types
            raise ModelLoadError(f"MuJoCo cannot read {self.urdf_path}: {exc}") from exc
        robot_bodies = [b.name for b in spec.bodies if b.name != "world"]
        with_geometry = {b.name for b in spec.bodies if b.name != "world" and b.geoms}
        checked = {frozenset(p) for p in self.link_pairs}
        for i, a in enumerate(robot_bodies):
            for b in robot_bodies[i + 1:]:
                if a in with_geometry and b in with_geometry and frozenset((a, b)) not in checked:
                    spec.add_exclude(bodyname1=a, bodyname2=b)
        for geom in spec.geoms:
            geom.margin = _DETECTION_MARGIN_M
        world = spec.worldbody
        types = {"box": mj.mjtGeom.mjGEOM_BOX, "sphere": mj.mjtGeom.mjGEOM_SPHERE,
                 "cylinder": mj.mjtGeom.mjGEOM_CYLINDER}
        for kind in _KINDS:
            for k in range(slots_per_kind):
                # an off-identity pose, so the compiler keeps each slot's own frame
                # (colliding at compile time: discardvisual drops geoms that collide with
                # nothing; set_obstacles switches the unused ones off)
                world.add_geom(name=f"slot_{kind}_{k}", type=types[kind], size=[0.1, 0.1, 0.1],
                               pos=list(_PARKED), quat=[0.0, 1.0, 0.0, 0.0], margin=0.0)
        if self._memory_bytes > 0:
            spec.memory = self._memory_bytes
        try:
            model = spec.compile()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"MuJoCo cannot compile {self.urdf_path}: {exc}") from exc
        model.opt.disableflags |= (int(mj.mjtDisableBit.mjDSBL_FILTERPARENT)
                                   | int(mj.mjtDisableBit.mjDSBL_MIDPHASE))
        self.model, self.data = model, mj.MjData(model)
        self._fromto = np.zeros(6)  # mj_geomDistance's output of the nearest points (unused)
        self._contacts_full = int(mj.mjtWarning.mjWARN_CONTACTFULL)
        self.slots_per_kind = slots_per_kind
        self._slots = {kind: np.array([model.geom(f"slot_{kind}_{k}").id
                                       for k in range(slots_per_kind)]) for kind in _KINDS}
        self._slot_contype = (int(model.geom_contype[0]), int(model.geom_conaffinity[0]))
        self._qpos = np.array([model.jnt_qposadr[model.joint(n).id] for n in PANDA_JOINTS])
        first = int(self._qpos[0])  # a slice writes faster than an index array
        contiguous = np.array_equal(self._qpos, np.arange(first, first + len(self._qpos)))
        self._arm_qpos = slice(first, first + len(self._qpos)) if contiguous else self._qpos
        for name, value in PANDA_FINGERS.items():
            self.data.qpos[model.jnt_qposadr[model.joint(name).id]] = value
        # contact thresholds per geom pair: PyBullet's margins, less the safety margin
        obstacle = np.zeros(model.ngeom, dtype=bool)
        obstacle[np.concatenate(list(self._slots.values()))] = True
        self._obstacle_geom = obstacle
        #: the robot's geoms that obstacles can touch (all but the base, welded to the world)
        self._moving_geoms = np.flatnonzero(~obstacle & (model.body_weldid[model.geom_bodyid] > 0))
        margin = self.safety_margin_m
        self._threshold = np.where(obstacle[:, None] | obstacle[None, :],
                                   PYBULLET_MESH_MARGIN + margin,
                                   2 * PYBULLET_MESH_MARGIN + margin)
        #: m, (ngeom,) each slot's edge rounding (its geom is that much smaller)
        self._rounding = np.zeros(model.ngeom)
        self._obstacles = self._given = None
        self._clearance_plan: SimpleNamespace | None = None  # see _plan_clearance

    def set_obstacles(self, obstacles: Sequence[Obstacle]) -> None:
        """Write ``obstacles`` into the slot pool (nothing to do when they are the last ones).

        Raises:
            InvalidRequestError: an obstacle that fails :meth:`Obstacle.validate`.
        """
        if obstacles is self._given:  # the very tuple set last (a request's world, again)
            return
        key = tuple(obstacles)
        try:
            if key == self._obstacles:
                return
        except (TypeError, ValueError):  # fields given as arrays: compare no further
            pass
        validate_obstacles(key)
        counts = {kind: sum(o.kind == kind for o in key) for kind in _KINDS}
        if max(counts.values()) > self.slots_per_kind:
            self._build(max(2 * self.slots_per_kind, max(counts.values())))
        mj, model = self._mj, self.model
        for slot_ids in self._slots.values():
            model.geom_contype[slot_ids] = 0
            model.geom_conaffinity[slot_ids] = 0
            model.geom_pos[slot_ids] = _PARKED
        if key:  # every obstacle's slot and shape at once (one at a time: 20 us an obstacle)
            used = {kind: 0 for kind in _KINDS}
            ids = np.empty(len(key), dtype=int)
            for i, o in enumerate(key):
                ids[i] = self._slots[o.kind][used[o.kind]]
                used[o.kind] += 1
            kind = np.array([o.kind for o in key])
            half = np.array([o.half_extents for o in key], dtype=float)  # (n, 3)
            sphere, cylinder = kind == "sphere", kind == "cylinder"
            rounding = np.array([edge_rounding(k, h) for k, h in zip(kind, half)])
            self._rounding[ids] = rounding
            threshold = PYBULLET_MESH_MARGIN + self.safety_margin_m + rounding
            self._threshold[ids, :] = threshold[:, None]
            self._threshold[:, ids] = threshold[None, :]
            core = half - rounding[:, None]
            # MuJoCo's sizes: box half sizes, sphere (R, -, -), cylinder (R, height / 2, -)
            core[cylinder] = np.stack([core[cylinder, 0], core[cylinder, 2],
                                       np.zeros(int(cylinder.sum()))], axis=-1)
            model.geom_size[ids] = core
            model.geom_rbound[ids] = np.where(sphere, half[:, 0], np.linalg.norm(half, axis=1))
            model.geom_aabb[ids] = np.concatenate([np.zeros_like(half), half], axis=1)
            model.geom_pos[ids] = np.array([o.position for o in key], dtype=float)
            quat = np.zeros(4)
            for g, o in zip(ids.tolist(), key):
                mj.mju_mat2Quat(quat, np.asarray(o.rotation_matrix, dtype=float).reshape(-1))
                model.geom_quat[g] = quat
            model.geom_contype[ids], model.geom_conaffinity[ids] = self._slot_contype
        self._obstacles = key
        self._clearance_plan = None  # made again by the next clearance()
        try:  # a tuple of plain values cannot change: the next call may skip the comparison
            hash(key)
            self._given = obstacles if isinstance(obstacles, tuple) else None
        except TypeError:  # fields given as arrays (mutable): compare every time
            self._given = None

    # -- checks ---------------------------------------------------------------------------------

    def _run(self, q) -> np.ndarray:
        """``(B, 2)`` bool: (self-collision, obstacle collision) of each row of ``q``."""
        q = joint_batch(q, len(self._qpos))
        mj, model, data = self._mj, self.model, self.data
        out = np.zeros((q.shape[0], 2), dtype=bool)
        threshold, obstacle = self._threshold, self._obstacle_geom
        qpos, kinematics, collision = data.qpos, mj.mj_kinematics, mj.mj_collision
        arm = self._arm_qpos
        full = data.warning[self._contacts_full]
        dropped = int(full.number)
        for k in range(q.shape[0]):
            qpos[arm] = q[k]
            kinematics(model, data)
            try:
                collision(model, data)
            except mj.FatalError:  # its stack, which shares the arena, ran out
                return self._with_larger_arena(q)
            if full.number != dropped:  # contacts were dropped: no verdict of it is safe
                return self._with_larger_arena(q)
            n = data.ncon
            if n == 0:
                continue
            contact = data.contact
            geom = contact.geom[:n]
            limit = threshold[geom[:, 0], geom[:, 1]]
            dist = contact.dist[:n]
            world = obstacle[geom[:, 0]] | obstacle[geom[:, 1]]
            hit = dist <= limit
            for part, rows in ((0, ~world), (1, world)):
                if (hit & rows).any():
                    out[k, part] = True
                elif rows.any():
                    out[k, part] = self._remeasured_hit(geom[rows], limit[rows])
        return out

    def _with_larger_arena(self, q: np.ndarray) -> np.ndarray:
        """Rebuild with twice the arena (contacts and MuJoCo's stack live there) and check
        ``q`` again: :meth:`_run`'s answer when a configuration's contacts did not fit."""
        if self.model.narena >= _MAX_ARENA_BYTES:
            raise RuntimeError(f"MuJoCo: the contacts of a configuration need more than "
                               f"{_MAX_ARENA_BYTES >> 20} MB")
        obstacles = self._obstacles or ()
        self._memory_bytes = 2 * int(self.model.narena)
        self._build(self.slots_per_kind)
        self.set_obstacles(obstacles)
        return self._run(q)

    def _place(self, q: np.ndarray) -> None:
        """Pose the CPU model's links at one configuration ``q (7,)``."""
        self.data.qpos[self._arm_qpos] = q
        self._mj.mj_kinematics(self.model, self.data)

    def _remeasured_hit(self, geom: np.ndarray, limit: np.ndarray) -> bool:
        """Whether a pair of ``geom (C, 2)`` is within its ``limit (C,)`` by
        ``mj_geomDistance`` (GJK to ``ccd_tolerance``: within 1e-4 mm of the convex program of
        :mod:`.hull_distance`), at the configuration the CPU model was last posed in.

        A contact's ``dist`` is that of two points on the shapes, so never below their
        distance, but ``mj_collision``'s mesh contacts overstate it by up to 0.3 mm near the
        margins (measured: a hand 1.80 mm from a shelf reported at 2.11 mm, two links 1.98 mm
        apart at 2.18 mm, both colliding for PyBullet): every pair it reports within the
        detection margin but beyond its limit is measured again."""
        mj, model, data, fromto = self._mj, self.model, self.data, self._fromto
        seen = set()
        for (a, b), lim in zip(geom.tolist(), limit.tolist()):
            if (a, b) in seen:
                continue
            seen.add((a, b))
            if mj.mj_geomDistance(model, data, a, b, lim + 1e-4, fromto) <= lim:
                return True
        return False

    def within_limits(self, q) -> np.ndarray:
        """``(B,)`` bool: every joint inside the URDF limits."""
        q = joint_batch(q, len(self._qpos))
        return ((q >= self.lower) & (q <= self.upper)).all(1)

    def self_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some checked link pair within 2 mm (+ the safety margin)."""
        return self._run(q)[:, 0]

    def world_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some link other than the base within 1 mm (+ the safety margin) of an
        obstacle."""
        return self._run(q)[:, 1]

    def collisions(self, q) -> np.ndarray:
        """``(B, 2)`` bool: columns (self collision, world collision)."""
        return self._run(q)

    def valid(self, q) -> np.ndarray:
        """``(B,)`` bool: within joint limits, no self-collision, no obstacle collision."""
        return self.within_limits(q) & ~self._run(q).any(1)

    def clearance(self, q, reach_m: float = 1.0) -> np.ndarray:
        """``(B,)`` m: the smallest distance from a link (the base excepted) to an obstacle, as
        PyBullet measures it (the hulls grown by its 1 mm margin); ``reach_m`` where nothing is
        nearer, negative where they overlap."""
        q = joint_batch(q, len(self._qpos))
        out = np.full(q.shape[0], reach_m)
        plan = self._clearance_plan or self._plan_clearance()
        if plan.slot_ids == []:
            return out
        mj, model, data = self._mj, self.model, self.data
        moving = self._moving_geoms
        centres = np.empty((q.shape[0], moving.size, 3))  # (B, G, 3) link hulls' centres
        for k in range(q.shape[0]):
            self._place(q[k])
            centres[k] = data.geom_xpos[moving]
        # pairs in order of a lower bound of their distance: from the link's bounding sphere to
        # the obstacle's box (a floor's bounding sphere would be useless); once it passes the
        # nearest distance found, no later pair can be nearer
        offset = centres[:, :, None] - plan.centre[None, None]  # (B, G, S, 3)
        local = np.einsum("skj,bgsk->bgsj", plan.rot, offset)
        gaps = np.linalg.norm(np.maximum(np.abs(local) - plan.half, 0.0), axis=-1) - plan.rbound
        gaps = gaps.reshape(q.shape[0], -1)
        order = np.argsort(gaps, axis=1)  # (B, G * S)
        fromto, distance, count = self._fromto, mj.mj_geomDistance, len(plan.slot_ids)
        moving_ids, slot_ids, rounded = plan.moving_ids, plan.slot_ids, plan.rounded
        for k in range(q.shape[0]):
            self._place(q[k])
            gap = gaps[k].tolist()
            best = reach_m + PYBULLET_MESH_MARGIN
            for flat in order[k].tolist():
                if gap[flat] >= best:
                    break
                i, j = divmod(flat, count)
                rounding = rounded[j]  # the geom is the shape shrunk by this
                best = min(best, distance(model, data, moving_ids[i], slot_ids[j],
                                          best + rounding, fromto) - rounding)
            out[k] = min(reach_m, best - PYBULLET_MESH_MARGIN)
        return out

    def _plan_clearance(self) -> SimpleNamespace:
        """What :meth:`clearance` reads of the obstacles in place, made once per set of them
        (they sit on the world body: their poses are the same in every configuration): the
        slots in use (``slot_ids``, their ``rounded`` edges), each one's box (``half (S, 3)``,
        ``centre (S, 3)``, world-from-obstacle ``rot (S, 3, 3)``), the link hulls' bounding
        balls ``rbound (1, G, 1)`` and geom ids (``moving_ids``); the pairs' fields as Python
        numbers, the loop reads a few of them per pair."""
        model, data = self.model, self.data
        slots = np.flatnonzero(self._obstacle_geom & (model.geom_contype > 0))
        if slots.size:
            self._place(np.zeros(len(self._qpos)))  # poses the obstacles' geoms too
        moving = self._moving_geoms
        self._clearance_plan = SimpleNamespace(
            slot_ids=slots.tolist(), rounded=self._rounding[slots].tolist(),
            half=model.geom_aabb[slots, 3:], centre=data.geom_xpos[slots].copy(),
            rot=data.geom_xmat[slots].reshape(-1, 3, 3).copy(),
            rbound=model.geom_rbound[moving][None, :, None], moving_ids=moving.tolist())
        return self._clearance_plan

    def close(self) -> None:
        """Nothing to release (the model is freed with the checker); for the interface."""

    def __enter__(self) -> "MuJoCoCollisionChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
