"""The stand-in's ``kortex_api`` messages and errors: ``Session_pb2``, ``Base_pb2`` and ``BaseCyclic_pb2`` look-alikes.

They behave like the generated protobuf classes as far as the bridge uses them (fields with defaults, nested
messages, repeated fields with ``add()``, unknown fields refused), so the bridge builds and reads them exactly as
it does Kinova's. Units are Kortex's: degrees in [0, 360), deg/s.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar


# -- errors (kortex_api.Exceptions) ------------------------------------------------------------------------------
class KException(Exception):
    def __init__(self, code: int, sub_code: int, description: str) -> None:
        super().__init__(description)
        self._code, self._sub = code, sub_code

    def get_error_code(self) -> int:
        return self._code

    def get_error_sub_code(self) -> int:
        return self._sub


class KServerException(KException):
    """The arm refused a request (no session, wrong servoing mode, in fault...)."""


class KClientException(KException):
    """The request never got an answer (not connected, connection dropped)."""


# Error codes, as in Errors_pb2 (values only need to be distinct here).
ERROR_DEVICE, ERROR_NO_SESSION, ERROR_WRONG_MODE, ERROR_IN_FAULT, ERROR_INVALID_PARAM = 1, 2, 3, 4, 5


# -- protobuf-like messages -------------------------------------------------------------------------------------
class _Repeated(list):
    """A repeated message field: ``add()`` appends a new element, as in protobuf."""

    def __init__(self, factory: type) -> None:
        super().__init__()
        self._factory = factory

    def add(self) -> Any:
        item = self._factory()
        self.append(item)
        return item


class _Msg:
    _fields: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kw: Any) -> None:
        for name, default in self._fields.items():
            if isinstance(default, type) and issubclass(default, _Msg):
                setattr(self, name, default())
            elif isinstance(default, tuple) and default[0] == "repeated":
                setattr(self, name, _Repeated(default[1]))
            else:
                setattr(self, name, default)
        for k, v in kw.items():
            if k not in self._fields:
                raise AttributeError(f"{type(self).__name__} has no field {k!r}")
            setattr(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields and not name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({body})"


def _msg(type_name: str, /, **fields: Any) -> type[_Msg]:
    return type(type_name, (_Msg,), {"_fields": fields})


def _rep(factory: type) -> tuple[str, type]:
    return ("repeated", factory)


# Session_pb2
CreateSessionInfo = _msg("CreateSessionInfo", username="", password="", session_inactivity_timeout=0,
                         connection_inactivity_timeout=0)
Session_pb2 = SimpleNamespace(CreateSessionInfo=CreateSessionInfo)

# Base_pb2
UNSPECIFIED_SERVOING_MODE, SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING, BYPASS_SERVOING = 0, 2, 3, 4
(ARMSTATE_UNSPECIFIED, ARMSTATE_BASE_INITIALIZATION, ARMSTATE_IDLE, ARMSTATE_INITIALIZATION, ARMSTATE_IN_FAULT,
 ARMSTATE_MAINTENANCE, ARMSTATE_SERVOING_LOW_LEVEL, ARMSTATE_SERVOING_READY, ARMSTATE_SERVOING_PLAYING_SEQUENCE,
 ARMSTATE_SERVOING_MANUALLY_CONTROLLED) = range(10)
JointSpeed = _msg("JointSpeed", joint_identifier=0, value=0.0, duration=0)
JointSpeeds = _msg("JointSpeeds", joint_speeds=_rep(JointSpeed), duration=0)
JointAngle = _msg("JointAngle", joint_identifier=0, value=0.0)
JointAngles = _msg("JointAngles", joint_angles=_rep(JointAngle))
ConstrainedJointAngles = _msg("ConstrainedJointAngles", joint_angles=JointAngles)
Action = _msg("Action", name="", application_data="", reach_joint_angles=ConstrainedJointAngles)
ServoingModeInformation = _msg("ServoingModeInformation", servoing_mode=UNSPECIFIED_SERVOING_MODE)
ArmStateInformation = _msg("ArmStateInformation", active_state=ARMSTATE_UNSPECIFIED, connection=None)
ActuatorInformation = _msg("ActuatorInformation", count=0)
Base_pb2 = SimpleNamespace(
    JointSpeed=JointSpeed, JointSpeeds=JointSpeeds, JointAngle=JointAngle, JointAngles=JointAngles,
    ConstrainedJointAngles=ConstrainedJointAngles, Action=Action, ServoingModeInformation=ServoingModeInformation,
    ArmStateInformation=ArmStateInformation, ActuatorInformation=ActuatorInformation,
    UNSPECIFIED_SERVOING_MODE=UNSPECIFIED_SERVOING_MODE, SINGLE_LEVEL_SERVOING=SINGLE_LEVEL_SERVOING,
    LOW_LEVEL_SERVOING=LOW_LEVEL_SERVOING, BYPASS_SERVOING=BYPASS_SERVOING,
    ARMSTATE_IN_FAULT=ARMSTATE_IN_FAULT, ARMSTATE_SERVOING_READY=ARMSTATE_SERVOING_READY,
    ARMSTATE_SERVOING_LOW_LEVEL=ARMSTATE_SERVOING_LOW_LEVEL,
    ARMSTATE_SERVOING_PLAYING_SEQUENCE=ARMSTATE_SERVOING_PLAYING_SEQUENCE,
)

# BaseCyclic_pb2
ActuatorCommand = _msg("ActuatorCommand", command_id=0, flags=0, position=0.0, velocity=0.0, torque_joint=0.0,
                       current_motor=0.0)
ActuatorFeedback = _msg("ActuatorFeedback", command_id=0, status_flags=0, jitter_comm=0, position=0.0,
                        velocity=0.0, torque=0.0, current_motor=0.0, voltage=0.0, temperature_motor=0.0,
                        temperature_core=0.0, fault_bank_a=0, fault_bank_b=0, warning_bank_a=0, warning_bank_b=0)
BaseFeedback = _msg("BaseFeedback", active_state_connection_identifier=0, active_state=ARMSTATE_UNSPECIFIED,
                    arm_voltage=24.0, arm_current=0.0, fault_bank_a=0, fault_bank_b=0, warning_bank_a=0,
                    warning_bank_b=0)
Command = _msg("Command", frame_id=0, actuators=_rep(ActuatorCommand))
Feedback = _msg("Feedback", frame_id=0, base=BaseFeedback, actuators=_rep(ActuatorFeedback))
BaseCyclic_pb2 = SimpleNamespace(Command=Command, Feedback=Feedback, ActuatorCommand=ActuatorCommand,
                                 ActuatorFeedback=ActuatorFeedback, BaseFeedback=BaseFeedback)

FAULT_EMERGENCY_STOP = 1 << 0  # fault_bank_a bit reported after ApplyEmergencyStop
FAULT_FOLLOWING_ERROR = 1 << 1  # fault_bank_a bit reported after a low-level frame that jumps
