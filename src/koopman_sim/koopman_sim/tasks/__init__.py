"""Tasks built on :class:`koopman_sim.arm.Gen3Arm`."""

from koopman_sim.tasks.reach_obstacle import (
    ACTION_NAMES,
    OBS_NAMES,
    EpisodeResult,
    Gen3ReachObstacleEnv,
    ReachObstacleTask,
)

__all__ = ["ACTION_NAMES", "OBS_NAMES", "EpisodeResult", "Gen3ReachObstacleEnv", "ReachObstacleTask"]
