"""The pure-Python distribution of ``mace_core``, for machines without ROS.

    pip install .            # the core library, its ROS-free command mace-train and the models
    python -c "import mace_core"

The ROS package (``mace_ros``: interfaces, node, client, launch file) is built from
``package.xml`` / ``CMakeLists.txt`` by colcon or ``scripts/setup.sh``; colcon identifies the
package by its ``package.xml`` (build type ament_cmake), so this file does not compete with it.
The shipped models and scenes go to ``<prefix>/share/mace/`` (see
``mace_core.paths.default_models_dir``). Dependencies are ranges known to work (see
``requirements.txt`` for the versions the project's own venv pins, and
``requirements-ros.txt`` beside a ROS distribution's numpy).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The version of package.xml: one number for both distributions."""
    with open(os.path.join(HERE, "package.xml")) as f:
        return re.search(r"<version>([^<]+)</version>", f.read()).group(1)


def _files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files directly in ``folder`` (relative to this file) ending with one of ``suffixes``."""
    path = os.path.join(HERE, folder)
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(path) if n.endswith(suffixes))


setup(
    name="mace-core",
    version=_version(),
    description="MACE (Model Adaptation with the Cross-Entropy method, Krupnik et al., CoRL "
                "2023) for collision-aware IK and shape completion, in pure PyTorch (no ROS)",
    packages=find_packages(include=["mace_core", "mace_core.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # fused Adam on the CPU
        "numpy>=1.24",  # 1.26 (Ubuntu 24.04's) and 2.x both work
        "scipy>=1.10",
        "PyYAML>=6.0",
        "safetensors>=0.4",
        "threadpoolctl>=3.0",  # NumPy's BLAS on torch's CPU threads
        "pybullet>=3.2.5",
        "mujoco>=4.0",  # exact collision checks (4.0.0 tested)
        "pytracik>=0.0.3",
        "trimesh>=4.0",
    ],
    extras_require={"plots": ["matplotlib>=3.6"], "gpu": ["mujoco-warp>=4.0"]},
    entry_points={"console_scripts": ["mace-train=mace_core.training:main"]},
    # setuptools' scratch space inside CMake's build/ folder, not beside it
    options={"build": {"build_base": "build/setuptools"}},
    data_files=[
        ("share/mace/models", _files("models", (".safetensors", ".yaml", ".md"))),
        ("share/mace/scenes", _files("config/scenes", (".yaml",))),
    ],
)
