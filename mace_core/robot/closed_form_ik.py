"""Closed-form inverse kinematics of the Franka Panda: every solution of a hand pose, given q7.

The Panda has one redundant joint. Following the geometric construction of He & Liu ("Analytical
Inverse Kinematics for Franka Emika Panda - a Geometrical Solver for 7-DOF Manipulators with
Unconventional Design", ICCMA 2021), the last joint q7 is the free parameter: with it the pose of
frame 6 is known, and q1..q6 follow from the planar "elbow" triangle that the shoulder (joint 2's
origin), the elbow (joint 4's) and the wrist (joints 5 and 6's) span. This module derives the
construction for the chain of ``franka_panda/panda.urdf`` (modified DH, lengths in m):

- d1 = 0.333 (shoulder height), d3 = 0.316, a4 = 0.0825, a5 = -0.0825, d5 = 0.384, a7 = 0.088.
- The shoulder O2, the elbow O4 and the wrist O6 lie in the plane normal to joint 4's axis z4,
  |O2 O4| = L24 = hypot(d3, a4) and |O4 O6| = L46 = hypot(d5, a4): |O2 O6| fixes the angle at O4.
- Joint 5's axis z5 lies in that plane, perpendicular to joint 6's axis, z5 = sin q6 x6 + cos q6 y6
  in frame 6, and makes a fixed angle with O6 O4. O2 lies on either side of the line O6 O4 (the two
  elbow branches: the published arccos gives one of them, q4 <= -0.4664 rad; its mirror the
  straighter elbows), and for each the condition on z5 has two solutions q6. With q6, z5 and z4
  are known, hence O4, q5 and q4; the rotation of frame 3, R03 = Rz(q1) Ry(q2) Rz(q3), gives the
  two shoulder branches (sign of q2).

So a pose and a q7 give up to 8 configurations, ``(N, 8, 7)`` here, with a mask of those that
exist (the triangle closes, no singularity), lie within the URDF's limits and reproduce the pose
(forward kinematics, every entry of the pose within ``pose_tolerance``): near singularities a
candidate can come out millimetres off, so the check is part of the answer. Every computation
is batched and in float64: NumPy for CPU tensors (a request's few dozen poses: a third of
torch's per-op cost there), torch on CUDA, one code path through :mod:`mace_core.array_ops`;
answers are torch tensors on the pose's device. NaN never leaves this module.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from ..array_ops import ArrayOps, ops_for
from ..tensor import TensorSpec
from .kinematics import PANDA_JOINTS, RobotKinematics

#: index of the free joint, q7: the closed form solves q1..q6 given it
FREE_JOINT = 6

#: Modified-DH lengths of the Panda (m), as the URDF's joint origins give them.
D1, D3, A4, D5, A7 = 0.333, 0.316, 0.0825, 0.384, 0.088
L24 = math.hypot(D3, A4)  #: shoulder (O2) to elbow (O4)
L46 = math.hypot(D5, A4)  #: elbow (O4) to wrist (O6)
#: branch order along the second axis of the answer: (elbow, q6, shoulder) sign bits
BRANCHES = tuple((e, w, s) for e in (1, -1) for w in (0, 1) for s in (1, -1))


class PandaClosedFormIK:
    """All joint solutions of Panda hand poses for given q7, batched (CPU or CUDA).

    ``kin`` supplies the frames: the fixed transform from joint 7's frame to the end-effector
    link (``panda_grasptarget``: flange, Rz(-pi/4), 0.105 m along z) and the joint limits.
    :meth:`matches` says whether ``kin`` is the chain this closed form was derived for.
    """

    def __init__(self, kin: RobotKinematics, pose_tolerance: float = 1e-6,
                 ops: ArrayOps | None = None):
        self.kin = kin
        self.pose_tolerance = pose_tolerance
        #: the array library that solves (None: NumPy for CPU poses, torch for CUDA ones)
        self.ops = ops
        #: the same chain in float64, for the poses the answers are checked against
        self.kin64 = RobotKinematics(
            kin.urdf, TensorSpec(kin.spec.device, torch.float64), base_link=kin.base_link,
            ee_link=kin.ee_link, joint_names=tuple(kin.joint_names))
        poses = self.kin64.link_poses(torch.zeros(1, kin.num_joints, dtype=torch.float64,
                                                  device=kin.spec.device))[0]
        link7 = poses[self.kin64.link_names.index("panda_link7")]
        #: (4, 4) joint 7's frame (at q7 = 0) to the end-effector link, fixed
        self.t_7e = torch.linalg.solve(link7, poses[self.kin64.ee_index])
        self._phi4 = math.atan2(-A4, -D5)  #: direction of O6->O4 in the (u, v) plane
        self._q4_offset = math.atan2(-D3, -A4) - math.atan2(D5, -A4)
        self.lower = self.kin64.lower
        self.upper = self.kin64.upper
        signs = np.array(BRANCHES, dtype=np.float64)  # (8, 3): elbow, wrist (0/1), shoulder
        t_e7 = np.linalg.inv(self.t_7e.cpu().numpy())  # (4, 4) end effector to joint 7
        consts = dict(t_e7=t_e7, o2=np.array([0.0, 0.0, D1]),  # (3,) the shoulder O2
                      elbow=signs[:, 0], shoulder=signs[:, 2],  # (8,) each
                      wrist=signs[:, 1] != 0,  # (8,) the second q6 of the pair
                      lower=self.lower.cpu().numpy(), upper=self.upper.cpu().numpy())
        #: the constants in each library, by ArrayOps.name
        self._consts = {"numpy": SimpleNamespace(**consts), "torch": SimpleNamespace(**{
            k: torch.as_tensor(v, device=kin.spec.device) for k, v in consts.items()})}

    def matches(self, samples: int = 64, seed: int = 0) -> bool:
        """Whether the loaded chain is the Panda's: configurations drawn within its limits are
        recovered from their own pose and q7 (a chain with other lengths or axes is not)."""
        if list(self.kin.joint_names) != list(PANDA_JOINTS):
            return False
        gen = torch.Generator(device=self.kin.spec.device).manual_seed(seed)
        q = self.kin.sample_uniform(samples, gen).to(torch.float64)
        q = q[q[:, 1].abs() > 0.05]  # away from the shoulder singularity
        target = self._fk(q)
        sols, ok = self.solve(target, q[:, 6])
        err = (sols - q[:, None]).abs().amax(-1).masked_fill(~ok, math.inf).amin(-1)
        return bool((err < 1e-6).float().mean() >= 0.95)

    # -- forward kinematics in float64 ----------------------------------------------------------

    def _fk(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, 7)`` -> ``(B, 4, 4)`` end-effector poses, float64."""
        return self.kin64.ee_pose(q.to(torch.float64))

    # -- the closed form ------------------------------------------------------------------------

    def solve(self, pose: torch.Tensor, q7: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every configuration reaching ``pose (N, 4, 4)`` (end-effector link in the base frame)
        with joint 7 at ``q7 (N,)``: ``(N, 8, 7)`` float64 and a mask ``(N, 8)`` of the ones
        that exist, lie within the joint limits and reproduce the pose. Rows not in the mask
        hold zeros."""
        ops = self.ops_for(pose)
        cand, ok = self.solve_arrays(ops.asarray(pose), ops.asarray(q7).reshape(-1), ops)
        return ops.tensor(cand, pose), ops.tensor(ok, pose)

    def ops_for(self, x: torch.Tensor) -> ArrayOps:
        """The array library that solves for tensors like ``x``."""
        return self.ops or ops_for(x)

    def forward(self, q, ops: ArrayOps):
        """End-effector poses ``(B, 4, 4)`` of ``q (B, 7)``, float64 arrays of ``ops``."""
        return self._fk(q) if ops.name == "torch" else self.kin64.ee_pose_numpy(q)

    def solve_arrays(self, pose, q7, ops: ArrayOps):
        """:meth:`solve` on float64 arrays of ``ops``' library: ``(N, 4, 4)``, ``(N,)`` ->
        ``(N, 8, 7)``, ``(N, 8)``."""
        c = self._consts[ops.name]
        cand, exists = self._candidates(pose, q7, ops, c)  # (N, 8, 7), (N, 8)
        # angles come out in (-pi, pi]; joint 6 reaches 3.82 rad: take the turn within limits
        cand = ops.where(cand < c.lower, cand + 2.0 * math.pi,
                         ops.where(cand > c.upper, cand - 2.0 * math.pi, cand))
        within = ((cand >= c.lower) & (cand <= c.upper)).all(-1)
        ok = exists & within
        # the pose check, for the candidates that may be answers only (FK is the costly part):
        # every entry of the (3, 4) pose within pose_tolerance (rotation and position, m)
        rows = ops.nonzero(ok)
        if rows[0].shape[0] == 0:  # nothing to check (forward kinematics wants a batch)
            return cand * 0.0, ok
        reached = self.forward(cand[rows], ops)
        error = ops.amax(ops.abs(reached[:, :3] - pose[rows[0], :3]), (-1, -2))
        ok[rows] = error < self.pose_tolerance
        return cand * ok[..., None], ok

    def project(self, pose: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each configuration of ``q (N, 7)`` moved onto ``pose`` (``(4, 4)`` or ``(N, 4, 4)``):
        the branch nearest it (max-norm) at its own q7. Returns ``(N, 7)`` float64 and ``(N,)``
        True where a branch exists (elsewhere the row is ``q`` unchanged)."""
        q = q.to(torch.float64)
        pose = pose.to(torch.float64).expand(q.shape[0], 4, 4)
        sols, ok = self.solve(pose, q[:, 6])  # (N, 8, 7), (N, 8)
        dist = (sols - q[:, None]).abs().amax(-1).masked_fill(~ok, math.inf)
        nearest = dist.argmin(-1)  # (N,)
        found = ok.any(-1)
        picked = sols[torch.arange(q.shape[0], device=q.device), nearest]
        return torch.where(found[:, None], picked, q), found

    def _candidates(self, pose, q7, ops: ArrayOps, c: SimpleNamespace):
        """The 8 branches of the construction (module docstring), before the limit and pose
        checks: ``(N, 8, 7)`` and ``(N, 8)`` True where the branch exists, in ``ops``' library
        with its constants ``c``.

        The frame rotations are products of Rx(pi/2) Rz(q) = [[c, -s, 0], [0, 0, -1], [s, c, 0]]
        (DH's alpha, then the joint), written out column by column: only the columns the
        construction reads are formed (a third of the tensor operations of the matrix products;
        the operations, not the arithmetic, are what a batch of a few dozen poses costs)."""
        eps = 1e-12
        # frame 7 (at q7) and frame 6: R06 = R07 R67^T, columns x6 = c7 x7 - s7 y7, y6 = -z7,
        # z6 = s7 x7 + c7 y7 (R07 = R0E R7E^-1 at q7 = 0)
        t07 = pose @ c.t_e7
        c7, s7 = ops.cos(q7)[:, None], ops.sin(q7)[:, None]
        x7, y7 = t07[:, :3, 0], t07[:, :3, 1]
        x6, y6, z6 = c7 * x7 - s7 * y7, -t07[:, :3, 2], s7 * x7 + c7 * y7
        o6 = t07[:, :3, 3] - A7 * x6  # O7 = O6 + R06 (a7, 0, 0)
        to2 = c.o2 - o6  # (N, 3)
        dist = ops.clip(ops.norm(to2), eps, None)
        w = to2 / dist[:, None]
        # the triangle: angle at O6 between O6->O4 and O6->O2
        cos_g = (L46 ** 2 - L24 ** 2 + dist * dist) / (2 * L46 * dist)
        closes = ops.abs(cos_g) <= 1.0
        gamma = ops.arccos(ops.clip(cos_g, -1.0, 1.0))
        # in-plane frame (u = z5, v = z4 x z5): O4 - O6 = -d5 u - a4 v, at angle phi4
        a, b = (w * x6).sum(-1), (w * y6).sum(-1)
        r = ops.clip(ops.hypot(a, b), eps, None)
        psi = ops.atan2(b, a)
        # the 8 branches side by side: (N, 8) from here on, signs from BRANCHES
        phi2 = self._phi4 + c.elbow * gamma[:, None]  # direction of O6->O2 in (u, v)
        cos_phi2, sin_phi2 = ops.cos(phi2), ops.sin(phi2)
        # u . w = cos(phi2) with u = sin(q6) x6 + cos(q6) y6: a sin q6 + b cos q6 = cos phi2
        sin_arg = cos_phi2 / r[:, None]
        base = ops.arcsin(ops.clip(sin_arg, -1.0, 1.0))
        angle6 = ops.where(c.wrist, math.pi - base, base) - psi[:, None]
        c6, s6 = ops.cos(angle6), ops.sin(angle6)
        q6 = ops.atan2(s6, c6)
        u = s6[..., None] * x6[:, None] + c6[..., None] * y6[:, None]  # (N, 8, 3)
        turned = ops.abs(sin_phi2) > 1e-9
        feasible = closes[:, None] & (ops.abs(sin_arg) <= 1.0) & turned
        v = (w[:, None] - cos_phi2[..., None] * u) / ops.where(
            turned, sin_phi2, 1.0)[..., None]
        v = v / ops.clip(ops.norm(v), eps, None)[..., None]
        z4 = ops.cross(u, v)
        # q5: z4 in frame 5, R56 R06^T z4 with R56 = Rx(pi/2) Rz(q6), is (-sin q5, -cos q5, 0)
        w0, w1, w2 = ((z4 * axis[:, None]).sum(-1) for axis in (x6, y6, z6))
        q5 = ops.atan2(s6 * w1 - c6 * w0, w2)
        # q4: the signed angle about z4 from O4->O6 to O4->O2 is theta_b0 - q4 - theta_a
        to6 = D5 * u + A4 * v  # O6 - O4
        to2_4 = to2[:, None] + to6  # O2 - O4
        alpha = ops.atan2((ops.cross(to6, to2_4) * z4).sum(-1), (to6 * to2_4).sum(-1))
        angle4 = self._q4_offset - alpha
        c4, s4 = ops.cos(angle4), ops.sin(angle4)
        q4 = ops.atan2(s4, c4)
        # R03 = R04 R34^T, R04's columns x4 = -v, y4 = u, z4: column 2 is c4 u - s4 v, and
        # R03[2, :2] = (-c4 v_z - s4 u_z, -z4_z)
        col2 = c4[..., None] * u - s4[..., None] * v
        r20 = -(c4 * v[..., 2] + s4 * u[..., 2])
        r21 = -z4[..., 2]
        # R03 = Rz(q1) Ry(q2) Rz(q3): ZYZ Euler angles, shoulder branch = sign of sin(q2)
        s2 = c.shoulder * ops.hypot(col2[..., 0], col2[..., 1])
        q2 = ops.atan2(s2, col2[..., 2])
        regular = ops.abs(s2) > 1e-9
        safe = ops.where(regular, s2, 1.0)
        q1 = ops.atan2(col2[..., 1] / safe, col2[..., 0] / safe)
        q3 = ops.atan2(r21 / safe, -r20 / safe)
        cand = ops.stack([q1, q2, q3, q4, q5, q6, ops.broadcast_to(q7[:, None], q6.shape)], -1)
        ok = feasible & regular & ops.isfinite(cand).all(-1)
        return ops.nan_to_num(cand), ok
