"""Exact collision checks batched over configurations in MuJoCo Warp (MJWarp): one world each.

:class:`MJWarpCollisionChecker` is :class:`.mujoco_checker.MuJoCoCollisionChecker` (the same
model, slot pool, link-pair rules, PyBullet margins and safety margin) with its batch step,
``mj_kinematics`` + ``mj_collision`` per configuration, replaced by MJWarp's kernels over
``nworld`` = batch worlds at once, on CUDA (the role IsaacGym plays in the paper) or on Warp's
CPU device (2-5x slower than the sphere model there: a check of correctness, not a speed-up).
The single-configuration queries (:meth:`clearance`) stay on MuJoCo's CPU model.

What MJWarp needs, and why:

- It has no midphase and refuses a model with the midphase flag, and it filters geom pairs
  when the model is put on the device: it gets a copy with the flag cleared and every slot
  collidable. Unused slots are parked far from everything instead (they then meet nothing).
- A world body's geoms are placed once, when the data is made: each scene's slot poses are
  written into ``geom_xpos``/``geom_xmat`` of every world.
- Contacts share one buffer of ``contacts_per_world`` x ``nworld``; a batch that overflows it
  would silently drop contacts (and call colliding configurations free), so it is checked, the
  buffer doubled and the batch run again.
- A batch runs in ``nworld`` = the next power of two (one data per size, made once).
- Kernels compile on first use (about 18 s; Warp caches them on disk): the checker runs one
  batch when it is built.

Importing ``warp`` and ``mujoco_warp`` happens when a checker is built (``requirements-gpu.txt``).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from ..errors import ModelLoadError
from .collision import joint_batch
from .mujoco_checker import SAFETY_MARGIN_M, MuJoCoCollisionChecker
from .scenes import Obstacle

#: contacts allocated per world (at most 37 seen in a world of the benchmark's sets)
CONTACTS_PER_WORLD = 64
#: contacts a world may need before a batch is refused (the buffer doubles up to this)
_MAX_CONTACTS_PER_WORLD = 4096


def _mjwarp():
    try:
        import warp
        warp.config.quiet = True  # no banner when Warp initializes
        warp.config.log_level = warp.LOG_WARNING  # no line per kernel module loaded
        import mujoco_warp
    except ImportError as exc:
        raise ModelLoadError(
            "collision backend 'mjwarp' needs the 'mujoco-warp' package "
            "(pip install -r requirements-gpu.txt; its wheels need a CUDA 13 driver for the GPU)"
        ) from exc
    return warp, mujoco_warp


class MJWarpCollisionChecker(MuJoCoCollisionChecker):
    """Exact collision checks of joint batches in MJWarp, ``max_worlds`` configurations a launch.

    Args:
        device: Warp's device name, ``"cuda"``, ``"cuda:0"`` or ``"cpu"``.
        max_worlds: the largest batch run at once (larger ones are split).
    """

    def __init__(self, obstacles: Sequence[Obstacle] = (), urdf_path: str | None = None,
                 safety_margin_m: float = SAFETY_MARGIN_M, slots_per_kind: int = 16,
                 device: str = "cuda", max_worlds: int = 8192,
                 contacts_per_world: int = CONTACTS_PER_WORLD):
        self._wp, self._mjw = _mjwarp()
        try:
            self.device = self._wp.get_device(device)
        except Exception as exc:  # noqa: BLE001 - Warp raises RuntimeError or ValueError
            raise ModelLoadError(f"Warp has no device {device!r}: {exc}") from exc
        self.max_worlds = max(1, int(max_worlds))
        self.contacts_per_world = int(contacts_per_world)
        self._warp_model = None
        self._worlds: dict[int, object] = {}  # world count -> MJWarp data of that many worlds
        self._host_qpos: dict[int, np.ndarray] = {}  # world count -> (worlds, nq) float32
        self._placed: dict[int, tuple] = {}  # world count -> the obstacles its slots hold
        super().__init__(obstacles, urdf_path, safety_margin_m, slots_per_kind)
        self._run(np.zeros((1, len(self._qpos))))  # compile (or load) the kernels now

    # -- the model on the device ----------------------------------------------------------------

    def _build(self, slots_per_kind: int) -> None:
        """Compile the CPU model (the parent's) and put a copy of it on the device."""
        super()._build(slots_per_kind)
        mj = self._mj
        model = copy.copy(self.model)
        model.opt.disableflags &= ~int(mj.mjtDisableBit.mjDSBL_MIDPHASE)
        slots = np.concatenate(list(self._slots.values()))
        model.geom_contype[slots], model.geom_conaffinity[slots] = self._slot_contype
        with self._wp.ScopedDevice(self.device):
            self._warp_model = self._mjw.put_model(model)
        self._worlds, self._placed, self._host_qpos = {}, {}, {}
        self._slot_ids = slots

    def set_obstacles(self, obstacles: Sequence[Obstacle]) -> None:
        """Write ``obstacles`` into the slot pool: the CPU model's (the parent's) and then the
        device model's shapes; the worlds' slot poses follow at the next batch."""
        before = self._obstacles
        super().set_obstacles(obstacles)
        if self._obstacles is before or self._warp_model is None:
            return
        m, wm = self.model, self._warp_model
        for field in ("geom_size", "geom_pos", "geom_quat", "geom_rbound", "geom_aabb"):
            target = getattr(wm, field)
            value = np.asarray(getattr(m, field), dtype=np.float32)
            shape = target.shape if value.size == np.prod(target.shape) else target.shape + (-1,)
            target.assign(value.reshape(shape))

    def _data(self, worlds: int):
        """MJWarp data of ``worlds`` worlds with this scene's slot poses, made once per size."""
        wp, mjw = self._wp, self._mjw
        data = self._worlds.get(worlds)
        if data is None:
            with wp.ScopedDevice(self.device):
                data = mjw.make_data(self.model, nworld=worlds,
                                     nconmax=self.contacts_per_world)
            qpos = np.tile(np.asarray(self.data.qpos, dtype=np.float32), (worlds, 1))
            data.qpos.assign(qpos)  # the fingers' joints keep their values from here on
            self._worlds[worlds] = data
            self._host_qpos[worlds] = qpos  # each batch rewrites the arm's columns
        if self._placed.get(worlds) != self._obstacles:
            # the CPU model's slot poses (parked ones included), in every world
            mj, m, d = self._mj, self.model, self.data
            mj.mj_kinematics(m, d)
            slots = self._slot_ids
            for field, value in (("geom_xpos", d.geom_xpos[slots]),
                                 ("geom_xmat", d.geom_xmat[slots])):
                array = getattr(data, field)
                host = array.numpy()
                host[:, slots] = np.asarray(value, dtype=np.float32).reshape(
                    (len(slots),) + host.shape[2:])
                array.assign(host)
            self._placed[worlds] = self._obstacles
        return data

    # -- checks ---------------------------------------------------------------------------------

    def _run(self, q) -> np.ndarray:
        """``(B, 2)`` bool: (self-collision, obstacle collision) of each row of ``q``."""
        q = joint_batch(q, len(self._qpos))
        out = np.zeros((q.shape[0], 2), dtype=bool)
        for start in range(0, q.shape[0], self.max_worlds):
            out[start:start + self.max_worlds] = self._run_chunk(q[start:start + self.max_worlds])
        return out

    def _run_chunk(self, q: np.ndarray) -> np.ndarray:
        """:meth:`_run` for at most ``max_worlds`` rows, in ``nworld`` = the next power of two
        (the padding worlds repeat row 0); on a contact-buffer overflow the buffer doubles and
        the batch is run again."""
        wp, mjw = self._wp, self._mjw
        b = q.shape[0]
        worlds = 1 << max(0, b - 1).bit_length()
        while True:
            data = self._data(worlds)
            qpos = self._host_qpos[worlds]
            qpos[:b, self._arm_qpos] = q
            qpos[b:, self._arm_qpos] = q[0]
            with wp.ScopedDevice(self.device):
                data.qpos.assign(qpos)
                mjw.kinematics(self._warp_model, data)
                mjw.collision(self._warp_model, data)
                n = int(data.nacon.numpy()[0])
            if n <= data.naconmax:
                break
            # dropped contacts: never trust this batch
            if self.contacts_per_world >= _MAX_CONTACTS_PER_WORLD:
                raise RuntimeError(f"MJWarp: {n} contacts in {worlds} worlds, more than "
                                   f"{_MAX_CONTACTS_PER_WORLD} a world")
            self.contacts_per_world *= 2
            self._worlds, self._placed, self._host_qpos = {}, {}, {}
        dist = data.contact.dist.numpy()[:n]
        geom = data.contact.geom.numpy()[:n]
        world = data.contact.worldid.numpy()[:n]
        limit = self._threshold[geom[:, 0], geom[:, 1]]
        hit = (dist <= limit) & (world < b)
        obstacle = self._obstacle_geom[geom[:, 0]] | self._obstacle_geom[geom[:, 1]]
        out = np.zeros((b, 2), dtype=bool)
        out[world[hit & ~obstacle], 0] = True
        out[world[hit & obstacle], 1] = True
        # contacts beyond their limit may overstate the distance (see _remeasured_hit): where
        # a part has no hit, its pairs are measured again on the CPU model (per world: MJWarp
        # has no batched distance query)
        beyond = ~hit & (world < b)
        part = obstacle.astype(np.int64)
        for w, p in sorted(set(zip(world[beyond].tolist(), part[beyond].tolist()))):
            if not out[w, p]:
                rows = beyond & (world == w) & (part == p)
                self._place(q[w])
                out[w, p] = self._remeasured_hit(geom[rows], limit[rows])
        return out
