"""Training of the shape priors: ``mace-train shape --prior boxes|objects`` (App. A and C).

A plain VAE objective, as in App. C: ``β_rec CD(x̂, x) + β_KL KL(q(z|x) ‖ N(0, σ_z² I))`` with the
Chamfer distance of :func:`~mace_core.shape.observations.chamfer_k` (k = 1, summed over 2048
points, in units of the prior's ``length_scale``), Adam, random rotations about z in [-π, π].
After training, the latent prior that sampling and MACE start from is fitted to the aggregate
posterior of the training shapes (:func:`~mace_core.shape.vae.fit_latent_prior`).
The architecture comes from the prior's entry in ``models/shape_registry.yaml``; the command
writes the entry's weights file (float16 safetensors), a model card and a PNG of samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..paths import SOURCE_ROOT
from ..tensor import TensorSpec
from .data import (held_out_object_names, load_object_clouds, random_box_edges, sample_box_clouds,
                   subsample_clouds)
from .observations import REFERENCE_POINTS, pairwise_sq_distances
from .vae import (PointCloudVAE, ShapePriorEntry, fit_latent_prior, gaussian_kl,
                  load_shape_registry, load_vae, parameter_count, save_vae_weights)

DEFAULT_REGISTRY = Path(SOURCE_ROOT) / "models" / "shape_registry.yaml"
DEFAULT_DATA_DIR = Path(SOURCE_ROOT) / "data"
DATA_SETS = ("boxes", "objects")  #: priors this module can make training data for


@dataclass
class ShapeTrainingConfig:
    """Settings of one training run (defaults follow App. C where it gives them)."""

    prior: str = "boxes"  #: registry entry to train, and its data set (one of DATA_SETS)
    steps: int = 2000  #: optimizer steps (App. C: 2000 iterations)
    batch_size: int = 32  #: clouds per step (paper: 64; halved for a 1-thread CPU)
    learning_rate: float = 5e-4  #: Adam step size, cosine-decayed to 10 % (paper: 2e-4)
    beta_rec: float = 1.0  #: β_rec, weight of the Chamfer term (App. C, boxes)
    beta_kl: float = 0.1  #: β_KL, weight of the KL term (App. C, boxes)
    loss_points: int = 256  #: target points per cloud in the loss (all decoded points are used)
    num_shapes: int = 10000  #: boxes in the training set (App. C: 10K)
    held_out: int = 500  #: held-out boxes for the evaluation (objects: every 10th mesh)
    time_limit_s: float = 900.0  #: wall-clock cap of the run, s
    seed: int = 0  #: seed of data and initialisation
    threads: int = 1  #: torch intra-op threads
    device: str = "cpu"  #: where the training runs: cpu, cuda[:N] or auto
    #: training draws the latent prior is fitted to after training (0: keep N(0, σ_z² I))
    fit_shapes: int = 4096


@dataclass
class ShapeTrainingReport:
    """What a run did, written into the model card."""

    steps: int  #: optimizer steps taken
    wall_time_s: float  #: training wall time, s (evaluation excluded)
    final_loss: float  #: mean loss over the last 50 steps
    held_out_cd: float  #: mean held-out reconstruction CD (k=1, 2048-sum, units of ℓ²)
    held_out_cd_native: float  #: the same as mean squared NN distance per direction, units²
    held_out_names: list[str]  #: held-out object meshes (objects prior only)
    latent_prior: str  #: what the stored latent prior is (model card)
    num_train: int  #: training shapes
    num_eval: int  #: held-out shapes evaluated


class _ShapeSource:
    """Batches of full training clouds and the held-out evaluation set of a prior."""

    def __init__(self, cfg: ShapeTrainingConfig, num_points: int, data_dir: Path,
                 spec: TensorSpec):
        self.num_points = num_points
        gen = spec.generator(cfg.seed + 1000)
        self.held_out_names: list[str] = []
        if cfg.prior == "boxes":
            self.kind = "boxes"
            self.train = random_box_edges(cfg.num_shapes, gen)
            held = random_box_edges(cfg.held_out, spec.generator(cfg.seed + 2000))
            self.eval = sample_box_clouds(held, num_points, spec.generator(cfg.seed + 3000))
        else:
            self.kind = "objects"
            data = load_object_clouds(data_dir)
            held_names = set(held_out_object_names(data.names))
            is_held = torch.tensor([n in held_names for n in data.names])
            pts = torch.as_tensor(data.points, dtype=spec.dtype, device=spec.device)
            self.train = pts[~is_held]
            self.held_out_names = [n for n in data.names if n in held_names]
            self.eval = subsample_clouds(pts[is_held], num_points,
                                         spec.generator(cfg.seed + 3000))
        self.num_train = self.train.shape[0]

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.num_train, (n,), generator=gen, device=gen.device)
        if self.kind == "boxes":
            return sample_box_clouds(self.train[idx], self.num_points, gen)
        return subsample_clouds(self.train[idx], self.num_points, gen)


def chamfer_loss(x_hat: torch.Tensor, x: torch.Tensor, length_scale: float) -> torch.Tensor:
    """Chamfer distance (k = 1, 2048-sum, units of ℓ²) with gradients for ``x_hat``: ``(B,)``.

    Same value as ``chamfer_k(x_hat, x, k=1)``; the nearest neighbours are found without
    gradients and the loss is taken on the matched pairs, which skips the backward pass through
    the ``(B, P, Q)`` distance matrix (the bottleneck on CPU).
    """
    with torch.no_grad():
        d2 = pairwise_sq_distances(x_hat, x)
        to_x = d2.argmin(dim=2)  # (B, P): nearest point of x to each point of x_hat
        to_hat = d2.argmin(dim=1)  # (B, Q): nearest point of x_hat to each point of x
    near_x = x.gather(1, to_x[..., None].expand(-1, -1, 3))
    near_hat = x_hat.gather(1, to_hat[..., None].expand(-1, -1, 3))
    fwd = ((x_hat - near_x) ** 2).sum(-1).mean(-1)
    bwd = ((x - near_hat) ** 2).sum(-1).mean(-1)
    return (fwd + bwd) * (REFERENCE_POINTS / length_scale ** 2)


def vae_loss(vae: PointCloudVAE, x: torch.Tensor, cfg: ShapeTrainingConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO surrogate of a batch ``(B, P, 3)``: (loss, CD ``(B,)``, KL ``(B,)``)."""
    mu, logvar = vae.encode(x)
    eps = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
    x_hat = vae.decode(mu + torch.exp(0.5 * logvar) * eps)
    n = min(cfg.loss_points, x.shape[1])  # data points are in random order: a random subset
    cd = chamfer_loss(x_hat, x[:, :n], vae.config.length_scale)
    zeros = torch.zeros_like(mu[0])
    kl = gaussian_kl(mu, logvar, zeros, zeros + math.log(vae.config.prior_std))
    return (cfg.beta_rec * cd + cfg.beta_kl * kl).mean(), cd, kl


@torch.no_grad()
def evaluate_reconstruction(vae: PointCloudVAE, clouds: torch.Tensor,
                            batch: int = 16) -> torch.Tensor:
    """Chamfer CD (k=1, 2048-sum, units of ℓ²) of decode(μ(x)) against x: ``(B,)``."""
    out = []
    for i in range(0, clouds.shape[0], batch):
        x = clouds[i:i + batch]
        out.append(chamfer_loss(vae.decode(vae.encode(x)[0]), x, vae.config.length_scale))
    return torch.cat(out)


def train_shape_prior(entry: ShapePriorEntry, cfg: ShapeTrainingConfig, data_dir: Path,
                      spec: TensorSpec, init: Path | None = None,
                      log=print) -> tuple[PointCloudVAE, ShapeTrainingReport]:
    """Train the VAE of ``entry``; return it with a report.

    Training starts from ``init`` weights, or from scratch with the decoder's output bias set
    to one training cloud (points start spread on a shape instead of collapsed at 0).
    """
    torch.manual_seed(cfg.seed)
    source = _ShapeSource(cfg, entry.architecture.num_points, data_dir, spec)
    gen = spec.generator(cfg.seed)
    if init is not None:
        vae = load_vae(dataclasses.replace(entry, weights=init.name), init.parent, spec)
        vae.requires_grad_(True).train()
        log(f"[{entry.name}] initialised from {init}")
    else:
        vae = PointCloudVAE(entry.architecture, spec)
        with torch.no_grad():  # decoded points start spread on a training shape, not at 0
            vae.decoder[-1].bias.copy_(source.batch(1, gen)[0].reshape(-1)
                                       / entry.architecture.length_scale)
    optim = torch.optim.Adam(vae.parameters(), lr=cfg.learning_rate)
    log(f"[{entry.name}] {parameter_count(vae)} parameters, {source.num_train} training shapes,"
        f" {source.eval.shape[0]} held out")
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    for step in range(1, cfg.steps + 1):
        elapsed = time.perf_counter() - start
        if elapsed > cfg.time_limit_s:
            log(f"[{entry.name}] time limit reached at step {step - 1}")
            step -= 1
            break
        progress = max(step / cfg.steps, elapsed / cfg.time_limit_s)
        for group in optim.param_groups:
            group["lr"] = cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        loss, cd, kl = vae_loss(vae, source.batch(cfg.batch_size, gen), cfg, gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            log(f"[{entry.name}] step {step} loss {loss.item():.3f} cd {cd.mean().item():.3f} "
                f"kl {kl.mean().item():.2f} t {time.perf_counter() - start:.0f}s")
    wall = time.perf_counter() - start
    vae.eval()
    latent = f"N(0, {entry.architecture.prior_std}² I), the training prior"
    if cfg.fit_shapes > 0:
        fit_latent_prior(vae, (source.batch(64, gen) for _ in range(-(-cfg.fit_shapes // 64))))
        std = vae.latent_std
        latent = (f"N(m, diag s²) fitted to the aggregate posterior of {cfg.fit_shapes} training"
                  f" draws: m within ±{float(vae.latent_mean.abs().max()):.2f}, s from "
                  f"{float(std.min()):.2f} to {float(std.max()):.2f} (median "
                  f"{float(std.median()):.2f})")
        log(f"[{entry.name}] latent prior: {latent}")
    cd = evaluate_reconstruction(vae, source.eval).mean().item()
    native = cd * entry.architecture.length_scale ** 2 / REFERENCE_POINTS
    log(f"[{entry.name}] held-out reconstruction CD {cd:.3f} (ℓ², 2048-sum) = {native:.3e} "
        f"units² mean squared NN distance (both directions summed)")
    report = ShapeTrainingReport(
        steps=step, wall_time_s=wall, final_loss=sum(losses[-50:]) / max(1, len(losses[-50:])),
        held_out_cd=cd, held_out_cd_native=native, held_out_names=source.held_out_names,
        latent_prior=latent,
        num_train=source.num_train, num_eval=source.eval.shape[0])
    return vae, report


def _model_card(entry: ShapePriorEntry, cfg: ShapeTrainingConfig, report: ShapeTrainingReport,
                command: str, weights_bytes: int, png_name: str, params: int) -> str:
    a = entry.architecture
    if entry.name == "boxes":
        data = (f"{cfg.num_shapes} boxes (App. C), edge lengths uniform in [0.1, 0.5] m, standing"
                " on the xy plane centred on the z axis, 2048 points uniform on the faces, "
                "fresh points and a random rotation about z in [-π, π] each time a box is used;"
                f" {report.num_eval} held-out boxes from another seed.")
    else:
        held = ", ".join(Path(n).stem for n in report.held_out_names)
        data = (f"{report.num_train + report.num_eval} pybullet_data meshes (random_urdfs/*/*.obj"
                " plus extra named meshes), centred on the bounding box, scaled into the "
                "diameter-1 ball, 8192 points sampled with trimesh, 2048 drawn per use, random "
                f"rotation about z. {report.num_train} for training; held out "
                f"({report.num_eval}, every 10th random_urdfs mesh): {held}.")
    rms = math.sqrt(report.held_out_cd_native / 2)
    where = (f"{cfg.threads} CPU thread(s) of a shared 2-core machine" if cfg.device == "cpu"
             else f"device `{cfg.device}`")
    return f"""# Shape prior `{entry.name}`

Point-cloud VAE (PointNet encoder, fully connected decoder; Krupnik et al. 2023, App. A/C),
used by MACE-VAE shape completion (`mace_core.shape.completion`).

| | |
|---|---|
| weights | `{entry.weights}` ({weights_bytes / 1e6:.2f} MB, float16 safetensors) |
| parameters | {params} |
| architecture | latent {a.latent_dim}, encoder per-point {list(a.encoder_widths)} -> max-pool -> \
{a.encoder_hidden} -> 2x{a.latent_dim}, decoder {a.latent_dim} -> {list(a.decoder_widths)} -> \
{a.num_points}x3; encoder sees {a.encoder_points} points |
| frame / units | {entry.frame} |
| length scale ℓ | {a.length_scale} |
| training prior | N(0, {a.prior_std}² I) |
| latent prior (sampling, MACE's θ_0) | {report.latent_prior} |

## Data
{data}

## Training
Command: `{command}`

Adam lr {cfg.learning_rate} (cosine to 10 %), batch {cfg.batch_size}, β_rec {cfg.beta_rec}, \
β_KL {cfg.beta_kl}, Chamfer loss of all decoded points against {cfg.loss_points} data points, \
seed {cfg.seed}, \
{where}. {report.steps} steps in {report.wall_time_s:.0f} s wall time. Final loss (mean of last \
50 steps) {report.final_loss:.3f}.

## Held-out reconstruction
Chamfer distance of decode(μ(x)) to x over {report.num_eval} held-out shapes:
**{report.held_out_cd:.3f}** in the scores' convention (k = 1, summed over 2048 points, units of
ℓ²), i.e. {report.held_out_cd_native:.3e} units² as the mean squared nearest-neighbour
distance of both directions added (RMS nearest-neighbour distance ≈ {rms:.4f} units).

## Samples
![prior samples and reconstructions]({png_name})

Top row: decoded draws of the latent prior; bottom row: held-out shapes (orange) with their
reconstructions (grey).
"""


def main_shape(argv: list[str] | None = None) -> int:
    """Entry point of ``mace-train shape``: train one shape prior and write its files.

    Arguments: ``--prior boxes|objects`` (required), ``--registry PATH``, ``--data-dir PATH``,
    ``--steps``, ``--batch-size``, ``--lr``, ``--beta-rec``, ``--beta-kl``, ``--loss-points``,
    ``--num-shapes``, ``--held-out``, ``--time-limit-min``, ``--threads``, ``--seed``,
    ``--device`` (auto|cpu|cuda[:N]), ``--init WEIGHTS`` (continue from a safetensors file),
    ``--fit-shapes`` (training draws the latent prior is fitted to; ``--steps 0`` only refits).
    Returns the exit code.
    """
    d = ShapeTrainingConfig()
    p = argparse.ArgumentParser(prog="mace-train shape", description=main_shape.__doc__)
    p.add_argument("--prior", required=True, help="registry entry to train, e.g. boxes|objects")
    p.add_argument("--registry", default=str(DEFAULT_REGISTRY), help="shape registry YAML")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="cache of sampled meshes")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--beta-rec", type=float, default=d.beta_rec)
    p.add_argument("--beta-kl", type=float, default=d.beta_kl)
    p.add_argument("--loss-points", type=int, default=d.loss_points)
    p.add_argument("--num-shapes", type=int, default=d.num_shapes, help="boxes only")
    p.add_argument("--held-out", type=int, default=d.held_out, help="boxes only")
    p.add_argument("--time-limit-min", type=float, default=d.time_limit_s / 60)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto|cpu|cuda[:N]")
    p.add_argument("--init", default=None, help="safetensors weights to start from")
    p.add_argument("--fit-shapes", type=int, default=d.fit_shapes,
                   help="training draws to fit the latent prior to (0: keep N(0, σ_z² I))")
    args = p.parse_args(argv)
    entries = load_shape_registry(args.registry)
    if args.prior not in entries:
        p.error(f"unknown prior '{args.prior}' (registry has {sorted(entries)})")
    if args.prior not in DATA_SETS:
        p.error(f"no training data set for prior '{args.prior}' (have {DATA_SETS})")
    entry = entries[args.prior]
    torch.set_num_threads(args.threads)
    cfg = ShapeTrainingConfig(
        prior=args.prior, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr, beta_rec=args.beta_rec,
        beta_kl=args.beta_kl, loss_points=args.loss_points, num_shapes=args.num_shapes,
        held_out=args.held_out, time_limit_s=args.time_limit_min * 60, seed=args.seed,
        threads=args.threads, device=args.device, fit_shapes=args.fit_shapes)
    spec = TensorSpec.resolve(cfg.device)
    init = Path(args.init).resolve() if args.init else None
    vae, report = train_shape_prior(entry, cfg, Path(args.data_dir), spec, init=init)
    out_dir = Path(args.registry).parent
    weights = out_dir / entry.weights
    save_vae_weights(vae, weights, metadata={"prior": entry.name, "steps": str(report.steps)})
    png = weights.with_suffix(".png")
    _write_sample_png(vae, args.data_dir, cfg, spec, png)
    command = "mace-train shape " + " ".join(argv if argv is not None else [])
    card = out_dir / (entry.card or weights.with_suffix(".md").name)
    card.write_text(_model_card(entry, cfg, report, command.strip(), weights.stat().st_size,
                                png.name, parameter_count(vae)))
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB), {card}, {png}")
    return 0


@torch.no_grad()
def _write_sample_png(vae: PointCloudVAE, data_dir: str, cfg: ShapeTrainingConfig,
                      spec: TensorSpec, path: Path) -> None:
    from .plotting import plot_completions

    source = _ShapeSource(cfg, vae.config.num_points, Path(data_dir), spec)
    samples = vae.sample(4, spec.generator(cfg.seed + 7))
    held = source.eval[:4]
    recon = vae.decode(vae.encode(held)[0])
    fig = plot_completions(torch.cat([samples, recon]), title=f"{cfg.prior}: prior samples "
                           "(top), held-out reconstructions (bottom)")
    for i, ax in enumerate(fig.axes[4:]):
        h = held[i, ::8].cpu().numpy()
        ax.scatter(h[:, 0], h[:, 1], h[:, 2], s=1.5, c="tab:orange", alpha=0.6, depthshade=False)
    fig.savefig(str(path), dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
