"""Start the MACE node (/mace/adapt_ik, /mace/complete_shape) with the shipped Panda parameters.

    ros2 launch mace_ros mace.launch.py
    ros2 launch mace_ros mace.launch.py params_file:=/path/to/params.yaml device:=cuda
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _mace_node(context):
    """Build the node; ``device`` overrides the parameters file only when it is given."""
    parameters = [LaunchConfiguration('params_file').perform(context)]
    device = LaunchConfiguration('device').perform(context)
    if device:
        parameters.append({'device': device})
    return [
        Node(
            package='mace_ros',
            executable='mace_node',
            name='mace',
            output='screen',
            emulate_tty=True,
            parameters=parameters,
        )
    ]


def generate_launch_description():
    """Declare ``params_file`` and ``device`` and start the node named ``mace``."""
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
        OpaqueFunction(function=_mace_node),
    ])
