from setuptools import find_packages, setup

NAME = "gen3_description"

setup(
    name=NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={NAME: ["mjcf/*.xml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{NAME}"]),
        (f"share/{NAME}", ["package.xml"]),
        (f"share/{NAME}/mjcf", [f"{NAME}/mjcf/gen3.xml"]),
    ],
    install_requires=["setuptools", "numpy"],
    zip_safe=True,
    description="Kinova Gen3 7-DoF description: names, limits, home pose, DH table and MJCF.",
    license="Apache-2.0",
)
