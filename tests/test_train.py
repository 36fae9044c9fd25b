"""The training entry point, its data and the CIFAR ResNeXt-29 networks, on CPU.

Runs use ``resnext29_tiny`` and, except for the learning test on digits, a
CIFAR-10-format folder of a few dozen random images written by the test, so
that a whole epoch is a handful of small steps.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aru_models
from aru_models import cifar, data, train
from helpers import assert_as_accurate, assert_close, rel_error

EPOCH_LINE = re.compile(r"Epoch (\d+), Loss: (\d+\.\d{4}), Accuracy: ([01]\.\d{4})")
VAL_LINE = re.compile(r"Validation Accuracy: ([01]\.\d{4})")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions on shared cores run faster, and more steadily, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_cifar(root: Path, per_batch: int = 8, test: int = 8, seed: int = 1) -> dict[str, tuple]:
    """A CIFAR-10 python-pickle folder of random images: ``data_batch_1..5`` of
    ``per_batch`` images each and ``test_batch`` of ``test``; returns what each file holds."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": images, b"labels": labels}, f)
        written[name] = (images, labels)
    return written


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar"
    write_cifar(root)
    return root


def tiny_args(cifar_dir: Path, *extra: str) -> list[str]:
    """A run of resnext29_tiny on the test's CIFAR folder: 40 training images, 5 steps per epoch."""
    return ["--model", "resnext29_tiny", "--impl", "eager", "--dataset", "cifar10", "--data-dir", str(cifar_dir),
            "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.05", "--seed", "0", *extra]


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def expect_usage_error(argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI, which must exit with status 2 and an ``error:`` line containing every ``expected``."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, f"exit status {exit_info.value.code}, stderr:\n{err}"
    message = err[err.find("error:"):]
    assert message.startswith("error:"), f"no 'error:' line in stderr:\n{err}"
    for text in expected:
        assert text in message, f"{text!r} not in the error message: {message}"
    return message


# ---------------------------------------------------------------------------
# Training runs


def test_default_run_learns_digits_and_prints_epoch_lines(capsys):
    # one epoch of the default dataset (89 steps of 16 images); chance is 0.1
    result = train.main(["--model", "resnext29_tiny", "--impl", "eager", "--epochs", "1", "--batch-size", "16",
                         "--lr", "3e-3"])
    out = capsys.readouterr().out.splitlines()

    assert result.val_accuracy > 0.5, f"validation accuracy {result.val_accuracy:.4f} after one epoch of digits"
    assert result.steps == 1437 // 16
    assert len(out) == 3, out
    epoch = EPOCH_LINE.fullmatch(out[0])
    assert epoch, f"epoch line {out[0]!r} does not match {EPOCH_LINE.pattern!r}"
    assert epoch.group(1) == "1"
    assert float(epoch.group(2)) == round(result.losses[0], 4)
    assert float(epoch.group(3)) == round(result.accuracies[0], 4)
    val = VAL_LINE.fullmatch(out[1])
    assert val and float(val.group(1)) == round(result.val_accuracy, 4), out[1]
    assert "images/s" in out[2] and result.images_per_second > 0


def test_max_steps_cuts_the_last_epoch_short(cifar_dir, capsys):
    result = train.main(tiny_args(cifar_dir, "--epochs", "3", "--max-steps", "7"))
    assert result.steps == 7
    assert len(result.losses) == 2  # 5 steps, then 2
    assert len(EPOCH_LINE.findall(capsys.readouterr().out)) == 2


def test_resume_continues_the_same_trajectory(cifar_dir, tmp_path, monkeypatch, capsys):
    straight = train.main(tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(tmp_path / "straight.pt")))

    # the same run, stopped right after the checkpoint of its first epoch
    interrupted = tmp_path / "interrupted.pt"
    save = train.save_checkpoint

    def save_then_stop(state, path):
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(interrupted)))
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert load_state(interrupted)["epoch"] == 1

    resumed = train.main(tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(interrupted), "--resume"))
    out = capsys.readouterr().out
    # straight: epochs 1 and 2; stopped after 1; resumed: 2
    assert re.findall(r"^Epoch (\d+),", out, re.M) == ["1", "2", "1", "2"], out

    assert resumed.losses == straight.losses
    assert resumed.accuracies == straight.accuracies
    assert resumed.val_accuracies == straight.val_accuracies
    assert resumed.steps == straight.steps == 10
    a, b = load_state(tmp_path / "straight.pt"), load_state(interrupted)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"{name} differs between the straight and the resumed run"
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_resume_inside_an_epoch_cut_by_max_steps(cifar_dir, tmp_path, capsys):
    """A run cut at step 7 of 10 by --max-steps saves the 2 steps it took of its second epoch;
    resumed, it takes the other 3 and ends where the uninterrupted run does, bit for bit (the
    schedule is the one of --epochs, whatever --max-steps)."""
    straight = train.main(tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(tmp_path / "straight.pt")))
    cut = tmp_path / "cut.pt"
    assert train.main(tiny_args(cifar_dir, "--epochs", "2", "--max-steps", "7", "--checkpoint", str(cut))).steps == 7
    saved = load_state(cut)
    assert (saved["epoch"], saved["epoch_steps"]) == (1, 2)
    resumed = train.main(tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(cut), "--resume"))
    assert resumed.steps == straight.steps == 10
    # epoch 2's entry, written for its first 2 steps when cut, is replaced by the whole epoch's
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-12)
    assert resumed.accuracies == straight.accuracies and resumed.val_accuracies == straight.val_accuracies
    out = capsys.readouterr().out
    assert out.count("Trained resnext29_tiny") == 3 and out.count("2 epoch(s), 10 steps") == 2, out
    a, b = load_state(tmp_path / "straight.pt"), load_state(cut)
    assert (b["epoch"], b["epoch_steps"]) == (2, 0)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"{name} differs between the straight and the resumed run"
    # torch's global generator (a model's dropout or drop-path draws from it) ends where it does
    # uninterrupted: the data loaders, made again for the cut epoch, draw from their own
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), "the global generator's state differs"


def test_resume_takes_the_schedule_of_its_arguments(cifar_dir, tmp_path, capsys):
    """Resumed with more --epochs and another --lr, SGD continues on the cosine of the new
    arguments from the step reached (the checkpoint's schedule would end at 0: no update)."""
    path = tmp_path / "run.pt"
    train.main(tiny_args(cifar_dir, "--epochs", "1", "--checkpoint", str(path)))
    before = load_state(path)
    assert before["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 5 of 5 steps
    train.main(tiny_args(cifar_dir, "--epochs", "3", "--checkpoint", str(path), "--resume", "--lr", "0.2",
                         "--weight-decay", "1e-3", "--max-steps", "8"))
    after = load_state(path)
    group = after["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 8 / 15)), rel=1e-12)
    assert group["initial_lr"] == 0.2 and group["weight_decay"] == 1e-3
    changed = [name for name, v in before["model"].items() if v.is_floating_point()
               and not torch.equal(v, after["model"][name])]
    assert "fc.weight" in changed

    train.main(tiny_args(cifar_dir, "--epochs", "4", "--checkpoint", str(path), "--resume", "--max-steps", "16"))
    group = load_state(path)["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 16 / 20)), rel=1e-12)


def test_resume_of_a_finished_run_says_so(cifar_dir, tmp_path, capsys):
    path = tmp_path / "run.pt"
    train.main(tiny_args(cifar_dir, "--epochs", "1", "--checkpoint", str(path)))
    capsys.readouterr()
    result = train.main(tiny_args(cifar_dir, "--epochs", "1", "--checkpoint", str(path), "--resume"))
    assert result.steps == 5 and len(result.losses) == 1
    assert "Nothing to train: the checkpoint is at step 5 (1 whole epoch(s))" in capsys.readouterr().out


def test_resume_refuses_what_it_cannot_continue(cifar_dir, tmp_path, capsys):
    path = tmp_path / "run.pt"
    train.main(tiny_args(cifar_dir, "--epochs", "1", "--checkpoint", str(path)))
    capsys.readouterr()
    original = load_state(path)
    argv = tiny_args(cifar_dir, "--epochs", "2", "--checkpoint", str(path), "--resume")
    expect_usage_error(argv[:argv.index("--batch-size")] + ["--batch-size", "4"] + argv[argv.index("--optimizer"):],
                       capsys, "--batch-size 8, not 4")
    expect_usage_error(argv[:argv.index("--seed")] + ["--seed", "1"] + argv[argv.index("--seed") + 2:],
                       capsys, "--seed 0, not 1")  # (the seed orders the data: a cut epoch would not resume)
    state = copy.deepcopy(original)
    state["model"]["fc.weight"] = state["model"]["fc.weight"][:7]  # a model of 7 classes
    state["model"]["fc.bias"] = state["model"]["fc.bias"][:7]
    torch.save(state, path)
    expect_usage_error(argv, capsys, str(path), "does not fit", "fc.weight")
    state = copy.deepcopy(original)
    state["history"]["steps"] = 4  # not where its epochs say: the data gives 5 steps an epoch
    torch.save(state, path)
    expect_usage_error(argv, capsys, str(path), "is at step 4, 1 whole epoch(s)", "5 steps an epoch")
    del original["optimizer"]
    torch.save(original, path)
    expect_usage_error(argv, capsys, str(path), "is not a checkpoint of this trainer")
    path.write_text("not a checkpoint\n")
    message = expect_usage_error(argv, capsys, str(path), "is not a checkpoint of this trainer")
    assert "weights_only" not in message, "no advice to unpickle arbitrary code"


def test_a_batch_too_small_for_a_batch_norm_is_a_usage_error(cifar_dir, capsys):
    """resnet18 at 32 x 32 reaches 1 x 1 pixels: one image a batch leaves one value per channel."""
    argv = tiny_args(cifar_dir, "--epochs", "1", "--max-steps", "1")
    argv[argv.index("resnext29_tiny")] = "resnet18"
    argv[argv.index("--batch-size") + 1] = "1"
    expect_usage_error(argv, capsys, "--batch-size 1 (1 image(s) a process) is too small for resnet18",
                       "Expected more than 1 value per channel")


@pytest.mark.parametrize("options", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"]],
                         ids=["bf16-channels-last", "fp16"])
def test_mixed_precision_runs(cifar_dir, options):
    result = train.main(tiny_args(cifar_dir, "--epochs", "1", "--max-steps", "2", *options))
    assert result.steps == 2 and np.isfinite(result.losses[0])


def test_resume_without_a_checkpoint_is_an_error(cifar_dir, tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    expect_usage_error(tiny_args(cifar_dir, "--checkpoint", str(missing), "--resume"), capsys, str(missing))
    assert not missing.exists()
    expect_usage_error(tiny_args(cifar_dir, "--resume"), capsys, "--checkpoint")


def test_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.pt"
    train.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    assert os.listdir(path.parent) == ["ckpt.pt"]

    def fail_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert os.listdir(path.parent) == ["ckpt.pt"], "a temporary file was left behind"
    kept = load_state(path)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3)), "the previous checkpoint was damaged"


def _float64_step(model, x, labels):
    exact = copy.deepcopy(model).double()
    opt, _ = train.make_optimizer(exact, "sgd", 0.05, None, 1)
    train.train_step(exact, x.double(), labels, opt)
    return exact


def _eager_step(model, x, labels):
    eager = copy.deepcopy(model)
    opt, _ = train.make_optimizer(eager, "sgd", 0.05, None, 1)
    loss, _ = train.train_step(eager, x, labels, opt)
    return eager, loss


# Scalings of a batch: the network normalizes its input's scale away (a conv without bias,
# then a batch norm), so each changes only the rounding of the step, never its exact result.
ROUNDING_SCALES = [1 + sign * e for e in (1e-7, 2e-7, 5e-7, 1e-6, 3e-6, 1e-5) for sign in (1, -1)]


def test_fused_step_matches_eager(cifar_dir):
    """The CLI's model, optimizer and step function, fused: one SGD step on a batch (of 4)
    against eager float32's distance to float64. The batch is the first on which the step
    does not hinge on a decision within float32 rounding (a ReLU input or max-pool tie a
    rounding away from flipping): eager's own step, on the input under each of
    ``ROUNDING_SCALES``, stays as close to float64. Two scalings are not enough: the first
    batch passes 1 +- 1e-7 but 4 of the 12 scalings move eager's step 1e-3 off float64, and
    so does the fused step's own rounding."""
    args = train.build_parser().parse_args(tiny_args(cifar_dir, "--batch-size", "4"))
    trainer = train.Trainer(args)
    for x, labels in trainer.batches(0):
        assert x.shape == (4, 3, 32, 32), x.shape
        exact = _float64_step(trainer.model, x, labels)
        steps = (_eager_step(trainer.model, x * s, labels)[0] for s in ROUNDING_SCALES)
        if all(rel_error(p, r) < 1e-4 for step in steps for p, r in zip(step.parameters(), exact.parameters())):
            break
    else:
        pytest.fail("every batch's step hinges on float32 rounding")
    eager, eager_loss = _eager_step(trainer.model, x, labels)
    fused = copy.deepcopy(trainer.model).set_impl("fused")
    fused_opt, _ = train.make_optimizer(fused, "sgd", 0.05, None, 1)
    fused_loss, _ = train.train_step(fused, x, labels, fused_opt)
    assert_close(fused_loss, eager_loss, torch.float32, what="loss")
    # Gradients over 4 images are ill-conditioned (eager float32 is ~1e-2 off float64 in
    # places), so each parameter is held to eager's own distance from float64.
    for (name, p), q, r in zip(eager.named_parameters(), fused.parameters(), exact.parameters(), strict=True):
        assert_as_accurate(q, p, r, what=f"{name} after one step")


# ---------------------------------------------------------------------------
# Several processes


def torchrun(argv: list[str], nproc: int = 2) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "aru_models.train", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "UnfusedWarning" not in proc.stderr, proc.stderr[-4000:]  # --impl fused ran the kernels throughout
    return proc.stdout


@pytest.mark.parametrize("sync_bn", [True, False], ids=["sync-bn", "per-process-bn"])
def test_two_processes_take_the_step_of_one(cifar_dir, tmp_path, sync_bn, capsys):
    """One SGD step on a global batch of 8, split over two gloo processes.

    With --sync-bn the batch-norm statistics are those of all 8 images, so the
    parameters and the running statistics equal those of one process. Without
    it each process normalizes its own 4 images: the parameters then equal a
    single-process step on the mean of the two half-batch losses, each computed
    with its own batch statistics -- which is not the one-process step.
    """
    common = tiny_args(cifar_dir, "--epochs", "1", "--max-steps", "1")
    train.main([*common, "--checkpoint", str(tmp_path / "one.pt")])
    (one_line,) = EPOCH_LINE.findall(capsys.readouterr().out)
    out = torchrun([*common, *(["--sync-bn"] if sync_bn else []), "--checkpoint", str(tmp_path / "two.pt")])
    lines = EPOCH_LINE.findall(out)
    assert len(lines) == 1, f"rank 0 alone should print, once:\n{out}"

    one, two = load_state(tmp_path / "one.pt")["model"], load_state(tmp_path / "two.pt")["model"]
    params = [name for name, _ in train.create_model("resnext29_tiny", 10, "eager", 0).named_parameters()]
    if sync_bn:
        # the printed loss is over both processes' images: the one-process loss
        assert abs(float(lines[0][1]) - float(one_line[1])) <= 2e-4, (lines[0], one_line)
        for name, value in one.items():
            assert_close(two[name].double(), value.double(), tol=1e-5, what=name)
        return

    trainer = train.Trainer(train.build_parser().parse_args(common))
    x, labels = next(trainer.batches(0))
    model, optimizer = trainer.model, trainer.optimizer
    halves = [F.cross_entropy(model(x[r::2]), labels[r::2]) for r in range(2)]
    optimizer.zero_grad()
    ((halves[0] + halves[1]) / 2).backward()
    optimizer.step()
    expected = model.state_dict()
    for name in params:
        assert_close(two[name], expected[name], tol=1e-5, what=name)
    assert any(not torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-6) for name in params), \
        "per-process batch norm gave the single-process step: the test cannot tell the two apart"



def torchrun_script(tmp_path: Path, body: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``body`` (Python, with ``train`` imported and ``args`` the parsed ``argv``) run as a
    script by two gloo processes."""
    script = tmp_path / "script.py"
    script.write_text("import sys\nimport torch\nimport torch.distributed as dist\nfrom aru_models import data, train\n"
                      "torch.set_num_threads(1)\nargs = train.build_parser().parse_args(sys.argv[1:])\n" + body)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_validation_of_two_processes_is_of_rank_zeros_model(tmp_path):
    """Without --sync-bn each process's last step updates its batch norms' running statistics
    from its own images (DistributedDataParallel copies rank 0's only at a training forward).
    The validation accuracy printed is of one model, rank 0's, which the checkpoint holds:
    every process validates with rank 0's buffers, and the accuracy is that of rank 0's model
    alone on every validation image."""
    root = tmp_path / "cifar"
    write_cifar(root, test=200)
    body = """
trainer = train.Trainer(args)
result = trainer.fit()
for name, buffer in trainer.model.named_buffers():
    copies = [torch.empty_like(buffer) for _ in range(2)]
    dist.all_gather(copies, buffer)
    assert torch.equal(copies[0], copies[1]), name
if trainer.rank == 0:
    correct, seen = train.evaluate(trainer.model, data.val_loader(trainer.data.val, 64), trainer.data,
                                   trainer.device).tolist()
    print("printed", result.val_accuracy, "rank 0 alone", correct / seen, "of", seen)
    assert seen == 200 and result.val_accuracy == correct / seen
dist.barrier()
trainer.close()
"""
    proc = torchrun_script(tmp_path, body, tiny_args(root, "--epochs", "1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "rank 0 alone" in proc.stdout, proc.stdout


def test_a_failing_process_ends_the_run_with_its_error(tmp_path):
    """An error in one process (here rank 0's checkpoint write on a full disk) ends the run:
    that process does not wait for the others at the end (they wait in the next step's
    gradient all-reduce, which it never joins), so it exits with its error, and the launcher
    stops the rest."""
    root = tmp_path / "cifar"
    write_cifar(root)
    body = """
save = train.Trainer._save

def full_disk(self, *a, **k):
    if self.rank == 0:
        raise OSError(28, "No space left on device")
    save(self, *a, **k)

train.Trainer._save = full_disk
train.train(args)
"""
    argv = tiny_args(root, "--epochs", "3", "--checkpoint", str(tmp_path / "run.pt"))
    proc = torchrun_script(tmp_path, body, argv, timeout=120)
    assert proc.returncode != 0
    assert "No space left on device" in proc.stdout + proc.stderr, proc.stderr[-4000:]


def test_fused_sync_bn_two_processes_take_the_step_of_one(cifar_dir, tmp_path, capsys):
    """``--impl fused --sync-bn`` over two gloo processes: the fused kernels all-gather
    each batch norm's statistics and all-reduce their gradients, so one step on a
    global batch of 4 leaves every parameter and running statistic as one eager
    process does on all 4 images."""
    common = tiny_args(cifar_dir, "--epochs", "1", "--max-steps", "1", "--batch-size", "4")
    train.main([*common, "--checkpoint", str(tmp_path / "one.pt")])
    capsys.readouterr()
    out = torchrun([*common, "--impl", "fused", "--sync-bn", "--checkpoint", str(tmp_path / "two.pt")])
    assert "(fused)" in out, out
    one, two = load_state(tmp_path / "one.pt")["model"], load_state(tmp_path / "two.pt")["model"]
    assert one.keys() == two.keys()
    for name, value in one.items():
        if value.is_floating_point():
            assert_close(two[name].double(), value.double(), tol=1e-4, what=name)
        else:
            assert torch.equal(two[name], value), name


@pytest.mark.parametrize("images, world_size, per_rank", [(10, 3, 4), (10, 3, 3), (11, 2, 5), (12, 4, 1), (7, 1, 3)])
def test_train_loader_shards_are_the_single_process_batches(images, world_size, per_rank):
    """The processes' batches of a step, interleaved, are the batch one process with
    the global batch size takes, step for step, and no process pads its share with
    repeated images (10 images over 3 processes of 4 would otherwise make one step
    of 12, two of them seen twice, where one process of 12 takes none)."""
    dataset = data.TensorImages(torch.arange(images).view(-1, 1, 1, 1), torch.arange(images))
    whole = data.train_loader(dataset, per_rank * world_size, seed=3)
    shards = [data.train_loader(dataset, per_rank, seed=3, rank=r, world_size=world_size)
              for r in range(world_size)]
    for epoch in (0, 1):
        for loader in (whole, *shards):
            loader.sampler.set_epoch(epoch)
        expected = [labels.tolist() for _, labels in whole]
        steps = [[labels.tolist() for _, labels in loader] for loader in shards]
        assert all(len(s) == len(expected) for s in steps), (len(expected), [len(s) for s in steps])
        got = [[i for step in zip(*(s[k] for s in steps)) for i in step] for k in range(len(expected))]
        assert got == expected
        assert all(len(set(batch)) == len(batch) for batch in got)


def test_train_loader_seeds_do_not_share_orders():
    """Seed s + 1 does not take seed s's orders one epoch early (as a sampler seeded with
    seed + epoch would), and a seed out of [0, 2**32) is refused."""
    dataset = data.TensorImages(torch.arange(64).view(-1, 1, 1, 1), torch.arange(64))

    def order(seed: int, epoch: int) -> list[int]:
        loader = data.train_loader(dataset, 64, seed=seed)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1].tolist()

    assert order(3, 0) == order(3, 0) != order(3, 1)
    for seed in (0, 1, 7):
        assert order(seed, 1) != order(seed + 1, 0)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
            data.train_loader(dataset, 8, seed=bad)


def test_augmentation_does_not_depend_on_the_number_of_processes():
    x = torch.randn(8, 3, 8, 8)
    whole = data.random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    for rank in range(2):
        shard = data.random_crop_flip(x[rank::2], 2, torch.Generator().manual_seed(5), rank=rank, world_size=2)
        assert torch.equal(shard, whole[rank::2])


def test_random_crop_flip_moves_and_mirrors_pixels():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(64, 1, 4, 4)
    out = data.random_crop_flip(x, 1, torch.Generator().manual_seed(0))
    padded = F.pad(x[0], (1, 1, 1, 1))[0]
    crops = {(r, c, f): padded[r:r + 4, c:c + 4].flip(-1) if f else padded[r:r + 4, c:c + 4]
             for r in range(3) for c in range(3) for f in (False, True)}
    seen = set()
    for image in out[:, 0]:
        match = [key for key, crop in crops.items() if torch.equal(image, crop)]
        assert match, f"not a padded crop of the input, flipped or not:\n{image}"
        seen.update(match)
    assert len({key[2] for key in seen}) == 2 and len({key[:2] for key in seen}) > 3


# ---------------------------------------------------------------------------
# Data


def test_cifar10_folder_is_read(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=3, test=2)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = data.load_data("cifar10", root)
        assert (len(d.train), len(d.val), d.num_classes, d.augment) == (15, 2, 10, True)
        image, label = d.train[4]  # data_batch_2, second image
        images, labels = written["data_batch_2"]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert torch.equal(image, torch.from_numpy(images[1]).view(3, 32, 32))  # rows of R, then G, then B planes
        assert label.item() == labels[1]
        assert torch.equal(d.val.labels, torch.tensor(written["test_batch"][1]))


def test_digits_split_is_fixed_and_stratified():
    a, b = data.load_digits(), data.load_digits()
    assert (len(a.train), len(a.val), a.num_classes) == (1437, 360, 10)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert a.train.images.shape == (1437, 3, 32, 32) and a.train.images.dtype == torch.float32
    assert 0.0 <= a.train.images.min() and a.train.images.max() <= 1.0
    assert torch.bincount(a.val.labels).min() >= 35  # about 36 of each digit


def test_image_folder_is_read(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 3), ("val", 1)):
        for name, color in colors.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), color).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = data.load_data("folder", tmp_path, image_size=8)
    assert (len(d.train), len(d.val), d.num_classes) == (6, 2, 2)
    image, label = d.val[1]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label.item() == 1
    assert image[2].min() == 255 and image[0].max() == 0  # dog is blue

    result = train.main(["--model", "resnext29_tiny", "--impl", "eager", "--dataset", "folder",
                         "--data-dir", str(tmp_path), "--image-size", "8", "--batch-size", "2", "--epochs", "1"])
    assert result.steps == 3 and len(result.val_accuracies) == 1


@pytest.mark.parametrize("case", ["cifar-missing", "cifar-no-dir", "cifar-malformed", "folder-missing-val"])
def test_bad_data_paths_fail_clearly(case, tmp_path, capsys):
    if case == "cifar-missing":
        argv, expected = ["--data-dir", str(tmp_path / "nowhere")], [str(tmp_path / "nowhere"), "data_batch_1"]
    elif case == "cifar-no-dir":
        argv, expected = [], ["--data-dir", "data_batch_1"]
    elif case == "cifar-malformed":
        write_cifar(tmp_path)
        (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
        argv, expected = ["--data-dir", str(tmp_path)], [str(tmp_path / "data_batch_3"), "b'data'"]
    else:
        pytest.importorskip("PIL")
        (tmp_path / "train" / "a").mkdir(parents=True)
        argv, expected = ["--data-dir", str(tmp_path)], [str(tmp_path), "val/", "train/<class>"]
    dataset = "folder" if case.startswith("folder") else "cifar10"
    expect_usage_error(["--model", "resnext29_tiny", "--impl", "eager", "--dataset", dataset, *argv],
                       capsys, *expected)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "resnet9000"], ["--model", "resnet9000"]),
    (["--amp", "fp8"], ["--amp", "fp8"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--seed", "-1"], ["--seed must be an integer in [0, 2**32); got -1"]),
    (["--seed", str(2 ** 32)], ["--seed must be an integer in [0, 2**32); got 4294967296"]),
    (["--lr", "inf"], ["--lr", "finite", "inf"]),
    (["--weight-decay", "nan"], ["--weight-decay", "nan"]),
    (["--image-size", "64"], ["--image-size", "digits images are 32x32"]),
    (["--dataset", "folder", "--image-size", "0"], ["--image-size must be at least 1; got 0"]),
    (["--data-dir", "somewhere"], ["--data-dir", "digits"]),
], ids=["model", "amp", "batch-size", "epochs", "device", "seed", "seed-2**32", "lr", "weight-decay",
        "image-size-digits", "image-size-0", "data-dir-digits"])
def test_bad_arguments_fail_clearly(argv, expected, capsys):
    expect_usage_error(["--impl", "eager", *argv], capsys, *expected)


def test_checkpoint_that_cannot_be_written_is_refused_before_training(cifar_dir, tmp_path, capsys):
    expect_usage_error(tiny_args(cifar_dir, "--checkpoint", str(tmp_path)), capsys, str(tmp_path), "directory")
    blocker = tmp_path / "file"
    blocker.write_text("")
    expect_usage_error(tiny_args(cifar_dir, "--checkpoint", str(blocker / "run.pt")), capsys,
                       "cannot write there (Not a directory)")
    expect_usage_error(tiny_args(cifar_dir, "--checkpoint", str(blocker / "sub" / "run.pt")), capsys,
                       f"cannot create its folder in {blocker}")
    assert capsys.readouterr().out == ""  # no epoch ran
    # a run refused for another reason leaves no folder behind for its checkpoint
    expect_usage_error(tiny_args(tmp_path / "no-data", "--checkpoint", str(tmp_path / "a" / "b" / "run.pt")),
                       capsys, "no-data")
    assert not (tmp_path / "a").exists()


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    path = tmp_path / "ckpt.pt"
    umask = os.umask(0o022)
    try:
        train.save_checkpoint({"epoch": 1}, path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_batch_size_must_split_over_processes(cifar_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    expect_usage_error(tiny_args(cifar_dir), capsys, "--batch-size 8", "3")


# ---------------------------------------------------------------------------
# Models and output


def test_resnext29_widths_follow_the_paper():
    with torch.device("meta"):
        for builder, groups, params in ((cifar.resnext29_8x64d, 8, 34.43e6), (cifar.resnext29_16x64d, 16, 68.16e6)):
            model = builder(impl="eager")
            assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3), builder.__name__
            for stage, width, out in ((model.layer1, 64, 256), (model.layer2, 128, 512), (model.layer3, 256, 1024)):
                assert len(stage) == 3
                conv = stage[0].conv2
                assert (conv.groups, conv.out_channels // conv.groups, stage[0].conv3.out_channels) == \
                       (groups, width, out), builder.__name__
            assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
            assert (model.layer2[0].conv2.stride, model.layer3[0].conv2.stride) == ((2, 2), (2, 2))


def test_resnext29_tiny_runs_and_switches_impl():
    assert aru_models.resnext29_tiny is cifar.resnext29_tiny
    assert "resnext29_tiny" in train.model_builders() and "resnext50_32x4d" in train.model_builders()
    model = cifar.resnext29_tiny(num_classes=7, impl="eager")
    assert isinstance(model.layer1[0], aru_models.Bottleneck)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.set_impl("fused") is model
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"fused"}
    with pytest.raises(ValueError):
        model.set_impl("cudnn")
    assert model.layer3[2].impl == "fused"
    bn = model.layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_progress_bar_draws_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        bar = train.ProgressBar(4, stream=stream)
        for i in range(1, 5):
            bar.update(i, lambda: 0.5)
        bar.close()
    assert pipe.getvalue() == ""
    assert "\r4/4 [" in tty.getvalue() and "loss 0.5000" in tty.getvalue() and tty.getvalue().endswith("\r")
