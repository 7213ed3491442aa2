"""The observation and action contract a model is trained on, and which travels with it.

Named features, in the spirit of LeRobot's ``input_features`` / ``output_features``, each saying where its
values come from on a robot, so that the stack can serve any task and arm driver from the model alone:

* observation features: ``joint_position`` / ``joint_velocity`` of named joints (from ``joint_states``),
  ``vector`` (fields of a message of a standard type on a topic, or values given as a parameter) and
  ``image`` (a camera topic, with the frame size and normalisation the model was trained on);
* action features: ``joint_position`` targets of named joints, ``gripper`` where there is one.

The model's flat observation vector is the observation features' ``names`` in order (images apart), its action
vector the action features' ``names``. A contract is written as YAML (a task file, see ``config/tasks/`` and
``koopman_sim/tasks/*.yaml``), stored in every dataset, checkpoint config, model card and ONNX export, and read
back here without torch or ROS. Anything unknown or inconsistent is refused with the feature and the key named.

Choices. Joint features default their names to the training data's (``q_<joint>``, ``qd_<joint>``, ``<joint>``
for actions), so the shipped Gen3 models' 20-d layout is exactly their contract. A ``vector`` feature is
``scope: episode`` when its value is fixed for an episode and stamped with the episode's start (a target placed
in the cell), ``stream`` when it moves with the robot (an object's pose), paired with the joint sample by stamp.
Angles extracted as ``yaw`` are wrapped to ``(wrap_center - pi, wrap_center + pi]``, the convention of the
training data (Push-T: the block angle around its goal angle). Continuous joints (no end stops) may arrive
wrapped to ``(-pi, pi]`` from a driver; ``reference`` says where the training data's joint angles lie (the
export writes the middle of the model's training range), and the ingest unwraps each joint onto that branch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

OBSERVATION_KINDS = ("joint_position", "joint_velocity", "vector", "image")
ACTION_KINDS = ("joint_position", "gripper")
SCOPES = ("stream", "episode")
JOINT_STATES = "joint_states"
#: Message types a vector feature may read, and whether they carry a header stamp.
VECTOR_TYPES = {
    "geometry_msgs/msg/PointStamped": True, "geometry_msgs/msg/Point": False,
    "geometry_msgs/msg/PoseStamped": True, "geometry_msgs/msg/Pose": False,
    "geometry_msgs/msg/Vector3Stamped": True, "geometry_msgs/msg/Vector3": False,
    "geometry_msgs/msg/Pose2D": False,
    "std_msgs/msg/Float64MultiArray": False, "std_msgs/msg/Float32MultiArray": False,
    "std_msgs/msg/Float64": False, "std_msgs/msg/Float32": False,
}
IMAGE_TYPE = "sensor_msgs/msg/Image"
_FEATURE_KEYS = {"name", "kind", "names", "joints", "topic", "type", "fields", "scope", "value", "continuous",
                 "reference", "limits", "wrap_center", "image"}
_IMAGE_KEYS = {"height", "width", "camera", "mean", "std"}
_LIMIT_KEYS = {"lower", "upper", "speed"}
_CONTRACT_KEYS = {"task", "control_dt", "observation", "action", "description"}


class ContractError(ValueError):
    """A contract (task file, model metadata) that cannot be used; the message names the feature and key."""


@dataclass(frozen=True)
class ImageSpec:
    height: int
    width: int
    camera: str = ""  # the simulated camera that renders these frames ("" for a real camera)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class JointLimits:
    """Where a joint can physically be and how fast it can move (the ingest refuses samples beyond them)."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    speed: tuple[float, ...]


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str
    names: tuple[str, ...] = ()  # the model's components; empty for an image
    joints: tuple[str, ...] = ()  # joint features: joints on joint_states (observation) or in the command
    topic: str | None = None  # vector and image features (joints: joint_states)
    type: str | None = None  # the message type of ``topic``
    fields: tuple[str, ...] = ()  # vector: one message field per component, e.g. "point.x", "data[2]", "yaw"
    scope: str = "stream"  # vector: "episode" (fixed per episode) or "stream"
    value: tuple[float, ...] | None = None  # vector: given as a parameter instead of a topic
    continuous: tuple[bool, ...] = ()  # joint_position: joints without end stops (unwrapped by the ingest)
    reference: tuple[float, ...] = ()  # joint_position: where the training data's joints lie (unwrap target)
    limits: JointLimits | None = None  # joint features: plausibility bounds
    wrap_center: float | None = None  # vector: angles ("yaw") wrapped around this value
    image: ImageSpec | None = None

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def stamped(self) -> bool:
        """Whether the source message carries its own stamp (else its receive time stands in)."""
        return bool(self.type and (self.type == IMAGE_TYPE or VECTOR_TYPES.get(self.type, False)))

    def source(self) -> str:
        """Where the values come from, for messages a person reads."""
        if self.kind in ("joint_position", "joint_velocity"):
            what = "positions" if self.kind == "joint_position" else "velocities"
            return f"{what} of {', '.join(self.joints)} on {self.topic or JOINT_STATES}"
        if self.value is not None:
            return "a parameter"
        return f"{self.topic} ({self.type}{': ' + ', '.join(self.fields) if self.fields else ''})"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in (None, (), [], "") and k != "scope"}
        if self.kind == "vector":
            d["scope"] = self.scope
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class Contract:
    task: str
    control_dt: float
    observation: tuple[Feature, ...]
    action: tuple[Feature, ...]
    description: str = ""

    @property
    def obs_names(self) -> tuple[str, ...]:
        return tuple(n for f in self.observation for n in f.names)

    @property
    def action_names(self) -> tuple[str, ...]:
        return tuple(n for f in self.action for n in f.names)

    @property
    def action_joints(self) -> tuple[str, ...]:
        """The joints the action drives, in action order (the chunk's joint names)."""
        return tuple(j for f in self.action for j in f.joints)

    @property
    def image(self) -> Feature | None:
        return next((f for f in self.observation if f.kind == "image"), None)

    def feature(self, name: str) -> Feature:
        for f in self.observation + self.action:
            if f.name == name:
                return f
        raise KeyError(name)

    def missing_from(self, served: Contract) -> list[str]:
        """Why ``served`` (what a running stack provides) cannot feed this contract: one line per feature this
        one needs that ``served`` lacks or takes from another source; [] when it can."""
        have = {n: f for f in served.observation for n in (f.names or (f.name,))}
        out: list[str] = []
        for f in self.observation:
            for n in f.names or (f.name,):
                g = have.get(n)
                if g is None:
                    out.append(f"{f.name} ({n}) from {f.source()}: not served by this stack")
                    break
                if (g.kind, g.topic, g.type, g.scope if g.kind == "vector" else None) != \
                        (f.kind, f.topic, f.type, f.scope if f.kind == "vector" else None) or \
                        (f.kind != "vector" and g.joints and f.joints and
                         dict(zip(g.names, g.joints, strict=False)).get(n) !=
                         dict(zip(f.names, f.joints, strict=False)).get(n)):
                    out.append(f"{f.name} ({n}) from {f.source()}: this stack serves it from {g.source()}")
                    break
                if f.kind == "image" and g.image != f.image:
                    out.append(f"{f.name}: frames {f.image}, this stack serves {g.image}")
                    break
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "control_dt": self.control_dt}
        if self.description:
            d["description"] = self.description
        d["observation"] = [f.to_dict() for f in self.observation]
        d["action"] = [f.to_dict() for f in self.action]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "contract") -> Contract:
        if not isinstance(d, Mapping):
            raise ContractError(f"{where}: expected a mapping with task, control_dt, observation, action")
        unknown = set(d) - _CONTRACT_KEYS
        if unknown:
            raise ContractError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_CONTRACT_KEYS)}")
        for key in ("task", "control_dt", "observation", "action"):
            if key not in d:
                raise ContractError(f"{where}: missing {key!r}")
        dt = d["control_dt"]
        if not isinstance(dt, int | float) or isinstance(dt, bool) or not (math.isfinite(dt) and dt > 0):
            raise ContractError(f"{where}: control_dt must be a positive number of seconds, got {dt!r}")
        obs = tuple(_feature(f, i, "observation", where) for i, f in enumerate(_list(d["observation"], where)))
        act = tuple(_feature(f, i, "action", where) for i, f in enumerate(_list(d["action"], where)))
        if not obs or not act:
            raise ContractError(f"{where}: needs at least one observation and one action feature")
        c = cls(str(d["task"]), float(dt), obs, act, str(d.get("description", "")))
        _check_unique(c, where)
        return c

    @classmethod
    def from_json(cls, text: str, where: str = "contract") -> Contract:
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as err:
            raise ContractError(f"{where}: not JSON: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Contract:
        """A task file (YAML)."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ContractError(f"task file {p}: cannot read: {err}") from None
        return cls.from_dict(data, f"task file {p}")


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise ContractError(f"{where}: observation and action must be lists of features, got {type(v).__name__}")
    return v


def _strs(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) and x for x in v):
        raise ContractError(f"{what}: expected a list of names, got {v!r}")
    return tuple(v)


def _floats(v: Any, what: str, n: int | None = None) -> tuple[float, ...]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, int | float) and not isinstance(x, bool)
                                                  and math.isfinite(x) for x in v):
        raise ContractError(f"{what}: expected a list of finite numbers, got {v!r}")
    if n is not None and len(v) != n:
        raise ContractError(f"{what}: expected {n} numbers, got {len(v)}")
    return tuple(float(x) for x in v)


def _feature(d: Any, i: int, side: str, where: str) -> Feature:
    if not isinstance(d, Mapping):
        raise ContractError(f"{where}: {side} feature {i} must be a mapping, got {d!r}")
    name = d.get("name")
    what = f"{where}: {side} feature {name or i!r}"
    if not isinstance(name, str) or not name:
        raise ContractError(f"{what}: needs a name")
    unknown = set(d) - _FEATURE_KEYS
    if unknown:
        raise ContractError(f"{what}: unknown keys {sorted(unknown)}; known: {sorted(_FEATURE_KEYS)}")
    kind = d.get("kind")
    kinds = OBSERVATION_KINDS if side == "observation" else ACTION_KINDS
    if kind not in kinds:
        raise ContractError(f"{what}: kind must be one of {', '.join(kinds)}, got {kind!r}")
    kw: dict[str, Any] = {"name": name, "kind": kind}
    if kind in ("joint_position", "joint_velocity", "gripper"):
        joints = _strs(d.get("joints"), f"{what}: joints")
        prefix = "" if side == "action" else ("q_" if kind == "joint_position" else "qd_")
        names = _strs(d["names"], f"{what}: names") if "names" in d else tuple(f"{prefix}{j}" for j in joints)
        if len(names) != len(joints):
            raise ContractError(f"{what}: {len(names)} names for {len(joints)} joints")
        kw.update(joints=joints, names=names, topic=d.get("topic", JOINT_STATES if side == "observation" else None))
        if "continuous" in d:
            cont = d["continuous"]
            if not isinstance(cont, list) or len(cont) != len(joints) or not all(isinstance(c, bool) for c in cont):
                raise ContractError(f"{what}: continuous needs one true/false per joint, got {cont!r}")
            kw["continuous"] = tuple(cont)
        if "reference" in d:
            kw["reference"] = _floats(d["reference"], f"{what}: reference", len(joints))
        if "limits" in d:
            lim = d["limits"]
            if not isinstance(lim, Mapping) or set(lim) != _LIMIT_KEYS:
                raise ContractError(f"{what}: limits needs exactly {sorted(_LIMIT_KEYS)}, got {lim!r}")
            n = len(joints)
            kw["limits"] = JointLimits(*(_floats(lim[k], f"{what}: limits.{k}", n) for k in ("lower", "upper",
                                                                                          "speed")))
        for key in ("fields", "scope", "value", "wrap_center", "image"):
            if key in d:
                raise ContractError(f"{what}: {key!r} is for vector or image features, not {kind}")
    elif kind == "vector":
        names = _strs(d.get("names"), f"{what}: names")
        kw["names"] = names
        kw["scope"] = d.get("scope", "stream")
        if kw["scope"] not in SCOPES:
            raise ContractError(f"{what}: scope must be one of {', '.join(SCOPES)}, got {kw['scope']!r}")
        if "value" in d:
            kw["value"] = _floats(d["value"], f"{what}: value", len(names))
            if "topic" in d:
                raise ContractError(f"{what}: give a topic or a value, not both")
        else:
            topic, mtype = d.get("topic"), d.get("type")
            if not isinstance(topic, str) or not topic:
                raise ContractError(f"{what}: needs a topic (or a value)")
            if mtype not in VECTOR_TYPES:
                raise ContractError(f"{what}: type {mtype!r} is not one a vector is read from; supported: "
                                    f"{', '.join(VECTOR_TYPES)}")
            fields = _strs(d.get("fields"), f"{what}: fields")
            if len(fields) != len(names):
                raise ContractError(f"{what}: {len(fields)} fields for {len(names)} names")
            for f in fields:
                _check_field(f, mtype, what)
            kw.update(topic=topic, type=mtype, fields=fields)
        if "wrap_center" in d:
            w = d["wrap_center"]
            if not isinstance(w, int | float) or not math.isfinite(w):
                raise ContractError(f"{what}: wrap_center must be a number (rad), got {w!r}")
            kw["wrap_center"] = float(w)
        for key in ("joints", "continuous", "reference", "limits", "image"):
            if key in d:
                raise ContractError(f"{what}: {key!r} is for joint or image features, not vector")
    else:  # image
        img = d.get("image")
        if not isinstance(img, Mapping) or not {"height", "width"} <= set(img) or set(img) - _IMAGE_KEYS:
            raise ContractError(f"{what}: image needs height and width (and may give {sorted(_IMAGE_KEYS)}), "
                                f"got {img!r}")
        h, w = img["height"], img["width"]
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise ContractError(f"{what}: image height and width must be positive integers, got {h!r}, {w!r}")
        mean = _floats(img.get("mean", [0.0, 0.0, 0.0]), f"{what}: image.mean", 3)
        std = _floats(img.get("std", [1.0, 1.0, 1.0]), f"{what}: image.std", 3)
        if min(std) <= 0:
            raise ContractError(f"{what}: image.std must be positive, got {std}")
        topic = d.get("topic")
        if not isinstance(topic, str) or not topic:
            raise ContractError(f"{what}: needs the camera topic")
        if d.get("type", IMAGE_TYPE) != IMAGE_TYPE:
            raise ContractError(f"{what}: images come as {IMAGE_TYPE}, got {d.get('type')!r}")
        kw.update(topic=topic, type=IMAGE_TYPE, image=ImageSpec(h, w, str(img.get("camera", "")), mean, std))
        for key in ("joints", "names", "fields", "value", "continuous", "reference", "limits", "wrap_center"):
            if key in d:
                raise ContractError(f"{what}: {key!r} is not for image features")
    return Feature(**kw)


_FIELD = re.compile(r"[A-Za-z_]\w*(\[\d+\])?(\.[A-Za-z_]\w*(\[\d+\])?)*")
_TOKEN = re.compile(r"[A-Za-z_]\w*|\[\d+\]")


def _check_field(f: str, mtype: str, what: str) -> None:
    """A field path of ``mtype``: attribute names, ``[i]`` for array elements, or ``yaw`` of a pose."""
    if f == "yaw":
        if mtype not in ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/Pose", "geometry_msgs/msg/Pose2D"):
            raise ContractError(f"{what}: field 'yaw' needs a pose type, got {mtype}")
        return
    if not _FIELD.fullmatch(f):
        raise ContractError(f"{what}: field {f!r} is not a message field path (e.g. point.x, data[2], yaw)")


def _check_unique(c: Contract, where: str) -> None:
    seen: set[str] = set()
    for f in c.observation + c.action:
        if f.name in seen:
            raise ContractError(f"{where}: feature name {f.name!r} used twice")
        seen.add(f.name)
    for side, names in (("observation", c.obs_names), ("action", c.action_names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ContractError(f"{where}: {side} component names used twice: {dup}")
    if sum(f.kind == "image" for f in c.observation) > 1:
        raise ContractError(f"{where}: one image feature at most")


def read_field(msg: Any, path: str, wrap_center: float | None = None) -> float:
    """The value of field ``path`` of a message (see :func:`_check_field`); ValueError when it is not there."""
    if path == "yaw":
        if hasattr(msg, "theta"):  # Pose2D
            angle = float(msg.theta)
        else:
            pose = getattr(msg, "pose", msg)
            o = pose.orientation
            angle = math.atan2(2.0 * (o.w * o.z + o.x * o.y), 1.0 - 2.0 * (o.y * o.y + o.z * o.z))
        if wrap_center is not None:
            angle = wrap_center - ((wrap_center - angle + math.pi) % (2 * math.pi)) + math.pi
        return angle
    v: Any = msg
    try:
        for tok in _TOKEN.findall(path):
            v = v[int(tok[1:-1])] if tok.startswith("[") else getattr(v, tok)
    except (AttributeError, IndexError, TypeError) as err:
        raise ValueError(f"field {path!r}: {err}") from None
    if not isinstance(v, int | float):
        raise ValueError(f"field {path!r} is a {type(v).__name__}, not a number")
    return float(v)


def joint_feature_names(joints: Iterable[str], kind: str) -> list[str]:
    """The default observation names of a joint feature (``q_<joint>``, ``qd_<joint>``)."""
    prefix = "q_" if kind == "joint_position" else "qd_"
    return [f"{prefix}{j}" for j in joints]


def consistent(contract: Contract, obs_names: Sequence[str], action_names: Sequence[str], control_dt: float) -> None:
    """Raise ContractError unless the contract describes exactly this model's vectors and rate."""
    if tuple(obs_names) != contract.obs_names:
        raise ContractError(f"contract of task {contract.task!r}: its observation names {list(contract.obs_names)} "
                            f"are not the model's {list(obs_names)}")
    if tuple(action_names) != contract.action_names:
        raise ContractError(f"contract of task {contract.task!r}: its action names {list(contract.action_names)} "
                            f"are not the model's {list(action_names)}")
    if abs(contract.control_dt - control_dt) > 1e-9:
        raise ContractError(f"contract of task {contract.task!r}: control_dt {contract.control_dt} s, the model "
                            f"acts every {control_dt} s")


#: Where a camera policy's frames come from unless its contract says otherwise (the sim node's camera topic).
CAMERA_TOPIC = "camera/image_raw"
JOINT_KINDS = ("joint_position", "joint_velocity")


def camera_contract(contract: Contract, image: ImageSpec, topic: str = CAMERA_TOPIC, name: str = "image") -> Contract:
    """What a camera policy of ``contract``'s task observes: the task's joint features (what the arm reports) and
    frames ``image`` on ``topic``; the task's other observations (a target, an obstacle) it must see in them."""
    joints = tuple(f for f in contract.observation if f.kind in JOINT_KINDS)
    if not joints:
        raise ContractError(f"contract of task {contract.task!r}: no joint features for a camera policy's state")
    feature = Feature(name=name, kind="image", topic=topic, type=IMAGE_TYPE, image=image)
    c = replace(contract, observation=(*joints, feature))
    _check_unique(c, f"camera contract of task {contract.task!r}")
    return c
