"""ROS 2 package: installs the nodes plus the workspace's top-level launch/, config/ and models/.

The top-level folders are reached through the symbolic links beside this file, so a
colcon build and a pip install both ship the same files into share/koopman_control.
"""

import os
from glob import glob

from setuptools import find_packages, setup

NAME = "koopman_control"


def _tree(top: str) -> list[tuple[str, list[str]]]:
    """data_files entries for every file below ``top`` (models are folders; data_files takes files only)."""
    return [(f"share/{NAME}/{d}", [os.path.join(d, f) for f in sorted(files)])
            for d, _, files in sorted(os.walk(top)) if files]


NODES = [
    "sim_node", "state_ingest_node", "camera_ingest_node", "policy_node", "teacher_node", "kortex_bridge_node",
    "bag_player_node",
]

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
)
