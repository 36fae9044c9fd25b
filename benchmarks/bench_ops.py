"""pytest-benchmark micro-benchmarks: the fused grouped 3x3 conv + batch norm + ReLU
against cuDNN's conv followed by eager batch norm and ReLU, in inference, and its
training forward and backward (``run.py``'s layer table's passes ``train_fwd`` and
``bwd``: :class:`run.GroupedConvLayer`).

    python -m pytest benchmarks/bench_ops.py
    python -m pytest benchmarks/bench_ops.py --benchmark-json ops.json --benchmark-group-by=group

The shapes are the four stride-1 grouped 3x3 convolutions of resnext50_32x4d
at batch 256, bfloat16, channels_last (``LAYER_SHAPES`` in ``run.py``). Each
call is followed by a device synchronize so that pytest-benchmark's wall clock
sees the kernel finish; that adds the launch and synchronize latency (a few
microseconds) to every figure. ``run.py``'s layer table, timed with CUDA
events and an L2 flush, is the one to quote. Skipped without CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the micro-benchmarks need a CUDA device; none is present on this machine",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LAYER_SHAPES, LAYER_TOLERANCE, Config, GroupedConvLayer, layer_error, aru_kernels  # noqa: E402

CONFIG = Config(device=torch.device("cuda"), dtype=torch.bfloat16, batch_size=256, img_size=224,
                channels_last=True, warmup=0, iters=1, seed=0, deadline=None)
ROUNDS = 100


@pytest.fixture(scope="module", autouse=True)
def _cudnn_benchmark():
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = previous


@pytest.mark.parametrize("impl", ["cudnn", "fused"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=[s.name for s in LAYER_SHAPES])
def test_grouped_conv_bn_relu(benchmark, shape, impl):
    if impl == "fused" and not hasattr(aru_kernels, "conv_bn_act"):
        pytest.skip("aru_kernels has no conv_bn_act")
    layer = GroupedConvLayer(shape, shape.size, CONFIG)
    fn = getattr(layer, impl)
    out = fn()
    if impl == "fused":
        expected = layer.cudnn()
        err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        assert err <= LAYER_TOLERANCE[CONFIG.dtype], f"fused output differs from cuDNN's: relative error {err:.2e}"

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.group = shape.name
    benchmark.extra_info.update(shape=f"{CONFIG.batch_size}x{shape.channels}x{shape.size}x{shape.size}",
                                groups=shape.groups, dtype=str(CONFIG.dtype), bytes=layer.nbytes())
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=10)
    benchmark.extra_info["TBps"] = layer.nbytes() / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("pass_, impl", [("train_fwd", "cudnn"), ("train_fwd", "fused"), ("bwd", "cudnn"),
                                         ("bwd", "cudnn_conv"), ("bwd", "fused")])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=[s.name for s in LAYER_SHAPES])
def test_grouped_conv_bn_relu_training(benchmark, shape, pass_, impl):
    layer = GroupedConvLayer(shape, shape.size, CONFIG)
    forward, backward = layer.train_step(impl)
    fn = forward if pass_ == "train_fwd" else backward
    out = fn()
    if impl == "fused":
        outs, grads = layer.train_reference()
        err = layer_error(out, outs if pass_ == "train_fwd" else grads)
        assert err <= LAYER_TOLERANCE[CONFIG.dtype], f"fused {pass_} differs from float32 PyTorch: {err:.2e}"

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{shape.name} {pass_}"
    benchmark.extra_info.update(shape=f"{CONFIG.batch_size}x{shape.channels}x{shape.size}x{shape.size}",
                                groups=shape.groups, dtype=str(CONFIG.dtype), bytes=layer.nbytes(pass_))
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=10)
    benchmark.extra_info["TBps"] = layer.nbytes(pass_) / benchmark.stats.stats.median / 1e12
