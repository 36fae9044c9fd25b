"""Compile a model's kernels ahead of its first step, on every core, into Triton's cache.

    python benchmarks/warm_cache.py --model resnext50_32x4d resnet50 --mode infer train \\
        --arch 90 --batch-size 256 --img-size 224 --dtype bfloat16 --jobs 16

Triton's JIT compiles each kernel specialization the first time it is launched,
one after another in the launching thread: a resnext50_32x4d training step
launches about 120 distinct specializations, half a second to a few seconds
each, so its first step spends minutes compiling. This script records the
launches of each model's fused inference forward or training step on the meta
device as ``benchmarks/run.py`` runs it (a float32 model under autocast to
``--dtype``; nothing runs; :func:`aot_check.record_step`), keeps one launch per
specialization (:func:`aru_kernels.aot.launch_key`) and compiles them in
``--jobs`` processes exactly as the JIT would at those launches
(:func:`aru_kernels.aot.compile_launch`). Each compile lands in Triton's
on-disk cache (``TRITON_CACHE_DIR``, by default ``~/.triton/cache``) under the
key the JIT computes, so the JIT's first launch of the same specialization
loads it instead of compiling. A launch whose tensors sit at other alignments
than the meta tensors' (a view starting off a 16-byte boundary) is another
specialization: the JIT still compiles that one itself.

Triton 3.6 and older also build a C launcher for each kernel signature (gcc,
about a second) at its first launch, and cache it too; where the CUDA driver is
present, each worker builds its kernels' launchers beside them. Later Triton
launches every kernel through one generic launcher: nothing to build.

Needs no GPU (``--arch`` names the target) and must not run under
``TRITON_INTERPRET=1``. Exits non-zero if a kernel fails to compile: it
would fail at its launch too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET", "0") == "1":
    os.environ["TRITON_INTERPRET"] = "0"  # compiling needs the real JIT functions

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aot_check import DTYPES, add_target_arguments, record_layers, record_step  # noqa: E402

from aru_kernels import aot  # noqa: E402
from aru_kernels.launch import Launch  # noqa: E402

# The launches the workers compile: set before the pool forks, so a worker is
# handed an index, not a pickled launch holding meta tensors and kernel objects.
_LAUNCHES: list[Launch] = []


def layer_launches(modes: list[str], *, batch: int, img: int, dtype: torch.dtype,
                   channels_last: bool = True) -> list[Launch]:
    """The launches of the fused rows of ``benchmarks/run.py``'s layer table, recorded on the
    meta device (:func:`aot_check.record_layers`): each grouped 3x3 layer's inference forward
    (``infer``), training forward and backward (``train``), in ``dtype`` (no autocast)."""
    passes = (["fwd"] if "infer" in modes else []) + (["train_fwd", "bwd"] if "train" in modes else [])
    recorded = record_layers(batch, img, dtype, passes, channels_last) if passes else {}
    return [launch for rec in recorded.values() for launch in rec.launches]


def distinct_launches(models: list[str], modes: list[str], *, arch: int, batch: int, img: int,
                      dtype: torch.dtype, recompute_normalized: bool = False, autocast: bool = True,
                      channels_last: bool = True, layers: bool = False) -> list[Launch]:
    """One launch per compiled specialization over the models' fused steps, in first-launch order
    (``autocast``: as ``benchmarks/run.py`` runs them, a float32 model under autocast to ``dtype``,
    whose operators read float32 weights and vectors in place: other specializations than a
    model in ``dtype``); with ``layers``, first those of ``run.py``'s layer table
    (:func:`layer_launches`), which it measures before the models."""
    seen: dict[tuple, Launch] = {}
    if layers:
        for launch in layer_launches(modes, batch=batch, img=img, dtype=dtype, channels_last=channels_last):
            seen.setdefault(aot.launch_key(launch, arch), launch)
    variants = [False, True] if recompute_normalized else [False]
    autocast = autocast and dtype != torch.float32
    for model in models:
        for mode in modes:
            for recompute in variants if mode == "train" else [False]:
                step = record_step(model, "fused", mode, batch, img, dtype, recompute, autocast=autocast,
                                   channels_last=channels_last)
                for launch in step.launches:
                    seen.setdefault(aot.launch_key(launch, arch), launch)
    return list(seen.values())


def build_launcher(kernel) -> bool:
    """Build (into Triton's cache) the C launcher Triton 3.6 and older make for a compiled
    kernel's signature at its first launch; False where there is none to build (a generic
    launcher) or it cannot be built here (no CUDA driver: the first launch builds it)."""
    from triton.backends.nvidia import driver

    if not hasattr(driver, "make_launcher"):
        return False
    try:
        driver.CudaLauncher(kernel.src, kernel.metadata)
    except Exception:
        return False
    return True


def _compile(index: int, arch: int) -> tuple[int, float, str | None, bool]:
    launch = _LAUNCHES[index]
    t0 = time.perf_counter()
    try:
        kernel = aot.compile_launch(launch, arch)
    except Exception as exc:  # report every failure, not just the first
        first = str(exc).splitlines()[0] if str(exc) else ""
        return index, time.perf_counter() - t0, f"{type(exc).__name__}: {first}", False
    return index, time.perf_counter() - t0, None, build_launcher(kernel)


def warm(launches: list[Launch], arch: int, jobs: int) -> list[tuple[int, float, str | None, bool]]:
    """Compile ``launches`` for ``sm_<arch>`` in ``jobs`` forked processes; (index, seconds, error,
    whether its launcher was built) each."""
    global _LAUNCHES
    _LAUNCHES = launches
    if jobs <= 1:
        return [_compile(i, arch) for i in range(len(launches))]
    # fork: the workers inherit the recorded launches (this process never touches CUDA)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_compile, i, arch) for i in range(len(launches))]
        return [f.result() for f in as_completed(futures)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["resnext50_32x4d"],
                    help="builders of aru_models, or timm:NAME (needs timm)")
    ap.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    add_target_arguments(ap)
    ap.add_argument("--recompute-normalized", action="store_true",
                    help="also the training steps under aru_kernels.recompute_normalized_inputs")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                    help="the steps as benchmarks/run.py runs them, a float32 model under autocast to --dtype "
                         "(default); --no-autocast: the model in --dtype")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="model and input in channels_last, as run.py's --channels-last (default); "
                         "--no-channels-last: as a model only moved with .cuda()")
    ap.add_argument("--layers", action="store_true",
                    help="also (first) the fused rows of benchmarks/run.py's grouped 3x3 layer table, for --mode")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: all cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    launches = distinct_launches(args.model, args.mode, arch=args.arch, batch=args.batch_size, img=args.img_size,
                                 dtype=DTYPES[args.dtype], recompute_normalized=args.recompute_normalized,
                                 autocast=args.autocast, channels_last=args.channels_last, layers=args.layers)
    print(f"{len(launches)} kernel specializations in {' '.join(args.model)}{' and the layer table' * args.layers} "
          f"({' '.join(args.mode)}), "
          f"recorded in {time.perf_counter() - t0:.1f} s", flush=True)
    t1 = time.perf_counter()
    results = warm(launches, args.arch, max(1, args.jobs))
    wall = time.perf_counter() - t1
    errors = [(i, e) for i, _, e, _ in results if e]
    serial = sum(s for _, s, _, _ in results)
    launchers = sum(built for *_, built in results)
    print(f"compiled {len(results) - len(errors)} of {len(launches)} for sm_{args.arch} in {wall:.1f} s on "
          f"{args.jobs} processes ({serial:.1f} s of compiling, which the JIT would spend one after another); "
          f"{launchers} launchers built; cache: {aot.cache_dir()}")
    for i, e in sorted(errors):
        launch = launches[i]
        print(f"FAILED: {launch.kernel.fn.__name__} {launch.role} {launch.meta.get('conv')}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
