"""Offline replay, its report, the player's timing and the bag -> dataset converter, on bags the project wrote.

The reference bags come from ``record_sim_run``: the live stack's cores (sim physics + executor, the ingest's
observation builder, ``PolicyRunner``) stepped on a virtual clock. Replaying the policy that drove a run must
reproduce its recorded commands exactly; that is the check that the replay rebuilds observations, noise and
timing the way the stack does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from koopman_control.bag import topics as T
from koopman_control.bag.cli import main as bag_main
from koopman_control.bag.player import load_playback, read_stamp, restamp, schedule
from koopman_control.bag.reader import load_run
from koopman_control.bag.replay import ReplayError, jerk_stats, replay
from koopman_control.bag.simrun import record_sim_run


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from koopman_control.testing import export_untrained

    d = tmp_path_factory.mktemp("models")
    return {m: str(export_untrained(m, d / f"{m}.onnx")) for m in ("bc", "kdm")}


@pytest.fixture(scope="module")
def policy_bag(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bags") / "bc_run"
    record_sim_run(out, driver="policy", policy=models["bc"], duration_s=4.0, feedback_rate_hz=100.0)
    return out


def test_replay_reproduces_the_driving_policy(policy_bag: Path, models: dict[str, str]) -> None:
    run = load_run(policy_bag)
    res = replay(run, [models["bc"], models["kdm"]], teacher="none")
    s = res.summary
    assert s["ticks"] == 40 and s["policy_rate_hz"] == pytest.approx(10.0)
    oc = s["observation_check"]
    assert oc["matched"] == oc["identical"] == 40 and oc["max_abs_diff"] == 0.0
    bc, kdm = s["policies"]["bc"], s["policies"]["kdm"]
    assert bc["error_vs_recorded"]["matched"] == 40
    assert bc["error_vs_recorded"]["rmse"] < 1e-6  # same model, same noise, same observations
    assert kdm["error_vs_recorded"]["rmse"] > 1e-4  # a different policy differs
    assert kdm["ood"]["count"] == 40  # Koopman students report a latent residual
    assert bc["latency_ms"]["count"] == 40 and bc["latency_ms"]["p50"] > 0
    assert bc["replay"]["realtime_factor"] > 10  # far faster than real time even on a busy 2-core machine
    assert s["recorded"]["modes"]["fraction"] == {"student": 1.0}
    assert bc["modes"]["fraction"] == {"student": 1.0}
    assert bc["jerk_executed"]["count"] == 40 - 3 and np.isfinite(bc["jerk_executed"]["rms"])
    rec = s["recorded"]["jerk_executed"]["rms"]
    assert bc["jerk_executed"]["rms"] == pytest.approx(rec, rel=1e-5)


def test_replay_cli_writes_report(policy_bag: Path, models: dict[str, str], tmp_path: Path, capsys) -> None:
    out, summary_json = tmp_path / "report", tmp_path / "summary.json"
    code = bag_main(["replay", str(policy_bag), "--policies", f"{models['bc']},{models['kdm']}", "--teacher",
                     models["kdm"], "--out", str(out), "--json", str(summary_json)])
    assert code == 0
    assert f"wrote {summary_json}" in capsys.readouterr().out
    summary = json.loads(summary_json.read_text())
    assert summary["teacher"]["source"] == "offline:kdm"
    assert summary["policies"]["kdm"]["error_vs_teacher"]["rmse"] == 0.0
    assert summary["policies"]["bc"]["error_vs_teacher"]["matched"] == 40
    for name in ("report.md", "report.json", "actions.png", "errors.png", "latency.png"):
        assert (out / name).stat().st_size > 500, name
    md = (out / "report.md").read_text()
    assert "| bc | bc |" in md and "![Executed actions](actions.png)" in md
    assert json.loads((out / "report.json").read_text())["ticks"] == 40


def test_replay_errors_are_clear(policy_bag: Path, models: dict[str, str], capsys) -> None:
    run = load_run(policy_bag)
    with pytest.raises(ReplayError, match="no /teacher/action_chunk"):
        replay(run, [models["bc"]], teacher="recorded")
    assert bag_main(["replay", str(policy_bag), "--policies", "no_such_policy"]) == 2
    assert "unknown policy 'no_such_policy'" in capsys.readouterr().err


def test_rebuilt_grid_matches_a_live_grid_anchored_before_recording() -> None:
    """A live ingest anchored its grid on a sample before the recording; the rebuild only sees later ticks.
    Starting on a recorded tick sample alone puts the grid up to one feedback period late; the phase estimated
    from the recorded ticks reproduces every later live tick."""
    from koopman_control.bag.observations import grid_phase
    from koopman_control.contracts import resolve_contract
    from koopman_control.core.observation import StateObservationBuilder

    rng = np.random.default_rng(0)
    names = [f"joint_{i}" for i in range(1, 8)]
    stamps = np.cumsum(rng.uniform(8e6, 12e6, 600)).astype(np.int64)  # 100 Hz feedback with jitter
    zeros = np.zeros(7)

    def ticks(builder: StateObservationBuilder, samples: np.ndarray, align: int | None = None) -> list[int]:
        out = []
        for i, s in enumerate(samples):
            if builder.on_joint_state(names, zeros, zeros, int(s), int(s)) is not None or i == 0:
                out.append(int(s))
            if i == 0 and align is not None:
                builder.align_grid(align)
        return out

    joints = [f for f in resolve_contract("").observation if f.kind == "joint_position"]
    live = ticks(StateObservationBuilder(joints, 1, 10.0), stamps)
    recorded = [t for t in live if t > stamps[100]]  # the recorder starts a second in
    start = int(np.searchsorted(stamps, recorded[0]))
    naive = ticks(StateObservationBuilder(joints, 1, 10.0), stamps[start:])
    b = StateObservationBuilder(joints, 1, 10.0)
    aligned = ticks(b, stamps[start:], grid_phase(recorded, b.period_ns, b.tol_ns))
    assert aligned == recorded
    assert naive != recorded  # this seed's jitter puts a grid point between samples: the naive grid drifts


def test_jerk_of_a_cubic() -> None:
    dt = 0.1
    t = np.arange(20) * dt
    a = np.stack([t**3, -2 * t**3], axis=1)
    j = jerk_stats(a, np.ones(20, bool), [slice(0, 10), slice(10, 20)], dt)
    assert j["count"] == 14  # 7 per segment: no difference across the segment boundary
    assert j["max"] == pytest.approx(6 * np.sqrt(5), rel=1e-6)


def test_player_schedule_and_restamp(policy_bag: Path) -> None:
    pb = load_playback(policy_bag)
    assert set(pb.types) == {T.JOINT_STATES, T.TARGET, T.PILLAR, T.EPISODE, T.EPISODE_RESULT} & set(pb.types)
    assert T.ACTION_CHUNK not in pb.types and T.OBSERVATION not in pb.types  # the live stack computes those
    js = [i for i in pb.items if i.topic == T.JOINT_STATES]
    start = 1_800_000_000_000_000_000
    due0, data0 = schedule(pb, js[0], start, rate=2.0)
    due1, data1 = schedule(pb, js[1], start, rate=2.0)
    assert due1 - due0 == (js[1].log_ns - js[0].log_ns) // 2  # timing scaled by the rate
    assert read_stamp(data1) - read_stamp(data0) == (js[1].stamp_ns - js[0].stamp_ns) // 2
    assert due0 - read_stamp(data0) == (js[0].log_ns - js[0].stamp_ns) // 2  # transport delay kept (scaled)
    assert data0[12:] == js[0].data[12:] and restamp(js[0].data, js[0].stamp_ns) == js[0].data


def test_bag_to_dataset_trains_a_teacher(tmp_path: Path, capsys) -> None:
    from koopman_distill.cli import main as distill_main
    from koopman_sim.dataset import load_dataset

    bag = tmp_path / "expert"
    record_sim_run(bag, driver="expert", duration_s=12.0, feedback_rate_hz=100.0, storage="sqlite3")
    run = load_run(bag)
    demos = tmp_path / "demos.h5"
    report = tmp_path / "summary.json"
    assert distill_main(["bag-to-dataset", str(bag), "--out", str(demos), "--json", str(report)]) == 0
    summary = json.loads(report.read_text())
    d = load_dataset(demos)
    assert summary["action_source"][str(bag)] == "chunk" and d.n_steps == summary["rows"]
    assert d.obs.shape[1] == 20 and d.control_dt == pytest.approx(0.1)
    assert d.episode_success[0] and d.episode_side[0] in (0, 1) and d.episode_seed[0] == run.results[0]["seed"]
    # Each action is the command recorded for that observation's stamp (the chunk's first point).
    first = run.chunks[0].positions[0]
    assert np.allclose(d.action[0], first, atol=1e-6)
    assert distill_main(["teacher", "--data", str(demos), "--out", str(tmp_path / "teacher"), "--steps", "2",
                         "--batch-size", "8", "--set", "down_dims=16,32"]) == 0
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
