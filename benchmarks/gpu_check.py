#!/usr/bin/env python3
"""The GPU protocol: one prepared call for a lent GPU's quarter-hour.

Run from a checkout, without installing anything (no network needed)::

    PYTHONPATH=. python benchmarks/gpu_check.py benchmarks/results

In order, within ``--budget`` seconds (default 540):

1. the GPU and the library versions;
2. the GPU-marked tests, ``python -m pytest -m gpu`` (log:
   ``OUTDIR/pytest_<gpu>_<date>.log``; at most ``--test-budget`` seconds),
   and beside them, on the other cores, ``benchmarks/warm_cache.py``: the
   GPU tests' models' kernels, then the layer table's and the benchmarked
   models', compiled into Triton's cache in parallel, so that their first
   steps load them instead of compiling them one after another (minutes)
   inside the tests' and the benchmark's budgets (``OUTDIR/warm_cache_{tests,benchmark}_<gpu>_<date>.log``;
   each model row reports its first step's seconds, and each benchmark how
   many kernels the JIT still compiled);
3. ``benchmarks/run.py``: the layer table (fused vs cuDNN: inference forward,
   training forward and backward) and the model rows of resnext50_32x4d and
   resnet50, eager and fused, inference and training,
   batch 256, bf16 autocast, channels_last (``torch.compile`` rows only with
   ``--compile``: their H200 figures are recorded, and compiling costs
   minutes) -> ``OUTDIR/gpu_check_<gpu>_<date>.json``;
4. ``benchmarks/profile_kernels.py``: resnext50_32x4d's fused inference forward
   and training step, each kernel's time beside its static floor ->
   ``OUTDIR/profile_<gpu>_<date>_{infer,train}.json`` (GPU only);
5. resnext50_32x4d's fused training step under ``--recompute-normalized``
   (the 3x3s' normalized inputs recomputed by the backward, not held: its
   speed and peak memory) -> ``OUTDIR/gpu_check_<gpu>_<date>_recompute.json``;
6. ``benchmarks/tune.py`` with what is left of the budget but the last row's
   share: the conv tiles of both models, written to
   ``aru_kernels/tuned/<gpu>.json`` after every launch;
7. the fused rows again, with the tuned table ->
   ``OUTDIR/gpu_check_<gpu>_<date>_tuned.json``;
8. ``benchmarks/compare.py`` over those JSON files (the later runs beside the
   first run's eager rows): the measured figures beside the static floors and
   the bars -> ``OUTDIR/compare_<gpu>_<date>.md``.

Every step writes its JSON as it goes, so a run stopped at the budget keeps
what it measured. With ``--archive FILE``, every file the check wrote (into
OUTDIR, and the tuned table) is also packed into one gzipped tar after every
step, paths relative to the checkout (``tar xzf FILE`` in a checkout puts them
in place): one file to copy off a machine that is given back after the run.
SIGTERM or SIGINT stops the step in flight and its processes, then the check
writes its summary and archive and exits. Exit status: 0 when the tests passed
and every step finished cleanly, 1 otherwise.

Without CUDA the same steps run in a CPU mode that checks the script itself
in a minute: GPU tests skipped, the cache warmed for resnext29_tiny's inference
at 16x16, resnext29_tiny at 16x16 with the fused kernels in Triton's
interpreter, and ``tune.py --dry-run`` on resnext29_tiny (the re-run after it:
inference, no layers; no steps 4 and 7).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # (run as a script, without the package installed)
    sys.path.insert(0, str(REPO))

from aru_kernels.plans import gpu_slug, tuned_table_file  # noqa: E402

# Seconds kept back from the benchmark's row budget for the row in flight and the report.
_ROW_MARGIN_S = 40

# The steps' processes now running (each the leader of its own process group): what a
# SIGTERM or SIGINT stops before the check writes its summary.
_RUNNING: set[subprocess.Popen] = set()


class Stopped(Exception):
    """The check was told to stop (SIGTERM or SIGINT)."""


def _stop(signum, frame) -> None:
    for proc in list(_RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise Stopped(signal.Signals(signum).name)


def gpu_models() -> list[str]:
    """The models benchmarked on a GPU: timm's SE-ResNeXt too where timm is installed."""
    return ["resnext50_32x4d", "resnet50", *(["timm:seresnext50_32x4d"] if importlib.util.find_spec("timm") else [])]


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


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, echo: bool = True) -> tuple[int, bool]:
    """Run ``cmd`` in the repository root, writing its output to ``log_path`` (and, with
    ``echo``, to stdout); stop it (and the processes it started) after ``timeout_s``.
    Returns the exit status and whether it timed out."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print("$ " + " ".join(cmd), flush=True)
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        _RUNNING.add(proc)

        def stop() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: the command and its workers

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                log.write(line)
        finally:
            timer.cancel()
            rc = proc.wait()
            _RUNNING.discard(proc)
    if timed_out.is_set():
        print(f"stopped after {timeout_s:.0f} s", flush=True)
    return rc, timed_out.is_set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU tests plus a short benchmark, results written to OUTDIR.")
    parser.add_argument("outdir", type=Path, help="where the JSON and the logs go")
    parser.add_argument("--budget", type=float, default=540, metavar="SECONDS",
                        help="wall-clock budget of the whole check (default: 540)")
    parser.add_argument("--test-budget", type=float, default=120, metavar="SECONDS",
                        help="at most this much of it for the tests (default: 120)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile rows (minutes to compile)")
    parser.add_argument("--archive", type=Path, metavar="FILE",
                        help="also pack every file the check writes (OUTDIR's, the tuned table) into this "
                             ".tar.gz after every step, paths relative to the checkout")
    args = parser.parse_args(argv)
    start, started_at = time.monotonic(), time.time()
    args.outdir.mkdir(parents=True, exist_ok=True)

    info = versions()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    on_gpu = torch.cuda.is_available()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    tag = f"{gpu_slug(info['gpu']) if on_gpu else 'cpu'}_{today}"
    print(flush=True)

    def pack() -> None:
        if args.archive is not None:
            archive(args.archive, args.outdir, started_at - 1, tuned_table_file(info["gpu"]) if on_gpu else None)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    steps_ok, tests_ok = [], True
    try:
        tests_ok = checks(args, start, tag, on_gpu, info, steps_ok, pack)
    except Stopped as exc:
        print(f"\nstopped by {exc}: the step in flight and its processes killed", flush=True)
        steps_ok.append(False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"gpu check took {time.monotonic() - start:.0f} s")
        summarize(args.outdir, tag)
        pack()
    return 0 if tests_ok and all(steps_ok) else 1


def checks(args, start: float, tag: str, on_gpu: bool, info: dict, steps_ok: list, pack) -> bool:
    """The steps, in order, each one's success appended to ``steps_ok`` and the archive
    packed after it; returns whether the tests passed."""
    warming = start_warm_cache(args, tag, on_gpu, info)  # on the other cores, beside the tests
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
        pack()

    steps_ok.append(finish_warm_cache(*warming))
    json_path = args.outdir / f"gpu_check_{tag}.json"
    impls = "eager,fused,compile" if args.compile else "eager,fused"
    share = 0.5 if on_gpu else 0.8  # of what is left: the first benchmark (the bars); then profiles, tuning, re-runs
    steps_ok.append(benchmark(args, start, json_path, impls, layers=True, on_gpu=on_gpu, tag=tag, share=share))
    pack()

    if on_gpu:
        steps_ok.append(profile(args, tag, info))
        pack()
        # the fused training step holding less (aru_kernels.recompute_normalized_inputs): speed and peak; one
        # row, before tuning takes what is left
        steps_ok.append(benchmark(args, start, args.outdir / f"gpu_check_{tag}_recompute.json", "fused",
                                  layers=False, on_gpu=True, tag=f"{tag}_recompute", share=0.2,
                                  extra=("--mode", "train", "--model", "resnext50_32x4d", "--recompute-normalized")))
        pack()

    left = args.budget - (time.monotonic() - start)
    rc, timed_out = run_logged(tune_command(on_gpu, max(left * 0.6 - _ROW_MARGIN_S, 0)),
                               args.outdir / f"tune_{tag}.log", max(left * 0.7, 1))
    steps_ok.append(rc == 0 and not timed_out)
    print(f"\ntuning: {'finished' if steps_ok[-1] else 'FAILED or TIMED OUT'}\n", flush=True)
    pack()

    steps_ok.append(benchmark(args, start, args.outdir / f"gpu_check_{tag}_tuned.json", "fused", layers=on_gpu,
                              on_gpu=on_gpu, tag=f"{tag}_tuned", share=1.0))
    pack()
    return tests_ok


def archive(path: Path, outdir: Path, since: float, tuned: Path | None) -> None:
    """Pack the files written into ``outdir`` since ``since`` (a ``time.time()``), and ``tuned``
    where it exists, into the gzipped tar ``path`` (replaced whole: a stopped write leaves the
    previous archive), each under its path relative to the checkout (else its name)."""
    tmp = path.with_name(path.name + ".tmp")
    files = sorted(f for f in outdir.iterdir() if f.is_file() and f.stat().st_mtime >= since
                   and f.resolve() not in (path.resolve(), tmp.resolve()))
    if tuned is not None and tuned.is_file():
        files.append(tuned)

    def name(f: Path) -> str:
        f = f.resolve()
        return str(f.relative_to(REPO)) if f.is_relative_to(REPO) else f.name

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=name(f))
    tmp.replace(path)


def tune_command(on_gpu: bool, budget: float) -> list[str]:
    """The ``benchmarks/tune.py`` command: tuning within ``budget`` seconds on a GPU, its dry run elsewhere."""
    tune = [sys.executable, str(REPO / "benchmarks" / "tune.py")]
    if on_gpu:
        return tune + ["--budget", str(budget)]
    return tune + ["--dry-run", "--model", "resnext29_tiny", "--mode", "infer", "--img-size", "32"]


def profile_command(outdir: Path, tag: str, mode: str, info: dict) -> list[str]:
    """The ``benchmarks/profile_kernels.py`` command for resnext50_32x4d's ``mode``, with the
    committed static report of the same step for this GPU's architecture where there is one."""
    major, minor = info["capability"].split(".")
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_kernels.py"), "--model", "resnext50_32x4d",
           "--mode", mode, "--json", str(outdir / f"profile_{tag}_{mode}.json")]
    static = REPO / "benchmarks" / "results" / f"static_{major}{minor}_resnext50_32x4d_{mode}.json"
    return cmd + (["--static", str(static)] if static.exists() else [])


def profile(args, tag: str, info: dict, timeout_s: float = 60) -> bool:
    """``benchmarks/profile_kernels.py`` over resnext50_32x4d's fused inference forward and
    training step: each kernel's time beside the static model's floor for it (the committed
    ``benchmarks/results/static_<arch>_...`` report of the same step, where there is one for
    this GPU's architecture) -> ``OUTDIR/profile_<gpu>_<date>_<mode>.json``; True when both ran."""
    ok = True
    for mode in ("infer", "train"):
        log = args.outdir / f"profile_{tag}_{mode}.log"
        rc, timed_out = run_logged(profile_command(args.outdir, tag, mode, info), log, timeout_s, echo=False)
        print("".join(log.read_text().splitlines(keepends=True)[-3:]) if log.exists() else "", end="")
        state = "finished" if rc == 0 and not timed_out else "TIMED OUT" if timed_out else f"FAILED (exit status {rc})"
        print(f"profile of resnext50_32x4d {mode}: {state}\n", flush=True)
        ok = ok and rc == 0 and not timed_out
    return ok


def summarize(outdir: Path, tag: str) -> None:
    """``benchmarks/compare.py`` over the benchmarks' JSON (the later runs, fused rows only,
    beside the first run's eager rows): measured beside predicted, and the bars, printed and
    written to ``OUTDIR/compare_<gpu>_<date>.md``."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare import compare

    parts, first = [], None
    for suffix in ("", "_recompute", "_tuned"):
        path = outdir / f"gpu_check_{tag}{suffix}.json"
        if path.exists():
            try:
                run = json.loads(path.read_text())
                parts.append(f"## {path.name}\n\n{compare(run, first=first)}\n")
                first = first or run
            except Exception as exc:  # a summary must not hide the results themselves
                parts.append(f"## {path.name}\n\ncould not compare: {type(exc).__name__}: {exc}\n")
    if parts:
        (outdir / f"compare_{tag}.md").write_text("\n".join(parts))
        print("\n" + "\n".join(parts), flush=True)


def warm_commands(on_gpu: bool, info: dict) -> dict[str, list[str]]:
    """The ``benchmarks/warm_cache.py`` runs, in order: on a GPU the GPU tests' models (batch 8,
    as moved with ``.cuda()``), then the layer table and the benchmark's steps."""
    warm = [sys.executable, str(REPO / "benchmarks" / "warm_cache.py")]
    if not on_gpu:  # the script itself, on a small step (the CPU benchmark runs in the interpreter: no cache needed)
        return {"benchmark": warm + ["--model", "resnext29_tiny", "--layers", "--mode", "infer", "--batch-size", "2",
                                     "--img-size", "16", "--dtype", "float32", "--jobs", "2"]}
    major, minor = info["capability"].split(".")
    common = ["--mode", "infer", "train", "--arch", f"{major}{minor}", "--img-size", "224", "--dtype", "bfloat16",
              "--jobs", str(max(1, (os.cpu_count() or 1) - 2))]  # the tests and this process keep two cores
    return {"tests": warm + ["--model", "resnet50", "resnext50_32x4d", "--batch-size", "8", "--no-channels-last",
                             *common],
            "benchmark": warm + ["--model", *gpu_models(), "--layers", "--recompute-normalized",
                                 "--batch-size", "256", *common]}


def start_warm_cache(args, tag: str, on_gpu: bool, info: dict) -> tuple[threading.Thread, list, list]:
    """Start ``benchmarks/warm_cache.py`` in a thread (the compiling runs in its processes): on a
    GPU first for the GPU tests' models (batch 8, as moved with ``.cuda()``), then for the
    benchmark's steps; :func:`finish_warm_cache` waits for it."""
    runs = warm_commands(on_gpu, info)
    logs = [args.outdir / f"warm_cache_{what}_{tag}.log" for what in runs]
    results: list = []
    deadline = time.monotonic() + args.budget * 0.4

    def work() -> None:
        for cmd, log in zip(runs.values(), logs):
            results.append(run_logged(cmd, log, max(deadline - time.monotonic(), 1), echo=False))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, logs, results


def finish_warm_cache(thread: threading.Thread, logs: list, results: list) -> bool:
    """Wait for the warm-up and print the end of its logs; False when a kernel failed to compile
    (it would fail at its launch too). A warm-up stopped at its time limit is no failure: the
    JIT compiles what it left."""
    thread.join()
    ok = len(results) == len(logs)
    for log, (rc, timed_out) in zip(logs, results):
        print("".join(log.read_text().splitlines(keepends=True)[-12:]) if log.exists() else "", end="")
        state = "TIMED OUT (the JIT compiles the rest)" if timed_out else "finished" if rc == 0 else "FAILED"
        print(f"warming Triton's cache ({log.name}): {state} (exit status {rc})", flush=True)
        ok = ok and (rc == 0 or timed_out)
    print(f"cache: {_cache_dir()}, {_cache_entries()} entries\n", flush=True)
    return ok


def _cache_dir() -> Path:
    from aru_kernels.aot import cache_dir

    return Path(cache_dir())


def _cache_entries() -> int:
    """Kernels in Triton's cache: the directories holding a compiled binary (``.cubin``;
    not the launchers' C modules, which the cache holds too)."""
    d = _cache_dir()
    return sum(1 for e in d.iterdir() if e.is_dir() and any(e.glob("*.cubin"))) if d.is_dir() else 0


def bench_command(json_path: Path, impls: str, layers: bool, on_gpu: bool, time_limit: float,
                  extra: tuple = ()) -> list[str]:
    """A ``benchmarks/run.py`` command (``extra``: arguments that override the defaults here)."""
    # (on CPU the re-run after tuning checks the plumbing only: inference, no layers)
    mode = "both" if on_gpu or layers else "infer"
    bench = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--mode", mode, "--impl", impls,
             "--json", str(json_path), "--layers" if layers else "--no-layers"]
    if on_gpu:
        bench += ["--model", *gpu_models(), "--batch-size", "256", "--img-size", "224",
                  "--dtype", "bfloat16", "--channels-last", "--warmup", "5", "--iters", "10"]
    else:  # the script itself, in a minute: the fused kernels run in the interpreter
        bench += ["--model", "resnext29_tiny", "--img-size", "16", "--warmup", "0", "--iters", "1", "--interpret"]
    return bench + ["--time-limit", str(time_limit), *extra]


def benchmark(args, start: float, json_path: Path, impls: str, *, layers: bool, on_gpu: bool, tag: str,
              share: float, extra: tuple = ()) -> bool:
    """One benchmarks/run.py call within ``share`` of the budget left (``extra``: arguments
    that override the defaults here); True when it finished cleanly."""
    left = (args.budget - (time.monotonic() - start)) * share
    bench = bench_command(json_path, impls, layers, on_gpu, max(left - _ROW_MARGIN_S, 0), extra)
    cached = _cache_entries()
    rc, timed_out = run_logged(bench, args.outdir / f"benchmark_{tag}.log", max(left, 1))
    ok = rc == 0 and not timed_out
    state = "finished" if ok else "TIMED OUT (partial results)" if timed_out else f"FAILED (exit status {rc})"
    print(f"\nbenchmark: {state}; results: {json_path if json_path.exists() else 'none written'}")
    print(f"  Triton's JIT compiled {_cache_entries() - cached} kernels the cache did not hold")
    if json_path.exists():
        data = json.loads(json_path.read_text())
        for table, value in (("models", "img_per_s"), ("layers", "us")):
            measured = sum(row[value] is not None for row in data[table])
            print(f"  {table}: {measured} of {len(data[table])} rows measured")
    return ok


if __name__ == "__main__":
    sys.exit(main())
