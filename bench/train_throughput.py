"""How close the pretraining loop gets to the model's own speed, and what it gains over a DataLoader.

Three loops train the same ResNet (params.yaml: depth, batch size, crop, precision) for the same number of
steps, in interleaved rounds so that drift in the machine's speed hits all three alike:

* ``blockdrop``: the real pretraining step: index slices of the in-memory uint8 split, crop and flip on
  whole batches, normalisation, forward, backward, SGD step;
* ``bare``: forward + backward + step on a fixed random tensor of the same shape: the ceiling;
* ``dataloader``: the conventional torchvision recipe: a Dataset of PIL images, per-image RandomCrop,
  RandomHorizontalFlip, ToTensor and Normalize, batched by ``torch.utils.data.DataLoader``.

Run: ``python bench/train_throughput.py [--steps 20 --rounds 3]``. Prints images/s and the two ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import functional as TF

from blockdrop.config import load_params
from blockdrop.data import Normalize, batches, load_meta, load_split
from blockdrop.models import cifar_resnet
from blockdrop.runtime import autocast, resolve_precision, select_device


class PilDataset(torch.utils.data.Dataset):
    """What most training scripts do: one PIL image at a time through a torchvision transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(TF.to_pil_image(self.images[i])), int(self.labels[i])


def forever(make: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (the usual tutorial value)")
    args = parser.parse_args()

    p = load_params()
    device = select_device(p.device, p.threads)
    precision = resolve_precision(p.precision, device)
    meta, train = load_meta("data/prepared"), load_split("data/prepared", "train")
    normalize = Normalize(meta.mean, meta.std, device)
    cfg, bs = p.pretrain, p.pretrain.batch_size
    size = cfg.crop_size or meta.shape[1]
    model = cifar_resnet(p.model.depth, meta.num_classes, meta.shape[0]).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(precision, device):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    on_device = train.to(device)
    ours = forever(lambda: batches(on_device, bs, normalize, generator=generator, shuffle=True,
                                   crop_padding=cfg.crop_padding, crop_size=cfg.crop_size, flip=cfg.flip))
    x_fixed = torch.randn(bs, meta.shape[0], size, size, device=device).contiguous(memory_format=torch.channels_last)
    y_fixed = torch.randint(0, meta.num_classes, (bs,), device=device)
    bare = forever(lambda: iter([(x_fixed, y_fixed)]))
    tf = transforms.Compose([
        transforms.RandomCrop(size, padding=cfg.crop_padding),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(meta.mean, meta.std),
    ])
    loader = torch.utils.data.DataLoader(PilDataset(train.images, train.labels, tf), batch_size=bs, shuffle=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0, drop_last=True)
    conventional = ((x.to(device).contiguous(memory_format=torch.channels_last), y.to(device))
                    for x, y in forever(lambda: iter(loader)))

    loops = {"blockdrop": ours, "bare": bare, "dataloader": conventional}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for it in loops.values():  # warm-up: allocator, kernels, DataLoader workers
        for _ in range(3):
            step(*next(it))
    for _ in range(args.rounds):
        for name, it in loops.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*next(it))
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(args.steps * bs / (time.perf_counter() - t0))

    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"ResNet-{p.model.depth}, batch {bs}, {size}x{size} crops, {precision}, {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    for name, rate in med.items():
        print(f"  {name:<11} {rate:7.1f} images/s")
    print(f"blockdrop / bare       = {med['blockdrop'] / med['bare']:.3f}   (goal >= 0.90)")
    print(f"blockdrop / dataloader = {med['blockdrop'] / med['dataloader']:.3f}   (goal >= 1.5)")


if __name__ == "__main__":
    main()
