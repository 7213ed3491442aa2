"""``gen3_reach_obstacle``: reach a target behind a pillar, passing it on the left or on the right.

Scene (metres, base frame = world): the arm starts at ``HOME_Q`` (plus up to 0.02 rad noise) with the tool
pointing down at about (0.26, 0, 0.20). The target is sampled in the box x in [0.56, 0.62], y in
[-0.05, 0.05], z in [0.14, 0.20]. A vertical cylinder ``pillar`` (radius 0.035 m, 0.30 m tall, standing on
the floor) is placed on the start->target line at x in [0.395, 0.425], shifted sideways by up to 1 cm. The
pillar is taller than the hand's path, so moving straight collides, while the links above the wrist clear it;
passing on either side is equally good, which makes the demonstrations genuinely bimodal. (Lifting the hand
over the pillar is geometrically possible but never demonstrated.)

Scoring (``ReachObstacleTask``, independent of any control rate):
  * success: the end effector (``ee_site``) comes within ``success_radius`` (2 cm) of the target before the
    time limit (8 s) without any earlier arm contact with the pillar;
  * collision: any arm geom in contact with the pillar;
  * side: when the hand crosses the plane through the pillar axis perpendicular to the start->target line,
    the sign of the (z) cross product of the start->target direction with the start->hand vector: positive is
    "left" (counter-clockwise, +y when reaching along +x), negative "right". The last crossing counts; None
    if the hand never got past the pillar.

``Gen3ReachObstacleEnv`` wraps the task as a 10 Hz Gymnasium environment (50 physics steps of 2 ms per
action). Observation (float32, 20): ``[q(7), qd(7), target_xyz(3), pillar_xyz(3)]`` where pillar_xyz is the
centre of the cylinder (z = half its height). Action (float32, 7): absolute joint position targets in rad.
Reward: minus the hand-target distance each step, +10 on success, -10 on collision. The episode terminates
on success or collision and is truncated at the time limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from koopman_sim import gen3
from koopman_sim.arm import Gen3Arm, _as_joint_vector

__all__ = [
    "ACTION_NAMES",
    "OBS_NAMES",
    "EpisodeResult",
    "Gen3ReachObstacleEnv",
    "ReachObstacleTask",
]

OBS_NAMES: tuple[str, ...] = (
    *(f"q_{n}" for n in gen3.JOINT_NAMES),
    *(f"qd_{n}" for n in gen3.JOINT_NAMES),
    "target_x",
    "target_y",
    "target_z",
    "pillar_x",
    "pillar_y",
    "pillar_z",
)
ACTION_NAMES: tuple[str, ...] = gen3.JOINT_NAMES
OBS_DIM = len(OBS_NAMES)
ACTION_DIM = len(ACTION_NAMES)

PILLAR_RADIUS = 0.035
PILLAR_HEIGHT = 0.30
TARGET_LOW = np.array([0.56, -0.05, 0.14])
TARGET_HIGH = np.array([0.62, 0.05, 0.20])
PILLAR_X_RANGE = (0.395, 0.425)
PILLAR_LATERAL_JITTER = 0.01
START_Q_NOISE = 0.02


@dataclass
class EpisodeResult:
    """Outcome of one episode, as scored by ReachObstacleTask."""

    success: bool
    collision: bool
    side: str | None
    final_distance: float
    min_distance: float
    duration: float
    time_to_success: float | None
    target: list[float] = field(default_factory=list)
    pillar: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _add_scene(spec: mujoco.MjSpec) -> None:
    """Floor, pillar, target marker and a camera; the pillar position is moved per episode via geom_pos."""
    spec.visual.global_.offwidth = max(spec.visual.global_.offwidth, 960)
    spec.visual.global_.offheight = max(spec.visual.global_.offheight, 720)
    spec.visual.headlight.ambient = [0.2, 0.2, 0.2]
    wb = spec.worldbody
    wb.add_light(name="scene_light", pos=[0.5, 0.0, 2.0], dir=[0, 0, -1], diffuse=[0.6, 0.6, 0.6])
    wb.add_geom(
        name="floor",
        type=mujoco.mjtGeom.mjGEOM_PLANE,
        size=[1.5, 1.5, 0.05],
        rgba=[0.55, 0.57, 0.6, 1],
        contype=0,
        conaffinity=1,
    )
    wb.add_geom(
        name="pillar",
        type=mujoco.mjtGeom.mjGEOM_CYLINDER,
        size=[PILLAR_RADIUS, PILLAR_HEIGHT / 2, 0],
        pos=[0.41, 0.0, PILLAR_HEIGHT / 2],
        rgba=[0.85, 0.25, 0.2, 1],
        contype=0,
        conaffinity=1,
    )
    tgt = wb.add_body(name="target_body", mocap=True, pos=[0.6, 0.0, 0.17])
    tgt.add_site(
        name="target", type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[0.02, 0, 0], rgba=[0.1, 0.8, 0.2, 0.8]
    )
    # Looking back at the arm from the front-right, so left/right detours appear left/right in the image.
    wb.add_camera(name="overview", pos=[1.55, -0.75, 1.05], xyaxes=[0.53, 0.848, 0, -0.397, 0.248, 0.884])
    _add_policy_camera(spec)


def _add_policy_camera(spec: mujoco.MjSpec) -> None:
    """The camera the image policies see, and a shadow map sized for rendering it at the policy rate.

    ``workspace`` looks at (0.40, 0, 0.14) from 0.8 m (azimuth -40 deg, elevation 55 deg, fovy 45 deg): arm
    hand, pillar, target and the target's shadow (which gives its height) fill a 64x64 frame at about
    1 cm per pixel, where ``overview`` shows the 4 cm target as a single pixel. The 1024 shadow map (MuJoCo's
    default is 4096) cuts offscreen rendering on the CPU (Mesa) from about 125 to 32 ms per frame, measured
    under load on the development VM, with no visible change in the shadows.
    """
    spec.visual.quality.shadowsize = 1024
    spec.worldbody.add_camera(
        name="workspace", pos=[0.7515, -0.295, 0.7953], xyaxes=[0.6428, 0.766, 0.0, -0.6275, 0.5265, 0.5736], fovy=45
    )


class ReachObstacleTask:
    """Samples episodes and scores them from the arm state; knows nothing about control rates.

    The ROS sim node steps ``Gen3Arm`` at 500 Hz and calls ``update()`` after each physics step; the gym
    env does the same inside its 10 Hz ``step``.
    """

    def __init__(self, arm: Gen3Arm, time_limit: float = 8.0, success_radius: float = 0.02):
        if not time_limit > 0 or not success_radius > 0:
            raise ValueError("time_limit and success_radius must be positive")
        self.arm = arm
        self.time_limit = float(time_limit)
        self.success_radius = float(success_radius)
        if mujoco.mj_name2id(arm.model, mujoco.mjtObj.mjOBJ_GEOM, "pillar") < 0:
            arm.edit_scene(_add_scene)
        m = arm.model
        self._pillar = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, "pillar")
        self._target_site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "target")
        self._target_mocap = m.body_mocapid[m.site_bodyid[self._target_site]]
        self._arm_geoms = set(arm.arm_geom_ids.tolist())
        self.target = np.array([0.6, 0.0, 0.17])
        self.pillar = np.array(m.geom_pos[self._pillar])
        self.start_ee = arm.ee_pos
        self._clear_episode()

    def restart_clock(self) -> None:
        """Score from now on, with the time limit counted from now (a robot that waited at its start pose for
        its controller; see koopman_control.core.episodes)."""
        self._clear_episode()

    def _clear_episode(self) -> None:
        self._t0 = self.arm.time
        self.success = False
        self.collision = False
        self.side: str | None = None
        self.time_to_success: float | None = None
        self.distance = float(np.linalg.norm(self.arm.ee_pos - self.target))
        self.min_distance = self.distance
        self._along_prev: float | None = None

    # -- episode -------------------------------------------------------------------------------------------
    def reset(self, rng: np.random.Generator) -> None:
        """Reset the arm to the (noisy) start pose and sample target and pillar."""
        q0 = gen3.HOME_Q + rng.uniform(-START_Q_NOISE, START_Q_NOISE, size=7)
        self.arm.reset(q0)
        start = self.arm.ee_pos
        target = rng.uniform(TARGET_LOW, TARGET_HIGH)
        d = target[:2] - start[:2]
        u = d / np.linalg.norm(d)
        px = rng.uniform(*PILLAR_X_RANGE)
        t = (px - start[0]) / d[0]
        pxy = (
            start[:2]
            + t * d
            + rng.uniform(-PILLAR_LATERAL_JITTER, PILLAR_LATERAL_JITTER) * np.array([-u[1], u[0]])
        )
        self.set_scene(target, np.array([pxy[0], pxy[1], PILLAR_HEIGHT / 2]))

    def set_scene(self, target: np.ndarray, pillar: np.ndarray) -> None:
        """Place target and pillar explicitly (tests, replays); scoring restarts from the arm state now."""
        target = np.asarray(target, dtype=float)
        pillar = np.asarray(pillar, dtype=float)
        if target.shape != (3,) or pillar.shape != (3,) or not np.all(np.isfinite(np.r_[target, pillar])):
            raise ValueError("target and pillar must be finite xyz vectors")
        m, d = self.arm.model, self.arm.data
        self.target = target.copy()
        self.pillar = pillar.copy()
        m.geom_pos[self._pillar] = pillar
        d.mocap_pos[self._target_mocap] = target
        mujoco.mj_forward(m, d)
        self.start_ee = self.arm.ee_pos
        self._clear_episode()

    def observation(self) -> np.ndarray:
        """[q(7), qd(7), target_xyz(3), pillar_xyz(3)] as float32."""
        return np.concatenate([self.arm.q, self.arm.qd, self.target, self.pillar]).astype(np.float32)

    def _pillar_contact(self) -> bool:
        d = self.arm.data
        if d.ncon == 0:
            return False
        g = d.contact.geom[: d.ncon]
        p = self._pillar
        others = np.concatenate([g[g[:, 0] == p, 1], g[g[:, 1] == p, 0]])
        return any(int(o) in self._arm_geoms for o in others)

    def update(self) -> dict[str, Any]:
        """Score the current physics state; call after every physics step (or at least every few)."""
        ee = self.arm.ee_pos
        self.distance = float(np.linalg.norm(ee - self.target))
        self.min_distance = min(self.min_distance, self.distance)
        if self._pillar_contact():
            self.collision = True
        # Side: crossing of the plane through the pillar, perpendicular to the start->target line.
        line = self.target[:2] - self.start_ee[:2]
        u = line / max(np.linalg.norm(line), 1e-9)
        along = float(np.dot(ee[:2] - self.pillar[:2], u))
        if self._along_prev is not None and self._along_prev < 0.0 <= along:
            rel = ee[:2] - self.start_ee[:2]
            self.side = "left" if line[0] * rel[1] - line[1] * rel[0] > 0 else "right"
        self._along_prev = along
        elapsed = self.elapsed
        if (
            not self.success
            and not self.collision
            and self.distance < self.success_radius
            and elapsed <= self.time_limit + 1e-9
        ):
            self.success = True
            self.time_to_success = elapsed
        return {
            "success": self.success,
            "collision": self.collision,
            "side": self.side,
            "distance": self.distance,
            "time": elapsed,
        }

    @property
    def elapsed(self) -> float:
        return self.arm.time - self._t0

    @property
    def timed_out(self) -> bool:
        return self.elapsed >= self.time_limit - 1e-9

    @property
    def done(self) -> bool:
        """True once the episode is decided: success, collision or time limit."""
        return self.success or self.collision or self.timed_out

    def result(self) -> EpisodeResult:
        return EpisodeResult(
            success=self.success,
            collision=self.collision,
            side=self.side,
            final_distance=self.distance,
            min_distance=self.min_distance,
            duration=self.elapsed,
            time_to_success=self.time_to_success,
            target=self.target.tolist(),
            pillar=self.pillar.tolist(),
        )


class Gen3ReachObstacleEnv(gym.Env):
    """10 Hz Gymnasium wrapper around Gen3Arm + ReachObstacleTask (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}  # noqa: RUF012 (gymnasium convention)

    def __init__(
        self,
        render_mode: str | None = None,
        model_path: str | None = None,
        time_limit: float = 8.0,
        control_dt: float = 0.1,
        physics_dt: float = 0.002,
        width: int = 480,
        height: int = 360,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        substeps = control_dt / physics_dt
        if not (control_dt > 0 and abs(substeps - round(substeps)) < 1e-6 and round(substeps) >= 1):
            raise ValueError("control_dt must be a positive multiple of physics_dt")
        self.render_mode = render_mode
        self.control_dt = float(control_dt)
        self.n_substeps = round(substeps)
        self.arm = Gen3Arm(model_path, physics_dt=physics_dt)
        self.task = ReachObstacleTask(self.arm, time_limit=time_limit)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(
            gen3.JOINT_LOWER.astype(np.float32), gen3.JOINT_UPPER.astype(np.float32), dtype=np.float32
        )
        self.obs_names = OBS_NAMES
        self.action_names = ACTION_NAMES
        self._width, self._height = width, height
        self._renderer: mujoco.Renderer | None = None
        self._info: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.task.reset(self.np_random)
        self._info = self.task.update()
        return self.task.observation(), dict(self._info)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        # Validate before anything else so that a bad action leaves the simulation exactly as it was.
        act = _as_joint_vector(action, "action")
        self.arm.set_target(act)
        info = self._info
        for _ in range(self.n_substeps):
            self.arm.step(1)
            info = self.task.update()
            if info["collision"] or info["success"]:
                break
        self._info = info
        terminated = bool(info["success"] or info["collision"])
        truncated = bool(not terminated and self.task.timed_out)
        reward = -info["distance"] + (10.0 if info["success"] else 0.0) - (10.0 if info["collision"] else 0.0)
        return self.task.observation(), float(reward), terminated, truncated, dict(info)

    def result(self) -> EpisodeResult:
        return self.task.result()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.render_frame()

    def render_frame(self, camera: str = "overview") -> np.ndarray:
        """RGB frame (H, W, 3) uint8 from an offscreen renderer (MUJOCO_GL=egl when headless)."""
        if self._renderer is None:
            try:
                self._renderer = mujoco.Renderer(self.arm.model, self._height, self._width)
            except Exception as exc:  # mujoco.FatalError when no GL context can be made
                raise RuntimeError(
                    f"cannot create an offscreen renderer ({exc}); on a headless machine set MUJOCO_GL=egl "
                    "before mujoco is imported"
                ) from exc
        self._renderer.update_scene(self.arm.data, camera=camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
