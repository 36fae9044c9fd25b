"""Each GPU kernel's time in one fused step, beside the static model's floor for it.

    PYTHONPATH=. python benchmarks/profile_kernels.py --model resnext50_32x4d --mode train \\
        --static benchmarks/results/static_90_resnext50_32x4d_train.json --json profile.json

Runs the fused model as ``benchmarks/run.py`` does (a float32 model under bf16
autocast, channels_last, batch 256, random images; training: forward,
cross-entropy, backward, SGD), ``--warmup`` steps, then one step under
``torch.profiler`` (CUDA kernels only). Kernels are grouped as the static model
(``benchmarks/aot_check.py``) groups its rows, by name and grid, and each group's
measured time is set beside the floor of the static rows with the same kernel
and grid: ``measured / floor`` says how far each kernel runs from what its
instructions and bytes allow, and which of the static model's assumptions the
GPU does not bear out. The floors are an H200's (132 multiprocessors at
1.98 GHz, 714.8 TFLOP/s), but for their DRAM part, which is taken at this
card's copy bandwidth, measured as ``run.py`` measures it (an H100 copies about
3.0 TB/s, an H200 4.1). The registers each kernel ran with are printed beside
the static model's count (they differ where the JIT compiled another
specialization than the one the static model read), and from the static rows
the warps a multiprocessor holds at once (``aot.resident_warps``: few warps and
a ratio far above 1 point at latency the issue floor assumes hidden) and which
floor binds (issue, DRAM or tensor). PyTorch's own kernels (the loss, the
optimizer, a head) have no static row.

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aru_kernels import aot  # noqa: E402


def _grid(value) -> tuple[int, int, int]:
    """A grid as three dimensions: the trace's ``[x, y, z]`` (or its text), or a launch's 1 to 3."""
    if isinstance(value, str):
        value = [int(v) for v in value.strip("[]() ").replace(",", " ").split()]
    dims = [int(v) for v in value]
    return tuple(dims + [1] * (3 - len(dims)))


def kernel_events(trace: dict) -> list[dict]:
    """The GPU kernels of a ``torch.profiler`` Chrome trace, in the order they ran:
    name, grid, duration (us), registers per thread."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("cat") == "kernel" and e.get("ph") == "X" and "dur" in e]
    events.sort(key=lambda e: e["ts"])
    return [{"kernel": e["name"], "grid": _grid(e.get("args", {}).get("grid", [1])), "us": float(e["dur"]),
             "registers": e.get("args", {}).get("registers per thread")} for e in events]


def card_floors_us(row: dict, bandwidth_scale: float = 1.0) -> dict:
    """A static row's issue, DRAM and tensor floors, the DRAM floor scaled by ``bandwidth_scale``
    (the static profile's copy bandwidth over this card's)."""
    return {"issue": row["issue_floor_us"], "dram": row["dram_floor_us"] * bandwidth_scale,
            "tensor": row["tensor_floor_us"]}


def card_floor_us(row: dict, bandwidth_scale: float = 1.0) -> float:
    """A static row's floor on this card: the largest of :func:`card_floors_us`."""
    return max(card_floors_us(row, bandwidth_scale).values())


def join(events: list[dict], static: dict | None, copy_TBps: float | None = None) -> dict:
    """The measured kernels grouped by name and grid, each group beside the static rows of the
    same kernel and grid (``static``: an ``aot_check.py`` report, or None). With ``copy_TBps``,
    this card's measured copy bandwidth, the floors' DRAM part is that of this card (the
    static report's are an H200's, 4.144 TB/s; an H100 copies about 3.0)."""
    scale = 1.0
    if static and copy_TBps:
        scale = static["gpu_profile"]["copy_TBps"] / copy_TBps
    measured: dict[tuple, dict] = defaultdict(lambda: {"launches": 0, "us": 0.0, "registers": set()})
    for e in events:
        m = measured[e["kernel"], e["grid"]]
        m["launches"] += 1
        m["us"] += e["us"]
        if e["registers"] is not None:
            m["registers"].add(int(e["registers"]))
    floors: dict[tuple, dict] = defaultdict(lambda: {"launches": 0, "floor_us": 0.0, "registers": set(),
                                                     "resident": set(), "bound": defaultdict(float)})
    for r in (static or {}).get("kernels", []):
        if "error" in r:
            continue
        f = floors[r["kernel"], _grid(r["grid"])]
        f["launches"] += r["launches"]
        f["floor_us"] += r["launches"] * card_floor_us(r, scale)
        f["registers"].add(int(r["registers"]))
        programs = math.prod(r["grid"])
        f["resident"].add(aot.resident_warps(int(r["registers"]), r["shared_bytes"], r["num_warps"], programs,
                                             static["gpu_profile"]["sms"]))
        kinds = card_floors_us(r, scale)
        f["bound"][max(kinds, key=kinds.get)] += r["launches"] * max(kinds.values())
    rows = []
    for (name, grid), m in sorted(measured.items(), key=lambda kv: -kv[1]["us"]):
        f = floors.get((name, grid))
        rows.append({"kernel": name, "grid": list(grid), "launches": m["launches"], "us": round(m["us"], 2),
                     "registers": sorted(m["registers"]),
                     "static_launches": f["launches"] if f else None,
                     "floor_us": round(f["floor_us"], 3) if f else None,
                     "static_registers": sorted(f["registers"]) if f else None,
                     "warps_per_sm": min(f["resident"]) if f else None,
                     "bound": max(f["bound"], key=f["bound"].get) if f else None,
                     "ratio": round(m["us"] / f["floor_us"], 3) if f and f["floor_us"] > 0 else None})
    unseen = [{"kernel": name, "grid": list(grid), "static_launches": f["launches"],
               "floor_us": round(f["floor_us"], 3)}
              for (name, grid), f in floors.items() if (name, grid) not in measured]
    matched = [r for r in rows if r["floor_us"] is not None]
    return {"bandwidth_scale": round(scale, 4), "kernels": rows, "unseen_static": unseen,
            "total_us": round(sum(r["us"] for r in rows), 2),
            "matched_us": round(sum(r["us"] for r in matched), 2),
            "matched_floor_us": round(sum(r["floor_us"] for r in matched), 3),
            "static_floor_us": round(sum(f["floor_us"] for f in floors.values()), 3) if static else None}


def format_report(report: dict) -> str:
    lines = [f"{'kernel':34s} {'grid':>16s} {'n':>4s} {'us':>9s} {'floor us':>9s} {'x floor':>7s} "
             f"{'regs':>7s} {'static':>7s} {'w/SM':>4s} {'bound':>6s}"]
    for r in report["kernels"]:
        grid = "x".join(str(g) for g in r["grid"])
        floor = f"{r['floor_us']:9.1f}" if r["floor_us"] is not None else f"{'-':>9s}"
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else f"{'-':>7s}"
        count = f"{r['launches']}" + ("" if r["static_launches"] in (None, r["launches"]) else
                                      f" (static {r['static_launches']})")
        regs = ",".join(map(str, r["registers"])) or "-"
        static_regs = ",".join(map(str, r["static_registers"])) if r["static_registers"] else "-"
        resident = f"{r['warps_per_sm']:4d}" if r["warps_per_sm"] is not None else f"{'-':>4s}"
        lines.append(f"{r['kernel'][:34]:34s} {grid:>16s} {count:>4s} {r['us']:9.1f} {floor} {ratio} "
                     f"{regs:>7s} {static_regs:>7s} {resident} {r['bound'] or '-':>6s}")
    lines.append(f"\nkernel time of the step: {report['total_us'] / 1e3:.3f} ms; the kernels with a static row: "
                 f"{report['matched_us'] / 1e3:.3f} ms against a floor of {report['matched_floor_us'] / 1e3:.3f} ms "
                 f"(DRAM floors x{report['bandwidth_scale']:.3f} for this card's copy bandwidth)")
    if report["unseen_static"]:
        lines.append(f"static rows with no kernel of that name and grid in the step: {len(report['unseen_static'])} "
                     f"({sum(u['floor_us'] for u in report['unseen_static']) / 1e3:.3f} ms of floor)")
    return "\n".join(lines)


def profile_step(model_name: str, mode: str, batch: int, img: int, dtype: torch.dtype, warmup: int) -> dict:
    """One fused step of ``model_name`` under ``torch.profiler``, after ``warmup`` steps: its Chrome trace."""
    import run
    from torch.profiler import ProfilerActivity, profile

    cfg = run.Config(device=torch.device("cuda"), dtype=dtype, batch_size=batch, img_size=img, channels_last=True,
                     warmup=warmup, iters=1, seed=0, deadline=None)
    build = run.ModelBench(model_name, cfg)
    step = build.step(run.build_model(model_name, "fused", cfg, None), mode)
    for _ in range(max(1, warmup)):  # the first compiles (or loads) the kernels
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        return json.loads(Path(path).read_text())


def copy_bandwidth_TBps() -> float:
    """This GPU's device-to-device copy bandwidth, as ``benchmarks/run.py`` measures it."""
    import run

    return run.copy_bandwidth_TBps(run.Config(device=torch.device("cuda"), dtype=torch.bfloat16, batch_size=1,
                                              img_size=1, channels_last=True, warmup=0, iters=1, seed=0,
                                              deadline=None))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnext50_32x4d", help="a builder of aru_models, or timm:NAME")
    ap.add_argument("--mode", choices=["infer", "train"], default="train")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the profiled one (default 3)")
    ap.add_argument("--static", type=Path, help="the static model's report of the same step (aot_check.py --json)")
    ap.add_argument("--json", type=Path, help="write the joined report here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    import run

    if args.model not in run.MODELS and not args.model.startswith(run.EXTERNAL):
        ap.error(f"unknown model {args.model!r}; choose from {', '.join(run.MODELS)}, or timm:NAME")
    static = json.loads(args.static.read_text()) if args.static else None
    if static is not None:
        mismatched = [f"{k} {static.get(k)!r} (here {v!r})" for k, v in (
            ("model", args.model), ("mode", args.mode), ("batch_size", args.batch_size),
            ("img_size", args.img_size), ("dtype", args.dtype)) if static.get(k) != v]
        if mismatched:
            ap.error(f"--static describes another step: {', '.join(mismatched)}")
    if not torch.cuda.is_available():
        ap.error("profiling times kernels on a GPU; none is present (aot_check.py gives the floors without one)")
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    events = kernel_events(profile_step(args.model, args.mode, args.batch_size, args.img_size, dtype, args.warmup))
    copy_TBps = copy_bandwidth_TBps()
    report = {"gpu": torch.cuda.get_device_name(), "copy_TBps": round(copy_TBps, 4), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "model": args.model, "mode": args.mode,
              "batch_size": args.batch_size, "img_size": args.img_size, "dtype": args.dtype,
              "static": str(args.static) if args.static else None, **join(events, static, copy_TBps)}
    print(format_report(report))
    print(f"({report['gpu']}, {args.model} {args.mode}, batch {args.batch_size}; "
          f"{time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
