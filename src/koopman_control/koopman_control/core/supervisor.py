"""Which source drives the arm: the student, the teacher as fallback, or nothing (hold).

A state machine evaluated once per control tick with the student's health. One bad tick switches to the
teacher at once (a fast student that misbehaves once is not trusted for the next chunk); getting back needs
``recover_ticks`` consecutive healthy ticks (hysteresis), so a student hovering at its OOD threshold does
not flap between sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Mode(StrEnum):
    STUDENT = "student"  # the selected one-step policy drives the arm
    FALLBACK = "teacher_fallback"  # the student is unhealthy: the teacher's chunks are forwarded
    TEACHER = "teacher"  # the teacher itself is the selected policy
    HOLD = "hold"  # no healthy source: nothing is published and the arm holds after its command timeout


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = "ok"
    kind: str = "ok"  # ok | exception | nonfinite | limits | deadline | ood | shape


HEALTHY = Health(True)


@dataclass
class Transition:
    stamp_ns: int
    old: Mode
    new: Mode
    reason: str


@dataclass
class FallbackSupervisor:
    fallback_enabled: bool = True
    recover_ticks: int = 10
    mode: Mode = Mode.STUDENT
    fallback_events: int = 0
    healthy_streak: int = 0
    last_reason: str = ""
    unhealthy_by_kind: dict[str, int] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.recover_ticks < 1:
            raise ValueError(f"recover_ticks must be >= 1, got {self.recover_ticks}")

    def select(self, is_teacher: bool, stamp_ns: int = 0) -> Mode:
        """A new policy was selected: a teacher runs as itself, a student starts trusted."""
        self._switch(Mode.TEACHER if is_teacher else Mode.STUDENT, stamp_ns, "policy selected")
        self.healthy_streak = 0
        return self.mode

    def update(self, health: Health, stamp_ns: int = 0) -> Mode:
        """Feed the health of this tick's output of the selected policy; returns the mode for this tick."""
        if not health.ok:
            self.unhealthy_by_kind[health.kind] = self.unhealthy_by_kind.get(health.kind, 0) + 1
            self.last_reason = health.reason
            self.healthy_streak = 0
        if self.mode is Mode.TEACHER:
            return self.mode  # the teacher as the selected policy: nothing to fall back to
        if not health.ok:
            if self.mode is Mode.STUDENT:
                new = Mode.FALLBACK if self.fallback_enabled else Mode.HOLD
                self.fallback_events += 1
                self._switch(new, stamp_ns, health.reason)
            return self.mode
        if self.mode is Mode.STUDENT:
            return self.mode
        self.healthy_streak += 1
        if self.healthy_streak >= self.recover_ticks:
            self._switch(Mode.STUDENT, stamp_ns, f"{self.healthy_streak} healthy ticks")
            self.healthy_streak = 0
        return self.mode

    def set_fallback_enabled(self, enabled: bool, stamp_ns: int = 0) -> None:
        self.fallback_enabled = enabled
        if self.mode is Mode.FALLBACK and not enabled:
            self._switch(Mode.HOLD, stamp_ns, "teacher fallback disabled")
        elif self.mode is Mode.HOLD and enabled:
            self._switch(Mode.FALLBACK, stamp_ns, "teacher fallback enabled")

    def _switch(self, new: Mode, stamp_ns: int, reason: str) -> None:
        if new is not self.mode:
            self.transitions.append(Transition(stamp_ns, self.mode, new, reason))
            del self.transitions[:-100]
            self.mode = new
