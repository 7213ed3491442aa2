"""``koopman-distill teacher-data``: record the teacher's sampling trajectories for distillation.

For each observation history of the demonstrations and each of ``--draws`` noise samples, the teacher's
deterministic DDIM sampler (eta = 0, a discretisation of its probability-flow ODE) runs ``--steps`` steps;
every intermediate state is stored, since the flow and consistency students train on them. ``--visited``
adds the observation histories of closed-loop rollouts (``koopman-distill visit``) to the demonstrations'.

``--refine STUDENT`` records the teacher's *refined* end points instead: the one-step student's chunk for each
noise, put back on the DDIM path at ``--refine-progress`` with that noise and denoised by the teacher over the
remaining steps (``DiffusionPolicy.ddim_refine``). The file then holds end points only (``states`` of length 2,
x_T and the refined x_0), for the students that learn end points (kdm, dkoopman). Why: on Push-T the shipped
dkoopman's chunk finished by the teacher from progress 0.7 (9 of 30 steps) scores 0.736 mean max coverage on
seeds 2000-2099, above the student alone (0.418) and the teacher's own DDIM-30 (0.654, 200 episodes):
docs/experiments.md, "Koopman students on Push-T".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from koopman_distill.cli import COMMANDS
from koopman_distill.data import episode_windows, file_sha256, read_visited, write_teacher_data
from koopman_distill.images import record_teacher_data
from koopman_policy.checkpoint import WEIGHTS, load_policy
from koopman_policy.students.kdm import KoopmanStudent
from koopman_policy.teacher import DiffusionPolicy, refine_start
from koopman_sim.dataset import load_dataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher-data", help=COMMANDS["teacher-data"])
    p.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint directory")
    p.add_argument("--data", required=True, help="demonstrations the teacher was trained on")
    p.add_argument("--visited", nargs="*", type=Path, default=[],
                   help="visited-state files (koopman-distill visit) whose histories are labelled too")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory (default 10)")
    p.add_argument("--draws", type=int, default=4, help="noise samples per observation (default 4)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", type=Path,
                   help="a trained kdm or dkoopman student: record its chunks refined by the teacher (see above)")
    p.add_argument("--refine-progress", type=float, default=0.7,
                   help="where on the --steps DDIM path the student's chunk re-enters (default 0.7)")
    p.set_defaults(func=run)


def refine_source(args: argparse.Namespace, teacher: DiffusionPolicy) -> KoopmanStudent | None:
    """The student whose chunks ``--refine`` finishes, checked against the teacher it must share a space with."""
    if args.refine is None:
        return None
    student = load_policy(args.refine)
    if not isinstance(student, KoopmanStudent):
        raise ValueError(f"--refine {args.refine} holds a {student.method!r} policy; refined data is for the "
                         "Koopman students (kdm, dkoopman), which learn end points only")
    s, t = student.config, teacher.config
    if (s.obs_dim, s.action_dim, s.horizon, s.n_obs_steps) != (t.obs_dim, t.action_dim, t.horizon, t.n_obs_steps):
        raise ValueError(f"--refine {args.refine} does not fit the teacher's (obs_dim, action_dim, horizon, "
                         f"n_obs_steps) = ({t.obs_dim}, {t.action_dim}, {t.horizon}, {t.n_obs_steps})")
    try:
        refine_start(args.refine_progress, args.steps)
    except ValueError as err:
        raise ValueError(f"--refine-progress: {err}") from None
    return student.eval()


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    teacher = load_policy(args.teacher)
    if not isinstance(teacher, DiffusionPolicy):
        raise ValueError(f"{args.teacher} holds a {teacher.method!r} policy, not the diffusion teacher")
    if getattr(teacher, "image_inputs", False):  # the camera teacher (koopman_distill.images)
        if args.refine is not None:
            raise ValueError("--refine is for teachers of state observations; the camera teacher has no refined data")
        return record_teacher_data(args, teacher)
    if args.steps < 1 or args.draws < 1:
        raise ValueError("--steps and --draws must be positive")
    c = teacher.config
    demos = load_dataset(args.data)
    obs = episode_windows(demos.obs, demos.action, demos.episode_ends, c.horizon, c.n_obs_steps)["obs"]
    visited = [read_visited(path, c.n_obs_steps, c.obs_dim) for path in args.visited]
    obs = torch.cat([obs, *visited]).repeat(args.draws, 1, 1)
    student = refine_source(args, teacher)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(obs), c.horizon, c.action_dim), generator=gen)
    chunks, timesteps = [], None
    for i in tqdm(range(0, len(obs), args.batch_size), desc="teacher-data", dynamic_ncols=True):
        o, x = obs[i : i + args.batch_size], noise[i : i + args.batch_size]
        obs_n = teacher.encode_obs(o)
        if student is None:
            traj = teacher.ddim_trajectory(obs_n, x, args.steps)
            chunks.append(traj.states)
            timesteps = traj.timesteps
        else:
            x0 = teacher.ddim_refine(obs_n, student.sample_normalized(obs_n, x)[0], x, args.steps, args.refine_progress)
            chunks.append(torch.stack([x, x0], dim=1))
    states = torch.cat(chunks)
    refined: dict[str, object] = {}
    if student is not None:
        teacher.ddim.set_timesteps(args.steps)
        timesteps = torch.tensor([int(teacher.ddim.timesteps[0]), -1])
        refined = {"refined_by": str(args.refine), "refined_by_sha256": file_sha256(args.refine / WEIGHTS),
                   "refine_progress": args.refine_progress}
    write_teacher_data(
        args.out, obs, states, timesteps,
        teacher_sha256=file_sha256(args.teacher / "model.safetensors"),
        dataset_sha256=demos.sha256, visited_sha256=",".join(file_sha256(p) for p in args.visited),
        steps=args.steps, draws=args.draws, seed=args.seed, **refined,
    )
    extra = f" ({sum(len(v) for v in visited)} visited histories per draw)" if visited else ""
    what = (f"end points of {args.refine}'s chunks finished by DDIM-{args.steps} from progress {args.refine_progress}"
            if student is not None else f"trajectories of {args.steps} DDIM steps")
    print(f"teacher-data: {len(obs)} {what}{extra} -> {args.out}")
    return 0
