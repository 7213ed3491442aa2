"""Drive the stack as a ROS 2 user does: the real ``colcon build``, ``ros2 launch``, ``ros2 param`` and
``ros2 topic``, each through ``bash -c`` in a clean environment that sources the underlay and the workspace.

The underlay is a real ROS 2 installation where there is one. Elsewhere it is a venv that
``../shared/tools/ros2-launch-env.sh`` builds from the launch/ros2cli sources in ``../shared/ros2-src``
(PyPI has rclpy and the messages but not launch or the CLI), cached in ``.ros2env/<key>``: the key covers the
requirements' content, the tool and the interpreter, so a change builds a fresh env (the node imports are
then checked against exactly that list) and the stale one is removed.

Processes are started in their own session and stopped with SIGINT, as Ctrl-C does: SIGTERM to
``ros2 launch`` orphans its nodes. Whatever is left of a session afterwards is reported and killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ROS2_SOURCES = SHARED / "ros2-src"
ENV_TOOL = SHARED / "tools" / "ros2-launch-env.sh"
CACHE = REPO / ".ros2env"  # in .gitignore
ENV_BUILD_TIMEOUT = 1800.0  # s; about 130 s with a warm pip cache, far more with a cold one

# What a clean environment keeps from the caller's: identity, locale, and how to reach the package index.
_KEEP = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "XDG_CACHE_HOME", "SSL_CERT_FILE",
         "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
         "RMW_IMPLEMENTATION")
_KEEP_PREFIXES = ("PIP_", "UV_")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean_env(**extra: str) -> dict[str, str]:
    """A login-like environment: nothing of the caller's venv, PYTHONPATH or ROS variables leaks in."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP or k.startswith(_KEEP_PREFIXES)}
    env.update(PATH=_PATH, PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass(frozen=True)
class Underlay:
    """How to get a ROS 2 shell: files to source on top of ``env``."""

    description: str
    sources: tuple[Path, ...]
    env: dict[str, str]


def find_ros_install() -> Underlay | None:
    """A real ROS 2: ``ros2`` on PATH with launch_ros importable (its setup.bash when it has one, else the
    caller's environment as it is), or ``/opt/ros/<distro>/setup.bash`` (the newest distro name)."""
    ros2 = shutil.which("ros2")
    if ros2 and subprocess.run(["python3", "-c", "import launch_ros"], capture_output=True).returncode == 0:
        setup = Path(ros2).resolve().parent.parent / "setup.bash"
        if setup.is_file():
            return Underlay(f"ROS 2 at {setup.parent}", (setup,), clean_env())
        return Underlay(f"ROS 2 from the calling environment ({ros2})", (), {**os.environ, "PYTHONUNBUFFERED": "1"})
    setups = sorted(Path("/opt/ros").glob("*/setup.bash"))
    if setups:
        return Underlay(f"ROS 2 at {setups[-1].parent}", (setups[-1],), clean_env())
    return None


def missing_env_inputs() -> list[str]:
    """What of ``../shared`` the env build needs and is not there (empty: it can be built)."""
    return [str(p) for p in (ROS2_SOURCES, ENV_TOOL) if not p.exists()]


def _requirement_files(path: Path) -> list[Path]:
    """``path`` and the files it includes (``-r``/``-c``), so the cache key follows them too."""
    out, todo = [], [path]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        for line in p.read_text().splitlines():
            m = re.match(r"\s*(?:-r|--requirement|-c|--constraint)[\s=]+(\S+)", line)
            if m:
                todo.append((p.parent / m.group(1)).resolve())
    return out


def env_key(requirements: Path, python: str) -> str:
    h = hashlib.sha256()
    for p in [*_requirement_files(requirements), ENV_TOOL]:
        h.update(p.read_bytes())
    h.update(f"{python}\n{sys.version_info[:2]}\n{CACHE}".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def built_env(requirements: Path, log: Callable[[str], None] = print) -> Iterator[Underlay]:
    """Build (or check and reuse) the env for ``requirements`` and hold it for the caller's lifetime.

    The tool skips the steps already done (about 3 s when all are). A shared lock on the env keeps another
    session, whose requirements differ, from deleting it while it is in use.
    """
    python = getattr(sys, "_base_executable", None) or sys.executable  # the interpreter the ros-* wheels fit
    key = env_key(requirements, python)
    work = CACHE / key
    CACHE.mkdir(exist_ok=True)
    (CACHE / "COLCON_IGNORE").touch()  # never crawled as part of a workspace
    with open(CACHE / f"{key}.inuse", "w") as inuse:
        fcntl.flock(inuse, fcntl.LOCK_SH)
        with open(CACHE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _remove_stale(key, log)
            t0 = time.monotonic()
            cmd = ["bash", str(ENV_TOOL), str(ROS2_SOURCES), str(work), str(requirements)]
            try:
                r = subprocess.run(cmd, env=clean_env(PYTHON=python), capture_output=True, text=True,
                                   timeout=ENV_BUILD_TIMEOUT)
            except subprocess.TimeoutExpired as err:
                raise RuntimeError(f"{shlex.join(cmd)} ran past {ENV_BUILD_TIMEOUT:.0f} s; logs in {work}/logs"
                                   ) from err
            if r.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
            log(f"ros2 env {work} ({requirements.name}) ready in {time.monotonic() - t0:.0f} s")
        yield Underlay(f"ros2-launch-env venv {work}", (work / "underlay.sh",), clean_env())


def _remove_stale(key: str, log: Callable[[str], None]) -> None:
    """Delete envs of other keys that no session holds (each is a few GB)."""
    for d in CACHE.iterdir():
        if not d.is_dir() or d.name == key:
            continue
        with open(CACHE / f"{d.name}.inuse", "w") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            log(f"removing stale ros2 env {d}")
            shutil.rmtree(d, ignore_errors=True)
            (CACHE / f"{d.name}.inuse").unlink(missing_ok=True)


@dataclass
class Shell:
    """Commands in ``bash -c`` after sourcing the underlay (and, once built, the workspace)."""

    underlay: Underlay
    cwd: Path
    sources: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, script: str) -> list[str]:
        head = "".join(f"source {shlex.quote(str(s))} || exit 97\n" for s in (*self.underlay.sources, *self.sources))
        return ["bash", "-c", head + script]

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**self.underlay.env, **self.env, **(extra or {})}

    def run(self, script: str, timeout: float = 120.0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run to completion; stdout and stderr are kept apart. A timeout kills the whole session."""
        p = subprocess.Popen(self.argv(script), cwd=self.cwd, env=self.environ(env), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(p.pid)
            out, err = p.communicate()
            err += f"\n[ros2_cli] timed out after {timeout:.0f} s and was killed"
            return subprocess.CompletedProcess(p.args, 124, out, err)
        finally:
            kill_session(p.pid)  # anything it left behind (e.g. a daemon it spawned in its session)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def spawn(self, script: str, env: dict[str, str] | None = None, kind: type[B] | None = None) -> B:
        """Start in a new session (``exec`` in ``script`` makes the command itself the leader), read by
        ``kind`` (a :class:`Background` subclass)."""
        return (kind or Background)(subprocess.Popen(  # type: ignore[return-value]
            self.argv(script), cwd=self.cwd, env=self.environ(env), text=True, bufsize=1, errors="replace",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None when it is gone (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[3]))


def alive(pid: int) -> bool:
    return _proc_stat(pid) is not None


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a process started with ``start_new_session`` leads one)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _proc_stat(int(d.name))) and st[1] == sid:
            out.append(int(d.name))
    return out


def kill_session(sid: int, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
    """SIGKILL every live process of session ``sid`` and ``extra``; returns those that were alive."""
    victims = sorted(set(session_members(sid)) | {p for p in extra if alive(p)})
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t_end = time.monotonic() + 5.0
    while any(alive(p) for p in victims) and time.monotonic() < t_end:
        time.sleep(0.05)
    return victims


class Background:
    """A process in its own session whose merged output is read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []  # (monotonic time, line without colour codes)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), _ANSI.sub("", line.rstrip("\n"))))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def text(self, last: int | None = None) -> str:
        lines = [line for _, line in self.snapshot()]
        return "\n".join(lines[-last:] if last else lines)

    def interrupt(self, timeout: float) -> int | None:
        """SIGINT (Ctrl-C) and wait; the exit status, or None if it did not exit within ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(2.0)
        return rc

    def stop(self, timeout: float = 10.0) -> list[int]:
        """Interrupt, then kill what is left of the session; returns the pids that had to be killed."""
        self.interrupt(timeout)
        left = kill_session(self.pid)
        self.proc.wait(5.0)
        return left


B = TypeVar("B", bound=Background)

_STARTED = re.compile(r"\[INFO\] \[([^\]]+)\]: process started with pid \[(\d+)\]")
_CLEAN = re.compile(r"\[INFO\] \[([^\]]+)\]: process has finished cleanly \[pid (\d+)\]")
_DIED = re.compile(r"\[ERROR\] \[([^\]]+)\]: process has died \[pid (\d+), exit code (-?\d+)")


@dataclass
class StopReport:
    rc: int | None  # exit status of ros2 launch; None: it ignored SIGINT and was killed
    started: dict[str, int]  # launch's process name -> pid
    clean: list[str]  # "process has finished cleanly"
    died: dict[str, int]  # name -> exit code ("process has died")
    leftovers: list[int]  # processes alive after the launch exited (killed by the check)

    @property
    def ok(self) -> bool:
        return (self.rc == 0 and not self.died and not self.leftovers
                and sorted(self.clean) == sorted(self.started))


class Launch(Background):
    """``ros2 launch``: the node pids it prints, whether one died, and a Ctrl-C stop that checks the result."""

    def started(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for _, line in self.snapshot() if (m := _STARTED.search(line))}

    def died(self) -> dict[str, int]:
        return {m[1]: int(m[3]) for _, line in self.snapshot() if (m := _DIED.search(line))}

    def problem(self) -> str | None:
        """Why the stack cannot be running as launched (None while it is)."""
        if self.proc.poll() is not None:
            return f"ros2 launch exited with status {self.proc.returncode}"
        if died := self.died():
            return f"node processes died: {died}"
        return None

    _report: StopReport | None = None

    def stop_and_check(self, timeout: float = 40.0) -> StopReport:
        """Ctrl-C, wait for the launch to wind its nodes down, then look for survivors (killed if any).

        Done once: a second call returns the same report rather than signalling pids that may since belong to
        other processes."""
        if self._report is None:
            self._report = self._stop_and_check(timeout)
        return self._report

    def _stop_and_check(self, timeout: float) -> StopReport:
        started = self.started()
        rc = self.interrupt(timeout)  # None: still running after ``timeout``; the kill below ends it
        leftovers = kill_session(self.pid, list(started.values()))
        self.proc.wait(5.0)
        self._reader.join(2.0)
        lines = [line for _, line in self.snapshot()]
        clean = [m[1] for line in lines if (m := _CLEAN.search(line))]
        return StopReport(rc, started, clean, self.died(), [p for p in leftovers if p != self.pid])


class EpisodeRecorder(Background):
    """``ros2 topic echo --field data`` of ``/task/episode_result``: one JSON object per message."""

    def results(self) -> list[tuple[float, dict]]:
        out = []
        for t, line in self.snapshot():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append((t, json.loads(line)))
        return out


def episode_echo_command() -> str:
    # Reliable and transient-local with a deep history, as the sim publishes results: a late start still gets
    # every result so far; no daemon, so nothing outlives the test.
    return ("exec ros2 topic echo --no-daemon /task/episode_result std_msgs/msg/String --field data --full-length "
            "--qos-reliability reliable --qos-durability transient_local --qos-depth 100")
