"""Forward kinematics against PyBullet, and the analytic Jacobian against finite differences."""

import numpy as np
import pybullet as p
import pytest
import torch

from mace_core.errors import InvalidRequestError, ModelLoadError
from mace_core.robot.kinematics import RobotKinematics, URDFModel, panda_urdf_path
from mace_core.tensor import TensorSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def bullet():
    cid = p.connect(p.DIRECT)
    robot = p.loadURDF(panda_urdf_path(), useFixedBase=True, physicsClientId=cid)
    by_link = {p.getJointInfo(robot, i, physicsClientId=cid)[12].decode(): i
               for i in range(p.getNumJoints(robot, physicsClientId=cid))}
    by_joint = {p.getJointInfo(robot, i, physicsClientId=cid)[1].decode(): i
                for i in range(p.getNumJoints(robot, physicsClientId=cid))}
    yield cid, robot, by_link, by_joint
    p.disconnect(cid)


@pytest.mark.parametrize("device", DEVICES)
def test_every_link_matches_pybullet_on_1000_configurations(bullet, device):
    cid, robot, by_link, by_joint = bullet
    spec = TensorSpec.resolve(device, torch.float64)
    kin = RobotKinematics.panda(spec)
    q = kin.sample_uniform(1000, spec.generator(0))
    poses = kin.link_poses(q).cpu().numpy()
    assert poses.shape == (1000, len(kin.link_names), 4, 4)
    worst_pos, worst_rot = 0.0, 0.0
    for b in range(len(q)):
        for k, name in enumerate(kin.joint_names):
            p.resetJointState(robot, by_joint[name], float(q[b, k]), physicsClientId=cid)
        for name in ("panda_finger_joint1", "panda_finger_joint2"):
            p.resetJointState(robot, by_joint[name], 0.04, physicsClientId=cid)
        for name, index in by_link.items():
            state = p.getLinkState(robot, index, computeForwardKinematics=True,
                                   physicsClientId=cid)
            mine = poses[b, kin.link_names.index(name)]
            rot = np.array(p.getMatrixFromQuaternion(state[5])).reshape(3, 3)
            worst_pos = max(worst_pos, np.abs(np.array(state[4]) - mine[:3, 3]).max())
            worst_rot = max(worst_rot, np.abs(rot - mine[:3, :3]).max())
    assert worst_pos < 1e-5
    assert worst_rot < 1e-5


def test_end_effector_is_grasptarget_and_jacobian_matches_finite_differences():
    spec = TensorSpec.resolve("cpu", torch.float64)
    kin = RobotKinematics.panda(spec)
    assert kin.link_names[kin.ee_index] == "panda_grasptarget"
    q = kin.sample_uniform(16, spec.generator(1))
    jac = kin.jacobian(q)
    eps = 1e-6
    for i in range(7):
        dq = torch.zeros_like(q)
        dq[:, i] = eps
        numeric = (kin.ee_pose(q + dq) - kin.ee_pose(q - dq)) / (2 * eps)
        assert torch.allclose(numeric[:, :3, 3], jac[:, :3, i], atol=1e-7)
        # angular column: skew part of dR Rᵀ
        w = numeric[:, :3, :3] @ kin.ee_pose(q)[:, :3, :3].transpose(1, 2)
        omega = torch.stack([w[:, 2, 1], w[:, 0, 2], w[:, 1, 0]], -1)
        assert torch.allclose(omega, jac[:, 3:, i], atol=1e-7)


def test_limits_and_bad_shapes():
    spec = TensorSpec.resolve("cpu")
    kin = RobotKinematics.panda(spec)
    assert kin.within_limits(kin.sample_uniform(100, spec.generator(2))).all()
    q = torch.zeros(1, 7)  # joint 4 upper limit is 0: inside (inclusive); joint 6 lower is -0.0873
    assert bool(kin.within_limits(q)[0])
    q[0, 3] = 0.1
    assert not bool(kin.within_limits(q)[0])
    with pytest.raises(InvalidRequestError):
        kin.link_poses(torch.zeros(3, 6))


def test_urdf_errors_are_typed():
    with pytest.raises(ModelLoadError):
        URDFModel.from_text("<robot><link name=")
    urdf = URDFModel.from_text(open(panda_urdf_path()).read())
    with pytest.raises(ModelLoadError):
        RobotKinematics(urdf, TensorSpec.resolve("cpu"), ee_link="no_such_link")


TREE_URDF = """<robot name="tree">
  <link name="base"/><link name="a"/><link name="a_fixed"/><link name="b"/><link name="c"/>
  <link name="side"/><link name="tip"/>
  <joint name="j1" type="revolute"><parent link="base"/><child link="a"/>
    <origin xyz="0 0 0.2" rpy="0.1 0 0"/><axis xyz="0 0 1"/>
    <limit lower="-3" upper="3" effort="1" velocity="1"/></joint>
  <joint name="f1" type="fixed"><parent link="a"/><child link="a_fixed"/>
    <origin xyz="0.1 0.05 0.3" rpy="0.3 -0.2 0.5"/></joint>
  <joint name="j2" type="revolute"><parent link="a_fixed"/><child link="b"/>
    <origin xyz="0 0.2 0" rpy="0 0.4 0"/><axis xyz="1 0 0"/>
    <limit lower="-3" upper="3" effort="1" velocity="1"/></joint>
  <joint name="j3" type="revolute"><parent link="b"/><child link="c"/>
    <origin xyz="0.3 0 0.1" rpy="0 0 0"/><axis xyz="0 0.6 0.8"/>
    <limit lower="-3" upper="3" effort="1" velocity="1"/></joint>
  <joint name="j4" type="revolute"><parent link="a"/><child link="side"/>
    <origin xyz="-0.2 0 0.1" rpy="0 0 0.7"/><axis xyz="0 1 0"/>
    <limit lower="-3" upper="3" effort="1" velocity="1"/></joint>
  <joint name="f2" type="fixed"><parent link="c"/><child link="tip"/>
    <origin xyz="0 0 0.15" rpy="0 0.3 0"/></joint>
</robot>"""


def test_forward_kinematics_of_a_tree_with_fixed_links_between_joints(tmp_path):
    """A branching robot with fixed joints between actuated ones and tilted axes: every link's
    pose matches PyBullet's (the folded-constant plan of link_poses is general)."""
    path = tmp_path / "tree.urdf"
    path.write_text(TREE_URDF)
    spec = TensorSpec.resolve("cpu", torch.float64)
    joints = ("j1", "j2", "j3", "j4")
    kin = RobotKinematics(URDFModel.from_text(TREE_URDF), spec, base_link="base", ee_link="tip",
                          joint_names=joints, fixed_positions={})
    q = kin.sample_uniform(50, spec.generator(1))
    poses = kin.link_poses(q).numpy()
    cid = p.connect(p.DIRECT)
    try:
        robot = p.loadURDF(str(path), useFixedBase=True, physicsClientId=cid)
        info = [p.getJointInfo(robot, i, physicsClientId=cid)
                for i in range(p.getNumJoints(robot, physicsClientId=cid))]
        by_joint = {row[1].decode(): i for i, row in enumerate(info)}
        by_link = {row[12].decode(): i for i, row in enumerate(info)}
        worst = 0.0
        for b in range(len(q)):
            for k, name in enumerate(joints):
                p.resetJointState(robot, by_joint[name], float(q[b, k]), physicsClientId=cid)
            for k, name in enumerate(kin.link_names[1:], start=1):
                state = p.getLinkState(robot, by_link[name], computeForwardKinematics=True,
                                       physicsClientId=cid)
                rot = np.array(p.getMatrixFromQuaternion(state[5])).reshape(3, 3)
                worst = max(worst, np.abs(poses[b, k, :3, 3] - state[4]).max(),
                            np.abs(poses[b, k, :3, :3] - rot).max())
    finally:
        p.disconnect(cid)
    assert worst < 1e-6
    # the NumPy end-effector pose (the closed form's checks) is the same chain's
    tip = kin.link_names.index("tip")
    assert np.abs(kin.ee_pose_numpy(q.numpy()) - poses[:, tip]).max() < 1e-12


def test_numpy_end_effector_pose_is_torchs():
    spec = TensorSpec.resolve("cpu", torch.float64)
    kin = RobotKinematics.panda(spec)
    q = kin.sample_uniform(300, spec.generator(2))
    assert np.abs(kin.ee_pose_numpy(q.numpy()) - kin.ee_pose(q).numpy()).max() < 1e-12


def test_rigid_transforms_between_links_are_their_relative_poses():
    """The flange, the hand and the end effector are rigidly attached: the transform from the
    URDF's fixed joints is their relative pose at any configuration (float64); across a joint,
    or for an unknown link, there is none."""
    kin = RobotKinematics.panda(TensorSpec(torch.device("cpu"), torch.float64))
    urdf = kin.urdf
    q = kin.sample_uniform(5, kin.spec.generator(3))
    poses = kin.link_poses(q).numpy()
    ee = kin.ee_index
    for link in ("panda_link7", "panda_link8", "panda_hand", "panda_grasptarget"):
        rigid = urdf.rigid_transform(link, kin.ee_link)
        i = kin.link_names.index(link)
        for b in range(5):
            np.testing.assert_allclose(np.linalg.inv(poses[b, i]) @ poses[b, ee], rigid,
                                       atol=1e-12)
    np.testing.assert_allclose(urdf.rigid_transform("panda_grasptarget", "panda_grasptarget"),
                               np.eye(4))
    assert urdf.rigid_transform("panda_link6", kin.ee_link) is None
    assert urdf.rigid_transform("panda_leftfinger", kin.ee_link) is None
    assert urdf.rigid_transform("no_such_link", kin.ee_link) is None
