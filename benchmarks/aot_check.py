"""Compile every conv kernel specialization a model uses, for chosen GPU
architectures, on a machine without a GPU; report tensor-core use, registers
and spills.

    python benchmarks/aot_check.py --model resnext50_32x4d --arch 90 --arch 80

Exits non-zero if any specialization fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Compiling needs the real JIT functions, not the interpreter's wrappers.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _compile(job):
    from aru_kernels.aot import compile_plan

    plan, arch = job
    try:
        return compile_plan(plan, arch).__dict__, None
    except Exception as exc:  # report every failure, not just the first
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _describe(plan) -> str:
    flags = "".join(f for f, on in (("+pro", plan.has_prologue), ("+res", plan.has_residual),
                                    ("+relu", plan.relu)) if on)
    return (f"{plan.c_in}->{plan.c_out} {plan.kh}x{plan.kw}/s{plan.stride} g{plan.groups} "
            f"{plan.h}x{plan.w} pack{plan.cin_p}x{plan.cout_p}{flags}")


def main(argv=None) -> int:
    import aru_models
    from aru_models.fused import conv_plans

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="builder name (repeatable); default resnet50 and resnext50_32x4d")
    ap.add_argument("--arch", action="append", type=int, help="compute capability x10 (repeatable); default 90")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the per-specialization results here")
    args = ap.parse_args(argv)
    models = args.model or ["resnet50", "resnext50_32x4d"]
    archs = args.arch or [90]

    plans = {}
    for name in models:
        builder = getattr(aru_models, name, None)
        if builder is None:
            ap.error(f"unknown model {name!r}")
        with torch.device("meta"):
            model = builder(impl="eager")
        for plan in conv_plans(model, (args.batch_size, 3, args.img_size, args.img_size), DTYPES[args.dtype]):
            plans.setdefault(plan, []).append(name)
    jobs = [(plan, arch) for plan in plans for arch in archs]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))

    rows, failures = [], 0
    print(f"{'specialization':58s} {'arch':>4s} {'mma':>6s} {'regs':>5s} {'stack':>6s} {'smem':>7s}")
    for (plan, arch), (res, err) in zip(jobs, results):
        row = {"spec": _describe(plan), "models": plans[plan], "arch": arch, "error": err}
        if res is None:
            failures += 1
            print(f"{row['spec']:58s} {arch:>4d} FAILED {err}")
        else:
            row.update(res)
            print(f"{row['spec']:58s} {arch:>4d} {res['mma']:>6s} {str(res['registers']):>5s} "
                  f"{str(res['spill_bytes']):>6s} {res['shared_bytes']:>7d}")
        rows.append(row)
    tc = sum(1 for r in rows if r.get("mma", "none") != "none")
    print(f"{len(plans)} specializations x {len(archs)} archs: {len(rows) - failures} compiled, "
          f"{failures} failed, {tc} with tensor-core instructions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
