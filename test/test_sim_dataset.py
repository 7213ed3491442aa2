"""Dataset file format, loader errors, and the koopman-sim CLI (collect/rollout/bench, error exits)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from koopman_sim import cli
from koopman_sim.bench import realtime_factor
from koopman_sim.dataset import DatasetError, load_dataset, write_dataset
from koopman_sim.tasks.reach_obstacle import ACTION_NAMES, OBS_NAMES

KEYS = {"obs", "action", "episode_ends", "episode_success", "episode_side", "episode_seed"}


def _write_small(path: Path, **override) -> str:
    kw = dict(
        obs=np.zeros((5, 20)),
        action=np.ones((5, 7)),
        episode_ends=[2, 5],
        episode_success=[True, False],
        episode_side=[0, -1],
        episode_seed=[7, 8],
        task="gen3_reach_obstacle",
        obs_names=OBS_NAMES,
        action_names=ACTION_NAMES,
        control_dt=0.1,
    )
    kw.update(override)
    return write_dataset(path, **kw)


def test_roundtrip_keys_dtypes_and_sha(tmp_path):
    path = tmp_path / "d.hdf5"
    sha = _write_small(path)
    with h5py.File(path) as f:
        assert set(f.keys()) == KEYS
        assert f["episode_side"].dtype == np.int8 and f["episode_ends"].dtype == np.int64
        assert f["obs"].dtype == np.float32 and f["episode_success"].dtype == bool
        assert set(f.attrs) == {"task", "obs_names", "action_names", "control_dt", "format_version"}
    ds = load_dataset(path)
    assert ds.sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.obs.shape == (5, 20) and ds.action.shape == (5, 7)
    assert ds.obs_names == OBS_NAMES and ds.action_names == ACTION_NAMES
    assert ds.task == "gen3_reach_obstacle" and ds.control_dt == 0.1 and ds.format_version == 1
    assert ds.n_episodes == 2 and ds.episode_slice(1) == slice(2, 5)
    assert ds.images is None


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "nope.hdf5")

    path = tmp_path / "d.hdf5"
    _write_small(path)
    with h5py.File(path, "a") as f:
        del f["episode_seed"]
    with pytest.raises(DatasetError, match="/episode_seed"):
        load_dataset(path)

    _write_small(path)
    with h5py.File(path, "a") as f:
        del f["action"]
        f["action"] = np.zeros((4, 7), np.float32)
    with pytest.raises(DatasetError, match="action has 4"):
        load_dataset(path)

    _write_small(path)
    with h5py.File(path, "a") as f:
        del f["obs"]
        f["obs"] = np.zeros((5, 19), np.float32)
    with pytest.raises(DatasetError, match="19 columns"):
        load_dataset(path)

    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5")
    with pytest.raises(DatasetError, match="HDF5"):
        load_dataset(junk)

    with pytest.raises(DatasetError, match="episode_ends"):
        _write_small(tmp_path / "x.hdf5", episode_ends=[3, 4])


def test_collect_cli_writes_dataset_and_summary(tmp_path, capsys):
    out, summary_path = tmp_path / "demo.hdf5", tmp_path / "summary.json"
    argv = ["collect", "--task", "gen3_reach_obstacle", "--episodes", "4", "--seed", "10"]
    argv += ["--out", str(out), "--json", str(summary_path), "--no-progress", "--no-only-success"]
    assert cli.main(argv) == 0
    summary = json.loads(summary_path.read_text())
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["episodes"] == 4
    for key in ("success_rate", "collision_rate", "left_fraction"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["left_fraction"] == 0.5  # seeds 10..13 are two antithetic pairs
    ds = load_dataset(out)
    assert ds.sha256 == summary["sha256"]
    assert ds.n_episodes == 4 and list(ds.episode_seed) == [10, 11, 12, 13]
    assert ds.episode_ends[-1] == len(ds.obs) == summary["steps_written"]
    assert set(ds.episode_side.tolist()) <= {0, 1, -1}
    assert ds.episode_success.mean() == summary["success_rate"]
    # Each episode starts at rest at the (noisy) home pose and its first action is near it.
    for i in range(ds.n_episodes):
        first = ds.obs[ds.episode_slice(i).start]
        assert np.all(first[7:14] == 0.0)
        assert np.abs(ds.action[ds.episode_slice(i).start] - first[:7]).max() < 0.05


def _run_cli(*args, cwd=None):
    env = dict(os.environ, MUJOCO_GL="egl")
    env.pop("DISPLAY", None)
    return subprocess.run(
        [sys.executable, "-m", "koopman_sim.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["collect", "--task", "gen3_pick", "--episodes", "1", "--out", "x.hdf5"],
            "known tasks: gen3_reach_obstacle",
        ),
        (
            ["collect", "--episodes", "1", "--out", "/nonexistent/dir/x.hdf5"],
            "output directory does not exist",
        ),
        (["rollout", "--episodes", "1", "--model", "/nonexistent/gen3.xml"], "model file not found"),
        (["rollout", "--episodes", "0"], "positive integer"),
        (["rollout", "--render", "out.gif"], ".png or .mp4"),
    ],
    ids=["unknown-task", "bad-out-dir", "missing-model", "bad-episodes", "bad-render-suffix"],
)
def test_cli_errors_exit_2_without_traceback(tmp_path, args, message):
    proc = _run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rollout_renders_png_strip(tmp_path):
    png = tmp_path / "roll.png"
    proc = _run_cli("rollout", "--episodes", "1", "--seed", "3", "--render", str(png))
    if proc.returncode != 0 and "gl" in proc.stderr.lower():
        pytest.skip(f"no offscreen OpenGL here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert "episode 1/1" in proc.stderr and "success" in proc.stderr
    assert json.loads(proc.stdout)["episodes"] == 1
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 10  # a real picture, not a blank canvas


def test_bench_reports_realtime_factor():
    result = realtime_factor(seconds=1.0)
    assert result["sim_seconds"] >= 1.0
    for key in ("realtime_factor", "realtime_factor_physics_only", "realtime_factor_with_expert"):
        assert result[key] > 0
