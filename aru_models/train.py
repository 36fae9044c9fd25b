"""Train a ResNet or ResNeXt image classifier: ``python -m aru_models.train``.

One process (CPU or one GPU)::

    python -m aru_models.train     # resnext29_tiny on digits: 5 epochs of about 10 s on a CPU, 92% accuracy
    python -m aru_models.train --model resnext29_8x64d --dataset cifar10 --data-dir ~/data/cifar10 \\
        --optimizer sgd --lr 0.1 --batch-size 128 --epochs 300 --checkpoint runs/r29.pt

Several processes, one per GPU (nccl) or on CPUs (gloo)::

    torchrun --nproc_per_node 8 -m aru_models.train --model resnext29_16x64d --dataset cifar10 \\
        --data-dir ~/data/cifar10 --batch-size 1024 --sync-bn --checkpoint runs/r29.pt --resume

``--batch-size`` is the global batch: each of the N processes takes
batch-size / N images per step (an error if N does not divide it), so a run
gives the same updates whatever N is, up to batch-norm statistics, which are
per process unless ``--sync-bn``. Only rank 0 prints and writes checkpoints;
printed losses and accuracies are over all processes.

After each epoch the run prints ``Epoch N, Loss: L, Accuracy: A`` (training
loss and accuracy, the latter a fraction) and then ``Validation Accuracy: V``;
at the end a summary with the training throughput in images/s.

``--checkpoint PATH`` is rewritten atomically after every epoch, and where
``--max-steps`` cuts an epoch short (model, optimizer state, gradient scaler,
epoch and the steps taken in it, random states); ``--resume`` continues from
it, inside the epoch where it was cut, so a run stopped mid-way loses at most
the epoch in progress. ``--resume`` without an existing checkpoint is an error
rather than a fresh start, so that a mistyped path cannot silently restart a
long run. The learning-rate schedule is not stored: it follows from
``--optimizer``, ``--lr``, ``--epochs`` and the step, so a run resumed with more
``--epochs`` (or another ``--lr`` or ``--weight-decay``) continues on the
schedule those arguments give, from the step it reached. A run resumed with the
same arguments follows the uninterrupted one exactly; another ``--model``,
``--optimizer``, ``--dataset``, ``--batch-size`` or ``--seed`` (which orders the
data) is refused.

Runs are reproducible from ``--seed``: it seeds the model's initialization, the
data order (a permutation per epoch) and the augmentation (a generator per
epoch), which is what makes a resumed run follow the same trajectory as an
uninterrupted one. The augmentation of an image does not depend on the number
of processes either.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import os
import pickle
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aru_kernels.runtime import default_impl, interpreting

from . import data as datasets

__all__ = [
    "TrainResult",
    "Trainer",
    "build_parser",
    "main",
    "train",
    "model_builders",
    "create_model",
    "make_optimizer",
    "train_step",
    "evaluate",
    "seed_everything",
    "save_checkpoint",
    "convert_sync_batchnorm",
]

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What a run did, epoch by epoch (including epochs done before a ``--resume``)."""

    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    accuracies: list[float] = field(default_factory=list)  # training accuracy per epoch, in [0, 1]
    val_accuracies: list[float] = field(default_factory=list)  # validation accuracy after each epoch
    steps: int = 0  # optimizer steps in total
    images_per_second: float = 0.0  # training throughput of this invocation, all processes together
    train_seconds: float = 0.0  # time in the training loops of this invocation

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy after the last epoch."""
        return self.val_accuracies[-1] if self.val_accuracies else float("nan")


def model_builders() -> dict[str, Callable[..., nn.Module]]:
    """Every model ``--model`` accepts: the builders of :mod:`aru_models.resnet`
    (ImageNet layout) and :mod:`aru_models.cifar` (32x32 images), by name."""
    from . import cifar, resnet

    return {name: getattr(module, name) for module in (resnet, cifar) for name in module.__all__
            if re.fullmatch(r"(wide_)?res(net|next)\d+(_\w+)?", name)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aru_models.train",
        description="Train a ResNet/ResNeXt classifier on digits, CIFAR-10 or an image folder.",
    )
    p.add_argument("--model", default="resnext29_tiny", choices=sorted(model_builders()), metavar="NAME",
                   help="a builder of aru_models (default: %(default)s); one of: %(choices)s")
    p.add_argument("--impl", choices=("fused", "eager"), default=None,
                   help="blocks' implementation (default: the best available here, %s)" % default_impl())
    p.add_argument("--dataset", choices=datasets.DATASETS, default="digits",
                   help="digits: scikit-learn's handwritten digits at 32x32 (no download); cifar10: the "
                        "python-pickle folder in --data-dir; folder: DIR/train/<class>/* and DIR/val/<class>/*")
    p.add_argument("--data-dir", default=None, help="where cifar10 or folder data lives")
    p.add_argument("--image-size", type=int, default=None,
                   help="side length --dataset folder images are resized to (default: 32 for resnext29_* models, "
                        "224 otherwise); digits and cifar10 images are 32x32")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch: each of N processes takes batch-size/N images (default: %(default)s)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam: constant learning rate; sgd: momentum 0.9, cosine decay per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 penalty (default: 5e-4 with sgd, 0 with adam)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast dtype (default: bf16 on CUDA, off on CPU); fp16 uses a gradient scaler")
    p.add_argument("--channels-last", action="store_true", help="NHWC model weights and inputs")
    p.add_argument("--sync-bn", action="store_true",
                   help="batch-norm statistics over all processes' images, not each process's own")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="written atomically after every epoch, and where --max-steps stops inside one")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (which must exist)")
    p.add_argument("--seed", type=int, default=0, help="an integer in [0, 2**32) (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the last epoch may be cut short, and is then "
                        "validated over the whole validation set); the learning-rate schedule stays the one of "
                        "--epochs")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default: 0 for in-memory digits/cifar10, up to 8 for folder)")
    return p


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def create_model(name: str, num_classes: int, impl: str | None, seed: int) -> nn.Module:
    """Model ``name`` freshly initialized from ``seed`` -- the same weights on every process."""
    seed_everything(seed)
    return model_builders()[name](num_classes=num_classes, impl=impl)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float | None,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with a constant learning rate, or SGD (momentum 0.9) with a cosine decay
    from ``lr`` to 0 over ``total_steps``; the schedule steps once per optimizer step."""
    if name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay or 0.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    if name == "sgd":
        wd = 5e-4 if weight_decay is None else weight_decay
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _Cosine(total_steps))
    raise ValueError(f"unknown optimizer {name!r}; expected adam or sgd")


def _constant(step: int) -> float:
    return 1.0


class _Cosine:
    """Learning-rate factor 0.5 * (1 + cos(pi * step / total)), clamped at 0 past the end."""

    def __init__(self, total_steps: int):
        self.total_steps = max(1, total_steps)

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               *, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the batch's mean loss (before the step)
    and its number of correct predictions, both as detached tensors (no host sync)."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == labels).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader, data: datasets.ImageData, device: torch.device, *,
             amp_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Correct predictions and images seen by this process, as a float64 tensor [correct, count]."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in loader:
        x = datasets.prepare_batch(images, data, device, train=False, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        totals[0] += (logits.argmax(1) == labels).sum()
        totals[1] += labels.numel()
    model.train(was_training)
    return totals


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _CPUSyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the images of all processes, for CPU tensors (gloo).

    ``torch.nn.SyncBatchNorm`` runs only on GPUs; this computes the same thing
    with two differentiable all-reduces (the sum with the element count, then
    the centered sum of squares). Its parameters and buffers are those of
    ``nn.BatchNorm2d``, so state dicts are interchangeable.
    """

    process_group = None  # the default group; also what tells the fused path to synchronize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_tensor([x.numel() // c])])
        total = _AllReduceSum.apply(local)
        count = total[c].detach()
        mean = total[:c] / count
        centered = xf - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply(centered.square().sum((0, 2, 3))) / count
        y = centered * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * count / (count - 1)  # one value a channel: NaN, as SyncBatchNorm's
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every ``BatchNorm2d`` synchronized across processes: torch's
    ``SyncBatchNorm`` on GPUs, :class:`_CPUSyncBatchNorm2d` on CPUs. The fused
    path synchronizes both (any batch norm with a ``process_group`` attribute)
    in its own kernels."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = _CPUSyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            convert_sync_batchnorm(child, device)
    return model


def _check_writable(path: Path) -> None:
    """Refuse a checkpoint path that cannot be written, before any training."""
    if path.is_dir():
        raise ValueError(f"--checkpoint {path} is a directory; give the path of a file")
    existing = next(p for p in path.absolute().parents if p.exists())  # what is there now (nothing is created)
    if existing == path.absolute().parent:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=existing)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise ValueError(f"--checkpoint {path}: cannot write there ({e.strerror or e})") from e
    elif not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--checkpoint {path}: cannot create its folder in {existing}")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` always holds a complete
    checkpoint: into a temporary file beside it, flushed to disk, then renamed over it.
    A failure at any point leaves the previous file (if any) untouched and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp's file is private)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where directories can be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class ProgressBar:
    """A one-line ``\\r`` progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, total: int, stream=None, width: int = 30, enabled: bool = True):
        self.total, self.width = total, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and self.stream.isatty()
        self._shown = 0
        self._last = 0.0

    def update(self, done: int, loss: Callable[[], float]) -> None:
        """Redraw (at most ten times a second, and at the end); ``loss`` is called only to redraw."""
        if not self.enabled or (time.monotonic() - self._last < 0.1 and done < self.total):
            return
        self._last = time.monotonic()
        filled = self.width * done // max(1, self.total)
        count = f"{done:>{len(str(self.total))}}/{self.total}"
        line = f"\r{count} [{'#' * filled}{'.' * (self.width - filled)}] loss {loss():.4f}"
        self._shown = len(line) - 1
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()


class Trainer:
    """A training run set up from parsed command-line arguments: data, model,
    optimizer, process group. Construction raises ``ValueError``,
    ``FileNotFoundError``, ``ImportError`` or ``NotImplementedError`` for a
    configuration that cannot run; :meth:`fit` trains; :meth:`close` leaves the
    process group."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self._owns_group = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        args = self.args
        for name in ("epochs", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
        if args.max_steps is not None and args.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1; got {args.max_steps}")
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be positive and finite; got {args.lr}")
        if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be non-negative and finite; got {args.weight_decay}")
        if not 0 <= args.seed < 2 ** 32:
            raise ValueError(f"--seed must be an integer in [0, 2**32); got {args.seed}")
        if args.image_size is not None:
            if args.dataset != "folder":
                raise ValueError(f"--image-size resizes --dataset folder images; {args.dataset} images are 32x32 "
                                 f"(leave --image-size out)")
            if args.image_size < 1:
                raise ValueError(f"--image-size must be at least 1; got {args.image_size}")
        if args.data_dir is not None and args.dataset == "digits":
            raise ValueError("--data-dir is for --dataset cifar10 or folder; digits comes with scikit-learn")
        if args.batch_size % self.world_size:
            raise ValueError(f"--batch-size {args.batch_size} is the global batch and must be divisible by "
                             f"the number of processes, {self.world_size}")
        if args.resume and not args.checkpoint:
            raise ValueError("--resume needs --checkpoint PATH")
        if args.resume and not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {args.checkpoint}; run without --resume to start one")
        if args.checkpoint and self.is_main:
            _check_writable(Path(args.checkpoint))
        self.device = self._device(args.device)
        self.impl = args.impl or default_impl()
        if self.impl == "fused" and self.device.type == "cpu" and not interpreting():
            raise ValueError("--impl fused on a CPU runs the Triton kernels in the interpreter, which must be "
                             "chosen before import: set TRITON_INTERPRET=1 in the environment (slow; for testing)")
        amp = args.amp or ("bf16" if self.device.type == "cuda" else "off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        if self.world_size > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_group = True

        image_size = args.image_size if args.image_size is not None else (
            32 if args.model.startswith("resnext29") else 224)
        self.data = datasets.load_data(args.dataset, args.data_dir, image_size)
        workers = args.workers if args.workers is not None else (
            min(8, os.cpu_count() or 1) if args.dataset == "folder" else 0)
        per_rank = args.batch_size // self.world_size
        shard = {"rank": self.rank, "world_size": self.world_size, "workers": workers,
                 "pin_memory": self.device.type == "cuda"}
        self.train_loader = datasets.train_loader(self.data.train, per_rank, seed=args.seed, **shard)
        self.val_loader = datasets.val_loader(self.data.val, per_rank, **shard)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{args.dataset}: {len(self.data.train)} training images give no full batch of "
                             f"{args.batch_size}; lower --batch-size")

        self.model = create_model(args.model, self.data.num_classes, self.impl, args.seed)
        if args.sync_bn and self.world_size > 1:
            self.model = convert_sync_batchnorm(self.model, self.device)
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizer, self.scheduler = make_optimizer(self.model, args.optimizer, args.lr, args.weight_decay,
                                                        self.steps_per_epoch * args.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.result = TrainResult()
        self.start_epoch = 0
        self.start_step = 0  # steps of start_epoch already taken (an epoch --max-steps cut short)
        self.start_totals = None  # and their summed loss, correct predictions and images, where saved
        if args.resume:
            self._load(args.checkpoint)
        self.net = self.model
        if self.world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _device(self, name: str | None) -> torch.device:
        if name is None:
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from e
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {name}: no CUDA device is available here")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.world_size > 1 else torch.cuda.current_device())
        elif device.type != "cpu":
            raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
        return device

    def _load(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # (torch's message advises weights_only=False: not for a file we wrote)
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(f"--resume: {path} is not a checkpoint of this trainer: it does not load as tensors and "
                             f"plain values ({why.group(1).strip() if why else type(e).__name__})") from e
        except Exception as e:
            raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not all(
                key in state for key in ("config", "model", "optimizer", "epoch", "history", "rng")):
            raise ValueError(f"--resume: {path} is not a checkpoint of this trainer (format {CHECKPOINT_FORMAT})")
        for key in ("model", "optimizer", "dataset", "batch_size", "seed"):
            saved, now = state["config"].get(key, getattr(self.args, key)), getattr(self.args, key)
            if saved != now:
                raise ValueError(f"--resume: {path} was written with --{key.replace('_', '-')} {saved}, not {now}")
        # The hyperparameters are this run's arguments; the checkpoint holds the state (momentum, Adam's moments).
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise ValueError(f"--resume: {path} holds a {state['config']['model']} that does not fit this run's "
                             f"(another number of classes?): {' '.join(line.strip() for line in first[:3])}") from e
        for group, config in zip(self.optimizer.param_groups, configured):
            group.update(config)
        steps = state["history"]["steps"]
        # the schedule from the arguments, at the step reached (its constructor steps once more)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0],
                                                           last_epoch=steps - 1)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_states(state["rng"])
        # Where the run stands, from its step count. A checkpoint without epoch_steps (an older
        # one) saved an epoch cut by --max-steps as whole: its steps tell.
        epoch, epoch_steps = divmod(steps, self.steps_per_epoch)
        if (state["epoch"], state.get("epoch_steps", epoch_steps)) != (epoch, epoch_steps) and not (
                "epoch_steps" not in state and steps <= state["epoch"] * self.steps_per_epoch):
            raise ValueError(f"--resume: {path} is at step {steps}, {state['epoch']} whole epoch(s) and "
                             f"{state.get('epoch_steps', 0)} step(s) of the next; this run's data gives "
                             f"{self.steps_per_epoch} steps an epoch (the dataset changed?)")
        self.start_epoch, self.start_step = epoch, epoch_steps
        totals = state.get("epoch_totals")  # (an older checkpoint has none: its cut epoch's entry stays)
        self.start_totals = tuple(totals) if epoch_steps and totals else None
        self.result = TrainResult(**state["history"])

    def _save(self, path: str, epoch: int, epoch_steps: int, epoch_totals: tuple | None) -> None:
        """``epoch`` whole epochs done, and ``epoch_steps`` steps of the next (their summed
        loss, correct predictions and images: ``epoch_totals``)."""
        r = self.result
        save_checkpoint({
            "format": CHECKPOINT_FORMAT,
            "config": {"model": self.args.model, "optimizer": self.args.optimizer, "dataset": self.args.dataset,
                       "batch_size": self.args.batch_size, "seed": self.args.seed},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "epoch_steps": epoch_steps,
            "epoch_totals": epoch_totals,
            "rng": _rng_states(),
            "history": {"losses": r.losses, "accuracies": r.accuracies, "val_accuracies": r.val_accuracies,
                        "steps": r.steps},
        }, path)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def _broadcast_buffers(self) -> None:
        """Every process's buffers (the batch norms' running statistics) made rank 0's, as
        DistributedDataParallel makes them at each training forward: without --sync-bn each
        process's last step updated them from its own images, and the validation that follows
        is of one model, the checkpoint's."""
        if self.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def batches(self, epoch: int):
        """This process's training batches of ``epoch`` as model inputs and labels on the device.

        The order comes from ``--seed`` and the epoch, and so do the augmentation's
        random numbers (one generator per epoch, alike on every process): epochs can
        be replayed exactly after a resume, and a global batch is the same whatever
        the number of processes.
        """
        self.train_loader.sampler.set_epoch(epoch)
        seed = np.random.SeedSequence([self.args.seed, epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        for images, labels in self.train_loader:
            x = datasets.prepare_batch(images, self.data, self.device, train=True, generator=generator,
                                       rank=self.rank, world_size=self.world_size, memory_format=self.memory_format)
            yield x, labels.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int, skip: int = 0) -> tuple[float, float, int, float]:
        """One pass over the training data (cut short at ``--max-steps``; its first ``skip``
        batches, taken before a resume, drawn and passed over): the summed loss, the correct
        predictions and the images over all processes, and the seconds it took."""
        steps = len(self.train_loader) - skip
        if self.args.max_steps is not None:
            steps = min(steps, self.args.max_steps - self.result.steps)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, images
        bar = ProgressBar(steps, enabled=self.is_main)
        self.net.train()
        batches = self.batches(epoch)
        for _ in itertools.islice(batches, skip):  # the same draws of the order and the augmentation
            pass
        start = time.perf_counter()
        for i, (x, labels) in enumerate(itertools.islice(batches, steps)):
            loss, correct = train_step(self.net, x, labels, self.optimizer, amp_dtype=self.amp_dtype,
                                       scaler=self.scaler)
            self.scheduler.step()
            self.result.steps += 1
            totals[0] += loss * labels.numel()
            totals[1] += correct
            totals[2] += labels.numel()
            bar.update(i + 1, lambda: totals[0].item() / totals[2].item())
        loss_sum, correct, count = self._all_reduce(totals).tolist()
        seconds = time.perf_counter() - start
        bar.close()
        return loss_sum, correct, int(count), seconds

    def fit(self) -> TrainResult:
        """Train from the start (or the checkpoint) to ``--epochs`` or ``--max-steps``."""
        args, r = self.args, self.result
        images = 0
        finished = self.start_epoch >= args.epochs or (args.max_steps is not None and r.steps >= args.max_steps)
        if finished and self.is_main:
            print(f"Nothing to train: the checkpoint is at step {r.steps} ({self.start_epoch} whole epoch(s)); "
                  f"--epochs {args.epochs}, --max-steps {args.max_steps}", flush=True)
        for epoch in range(self.start_epoch, args.epochs):
            if args.max_steps is not None and r.steps >= args.max_steps:
                break
            skip = self.start_step if epoch == self.start_epoch else 0
            partial = self.start_totals if epoch == self.start_epoch else None
            if partial:  # the epoch's entry so far, written when it was cut, is replaced by the whole of it
                del r.losses[-1], r.accuracies[-1], r.val_accuracies[-1]
            partial = partial or (0.0, 0.0, 0)
            before = r.steps
            loss_sum, correct, count, seconds = self.train_epoch(epoch, skip)
            taken = skip + r.steps - before  # steps of this epoch so far
            images += count
            r.train_seconds += seconds
            totals = (partial[0] + loss_sum, partial[1] + correct, partial[2] + count)
            loss, accuracy = totals[0] / totals[2], totals[1] / totals[2]
            self._broadcast_buffers()
            val_correct, seen = self._all_reduce(
                evaluate(self.model, self.val_loader, self.data, self.device, amp_dtype=self.amp_dtype,
                         memory_format=self.memory_format)).tolist()
            r.losses.append(loss)
            r.accuracies.append(accuracy)
            r.val_accuracies.append(val_correct / seen)
            if self.is_main:
                print(f"Epoch {epoch + 1}, Loss: {loss:.4f}, Accuracy: {accuracy:.4f}")
                print(f"Validation Accuracy: {r.val_accuracy:.4f}", flush=True)
                if args.checkpoint:
                    whole = taken == self.steps_per_epoch
                    self._save(args.checkpoint, epoch + whole, 0 if whole else taken, None if whole else totals)
        r.images_per_second = images / r.train_seconds if r.train_seconds else 0.0
        if self.is_main:
            where = f"{self.world_size} x {self.device.type}" if self.world_size > 1 else str(self.device)
            print(f"Trained {args.model} ({self.impl}) on {args.dataset}: {len(r.losses)} epoch(s), {r.steps} steps, "
                  f"{r.images_per_second:.1f} images/s on {where}; validation accuracy {r.val_accuracy:.4f}",
                  flush=True)
        return r

    def close(self, failed: bool = False) -> None:
        """Tear the process group down (one this trainer started). After a failure
        (``failed``) no process waits for the others: they may be waiting in a collective of
        their own that this one never joins, and the error must reach the launcher."""
        if self._owns_group and dist.is_initialized():
            # Every process reaches the end before any tears its group down: a gloo
            # peer whose connections close under it mid-shutdown aborts its process.
            try:
                if not failed:
                    dist.barrier()
            finally:
                # DistributedDataParallel's reducer holds the group: let it go now, while the
                # interpreter is whole, and not at its finalization, where a gloo group's last
                # release can abort the process from its worker threads.
                self.net = self.model
                gc.collect()
                dist.destroy_process_group()
        self._owns_group = False


def train(args: argparse.Namespace) -> TrainResult:
    """Run training for parsed arguments (see :func:`build_parser`); errors propagate."""
    return _fit(Trainer(args))


def _fit(trainer: Trainer) -> TrainResult:
    try:
        result = trainer.fit()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    """Command-line entry point: a configuration that cannot run (bad arguments, a
    missing or malformed data folder, a missing checkpoint, a batch too small for
    some batch norm) prints ``error: ...`` with the usage and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        trainer = Trainer(args)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as e:
        parser.error(str(e))
    try:
        return _fit(trainer)
    except ValueError as e:  # found at the first step: too few values for some batch norm
        if "more than 1 value per channel" not in str(e):
            raise
        parser.error(f"--batch-size {args.batch_size} ({args.batch_size // trainer.world_size} image(s) a process) "
                     f"is too small for {args.model} in training: {e}")


if __name__ == "__main__":
    main()
