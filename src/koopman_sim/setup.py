from setuptools import find_packages, setup

NAME = "koopman_sim"

setup(
    name=NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={NAME: ["tasks/*.yaml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{NAME}"]),
        (f"share/{NAME}", ["package.xml"]),
    ],
    install_requires=["setuptools", "gen3_description", "numpy", "mujoco", "h5py", "tqdm", "gymnasium", "pyyaml"],
    zip_safe=True,
    description="MuJoCo Kinova Gen3 task, scripted experts and demonstration collection.",
    license="Apache-2.0",
    entry_points={"console_scripts": ["koopman-sim = koopman_sim.cli:main"]},
)
