"""The stack as a ROS 2 user runs it: ``colcon build`` of this repository in a workspace, then the real
``ros2 launch koopman_control kinova.launch.py``, ``ros2 param`` and ``ros2 topic`` (see :mod:`ros2_cli`).

The in-process tests drive the node classes; only this module checks what a user types: that the launch
file starts every node from the installed package, the episodes succeed through it, the policy parameter
reads back and swaps over the CLI, ``koopman-control`` is on PATH after sourcing the workspace, and Ctrl-C
ends every node cleanly. Skipped where there is neither a ROS 2 installation nor ``../shared/ros2-src``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import ros2_cli
import yaml
from ros2_cli import REPO, EpisodeRecorder, Launch, Shell, Underlay

pytestmark = pytest.mark.slow

#: pip requirements of the env the nodes run in where no ROS 2 is installed (the nodes run on the env's
#: python). The policy node still imports torch, so this is the whole project list for now; a torch-free
#: runtime list (docker/requirements-runtime.txt plus onnxruntime and the ros-* message wheels) can replace it.
ENV_REQUIREMENTS = REPO / "requirements.txt"

LAUNCH = "ros2 launch koopman_control kinova.launch.py"
#: The README's ROS 2 command lines this module runs as written (test_readme checks the README against it).
README_LINES = (
    "colcon build && source install/setup.bash",  # the workspace fixture
    LAUNCH,  # default_stack
    f"{LAUNCH} policy:=oneflow policy_rate:=100.0",  # test_oneflow_at_100hz
    f"{LAUNCH} task:=pusht policy:=pusht_oneflow",  # test_pusht_launch
    "ros2 param set /policy policy oneflow",  # test_policy_swap_at_run_time
)
MIN_EPISODES = 3
MIN_SUCCESS_RATE = 0.6  # the default student succeeds in about 0.97 of episodes in process
FIRST_RESULT_TIMEOUT = 180.0  # s: node start-up (torch, onnxruntime, MuJoCo imports) on a loaded 2-core machine
EPISODES_TIMEOUT = 120.0  # s for MIN_EPISODES more results (an episode lasts at most its 8 s time limit)
CLI_TIMEOUT = 60.0
# Two ROS_DOMAIN_IDs of this process (one per launch, so a launch left running cannot answer the other's CLI
# calls), clear of koopman_control.testing.session_domain_id's 1..101 and below FastDDS's limit of 232.
DOMAIN = 120 + os.getpid() % 100


def _say(config: pytest.Config, msg: str) -> None:
    """A line in the CI log of a passing run too, past pytest's capture (the episode figures are the point)."""
    tr = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if tr is None or capman is None:
        print(msg)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line(f"[ros2 launch] {msg}")


def _catalogue_default() -> str:
    return str(yaml.safe_load((REPO / "config" / "policies.yaml").read_text())["default"])


@pytest.fixture(scope="module")
def underlay(pytestconfig: pytest.Config) -> Iterator[Underlay]:
    found = ros2_cli.find_ros_install()
    if found is not None:
        _say(pytestconfig, f"using {found.description}")
        yield found
        return
    missing = ros2_cli.missing_env_inputs()
    if missing:
        pytest.skip(f"no ROS 2 here: no installation (ros2 on PATH with launch_ros, or /opt/ros/*/setup.bash) and "
                    f"nothing to build the launch env from ({', '.join(missing)} missing)")
    with ros2_cli.built_env(ENV_REQUIREMENTS, log=lambda m: _say(pytestconfig, m)) as env:
        yield env


@pytest.fixture(scope="module")
def workspace(underlay: Underlay, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Shell:
    """A colcon workspace with this repository under src/, built as the README says."""
    ws = tmp_path_factory.mktemp("colcon_ws")
    (ws / "src").mkdir()
    (ws / "src" / "koopman_control_repo").symlink_to(REPO, target_is_directory=True)
    (ws / "tmp").mkdir()  # launch_ros writes a parameter file per node there and never deletes it
    shell = Shell(underlay, ws, env={"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                                     "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
                                     "ROS_LOG_DIR": str(ws / "ros_log"), "TMPDIR": str(ws / "tmp")})
    t0 = time.monotonic()
    r = shell.run("colcon build", timeout=600)
    assert r.returncode == 0, f"colcon build failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    _say(pytestconfig, f"colcon build in {time.monotonic() - t0:.0f} s ({ws})")
    shell.sources = (ws / "install" / "setup.bash",)
    return shell


@dataclass
class Stack:
    """A running ``ros2 launch`` with a ``ros2 topic echo`` of the episode results beside it."""

    shell: Shell
    env: dict[str, str]
    launch: Launch
    episodes: EpisodeRecorder
    read: dict[str, str] = field(default_factory=dict)  # "node name" -> value last read with ros2 param get

    def fail(self, msg: str) -> NoReturn:
        pytest.fail(f"{msg}\n---- ros2 launch (last 200 lines) ----\n{self.launch.text(200)}\n"
                    f"---- ros2 topic echo /task/episode_result (last 40 lines) ----\n{self.episodes.text(40)}",
                    pytrace=False)

    def results(self, after: float = 0.0) -> list[dict[str, Any]]:
        return [r for t, r in self.episodes.results() if t > after]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate``; fail at once with the launch output if a node dies or the launch ends."""
        t_end = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if problem := self.launch.problem():
                self.fail(f"while waiting for {what}: {problem}")
            if time.monotonic() > t_end:
                self.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def ros2(self, args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.shell.run(f"ros2 {args}", timeout=timeout, env=self.env)

    def param_get(self, node: str, name: str) -> str:
        r = self.ros2(f"param get --no-daemon --timeout 20 {node} {name}")
        m = re.search(r"value is: ?(.*)$", r.stdout, re.M)
        if r.returncode or not m:
            self.fail(f"ros2 param get {node} {name} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
        self.read[f"{node} {name}"] = value = m.group(1).strip()
        return value

    def param_set(self, node: str, name: str, value: str) -> tuple[bool, str]:
        """(accepted, what the CLI said). ``ros2 param set`` exits 0 either way; its message tells."""
        r = self.ros2(f"param set --no-daemon --timeout 20 {node} {name} {value}")
        said = (r.stdout + r.stderr).strip()
        if r.returncode or not ("Set parameter successful" in said or "Setting parameter failed" in said):
            self.fail(f"ros2 param set {node} {name} {value}: no answer (rc {r.returncode}):\n{said}")
        return "Set parameter successful" in said, said


@contextmanager
def running_stack(shell: Shell, launch_args: str, domain: int) -> Iterator[Stack]:
    env = {"ROS_DOMAIN_ID": str(domain)}
    launch = shell.spawn(f"exec {LAUNCH} {launch_args}", env=env, kind=Launch)
    episodes = shell.spawn(ros2_cli.episode_echo_command(), env=env, kind=EpisodeRecorder)
    try:
        yield Stack(shell, env, launch, episodes)
    finally:
        episodes.stop()
        launch.stop_and_check()  # a no-op once a test stopped it; otherwise ends it and kills leftovers


def _after_startup(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results from the first scored episode on. An episode before it that no chunk ever started (the sim
    gives up after its ``start_timeout`` and says so in ``start``) measures how long a loaded machine took to
    start the nodes, not the policy; one later on counts as a failure."""
    first = next((i for i, r in enumerate(results) if not r.get("start")), len(results))
    return results[first:]


def _figures(results: list[dict[str, Any]]) -> tuple[int, int, float, str]:
    n = len(results)
    ok = sum(bool(r.get("success")) for r in results)
    collisions = sum(bool(r.get("collision")) for r in results)
    rate = ok / n if n else 0.0
    seeds = [r.get("seed") for r in results]
    failed = "; ".join(_failure(r) for r in results if not r.get("success"))
    return n, ok, rate, (f"{ok}/{n} episodes succeeded ({rate:.2f}), {collisions} collisions, seeds {seeds}"
                         + (f" (failed: {failed})" if failed else ""))


def _failure(r: dict[str, Any]) -> str:
    """One failed episode in a few words: how it ended and when."""
    how = ("collision" if r.get("collision") else r.get("start") or
           f"time limit, {float(r.get('final_distance') or 0.0):.3f} m from the target")
    return f"episode {r.get('episode')} seed {r.get('seed')}: {how} after {float(r.get('duration') or 0.0):.2f} s"


def _assert_episodes(stack: Stack, results: list[dict[str, Any]], label: str, config: pytest.Config) -> None:
    n, _, rate, text = _figures(results)
    _say(config, f"{label}: {text}")
    if n < MIN_EPISODES or rate < MIN_SUCCESS_RATE:
        stack.fail(f"{label}: {text}; expected at least {MIN_EPISODES} episodes and a success rate of "
                   f"{MIN_SUCCESS_RATE}")


def _report_startup(stack: Stack, config: pytest.Config) -> None:
    results = stack.results()
    skipped = results[:len(results) - len(_after_startup(results))]
    if skipped:
        _say(config, f"not counted, before the first scored episode: {'; '.join(_failure(r) for r in skipped)}")


def _assert_stopped_cleanly(stack: Stack) -> None:
    report = stack.launch.stop_and_check()
    if not report.ok:
        stack.fail(f"Ctrl-C did not stop the launch cleanly: exit status {report.rc} (None: ignored SIGINT), "
                   f"nodes started {report.started}, finished cleanly {report.clean}, died {report.died}, "
                   f"processes left over (killed) {report.leftovers}")


# ---------------------------------------------------------------------------------------------------------------
def test_cli_commands_on_path(workspace: Shell) -> None:
    """After ``source install/setup.bash`` the README's ``koopman-control`` is a bare command, and ``ros2 run``
    still finds it (and the nodes) in lib/koopman_control."""
    r = workspace.run("command -v koopman-control && koopman-control --help && "
                      "ros2 run koopman_control koopman-control --help >/dev/null && "
                      "ros2 pkg executables koopman_control", timeout=CLI_TIMEOUT)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    where = Path(r.stdout.splitlines()[0])
    assert where.parent == workspace.cwd / "install" / "koopman_control" / "bin", where
    assert "usage: koopman-control" in r.stdout
    assert "koopman_control sim_node" in r.stdout and "koopman_control policy_node" in r.stdout


@pytest.fixture(scope="module")
def default_stack(workspace: Shell, pytestconfig: pytest.Config) -> Iterator[Stack]:
    """``ros2 launch koopman_control kinova.launch.py``: sim, default policy, teacher fallback."""
    with running_stack(workspace, "", DOMAIN) as stack:
        t0 = time.monotonic()
        stack.wait_for(stack.results, FIRST_RESULT_TIMEOUT, "the first /task/episode_result")
        _say(pytestconfig, f"default launch: first episode result {time.monotonic() - t0:.0f} s after the start")
        yield stack


def test_policy_parameter_reads_back_running_policy(default_stack: Stack) -> None:
    """An empty ``policy`` parameter means "the catalogue's default"; once running it names the policy."""
    assert default_stack.param_get("/policy", "policy") == _catalogue_default()


def test_bad_policy_is_refused_and_running_policy_stays(default_stack: Stack) -> None:
    s = default_stack
    # Each CLI call costs 3-5 s of discovery: reuse the read-back test's value when it ran.
    before = s.read.get("/policy policy") or s.param_get("/policy", "policy")
    accepted, said = s.param_set("/policy", "policy", "no_such_policy")
    assert not accepted, said
    assert "no_such_policy" in said, said  # the reason names the refused value
    assert s.param_get("/policy", "policy") == before
    assert not s.launch.problem(), s.launch.problem()


def test_default_launch_episodes_succeed(default_stack: Stack, pytestconfig: pytest.Config) -> None:
    s = default_stack  # the parameter tests above ran while these episodes went on
    s.wait_for(lambda: len(_after_startup(s.results())) >= MIN_EPISODES, EPISODES_TIMEOUT,
               f"{MIN_EPISODES} episode results")
    _report_startup(s, pytestconfig)
    _assert_episodes(s, _after_startup(s.results()), f"default launch ({_catalogue_default()})", pytestconfig)


def test_policy_swap_at_run_time(default_stack: Stack, pytestconfig: pytest.Config) -> None:
    s = default_stack
    accepted, said = s.param_set("/policy", "policy", "oneflow")
    t_swap = time.monotonic()  # the node has validated oneflow (the CLI answers after that) and swaps at its next tick
    assert accepted, said
    assert s.param_get("/policy", "policy") == "oneflow"
    # The episode in progress at the swap ran on both policies: count those that started after it.
    s.wait_for(lambda: len(s.results(after=t_swap)) >= MIN_EPISODES + 1, EPISODES_TIMEOUT,
               f"{MIN_EPISODES} episodes after the swap to oneflow")
    _assert_episodes(s, s.results(after=t_swap)[1:], "after `ros2 param set /policy policy oneflow`", pytestconfig)
    _say(pytestconfig, f"default launch, whole run: {_figures(s.results())[3]}")


def test_ctrl_c_stops_every_node_cleanly(default_stack: Stack) -> None:
    _assert_stopped_cleanly(default_stack)


def test_oneflow_at_100hz(workspace: Shell, pytestconfig: pytest.Config) -> None:
    """The README's second launch line: another policy and a controller ticking 10 times the model's rate."""
    with running_stack(workspace, "policy:=oneflow policy_rate:=100.0", DOMAIN + 1) as s:
        t0 = time.monotonic()
        s.wait_for(s.results, FIRST_RESULT_TIMEOUT, "the first /task/episode_result")
        assert s.param_get("/policy", "policy") == "oneflow"
        s.wait_for(lambda: len(_after_startup(s.results())) >= MIN_EPISODES, EPISODES_TIMEOUT,
                   f"{MIN_EPISODES} episode results")
        _say(pytestconfig, f"oneflow at 100 Hz: {MIN_EPISODES} results within {time.monotonic() - t0:.0f} s")
        _report_startup(s, pytestconfig)
        _assert_episodes(s, _after_startup(s.results()), "policy:=oneflow policy_rate:=100.0", pytestconfig)
        _assert_stopped_cleanly(s)


def test_pusht_launch(workspace: Shell, pytestconfig: pytest.Config) -> None:
    """``task:=pusht policy:=pusht_oneflow``: the same launch file serves Push-T; the pusher's chunks flow (an
    episode lasts 30 s, so this waits for chunks, not for a result)."""
    with running_stack(workspace, "task:=pusht policy:=pusht_oneflow", DOMAIN + 2) as s:
        t0 = time.monotonic()
        # The type given: echo then waits for the publisher instead of giving up on an unknown topic.
        r = s.ros2("topic echo --once --no-daemon --field joint_names /policy/action_chunk "
                   "trajectory_msgs/msg/JointTrajectory", timeout=FIRST_RESULT_TIMEOUT)
        if r.returncode or "agent_x" not in r.stdout:
            s.fail(f"no Push-T chunk on /policy/action_chunk (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
        assert s.param_get("/policy", "policy") == "pusht_oneflow"
        # The teacher serves from its denoiser (it opens in about a second): its node is up by now.
        assert s.param_get("/teacher", "policy") == "pusht_teacher"
        _say(pytestconfig, f"task:=pusht policy:=pusht_oneflow: first chunk {time.monotonic() - t0:.0f} s after start")
        _assert_stopped_cleanly(s)
