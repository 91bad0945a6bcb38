"""Data-parallel training on several processes with the DistributedDataParallel plugin.

A small classifier learns to tell apart four Gaussian clusters in 16
dimensions. Each process trains on its own share of every epoch's batches,
and gradients are averaged across processes in each backward pass.

Start the processes in one of three ways.

Without a launcher, the plugin starts ``--devices`` processes on this
machine and returns rank 0's results to this script::

    python examples/ddp.py --devices 2

One machine, processes started by torchrun::

    torchrun --standalone --nproc-per-node=2 examples/ddp.py --devices 2

Several machines (here 2 machines with 4 GPUs each). Run on every machine,
with ``--node-rank`` 0 on the machine whose address is given as
``--master-addr`` and 1 on the other::

    torchrun --nnodes=2 --nproc-per-node=4 --node-rank=0 --master-addr=10.0.0.1 --master-port=29500 \\
        examples/ddp.py --accelerator cuda --devices 4 --num-nodes 2

On the CPU the processes talk through gloo; on GPUs through nccl, one GPU per
process. Only global rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import hookrt
from hookrt.plugins.ddp import DistributedDataParallel
from hookrt.plugins.device import DevicePlacement

FEATURES = 16
CLASSES = 4


class ClusterClassifier(hookrt.LightningModule):
    """A two-layer network that logs loss and accuracy averaged over all processes."""

    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    def forward(self, x):
        return self.network(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_accuracy", (logits.argmax(dim=1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def clusters(samples: int, seed: int) -> TensorDataset:
    """Return ``samples`` points drawn around four fixed centres, labelled by centre."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 0.5
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (samples,), generator=generator)
    points = centres[labels] + torch.randn(samples, FEATURES, generator=generator)
    return TensorDataset(points, labels)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes per machine (GPUs per machine on CUDA)")
    parser.add_argument("--num-nodes", type=int, default=1, help="machines taking part (needs torchrun)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"],
                        help="the device type each process trains on")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch on each process")
    parser.add_argument("--root", default=None, help="folder for logs and checkpoints (default: the working folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, validate and return the final validation metrics (from rank 0)."""
    args = parse_args(argv)
    hookrt.seed_everything(0)
    plugins: list[hookrt.Plugin] = [DistributedDataParallel()]
    if args.accelerator == "cuda":
        plugins.append(DevicePlacement(accelerator="cuda", devices=args.devices))
    trainer = hookrt.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        plugins=plugins, default_root_dir=args.root, enable_progress_bar=False,
    )
    model = ClusterClassifier()
    train = DataLoader(clusters(4096, seed=1), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(clusters(1024, seed=2), batch_size=256)
    trainer.fit(model, train, val)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
        print(f"after {trainer.global_step} steps on {args.devices * args.num_nodes} process(es): {shown}")
    return metrics


if __name__ == "__main__":
    main()
