"""Launch the koopman_control stack: the Gen3 (simulated, or the real arm through the Kortex bridge),
observation ingestion, the one-step policy and its diffusion teacher fallback.

    ros2 launch koopman_control kinova.launch.py                          # simulation, default student
    ros2 launch koopman_control kinova.launch.py policy:=kdm policy_rate:=20.0
    ros2 launch koopman_control kinova.launch.py use_sim:=false robot_ip:=192.168.1.10

Which nodes run with which parameters is decided by ``koopman_control.stack.build_stack`` (the same
function ``koopman-control bringup`` uses), from ``config/stack.yaml`` in this package's share directory.

The robot driver (sim_node or kortex_bridge_node) exiting shuts the whole launch down: without it nothing
commands the arm or reports its state, and a policy left running would only hold. Any other node may stop
(or be restarted by hand) while the driver's watchdog holds the arm.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def _stack_nodes(context, *args, **kwargs):
    from ament_index_python.packages import get_package_share_directory

    from koopman_control.stack import LAUNCH_ARGUMENTS, PACKAGE, ROBOT_DRIVERS, StackArgs, build_stack

    values = {name: LaunchConfiguration(name).perform(context) for name in LAUNCH_ARGUMENTS}
    specs = build_stack(StackArgs.from_strings(values), root=get_package_share_directory(PACKAGE))
    return [
        Node(
            package=PACKAGE,
            executable=spec.executable,
            name=spec.name,
            parameters=[*(str(f) for f in spec.param_files), spec.overrides],
            remappings=list(spec.remappings),
            output="screen",
            emulate_tty=True,
            on_exit=[Shutdown(reason=f"{spec.name} (the robot driver) exited")]
            if spec.name in ROBOT_DRIVERS else None,
        )
        for spec in specs
    ]


def generate_launch_description() -> LaunchDescription:
    from koopman_control.stack import LAUNCH_ARGUMENTS

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in LAUNCH_ARGUMENTS.items()]
        + [OpaqueFunction(function=_stack_nodes)]
    )
