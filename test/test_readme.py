"""Every command line the README shows works as written.

The blocks that can run on this machine run as written, each as one bash script in a fresh directory:
"Run it without ROS installed" and "Record and replay". The ROS 2 installation's lines run in
``test_ros2_launch`` (its ``README_LINES``; checked here to cover the README's). What needs what a CI machine
lacks (Kinova's arm and wheel, ros2_kortex, Docker, hours of training) is checked short of running it: every
``koopman-*`` line parses with its command's own parser, every launch line's arguments build a stack, every
``make`` target exists, every file and compose profile the Docker lines name exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from koopman_control.testing import session_domain_id

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Sections whose bash blocks run here, as written.
RUN_HERE = ("Run it without ROS installed", "Record and replay")
#: Lines that drive software this project does not ship, with what stands in for them in the tests.
EXTERNAL = {
    "ros2 launch kortex_bringup gen3.launch.py robot_ip:=192.168.1.10 use_fake_hardware:=true":
        "Kinova's ros2_kortex; test_ros_processes drives the ros2_control stand-in through the same topics",
}


def blocks() -> list[tuple[str, list[str]]]:
    """(section, command lines) of every bash block, comments and blank lines dropped."""
    out, section, lines, inside = [], "", [], False
    for raw in README.read_text().splitlines():
        if raw.startswith("## "):
            section = raw[3:].strip()
        elif raw.strip() == "```bash":
            inside, lines = True, []
        elif raw.strip() == "```" and inside:
            inside = False
            out.append((section, lines))
        elif inside:
            line = re.sub(r"\s+#.*$", "", raw).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return out


def all_lines() -> list[tuple[str, str]]:
    return [(section, line) for section, lines in blocks() for line in lines]


def test_the_readme_is_a_guide_with_its_commands_first() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 230, "the README is the user's guide: results go to docs/results.md"
    first = blocks()[0][1]
    assert first == ["make run", "make test"], first
    for section in (*RUN_HERE, "Architecture", "Deploy on a Kinova Gen3", "Bring your own task", "Docker",
                    "Troubleshooting"):
        assert f"## {section}" in text, section
    for doc in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (REPO / doc).is_file(), doc


@pytest.mark.parametrize("section", RUN_HERE)
def test_runnable_blocks_run_as_written(section: str, tmp_path: Path) -> None:
    lines = next(lines for s, lines in blocks() if s == section)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ROS_DOMAIN_ID": str(session_domain_id(140 + RUN_HERE.index(section)))}
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{section}: exit {r.returncode}\n{script}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    for out in re.findall(r"--json (\S+\.json)", script):
        summary = json.loads((tmp_path / out).read_text())
        assert "episode_list" in summary and summary["latency_ms"], (out, sorted(summary))
    if section == "Record and replay":
        assert (tmp_path / "runs/demo_report/report.md").is_file()
        assert (tmp_path / "data/demo.h5").is_file()


def _parse(line: str) -> None:
    """Parse a ``koopman-*`` line with its command's parser, as the command would before doing anything."""
    argv = shlex.split(line)
    if argv[0] == "koopman-distill":
        from koopman_distill.cli import _command, build_parser
        build_parser(_command(argv[1:])).parse_args(argv[1:])
    elif argv[0] == "koopman-control":
        from koopman_control.cli import build_parser
        build_parser().parse_args(argv[1:])
    else:
        from koopman_sim.cli import build_parser
        build_parser().parse_args(argv[1:])


def _launch_args(line: str) -> dict[str, str]:
    return dict(a.split(":=", 1) for a in shlex.split(line)[4:])


def test_every_other_line_is_checked_short_of_running() -> None:
    from test_ros2_launch import README_LINES

    from koopman_control.stack import LAUNCH_ARGUMENTS, StackArgs, build_stack

    makefile = (REPO / "Makefile").read_text()
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    profiles = {p for svc in compose["services"].values() for p in svc.get("profiles", [])}
    unchecked = []
    for section, line in all_lines():
        words = shlex.split(line.rstrip("&").strip())
        if section in RUN_HERE or line in EXTERNAL:
            continue
        if words[0] in ("koopman-control", "koopman-distill", "koopman-sim"):
            _parse(line)
        elif words[:3] == ["ros2", "launch", "koopman_control"]:
            args = _launch_args(line)
            assert set(args) <= set(LAUNCH_ARGUMENTS), (line, set(args) - set(LAUNCH_ARGUMENTS))
            if args.get("policy", "").startswith("models/my_"):
                continue  # the user's own model from the walkthrough above it: test_own_task serves one
            assert build_stack(StackArgs.from_strings(args)), line
            if section == "Run it on a ROS 2 installation":
                assert line in README_LINES, f"{line!r} is not run by test_ros2_launch"
        elif words[0] in ("ros2", "colcon"):
            assert line in README_LINES, f"{line!r} is not run by test_ros2_launch"
        elif words[:2] == ["pip", "install"]:
            for i, w in enumerate(words):
                if w == "-r":
                    assert (REPO / words[i + 1]).is_file(), line
        elif words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), line
        elif words[0] == "docker" or words[0].startswith("ROBOT_IP="):
            for i, w in enumerate(words):
                if w == "-f":
                    assert (REPO / words[i + 1]).is_file(), line
                if w == "--profile":
                    assert words[i + 1] in profiles, line
        else:
            unchecked.append(line)
    assert not unchecked, f"README lines no test checks: {unchecked}"

