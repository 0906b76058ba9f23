"""Training data of the shape priors: random boxes (App. C) and pybullet_data meshes.

Boxes: edge lengths uniform in ``edge_range`` (m), standing on the xy plane (z from 0 to the
height), centred on the z axis, rotated about z, points uniform on the six faces (area-weighted).
The paper generates 10K such boxes; here a box is its three edge lengths, and its points and
rotation are drawn afresh each time it is used (the rotation is the paper's augmentation).

Objects: the meshes that ship with pybullet_data (``random_urdfs/*/*.obj``, 1000 procedurally made
blobs, plus a few named meshes), each centred on its bounding-box centre and scaled to fit the
ball of diameter 1 (so the origin is inside, as the grasp simulator of App. A assumes), sampled
with trimesh. No downloads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BOX_EDGE_RANGE_M = (0.1, 0.5)  #: default edge lengths of the box data set, m

#: Extra pybullet_data meshes used for training the "objects" prior when present.
EXTRA_OBJECT_MESHES = ("duck.obj", "teddy2_VHACD_CHs.obj", "bunny.obj", "soccerball.obj",
                       "sphere_smooth.obj", "cube.obj", "jenga/jenga.obj", "lego/lego.obj")


def random_box_edges(n: int, generator: torch.Generator,
                     edge_range: tuple[float, float] = BOX_EDGE_RANGE_M) -> torch.Tensor:
    """``n`` boxes' edge lengths (x, y, z), uniform in ``edge_range``: ``(n, 3)`` m."""
    lo, hi = edge_range
    return lo + (hi - lo) * torch.rand(n, 3, generator=generator, device=generator.device)


def rotate_z(points: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate clouds ``(B, P, 3)`` about z by ``angle`` ``(B,)`` rad."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    x, y, z = points.unbind(-1)
    return torch.stack([c * x - s * y, s * x + c * y, z], dim=-1)


def sample_box_clouds(edges: torch.Tensor, num_points: int, generator: torch.Generator,
                      angle: torch.Tensor | None = None) -> torch.Tensor:
    """Points uniform on the faces of boxes standing on the xy plane (App. C).

    Args:
        edges: edge lengths along (x, y, z) before rotation: ``(B, 3)``.
        num_points: points per box.
        generator: random source (its device is used).
        angle: rotation about z ``(B,)`` rad; uniform in [-π, π] when None.

    Returns:
        ``(B, num_points, 3)``: centred on the z axis, z in [0, height].
    """
    b = edges.shape[0]
    opts = dict(generator=generator, device=edges.device)
    a, w, h = edges.unbind(-1)
    # faces in pairs: ±x (area w*h), ±y (a*h), ±z (a*w)
    areas = torch.stack([w * h, w * h, a * h, a * h, a * w, a * w], dim=-1)
    face = torch.multinomial(areas, num_points, replacement=True, generator=generator)
    axis = face // 2
    sign = (face % 2).to(edges.dtype) * 2.0 - 1.0
    pts = (torch.rand(b, num_points, 3, dtype=edges.dtype, **opts) - 0.5) * edges[:, None, :]
    on_face = 0.5 * sign * edges.gather(1, axis)
    pts = pts.scatter(2, axis[..., None], on_face[..., None])
    pts[..., 2] += 0.5 * h[:, None]
    if angle is None:
        angle = (torch.rand(b, dtype=edges.dtype, **opts) * 2.0 - 1.0) * math.pi
    return rotate_z(pts, angle)


@dataclass
class ObjectCloudSet:
    """Surface samples of normalised meshes, for the "objects" prior."""

    points: np.ndarray  #: (n_objects, points_per_object, 3) float32, diameter-1 frame
    names: list[str]  #: mesh path relative to pybullet_data, one per object


def pybullet_object_meshes(data_path: str | Path | None = None,
                           include_extra: bool = True) -> list[str]:
    """Mesh paths relative to pybullet_data: the 1000 ``random_urdfs`` blobs, then extras."""
    if data_path is None:
        import pybullet_data

        data_path = pybullet_data.getDataPath()
    root = Path(data_path)
    names = sorted(str(p.relative_to(root)) for p in root.glob("random_urdfs/*/*.obj"))
    if include_extra:
        names += [n for n in EXTRA_OBJECT_MESHES if (root / n).is_file()]
    return names


def normalised_mesh_samples(mesh_path: str | Path, num_points: int, seed: int) -> np.ndarray:
    """Sample a normalised mesh: ``(num_points, 3)`` points uniform on its surface.

    The mesh is loaded with trimesh, centred on its bounding box and scaled into the ball of
    diameter 1.
    """
    import trimesh

    mesh = trimesh.load(str(mesh_path), force="mesh", process=False)
    centre = 0.5 * (mesh.bounds[0] + mesh.bounds[1])
    verts = np.asarray(mesh.vertices) - centre
    scale = 0.5 / max(float(np.linalg.norm(verts, axis=1).max()), 1e-9)
    mesh = trimesh.Trimesh(vertices=verts * scale, faces=mesh.faces, process=False)
    pts, _ = trimesh.sample.sample_surface(mesh, num_points, seed=seed)
    return np.asarray(pts, dtype=np.float32)


def load_object_clouds(cache_dir: str | Path, points_per_object: int = 8192,
                       data_path: str | Path | None = None, seed: int = 0) -> ObjectCloudSet:
    """Sample every pybullet_data object mesh once, cached as ``.npz`` under ``cache_dir``.

    About 100 MB for 1008 objects x 8192 points. Meshes whose samples are not finite are left
    out.
    """
    cache = Path(cache_dir) / f"shape_objects_{points_per_object}_s{seed}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return _finite_only(f["points"], [str(n) for n in f["names"]])
    if data_path is None:
        import pybullet_data

        data_path = pybullet_data.getDataPath()
    names = pybullet_object_meshes(data_path)
    points = np.stack([normalised_mesh_samples(Path(data_path) / n, points_per_object, seed + i)
                       for i, n in enumerate(names)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, points=points, names=np.array(names))
    return _finite_only(points, names)


def _finite_only(points: np.ndarray, names: list[str]) -> ObjectCloudSet:
    """Drop objects whose samples are not finite (a degenerate mesh: random_urdfs/168)."""
    keep = np.isfinite(points).all(axis=(1, 2))
    return ObjectCloudSet(points=points[keep], names=[n for n, k in zip(names, keep) if k])


def held_out_object_names(names: list[str], every: int = 10) -> list[str]:
    """Return the held-out objects: every ``every``-th ``random_urdfs`` mesh (000, ..., 990)."""
    return [n for n in names if n.startswith("random_urdfs/")
            and int(Path(n).stem) % every == 0]


def subsample_clouds(points: torch.Tensor, num_points: int, generator: torch.Generator,
                     angle: torch.Tensor | None = None) -> torch.Tensor:
    """Pick ``num_points`` random points of each cloud ``(B, Q, 3)`` and rotate about z.

    The angle is uniform in [-π, π] when ``angle`` is None. Returns ``(B, num_points, 3)``.
    """
    b, q, _ = points.shape
    idx = torch.rand(b, q, generator=generator, device=points.device).argsort(dim=1)
    idx = idx[:, :num_points]
    sub = points.gather(1, idx[..., None].expand(-1, -1, 3))
    if angle is None:
        angle = (torch.rand(b, generator=generator, device=points.device) * 2 - 1) * math.pi
    return rotate_z(sub, angle.to(points.dtype))
