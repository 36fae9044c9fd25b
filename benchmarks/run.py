#!/usr/bin/env python3
"""Throughput of the ResNet/ResNeXt models and of ResNeXt-50's grouped 3x3 layers:
eager PyTorch (cuDNN) vs ``torch.compile`` vs the fused Triton kernels.

Shaped like timm's ``benchmark.py``::

    python benchmarks/run.py                                  # resnext50_32x4d, infer + train, all impls
    python benchmarks/run.py --model resnet50 resnext50_32x4d --mode train --json out.json
    python benchmarks/run.py --from-json benchmarks/results/run.json --plot run.png

What is measured, on a CUDA device:

* ``copy_TBps``: a 1 GiB device-to-device copy, bytes read + written per
  second; the bandwidth every layer is compared against.
* The layer table: the four stride-1 grouped 3x3 convolutions of
  resnext50_32x4d (32 groups; 128/256/512/1024 channels at 56/28/14/7 pixels
  for a 224 input, scaled with ``--img-size``), each with batch norm and ReLU.
  Pass ``fwd`` (with ``--mode infer``): the inference forward, eval-mode batch
  norm. ``cudnn`` is ``F.conv2d`` + ``F.batch_norm`` + ``F.relu`` (three
  kernels, what eager PyTorch runs), ``cudnn_conv`` is ``F.conv2d`` alone,
  ``fused`` is ``aru_kernels.conv_bn_act`` with the batch norm applied in its
  epilogue. Passes ``train_fwd`` and ``bwd`` (with ``--mode train``): the
  layer in a training step (:class:`GroupedConvLayer`): ``cudnn`` is conv,
  batch norm with batch statistics and ReLU, forward or backward;
  ``cudnn_conv`` the conv's own input and weight gradients (the baseline's
  backward); ``fused`` is ``aru_kernels.conv_bn_train`` with the previous batch
  norm and ReLU applied on load, forward or backward (every gradient the model
  takes there). Fused results are checked: ``fwd`` against ``cudnn``, the
  training passes against float32 PyTorch on the same inputs. Timed with
  ``triton.testing.do_bench`` (median, L2 flushed between calls);
  ``frac_of_copy_bw`` = (input + output bytes, and dL/dy for ``bwd``) / time
  / ``copy_TBps``; ``vs cudnn`` compares with the ``cudnn`` row of the same pass.
* The model table: images per second of an inference forward (``infer``) or
  of a training step (``train``: forward, cross-entropy, backward, SGD with
  momentum 0.9) on random images and labels, median of ``--iters`` steps
  timed with CUDA events after ``--warmup`` steps; ``torch.compile`` time is
  spent before the warm-up and reported separately. Peak memory is
  ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (not
  the first step, whose cuDNN algorithm search with ``cudnn.benchmark`` takes
  workspaces the steady steps do not).
* On a GPU each row also records its time on the host alone (``host_us`` a
  layer call, ``host_ms`` a step: launching, the GPU idle before it). Where it
  reaches the measured time the GPU waited for the host, and the figure is the
  host's, not the kernels'.
  Fused and compiled models load the eager model's weights; their inference
  output is compared with the eager model's.

Without CUDA the script runs a tiny configuration (batch 2, 64x64, float32, a
few steps) whose timings say nothing about GPU performance. The fused kernels
then run only through Triton's interpreter, and only when ``--interpret`` is
given or ``TRITON_INTERPRET=1`` is set; ``compile`` is left out of the default
implementations there because inductor's CPU compile takes minutes.

JSON written by ``--json`` (one file, rewritten after every measured row so an
interrupted run keeps what it measured)::

    {"gpu", "torch", "triton", "date", "dtype", "batch_size", "img_size", "channels_last", "recompute_normalized",
     "copy_TBps",
     "models": [{"model", "mode", "impl", "img_per_s", "peak_mem_GiB", "failed", "note"}],
     "layers": [{"layer", "impl", "pass", "us", "frac_of_copy_bw", "failed", "note"}]}

Every requested row is present. A row that could not be measured (fused
kernels missing, no device for them, out of memory, time limit, error), or
whose result differs from eager's, has ``null`` for its measurements (``img_per_s`` and ``peak_mem_GiB``, or ``us``
and ``frac_of_copy_bw``); ``note`` says why (``""`` for a measured row;
``"WRONG RESULT: ..."`` for a result beyond tolerance), and ``failed`` is
true for an unexpected error or a wrong result. ``peak_mem_GiB`` is ``null``
on CPU. ``layers`` is empty with ``--no-layers``.

Exit status: 0 when every row was measured or is unavailable for a known
reason; 1 when a row raised an unexpected error or a fused/compiled result
differs from eager beyond tolerance; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Triton reads TRITON_INTERPRET when a kernel module is imported: choose the
# interpreter before anything below imports aru_kernels.
if "--interpret" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Run from a checkout without installing: the package sits one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aru_kernels  # noqa: E402
import aru_models  # noqa: E402
import triton.testing  # noqa: E402
from aru_kernels.runtime import interpreting  # noqa: E402

MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext29_tiny",  # the CIFAR ResNeXt-29 at an eighth of its width: the scripts' quick CPU runs
)
IMPLS = ("eager", "fused", "compile")
MODES = ("infer", "train")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NUM_CLASSES = 1000


@dataclass(frozen=True)
class LayerShape:
    """One stride-1 grouped 3x3 convolution of resnext50_32x4d (at a 224x224 input)."""

    name: str
    channels: int
    size: int
    groups: int = 32


LAYER_SHAPES = (
    LayerShape("s1_g32w4", 128, 56),
    LayerShape("s2_g32w8", 256, 28),
    LayerShape("s3_g32w16", 512, 14),
    LayerShape("s4_g32w32", 1024, 7),
)

# Relative (Frobenius) error allowed between a fused/compiled result and eager's.
LAYER_TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}
MODEL_TOLERANCE = {torch.float32: 2e-2, torch.float16: 1e-1, torch.bfloat16: 1e-1}


class Unavailable(Exception):
    """A row that cannot be measured here, for a reason that is not a bug."""


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    img_size: int
    channels_last: bool
    warmup: int
    iters: int
    seed: int
    deadline: float | None  # time.monotonic() after which no new row starts
    recompute_normalized: bool = False  # training forwards under aru_kernels.recompute_normalized_inputs

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


@dataclass
class ModelRow:
    model: str
    mode: str
    impl: str
    img_per_s: float | None = None
    peak_mem_GiB: float | None = None
    first_step_s: float | None = None  # the first call: Triton's JIT compiles, cuDNN's search, torch.compile
    note: str = ""
    failed: bool = False
    host_ms: float | None = None  # a step's time on the host alone (GPU only; host_ms)

    def clear(self) -> None:
        """Drop the measurements of a row that was not measured, or measured wrong."""
        self.img_per_s = self.peak_mem_GiB = self.host_ms = None

    def to_json(self) -> dict:
        return {"model": self.model, "mode": self.mode, "impl": self.impl,
                "img_per_s": self.img_per_s, "peak_mem_GiB": self.peak_mem_GiB,
                "first_step_s": self.first_step_s, "host_ms": self.host_ms, "failed": self.failed,
                "note": self.note}


@dataclass
class LayerRow:
    layer: str
    impl: str
    pass_: str = "fwd"
    us: float | None = None
    frac_of_copy_bw: float | None = None
    shape: str = ""
    nbytes: int = 0
    note: str = ""
    failed: bool = False
    host_us: float | None = None  # a call's time on the host alone (GPU only; host_ms)

    def clear(self) -> None:
        """Drop the measurements of a row that was not measured, or measured wrong."""
        self.us = self.frac_of_copy_bw = self.host_us = None

    def to_json(self) -> dict:
        return {"layer": self.layer, "impl": self.impl, "pass": self.pass_,
                "us": self.us, "frac_of_copy_bw": self.frac_of_copy_bw, "host_us": self.host_us,
                "failed": self.failed, "note": self.note}


@dataclass
class Results:
    header: dict
    models: list[ModelRow] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**self.header, "models": [r.to_json() for r in self.models],
                "layers": [r.to_json() for r in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        header = {k: v for k, v in data.items() if k not in ("models", "layers")}
        models = [ModelRow(r["model"], r["mode"], r["impl"], r["img_per_s"], r["peak_mem_GiB"],
                           r.get("first_step_s"), note=r.get("note", ""), failed=r.get("failed", False),
                           host_ms=r.get("host_ms")) for r in data["models"]]
        layers = [LayerRow(r["layer"], r["impl"], r["pass"], r["us"], r["frac_of_copy_bw"],
                           note=r.get("note", ""), failed=r.get("failed", False), host_us=r.get("host_us"))
                  for r in data["layers"]]
        return cls(header, models, layers)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median time of ``fn`` in milliseconds over ``iters`` back-to-back calls after
    ``warmup`` calls: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float | None:
    """Median time of one call of ``fn`` on the host, in milliseconds: from its start until
    it returns, the GPU idle before it (synchronized), so that nothing it launches waits for
    a full queue. A call whose host time reaches its GPU time is bound by its launching: the
    GPU waits for the host, and its measured time is the host's. None off a GPU."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(calls):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def kernel_ms(fn: Callable[[], object], cfg: Config) -> float:
    """Median time of a short GPU operation, L2 flushed between calls (as the
    baseline figures were taken); the plain timer on CPU."""
    if cfg.device.type == "cuda" and not interpreting():
        return triton.testing.do_bench(fn, return_mode="median")
    return median_ms(fn, cfg.device, cfg.warmup, cfg.iters)


def copy_bandwidth_TBps(cfg: Config) -> float:
    """Device-to-device copy of 1 GiB (64 MiB on CPU): bytes read + written per second, in TB/s."""
    nbytes = (1 << 30) if cfg.device.type == "cuda" else (1 << 26)
    src = torch.ones(nbytes, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), cfg)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e12


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _autocast(cfg: Config):
    if cfg.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.type, dtype=cfg.dtype)


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run here, or None if they can."""
    if device.type == "cpu" and not interpreting():
        return ("no CUDA device; the fused kernels run on CPU only through Triton's interpreter "
                "(pass --interpret or set TRITON_INTERPRET=1; very slow)")
    return None


# --------------------------------------------------------------------------
# The layer table
# --------------------------------------------------------------------------


class GroupedConvLayer:
    """One grouped 3x3 convolution + batch norm + ReLU, on random data.

    ``x`` is ``[batch, C, size, size]`` in ``dtype`` and the chosen memory
    format; the weight ``[C, C/groups, 3, 3]`` likewise (as ``model.to(memory_format=...)``
    leaves it); the batch-norm parameters and statistics are float32.

    Inference (pass ``fwd``): eval-mode batch norm. Training (passes ``train_fwd``
    and ``bwd``), as the layer runs inside a training step: eager PyTorch reads
    the normalized activation the previous layer wrote (``x``) and runs conv,
    batch norm with the batch's statistics, ReLU; the fused layer reads the
    previous conv's raw output (``x`` again) and applies that conv's batch norm
    and ReLU as it loads it (``in_mean``, ``in_scale``, ``in_shift``), and takes
    its own batch statistics in the epilogue, the normalization left to the
    next layer (:func:`aru_kernels.conv_bn_train`). Its backward is that of the
    model's grouped 3x3s: the input gradient through the previous batch norm and
    ReLU, the weight gradient, the batch-norm statistics' term and every
    per-channel vector's gradient. Each side does one conv, one batch norm and
    one ReLU.
    """

    def __init__(self, shape: LayerShape, size: int, cfg: Config):
        self.shape = shape
        self.cfg = cfg
        c, g = shape.channels, shape.groups
        # drawn where they are used (seconds a tensor on a CPU at batch 256); nothing to draw on
        # the meta device (benchmarks/warm_cache.py records there)
        gen = torch.Generator(cfg.device if cfg.device.type == "cuda" else "cpu").manual_seed(cfg.seed)

        def draw(sample, *size_):
            return torch.empty(*size_) if cfg.device.type == "meta" else sample(*size_, generator=gen,
                                                                               device=gen.device)

        def randn(*size_):
            return draw(torch.randn, *size_)

        x = randn(cfg.batch_size, c, size, size)
        w = randn(c, c // g, 3, 3) * (9 * c // g) ** -0.5
        self.x = x.to(cfg.device, cfg.dtype).contiguous(memory_format=cfg.memory_format)
        self.weight = w.to(cfg.device, cfg.dtype).contiguous(memory_format=cfg.memory_format)
        self.bn_weight = (1 + 0.1 * randn(c)).to(cfg.device)
        self.bn_bias = (0.1 * randn(c)).to(cfg.device)
        self.running_mean = (0.1 * randn(c)).to(cfg.device)
        self.running_var = (0.5 + draw(torch.rand, c)).to(cfg.device)
        self.eps = 1e-5
        # training: the previous conv's batch norm as the fused prologue applies it, and gradients
        # to start the backward from (of the output; of the mean and scale the next layer reads)
        self.in_mean = (0.1 * randn(c)).to(cfg.device)
        self.in_scale = (1 + 0.1 * randn(c)).to(cfg.device)
        self.in_shift = (0.1 * randn(c)).to(cfg.device)
        self.dy = randn(cfg.batch_size, c, size, size).to(cfg.device, cfg.dtype).contiguous(
            memory_format=cfg.memory_format)
        self.dvectors = [(0.1 * randn(c)).to(cfg.device) for _ in range(3)]
        self._reference = None

    def nbytes(self, pass_: str = "fwd") -> int:
        """The least bytes the pass moves: input and output (``fwd``, ``train_fwd``); ``bwd``
        reads the input and dL/dy and writes dL/dx (all of the input's shape and dtype)."""
        return (3 if pass_ == "bwd" else 2) * self.x.numel() * self.x.element_size()

    def cudnn_conv(self) -> torch.Tensor:
        return F.conv2d(self.x, self.weight, None, 1, 1, 1, self.shape.groups)

    def cudnn(self) -> torch.Tensor:
        y = F.batch_norm(self.cudnn_conv(), self.running_mean, self.running_var, self.bn_weight,
                         self.bn_bias, False, 0.0, self.eps)
        return F.relu(y, inplace=True)

    def fused(self) -> torch.Tensor:
        return aru_kernels.conv_bn_act(self.x, self.weight, stride=1, padding=1, groups=self.shape.groups,
                                       mean=self.running_mean, var=self.running_var, eps=self.eps,
                                       scale=self.bn_weight, shift=self.bn_bias, relu=True)

    # -- training --------------------------------------------------------------

    def _leaves(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Fresh leaves requiring grad: the layer's own tensors stay as they are."""
        return [getattr(self, n).detach().requires_grad_() for n in names]

    def train_step(self, impl: str) -> tuple[Callable[[], object], Callable[[], object]]:
        """``(forward, backward)`` of the training layer ``impl``: ``forward()`` runs the
        training forward (recording autograd, updating running statistics of its own);
        ``backward()`` the gradients of one recorded forward, again at every call."""
        g = self.shape.groups
        running = [self.running_mean.clone(), self.running_var.clone()]
        if impl == "fused":
            x, w, bn_w, bn_b, m, s, b = leaves = self._leaves(
                ("x", "weight", "bn_weight", "bn_bias", "in_mean", "in_scale", "in_shift"))
            count = torch.zeros((), dtype=torch.long, device=self.cfg.device)

            def forward():
                return aru_kernels.conv_bn_train(x, w, bn_w, bn_b, *running, count, eps=self.eps, padding=1,
                                                 groups=g, in_mean=m, in_scale=s, in_shift=b, in_relu=True)
            grads = [self.dy, *self.dvectors]
        else:
            x, w, bn_w, bn_b = leaves = self._leaves(("x", "weight", "bn_weight", "bn_bias"))

            def forward():
                y = F.conv2d(x, w, None, 1, 1, 1, g)
                if impl == "cudnn_conv":  # the conv alone: dL/dx and dL/dw (the baseline's backward)
                    return (y,)
                return (F.relu(F.batch_norm(y, *running, bn_w, bn_b, True, 0.1, self.eps)),)
            grads = [self.dy]
            if impl == "cudnn_conv":
                leaves = [x, w]
        outs = forward()

        def backward():
            return torch.autograd.grad(outs, leaves, grads, retain_graph=True)
        return forward, backward

    def train_reference(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The fused training layer's results in float32 (no TF32), from the same inputs:
        ``(y, mean, scale, shift)`` and the gradients of ``x, weight, bn_weight, bn_bias,
        in_mean, in_scale, in_shift``."""
        if self._reference is None:
            flags = (torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
                     if self.cfg.device.type == "cuda" else contextlib.nullcontext())
            with flags, torch.enable_grad():
                x, w, bn_w, bn_b, m, s, b = leaves = [t.detach().float().requires_grad_() for t in (
                    self.x, self.weight, self.bn_weight, self.bn_bias, self.in_mean, self.in_scale, self.in_shift)]
                a = F.relu(s[:, None, None] * (x - m[:, None, None]) + b[:, None, None])
                y = F.conv2d(a, w, None, 1, 1, 1, self.shape.groups)
                mean = y.mean((0, 2, 3))
                var = y.var((0, 2, 3), unbiased=False)
                outs = [y, mean, bn_w * torch.rsqrt(var + self.eps), bn_b]
                grads = torch.autograd.grad(outs, leaves, [self.dy.float(), *self.dvectors])
            self._reference = ([o.detach() for o in outs], list(grads))
        return self._reference


def layer_impls(impls: list[str], pass_: str = "fwd") -> list[str]:
    """Layer implementations to time in ``pass_`` for the requested model implementations
    (``cudnn_conv``, the conv alone, in ``fwd`` and ``bwd``: the baseline figures')."""
    eager = {"fwd": ["cudnn", "cudnn_conv"], "train_fwd": ["cudnn"], "bwd": ["cudnn", "cudnn_conv"]}[pass_]
    return eager + (["fused"] if "fused" in impls else [])


def layer_passes(modes: list[str]) -> list[str]:
    """The layer table's passes for the requested modes: ``fwd`` (inference) with ``infer``;
    the training forward and backward with ``train``."""
    return (["fwd"] if "infer" in modes else []) + (["train_fwd", "bwd"] if "train" in modes else [])


def layer_size(shape: LayerShape, img_size: int) -> int:
    """The layer's spatial size for an ``img_size`` input (its size is given for 224)."""
    return max(1, round(shape.size * img_size / 224))


def layer_error(actual, expected) -> float:
    """The largest relative error over paired results."""
    return max(_rel_error(a, e) for a, e in zip(actual, expected, strict=True))


def measure_layer(row: LayerRow, layer: GroupedConvLayer, cfg: Config, copy_TBps: float) -> None:
    if row.impl == "fused":
        reason = fused_unavailable_reason(cfg.device)
        if reason:
            raise Unavailable(reason)
        if not hasattr(aru_kernels, "conv_bn_act"):
            raise Unavailable("aru_kernels has no conv_bn_act")
    if row.pass_ == "fwd":
        fn = getattr(layer, row.impl)
    else:
        forward, backward = layer.train_step(row.impl)
        fn = forward if row.pass_ == "train_fwd" else backward
    out = fn()
    if row.impl == "fused" and cfg.device.type == "cpu":
        us = median_ms(fn, cfg.device, 0, 1) * 1e3  # interpreted: seconds a call, one is enough
    else:
        us = kernel_ms(fn, cfg) * 1e3
    row.us = round(us, 2)
    host = host_ms(fn, cfg.device)
    row.host_us = round(host * 1e3, 2) if host is not None else None
    row.frac_of_copy_bw = round(layer.nbytes(row.pass_) / (us * 1e-6) / (copy_TBps * 1e12), 4)
    if row.impl == "fused":
        if row.pass_ == "fwd":
            err, against = _rel_error(out, layer.cudnn()), "cudnn"
        else:
            outs, grads = layer.train_reference()
            err, against = layer_error(out, outs if row.pass_ == "train_fwd" else grads), "float32 PyTorch"
        if not err <= LAYER_TOLERANCE[cfg.dtype]:
            row.failed = True
            row.note = f"WRONG RESULT: relative error {err:.2e} vs {against} (took {us:.1f} us)"


# --------------------------------------------------------------------------
# The model table
# --------------------------------------------------------------------------


class _Features(torch.nn.Module):
    """A detection backbone as a classifier-shaped benchmark: its feature maps, each
    averaged over space, side by side ([N, channels x maps]; the loss reads the first columns)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.float().mean((2, 3)) for f in self.backbone(x).values()], 1)


def _timm_builder(arch: str):
    try:
        import timm
    except ImportError as exc:
        raise Unavailable(f"timm:{arch} needs timm (pip install timm)") from exc

    def build(num_classes: int, impl: str) -> torch.nn.Module:
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:  # an unknown name
            raise Unavailable(f"timm cannot build {arch!r}: {exc}") from exc
        return aru_models.fuse(model) if impl == "fused" else model
    return build


def _detection_builder(arch: str):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def build(num_classes: int, impl: str) -> torch.nn.Module:
        model = _Features(resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=3))
        return aru_models.fuse(model) if impl == "fused" else model
    return build


def _builder(name: str):
    """``aru_models.<name>``; ``timm:NAME`` a timm model and ``tv-detection:NAME`` the
    FPN backbone of a torchvision detection model (FrozenBatchNorm2d), switched to the
    fused kernels with :func:`aru_models.fuse`."""
    if name.startswith("timm:"):
        return _timm_builder(name[len("timm:"):])
    if name.startswith("tv-detection:"):
        return _detection_builder(name[len("tv-detection:"):])
    builder = getattr(aru_models, name, None)
    if builder is None:
        raise Unavailable(f"aru_models has no builder {name!r}")
    return builder


def build_model(name: str, impl: str, cfg: Config, weights: dict | None) -> torch.nn.Module:
    """``aru_models.<name>`` for ``impl`` ("compile" builds the eager model), seeded,
    with ``weights`` loaded when given, on the device in the chosen memory format."""
    if impl == "fused":
        reason = fused_unavailable_reason(cfg.device)
        if reason:
            raise Unavailable(reason)
    torch.manual_seed(cfg.seed)
    try:
        model = _builder(name)(num_classes=NUM_CLASSES, impl="fused" if impl == "fused" else "eager")
    except NotImplementedError as exc:
        raise Unavailable(f"impl={impl!r} is not implemented: {exc}") from exc
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(device=cfg.device, memory_format=cfg.memory_format)


def _images(cfg: Config) -> torch.Tensor:
    torch.manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=cfg.device)
    return x.contiguous(memory_format=cfg.memory_format)


class ModelBench:
    """Measures the rows of one model, sharing the eager model's weights and output."""

    def __init__(self, name: str, cfg: Config):
        self.name = name
        self.cfg = cfg
        self._weights: dict | None = None
        self._eager_logits: torch.Tensor | None = None

    def weights(self) -> dict:
        if self._weights is None:
            model = build_model(self.name, "eager", replace(self.cfg, device=torch.device("cpu")), None)
            self._weights = model.state_dict()
        return self._weights

    def eager_logits(self) -> torch.Tensor:
        if self._eager_logits is None:
            model = build_model(self.name, "eager", self.cfg, self.weights()).eval()
            with torch.no_grad(), _autocast(self.cfg):
                self._eager_logits = model(_images(self.cfg)).float().cpu()
            del model
            _free_memory(self.cfg.device)
        return self._eager_logits

    def step(self, model: torch.nn.Module, mode: str) -> Callable[[], torch.Tensor]:
        """One inference forward (returns the logits) or one training step (returns the loss)."""
        cfg = self.cfg
        x = _images(cfg)
        if mode == "infer":
            model.eval()

            def infer() -> torch.Tensor:
                with torch.no_grad(), _autocast(cfg):
                    return model(x)
            return infer

        model.train()
        target = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=cfg.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda") if cfg.dtype == torch.float16 and cfg.device.type == "cuda" else None

        def train() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(cfg), aru_kernels.recompute_normalized_inputs(cfg.recompute_normalized):
                loss = F.cross_entropy(model(x), target)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            return loss
        return train

    def measure(self, row: ModelRow) -> None:
        cfg = self.cfg
        model = build_model(self.name, row.impl, cfg, self.weights())
        if row.impl == "compile":
            model = torch.compile(model)
        step = self.step(model, row.mode)
        t0 = time.perf_counter()
        out = step()
        _sync(cfg.device)
        row.first_step_s = round(time.perf_counter() - t0, 1)
        if cfg.device.type == "cuda":  # after the first step: not cuDNN's algorithm search, nor compiling
            torch.cuda.reset_peak_memory_stats(cfg.device)
        ms = median_ms(step, cfg.device, cfg.warmup, cfg.iters)
        row.img_per_s = float(f"{cfg.batch_size / (ms * 1e-3):.4g}")  # 4 digits, however slow (never 0.0)
        host = host_ms(step, cfg.device)
        row.host_ms = round(host, 3) if host is not None else None
        if cfg.device.type == "cuda":
            row.peak_mem_GiB = round(torch.cuda.max_memory_allocated(cfg.device) / 2**30, 3)
        if row.mode == "train":
            loss = step().item()
            if not math.isfinite(loss):
                row.failed = True
                row.note = f"WRONG RESULT: training loss is {loss} (ran at {row.img_per_s:.1f} img/s)"
        elif row.impl != "eager":
            err = _rel_error(out, self.eager_logits())
            if not err <= MODEL_TOLERANCE[cfg.dtype]:
                row.failed = True
                row.note = f"WRONG RESULT: relative error {err:.2e} vs eager (ran at {row.img_per_s:.1f} img/s)"


# --------------------------------------------------------------------------
# Running rows
# --------------------------------------------------------------------------


def run_row(row: ModelRow | LayerRow, measure: Callable[[], None], cfg: Config) -> None:
    """Measure one row; an exception marks it unavailable (known reasons) or failed."""
    try:
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            raise Unavailable("skipped: --time-limit reached")
        measure()
    except Unavailable as exc:
        row.note = str(exc)
    except torch.cuda.OutOfMemoryError:
        row.note = f"out of memory at batch {cfg.batch_size}"
    except NotImplementedError as exc:
        row.note = f"not implemented: {exc}"
    except Exception as exc:  # report and go on with the other rows
        traceback.print_exc()
        row.failed = True
        row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        if isinstance(row, ModelRow) and row.impl == "compile":
            torch.compiler.reset()
        _free_memory(cfg.device)
    if row.note:
        row.clear()
    _print_progress(row)


def _print_progress(row: ModelRow | LayerRow) -> None:
    if isinstance(row, LayerRow):
        what = f"layer {row.layer} {row.impl} {row.pass_}"
        value = f"{row.us:.1f} us" if row.us is not None else "n/a"
    else:
        what = f"{row.model} {row.mode} {row.impl}"
        value = f"{row.img_per_s:.1f} img/s" if row.img_per_s is not None else "n/a"
        if row.first_step_s is not None:
            value += f" (first step {row.first_step_s:.1f} s)"
    print(f"  {what}: {value}" + (f"  [{row.note}]" if row.note else ""), flush=True)


def model_plan(models: list[str], modes: list[str], impls: list[str]) -> list[ModelRow]:
    """Rows in measuring order: compiled rows last, so a time limit cuts them first."""
    rows = [ModelRow(m, mode, impl) for m in models for mode in modes for impl in impls]
    return sorted(rows, key=lambda r: r.impl == "compile")


def run(args: argparse.Namespace, cfg: Config) -> Results:
    results = Results(header={
        "gpu": torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "batch_size": cfg.batch_size,
        "img_size": cfg.img_size,
        "channels_last": cfg.channels_last,
        "recompute_normalized": cfg.recompute_normalized,
        "copy_TBps": None,
    })

    def save() -> None:
        if args.json:
            write_json(results, args.json)

    copy_TBps = copy_bandwidth_TBps(cfg)
    results.header["copy_TBps"] = round(copy_TBps, 4)
    print(f"copy bandwidth: {copy_TBps:.3f} TB/s", flush=True)
    save()

    if args.layers:
        print("layers:", flush=True)
        for shape in LAYER_SHAPES:
            size = layer_size(shape, cfg.img_size)
            layer = GroupedConvLayer(shape, size, cfg)
            for pass_ in layer_passes(args.mode):
                for impl in layer_impls(args.impl, pass_):
                    row = LayerRow(shape.name, impl, pass_, shape=f"{cfg.batch_size}x{shape.channels}x{size}x{size}",
                                   nbytes=layer.nbytes(pass_))
                    results.layers.append(row)
                    run_row(row, lambda: measure_layer(row, layer, cfg, copy_TBps), cfg)
                    save()
            del layer
            _free_memory(cfg.device)

    print("models:", flush=True)
    benches = {name: ModelBench(name, cfg) for name in args.model}
    for row in model_plan(args.model, args.mode, args.impl):
        results.models.append(row)
        run_row(row, lambda: benches[row.model].measure(row), cfg)
        save()
    order = {(r.model, r.mode, r.impl): i for i, r in
             enumerate(ModelRow(m, mode, impl) for m in args.model for mode in args.mode for impl in args.impl)}
    results.models.sort(key=lambda r: order[(r.model, r.mode, r.impl)])
    save()
    return results


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def write_json(results: Results, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results.to_json(), indent=1) + "\n")
    tmp.replace(path)


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "n/a"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table; the last column holds notes, printed as numbered footnotes."""
    notes: list[str] = []
    for r in rows:
        if r[-1]:
            if r[-1] not in notes:
                notes.append(r[-1])
            r[-1] = f"[{notes.index(r[-1]) + 1}]"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(line.rstrip() for line in lines)


# Under the layer table of a run without CUDA, where the ``cudnn`` rows ran on other kernels.
CPU_LAYERS_NOTE = "(no CUDA device: the cudnn and cudnn_conv rows ran PyTorch's CPU kernels, not cuDNN)"


def format_layers(results: Results) -> str:
    copy_TBps = results.header.get("copy_TBps")
    cudnn = {(r.layer, r.pass_): r.us for r in results.layers if r.impl == "cudnn"}
    rows = []
    for r in results.layers:
        nbytes = r.nbytes or (r.frac_of_copy_bw * r.us * 1e-6 * copy_TBps * 1e12
                              if r.us is not None and r.frac_of_copy_bw is not None and copy_TBps else None)
        floor = nbytes / (copy_TBps * 1e12) * 1e6 if nbytes and copy_TBps else None
        tbps = nbytes / (r.us * 1e-6) / 1e12 if nbytes and r.us else None
        base = cudnn.get((r.layer, r.pass_))
        speedup = base / r.us if r.us and base else None
        rows.append([r.layer, r.shape, r.impl, r.pass_, _fmt(r.us, ".1f"), _fmt(tbps, ".3f"),
                     _fmt(r.frac_of_copy_bw, ".3f"), _fmt(floor, ".1f"),
                     _fmt(speedup, ".2f") + ("x" if speedup else ""), r.note])
    return _table(["layer", "NCHW", "impl", "pass", "us", "TB/s", "frac copy", "floor us", "vs cudnn", "note"],
                  rows)


def format_models(results: Results) -> str:
    by_impl = {(r.model, r.mode, r.impl): r.img_per_s for r in results.models}
    rows = []
    for r in results.models:
        eager = by_impl.get((r.model, r.mode, "eager"))
        compiled = by_impl.get((r.model, r.mode, "compile"))
        vs_eager = r.img_per_s / eager if r.img_per_s and eager else None
        vs_compile = r.img_per_s / compiled if r.img_per_s and compiled else None
        rows.append([r.model, r.mode, r.impl, _fmt(r.img_per_s, ",.1f"), _fmt(r.peak_mem_GiB, ".2f"),
                     _fmt(vs_eager, ".2f") + ("x" if vs_eager else ""),
                     _fmt(vs_compile, ".2f") + ("x" if vs_compile else ""),
                     _fmt(r.first_step_s, ".1f"), r.note])
    return _table(["model", "mode", "impl", "img/s", "peak GiB", "vs eager", "vs compile", "first step s", "note"],
                  rows)


def print_report(results: Results) -> None:
    h = results.header
    print()
    print(f"{h['gpu']} | torch {h['torch']} | triton {h['triton']} | {h['dtype']} | batch {h['batch_size']} | "
          f"{'channels_last' if h['channels_last'] else 'NCHW'} | copy {_fmt(h['copy_TBps'], '.3f')} TB/s | {h['date']}")
    if results.layers:
        print()
        print(format_layers(results))
        if h["gpu"] == "cpu":
            print(CPU_LAYERS_NOTE)
    print()
    print(format_models(results))


def plot(results: Results, path: str) -> None:
    """Bar chart of images per second by implementation, one group per (model, mode)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping --plot {path}")
        return
    groups = list(dict.fromkeys((r.model, r.mode) for r in results.models))
    impls = list(dict.fromkeys(r.impl for r in results.models))
    value = {(r.model, r.mode, r.impl): r.img_per_s or 0.0 for r in results.models}
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [value.get((m, mode, impl), 0.0) for m, mode in groups], width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{mode}" for m, mode in groups])
    ax.set_ylabel("images / s")
    h = results.header
    ax.set_title(f"{h['gpu']}, {h['dtype']}, batch {h['batch_size']}")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


EXTERNAL = ("timm:", "tv-detection:")  # model names resolved by timm / torchvision when the row runs


def _comma_list(parser: argparse.ArgumentParser, values: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v for value in values for v in value.split(",") if v]
    if not items:
        parser.error(f"--{what} names none; choose from {', '.join(allowed)}")
    unknown = [v for v in items if v not in allowed and not (what == "model" and v.startswith(EXTERNAL))]
    if unknown:
        parser.error(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    for name in items:
        why = _unknown_external(name) if what == "model" and name.startswith(EXTERNAL) else None
        if why:
            parser.error(why)
    return list(dict.fromkeys(items))


def _unknown_external(name: str) -> str | None:
    """Why ``timm:NAME`` or ``tv-detection:NAME`` names no model (None: it does, or timm is not
    installed, which its row reports)."""
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            return None
        return None if timm.is_model(arch) else f"unknown model {name!r}: timm {timm.__version__} has no {arch!r}"
    import torchvision.models.resnet as tv_resnet

    names = [n for n in tv_resnet.__all__ if n[0].islower()]  # what resnet_fpn_backbone builds
    return None if arch in names else (f"unknown model {name!r}: torchvision's FPN backbones are built from "
                                       f"{', '.join(names)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description="Benchmark ResNet/ResNeXt models and ResNeXt-50's grouped 3x3 layers: "
                    "eager PyTorch vs torch.compile vs the fused Triton kernels.")
    parser.add_argument("--model", nargs="+", default=["resnext50_32x4d"], metavar="NAME",
                        help=f"one or more of: {', '.join(MODELS)}; timm:NAME (a timm model, when timm is "
                             "installed) or tv-detection:NAME (a torchvision detection FPN backbone) "
                             "(default: resnext50_32x4d)")
    parser.add_argument("--mode", choices=["infer", "train", "both"], default="both",
                        help="inference forward, training step, or both (default: both)")
    parser.add_argument("--impl", default=None,
                        help="comma list of eager, fused, compile (default: all three on GPU; "
                             "eager,fused on CPU, where torch.compile takes minutes)")
    parser.add_argument("--batch-size", type=int, default=256 if on_gpu else 2,
                        help="default: 256 on GPU, 2 on CPU")
    parser.add_argument("--img-size", type=int, default=224 if on_gpu else 64,
                        help="input height and width (default: 224 on GPU, 64 on CPU); "
                             "the layer table scales its spatial sizes with it")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16" if on_gpu else "float32",
                        help="autocast dtype of the models, dtype of the layer tensors "
                             "(default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last memory format for inputs and weights (default: on)")
    parser.add_argument("--recompute-normalized", action="store_true",
                        help="fused training: the backward recomputes the 3x3s' normalized inputs instead of "
                             "holding them (aru_kernels.recompute_normalized_inputs: less memory, more traffic)")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the grouped 3x3 layer table (default: on): the inference forward with "
                             "--mode infer, the training forward and backward with --mode train")
    parser.add_argument("--warmup", type=int, default=10 if on_gpu else 1,
                        help="untimed steps before timing (default: 10 on GPU, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=30 if on_gpu else 3,
                        help="timed steps, median reported (default: 30 on GPU, 3 on CPU); "
                             "GPU layers use do_bench's own time budget")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no new row after this many seconds; later rows are reported unavailable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA, run the fused kernels through Triton's interpreter (very slow)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH", help="bar chart of img/s by impl (needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: print the tables (and --plot) of a JSON written earlier")
    args = parser.parse_args(argv)

    args.model = _comma_list(parser, args.model, MODELS, "model")
    args.impl = _comma_list(parser, [args.impl or ",".join(IMPLS if on_gpu else ("eager", "fused"))],
                            IMPLS, "impl")
    args.mode = list(MODES) if args.mode == "both" else [args.mode]
    for name in ("batch_size", "img_size", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.time_limit is not None and not args.time_limit >= 0:  # 0: every row reported unavailable
        parser.error(f"--time-limit must be at least 0; got {args.time_limit}")
    if args.from_json and not Path(args.from_json).is_file():
        parser.error(f"--from-json {args.from_json}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        try:
            results = Results.from_json(json.loads(Path(args.from_json).read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            print(f"run.py: error: --from-json {args.from_json} is not a results file of run.py "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        print_report(results)
        if args.plot:
            plot(results, args.plot)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config(device=device, dtype=DTYPES[args.dtype], batch_size=args.batch_size, img_size=args.img_size,
                 channels_last=args.channels_last, warmup=args.warmup, iters=args.iters, seed=args.seed,
                 deadline=time.monotonic() + args.time_limit if args.time_limit is not None else None,
                 recompute_normalized=args.recompute_normalized)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if interpreting():
            print("WARNING: TRITON_INTERPRET=1 is set on a CUDA machine: the fused kernels run in "
                  "Triton's interpreter and their timings are meaningless.")
    else:
        print(f"NOTE: no CUDA device. Running a tiny CPU configuration (batch {cfg.batch_size}, "
              f"{cfg.img_size}x{cfg.img_size}, {args.dtype}, {cfg.iters} timed steps): "
              "these timings are not representative of GPU performance.")
        if "compile" in args.impl:
            print("NOTE: torch.compile on CPU compiles with a C++ toolchain; expect minutes per model.")
        if "fused" in args.impl and interpreting():
            print("NOTE: the fused kernels run through Triton's interpreter (very slow).")
    print(f"models: {', '.join(args.model)} | modes: {', '.join(args.mode)} | impls: {', '.join(args.impl)}",
          flush=True)

    results = run(args, cfg)
    print_report(results)
    if args.json:
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
    failed = [r for r in [*results.layers, *results.models] if r.failed]
    if failed:
        print(f"\n{len(failed)} row(s) failed or gave wrong results (see notes above).")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
