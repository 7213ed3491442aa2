"""Method name -> policy class, the single place that lists every policy."""

from __future__ import annotations

from koopman_policy.base import BasePolicy
from koopman_policy.students.bc import BCPolicy
from koopman_policy.students.cd import CDPolicy
from koopman_policy.students.dkoopman import DKoopmanPolicy
from koopman_policy.students.kdm import KDMPolicy
from koopman_policy.students.oneflow import OneFlowPolicy
from koopman_policy.teacher import DiffusionPolicy

POLICIES: dict[str, type[BasePolicy]] = {
    cls.method: cls for cls in (DiffusionPolicy, KDMPolicy, DKoopmanPolicy, OneFlowPolicy, CDPolicy, BCPolicy)
}
STUDENT_METHODS: tuple[str, ...] = tuple(m for m in POLICIES if m != "teacher")


def policy_class(method: str) -> type[BasePolicy]:
    try:
        return POLICIES[method]
    except KeyError:
        raise ValueError(f"unknown policy method {method!r}; known: {', '.join(POLICIES)}") from None
