"""A GPU run's figures beside their predictions and the bars to beat, as tables for NOTES.md.

    python benchmarks/compare.py benchmarks/results/gpu_check_nvidia_h200_2026-12-08.json
    python benchmarks/compare.py RUN_tuned.json --first RUN.json   # a fused-only re-run beside RUN's eager rows

Reads a ``benchmarks/run.py`` JSON and the static model's reports of the same
steps (``benchmarks/results/static_<arch>_*.json``: ``aot_check.py``, and
``aot_check.py --layers`` for the layer table) and prints, in Markdown:

* the layer table: each grouped 3x3 layer's fused time per pass, cuDNN's in the
  same run (the conv alone, and conv + batch norm + ReLU), the static floor,
  measured / floor, and the bar: the fused forward faster than cuDNN's conv
  alone (stage 1 at least twice as fast), the fused backward faster than the
  conv's own input and weight gradients;
* the model rows: images/s of the fused model, of eager PyTorch and of
  ``torch.compile`` in the same run (where the run has no ``compile`` row and
  ran on the baseline's GPU, the baseline's figure, marked), the static ceiling
  (the batch over the step's floor), and the bars: fused at least
  ``torch.compile``; in training, peak memory at most 0.8x eager's; on the
  baseline's GPU, the moonshots (resnext50_32x4d at resnet50's compiled figures).
  A re-run of fused rows alone (after tuning, or under ``--recompute-normalized``)
  takes the eager and ``torch.compile`` figures of a first run of the same GPU and
  step (``--first``), marked.

Floors are the static model's, an H200's, but for their DRAM part, taken at the
run's own copy bandwidth (``copy_TBps``), as ``profile_kernels.py`` takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_kernels import card_floor_us  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Measured 2026-11-28 on an NVIDIA H200 (torch 2.11.0+cu130, cuDNN 9.19): bf16 autocast,
# channels_last, batch 256 (NOTES.md, "Baseline figures to beat").
BASELINE_GPU = "NVIDIA H200"
BASELINE_LAYERS = {"s1_g32w4": {"fwd": 353.1, "bwd": 880.6}, "s2_g32w8": {"fwd": 191.5, "bwd": 348.8},
                   "s3_g32w16": {"fwd": 71.1, "bwd": 169.5}, "s4_g32w32": {"fwd": 44.8, "bwd": 142.5}}
BASELINE_MODELS = {("resnext50_32x4d", "infer"): {"eager": 12625, "compile": 18044},
                   ("resnext50_32x4d", "train"): {"eager": 3691, "compile": 5254},
                   ("resnet50", "infer"): {"eager": 15434, "compile": 23190},
                   ("resnet50", "train"): {"eager": 4688, "compile": 6840}}
# The moonshots, on the baseline's GPU: resnext50_32x4d at what torch.compile gives resnet50 (the
# same FLOPs without groups)
MOONSHOTS = {("resnext50_32x4d", "infer"): 23190, ("resnext50_32x4d", "train"): 6840}
PEAK_BAR = 0.8  # training peak memory, a fraction of eager's
# A row whose host time (run.py's host_us / host_ms: launching alone) is this share of its measured
# time or more is marked host-bound: the GPU waited for the launches, and the time is the host's.
HOST_BOUND = 0.9
STAGE1_FWD_BAR = 2.0  # the stage-1 forward's speed-up over cuDNN's conv alone


def _floor_us(kernels: list[dict], scale: float) -> float:
    return sum(k["launches"] * card_floor_us(k, scale) for k in kernels if "error" not in k)


def _fmt(v, spec: str = ".1f") -> str:
    return format(v, spec) if v is not None else "-"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "**not met**"


def _host_bound(measured: float | None, host: float | None, unit: str, who: str = "host") -> list[str]:
    """``["host-bound: ..."]`` where the host's time reaches :data:`HOST_BOUND` of the measured, else ``[]``."""
    if measured and host is not None and host >= HOST_BOUND * measured:
        return [f"{who}-bound: {host:.1f} {unit} to launch"]
    return []


def layer_table(run: dict, static: dict | None, scale: float) -> list[str]:
    us = {(r["layer"], r["pass"], r["impl"]): r["us"] for r in run["layers"]}
    host = {(r["layer"], r["pass"], r["impl"]): r.get("host_us") for r in run["layers"]}
    floors = {(r["layer"], r["pass"]): _floor_us(r["kernels"], scale) for r in (static or {}).get("layers", [])}
    lines = ["| layer | pass | fused us | cudnn us | cudnn_conv us | floor us | x floor | vs cudnn_conv | bar |",
             "|---|---|---|---|---|---|---|---|---|"]
    for layer, pass_ in dict.fromkeys((r["layer"], r["pass"]) for r in run["layers"]):
        fused, conv = us.get((layer, pass_, "fused")), us.get((layer, pass_, "cudnn_conv"))
        floor = floors.get((layer, pass_))
        speedup = conv / fused if fused and conv else None
        ok = None
        if speedup is not None:
            ok = speedup >= (STAGE1_FWD_BAR if (layer, pass_) == ("s1_g32w4", "fwd") else 1.0) * (1 + 1e-12)
        lines.append(f"| {layer} | {pass_} | {_fmt(fused)} | {_fmt(us.get((layer, pass_, 'cudnn')))} | "
                     f"{_fmt(conv)} | {_fmt(floor)} | {_fmt(fused / floor if fused and floor else None, '.2f')} | "
                     f"{_fmt(speedup, '.2f')} | {_verdict(ok)}"
                     + "".join(f" ({m})" for m in _host_bound(fused, host.get((layer, pass_, "fused")), "us")
                               + _host_bound(conv, host.get((layer, pass_, "cudnn_conv")), "us", "cuDNN host"))
                     + " |")
    return lines


def model_table(run: dict, statics: dict, scale: float, first: dict | None = None) -> list[str]:
    rows = {(r["model"], r["mode"], r["impl"]): r for r in run["models"]}
    others = {(r["model"], r["mode"], r["impl"]): r for r in (first or {}).get("models", [])}
    on_baseline_gpu = run.get("gpu") == BASELINE_GPU
    lines = ["| model | mode | fused img/s | eager | torch.compile | static ceiling | fused / compile | "
             "peak GiB, fused / eager | bars |", "|---|---|---|---|---|---|---|---|---|"]

    def measured(model: str, mode: str, impl: str, value: str) -> tuple[float | None, str]:
        """This run's figure, else the first run's (marked)."""
        if rows.get((model, mode, impl), {}).get(value) is not None:
            return rows[model, mode, impl][value], ""
        other = others.get((model, mode, impl), {}).get(value)
        return other, (" (first run)" if other is not None else "")

    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in run["models"]):
        fused = rows.get((model, mode, "fused"), {}).get("img_per_s")
        eager, eager_mark = measured(model, mode, "eager", "img_per_s")
        compiled, mark = measured(model, mode, "compile", "img_per_s")
        if compiled is None and on_baseline_gpu and (model, mode) in BASELINE_MODELS:
            compiled, mark = BASELINE_MODELS[model, mode]["compile"], " (baseline)"
        static = statics.get((model, mode))
        ceiling = run["batch_size"] / (_floor_us(static["kernels"], scale) * 1e-6) if static else None
        bars = []
        if fused and compiled:
            bars.append(f"vs compile {_verdict(fused >= compiled)}")
        peak = rows.get((model, mode, "fused"), {}).get("peak_mem_GiB")
        eager_peak, peak_mark = measured(model, mode, "eager", "peak_mem_GiB")
        peak_ratio = peak / eager_peak if peak and eager_peak else None
        if mode == "train" and peak_ratio is not None:
            bars.append(f"peak {_verdict(peak_ratio <= PEAK_BAR)}")
        if fused and on_baseline_gpu and (model, mode) in MOONSHOTS:
            bars.append(f"moonshot {MOONSHOTS[model, mode]:,} {_verdict(fused >= MOONSHOTS[model, mode])}")
        if fused:
            bars += _host_bound(run["batch_size"] / fused * 1e3, rows[model, mode, "fused"].get("host_ms"), "ms a step")
        lines.append(f"| {model} | {mode} | {_fmt(fused, ',.0f')} | {_fmt(eager, ',.0f')}{eager_mark} | "
                     f"{_fmt(compiled, ',.0f')}{mark} | {_fmt(ceiling, ',.0f')} | "
                     f"{_fmt(fused / compiled if fused and compiled else None, '.2f')} | "
                     f"{_fmt(peak, '.2f')} / {_fmt(eager_peak, '.2f')}{peak_mark} ({_fmt(peak_ratio, '.2f')}) | "
                     f"{'; '.join(bars) or '-'} |")
    return lines


_SAME_STEP = ("gpu", "dtype", "batch_size", "img_size", "channels_last")


def compare(run: dict, results: Path = RESULTS, arch: int = 90, first: dict | None = None) -> str:
    """The Markdown report of ``run`` (a ``benchmarks/run.py`` JSON); ``first``, a run of the
    same GPU and step, gives the figures ``run`` has no row for (eager's, torch.compile's)."""
    def load(name: str) -> dict | None:
        path = results / f"static_{arch}_{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def same_step(report: dict | None) -> dict | None:  # the static floors of the run's batch, size and step only
        key = ("img_size", "batch_size", "recompute_normalized")
        got = tuple((report or {}).get(k, False) for k in key)
        return report if got == (run.get("img_size", 224), run["batch_size"], run.get("recompute_normalized", False)) \
            else None

    if first is not None and any(first.get(k) != run.get(k) for k in _SAME_STEP):
        first = None  # another GPU or step: its figures are not comparable
    layers = same_step(load("layers"))
    reference = layers or next(iter(filter(None, (load(f"{m}_{d}") for m, d in BASELINE_MODELS))), None)
    scale = (reference["gpu_profile"]["copy_TBps"] / run["copy_TBps"]
             if reference and run.get("copy_TBps") else 1.0)
    statics = {}
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in run["models"]):
        report = same_step(load(f"{model.removeprefix('timm:')}_{mode}"))
        if report is not None and report.get("model") == model:
            statics[model, mode] = report
    out = [f"{run['gpu']}, torch {run['torch']}, triton {run['triton']}, {run['dtype']}, batch {run['batch_size']}, "
           f"copy {_fmt(run.get('copy_TBps'), '.3f')} TB/s, {run['date']} (static floors: sm_{arch}, DRAM part "
           f"x{scale:.3f} for this card's copy bandwidth)"
           + (", normalized inputs recomputed" if run.get("recompute_normalized") else ""), ""]
    if run["layers"]:
        out += layer_table(run, layers, scale) + [""]
    if run["models"]:
        out += model_table(run, statics, scale, first)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a benchmarks/run.py JSON (e.g. gpu_check_<gpu>_<date>.json)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the static reports are")
    ap.add_argument("--arch", type=int, default=90, help="the static reports' architecture (default 90)")
    ap.add_argument("--first", type=Path, help="a run of the same GPU and step whose eager and torch.compile "
                                                "rows stand in for those RUN lacks")
    args = ap.parse_args(argv)
    for path in (args.run, args.first):
        if path is not None and not path.exists():
            ap.error(f"no such file: {path}")
    first = json.loads(args.first.read_text()) if args.first else None
    print(compare(json.loads(args.run.read_text()), args.results, args.arch, first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
