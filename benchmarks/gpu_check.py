#!/usr/bin/env python3
"""The GPU check: versions, the GPU-marked tests, and a short benchmark, in one call.

Run from a checkout, without installing anything (no network needed)::

    PYTHONPATH=. python benchmarks/gpu_check.py benchmarks/results

It prints the GPU and the library versions, runs
``python -m pytest -m gpu -q tests`` (log: ``OUTDIR/pytest_<gpu>_<date>.log``),
then ``benchmarks/run.py`` on resnext50_32x4d and resnet50, inference and
training, eager / fused / compile, batch 256, bfloat16 autocast,
channels_last, with the layer table (JSON: ``OUTDIR/gpu_check_<gpu>_<date>.json``,
log: ``OUTDIR/benchmark_<gpu>_<date>.log``). The whole check keeps to
``--budget`` seconds (default 285): the tests get at most ``--test-budget`` of
them, and the benchmark starts no new row once its share is spent. Compiled
rows run last, so they are the ones a tight budget drops; the JSON is
rewritten after every row, so even a benchmark stopped at the budget leaves
what it measured.

Exit status: 0 when the tests passed and the benchmark finished cleanly; 1
otherwise (the benchmark still runs, and still writes its JSON, after failed
tests).

Without CUDA the same steps run (GPU tests skipped, the benchmark in its tiny
CPU configuration): a way to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Seconds kept back from the benchmark's row budget for the row in flight and the report.
_ROW_MARGIN_S = 40


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def versions() -> dict[str, str]:
    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory"] = f"{props.total_memory / 2**30:.1f} GiB"
        info["multiprocessors"] = str(props.multi_processor_count)
        info["cuda"] = str(torch.version.cuda)
        info["cudnn"] = str(torch.backends.cudnn.version())
    else:
        info["gpu"] = "none (no CUDA device)"
    return info


def run_logged(cmd: list[str], log_path: Path, timeout_s: float) -> tuple[int, bool]:
    """Run ``cmd`` in the repository root, echoing its output and writing it to
    ``log_path``; stop it (and the processes it started) after ``timeout_s``.
    Returns the exit status and whether it timed out."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print("$ " + " ".join(cmd), flush=True)
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def stop() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: the command and its workers

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        finally:
            timer.cancel()
        rc = proc.wait()
    if timed_out.is_set():
        print(f"stopped after {timeout_s:.0f} s", flush=True)
    return rc, timed_out.is_set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU tests plus a short benchmark, results written to OUTDIR.")
    parser.add_argument("outdir", type=Path, help="where the JSON and the logs go")
    parser.add_argument("--budget", type=float, default=285, metavar="SECONDS",
                        help="wall-clock budget of the whole check (default: 285)")
    parser.add_argument("--test-budget", type=float, default=120, metavar="SECONDS",
                        help="at most this much of it for the tests (default: 120)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.outdir.mkdir(parents=True, exist_ok=True)

    info = versions()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    on_gpu = torch.cuda.is_available()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    tag = f"{slug(info['gpu']) if on_gpu else 'cpu'}_{today}"
    print(flush=True)

    tests_ok = True
    if not args.skip_tests:
        log = args.outdir / f"pytest_{tag}.log"
        rc, timed_out = run_logged(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
            log, min(args.test_budget, args.budget / 2))
        # 5: no test selected, which is not a failure of the code under test.
        tests_ok = rc in (0, 5) and not timed_out
        print(f"\ntests: {'passed' if tests_ok else 'FAILED' if not timed_out else 'TIMED OUT'} "
              f"(pytest exit status {rc}); log: {log}\n", flush=True)

    json_path = args.outdir / f"gpu_check_{tag}.json"
    bench = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--model", "resnext50_32x4d", "resnet50",
             "--mode", "both", "--layers", "--json", str(json_path)]
    if on_gpu:
        bench += ["--impl", "eager,fused,compile", "--batch-size", "256", "--img-size", "224",
                  "--dtype", "bfloat16", "--channels-last", "--warmup", "5", "--iters", "10"]
    else:
        bench += ["--impl", "eager,fused"]  # the CPU defaults otherwise: compiling there takes minutes
    left = args.budget - (time.monotonic() - start)
    bench += ["--time-limit", str(max(left - _ROW_MARGIN_S, 0))]
    rc, timed_out = run_logged(bench, args.outdir / f"benchmark_{tag}.log", max(left, 1))
    bench_ok = rc == 0 and not timed_out
    state = "finished" if bench_ok else "TIMED OUT (partial results)" if timed_out else f"FAILED (exit status {rc})"
    print(f"\nbenchmark: {state}; results: {json_path if json_path.exists() else 'none written'}")
    if json_path.exists():
        data = json.loads(json_path.read_text())
        for table, value in (("models", "img_per_s"), ("layers", "us")):
            measured = sum(row[value] is not None for row in data[table])
            print(f"  {table}: {measured} of {len(data[table])} rows measured")
    print(f"gpu check took {time.monotonic() - start:.0f} s")
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
