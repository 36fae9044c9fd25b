"""Tune the conv and tap kernels' tiles on this GPU and write them to the package's tuned table.

    PYTHONPATH=. python benchmarks/tune.py --budget 300          # on a GPU
    python benchmarks/tune.py --dry-run --model resnext29_tiny     # anywhere: checks, times nothing

Enumerates the conv launches (forward and input gradient) of an inference
forward and a training step of each ``--model`` (batch 256, 224x224, bf16 by
default, a float32 model under autocast as ``benchmarks/run.py`` runs it: the
kernels read float32 weights) on the meta device, and for each a list of candidate tiles:
BLOCK_M/N/K around the rules' choice, 4 or 8 warps, 1 to 4 pipeline stages
(``num_stages=1`` loads the activation through L1, where the overlapping taps
can hit). Launches are taken in order of the pixels they cover, largest first.
Before them, the tap kernels of the training steps (``aru_kernels.tap_grads``: a
stride-1 grouped 3x3's forward normalizing its input once, and its two gradients
in one launch), each through its operator with a candidate as its tuned entry:
pixels a step, warps, a cap on a thread's registers and programs a multiprocessor
(``TAP_CANDIDATES``: the gradients hold 254-255 registers at any tile and four
2-warp programs a multiprocessor, 8 warps, so more resident warps cost spills and
splits), keyed by ``plans.tap_key``.

On a GPU: all candidates of a launch are compiled first, in parallel worker
processes (for this GPU's architecture, into Triton's cache); then each
candidate's output is checked against the rules' output on fresh random data
with a NaN-poisoned output buffer (a tap kernel's outputs are its operator's
own); then each is timed (``do_bench`` median,
inputs rotated so they do not sit in L2). The winner, if it beats the rules
by :data:`TUNE_MARGIN`, is written to ``aru_kernels/tuned/<gpu>.json`` (keyed by the launch plan; the
launchers use an exact match and the rules otherwise) after every launch, so
a run cut short by ``--budget`` keeps what it measured.

``--dry-run`` (any machine; on CPU through Triton's interpreter) enumerates
the same launches, scales each down (batch 1, a few pixels, at most two packs
and 64 channels a pack) and checks every distinct candidate tile against the
rules' output; it times nothing and writes no table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path

if "--dry-run" in sys.argv[1:] and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before aru_kernels is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aru_kernels import conv_ops, plans  # noqa: E402
from aru_kernels.plans import ConvPlan, Tiles  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def conv_launch_plans(models: list[str], modes: list[str], batch: int, img: int, dtype: torch.dtype,
                      autocast: bool = False) -> list[ConvPlan]:
    """The distinct conv launch plans (rules' tiles) of the models' steps, most pixels first
    (``autocast``: the steps as benchmarks/run.py runs them, a float32 model under autocast)."""
    from aot_check import record_step

    found: dict[str, ConvPlan] = {}
    for model in models:
        for mode in modes:
            for launch in record_step(model, "fused", mode, batch, img, dtype, autocast=autocast).launches:
                plan = launch.meta.get("plan")
                if plan is not None:
                    plan = replace(plan, tiles=None, phase=None)  # a strided dgrad's phases share its tiles
                    found.setdefault(plan.key(), plan)
    return sorted(found.values(), key=lambda p: -p.m * p.c_out)


def draw(shape: tuple, dtype: torch.dtype, device, gen, channels_last: bool = False) -> torch.Tensor:
    """A tensor for a tuning launch: normal values drawn by ``gen`` (on its device), or empty
    with ``gen`` None (the meta device). ``channels_last``: with its canonical strides, sizes
    of 1 included (a copy's layout, as ``model.to(device, memory_format=torch.channels_last)``
    leaves a 1x1 weight), so that the launch is the model's own specialization."""
    stored = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    if gen is None:
        t = torch.empty(*stored, dtype=dtype, device=device)
    else:
        t = torch.randn(*stored, generator=gen, device=gen.device).to(device, dtype)
    return t.permute(0, 3, 1, 2) if channels_last else t


@dataclass(frozen=True)
class TapTiles:
    """A tap kernel's tiles: pixels a step, warps, a cap on a thread's registers (None: ptxas's
    own choice) and programs a multiprocessor (``aru_kernels.plans.plan_tap_grads``)."""

    block_m: int
    num_warps: int
    maxnreg: int | None = None
    programs_per_sm: int = plans.TAP_PROGRAMS_PER_SM


# Candidates of each tap kernel, the rules' (on a GPU) first: fewer pixels a step or more warps
# (more warps a program), more pixels, and more warps a multiprocessor, to hide the latency of
# the ring's round trips: registers capped (against spills) and programs enough to use them
# (benchmarks/NOTES.md has each one's registers, spills, resident warps and floors at stage 1).
TAP_CANDIDATES = {"tap_grads": [TapTiles(64, 2), TapTiles(32, 2), TapTiles(64, 4), TapTiles(128, 4),
                                TapTiles(64, 2, 168, 6), TapTiles(64, 2, 128, 8)],
                  "tap_forward": [TapTiles(256, 4), TapTiles(128, 4), TapTiles(128, 2), TapTiles(64, 2, None, 8),
                                  TapTiles(256, 4, 128), TapTiles(128, 4, None, 5)]}


@dataclass(frozen=True)
class TapLaunch:
    """A launch of a stride-1 grouped 3x3's tap kernel (``aru_kernels.tap_ops``) to tune:
    its kind (``plans.TAP_KINDS``), its convolution, and the flags that fix its specialization."""

    kind: str
    conv: ConvPlan
    pro_relu: bool
    stat_scale: bool = False

    def key(self) -> str:
        return plans.tap_key(self.kind, self.conv)

    @property
    def pixels(self) -> int:
        return self.conv.m * self.conv.c_out

    def default_tiles(self) -> TapTiles:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with plans.use_tuned_table({}):
            plan, _ = (plans.plan_tap_grads if self.kind == "tap_grads" else plans.plan_tap_forward)(self.conv, device)
        return TapTiles(plan.block_m, plan.num_warps, plan.maxnreg)  # the rules' programs a multiprocessor

    def candidates(self) -> list[TapTiles]:
        rule = self.default_tiles()
        return [rule, *(t for t in TAP_CANDIDATES[self.kind] if t != rule)]

    def inputs(self, device, dtype, gen, weight_dtype: torch.dtype | None = None) -> dict:
        """The operator's arguments: random tensors, or empty ones on the meta device."""
        c = self.conv

        def rnd(*shape, dt=None, positive=False):
            t = draw(shape, dt or (dtype if len(shape) == 4 else torch.float32), device, gen, len(shape) == 4)
            return t.abs_().add_(0.5) if positive and gen is not None else t

        weight = rnd(c.c_out, c.cin_g, c.kh, c.kw, dt=weight_dtype)
        if gen is not None:
            weight = weight.mul_((c.cin_g * c.kh * c.kw) ** -0.5)
        args = dict(x=rnd(c.n, c.c_in, c.h, c.w), weight=weight, in_mean=rnd(c.c_in) if c.pro_mean else None,
                    in_scale=rnd(c.c_in, positive=True), in_shift=rnd(c.c_in), in_relu=self.pro_relu,
                    padding=c.padding, dilation=c.dilation, groups=c.groups)
        if self.kind == "tap_grads":
            args.update(dy=rnd(c.n, c.c_out, c.p, c.q), stat_y=rnd(c.n, c.c_out, c.p, c.q), stat_mean=rnd(c.c_out),
                        stat_a=rnd(c.c_out), stat_b=rnd(c.c_out),
                        stat_c=rnd(c.c_out, positive=True) if self.stat_scale else None)
        return args

    def run(self, tiles: TapTiles, args: dict) -> tuple:
        """The operator with ``tiles``: its results (the forward's tile statistics as the
        per-channel sum of y they make, which does not depend on the tiles)."""
        from aru_kernels import tap_ops

        x, weight = args["x"], args["weight"]
        conv = plans.plan_conv(x.shape, weight.shape, x.dtype, stride=1, padding=args["padding"],
                               dilation=args["dilation"], groups=args["groups"], has_prologue=True,
                               pro_mean=args["in_mean"] is not None, device=x.device)  # as tap_ops plans it
        plan_tap = plans.plan_tap_grads if self.kind == "tap_grads" else plans.plan_tap_forward
        with plans.use_tuned_table({plans.tap_key(self.kind, conv): {"tiles": asdict(tiles)}}):
            plan, _ = plan_tap(conv, x.device)
            meant, _ = plans.tap_plan(conv, x.device, *astuple(tiles))
            if plan != meant:
                raise RuntimeError(f"tune: the tuned entry for {self.kind} did not apply: {plan}")
            if self.kind == "tap_grads":
                return tuple(tap_ops.tap_conv_grads(**args))
            y, tile_mean, _, rows = tap_ops.tap_forward_stats(**args)
        counts = (y[:, 0].numel() - torch.arange(tile_mean.shape[0], device=y.device) * rows).clamp(0, rows)
        return y, (tile_mean * counts[:, None]).sum(0)

    def launches(self, tiles: TapTiles, weight_dtype: torch.dtype | None = None) -> list:
        """The launches of the operator with ``tiles``, recorded on meta tensors."""
        from aot_check import StepRecorder

        from aru_kernels.launch import recording

        args = self.inputs("meta", self.conv.dtype, None, weight_dtype)
        with recording() as direct, StepRecorder() as ops:
            self.run(tiles, args)
        return direct + ops.launches

    def scaled_down(self) -> "TapLaunch":
        c = self.conv
        packs = min(c.packs, 2)
        h, w = min(c.h, 24), min(c.w, 24)
        return replace(self, conv=replace(c, n=1, h=h, w=w, p=h, q=w, groups=c.gp * packs,
                                          c_in=c.cin_g * c.gp * packs, c_out=c.cout_g * c.gp * packs))


def tap_launches(models: list[str], modes: list[str], batch: int, img: int, dtype: torch.dtype,
                 autocast: bool = False) -> list[TapLaunch]:
    """The distinct tap-kernel launches of the models' training steps, most work first."""
    from aot_check import record_step

    found: dict[TapLaunch, None] = {}
    for model in models:
        for mode in modes:
            for launch in record_step(model, "fused", mode, batch, img, dtype, autocast=autocast).launches:
                if "tap" in launch.meta:
                    kind, conv = launch.meta["tap"]
                    found.setdefault(TapLaunch(kind, replace(conv, tiles=None), bool(launch.args["PRO_RELU"]),
                                               bool(launch.args.get("STAT_SCALE", False))))
    return sorted(found, key=lambda t: -t.pixels)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def candidates(plan: ConvPlan) -> list[Tiles]:
    """Tiles around the rules' choice that the kernel accepts (dots >= 16 wide,
    accumulator <= 16K fp32 elements, or the rules' own if larger), the rules' own first."""
    rule = plan.default_tiles()
    ns = sorted({rule.block_n, max(16, rule.block_n // 2), min(128, 2 * rule.block_n)}
                & set(range(16, _pow2_at_least_16(plan.cout_p) + 1)))
    ks = sorted({rule.block_k, max(16, rule.block_k // 2)} if not plan.fold_taps else {16, 32, 64})
    ks = [k for k in ks if k <= max(_pow2_at_least_16(plan.cin_p), 32 if plan.fold_taps else 16)]
    if plan.wide_forward:  # the rule's 128 x 256 x 32 against the 64-channel steps it replaced
        ks = [32, 64]
    out = [rule]
    for m, n, k, warps, stages in itertools.product((64, 128), ns, ks, (4, 8), (1, 3, 4)):
        t = Tiles(m, n, k, warps, stages)
        if m * n <= 16384 and t not in out:
            out.append(t)
    return out


def _inputs(plan: ConvPlan, device, dtype, gen, weight_dtype: torch.dtype | None = None):
    """Tensors for one launch of ``plan``: random ones, or empty ones on the meta device
    (the weight in ``weight_dtype``: float32 under autocast, which the kernel reads in place)."""
    def rnd(*shape, cl=False, dt=None):
        return draw(shape, dt or (dtype if len(shape) == 4 else torch.float32), device, gen, cl)

    def mask_bits(c):  # a ReLU's mask as bits, [pixels, ceil(c/8)] (relu_bits)
        shape = (plan.n * plan.h * plan.w if plan.pro_end else plan.n * plan.p * plan.q, -(-c // 8))
        if gen is None:
            return torch.empty(shape, dtype=torch.uint8, device=device)
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8, device=gen.device).to(device)

    x = rnd(plan.n, plan.c_in, plan.h, plan.w, cl=True)
    # (channels_last, as a model moved to channels_last holds it: run.py's layout)
    if plan.transposed:  # the forward weight [C_out_fwd, C_in_fwd/g, KH, KW]; x is dL/dy
        weight = rnd(plan.c_in, plan.cout_g, plan.kh, plan.kw, cl=True, dt=weight_dtype)
    else:
        weight = rnd(plan.c_out, plan.cin_g, plan.kh, plan.kw, cl=True, dt=weight_dtype)
    if gen is not None:
        weight = weight.mul_((plan.cin_g * plan.kh * plan.kw) ** -0.5)
    vec = {}
    cv = plan.c_out
    if plan.transposed:
        if plan.pro_bwd:
            vec = dict(scale=rnd(cv).abs() + 0.5, shift=rnd(cv), residual=rnd(plan.n, cv, plan.p, plan.q, cl=True))
            if plan.pro_mean:
                vec["mean"] = rnd(cv)
        if plan.end_bwd:  # through a residual block's end: its mask bits, last conv output and mean
            vec.update(end_mask=mask_bits(cv), end_y=rnd(plan.n, cv, plan.p, plan.q, cl=True), end_mean=rnd(cv))
            if plan.end_id:
                vec.update(end_id=rnd(plan.n, cv, plan.p, plan.q, cl=True), end_id_mean=rnd(cv))
            if plan.has_residual:
                vec["residual"] = rnd(plan.n, cv, plan.p, plan.q, cl=True)
    else:
        for flag, name in ((plan.has_mean, "mean"), (plan.has_scale, "scale"), (plan.has_shift, "shift")):
            if flag:
                vec[name] = rnd(cv)
        if plan.has_var:
            vec["var"] = rnd(cv).abs() + 0.5
        if plan.has_residual:
            vec["residual"] = rnd(plan.n, cv, plan.p, plan.q, cl=True)
        if plan.has_prologue:
            vec.update(in_scale=rnd(plan.c_in).abs() + 0.5, in_shift=rnd(plan.c_in))
            if plan.pro_mean:
                vec["in_mean"] = rnd(plan.c_in)
        if plan.pro_end:  # the input is a residual block's end: its vectors, identity, output and mask bits
            ci = plan.c_in
            vec.update(in_mean=rnd(ci), in_scale=rnd(ci).abs() + 0.5, in_shift=rnd(ci),
                       pro_id=rnd(plan.n, ci, plan.h, plan.w, cl=True),
                       pro_out=rnd(plan.n, ci, plan.h, plan.w, cl=True), pro_mask=mask_bits(ci))
            if plan.pro_end_affine:
                vec.update(pro_id_mean=rnd(ci), pro_id_scale=rnd(ci).abs() + 0.5, pro_id_shift=rnd(ci))
    return x, weight, vec


def buffers(plan: ConvPlan, x) -> tuple:
    """NaN-filled output and partial-sum buffers for one launch of ``plan``."""
    out = torch.full((plan.n, plan.c_out, plan.p, plan.q), float("nan"), dtype=x.dtype, device=x.device)
    parts = (None, None, None)
    if plan.stats or plan.pro_bwd or plan.end_bwd:
        n = 3 if plan.end_id else 2
        parts = tuple(torch.full((plan.partial_tiles, plan.c_out), float("nan"), device=x.device)
                      for _ in range(n)) + (None,) * (3 - n)
    return out.contiguous(memory_format=torch.channels_last), parts


def launch_into(plan: ConvPlan, x, weight, vec, out, parts) -> None:
    conv_ops._launch(plan, x, weight, out, part_a=parts[0], part_b=parts[1], part_c=parts[2], **vec)


def run_plan(plan: ConvPlan, x, weight, vec) -> tuple:
    """Launch ``plan`` into fresh NaN-filled buffers; the output and any partial sums."""
    out, parts = buffers(plan, x)
    launch_into(plan, x, weight, vec, out, parts)
    return out, parts


def _same(a, b, dtype) -> bool:
    tol = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    a, b = a.float(), b.float()
    return bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= tol * (b.abs() + b.abs().max())).all())


def _all_same(results, reference) -> bool:
    return all(_same(a, b, a.dtype) for a, b in zip(results, reference, strict=True))


def check_candidate(plan: ConvPlan, tiles: Tiles, inputs, reference) -> bool:
    out, parts = run_plan(replace(plan, tiles=tiles), *inputs)
    if not _same(out, reference[0], out.dtype):
        return False
    if plan.pro_bwd or plan.end_bwd:  # per-tile partial sums: compare their totals (tile counts differ)
        return all(_same(p.sum(0), r.sum(0), torch.float32) for p, r in zip(parts, reference[1]) if p is not None)
    return True


def scaled_down(plan: ConvPlan) -> ConvPlan:
    """The same kernel specialization on a small problem: batch 1, a few pixels,
    at most two packs, at most 64 channels a pack."""
    packs = min(plan.packs, 2)
    cin_g, cout_g = min(plan.cin_g, max(1, 64 // plan.gp)), min(plan.cout_g, max(1, 64 // plan.gp))
    groups = plan.gp * packs
    geo = dict(n=1, c_in=cin_g * groups, c_out=cout_g * groups, groups=groups)

    def out(v):
        return plans.out_size(v, plan.kh, plan.stride, plan.padding, plan.dilation)

    if plan.transposed:  # h, w: dL/dy's size; p, q: the forward input's
        hf, wf = min(plan.p, 3 + 2 * plan.stride), min(plan.q, 3 + 2 * plan.stride)
        return replace(plan, **geo, h=out(hf), w=out(wf), p=hf, q=wf)
    h, w = min(plan.h, 3 + 2 * plan.stride), min(plan.w, 3 + 2 * plan.stride)
    return replace(plan, **geo, h=h, w=w, p=out(h), q=out(w))


def dry_run(all_plans: list[ConvPlan], dtype: torch.dtype, weight_dtype: torch.dtype | None = None,
            taps: list[TapLaunch] = ()) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    bad = checked = 0
    for tap in taps:
        small = tap.scaled_down()
        args = small.inputs(device, dtype, gen, weight_dtype)
        reference = small.run(small.default_tiles(), args)
        for tiles in tap.candidates():
            checked += 1
            if not _all_same(small.run(tiles, args), reference):
                bad += 1
                print(f"WRONG: {tap.key()} with {tiles}")
        print(f"  {tap.kind} {tap.conv.c_in}->{tap.conv.c_out} g{tap.conv.groups} {tap.conv.h}x{tap.conv.w}: "
              f"{len(tap.candidates())} candidates checked", flush=True)
    for plan in all_plans:
        small = scaled_down(plan)
        inputs = _inputs(small, device, dtype, gen, weight_dtype)
        reference = run_plan(small, *inputs)
        shapes = {(t.block_m, t.block_n, t.block_k) for t in candidates(plan)}  # warps/stages: same math
        for m, n, k in sorted(shapes):
            tiles = Tiles(m, n, k, 4, 3)
            checked += 1
            if not check_candidate(small, tiles, inputs, reference):
                bad += 1
                print(f"WRONG: {plan.key()} with {tiles}")
        print(f"  {'dgrad' if plan.transposed else 'fwd':5s} {plan.c_in}->{plan.c_out} {plan.kh}x{plan.kw}/s{plan.stride} "
              f"g{plan.groups} {plan.h}x{plan.w}: {len(candidates(plan))} candidates, {len(shapes)} tile shapes checked",
              flush=True)
    print(f"dry run: {len(all_plans) + len(taps)} launches, {checked} candidate tiles checked, {bad} wrong")
    return 1 if bad else 0


def candidate_launches(plan: ConvPlan, tiles: Tiles, weight_dtype: torch.dtype | None = None) -> list:
    """The launches of ``plan`` with ``tiles`` on meta tensors laid out as the tuning run's
    (and a channels_last model's): one a strided input gradient's output phase."""
    from aru_kernels.launch import Launch

    p = replace(plan, tiles=tiles)
    x, weight, vec = _inputs(p, "meta", p.dtype, None, weight_dtype)
    out = torch.empty((p.n, p.c_out, p.p, p.q), dtype=p.dtype, device="meta")
    parts = {}
    if p.stats or p.pro_bwd or p.end_bwd:  # as buffers() makes them: the third only with end_id
        part = torch.empty((p.partial_tiles, p.c_out), device="meta")
        parts = dict(part_a=part, part_b=part, part_c=part if p.end_id else None)
    out = out.contiguous(memory_format=torch.channels_last)
    return [Launch(conv_ops._conv.conv_bn_act_kernel, ph.grid, conv_ops.kernel_arguments(ph, x, weight, out, **vec,
                                                                                        **parts),
                   ph.num_warps, ph.num_stages) for ph in p.phases()]


def _compile_job(job) -> str | None:
    """Compile one candidate for this GPU's architecture, into Triton's cache (worker process)."""
    item, tiles, arch, weight_dtype = job
    from aru_kernels import aot

    try:
        launches = (item.launches(tiles, weight_dtype) if isinstance(item, TapLaunch)
                    else candidate_launches(item, tiles, weight_dtype))
        for launch in launches:
            aot.compile_launch(launch, arch)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def relaunch(launches: list) -> None:
    """Run launches recorded under ``aru_kernels.launch.recording`` as they were made."""
    for launch in launches:
        launch.kernel[launch.grid](**launch.args, num_warps=launch.num_warps, num_stages=launch.num_stages)


def _timed_call(item: ConvPlan | TapLaunch, tiles, sets: list):
    """A call of ``item`` with ``tiles`` for ``do_bench``, cycling through the input ``sets``
    (so that they do not sit in L2): a conv launch into buffers made once, not timed; a tap
    kernel's launches (the kernel, its slab sum) as its operator makes them, recorded once
    on each set's tensors, then launched as they are (no planning or allocating timed)."""
    if isinstance(item, TapLaunch):
        from aru_kernels.launch import recording

        recorded = []
        for args in sets:
            with recording() as launches:
                item.run(tiles, args)  # records, runs nothing
            recorded.append(launches)
        it = itertools.cycle(recorded)
        return lambda: relaunch(next(it))
    p = replace(item, tiles=tiles)
    it = itertools.cycle([(*s, *buffers(p, s[0])) for s in sets])
    return lambda: launch_into(p, *next(it))


# How much faster than the rules' tiles a candidate must time to be written: the medians of
# 20 ms of calls move by a percent or two between runs, and a table of such ties credits
# tuning with noise.
TUNE_MARGIN = 0.03


def winner(timings: dict, rule):
    """The fastest of the timed candidates where it beats the rules' tiles (``rule``, timed
    too) by :data:`TUNE_MARGIN`; else None, and the rules stand."""
    if rule not in timings:
        return None
    best = min(timings, key=timings.get)
    return best if timings[best] < timings[rule] * (1 - TUNE_MARGIN) else None


def write_table(table: dict, path: Path) -> None:
    """Write the tuned table whole (a temporary file, then renamed): a run stopped mid-write
    leaves the previous table, never a partial one the launchers cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)


def tune(all_plans: list[ConvPlan], dtype: torch.dtype, budget: float, table_path: Path, jobs: int,
         weight_dtype: torch.dtype | None = None, taps: list[TapLaunch] = ()) -> int:
    """Time the candidates of the tap kernels' launches (``taps``), then of the conv launches,
    each checked first against the rules' result; write each winner that beats the rules."""
    import triton
    from triton.testing import do_bench

    start = time.monotonic()
    device = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    table.update(gpu=torch.cuda.get_device_name(device), triton=triton.__version__, torch=torch.__version__)
    entries = table.setdefault("entries", {})
    gen = torch.Generator(device=device).manual_seed(0)  # inputs drawn on the GPU: seconds a set on the CPU
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for item in [*taps, *all_plans]:
            if time.monotonic() - start > budget:
                print("budget spent; stopping")
                break
            tap = isinstance(item, TapLaunch)
            cands = item.candidates() if tap else candidates(item)
            errors = list(pool.map(_compile_job, [(item, t, major * 10 + minor, weight_dtype) for t in cands]))
            cands = [t for t, e in zip(cands, errors) if e is None]
            sets = [item.inputs(device, dtype, gen, weight_dtype) if tap else
                    _inputs(item, device, dtype, gen, weight_dtype) for _ in range(3)]
            rule = item.default_tiles()
            reference = item.run(rule, sets[0]) if tap else run_plan(item, *sets[0])
            timings = {}
            for tiles in cands:
                if time.monotonic() - start > budget:
                    break
                right = (_all_same(item.run(tiles, sets[0]), reference) if tap
                         else check_candidate(item, tiles, sets[0], reference))
                if not right:
                    print(f"  WRONG result, skipped: {tiles}")
                    continue
                timings[tiles] = do_bench(_timed_call(item, tiles, sets), warmup=5, rep=20, return_mode="median")
            if not timings:
                continue
            best = min(timings, key=timings.get)
            print(f"  {item.key()[:90]}: rules {timings.get(rule, float('nan')) * 1e3:.1f} us, "
                  f"best {timings[best] * 1e3:.1f} us {best}", flush=True)
            chosen = winner(timings, rule)
            if chosen is not None:
                entries[item.key()] = {"tiles": asdict(chosen), "us": round(timings[chosen] * 1e3, 2),
                                       "rules_us": round(timings[rule] * 1e3, 2)}
                write_table(table, table_path)
    print(f"tuned table: {table_path} ({len(entries)} entries)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="repeatable; default resnext50_32x4d and resnet50")
    ap.add_argument("--mode", choices=["infer", "train", "both"], default="both")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--budget", type=float, default=600, metavar="SECONDS")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile workers")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                    help="the launches as benchmarks/run.py makes them, a float32 model under autocast to "
                         "--dtype (float32 weights, read in place; default); --no-autocast: the model in --dtype")
    ap.add_argument("--dry-run", action="store_true", help="enumerate and check candidates; time nothing")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    dtype = DTYPES[args.dtype]
    autocast = args.autocast and dtype != torch.float32
    all_plans = conv_launch_plans(args.model or ["resnext50_32x4d", "resnet50"], modes, args.batch_size,
                                  args.img_size, dtype, autocast=autocast)
    taps = tap_launches(args.model or ["resnext50_32x4d", "resnet50"], modes, args.batch_size, args.img_size, dtype,
                        autocast=autocast)
    print(f"{len(all_plans)} conv launches and {len(taps)} tap-kernel launches to tune", flush=True)
    if args.dry_run:
        if not torch.cuda.is_available():  # the interpreter: float32 throughout
            return dry_run(all_plans, torch.float32, taps=taps)
        return dry_run(all_plans, dtype, torch.float32 if autocast else dtype, taps=taps)
    if not torch.cuda.is_available():
        ap.error("tuning times kernels on a GPU; without one, use --dry-run")
    path = plans.tuned_table_file(torch.cuda.get_device_name(0))
    return tune(all_plans, dtype, args.budget, path, args.jobs, torch.float32 if autocast else dtype, taps=taps)


if __name__ == "__main__":
    sys.exit(main())
