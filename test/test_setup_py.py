"""``setup.py`` builds the ROS-free distribution of mace_core: a wheel with the core, the
models and ``mace-train``, which imports and answers an IK request with ROS out of reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_holds_the_core_and_runs_without_ros(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "package.xml"):
        shutil.copy(os.path.join(REPO, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mace_core", "mace_ros", "models", os.path.join("config", "scenes")):
        shutil.copytree(os.path.join(REPO, folder), src / folder, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("mace_core-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        z.extractall(tmp_path / "site")
    assert "mace_core/ik/adapter.py" in names and "mace_core/deadline.py" in names
    assert not any(n.startswith("mace_ros/") for n in names), "the wheel must hold no ROS code"
    data = [n for n in names if ".data/data/share/mace/" in n]
    assert any(n.endswith("models/panda_ik.safetensors") for n in data)
    assert any(n.endswith("scenes/box.yaml") for n in data)
    for dep in ("torch", "numpy", "safetensors", "pybullet", "pytracik", "trimesh", "PyYAML"):
        assert f"Requires-Dist: {dep}" in meta, meta
    assert "rclpy" not in meta
    assert "mace-train = mace_core.training:main" in entry_points
    # the wheel's files alone, with every ROS package made unimportable
    site = tmp_path / "site"
    models = next(site.glob("*.data/data/share/mace/models"))
    probe = f"""
import sys
for name in ("rclpy", "mace_ros", "std_msgs", "geometry_msgs", "sensor_msgs", "rosidl_runtime_py"):
    sys.modules[name] = None
sys.path.insert(0, {str(site)!r})
import numpy as np
import mace_core
from mace_core import IKAdapter, IKAdaptConfig, IKRequest, TensorSpec
assert mace_core.__file__.startswith({str(site)!r}), mace_core.__file__
adapter = IKAdapter.from_models({str(models)!r}, "panda_ik", IKAdaptConfig(), TensorSpec())
result = adapter.solve(IKRequest(position=np.array([0.4, 0.0, 0.4]), num_solutions=2,
                                 time_budget_s=5.0, seed=0))
print("found", result.num_found)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "found 2" in out.stdout, out.stdout + out.stderr


def test_an_installed_core_finds_the_shipped_files_of_either_install(tmp_path, monkeypatch):
    """Outside the source tree the core looks for the models and scenes where ``pip install .``
    puts them, then where the ROS package does (``scripts/setup.sh``'s ``.venv``): so
    ``mace-train avips --workcell`` finds the robot's spheres from either."""
    from mace_core import paths

    monkeypatch.setattr(paths, "SOURCE_ROOT", str(tmp_path / "no_source"))
    monkeypatch.setattr(paths.sys, "prefix", str(tmp_path))
    ros_models = tmp_path / "share" / "mace_ros" / "models"
    ros_scenes = tmp_path / "share" / "mace_ros" / "config" / "scenes"
    ros_models.mkdir(parents=True)
    ros_scenes.mkdir(parents=True)
    assert paths.default_models_dir() == str(ros_models)
    assert paths.default_scenes_dir() == str(ros_scenes)
    pip_models = tmp_path / "share" / "mace" / "models"
    pip_models.mkdir(parents=True)
    assert paths.default_models_dir() == str(pip_models)
