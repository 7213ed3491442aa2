"""ROS 2 package: installs the nodes plus the workspace's top-level launch/, config/ and models/.

The top-level folders are reached through the symbolic links beside this file, so a
colcon build and a pip install both ship the same files into share/koopman_control.

setup.cfg sends every console script to lib/koopman_control, where ``ros2 run`` and launch look for
executables; colcon puts only <prefix>/bin on PATH, so the commands a user types (every console script that
is not a node, e.g. ``koopman-control``) are also copied to <prefix>/bin by the two command classes below.
pip builds wheels (``no_ep``), which put console scripts in bin themselves and are left alone.
"""

import os
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.develop import develop
from setuptools.command.install_scripts import install_scripts

NAME = "koopman_control"


def _tree(top: str) -> list[tuple[str, list[str]]]:
    """data_files entries for every file below ``top`` (models are folders; data_files takes files only)."""
    return [(f"share/{NAME}/{d}", [os.path.join(d, f) for f in sorted(files)])
            for d, _, files in sorted(os.walk(top)) if files]


NODES = [
    "sim_node", "state_ingest_node", "camera_ingest_node", "policy_node", "teacher_node", "kortex_bridge_node",
    "bag_player_node", "ros2_control_standin_node",
]


def _user_commands(dist) -> list[str]:
    """Console scripts that are not nodes: the commands a user runs from a shell."""
    eps = (dist.entry_points or {}).get("console_scripts", [])
    names = [e.split("=", 1)[0].strip() for e in ([eps] if isinstance(eps, str) else eps)]
    return [n for n in names if n not in NODES]


def _ros_bin(script_dir: str | None) -> str | None:
    """<prefix>/bin when scripts went to the ROS place <prefix>/lib/koopman_control (setup.cfg), else None."""
    if not script_dir:
        return None
    lib = os.path.dirname(os.path.normpath(script_dir))
    if os.path.basename(os.path.normpath(script_dir)) != NAME or os.path.basename(lib) != "lib":
        return None
    return os.path.join(os.path.dirname(lib), "bin")


class InstallScripts(install_scripts):
    """``colcon build`` (setup.py install): also puts the user commands on PATH, in <prefix>/bin."""

    def run(self) -> None:
        super().run()
        bin_dir = _ros_bin(self.install_dir)
        if self.no_ep or bin_dir is None:
            return
        self.mkpath(bin_dir)
        for name in _user_commands(self.distribution):
            target = os.path.join(bin_dir, name)
            self.copy_file(os.path.join(self.install_dir, name), target)
            self.outfiles.append(target)


class Develop(develop):
    """``colcon build --symlink-install`` (setup.py develop, setuptools < 80): the same for its scripts."""

    def install_wrapper_scripts(self, dist) -> None:
        super().install_wrapper_scripts(dist)
        bin_dir = _ros_bin(self.script_dir)
        if self.exclude_scripts or bin_dir is None:
            return
        self.mkpath(bin_dir)
        for name in _user_commands(self.distribution):
            target = os.path.join(bin_dir, name)
            self.copy_file(os.path.join(self.script_dir, name), target)
            self.add_output(target)


setup(
    name=NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{NAME}"]),
        (f"share/{NAME}", ["package.xml"]),
        (f"share/{NAME}/launch", glob("launch/*.launch.py")),
        (f"share/{NAME}/config", glob("config/*.yaml")),
        *_tree("models"),
    ],
    install_requires=["setuptools", "koopman_policy", "koopman_sim", "pyyaml", "numpy", "rosbags"],
    zip_safe=True,
    description="ROS 2 nodes for one-step diffusion-distilled control of a Kinova Gen3.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [f"{n} = {NAME}.nodes.{n}:main" for n in NODES]
        + ["koopman-control = koopman_control.cli:main"],
    },
    cmdclass={"install_scripts": InstallScripts, "develop": Develop},
)
