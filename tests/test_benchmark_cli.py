"""benchmarks/run.py as users and other tools meet it: its JSON schema and its argument errors.

The benchmark runs as a subprocess in its tiny CPU configuration (CUDA hidden,
so the test means the same on any machine); argument errors are checked
in-process through its ``main``.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

from aru_kernels import plans

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"

TOP_LEVEL = {"gpu", "torch", "triton", "date", "dtype", "batch_size", "img_size", "channels_last",
             "recompute_normalized", "copy_TBps", "models", "layers"}
MODEL_ROW = {"model", "mode", "impl", "img_per_s", "peak_mem_GiB", "first_step_s", "host_ms", "failed", "note"}
LAYER_ROW = {"layer", "impl", "pass", "us", "frac_of_copy_bw", "host_us", "failed", "note"}
LAYERS = {"s1_g32w4", "s2_g32w8", "s3_g32w16", "s4_g32w32"}


@pytest.fixture(scope="module")
def run_py():
    spec = importlib.util.spec_from_file_location("aru_benchmark_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"aru_benchmark_{name}", RUN_PY.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny CPU run of resnet18, eager only, infer and train, with the layer table."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "--impl", "eager", "--model", "resnet18", "--mode", "both",
         "--warmup", "0", "--iters", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"run.py exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout, json.loads(out.read_text()), out


def test_cpu_run_says_timings_are_not_representative(cpu_run):
    stdout, _, _ = cpu_run
    assert "not representative" in stdout


def test_json_top_level_fields(cpu_run):
    _, data, _ = cpu_run
    assert set(data) == TOP_LEVEL
    assert data["gpu"] == "cpu"
    assert isinstance(data["torch"], str) and data["torch"]
    assert data["triton"] is None or isinstance(data["triton"], str)
    datetime.datetime.fromisoformat(data["date"])
    assert data["dtype"] == "float32"
    assert data["batch_size"] == 2 and data["img_size"] == 64
    assert data["channels_last"] is True
    assert data["recompute_normalized"] is False
    assert data["copy_TBps"] > 0


def test_recompute_normalized_applies_to_the_training_forward(run_py):
    """``--recompute-normalized``: the training step's forward runs under
    ``aru_kernels.recompute_normalized_inputs`` (the backward then recomputes the
    3x3s' normalized inputs); without it, not."""
    import torch
    from aru_kernels import block_ops

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, run_py.NUM_CLASSES)

        def forward(self, x):
            seen.append(getattr(block_ops._options, "recompute", False))
            return self.fc(x.mean((2, 3)))

    for flag in (True, False):
        cfg = run_py.Config(device=torch.device("cpu"), dtype=torch.float32, batch_size=2, img_size=8,
                            channels_last=True, warmup=0, iters=1, seed=0, deadline=None, recompute_normalized=flag)
        run_py.ModelBench("probe", cfg).step(Probe(), "train")()
        assert seen.pop() is flag


def test_json_model_rows(cpu_run):
    _, data, _ = cpu_run
    for row in data["models"]:
        assert set(row) == MODEL_ROW, f"model row fields: {sorted(row)}"
    assert [(r["model"], r["mode"], r["impl"]) for r in data["models"]] == [
        ("resnet18", "infer", "eager"), ("resnet18", "train", "eager")]
    for row in data["models"]:
        assert row["img_per_s"] > 0, row
        assert row["first_step_s"] >= 0, row  # the first call, timed on its own
        assert row["peak_mem_GiB"] is None, "peak memory is reported only on CUDA"
        assert row["failed"] is False and row["note"] == "", row


def test_json_layer_rows(cpu_run):
    """Each layer's eager rows: the inference forward with ``infer``, the training forward and
    backward with ``train`` (the conv alone too in ``fwd`` and ``bwd``, the baseline's figures)."""
    _, data, _ = cpu_run
    for row in data["layers"]:
        assert set(row) == LAYER_ROW, f"layer row fields: {sorted(row)}"
    assert [(r["layer"], r["pass"], r["impl"]) for r in data["layers"]] == [
        (layer, pass_, impl) for layer in sorted(LAYERS, key=lambda n: int(n[1]))
        for pass_, impl in (("fwd", "cudnn"), ("fwd", "cudnn_conv"), ("train_fwd", "cudnn"), ("bwd", "cudnn"),
                            ("bwd", "cudnn_conv"))]
    for row in data["layers"]:
        assert row["us"] > 0, row
        assert 0 < row["frac_of_copy_bw"], row


def _planted(real, *, output: float = 1.0, weight_grad: float = 1.0):
    """``aru_kernels.conv_bn_train`` with its output scaled (not the gradient through it), or
    the weight's gradient."""
    import torch

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return g * weight_grad

    def conv_bn_train(x, weight, *args, **kwargs):
        y, *vectors = real(x, ScaleGrad.apply(weight), *args, **kwargs)
        return (y + (output - 1) * y.detach(), *vectors)
    return conv_bn_train


def test_layer_training_rows_are_checked_against_float32(run_py, monkeypatch):
    """The layer table's fused training rows (through the interpreter here) are timed and
    checked against float32 PyTorch on the same inputs: its forward results, and every
    gradient of its backward. A planted wrong output fails the forward's row only; a
    planted wrong weight gradient, the backward's only."""
    import torch

    cfg = run_py.Config(device=torch.device("cpu"), dtype=torch.float32, batch_size=2, img_size=32,
                        channels_last=True, warmup=0, iters=1, seed=0, deadline=None)
    shape = run_py.LAYER_SHAPES[0]
    layer = run_py.GroupedConvLayer(shape, run_py.layer_size(shape, cfg.img_size), cfg)
    assert run_py.layer_impls(["eager", "fused"], "bwd") == ["cudnn", "cudnn_conv", "fused"]

    def rows():
        measured = []
        for pass_ in ("train_fwd", "bwd"):
            row = run_py.LayerRow(shape.name, "fused", pass_)
            run_py.measure_layer(row, layer, cfg, copy_TBps=1.0)
            measured.append(row)
        return measured

    for row in rows():
        assert row.us > 0 and not row.failed and row.note == "", row
    real = run_py.aru_kernels.conv_bn_train
    for planted, wrong in (({"output": 1.5}, "train_fwd"), ({"weight_grad": 1.5}, "bwd")):
        monkeypatch.setattr(run_py.aru_kernels, "conv_bn_train", _planted(real, **planted))
        for row in rows():
            assert row.failed is (row.pass_ == wrong), (planted, row)
            assert row.note.startswith("WRONG RESULT") is (row.pass_ == wrong), (planted, row)
        monkeypatch.setattr(run_py.aru_kernels, "conv_bn_train", real)


def test_layer_table_recording_launches_what_the_table_launches(run_py):
    """The layer table's fused rows recorded on the meta device (``aot_check.record_layers``:
    the static model's per-layer floors, the cache warm-up's ``--layers``) make the very
    launches of the table run on real tensors (here CPU tensors, recorded, not run)."""
    import torch
    from aru_kernels.launch import recording
    from helpers import launch_signatures, static_model

    aot_check = static_model()
    cfg = run_py.Config(device=torch.device("cpu"), dtype=torch.bfloat16, batch_size=2, img_size=64,
                        channels_last=True, warmup=0, iters=1, seed=0, deadline=None)
    real = {}
    for shape in run_py.LAYER_SHAPES:
        layer = run_py.GroupedConvLayer(shape, run_py.layer_size(shape, cfg.img_size), cfg)
        with recording() as launches:
            layer.fused()
        real[shape.name, "fwd"] = launches
        with recording() as launches:
            _, backward = layer.train_step("fused")
        real[shape.name, "train_fwd"] = launches
        with recording() as launches:
            backward()
        real[shape.name, "bwd"] = launches
    recorded = aot_check.record_layers(2, 64, torch.bfloat16)
    assert list(recorded) == list(real)
    for key, rec in recorded.items():
        assert len(real[key]) >= 1, key
        assert launch_signatures(rec.launches) == launch_signatures(real[key]), key
    backward_only = aot_check.record_layers(2, 64, torch.bfloat16, passes=("bwd",))
    assert list(backward_only) == [(s.name, "bwd") for s in run_py.LAYER_SHAPES]
    for key, rec in backward_only.items():
        assert launch_signatures(rec.launches) == launch_signatures(real[key]), key


def test_from_json_reprints_without_measuring(cpu_run, run_py, capsys):
    _, _, path = cpu_run
    assert run_py.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "s4_g32w32" in out
    # a CPU run's layer table says its cuDNN rows ran PyTorch's CPU kernels; a GPU run's does not
    assert out.count(run_py.CPU_LAYERS_NOTE) == 1
    on_gpu = path.parent / "on_gpu.json"
    on_gpu.write_text(json.dumps(dict(json.loads(path.read_text()), gpu="NVIDIA H200")))
    assert run_py.main(["--from-json", str(on_gpu)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "s4_g32w32" in out and run_py.CPU_LAYERS_NOTE not in out

    other = path.parent / "other.json"
    other.write_text(json.dumps({"rows": []}))  # JSON, but not run.py's
    assert run_py.main(["--from-json", str(other)]) == 2
    assert f"--from-json {other} is not a results file of run.py (KeyError" in capsys.readouterr().err


def test_fused_rows_and_a_wrong_result_exits_nonzero(run_py, tmp_path, monkeypatch, capsys):
    """Fused model and layer rows through the interpreter (in-process: the test
    session runs it); a layer whose fused result is planted wrong is marked in
    the JSON, measured nothing, and the run exits 1. (The training rows run in
    ``test_gpu_protocol_cpu_mode``.)"""
    real = run_py.GroupedConvLayer.fused
    monkeypatch.setattr(run_py.GroupedConvLayer, "fused", lambda layer: real(layer) * 1.5)
    out = tmp_path / "fused.json"
    code = run_py.main(["--impl", "eager,fused", "--model", "resnext29_tiny", "--mode", "infer", "--img-size", "16",
                        "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert code == 1, capsys.readouterr().out
    data = json.loads(out.read_text())
    fused_models = [r for r in data["models"] if r["impl"] == "fused"]
    assert [r["mode"] for r in fused_models] == ["infer"]
    for row in fused_models:  # the models' path is untouched: measured and right
        assert row["img_per_s"] > 0 and not row["failed"] and row["note"] == "", row
    fused_layers = [r for r in data["layers"] if r["impl"] == "fused"]
    assert {r["layer"] for r in fused_layers} == LAYERS
    for row in fused_layers:
        assert row["failed"] is True and row["note"].startswith("WRONG RESULT"), row
        assert row["us"] is None and row["frac_of_copy_bw"] is None, row
    assert "gave wrong results" in capsys.readouterr().out


def test_external_models_by_prefix(run_py, tmp_path, monkeypatch):
    """tv-detection:NAME benchmarks a torchvision FPN backbone fused with aru_models.fuse
    (its fused output checked against eager's); a timm model where timm is not installed is
    a row with a note, not a crash."""
    pytest.importorskip("torchvision")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails
    out = tmp_path / "external.json"
    code = run_py.main(["--impl", "eager,fused", "--model", "tv-detection:resnet18", "timm:no_such_model",
                        "--mode", "infer", "--img-size", "16", "--warmup", "0", "--iters", "1", "--no-layers",
                        "--json", str(out)])
    assert code == 0
    rows = {(r["model"], r["impl"]): r for r in json.loads(out.read_text())["models"]}
    for impl in ("eager", "fused"):
        row = rows[("tv-detection:resnet18", impl)]
        assert row["img_per_s"] > 0 and not row["failed"] and row["note"] == "", row
        missing = rows[("timm:no_such_model", impl)]
        assert missing["img_per_s"] is None and "needs timm" in missing["note"], missing


def test_a_time_limit_of_zero_starts_no_row(run_py, tmp_path):
    """What ``gpu_check.py`` passes when its budget is spent: every row reported, none measured."""
    out = tmp_path / "none.json"
    assert run_py.main(["--time-limit", "0", "--model", "resnext29_tiny", "--impl", "eager", "--mode", "infer",
                        "--no-layers", "--img-size", "16", "--warmup", "0", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    assert len(rows) == 1 and rows[0]["img_per_s"] is None and "--time-limit reached" in rows[0]["note"], rows


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--impl", "eager,cudnn"], "unknown impl 'cudnn'"),
    (["--mode", "eval"], "invalid choice: 'eval'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--impl", ","], "--impl names none"),
    (["--model", ""], "--model names none"),
    (["--time-limit", "-5"], "--time-limit must be at least 0; got -5.0"),
    (["--from-json", "/no/such/results.json"], "--from-json /no/such/results.json: no such file"),
    (["--model", "tv-detection:resnet9000"], "unknown model 'tv-detection:resnet9000': torchvision's FPN"),
    (["--model", "timm:no_such_model"], "unknown model 'timm:no_such_model': timm 0.0 has no 'no_such_model'"),
], ids=["unknown-model", "unknown-impl", "unknown-mode", "zero-batch", "no-impl", "no-model", "time-limit",
        "from-json", "tv-detection", "timm"])
def test_bad_arguments_exit_nonzero_with_a_message(run_py, capsys, monkeypatch, argv, message):
    # a timm that knows no model (timm itself need not be installed)
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(is_model=lambda name: False, __version__="0.0"))
    with pytest.raises(SystemExit) as exc:
        run_py.main(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_protocol_cpu_mode(tmp_path):
    """benchmarks/gpu_check.py's CPU mode: the cache warmed, benchmark, tune.py --dry-run (every candidate tile
    of resnext29_tiny's conv launches checked against the rules' output through the
    interpreter), the fused rows again; every step's JSON or log written."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(RUN_PY.parent / "gpu_check.py"), str(tmp_path), "--skip-tests", "--budget", "600",
         "--archive", str(tmp_path / "packed" / "check.tar.gz")],
        env=env, capture_output=True, text=True, timeout=900, cwd=RUN_PY.parents[1],
    )
    assert proc.returncode == 0, f"gpu_check.py exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "0 wrong" in proc.stdout and "candidate tiles checked" in proc.stdout
    warmed = re.search(r"compiled (\d+) of (\d+) for sm_90", proc.stdout)  # the cache warmed beside the tests
    assert warmed and warmed[1] == warmed[2] != "0", proc.stdout[-4000:]
    assert "warming Triton's cache (warm_cache_benchmark_cpu_" in proc.stdout and "): finished" in proc.stdout
    assert len(list((tmp_path / "triton").iterdir())) >= int(warmed[1])
    files = {p.name.rsplit("_", 1)[0] if p.suffix == ".log" else p.name for p in tmp_path.iterdir()}
    first = json.loads(next(tmp_path.glob("gpu_check_cpu_*[0-9].json")).read_text())
    tuned = json.loads(next(tmp_path.glob("gpu_check_cpu_*_tuned.json")).read_text())
    assert {r["impl"] for r in first["models"]} == {"eager", "fused"}, files
    assert {r["impl"] for r in tuned["models"]} == {"fused"}
    assert all(r["img_per_s"] for r in first["models"] + tuned["models"])
    compared = next(tmp_path.glob("compare_cpu_*.md")).read_text()  # the summary, of each benchmark's JSON
    assert compared.count("| layer | pass |") == 1 and compared.count("| model | mode |") == 2, compared
    fused_layers = [r for r in first["layers"] if r["impl"] == "fused"]  # interpreted, checked against PyTorch
    assert sorted({r["pass"] for r in fused_layers}) == ["bwd", "fwd", "train_fwd"], first["layers"]
    assert all(r["us"] and not r["failed"] for r in fused_layers), fused_layers
    with tarfile.open(tmp_path / "packed" / "check.tar.gz") as tar:  # every file written, in one archive
        packed = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert packed == written and len(written) >= 7, sorted(packed)


@pytest.mark.slow
def test_tune_dry_run_checks_training_launches():
    """tune.py --dry-run over resnext29_tiny's training step: every candidate tile of every
    conv launch (input gradients through a block end, convs computing the previous block's
    end as they load their input) gives the rules' results, each launch on tensors of its
    own (no argument aliasing the output)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(RUN_PY.parent / "tune.py"), "--dry-run", "--model", "resnext29_tiny", "--mode", "train",
         "--img-size", "32", "--batch-size", "2", "--dtype", "float32"],
        env=env, capture_output=True, text=True, timeout=900, cwd=RUN_PY.parents[1],
    )
    assert proc.returncode == 0, f"tune.py exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "WRONG" not in proc.stdout and ", 0 wrong" in proc.stdout, proc.stdout[-4000:]
    assert "dgrad" in proc.stdout


# Run without TRITON_INTERPRET (the kernels must be the JIT's own): warm the cache, then
# stand in for a CUDA driver of an sm_90 GPU and let the JIT prepare every launch of the
# same step as at its first launch (``warmup``: compile or load, nothing runs).
_JIT_AFTER_WARM = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
import warm_cache
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

step = dict(arch=90, batch=2, img=16, dtype=torch.bfloat16)  # (under autocast, as run.py runs it)
rc = warm_cache.main(["--model", "resnext29_tiny", "--mode", "infer", "--arch", "90", "--batch-size", "2",
                      "--img-size", "16", "--dtype", "bfloat16", "--jobs", "2"])
cache = os.environ["TRITON_CACHE_DIR"]
warmed = set(os.listdir(cache))

class SM90:
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(SM90())
launches = warm_cache.distinct_launches(["resnext29_tiny"], ["infer"], **step)
kernels = [l.kernel.warmup(grid=l.grid, num_warps=l.num_warps, num_stages=l.num_stages, **l.args) for l in launches]
print(json.dumps({"rc": rc, "launches": len(launches), "warmed": len(warmed),
                  "compiled_by_jit": sorted(set(os.listdir(cache)) - warmed),
                  "kernels": len({id(k) for k in kernels if k is not None})}))
"""


@pytest.mark.slow
def test_warm_cache_compiles_what_the_jit_loads(tmp_path):
    """benchmarks/warm_cache.py compiles a step's kernels in parallel into Triton's cache
    under the JIT's own keys: afterwards the JIT, preparing each launch of that step for an
    sm_90 GPU, finds every one there and compiles nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", _JIT_AFTER_WARM, str(RUN_PY.parent)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=RUN_PY.parents[1])
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "compiled 0 of" not in proc.stdout and "FAILED" not in proc.stdout, proc.stdout
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0 and got["launches"] > 5, got
    assert got["warmed"] == got["launches"], got  # one cache entry per specialization
    assert got["kernels"] == got["launches"], got  # the JIT returned a kernel for each
    assert got["compiled_by_jit"] == [], got  # ... from the cache: no entry under another key


@pytest.mark.gpu
def test_warm_cache_builds_the_launchers_the_first_launches_would(tmp_path):
    """Triton 3.6 and older build a C launcher per kernel signature at the first launch (gcc,
    about a second each, inside the first steps' time); warm_cache.py builds them beside the
    kernels, into the same cache."""
    from triton.backends.nvidia import driver

    if not hasattr(driver, "make_launcher"):
        pytest.skip("this Triton launches every kernel through one generic launcher: none to build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(RUN_PY.parent / "warm_cache.py"), "--model", "resnext29_tiny",
                           "--mode", "infer", "--arch", "90", "--batch-size", "2", "--img-size", "32", "--jobs", "4"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=RUN_PY.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    built = int(re.search(r"(\d+) launchers built", proc.stdout)[1])
    modules = list((tmp_path / "cache").glob("*/__triton_launcher*"))
    assert built > 0 and modules, proc.stdout[-2000:]


_TUNE_SPECIALIZATIONS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import tune
from aot_check import record_step
from aru_kernels import aot

recorded = set()
for mode in ("infer", "train"):
    for launch in record_step("resnext29_tiny", "fused", mode, 2, 32, torch.bfloat16, autocast=True).launches:
        if launch.meta.get("plan") is not None:
            recorded.add(aot.launch_key(launch, 90))
plans = tune.conv_launch_plans(["resnext29_tiny"], ["infer", "train"], 2, 32, torch.bfloat16, autocast=True)
tuned = {aot.launch_key(l, 90) for p in plans for l in tune.candidate_launches(p, p.default_tiles(), torch.float32)}
# the tap kernels (resnext50_32x4d's stride-1 grouped 3x3s in training), from their operators
recorded_taps = {aot.launch_key(l, 90) for l in record_step("resnext50_32x4d", "fused", "train", 2, 64, torch.bfloat16,
                                                               autocast=True).launches if "tap" in l.meta}
taps = tune.tap_launches(["resnext50_32x4d"], ["train"], 2, 64, torch.bfloat16, autocast=True)
tuned_taps = {aot.launch_key(l, 90) for t in taps for l in t.launches(t.default_tiles(), torch.float32)
              if l.kernel.fn.__name__.startswith("tap_")}
# a candidate with its registers capped: another specialization, compiled under the cap
grads = next(t for t in taps if t.kind == "tap_grads")
capped = [l for l in grads.launches(tune.TapTiles(64, 2, 128), torch.float32) if "tap" in l.meta][0]
free = [l for l in grads.launches(tune.TapTiles(64, 2), torch.float32) if "tap" in l.meta][0]
free_regs = aot.analyze(aot.compile_launch(free, 90), []).registers
capped_regs = aot.analyze(aot.compile_launch(capped, 90), []).registers
print(json.dumps({"recorded": len(recorded), "tuned": len(tuned), "missing": len(recorded - tuned),
                  "extra": len(tuned - recorded), "recorded_taps": len(recorded_taps),
                  "missing_taps": len(recorded_taps - tuned_taps), "extra_taps": len(tuned_taps - recorded_taps),
                  "cap_keyed": aot.launch_key(capped, 90) != aot.launch_key(free, 90),
                  "registers": [free_regs, capped_regs]}))
"""


def test_tune_compiles_the_models_own_specializations():
    """tune.py compiles and times each candidate on tensors laid out as the model's under
    autocast (float32 channels_last weights, the partial-sum buffers the launch uses): with the
    rules' tiles its launches are the very specializations the model launches, so the
    candidates it compiles (the winners among them) are the ones the tuned model loads. So
    are the tap kernels' (run through their operators). A tap candidate that caps a thread's
    registers is a specialization of its own, compiled under the cap."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _TUNE_SPECIALIZATIONS, str(RUN_PY.parent)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=RUN_PY.parents[1])
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["recorded"] > 10 and got["missing"] == got["extra"] == 0, got
    assert got["recorded_taps"] == 6 and got["missing_taps"] == got["extra_taps"] == 0, got
    assert got["cap_keyed"] and got["registers"][0] > 128 >= got["registers"][1], got


@pytest.fixture(scope="module")
def profile_py():
    return _script("profile_kernels")


def _trace(*kernels) -> dict:
    """A ``torch.profiler`` Chrome trace holding ``kernels`` ((name, grid, us, registers), in
    launch order) as CUDA kernel events, among the events of other kinds a trace also holds."""
    events = [{"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 3, "args": {}},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 1, "dur": 40, "args": {}},
              {"ph": "M", "name": "process_name", "args": {"name": "python"}}]
    for i, (name, grid, us, regs) in enumerate(kernels):
        events.append({"ph": "X", "cat": "kernel", "name": name, "ts": 1000 + 10 * i, "dur": us,
                       "args": {"grid": grid, "block": [128, 1, 1], "registers per thread": regs, "stream": 7}})
    events.reverse()  # not in time order in the file
    return {"traceEvents": events}


def test_profile_sets_each_kernel_beside_its_static_floor(profile_py):
    """benchmarks/profile_kernels.py groups a step's measured kernels by name and grid, as the
    static model groups its rows, and sets each group beside the floor of the static rows with
    the same kernel and grid (a launch's grid of one or two dimensions is the trace's three):
    launches, microseconds, the ratio, registers both ways; PyTorch's kernels have no floor, and
    static rows the step never ran are listed. The DRAM part of the floors follows the card's
    copy bandwidth."""
    def row(kernel, grid, launches, issue, dram, tensor, registers, warps=8):
        return {"kernel": kernel, "grid": grid, "launches": launches, "issue_floor_us": issue, "dram_floor_us": dram,
                "tensor_floor_us": tensor, "floor_us": max(issue, dram, tensor), "registers": registers,
                "num_warps": warps, "shared_bytes": 0}

    static = {"gpu_profile": {"copy_TBps": 4.144, "sms": 132}, "kernels": [
        row("conv_bn_act_kernel", [1568], 2, 10.0, 4.0, 5.0, 90),  # issue-bound, at half the bandwidth too
        row("conv_bn_act_kernel", [1568], 1, 12.0, 20.0, 5.0, 138),  # DRAM-bound
        row("tap_grads_kernel", [8, 66], 1, 180.0, 200.0, 120.0, 255, warps=2),
        row("bn_finalize_kernel", [4], 1, 0.4, 0.02, 0.0, 56),
        {"kernel": "broken_kernel", "grid": [1], "launches": 1, "error": "CompilationError: ..."}]}
    trace = _trace(("conv_bn_act_kernel", [1568, 1, 1], 12.0, 90), ("tap_grads_kernel", [8, 66, 1], 300.0, 255),
                   ("conv_bn_act_kernel", [1568, 1, 1], 13.0, 90), ("conv_bn_act_kernel", [1568, 1, 1], 30.0, 138),
                   ("void at::native::vectorized_elementwise_kernel<4>", [100, 1, 1], 5.0, 16))
    events = profile_py.kernel_events(trace)
    assert [e["kernel"] for e in events][:2] == ["conv_bn_act_kernel", "tap_grads_kernel"]  # in time order
    report = profile_py.join(events, static)
    rows = {(r["kernel"], tuple(r["grid"])): r for r in report["kernels"]}
    assert [r["kernel"] for r in report["kernels"]][:2] == ["tap_grads_kernel", "conv_bn_act_kernel"]  # most time
    conv = rows["conv_bn_act_kernel", (1568, 1, 1)]
    assert (conv["launches"], conv["static_launches"], conv["us"], conv["floor_us"]) == (3, 3, 55.0, 40.0)
    assert conv["ratio"] == pytest.approx(1.375) and conv["registers"] == conv["static_registers"] == [90, 138]
    tap = rows["tap_grads_kernel", (8, 66, 1)]
    assert tap["ratio"] == pytest.approx(1.5) and tap["static_registers"] == [255]
    # warps a multiprocessor holds, the fewest of the group's rows; the floor that binds, by weight
    assert (tap["warps_per_sm"], tap["bound"], conv["warps_per_sm"]) == (8, "dram", 8)
    alone = {**static, "kernels": [row("bn_relu_kernel", [1], 1, 5.0, 1.0, 0.0, 32, warps=4)]}
    lone_events = profile_py.kernel_events(_trace(("bn_relu_kernel", [1, 1, 1], 7.0, 32)))
    (lone,) = profile_py.join(lone_events, alone)["kernels"]
    assert (lone["warps_per_sm"], lone["bound"]) == (4, "issue")  # one program of 4 warps
    torch_kernel = rows["void at::native::vectorized_elementwise_kernel<4>", (100, 1, 1)]
    assert torch_kernel["floor_us"] is None and torch_kernel["ratio"] is None
    assert [(u["kernel"], u["floor_us"]) for u in report["unseen_static"]] == [("bn_finalize_kernel", 0.4)]
    assert (report["total_us"], report["matched_us"]) == (360.0, 355.0)
    assert (report["matched_floor_us"], report["static_floor_us"]) == (240.0, 240.4)
    text = profile_py.format_report(report)
    assert "tap_grads_kernel" in text and "1.50" in text and "static rows with no kernel" in text
    assert profile_py.join(events, None)["kernels"][0]["floor_us"] is None  # no static report: times only
    # on a card copying at half the H200's bandwidth, the DRAM floors double (issue floors stay)
    half = {(r["kernel"], tuple(r["grid"])): r for r in profile_py.join(events, static, copy_TBps=2.072)["kernels"]}
    assert half["conv_bn_act_kernel", (1568, 1, 1)]["floor_us"] == 2 * 10.0 + 40.0
    assert half["tap_grads_kernel", (8, 66, 1)]["floor_us"] == 400.0
    assert half["conv_bn_act_kernel", (1568, 1, 1)]["bound"] == "dram"  # 40 us of DRAM against 20 of issue


def test_profile_refuses_another_steps_floors_and_a_machine_without_gpu(profile_py, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        profile_py.main(["--model", "resnet9000"])
    assert exc.value.code == 2 and "unknown model 'resnet9000'" in capsys.readouterr().err
    static = tmp_path / "static.json"
    static.write_text(json.dumps({"model": "resnet50", "mode": "train", "batch_size": 256, "img_size": 224,
                                  "dtype": "bfloat16", "kernels": []}))
    with pytest.raises(SystemExit) as exc:
        profile_py.main(["--model", "resnext50_32x4d", "--static", str(static)])
    assert exc.value.code == 2 and "model 'resnet50' (here 'resnext50_32x4d')" in capsys.readouterr().err
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the profile would run")
    with pytest.raises(SystemExit) as exc:
        profile_py.main(["--model", "resnet50", "--static", str(static)])
    assert exc.value.code == 2 and "none is present" in capsys.readouterr().err


def test_gpu_protocol_profiles_against_the_committed_static_reports(tmp_path, capsys):
    """The GPU protocol's profile step (GPU only) runs profile_kernels.py over resnext50_32x4d's
    inference forward and training step with the committed static report of each for the GPU's
    architecture: here the script gets as far as wanting a GPU, so those reports are the same
    steps as the profile's (model, mode, batch, size, dtype)."""
    import argparse
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the profile would run (tested by the protocol itself)")
    spec = importlib.util.spec_from_file_location("aru_gpu_check", RUN_PY.parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.profile(argparse.Namespace(outdir=tmp_path), "test", {"capability": "9.0"}, 300) is False
    out = capsys.readouterr().out
    for mode in ("infer", "train"):
        assert f"static_90_resnext50_32x4d_{mode}.json" in out, out
        log = (tmp_path / f"profile_test_{mode}.log").read_text()
        assert "none is present" in log and "describes another step" not in log, log


def test_gpu_protocol_stopped_kills_the_step_in_flight_and_still_packs(tmp_path):
    """A SIGTERM to the GPU protocol (a machine taken back, a command's time limit) stops the
    step in flight with every process it started (each step runs in a session of its own, which
    outlives its parent otherwise), and the check still writes its summary and archive."""
    script = tmp_path / "stop.py"
    script.write_text(f"""
import importlib.util, os, signal, sys, threading, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("aru_gpu_check", {str(RUN_PY.parent / "gpu_check.py")!r})
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
out = Path(sys.argv[1])

def checks(args, start, tag, on_gpu, info, steps_ok, pack):
    (out / "gpu_check_cpu_x.json").write_text("{{}}")
    pack()
    threading.Timer(2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    gpu_check.run_logged(["sh", "-c", "echo $$ > " + str(out / "step.pid") + "; exec sleep 120"],
                         out / "step.log", 300)
    steps_ok.append(True)
    return True

gpu_check.checks = checks
t0 = time.monotonic()
rc = gpu_check.main([str(out), "--archive", str(out.parent / "check.tar.gz")])
print("rc", rc, "seconds", round(time.monotonic() - t0))
""")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120,
                          cwd=RUN_PY.parents[1], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert "stopped by SIGTERM" in proc.stdout and "rc 1 seconds" in proc.stdout, proc.stdout + proc.stderr
    assert int(proc.stdout.split("seconds")[-1]) < 60
    pid = int((out / "step.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the step's sleep is gone, not re-parented and running on
        for _ in range(50):
            os.kill(pid, 0)
            __import__("time").sleep(0.1)
    with tarfile.open(tmp_path / "check.tar.gz") as tar:
        assert {"gpu_check_cpu_x.json", "step.log", "step.pid"} <= set(tar.getnames()), tar.getnames()


@pytest.fixture(scope="module")
def tune_py():
    sys.path.insert(0, str(RUN_PY.parent))
    import tune

    return tune


def test_tune_keeps_the_rules_unless_a_candidate_beats_them_by_the_margin(tune_py):
    """A candidate is written only where its median beats the rules' tiles by ``TUNE_MARGIN``:
    a tie within the timing noise keeps the rules (and a table of noise is never credited)."""
    rule, a, b = "rule", "a", "b"
    margin = tune_py.TUNE_MARGIN
    assert margin > 0
    assert tune_py.winner({rule: 100.0, a: 100.0 * (1 - margin / 2), b: 101.0}, rule) is None
    assert tune_py.winner({rule: 100.0, a: 100.0 * (1 - 2 * margin), b: 90.0}, rule) == b
    assert tune_py.winner({a: 1.0}, rule) is None  # the rules themselves untimed: nothing to beat


def test_tune_writes_its_table_whole_or_not_at_all(tune_py, tmp_path, monkeypatch):
    """The tuned table is replaced whole: a write stopped midway (a tuning run killed at its
    budget) leaves the previous table, which the launchers can still read."""
    path = tmp_path / "gpu.json"
    tune_py.write_table({"entries": {"k": 1}}, path)
    real = Path.write_text

    def half_then_killed(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        tune_py.write_table({"entries": {"k": 2, "other": 3}}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"entries": {"k": 1}}


def test_tune_dry_run_checks_the_tap_kernels_candidates(tune_py, monkeypatch, capsys):
    """tune.py also tunes the tap kernels (the stride-1 grouped 3x3s' training forward and both
    gradients): its dry run takes each candidate (pixels a step, warps) through the
    operator with the candidate as a tuned entry, on a problem several steps long, and
    compares it with the rules' result. A candidate that computes wrong (planted: the last
    step of each split dropped at 32 pixels a step) is reported, and the dry run fails."""
    import torch

    taps = tune_py.tap_launches(["resnext50_32x4d"], ["train"], 2, 64, torch.bfloat16, autocast=True)
    assert sorted(t.kind for t in taps) == ["tap_forward"] * 3 + ["tap_grads"] * 3
    assert all(tune_py.TapTiles(32, 2) in t.candidates() or t.kind == "tap_forward" for t in taps)
    assert tune_py.dry_run([], torch.float32, taps=taps) == 0
    assert "0 wrong" in capsys.readouterr().out
    real = plans.WgradPlan.m_per_split
    monkeypatch.setattr(plans.WgradPlan, "m_per_split",
                        property(lambda p: real.fget(p) - (p.block_m if p.block_m == 32 else 0)))
    assert tune_py.dry_run([], torch.float32, taps=taps) == 1
    out = capsys.readouterr().out
    assert out.count("WRONG: tap_grads|") == 3 and "block_m=32" in out, out


def test_tune_times_a_tap_candidate_as_its_operator_launches_it(tune_py):
    """The tuner times a tap-kernel candidate by the launches its operator makes, recorded
    once on each set of inputs and then launched as they are: those launches compute what
    the operator computes (here through the interpreter)."""
    import torch
    from aru_kernels.launch import recording

    (tap,) = [t for t in tune_py.tap_launches(["resnext50_32x4d"], ["train"], 2, 64, torch.bfloat16, autocast=True)
              if t.kind == "tap_grads" and t.conv.c_in == 256]
    small = tap.scaled_down()
    args = small.inputs(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    tiles = tune_py.TapTiles(32, 2)
    dw, dx, _ = small.run(tiles, args)
    with recording() as launches:
        small.run(tiles, args)
    assert [l.kernel.fn.__name__ for l in launches] == ["tap_grads_kernel", "wgrad_slab_sum_kernel"]
    assert launches[0].args["BLOCK_M"] == 32 and launches[0].num_warps == 2
    written = (launches[0].args["dx_ptr"], launches[1].args["out_ptr"])
    for t in written:
        t.fill_(float("nan"))
    tune_py.relaunch(launches)
    torch.testing.assert_close(written[0], dx)
    torch.testing.assert_close(written[1], dw)


def test_gpu_protocol_commands_parse_as_on_a_gpu(run_py, tmp_path):
    """The GPU protocol is meant to run once, with no second try: every command it composes
    for a GPU (the cache warm-ups, the benchmarks, the profiles, the tuning) is one its script
    accepts, with the options meant (here on CPU, the GPU branch composed by hand)."""
    sys.path.insert(0, str(RUN_PY.parent))
    gpu_check, warm_cache, tune, profile = (_script(n) for n in ("gpu_check", "warm_cache", "tune", "profile_kernels"))
    info = {"capability": "9.0"}

    def parsed(parser, cmd):
        assert cmd[0] == sys.executable
        return parser.parse_args(cmd[2:])

    warm = gpu_check.warm_commands(True, info)
    assert list(warm) == ["tests", "benchmark"]  # the tests' kernels first: they run first
    tests_warm, bench_warm = (parsed(warm_cache.build_parser(), warm[k]) for k in warm)
    assert (tests_warm.batch_size, tests_warm.channels_last, tests_warm.layers) == (8, False, False)
    assert (bench_warm.batch_size, bench_warm.channels_last, bench_warm.layers) == (256, True, True)
    for w in (tests_warm, bench_warm):
        assert (w.arch, w.dtype, w.autocast, w.mode) == (90, "bfloat16", True, ["infer", "train"])
    assert bench_warm.model == gpu_check.gpu_models() and bench_warm.recompute_normalized
    for extra in ((), ("--mode", "train", "--model", "resnext50_32x4d", "--recompute-normalized")):
        cmd = gpu_check.bench_command(tmp_path / "b.json", "eager,fused", True, True, 123.0, extra)
        args = run_py.parse_args(cmd[2:])
        assert (args.batch_size, args.img_size, args.dtype, args.channels_last) == (256, 224, "bfloat16", True)
        assert args.layers and args.time_limit == 123.0 and args.impl == ["eager", "fused"]
        assert args.model == (["resnext50_32x4d"] if extra else gpu_check.gpu_models())
        assert args.mode == (["train"] if extra else ["infer", "train"]) and args.recompute_normalized is bool(extra)
    tuning = parsed(tune.build_parser(), gpu_check.tune_command(True, 60.0))
    assert tuning.budget == 60.0 and not tuning.dry_run and tuning.mode == "both"
    for mode in ("infer", "train"):
        prof = parsed(profile.build_parser(), gpu_check.profile_command(tmp_path, "t", mode, info))
        assert prof.mode == mode and prof.static.name == f"static_90_resnext50_32x4d_{mode}.json"
        assert prof.static.exists() and prof.json == tmp_path / f"profile_t_{mode}.json"


def _gpu_run(gpu: str = "NVIDIA H200", copy_TBps: float = 4.144, s1_fwd_us: float = 150.0) -> dict:
    """A benchmarks/run.py JSON as a GPU run writes it (two layers, resnext50_32x4d's rows)."""
    def layer(name, pass_, impl, us):
        return {"layer": name, "impl": impl, "pass": pass_, "us": us, "frac_of_copy_bw": 0.1, "failed": False,
                "note": ""}

    def model(mode, impl, img_per_s, peak):
        return {"model": "resnext50_32x4d", "mode": mode, "impl": impl, "img_per_s": img_per_s,
                "peak_mem_GiB": peak, "first_step_s": 1.0, "failed": False, "note": ""}

    layers = [layer("s1_g32w4", "fwd", "cudnn", 400.0), layer("s1_g32w4", "fwd", "cudnn_conv", 353.0),
              layer("s1_g32w4", "fwd", "fused", s1_fwd_us), layer("s1_g32w4", "train_fwd", "cudnn", 500.0),
              layer("s1_g32w4", "train_fwd", "fused", 170.0), layer("s1_g32w4", "bwd", "cudnn", 1000.0),
              layer("s1_g32w4", "bwd", "cudnn_conv", 880.0), layer("s1_g32w4", "bwd", "fused", 900.0),
              layer("s2_g32w8", "fwd", "cudnn", 220.0), layer("s2_g32w8", "fwd", "cudnn_conv", 191.5),
              layer("s2_g32w8", "fwd", "fused", 100.0)]
    models = [model("infer", "eager", 12625.0, 1.8), model("infer", "fused", 24000.0, 1.2),
              model("train", "eager", 3691.0, 14.39), model("train", "fused", 5000.0, 11.6)]
    return {"gpu": gpu, "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-08T00:00:00+00:00",
            "dtype": "bfloat16", "batch_size": 256, "img_size": 224, "channels_last": True,
            "recompute_normalized": False, "copy_TBps": copy_TBps, "models": models, "layers": layers}


def test_compare_sets_a_gpu_run_beside_its_predictions_and_bars(tmp_path, capsys):
    """benchmarks/compare.py: each layer's fused time beside cuDNN's in the same run and the
    committed static floor (its DRAM part at the run's copy bandwidth), with the layer bars
    (stage 1's forward at least twice cuDNN's conv alone); each model row beside eager,
    torch.compile (the baseline's, marked, on the baseline's GPU when the run has none) and the
    static ceiling, with the bars (torch.compile, peak memory, the moonshots)."""
    compare = _script("compare")
    lines = compare.compare(_gpu_run()).splitlines()

    def row(*cells):
        (found,) = [line for line in lines if line.startswith("| " + " | ".join(cells) + " |")]
        return found
    assert row("s1_g32w4", "fwd").endswith("| 150.0 | 400.0 | 353.0 | 103.1 | 1.45 | 2.35 | met |")
    assert row("s1_g32w4", "train_fwd").endswith("| 170.0 | 500.0 | - | 113.2 | 1.50 | - | - |")
    assert row("s1_g32w4", "bwd").endswith("| 201.8 | 4.46 | 0.98 | **not met** |")
    assert row("s2_g32w8", "fwd").endswith("| 1.92 | met |")  # faster than cuDNN's conv: enough past stage 1
    infer, train = row("resnext50_32x4d", "infer"), row("resnext50_32x4d", "train")
    assert "| 18,044 (baseline) | 51,063 | 1.33 |" in infer and "vs compile met; moonshot 23,190 met" in infer
    assert "| 5,254 (baseline) | 14,034 | 0.95 | 11.60 / 14.39 (0.81) |" in train
    assert "vs compile **not met**; peak **not met**; moonshot 6,840 **not met**" in train
    assert compare.compare(_gpu_run(s1_fwd_us=250.0)).count("| 1.41 | **not met** |") == 1  # stage 1: 2x
    # another card, copying at half the H200's bandwidth: no baseline figures, DRAM floors doubled
    other = compare.compare(_gpu_run("NVIDIA H100 80GB HBM3", 2.072))
    assert "(baseline)" not in other and "moonshot" not in other and "| 198.4 | 0.76 |" in other
    small = {**_gpu_run(), "batch_size": 8}  # another step than the static model's: no floors
    assert "| 150.0 | 400.0 | 353.0 | - | - | 2.35 | met |" in compare.compare(small)
    assert "| 24,000 | 12,625 | 18,044 (baseline) | - |" in compare.compare(small)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_gpu_run()))
    assert compare.main([str(path)]) == 0 and "| s1_g32w4 | bwd |" in capsys.readouterr().out


def test_compare_marks_rows_bound_by_their_launching():
    """A row whose host time (launching alone) reaches 0.9 of its measured time is marked
    host-bound: the GPU waited for the host, so the figure is not the kernels'."""
    compare = _script("compare")
    run = _gpu_run()
    host = {("s2_g32w8", "fwd", "fused"): 95.0, ("s1_g32w4", "fwd", "fused"): 60.0,
            ("s2_g32w8", "fwd", "cudnn_conv"): 190.0}
    for r in run["layers"]:
        r["host_us"] = host.get((r["layer"], r["pass"], r["impl"]))
    run["models"][1]["host_ms"] = 10.5  # inference, 24,000 img/s at batch 256: 10.67 ms a step
    run["models"][3]["host_ms"] = 20.0  # training, 5,000 img/s: 51.2 ms a step
    lines = compare.compare(run).splitlines()

    def row(*cells):
        (found,) = [line for line in lines if line.startswith("| " + " | ".join(cells) + " |")]
        return found
    assert row("s2_g32w8", "fwd").endswith(
        "| 1.92 | met (host-bound: 95.0 us to launch) (cuDNN host-bound: 190.0 us to launch) |")
    assert row("s1_g32w4", "fwd").endswith("| 2.35 | met |")
    assert "; host-bound: 10.5 ms a step to launch |" in row("resnext50_32x4d", "infer")
    assert "host-bound" not in row("resnext50_32x4d", "train")


def test_compare_sets_a_fused_rerun_beside_the_first_runs_eager_rows(tmp_path, capsys):
    """A re-run of the fused rows alone (the protocol's run under --recompute-normalized, its run
    after tuning) is compared with the eager figures of the first run on the same GPU and step,
    marked as such, peak memory included; a first run of another GPU lends nothing. The static
    ceiling is the same step's only: the committed report holds the normalized inputs, so a run
    recomputing them gets none."""
    compare = _script("compare")
    first = _gpu_run()
    fused_train = {**first["models"][3], "peak_mem_GiB": 10.0}
    rerun = {**first, "recompute_normalized": True, "layers": [], "models": [fused_train]}
    (row,) = [line for line in compare.compare(rerun, first=first).splitlines()
              if line.startswith("| resnext50_32x4d | train |")]
    assert ("| 5,000 | 3,691 (first run) | 5,254 (baseline) | - | 0.95 | 10.00 / 14.39 (first run) (0.69) | "
            "vs compile **not met**; peak met;") in row, row
    alone = compare.compare(rerun)
    assert "| 5,000 | - | 5,254 (baseline) | - | 0.95 | 10.00 / - (-) |" in alone, alone
    elsewhere = compare.compare(rerun, first={**first, "gpu": "NVIDIA H100 80GB HBM3"})
    assert "(first run)" not in elsewhere and "10.00 / - (-)" in elsewhere
    tuned = {**first, "layers": [], "models": [first["models"][3]]}  # the same step: the static ceiling stays
    assert "| 5,000 | 3,691 (first run) | 5,254 (baseline) | 14,034 |" in compare.compare(tuned, first=first)
    (tmp_path / "first.json").write_text(json.dumps(first))
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    assert compare.main([str(tmp_path / "rerun.json"), "--first", str(tmp_path / "first.json")]) == 0
    assert "3,691 (first run)" in capsys.readouterr().out
