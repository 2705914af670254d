"""Train examples/mynet.py's MyNet on CIFAR-10 (JPEG) with a plain PyTorch loop and save its
state_dict: the "your own model and weights" a user brings to depthcut (docs/results/own-model.md).

    python scripts/train_own_model.py --data-root ../shared/data --epochs 8 --out mynet.pt

The images are decoded by depthcut's CIFAR-10 (JPEG) reader (any loader would do); the rest is
what a user's own script does: random crop and flip, SGD with momentum, cosine schedule.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from depthcut.data import load_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mynet.py"


def load_mynet() -> type:
    spec = importlib.util.spec_from_file_location("mynet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MyNet


def augment(x: torch.Tensor) -> torch.Tensor:
    """Pad-4 random crop and horizontal flip, per batch (float images in [0, 1])."""
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,)).tolist()
    x = padded[:, :, i:i + 32, j:j + 32]
    return torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("mynet.pt"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("cifar10-jpeg", args.data_root)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    train = DataLoader(TensorDataset(data.train_inputs, data.train_labels), batch_size=128,
                       shuffle=True)
    model = load_mynet()()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(normalize(augment(images.float() / 255) * 255)),
                                   labels)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(normalize(x)).argmax(1) == y).sum())
                          for x, y in DataLoader(TensorDataset(data.test_inputs,
                                                               data.test_labels), 500))
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 "
              f"{100 * correct / len(data.test_labels):.2f}, "
              f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
    torch.save(model.state_dict(), args.out)
    print(f"state_dict saved to {args.out}")


if __name__ == "__main__":
    main()
