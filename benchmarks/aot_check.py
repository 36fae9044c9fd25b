"""The static cost model of a model's inference forward or training step, no GPU needed.

    python benchmarks/aot_check.py --model resnext50_32x4d --mode train --arch 90 \\
        --batch-size 256 --img-size 224 --dtype bfloat16 --json results/static.json

Runs the model on the meta device (nothing executes) and records every kernel
launch of the fused path, forward and, with ``--mode train``, backward. Each
distinct kernel specialization is compiled for ``sm_<arch>`` exactly as
Triton's JIT compiles it at launch (:mod:`aru_kernels.aot`), and its SASS
read: registers, spills, shared memory, tensor-core instructions, load and
store widths, dynamic instructions and tensor-core FLOPs per warp. Per kernel
and launch shape it prints the issue-slot floor, the DRAM floor, the tensor
floor and the largest of the three; per step, their sum as milliseconds and
as images/s (an H200's figures: 132 SMs at 1.98 GHz, 4.144 TB/s measured
copy bandwidth, 714.8 TFLOP/s measured bf16 matrix multiply). It also counts the bytes
each dispatched op of the step touches, for ``impl="eager"`` and
``impl="fused"`` (each op's tensor operands once; views and tensors taken only
for their shape excluded; a fused op counts what its kernels read and write),
and the peak of the bytes held by the tensors the step creates (activations,
saved tensors, gradients; the parameters and input excluded).

With ``--layers``, instead of a model: the fused rows of ``benchmarks/run.py``'s
layer table (each grouped 3x3 layer's inference forward, training forward and
backward), their floors per layer and pass, to set beside what the table
measures.

Exits non-zero if a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Compiling needs the real JIT functions, not the interpreter's wrappers.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves, tree_map  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py's layer table

from aru_kernels import aot  # noqa: E402
from aru_kernels.launch import Launch, recording  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Ops that touch no memory, or only their output (their inputs give a shape).
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
               "detach", "alias", "_to_copy_meta"}
_OUTPUT_ONLY = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
                "new_full", "scalar_tensor", "arange", "randint", "fill"}


class StepRecorder(TorchDispatchMode):
    """Records the kernel launches of aru:: operators (by running their
    implementation on the meta tensors under :func:`recording`), the bytes
    each dispatched op touches, and the peak of the bytes held by tensors the
    step creates (activations, what autograd or an operator keeps for the
    backward, gradients: not the parameters or the input, made before it; an
    operator's temporaries inside its own implementation are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []
        self.bytes_by_op: Counter = Counter()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage -> (weak reference, bytes)
        self.peak_bytes = 0  # the most bytes of storages alive at once after an op

    def _track(self, out) -> None:
        """Add the storages ``out`` created, drop those no tensor holds any more, update the peak."""
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}  # (an address may be reused)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "aru":
            inner = StepRecorder()  # the torch ops of the implementation (fixed-order reductions of partials ...)
            with recording() as launches, inner:
                _implementation(func)(*args, **kwargs)
            self.launches += _stand_ins(launches + inner.launches)
            self.bytes_by_op[f"aru::{name}"] += (sum(aot.launch_bytes(x) for x in launches)
                                                 + sum(inner.bytes_by_op.values()))
            out = func(*args, **kwargs)
            self._track(out)
            return out
        out = func(*args, **kwargs)
        self._track(out)
        if func.is_view or name in _NO_TRAFFIC:
            return out
        tensors = {}
        leaves = tree_leaves(out) if name in _OUTPUT_ONLY else tree_leaves((args, kwargs, out))
        for t in leaves:
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t.numel() * t.element_size()
        self.bytes_by_op[f"aten::{name}"] += sum(tensors.values())
        return out


def _stand_ins(launches: list[Launch]) -> list[Launch]:
    """``launches``, each tensor argument replaced by a new meta tensor of its shape, strides
    and dtype (the same one where launches share a tensor): a record must not hold the
    step's tensors, or the memory count would never see them freed."""
    memo: dict[int, torch.Tensor] = {}
    for launch in launches:
        for name, v in launch.args.items():
            if isinstance(v, torch.Tensor):
                if id(v) not in memo:
                    memo[id(v)] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
                launch.args[name] = memo[id(v)]
    return launches


def _implementation(op):
    """The Python implementation behind an aru:: custom operator."""
    import importlib
    import pkgutil

    import aru_kernels

    for info in pkgutil.iter_modules(aru_kernels.__path__):  # every module of the package, so none is missed
        module = importlib.import_module(f"aru_kernels.{info.name}")
        for value in vars(module).values():
            if isinstance(value, torch._library.custom_ops.CustomOpDef) and op.name() == f"aru::{value._name}":
                return value._init_fn
    raise KeyError(f"no implementation found for {op}")


# PyTorch's operators that autocast runs in the lower precision (its CUDA list, as functions)
_AUTOCAST_LOWER = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                   torch.conv_transpose3d, torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.mv,
                   torch.addmm, torch.baddbmm, torch.addbmm, torch.addmv, torch.addr, torch.prelu,
                   torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}


class _MetaAutocast(TorchFunctionMode):
    """Autocast's lower-precision list for meta tensors: their floating operands cast to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AUTOCAST_LOWER:
            def cast(t):
                meta_float = isinstance(t, torch.Tensor) and t.is_meta and t.is_floating_point()
                return t.to(self.dtype) if meta_float else t
            args, kwargs = tree_map(cast, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fused_autocast(dtype: torch.dtype):
    """``torch.autocast`` to ``dtype`` as on a GPU, for a step on meta tensors.

    ``torch.autocast`` does not apply on the meta device, and ``torch.autocast("cuda")``
    switches itself off where there is no CUDA. So here the operators' one reading of
    autocast's state (``aru_kernels.functional._autocast_dtype``) answers ``dtype`` for meta
    tensors: the fused operators cast activations and read float32 weights and batch-norm
    vectors in place, as under autocast on a GPU. PyTorch's operators of autocast's
    lower-precision list (convolutions, linear, matrix products: a head, a squeeze-excitation)
    cast their floating operands to ``dtype``. Same launches, dtypes and specializations as a
    real autocast run (a test compares them); autocast's float32 list (losses, softmax) is not
    emulated, so an eager model's step is not emulated either."""
    from aru_kernels import functional

    on_device = functional._autocast_dtype
    functional._autocast_dtype = lambda x: dtype if x.device.type == "meta" else on_device(x)
    try:
        with _MetaAutocast(dtype):
            yield
    finally:
        functional._autocast_dtype = on_device


def record_step(model_name: str, impl: str, mode: str, batch: int, img: int, dtype: torch.dtype,
                recompute_normalized: bool = False, autocast: bool = False,
                channels_last: bool = True) -> StepRecorder:
    """Run one inference forward or training step (forward + backward) on the meta device
    (the training forward under ``aru_kernels.recompute_normalized_inputs(recompute_normalized)``):
    with ``autocast``, a float32 model and input under :func:`fused_autocast` to ``dtype``, as
    ``benchmarks/run.py`` runs the fused models (``impl="fused"`` only); else the model and
    input in ``dtype``; ``channels_last=False``: model and input left in PyTorch's default
    layout (as a model only moved with ``.cuda()`` holds them)."""
    import aru_models

    def build() -> torch.nn.Module:
        if model_name.startswith("timm:"):  # a timm model, switched with aru_models.fuse
            import timm

            model = timm.create_model(model_name[len("timm:"):], pretrained=False)
            return aru_models.fuse(model) if impl == "fused" else model
        return getattr(aru_models, model_name)(impl=impl)

    if autocast and impl != "fused":
        raise ValueError("autocast is emulated for the fused operators only: record an eager step in dtype")
    return record_model_step(build, mode, batch, img, dtype, recompute_normalized, autocast, channels_last)


def record_model_step(build, mode: str, batch: int, img: int, dtype: torch.dtype, recompute_normalized: bool = False,
                      autocast: bool = False, channels_last: bool = True) -> StepRecorder:
    """:func:`record_step` of the model ``build()`` makes (on the meta device)."""
    import aru_kernels

    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.device("meta"):
        model = build().to(dtype=torch.float32 if autocast else dtype)
        model = model.to(memory_format=torch.channels_last) if channels_last else model
    x = torch.empty(batch, 3, img, img, device="meta", dtype=torch.float32 if autocast else dtype)
    x = x.contiguous(memory_format=layout)
    rec = StepRecorder()
    forward = fused_autocast(dtype) if autocast else contextlib.nullcontext()
    if mode == "infer":
        model.eval()
        with rec, torch.no_grad(), forward:
            model(x)
    else:
        model.train()
        with rec:
            with forward, aru_kernels.recompute_normalized_inputs(recompute_normalized):
                loss = model(x).float().sum()
            loss.backward()  # outside autocast, as benchmarks/run.py (and PyTorch's recipe) runs it
    return rec


def record_layers(batch: int, img: int, dtype: torch.dtype, passes=("fwd", "train_fwd", "bwd"),
                  channels_last: bool = True) -> dict[tuple[str, str], StepRecorder]:
    """The fused rows of ``benchmarks/run.py``'s layer table, recorded on the meta device: per
    (layer, pass), the launches of ``fwd`` (the inference forward), ``train_fwd`` (the training
    forward) or ``bwd`` (its backward), the layer's tensors in ``dtype`` (no autocast) as
    ``run.py`` makes them."""
    import run

    cfg = run.Config(device=torch.device("meta"), dtype=dtype, batch_size=batch, img_size=img,
                     channels_last=channels_last, warmup=0, iters=1, seed=0, deadline=None)
    out = {}
    for shape in run.LAYER_SHAPES:
        layer = run.GroupedConvLayer(shape, run.layer_size(shape, img), cfg)
        backward = None
        for pass_ in passes:
            out[shape.name, pass_] = rec = StepRecorder()
            if pass_ == "fwd":
                with rec:
                    layer.fused()
            elif pass_ == "train_fwd":
                with rec:
                    _, backward = layer.train_step("fused")  # one forward, kept for the backward
            else:
                if backward is None:  # the backward alone: its forward not recorded
                    _, backward = layer.train_step("fused")
                with rec:
                    backward()
    return out


def layer_report(arch: int, batch: int, img: int, dtype_name: str, gpu: aot.GpuProfile = aot.H200,
                 channels_last: bool = True) -> tuple[dict, list[str]]:
    """The floors of the fused rows of ``benchmarks/run.py``'s layer table (:func:`record_layers`),
    to set beside what the table measures: per layer and pass, the sum over its kernels of
    the largest of their floors."""
    import triton

    layers, errors = [], []
    for (name, pass_), rec in record_layers(batch, img, DTYPES[dtype_name], channels_last=channels_last).items():
        rows, errs = kernel_rows(rec.launches, arch, gpu)
        errors += errs
        layers.append({"layer": name, "pass": pass_,
                       "floor_us": round(sum(r["launches"] * r.get("floor_us", 0.0) for r in rows), 3),
                       "bytes": sum(rec.bytes_by_op.values()), "kernels": rows})
    return {"arch": arch, "triton": triton.__version__, "batch_size": batch, "img_size": img, "dtype": dtype_name,
            "channels_last": channels_last, "gpu_profile": gpu.to_json(), "layers": layers}, errors


def kernel_rows(launches: list[Launch], arch: int, gpu: aot.GpuProfile) -> tuple[list[dict], list[str]]:
    """One row per distinct compiled kernel and launch shape; and the compile errors."""
    groups: dict[tuple, list[Launch]] = defaultdict(list)
    for launch in launches:
        trips = tuple(t if isinstance(t, int) else tuple(t) for t in launch.meta.get("loop_trips", []))
        groups[(aot.launch_key(launch, arch), launch.grid, trips)].append(launch)
    reports: dict[tuple, aot.KernelReport | str] = {}  # one compile per specialization
    rows, errors = [], []
    for (key, grid, trips), same in groups.items():
        first = same[0]
        if key not in reports:
            try:
                reports[key] = aot.analyze(aot.compile_launch(first, arch), first.meta.get("loop_trips", []))
            except Exception as exc:  # report every failure, not just the first
                reports[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                errors.append(f"{first.kernel.fn.__name__} {first.role} {first.meta.get('conv')}: {reports[key]}")
        report = reports[key]
        if not isinstance(report, str):  # the same code runs this launch's own loop trips
            report = report.with_trips(list(trips))
        row = {"kernel": first.kernel.fn.__name__, "pass": first.role, "conv": first.meta.get("conv"),
               "launches": len(same), "grid": list(grid), "num_warps": first.num_warps}
        if isinstance(report, str):
            rows.append({**row, "error": report})
            continue
        if report.shared_bytes > gpu.max_shared_bytes:  # Triton refuses the launch (OutOfResources)
            errors.append(f"{first.kernel.fn.__name__} {first.role} {first.meta.get('conv')}: needs "
                          f"{report.shared_bytes} bytes of shared memory, over the {gpu.max_shared_bytes} "
                          f"a block may have on {gpu.name}: it would not launch")
        issue, dram, tensor = report.floors(first, gpu)
        rows.append({**row, "registers": report.registers, "spill_bytes": report.spill_bytes,
                     "shared_bytes": report.shared_bytes, "hgmma": report.hgmma, "hmma": report.hmma,
                     "loads": report.loads, "stores": report.stores, "loops": report.loops,
                     "static_instr": report.static_instr, "loop_sizes": list(report.loop_sizes),
                     "nested_sizes": list(report.nested_sizes),
                     "loop_trips": list(trips), "dyn_instr_per_warp": report.dyn_instr_per_warp,
                     "mma_flops_per_warp": report.mma_flops_per_warp, "issue_floor_us": round(issue, 3),
                     "dram_floor_us": round(dram, 3), "tensor_floor_us": round(tensor, 3),
                     "floor_us": round(max(issue, dram, tensor), 3)})
    return rows, errors


def _conv_label(conv: dict | None) -> str:
    if not conv:
        return ""
    return (f"{conv['c_in']}->{conv['c_out']} {conv['kh']}x{conv['kw']}/s{conv['stride']} g{conv['groups']} "
            f"{conv['h']}x{conv['w']}")


def print_table(report: dict) -> None:
    print(f"{'kernel':28s} {'pass':15s} {'conv':34s} {'n':>3s} {'progs':>7s} {'w':>2s} {'regs':>4s} {'spill':>5s} "
          f"{'smem':>6s} {'w/SM':>4s} {'mma':>4s} {'instr/warp':>10s} {'issue us':>9s} {'dram us':>8s} {'mma us':>7s}  "
          f"loads")
    for r in report["kernels"]:
        progs = 1
        for g in r["grid"]:
            progs *= g
        if "error" in r:
            print(f"{r['kernel']:28s} {r['pass']:15s} {_conv_label(r['conv']):34s} FAILED {r['error']}")
            continue
        loads = ", ".join(f"{k}x{v}" for k, v in r["loads"].items())
        resident = "-" if r["registers"] is None else aot.resident_warps(
            r["registers"], r["shared_bytes"], r["num_warps"], progs, report["gpu_profile"]["sms"])
        print(f"{r['kernel']:28s} {r['pass']:15s} {_conv_label(r['conv']):34s} {r['launches']:3d} {progs:7d} "
              f"{r['num_warps']:2d} {r['registers']!s:>4s} {r['spill_bytes']!s:>5s} {r['shared_bytes']:6d} "
              f"{resident!s:>4s} {r['hgmma'] + r['hmma']:4d} {r['dyn_instr_per_warp']:10d} {r['issue_floor_us']:9.1f} "
              f"{r['dram_floor_us']:8.1f} {r['tensor_floor_us']:7.1f}  {loads}")
    t = report["traffic"]
    print(f"\nstep floor: {report['total_floor_ms']:.3f} ms = {report['floor_img_per_s']:.0f} images/s "
          f"({report['model']} {report['mode']}, batch {report['batch_size']}, {report['dtype']}"
          f"{' autocast' if report.get('autocast') else ''}, sm_{report['arch']}, "
          f"triton {report['triton']})")
    print(f"traffic per step: eager {t['eager_GB']:.2f} GB, fused {t['fused_GB']:.2f} GB "
          f"({t['fused_GB'] / t['eager_GB']:.2f}x)")
    for op, gb in sorted(t["by_op"]["fused"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  fused {op:40s} {gb:8.2f} GB")
    m = report["memory"]
    print(f"peak of the tensors the step creates: eager {m['eager_peak_GiB']:.2f} GiB, "
          f"fused {m['fused_peak_GiB']:.2f} GiB ({m['fused_peak_GiB'] / max(m['eager_peak_GiB'], 1e-9):.2f}x)")


def print_layer_table(report: dict) -> None:
    print(f"{'layer':10s} {'pass':9s} {'floor us':>9s} {'GB':>6s}  kernels: floor us (x launches)")
    for r in report["layers"]:
        kernels = ", ".join(f"{k['kernel']} {k.get('floor_us', float('nan')):.1f}"
                            + (f" (x{k['launches']})" if k["launches"] > 1 else "") for k in r["kernels"])
        print(f"{r['layer']:10s} {r['pass']:9s} {r['floor_us']:9.1f} {r['bytes'] / 1e9:6.3f}  {kernels}")
    print(f"\n(benchmarks/run.py's layer table, fused rows: batch {report['batch_size']}, {report['dtype']}, "
          f"sm_{report['arch']}, triton {report['triton']})")


def static_report(model: str, mode: str, arch: int, batch: int, img: int, dtype_name: str,
                  gpu: aot.GpuProfile = aot.H200, recompute_normalized: bool = False,
                  autocast: bool | None = None) -> tuple[dict, list[str]]:
    """The report of one step (``autocast``: the fused step's, by default as ``benchmarks/run.py``
    runs it: under autocast unless ``dtype_name`` is float32; the eager step's bytes are counted
    with the model in the dtype, autocast not being emulated for PyTorch's operators)."""
    import triton

    dtype = DTYPES[dtype_name]
    autocast = dtype != torch.float32 if autocast is None else autocast
    fused = record_step(model, "fused", mode, batch, img, dtype, recompute_normalized, autocast=autocast)
    eager = record_step(model, "eager", mode, batch, img, dtype)
    rows, errors = kernel_rows(fused.launches, arch, gpu)
    total_us = sum(r["launches"] * r.get("floor_us", 0.0) for r in rows)
    gb = 1e-9
    report = {
        "arch": arch, "triton": triton.__version__, "model": model, "mode": mode, "batch_size": batch,
        "img_size": img, "dtype": dtype_name, "autocast": autocast, "recompute_normalized": recompute_normalized,
        "gpu_profile": gpu.to_json(), "kernels": rows,
        "total_floor_ms": round(total_us / 1e3, 6),
        "floor_img_per_s": round(batch / (total_us * 1e-6), 1) if total_us else None,
        "traffic": {
            "eager_GB": round(sum(eager.bytes_by_op.values()) * gb, 4),
            "fused_GB": round(sum(fused.bytes_by_op.values()) * gb, 4),
            "by_op": {"eager": {k: round(v * gb, 4) for k, v in eager.bytes_by_op.items()},
                      "fused": {k: round(v * gb, 4) for k, v in fused.bytes_by_op.items()}},
        },
        "memory": {"eager_peak_GiB": round(eager.peak_bytes / 2**30, 3),
                   "fused_peak_GiB": round(fused.peak_bytes / 2**30, 3)},
    }
    return report, errors


def add_target_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that fix the compiled step: ``--arch``, ``--dtype``, ``--batch-size``, ``--img-size``."""
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)


def main(argv=None) -> int:
    import aru_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnext50_32x4d",
                    help="a builder of aru_models, or timm:NAME (needs timm)")
    ap.add_argument("--mode", choices=["infer", "train"], default="train")
    add_target_arguments(ap)
    ap.add_argument("--recompute-normalized", action="store_true",
                    help="the training forward under aru_kernels.recompute_normalized_inputs")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="the fused step as benchmarks/run.py runs it: a float32 model under autocast to "
                         "--dtype (default: on unless --dtype is float32); --no-autocast: the model in --dtype")
    ap.add_argument("--layers", action="store_true",
                    help="instead of a model: the fused rows of benchmarks/run.py's grouped 3x3 layer table "
                         "(inference forward, training forward, backward), floors per layer and pass")
    ap.add_argument("--json", help="write the report here (default: print only)")
    args = ap.parse_args(argv)
    if not hasattr(aru_models, args.model) and not args.model.startswith("timm:"):
        ap.error(f"unknown model {args.model!r}")
    if args.layers:
        report, errors = layer_report(args.arch, args.batch_size, args.img_size, args.dtype)
        print_layer_table(report)
    else:
        report, errors = static_report(args.model, args.mode, args.arch, args.batch_size, args.img_size, args.dtype,
                                       recompute_normalized=args.recompute_normalized, autocast=args.autocast)
        print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    for e in errors:
        print("FAILED:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
