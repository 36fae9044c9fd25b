"""Image classification data for :mod:`aru_models.train`, read from local files only.

Three sources, all returning an :class:`ImageData`:

- ``digits``: scikit-learn's handwritten digits (1,797 8x8 grey images that ship
  inside the package), upsampled to 32x32 (bilinear) and replicated to three
  channels, with a fixed stratified 80/20 train/validation split.
- ``cifar10``: the CIFAR-10 python-pickle folder (``data_batch_1`` ...
  ``data_batch_5`` and ``test_batch``, as unpacked from ``cifar-10-python.tar.gz``).
- ``folder``: an ImageFolder-style tree, ``train/<class>/<image>`` and
  ``val/<class>/<image>``, decoded with Pillow.

Datasets yield ``(image, label)`` with ``image`` a CHW tensor: ``uint8`` in
[0, 255] or ``float32`` in [0, 1]. Normalization and augmentation happen on
whole batches, on the training device, in :func:`prepare_batch`; they need
neither torchvision nor Pillow, and their randomness comes from one generator
the caller seeds, so a run is reproducible and resumable.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = [
    "DATASETS",
    "ImageData",
    "TensorImages",
    "ImageFolderImages",
    "load_data",
    "load_digits",
    "load_cifar10",
    "load_image_folder",
    "train_loader",
    "val_loader",
    "prepare_batch",
    "random_crop_flip",
]

DATASETS = ("digits", "cifar10", "folder")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_LAYOUT = (
    "the CIFAR-10 python-pickle folder: data_batch_1 ... data_batch_5 and test_batch, "
    "each a pickled dict with b'data' (N x 3072 uint8) and b'labels' (N ints in 0..9), "
    "as unpacked from cifar-10-python.tar.gz (the folder itself or its parent holding "
    "cifar-10-batches-py/)"
)
FOLDER_LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (ImageFolder style)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageData:
    """A training and a validation set, and how to turn their batches into model inputs."""

    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, of images scaled to [0, 1]
    std: tuple[float, float, float]
    augment: bool  # random crop (zero padding of size/8) and horizontal flip on training batches


class TensorImages(Dataset):
    """Images held in memory: ``images`` is N x C x H x W (uint8 or float in [0, 1]), ``labels`` N int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class ImageFolderImages(Dataset):
    """Image files decoded on access: resized so the short side is ``size``, center-cropped
    to ``size`` x ``size``, returned as a 3 x size x size uint8 tensor."""

    def __init__(self, samples: list[tuple[Path, int]], size: int):
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = self.size / min(w, h)
            img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        image = pixels.view(self.size, self.size, 3).permute(2, 0, 1).contiguous()
        return image, torch.tensor(label, dtype=torch.int64)


def load_data(name: str, data_dir: str | Path | None = None, image_size: int = 32) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir`` is required for ``cifar10`` and ``folder``; ``image_size`` is the
    side length ``folder`` images are resized and cropped to (``digits`` and
    ``cifar10`` are always 32x32). Raises ``ValueError`` for an unknown name or a
    missing ``data_dir``, ``FileNotFoundError`` / ``ValueError`` naming the path and
    the expected layout when the files are absent or malformed.
    """
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if data_dir is None:
        layout = CIFAR10_LAYOUT if name == "cifar10" else FOLDER_LAYOUT
        raise ValueError(f"--dataset {name} needs --data-dir: {layout}")
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_image_folder(data_dir, image_size)


def load_digits(size: int = 32, val_fraction: float = 0.2) -> ImageData:
    """scikit-learn's handwritten digits as 3 x ``size`` x ``size`` float images in [0, 1].

    The split is stratified and fixed (``random_state=0``): the same images are
    held out on every run, whatever the training seed. Normalization uses the
    mean and standard deviation of the training images. No augmentation: flips
    and shifts would change what a digit is, and the images fill their frame.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=val_fraction, stratify=labels.numpy(), random_state=0
    )
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    train_images = images[train_idx]
    mean = train_images.mean().item()
    std = train_images.std().item()
    return ImageData(
        train=TensorImages(train_images, labels[train_idx]),
        val=TensorImages(images[val_idx], labels[val_idx]),
        num_classes=10,
        mean=(mean,) * 3,
        std=(std,) * 3,
        augment=False,
    )


def load_cifar10(data_dir: str | Path) -> ImageData:
    """CIFAR-10 from its python-pickle files in ``data_dir`` (or ``data_dir/cifar-10-batches-py``).

    Images stay uint8 in memory (150 MB for the full set). The files are Python
    pickles: read only a copy you trust.
    """
    root = Path(data_dir).expanduser()
    if not (root / CIFAR10_FILES[0]).is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [name for name in CIFAR10_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}; expected {CIFAR10_LAYOUT}")
    train = [_read_cifar_batch(root / name) for name in CIFAR10_FILES[:-1]]
    val = _read_cifar_batch(root / CIFAR10_FILES[-1])
    return ImageData(
        train=TensorImages(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
        val=TensorImages(*val),
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        augment=True,
    )


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a truncated or foreign file raises any of several types
        raise ValueError(f"{path}: not a CIFAR-10 pickle ({type(e).__name__}: {e}); "
                         f"expected {CIFAR10_LAYOUT}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: holds a {type(batch).__name__}, not a dict; expected {CIFAR10_LAYOUT}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: keys {sorted(map(repr, batch))} lack b'data' or b'labels'; "
                         f"expected {CIFAR10_LAYOUT}")
    try:
        data = torch.as_tensor(data)
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: b'data' or b'labels' is not an array ({e}); expected {CIFAR10_LAYOUT}") from e
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: b'data' is {data.dtype} {tuple(data.shape)} with {labels.numel()} labels; "
            f"expected N x 3072 uint8 and N labels"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels span {labels.min().item()}..{labels.max().item()}; expected 0..9")
    return data.view(-1, 3, 32, 32).clone(), labels


def load_image_folder(data_dir: str | Path, image_size: int) -> ImageData:
    """An ImageFolder tree: class names are the sub-folders of ``train/``, sorted;
    ``val/`` may hold any subset of them. Needs Pillow (imported here, not at module import)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError as e:
        raise ImportError("--dataset folder decodes images with Pillow, which is not installed "
                          "(pip install pillow)") from e
    root = Path(data_dir).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root}: no {split}/ folder; expected {FOLDER_LAYOUT}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root / 'train'}: no class folders; expected {FOLDER_LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split in ("train", "val"):
        samples = []
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise ValueError(f"{class_dir}: class {class_dir.name!r} is not among the train/ classes")
            samples += [(f, index[class_dir.name]) for f in sorted(class_dir.iterdir())
                        if f.suffix.lower() in IMAGE_SUFFIXES]
        if not samples:
            raise FileNotFoundError(f"{root / split}: no images ({', '.join(IMAGE_SUFFIXES)}); expected {FOLDER_LAYOUT}")
        splits[split] = ImageFolderImages(samples, image_size)
    return ImageData(
        train=splits["train"],
        val=splits["val"],
        num_classes=len(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=True,
    )


def train_loader(dataset: Dataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Shuffled batches of ``batch_size`` images for one process of ``world_size``.

    The order is a permutation drawn from ``seed`` and the epoch (call
    ``loader.sampler.set_epoch(epoch)``); process ``rank`` takes every
    ``world_size``-th index of it, so the first ``batch_size`` images of every
    process together are the first ``batch_size * world_size`` of the permutation
    -- the batch a single process with the global batch size would see. The last,
    incomplete batch is dropped, and so is the permutation's tail that would not
    give every process an image (the sampler does not pad it with repeats, which
    would make a batch that one process does not see). ``seed`` is an integer in
    ``[0, 2**32)``; the sampler draws epoch ``e`` from ``seed * 2**32 + e``, so that no two
    seeds share an order (``seed + e`` would give seed ``s + 1`` seed ``s``'s orders one
    epoch early). The loader draws nothing from torch's global generator (a resumed
    run makes the cut epoch's iterator again).
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"train_loader: seed must be an integer in [0, 2**32); got {seed}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed << 32,
                                 drop_last=True)
    # (a generator of its own: each iterator's worker seed is drawn from it, not from torch's global one)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def val_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
               workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Every image once across all processes: process ``rank`` takes indices ``rank, rank + world_size, ...``."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def prepare_batch(images: torch.Tensor, data: ImageData, device: torch.device, *, train: bool,
                  generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Model input from a batch of dataset images: float32 on ``device``, augmented
    when ``train`` and ``data.augment`` (see :func:`random_crop_flip` for the
    generator, ``rank`` and ``world_size``), normalized with ``data.mean`` /
    ``data.std``, in ``memory_format``."""
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if train and data.augment:
        x = random_crop_flip(x, max(1, x.shape[-1] // 8), generator, rank=rank, world_size=world_size)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None, *,
                     rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Per image of the N x C x H x W batch ``x``: an H x W crop at a random offset of
    the zero-padded image (padding ``padding`` on every side), then a horizontal flip
    with probability 1/2 -- the standard CIFAR augmentation, in one gather.

    The random numbers come from the CPU ``generator``, drawn for the global batch
    of ``N * world_size`` images, of which ``x`` holds those at positions ``rank,
    rank + world_size, ...`` (the images :func:`train_loader` gives process
    ``rank``). With one generator seeded alike on every process, an image is then
    augmented the same way whatever the number of processes.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n * world_size), generator=generator)[:, rank::world_size]
    flip = (torch.rand(n * world_size, generator=generator) < 0.5)[rank::world_size]
    offsets, flip = offsets.to(x.device), flip.to(x.device)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # (n, w): a flip reads the crop right to left
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)
    cols = offsets[1][:, None] + cols
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
