from setuptools import find_packages, setup

NAME = "koopman_policy"

setup(
    name=NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{NAME}"]),
        (f"share/{NAME}", ["package.xml"]),
    ],
    install_requires=["setuptools", "numpy", "torch", "onnxruntime-gpu", "onnx", "safetensors", "diffusers", "pyyaml"],
    zip_safe=True,
    description="Diffusion teacher, one-step students and their ONNX Runtime serving.",
    license="Apache-2.0",
)
