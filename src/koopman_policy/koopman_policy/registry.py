"""Method name -> policy class, the single place that lists every policy.

``POLICIES`` holds the policies over the task's state vector; ``IMAGE_POLICIES`` those that see camera
frames plus the joint state (:mod:`koopman_policy.vision`). They take different observations, so code that
builds state observations iterates ``POLICIES``; :func:`policy_class` (checkpoints) resolves both.
"""

from __future__ import annotations

from koopman_policy.base import BasePolicy
from koopman_policy.students.bc import BCPolicy
from koopman_policy.students.cd import CDPolicy
from koopman_policy.students.dkoopman import DKoopmanPolicy
from koopman_policy.students.kdm import KDMPolicy
from koopman_policy.students.oneflow import OneFlowPolicy
from koopman_policy.teacher import DiffusionPolicy
from koopman_policy.vision import ImageDiffusionPolicy, ImageDKoopmanPolicy

POLICIES: dict[str, type[BasePolicy]] = {
    cls.method: cls for cls in (DiffusionPolicy, KDMPolicy, DKoopmanPolicy, OneFlowPolicy, CDPolicy, BCPolicy)
}
STUDENT_METHODS: tuple[str, ...] = tuple(m for m in POLICIES if m != "teacher")
IMAGE_POLICIES: dict[str, type[BasePolicy]] = {cls.method: cls for cls in (ImageDiffusionPolicy, ImageDKoopmanPolicy)}


def policy_class(method: str) -> type[BasePolicy]:
    try:
        return POLICIES.get(method) or IMAGE_POLICIES[method]
    except KeyError:
        known = ", ".join([*POLICIES, *IMAGE_POLICIES])
        raise ValueError(f"unknown policy method {method!r}; known: {known}") from None
