from setuptools import find_packages, setup

NAME = "koopman_distill"

setup(
    name=NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{NAME}"]),
        (f"share/{NAME}", ["package.xml"]),
    ],
    install_requires=["setuptools", "koopman_policy", "koopman_sim", "tqdm", "matplotlib"],
    zip_safe=True,
    description="Offline distillation of diffusion policies into one-step students.",
    license="Apache-2.0",
    entry_points={"console_scripts": ["koopman-distill = koopman_distill.cli:main"]},
)
