"""A small GAN with two optimizers, learning a ring of eight Gaussians in the plane.

The real data are 2-D points drawn around eight centres on a circle of radius 2.
``configure_optimizers`` returns two optimizers, so the trainer calls
``training_step(batch, batch_idx, optimizer_idx)`` twice per batch: index 0
trains the generator, index 1 the discriminator. While one optimizer's step
runs, the trainer turns off ``requires_grad`` on the parameters that only the
other optimizer owns, so the generator's loss does not reach the
discriminator's weights.

Each validation run draws points from a fixed batch of noise and logs how
many of them land near a centre (``val_precision``) and how many centres
receive a fair share of them (``val_modes``, out of 8). A generator that
collapses onto a few centres scores a high precision but few modes.

Run it with ``python examples/gan.py``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins import ModelCheckpoint

NUM_MODES = 8
RADIUS = 2.0
MODE_STD = 0.05
#: A generated point counts as on a mode when it lies within this many standard deviations of its centre.
NEAR = 4.0
#: A mode counts as covered when it receives at least this share of the points an even spread would give it.
COVERED_SHARE = 0.25


def mode_centres() -> torch.Tensor:
    """Return the (8, 2) centres of the Gaussians, evenly spaced on the circle."""
    angles = torch.arange(NUM_MODES, dtype=torch.float32) * (2 * math.pi / NUM_MODES)
    return RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def sample_ring(count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``count`` points of the real distribution."""
    modes = torch.randint(NUM_MODES, (count,), generator=generator)
    return mode_centres()[modes] + MODE_STD * torch.randn(count, 2, generator=generator)


def score_points(points: torch.Tensor) -> tuple[float, int]:
    """Return the share of ``points`` near some centre and the number of centres that are covered."""
    distances = torch.cdist(points, mode_centres().to(points.device))
    nearest_distance, nearest = distances.min(dim=1)
    near = nearest_distance < NEAR * MODE_STD
    counts = torch.bincount(nearest[near], minlength=NUM_MODES)
    covered = int((counts >= COVERED_SHARE * len(points) / NUM_MODES).sum())
    return float(near.float().mean()), covered


def mlp(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, outputs),
    )


class RingGAN(hookrt.LightningModule):
    """A generator and a discriminator, each a three-layer perceptron.

    Args:
        latent_dim: size of the generator's noise input.
        hidden: width of the hidden layers of both networks.
        lr: Adam learning rate of both optimizers.
        num_samples: real points per epoch.
        batch_size: real points per batch.
        seed: seed of the real points and of the fixed validation noise.
    """

    def __init__(
        self,
        latent_dim: int = 2,
        hidden: int = 64,
        lr: float = 1e-3,
        num_samples: int = 8192,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generator = mlp(latent_dim, 2, hidden)
        self.discriminator = mlp(2, 1, hidden)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(noise)

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        (real,) = batch
        # Created on the batch's device, so the example also runs where the trainer placed the module on a GPU.
        noise = torch.randn(len(real), self.hparams.latent_dim, device=real.device)
        real_labels = torch.ones(len(real), 1, device=real.device)
        fake_labels = torch.zeros(len(real), 1, device=real.device)

        if optimizer_idx == 0:
            # The generator improves when the discriminator takes its points for real ones.
            g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(noise)), real_labels)
            self.log("g_loss", g_loss, prog_bar=True)
            return g_loss

        # detach(): the discriminator's loss must not flow back into the generator.
        fake = self(noise).detach()
        d_loss = (
            F.binary_cross_entropy_with_logits(self.discriminator(real), real_labels)
            + F.binary_cross_entropy_with_logits(self.discriminator(fake), fake_labels)
        ) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        return d_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (noise,) = batch
        points = self(noise)
        precision, modes = score_points(points)
        self.log("val_precision", precision, prog_bar=True)
        self.log("val_modes", float(modes), prog_bar=True)
        experiment = self.logger.experiment if self.logger is not None else None
        if experiment:
            # The logger's experiment is the tensorboardX SummaryWriter: anything it can draw, a module can write.
            experiment.add_histogram("generated_radius", points.norm(dim=1), global_step=self.global_step)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        betas = (0.5, 0.999)  # beta1 = 0.5 in place of Adam's 0.9, the usual setting for GAN training
        generator = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        discriminator = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [generator, discriminator], []

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        points = sample_ring(self.hparams.num_samples, generator)
        return DataLoader(TensorDataset(points), batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed + 1)
        noise = torch.randn(2048, self.hparams.latent_dim, generator=generator)
        return DataLoader(TensorDataset(noise), batch_size=2048)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a GAN on a ring of eight 2-D Gaussians.")
    parser.add_argument("--max-epochs", type=int, default=20, help="epochs to train (default: 20)")
    parser.add_argument("--default-root-dir", default="gan_run",
                        help="folder for TensorBoard logs and checkpoints (default: ./gan_run)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both networks (default: 0.001)")
    parser.add_argument("--num-samples", type=int, default=8192,
                        help="real points per epoch, in batches of 64 (default: 8192)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the noise")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or model summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the GAN; returns the last validation scores (``val_precision``, ``val_modes``)."""
    args = parse_args(argv)
    hookrt.seed_everything(args.seed)
    model = RingGAN(lr=args.lr, num_samples=args.num_samples, seed=args.seed)

    # Keep the checkpoint whose generator covers the most modes; "max" because more is better.
    checkpoint = ModelCheckpoint(monitor="val_modes", mode="max", filename="gan-{epoch}-{val_modes:.0f}modes")
    trainer = hookrt.Trainer(
        max_epochs=args.max_epochs,
        default_root_dir=args.default_root_dir,
        plugins=[checkpoint],
        enable_progress_bar=not args.quiet,
        enable_model_summary=not args.quiet,
        num_sanity_val_steps=0,
        log_every_n_steps=20,
    )
    trainer.fit(model)

    scores = {name: float(trainer.callback_metrics[name]) for name in ("val_precision", "val_modes")}
    print(f"generated points near a mode: {scores['val_precision']:.1%}; modes covered: "
          f"{scores['val_modes']:.0f} of {NUM_MODES}")
    print(f"best checkpoint: {checkpoint.best_model_path}")
    print(f"TensorBoard logs: {trainer.logger.log_dir}")
    return scores


if __name__ == "__main__":
    main()
