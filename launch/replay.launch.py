"""Replay a recorded bag into the live stack: the bag's robot-side topics (/joint_states, /task/*, camera)
stand in for the arm, and the stack (ingest, policy, teacher) runs on them as it would live.

    ros2 launch koopman_control replay.launch.py bag:=runs/episode_12 policy:=kdm rate:=1.0

The same nodes as ``kinova.launch.py`` minus the robot (``koopman_control.stack.build_stack``), planning on every
tick as ``replay-live`` does (``REPLAY_OVERRIDES``), plus the bag player of ``koopman-control replay-live``
(:func:`koopman_control.bag.cli.player_spec`). The launch ends when the player has published the bag's last
message (``exit_when_done``, default true).
"""

import sys
import tempfile
from pathlib import Path

import yaml
from launch.actions import DeclareLaunchArgument, EmitEvent, ExecuteProcess, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription

ARGUMENTS = {
    "bag": ("", "recorded bag to play (folder, or .mcap/.db3 file)"),
    "rate": ("1.0", "playback speed factor"),
    "policy": ("", "policy name in config/policies.yaml or a path; empty = the catalogue's default"),
    "teacher_fallback": ("true", "run teacher_node and fall back to it when the student is unhealthy"),
    "policy_rate": ("", "control rate in Hz; empty = config/stack.yaml"),
    "exit_when_done": ("true", "end the launch after the bag's last message"),
}


def _nodes(context, *args, **kwargs):
    from ament_index_python.packages import get_package_share_directory

    from koopman_control.bag.cli import REPLAY_OVERRIDES, player_spec
    from koopman_control.stack import PACKAGE, StackArgs, StackError, build_stack

    v = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    if not v["bag"]:
        raise StackError("replay.launch.py needs bag:=PATH")
    stack_args = StackArgs.from_strings({k: v[k] for k in ("policy", "teacher_fallback", "policy_rate")})
    root = get_package_share_directory(PACKAGE)
    specs = [s for s in build_stack(stack_args, root=root, overrides=REPLAY_OVERRIDES)
             if s.name not in ("sim", "kortex_bridge")]
    actions = [
        Node(package=PACKAGE, executable=s.executable, name=s.name,
             parameters=[*(str(f) for f in s.param_files), s.overrides], output="screen", emulate_tty=True)
        for s in specs
    ]
    done = v["exit_when_done"].strip().lower() in ("true", "1", "yes")
    player = player_spec(Path(v["bag"]).expanduser().resolve(), float(v["rate"]), exit_when_done=done)
    params = Path(tempfile.mkdtemp(prefix="koopman_replay_")) / "bag_player.yaml"
    params.write_text(yaml.safe_dump({player.name: {"ros__parameters": player.overrides}}))
    # The player runs as a module of the installed package (the same node class replay-live uses).
    proc = ExecuteProcess(
        cmd=[sys.executable, "-m", player.entry.split(":")[0], "--ros-args", "-r", f"__node:={player.name}",
             "--params-file", str(params)],
        name=player.name, output="screen", emulate_tty=True,
    )
    actions.append(proc)
    if done:
        actions.append(RegisterEventHandler(OnProcessExit(target_action=proc, on_exit=[EmitEvent(event=Shutdown(
            reason="bag played"))])))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)]
    )
