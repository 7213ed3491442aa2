"""The one description of which nodes run, with which parameters: used by ``launch/kinova.launch.py``
(inside an OpaqueFunction, turned into ``launch_ros`` Nodes) and by ``koopman-control bringup`` (node
classes instantiated in one process, or one process per node). Plain Python, no ROS imports, so every path
and the tests share it.

Parameters come from ``config/stack.yaml`` (ROS 2 parameter-file format); launch arguments override the
entries they name. The bringup applies file then overrides exactly as ``ros2 launch`` does (a parameter
file, then a dictionary of overrides).

What the stack serves is a contract (:mod:`koopman_policy.contract`): the launched policy's own, from its ONNX
export, or a task given by ``task``. The ingest builds that contract's observation, the policy node refuses a
swap to a model it cannot feed, the sim runs that task, the teacher is the catalogue's teacher of that task.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from koopman_control import topics
from koopman_control.contracts import policy_contract, resolve_contract
from koopman_control.params import load_parameters
from koopman_policy.contract import Contract, ContractError

PACKAGE = "koopman_control"
STACK_FILE = "stack.yaml"

#: Launch arguments: name -> (default, description). kinova.launch.py declares exactly these.
LAUNCH_ARGUMENTS: dict[str, tuple[str, str]] = {
    "use_sim": ("true", "simulate the arm (sim_node) instead of driving a Kinova Gen3 (kortex_bridge_node)"),
    "robot_ip": ("192.168.1.10", "Kinova Gen3 address, used when use_sim is false"),
    "policy": ("", "policy name in config/policies.yaml or a path; empty = the catalogue's default"),
    "use_camera": ("false", "render camera frames in the sim and run camera_ingest_node"),
    "teacher_fallback": ("true", "run teacher_node and fall back to it when the student is unhealthy"),
    "policy_rate": ("", "control rate in Hz; empty = config/stack.yaml (10 Hz, the task's rate)"),
    "robot": ("", "sim | kortex | kortex-standin (the bridge against its MuJoCo stand-in) | ros2_control (an "
                  "external ros2_control driver, e.g. ros2_kortex); empty = from use_sim"),
    "task": ("", "what the stack serves: a built-in task (gen3_reach_obstacle, pusht) or a task file; empty = "
                 "the policy's own contract"),
    "controller_topic": ("/joint_trajectory_controller/joint_trajectory",
                         "robot:=ros2_control: the joint trajectory controller's command topic"),
}
ROBOTS = ("sim", "kortex", "kortex-standin", "ros2_control")
#: Node names of the robot drivers: the stack ends when one exits (launch file and process runner alike).
ROBOT_DRIVERS = ("sim", "kortex_bridge")


class StackError(ValueError):
    """Bad launch arguments or a missing configuration."""


def _bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise StackError(f"launch argument {name}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class StackArgs:
    use_sim: bool = True
    robot_ip: str = LAUNCH_ARGUMENTS["robot_ip"][0]
    policy: str = ""
    use_camera: bool = False
    teacher_fallback: bool = True
    policy_rate: float | None = None
    robot: str = ""  # "" = "sim" if use_sim else "kortex"
    task: str = ""  # "" = the policy's contract
    controller_topic: str = LAUNCH_ARGUMENTS["controller_topic"][0]

    @property
    def robot_kind(self) -> str:
        return self.robot or ("sim" if self.use_sim else "kortex")

    @classmethod
    def from_strings(cls, values: Mapping[str, str]) -> StackArgs:
        """From launch-argument strings (missing ones take their defaults); raises StackError."""
        unknown = set(values) - set(LAUNCH_ARGUMENTS)
        if unknown:
            raise StackError(f"unknown launch arguments {sorted(unknown)}; known: {list(LAUNCH_ARGUMENTS)}")
        v = {k: values.get(k, d) for k, (d, _) in LAUNCH_ARGUMENTS.items()}
        rate: float | None = None
        if str(v["policy_rate"]).strip():
            try:
                rate = float(v["policy_rate"])
            except ValueError:
                raise StackError(f"launch argument policy_rate: expected Hz, got {v['policy_rate']!r}") from None
            if not 0 < rate <= 1000:
                raise StackError(f"launch argument policy_rate must be in (0, 1000] Hz, got {rate}")
        robot = str(v["robot"]).strip()
        if robot and robot not in ROBOTS:
            raise StackError(f"launch argument robot must be one of {', '.join(ROBOTS)} or empty, got {robot!r}")
        use_sim = _bool("use_sim", v["use_sim"])
        if robot:
            use_sim = robot == "sim"
        return cls(use_sim=use_sim, robot_ip=str(v["robot_ip"]), policy=str(v["policy"]),
                   use_camera=_bool("use_camera", v["use_camera"]),
                   teacher_fallback=_bool("teacher_fallback", v["teacher_fallback"]), policy_rate=rate, robot=robot,
                   task=str(v["task"]).strip(), controller_topic=str(v["controller_topic"]).strip())


@dataclass(frozen=True)
class NodeSpec:
    executable: str  # console script (ros2 launch) == module koopman_control.nodes.<executable>
    name: str  # node name
    entry: str  # "module:Class" (bringup)
    param_files: tuple[Path, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()  # topic remappings (launch ``remappings``, ``-r from:=to``)

    def node_class(self) -> type:
        module, _, cls = self.entry.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as err:
            raise StackError(f"node {self.name}: cannot import {self.entry}: {err}") from None

    def parameters(self) -> dict[str, Any]:
        """Files, then overrides: what the node ends up with under ``ros2 launch`` too."""
        out: dict[str, Any] = {}
        for f in self.param_files:
            out.update(load_parameters(f, self.name))
        out.update(self.overrides)
        return out


def package_root() -> Path:
    """Directory holding ``config/`` (and ``models/``): ``$KOOPMAN_CONTROL_ROOT``, the source checkout or
    working directory (as the policy catalogue finds it), else the installed package share directory."""
    from koopman_policy.catalog import find_root

    candidates = [Path(os.environ["KOOPMAN_CONTROL_ROOT"])] if os.environ.get("KOOPMAN_CONTROL_ROOT") else []
    candidates.append(find_root())
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # not on an ament prefix path (pip install): fall through
        pass
    candidates.append(Path(os.sys.prefix) / "share" / PACKAGE)
    for c in candidates:
        if (c / "config" / STACK_FILE).is_file():
            return c
    raise StackError(f"no config/{STACK_FILE} found in {', '.join(str(c) for c in candidates)} "
                     "(set KOOPMAN_CONTROL_ROOT to the directory holding config/)")


def _node(executable: str, name: str, cls: str, files: tuple[Path, ...], **overrides: Any) -> NodeSpec:
    return NodeSpec(executable, name, f"{PACKAGE}.nodes.{executable}:{cls}", files, overrides)


def served_contract(args: StackArgs, root: Path) -> Contract:
    """The contract the stack serves: the task given, else the launched policy's (read from its export)."""
    try:
        return resolve_contract(args.task) if args.task else policy_contract(args.policy or None, root)
    except ContractError as err:
        raise StackError(str(err)) from None


def task_teacher(task: str, root: Path) -> str | None:
    """The catalogue's teacher of ``task`` (the fallback's policy), or None."""
    from koopman_policy.catalog import load_catalog

    return next((n for n, e in load_catalog(root).policies.items() if e.method == "teacher" and e.task == task
                 and (e.onnx is not None or e.onnx_denoiser is not None)), None)


def build_stack(args: StackArgs | None = None, root: str | Path | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[NodeSpec]:
    """Which nodes run, in start order, with their parameter files and overrides.

    ``overrides`` (node name -> {param: value}) is for the bringup's ``--param`` and for tests; it is applied
    after the launch arguments.
    """
    args = args or StackArgs()
    root = Path(root) if root is not None else package_root()
    cfg = root / "config" / STACK_FILE
    if not cfg.is_file():
        raise StackError(f"{cfg} not found")
    files = (cfg,)
    rate = {"policy_rate": args.policy_rate} if args.policy_rate is not None else {}
    contract = served_contract(args, root)
    served = {"contract": contract.to_json()}
    image = contract.image
    use_camera = args.use_camera or image is not None
    nodes: list[NodeSpec] = []
    robot = args.robot_kind
    if robot == "sim":
        from koopman_control.core.sim_tasks import TASKS
        from koopman_control.kortex import command_checks

        # A task of the user's own is served by the sim's scene whose topics carry everything it observes.
        scene = contract.task if contract.task in TASKS else str((overrides or {}).get("sim", {}).get(
            "task", "gen3_reach_obstacle"))
        if scene not in TASKS:
            raise StackError(f"the sim runs {', '.join(TASKS)}, not {scene!r}")
        lacking = contract.missing_from(resolve_contract(scene)) if scene != contract.task else []
        if lacking:
            raise StackError(f"the sim's {scene} scene cannot feed task {contract.task!r}: " + "; ".join(lacking)
                             + " (drive a robot that does: robot:=ros2_control, kortex or kortex-standin)")
        sim: dict[str, Any] = {"task": scene, "publish_camera": use_camera}
        if scene == "gen3_reach_obstacle":
            try:
                sim.update(command_checks(root))
            except FileNotFoundError as err:
                raise StackError(str(err)) from None
        if image is not None:
            spec = image.image
            sim.update(camera_name=spec.camera, camera_width=spec.width, camera_height=spec.height)
        nodes.append(_node("sim_node", "sim", "SimNode", files, **sim))
    elif use_camera:
        raise StackError("use_camera needs the simulated camera (robot:=sim); the arm has none in this stack")
    elif robot in ("kortex", "kortex-standin"):
        from koopman_control.kortex import bridge_spec

        if contract.task != "gen3_reach_obstacle" and robot == "kortex-standin":
            raise StackError(f"the Kortex stand-in's scene is gen3_reach_obstacle, not task {contract.task!r}")
        try:
            bridge_files, bridge_overrides = bridge_spec(robot, root, args.robot_ip)
        except (ValueError, FileNotFoundError) as err:
            raise StackError(str(err)) from None
        nodes.append(_node("kortex_bridge_node", "kortex_bridge", "KortexBridgeNode", files + tuple(bridge_files),
                           **bridge_overrides))
    nodes.append(_node("state_ingest_node", "state_ingest", "StateIngestNode", files, **served, **rate))
    if use_camera:
        spec = image.image if image is not None else None
        size = {"width": spec.width, "height": spec.height} if spec is not None else {}
        nodes.append(_node("camera_ingest_node", "camera_ingest", "CameraIngestNode", files, **rate, **size))
    policy = {"policy": args.policy} if args.policy else {}
    pol = _node("policy_node", "policy", "PolicyNode", files, catalog_root=str(root),
                teacher_fallback=args.teacher_fallback, **served, **policy, **rate)
    if robot == "ros2_control":  # chunks straight to the controller, which takes JointTrajectory as they are
        pol.overrides["hold_points"] = True  # it interpolates between waypoints; the policies hold each point
        pol = dataclasses.replace(pol, remappings=((topics.ACTION_CHUNK, args.controller_topic),))
    nodes.append(pol)
    if args.teacher_fallback:
        teacher = task_teacher(contract.task, root)
        if teacher is None:
            raise StackError(f"no teacher of task {contract.task!r} in {root / 'config' / 'policies.yaml'} for the "
                             "fallback: add one, or teacher_fallback:=false")
        nodes.append(_node("teacher_node", "teacher", "TeacherNode", files, catalog_root=str(root), policy=teacher))
    for spec in nodes:
        spec.overrides.update((overrides or {}).get(spec.name, {}))
    unknown = set(overrides or {}) - {n.name for n in nodes}
    if unknown:
        raise StackError(f"parameter overrides for nodes not in the stack: {sorted(unknown)} "
                         f"(running: {[n.name for n in nodes]})")
    return nodes
