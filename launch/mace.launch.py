"""Start the MACE node (/mace/adapt_ik, /mace/complete_shape) with the shipped Panda parameters.

    ros2 launch mace_ros mace.launch.py
    ros2 launch mace_ros mace.launch.py params_file:=/path/to/params.yaml device:=cuda
    ros2 launch mace_ros mace.launch.py namespace:=robot1   # /robot1/mace/adapt_ik
    ros2 launch mace_ros mace.launch.py joint_states_topic:=/joint_states  # the robot's seed
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _mace_node(context):
    """Build the node; ``device`` and ``joint_states_topic`` override the parameters file only
    when they are given.

    Raises:
        FileNotFoundError: ``params_file`` names no file (the launch stops with this message
            instead of starting the node on its built-in defaults).
    """
    params_file = LaunchConfiguration('params_file').perform(context)
    if not os.path.isfile(params_file):
        raise FileNotFoundError(f"mace.launch.py: params_file '{params_file}' does not exist "
                                "(give an existing YAML file, or leave params_file out for "
                                "the shipped config/panda.yaml)")
    parameters = [params_file]
    device = LaunchConfiguration('device').perform(context)
    if device:
        parameters.append({'device': device})
    joint_states = LaunchConfiguration('joint_states_topic').perform(context)
    if joint_states:
        parameters.append({'joint_states_topic': joint_states})
    return [
        Node(
            package='mace_ros',
            executable='mace_node',
            name='mace',
            namespace=LaunchConfiguration('namespace').perform(context),
            output='screen',
            emulate_tty=True,
            parameters=parameters,
        )
    ]


def generate_launch_description():
    """Declare ``params_file``, ``device``, ``namespace`` and ``joint_states_topic`` and start
    the node ``mace``."""
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file',
            default_value=PathJoinSubstitution(
                [FindPackageShare('mace_ros'), 'config', 'panda.yaml']),
            description='YAML file with the parameters of the mace node',
        ),
        DeclareLaunchArgument(
            'device',
            default_value='',
            description='torch device ("auto", "cpu", "cuda", "cuda:1"); '
                        'empty keeps the one in params_file',
        ),
        DeclareLaunchArgument(
            'namespace',
            default_value='',
            description='namespace of the node (its services are <namespace>/mace/...)',
        ),
        DeclareLaunchArgument(
            'joint_states_topic',
            default_value='',
            description='sensor_msgs/JointState topic whose latest message seeds IK requests '
                        'without a seed_state (e.g. /joint_states); empty keeps params_file',
        ),
        OpaqueFunction(function=_mace_node),
    ])
