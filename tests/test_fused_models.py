"""The models' fused path against torchvision, in eval and in training mode.

Without CUDA the kernels run in Triton's interpreter, so whole-model parity
uses small images; op-dispatch checks run on the meta device, where nothing
executes, so they cover every builder.
"""

import copy
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aru_kernels
import aru_models
from helpers import OpLog, assert_as_accurate, assert_close, launch_signatures, rel_error, static_model, tolerance
from test_models import BUILDERS

tv_models = pytest.importorskip("torchvision.models")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics and affine parameters, so the batch-norm epilogue is really tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def pair(name: str, **kwargs):
    """A torchvision model with non-trivial BN and our fused model holding its weights, both eval."""
    tv = getattr(tv_models, name)(**kwargs)
    randomize_bn(tv)
    ours = getattr(aru_models, name)(impl="fused", **kwargs)
    ours.load_state_dict(tv.state_dict())
    return tv.eval(), ours.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_eval_parity_with_torchvision(name, device):
    tv, ours = pair(name)
    tv, ours = tv.to(device), ours.to(device)
    x = torch.randn(1, 3, 37, 29, device=device)  # NCHW input: the model takes any memory format
    with torch.no_grad():
        expected = tv.double()(x.double())
        got = ours(x)
    err = rel_error(got, expected)
    assert err < 1e-4, f"{name}: fused eval output differs from torchvision's (rel. error {err:.2e})"
    assert_close(got, expected, torch.float32, tol=1e-3, what=f"{name} logits")


@pytest.mark.parametrize("name", BUILDERS)
def test_fused_path_dispatches_no_aten_conv_or_batch_norm(name):
    with torch.device("meta"):
        model = getattr(aru_models, name)(impl="fused").eval()
        x = torch.empty(2, 3, 64, 64)
    log = OpLog()
    with log, torch.no_grad():
        model(x)
    banned = [op for op in log.ops if "conv" in op and "aru" not in op or "batch_norm" in op]
    assert not banned, f"{name}: the fused path still dispatched {sorted(set(banned))}"
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert log.ops.count("aru.conv_bn_act") == n_convs, "every conv (with its BN) must be one fused launch"


def test_eval_forward_follows_state_changes(device):
    """The eval path reads weights and batch-norm buffers at each call: load_state_dict and a
    training-mode forward (running statistics) are seen by the next forward."""
    tv, ours = pair("resnet18")
    tv, ours = tv.to(device), ours.to(device)
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        ours(x)
        randomize_bn(tv)
        torch.nn.init.normal_(tv.layer1[0].conv1.weight)
        tv.layer1[0].bn1.running_var.mul_(3.0)
        ours.load_state_dict(tv.state_dict())
        assert rel_error(ours(x), tv(x)) < 1e-4, "stale weights after load_state_dict"
        ours.set_impl("eager").train()
        tv.train()
        batch = torch.randn(4, 3, 16, 16, device=device)
        ours(batch)
        tv(batch)  # same running-statistics update on both
        ours.set_impl("fused").eval()
        tv.eval()
        assert rel_error(ours(x), tv(x)) < 1e-4, "stale batch norm after running statistics changed"


def test_flat_image_regions_train_like_eager(device):
    """Constant patches (the zero-padded border of a random crop) make batch-norm inputs
    equal to their batch mean exactly; normalized as ``scale*(y - mean) + shift`` they land
    exactly on the bias, so every ReLU closes where eager's does. Every gradient of a batch
    of 4 through resnext29_tiny within 2x eager float32's distance to float64."""
    eager, fused = _tiny_pair(device)
    exact = copy.deepcopy(eager).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 32, 32, generator=g)
    x[:, :, :4, :] = torch.tensor([-1.9895, -1.9803, -1.7068]).view(1, 3, 1, 1)  # black, CIFAR-normalized
    x, labels = x.to(device), torch.randint(0, 10, (4,), generator=g).to(device)
    for model, inp in ((eager, x), (fused, x), (exact, x.double())):
        F.cross_entropy(model(inp), labels).backward()
    for (name, p), q, r in zip(eager.named_parameters(), fused.parameters(), exact.parameters(), strict=True):
        assert_as_accurate(q.grad, p.grad, r.grad, factor=2.0, what=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_train_parity_with_torchvision(name, device):
    """Train mode: loss, every parameter gradient and the running statistics after one
    forward/backward, against torchvision in float64 (and its float32 run as the yardstick).

    At 33x35 the last stage normalizes over 8 values per channel (2x2 pixels, 2 images).
    Over so few, float32's own error on the batch norms' vector gradients is set by the
    draw, not by the kernels: at 37x29 (4 values) eager's error on layer4.2.bn3.weight
    was 0.35%, 1.4% and 3.8% over three draws, ours 8.7x, 0.5x and 0.04x of it, and on a
    CPU whose BLAS rounds the interpreter's dots differently eager's error on
    conv1.weight itself reached 3.5%. Stage 4's vectors pass within 10% of float64 (a
    wrong kernel is off by order 1). The stage-4 block test holds the same kernels to
    3x of float32's error at 24 values per channel."""
    tv = getattr(tv_models, name)(num_classes=10).train()
    randomize_bn(tv)
    ours = getattr(aru_models, name)(impl="fused", num_classes=10).train()
    ours.load_state_dict(tv.state_dict())
    exact = copy.deepcopy(tv).double()
    tv, ours, exact = tv.to(device), ours.to(device), exact.to(device)
    x = torch.randn(2, 3, 33, 35, device=device)
    labels = torch.randint(0, 10, (2,), device=device)
    losses = []
    for model, inp in ((ours, x), (tv, x), (exact, x.double())):
        loss = F.cross_entropy(model(inp), labels)
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[2], torch.float32, what=f"{name} training loss")
    for (pname, p), q, r in zip(ours.named_parameters(), tv.parameters(), exact.parameters(), strict=True):
        ill_conditioned = pname.startswith("layer4.") and p.dim() == 1  # batch-norm vectors over 8 values
        assert_as_accurate(p.grad, q.grad, r.grad, floor=0.1 if ill_conditioned else 1e-5,
                           what=f"{name} gradient of {pname}")
    for (bname, b), c, r in zip(ours.named_buffers(), tv.buffers(), exact.buffers(), strict=True):
        if bname.endswith("num_batches_tracked"):
            assert torch.equal(b, c), f"{bname}: {b.item()} != {c.item()}"
        else:
            assert_as_accurate(b, c, r, what=f"{name} {bname}")


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_resnext50_blocks_train_parity_with_torchvision(stage, device):
    """The first ARU of each stage of resnext50_32x4d (group widths 4, 8, 16, 32; the
    strided, downsampling ones from stage 2 on) in training mode: output, every
    gradient and the running statistics against torchvision's block in float64.

    (The whole network at a CPU-sized input normalizes its last stage over a
    handful of pixels, where float32 gradients of any implementation are
    ill-conditioned; the GPU test checks it at 224x224.)"""
    tv_block = getattr(tv_models.resnext50_32x4d(), f"layer{stage}")[0].train()
    randomize_bn(tv_block)
    ours = getattr(aru_models.resnext50_32x4d(impl="fused"), f"layer{stage}")[0].train()
    ours.load_state_dict(tv_block.state_dict())
    exact = copy.deepcopy(tv_block).double()
    tv_block, ours, exact = tv_block.to(device), ours.to(device), exact.to(device)
    cin = tv_block.conv1.in_channels
    size = {1: 7, 2: 9, 3: 7, 4: 5}[stage]
    x = torch.randn(2, cin, size, size + 2, device=device)
    grads = []
    for model, inp in ((ours, x), (tv_block, x), (exact, x.double())):
        inp = inp.clone().requires_grad_()
        out = model(inp)
        out.square().sum().backward()
        grads.append((out, inp.grad))
    assert_close(grads[0][0], grads[2][0], torch.float32, what=f"stage {stage} block output")
    assert_as_accurate(grads[0][1], grads[1][1], grads[2][1], what=f"stage {stage} input gradient")
    for (pname, p), q, r in zip(ours.named_parameters(), tv_block.parameters(), exact.parameters(), strict=True):
        assert_as_accurate(p.grad, q.grad, r.grad, what=f"stage {stage} gradient of {pname}")
    for (bname, b), c, r in zip(ours.named_buffers(), tv_block.buffers(), exact.buffers(), strict=True):
        assert_as_accurate(b, c, r, what=f"stage {stage} {bname}")


def _tiny_pair(device):
    eager = aru_models.resnext29_tiny(impl="eager").to(device).train()
    fused = copy.deepcopy(eager).set_impl("fused")
    return eager, fused


def test_three_sgd_steps_follow_eager_trajectory(device):
    eager, fused = _tiny_pair(device)
    exact = copy.deepcopy(eager).double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 12, 12, generator=g).to(device), torch.randint(0, 10, (4,), generator=g).to(device))
               for _ in range(3)]
    trajectories = []
    for model in (eager, fused, exact):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses = []
        for x, y in batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        trajectories.append(torch.stack(losses))
    # A ReLU input equal to its batch mean is a tie that float32 may decide either way
    # (a few pixels per channel in the last stage); one decided otherwise moves the third
    # loss by about 0.3%. Eager's own decisions depend on the CPU (its convolutions'
    # summation order): on one the fused path takes eager's and both drift from float64 alike,
    # on another eager drifts and the fused path stays on float64's. Either way the fused
    # trajectory is float32-close to one of the two, and no farther from float64 than eager.
    fused_to = [rel_error(trajectories[1], t) for t in (trajectories[0], trajectories[2].float())]
    assert min(fused_to) <= tolerance(torch.float32), (
        f"fused loss trajectory {trajectories[1].tolist()} is {fused_to[0]:.2e} from eager's "
        f"{trajectories[0].tolist()} and {fused_to[1]:.2e} from float64's {trajectories[2].tolist()}")
    assert_as_accurate(trajectories[1], trajectories[0], trajectories[2], what="fused loss trajectory")
    for (name, a), b, r in zip(eager.state_dict().items(), fused.state_dict().values(), exact.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b)
        else:
            assert_as_accurate(b, a, r, what=f"{name} after three steps")


def test_two_identical_runs_give_bitwise_identical_gradients(device):
    _, fused = _tiny_pair(device)
    twin = copy.deepcopy(fused)
    x = torch.randn(2, 3, 12, 12, device=device)
    y = torch.randint(0, 10, (2,), device=device)
    for model in (fused, twin):
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(fused.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), f"{name}: gradients differ between two identical runs"
    for (name, a), b in zip(fused.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), f"{name}: running statistics differ between two identical runs"


@pytest.mark.slow
def test_inductor_compiles_the_fused_training_step_to_the_same_numbers(device):
    """``torch.compile``'s default backend (inductor, which generates code around the
    operators and may choose its own strides) over a fused training step: the logits,
    every gradient and every running statistic are those of the uncompiled fused model,
    bit for bit."""
    if device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        pytest.skip("inductor on the CPU needs a C++ compiler (g++ or c++) on the PATH")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14):
        pytest.skip(f"torch {torch.__version__}'s inductor formats every fallback operator's arguments for a log "
                    "line, logged or not: past 400 s for this model's training step in torch 2.11 (2.14 formats "
                    "it only when logged)")
    torch.manual_seed(0)
    model = aru_models.resnext29_tiny(num_classes=5, impl="fused").to(device).train()
    randomize_bn(model)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12, device=device)
    out = torch.compile(model, fullgraph=True)(x)
    expected = twin(x)
    assert torch.equal(out, expected), f"logits differ by {(out - expected).abs().max().item():.3g}"
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), f"gradient of {name} differs by {(a.grad - b.grad).abs().max().item():.3g}"
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("name", ["resnet18", "resnext29_tiny"])
def test_fused_training_dispatches_no_aten_conv_or_batch_norm(name):
    """What a training step dispatches (on the meta device: the operators, not their values)."""
    with torch.device("meta"):
        model = getattr(aru_models, name)(impl="fused").train()
        x = torch.randn(2, 3, 12, 12)
    log = OpLog()
    with log:
        model(x).sum().backward()
    banned = [op for op in log.ops if ("conv" in op and "aru" not in op) or "batch_norm" in op]
    assert not banned, f"{name}: training on the fused path dispatched {sorted(set(banned))}"
    assert "aru.conv_bn_stats" in log.ops
    if hasattr(model, "maxpool"):  # the stem's end is one pass: no full-resolution ReLU output, no int64 indices
        assert log.ops.count("aru.bn_relu_maxpool") == 1 and log.ops.count("aru.bn_relu_maxpool_backward") == 1
        assert not [op for op in log.ops if "max_pool" in op or op == "aru.bn_add_relu"]
    else:
        assert "aru.bn_add_relu" in log.ops
    # the stem's weight gradient (its input needs none) writes no dL/dy' for an input gradient; a
    # strided ResNet stem's runs over 2x2 pixel blocks of the image (dL/dW' over 16 channels)
    last = len(log.ops) - 1 - log.ops[::-1].index("aru.conv_weight_grad")
    stem_channels = 16 if hasattr(model, "maxpool") else 3
    assert log.shapes[last][0][1] == stem_channels and log.shapes[last][1] == (0,), log.shapes[last]
    # no elementwise addition over an activation [N, C, H, W]: the residual gradient is added in a conv epilogue
    adds = [(op, shapes) for op, shapes in zip(log.ops, log.shapes)
            if op in ("aten.add", "aten.add_") and any(len(s) == 4 and s[0] == x.shape[0] for s in shapes)]
    assert not adds, f"{name}: training on the fused path added activations: {adds}"
    # nothing else passes over an activation: the head's global average pool is the last block end's
    # (its output never written), and no zero gradient is written for an output nothing differentiates
    full = sorted({op for op, shapes in zip(log.ops, log.shapes) if not op.startswith("aru.")
                   and op not in ("aten.view", "aten.detach")  # (the image itself is made channels_last)
                   and any(len(s) == 4 and s[0] == x.shape[0] and s != tuple(x.shape) for s in shapes)})
    assert not full, f"{name}: training on the fused path passed over activations with {full}"
    # the blocks are one node: only the last block's end has a backward pass of its own
    blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5) if hasattr(model, f"layer{i}"))
    assert log.ops.count("aru.bn_add_relu_grad_sums") == 1
    # (the others in an input-gradient epilogue: of a conv alone, or of a 1x1 conv's two gradients in one launch)
    ends_in_pointwise = sum(op == "aru.pointwise_conv_grads" and shapes[2][0] == 3  # [3, C]: a block end's sums
                            for op, shapes in zip(log.ops, log.shapes))
    assert log.ops.count("aru.conv_input_grad_block_end") + ends_in_pointwise == blocks - 1
    # a block starting with a 1x1 conv computes the previous block's end as that conv loads its input
    fused_ends = blocks - 1 if name.startswith("resnext") else 0
    assert log.ops.count("aru.block_end_conv_bn_stats") == fused_ends
    assert log.ops.count("aru.bn_add_relu_mask") == blocks - fused_ends
    # a stride-1 1x1 conv of at most 256 outputs takes its weight and input gradients in one launch
    convs = [c for i in range(1, 5) if hasattr(model, f"layer{i}") for blk in getattr(model, f"layer{i}")
             for c in blk.modules() if isinstance(c, torch.nn.Conv2d)]
    one_launch = sum(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.groups == 1 and c.out_channels <= 256
                     for c in convs)
    assert log.ops.count("aru.pointwise_conv_grads") == one_launch and (one_launch > 0) == name.startswith("resnext")


def test_hooked_block_is_called_in_training(device):
    """A block with a forward hook runs as a call of its own (the hook sees its output);
    the blocks before and after it still run as nodes, with the same results."""
    torch.manual_seed(0)
    model = aru_models.resnext29_tiny(impl="fused").to(device).train()
    twin = copy.deepcopy(model)
    seen = []
    model.layer1[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 12, 12, device=device)
    log = OpLog()
    with log:
        out = model(x)
        out.square().sum().backward()
    assert seen == [torch.Size([2, 32, 12, 12])]
    # nodes of 1 and 7 blocks around the hooked one: 6 block ends inside a node, whose gradient the
    # next block's conv1 takes (a 1x1's one-launch gradients, 3 rows of sums, or an input gradient)
    ends = log.ops.count("aru.conv_input_grad_block_end") + sum(
        op == "aru.pointwise_conv_grads" and shapes[2][0] == 3 for op, shapes in zip(log.ops, log.shapes))
    assert ends == 6, ends
    out_twin = twin(x)
    out_twin.square().sum().backward()
    assert_close(out, out_twin, torch.float32, what="output")
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, torch.float32, what=f"gradient of {name}")


def test_gradients_accumulate_over_two_backward_passes(device):
    """Two backward passes without zero_grad leave every parameter's gradient at twice one
    pass's, exactly: no two parameters' .grad share memory (the last batch norm's bias and
    the downsample's did, so each pass added to both twice)."""
    torch.manual_seed(0)
    model = aru_models.resnext29_tiny(impl="fused").to(device).train()
    randomize_bn(model)
    x = torch.randn(2, 3, 12, 12, device=device)
    model(x).square().sum().backward()
    once = {name: p.grad.clone() for name, p in model.named_parameters()}
    starts = [p.grad.data_ptr() for p in model.parameters()]
    assert len(set(starts)) == len(starts), "parameters share a gradient tensor"
    model(x).square().sum().backward()  # (batch statistics: the same step again)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, 2 * once[name]), name


def test_own_blocks_and_stem_the_kernels_cannot_run_now_run_eagerly(device):
    """impl='fused' where the kernels cannot compute a module as it is at that call: a
    block whose batch norms are partly in eval mode, hooks on a block's conv or on the
    stem's batch norm. Those run as the eager forward (an UnfusedWarning says why), the
    rest fused; the step is the eager twin's."""
    torch.manual_seed(0)
    model = aru_models.resnext29_tiny(impl="fused").to(device).train()
    randomize_bn(model)
    model.layer2[1].bn3.eval()
    twin = copy.deepcopy(model).set_impl("eager")
    seen = []
    for m in (model, twin):
        m.layer3[0].conv2.register_forward_hook(lambda mod, args, out: out * 0.5)
    model.bn1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 12, 12, device=device)
    with pytest.warns(aru_models.UnfusedWarning) as record:
        out = model(x)
    messages = " | ".join(str(r.message) for r in record)
    for why in ("training and in eval mode at once", "hooks on conv2", "the stem runs on PyTorch's path"):
        assert why in messages, messages
    assert seen == [torch.Size([2, 8, 12, 12])]
    expected = twin(x)
    assert_close(out, expected, torch.float32, what="logits")
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, torch.float32, what=f"gradient of {name}")


@pytest.mark.parametrize("where", ["in a block", "across blocks"])
def test_a_batch_norm_used_twice_updates_its_running_statistics_twice(where, device):
    """One BatchNorm2d module applied after two convs (``bn2 = bn1``): in training PyTorch
    updates its running statistics once a use, in order. In one block, that block runs as
    the eager forward (an UnfusedWarning says why); across blocks, the later block starts
    a new node, after the earlier one's update. Outputs, gradients and every running
    statistic are the eager twin's."""
    torch.manual_seed(0)
    model = aru_models.resnext29_tiny(num_classes=5, impl="fused").to(device).train()
    randomize_bn(model)
    if where == "in a block":
        model.layer2[1].bn2 = model.layer2[1].bn1
    else:
        model.layer2[2].bn1 = model.layer2[1].bn1
    twin = copy.deepcopy(model).set_impl("eager")  # (the copy shares the module as the model does)
    x = torch.randn(2, 3, 12, 12, device=device)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model(x)
    messages = [str(r.message) for r in record if issubclass(r.category, aru_models.UnfusedWarning)]
    if where == "in a block":
        assert messages and all("a batch norm used by two of its convolutions" in m for m in messages), messages
    else:
        assert messages == [], messages
    expected = twin(x)
    assert_close(out, expected, torch.float32, what="logits")
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert_close(a, b, torch.float32, what=name)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, torch.float32, what=f"gradient of {name}")


def test_a_single_3d_image_is_refused_as_batch_norm_refuses_it(device):
    """F.conv2d takes one image without a batch dimension, nn.BatchNorm2d does not: a
    fused model refuses it with the batch norm's message, in both modes, as eager does."""
    x = torch.randn(3, 16, 16, device=device)
    for model in (aru_models.resnext29_tiny(num_classes=5, impl="fused"),
                  aru_models.fuse(tv_models.resnet18(num_classes=5), strict=True)):
        model = model.to(device)
        for mode in ("eval", "train"):
            getattr(model, mode)()
            for m in (model, copy.deepcopy(model).set_impl("eager") if hasattr(model, "set_impl")
                      else aru_models.fuse(copy.deepcopy(model), impl="eager")):
                with pytest.raises(ValueError, match=r"^expected 4D input \(got 3D input\)$"):
                    m(x)


@pytest.mark.parametrize("build", ["own", "torchvision"])
def test_float64_model_runs_eagerly(build, device):
    """``model.double()`` on a fused model (a check against a float64 reference): the kernels
    compute in float32, float16 and bfloat16, so its stem and blocks run as the eager
    forward, with an UnfusedWarning saying why; eval and training, outputs and gradients
    those of the eager twin."""
    torch.manual_seed(0)
    if build == "own":
        model = aru_models.resnext29_tiny(num_classes=5, impl="fused")
    else:
        model = aru_models.fuse(tv_models.resnet18(num_classes=5), strict=True)
    randomize_bn(model)
    model = model.to(device).double()
    twin = copy.deepcopy(model)
    aru_models.fuse(twin, impl="eager")
    x = torch.randn(2, 3, 16, 16, device=device, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(twin, mode)()
        with pytest.warns(aru_models.UnfusedWarning) as record:
            out = model(x)
        messages = {str(r.message) for r in record}
        assert any("the stem runs on PyTorch's path" in m for m in messages), messages
        assert all("float64 parameters" in m for m in messages), messages
        expected = twin(x)
        assert out.dtype == torch.float64
        assert_close(out, expected, tol=1e-12, what=f"{mode} logits")
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, tol=1e-12, what=f"gradient of {name}")
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert_close(a, b, tol=1e-12, what=name)


def test_own_model_with_group_norm_is_reported_and_runs_eagerly():
    """This package's model built with a norm layer the kernels do not compute: fuse reports
    it (and with strict refuses, changing nothing), and impl='fused' runs it as the eager
    forward instead of failing inside the kernels' path."""
    def gn(c):
        return torch.nn.GroupNorm(2, c)
    model = aru_models.resnet18(num_classes=5, norm_layer=gn, impl="eager").eval()
    with pytest.raises(ValueError, match=r"layer1\.0: .*got GroupNorm"):
        aru_models.fuse(model, strict=True)
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"eager"}
    with pytest.warns(aru_models.UnfusedWarning, match="got GroupNorm"):
        aru_models.fuse(model)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        expected = copy.deepcopy(model).set_impl("eager")(x)
        with pytest.warns(aru_models.UnfusedWarning, match="got GroupNorm"):
            assert torch.equal(model(x), expected)


def test_stem_pool_runs_as_module_when_it_cannot_be_fused(device):
    """In training the stem's max-pool is one pass with its batch norm and ReLU; a pool
    with a hook, or one the kernel does not compute (ceil mode, a window over 11), runs as
    the module, with the same results where the two agree."""
    from aru_models.fused import stem_forward

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(16).to(device)
    randomize_bn(bn)
    x = torch.randn(2, 3, 20, 18, device=device)
    hooked = torch.nn.MaxPool2d(3, 2, 1)
    seen = []
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    results = []
    for pool in (torch.nn.MaxPool2d(3, 2, 1), hooked, torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                 torch.nn.MaxPool2d(13, 2, 6)):
        log = OpLog()
        with log:
            out = stem_forward([(conv, bn)], x, pool)
            out.square().sum().backward()
        results.append((log.ops, out, [p.grad.clone() for p in (conv.weight, bn.weight, bn.bias)]))
        conv.zero_grad()
        bn.zero_grad()
    (fused_ops, out, grads), (module_ops, out_m, grads_m), (ceil_ops, out_c, _), (wide_ops, out_w, _) = results
    assert "aru.bn_relu_maxpool" in fused_ops and not [op for op in fused_ops if "max_pool" in op]
    for ops in (module_ops, ceil_ops, wide_ops):
        assert "aten.max_pool2d_with_indices" in ops and "aru.bn_relu_maxpool" not in ops
    assert seen == [torch.Size([2, 16, 5, 5])] and out_c.shape == (2, 16, 6, 5)  # ceil mode's extra row
    assert out_w.shape == out.shape
    assert_close(out, out_m, torch.float32, what="output")
    for name, a, b in zip(("conv weight", "bn weight", "bn bias"), grads, grads_m):
        assert_close(a, b, torch.float32, what=f"gradient of {name}")


def test_torch_compile_fullgraph_fused_block_forward_and_backward(device):
    block = aru_models.resnext50_32x4d(impl="fused").layer2[0].to(device).train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 256, 6, 5, device=device).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    out_c.float().square().sum().backward()
    out = twin(x)
    out.float().square().sum().backward()
    assert_close(out_c, out, torch.float32, what="compiled block output")
    for (name, a), b in zip(block.named_parameters(), twin.parameters()):
        assert_close(a.grad, b.grad, torch.float32, what=f"compiled block gradient of {name}")


def test_from_torchvision_fused(device):
    tv = tv_models.resnet18(num_classes=7)
    randomize_bn(tv)
    tv = tv.eval().to(device)
    ours = aru_models.from_torchvision(tv, impl="fused")
    x = torch.randn(1, 3, 24, 24, device=device)
    with torch.no_grad():
        assert rel_error(ours(x), tv(x)) < 1e-4


def test_torch_compile_fullgraph_traces_fused_model(device):
    _, ours = pair("resnet18")
    ours = ours.to(device)
    x = torch.randn(1, 3, 16, 16, device=device)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), ours(x), torch.float32, what="compiled fused resnet18")


KERNEL_ROW = {"kernel", "pass", "conv", "launches", "grid", "num_warps", "registers", "spill_bytes",
              "shared_bytes", "hgmma", "hmma", "dyn_instr_per_warp", "mma_flops_per_warp", "issue_floor_us",
              "dram_floor_us", "tensor_floor_us", "floor_us", "loads", "stores", "loops", "static_instr", "loop_sizes", "nested_sizes", "loop_trips"}


def test_static_report_counts_each_launch_loop_trips():
    """One compiled kernel serves launches of other loop trips: each is counted with its own."""
    from dataclasses import replace

    from aru_kernels.aot import KernelReport

    report = KernelReport(registers=32, spill_bytes=0, shared_bytes=0, hgmma=0, hmma=0, loads={}, stores={},
                          static_instr=100, loops=2, dyn_instr_per_warp=100, loop_sizes=(10, 4))
    assert report.with_trips([3, 5]).dyn_instr_per_warp == 100 + 2 * 10 + 4 * 4
    assert report.with_trips([0, 1]).dyn_instr_per_warp == 100  # a loop run at most once counts its body once
    assert report.with_trips([7]).with_trips([2, 2]).dyn_instr_per_warp == 100 + 10 + 4
    # a loop with a loop of 6 instructions inside: its own 4 run per outer trip, the inner 6 per inner trip
    nested = replace(report, nested_sizes=(0, 6), loop_sizes=(10, 10))
    assert nested.with_trips([3, (2, 9)]).dyn_instr_per_warp == 100 + 2 * 10 + 1 * 4 + 8 * 6
    assert nested.with_trips([3, 5]).dyn_instr_per_warp == 100 + 2 * 10 + 4 * 10  # a bare count: the whole body


def test_static_issue_floor_is_the_busiest_scheduler():
    """The issue floor counts the busiest multiprocessor's programs and its busiest scheduler's
    warps: 128 programs on 132 multiprocessors take as long as 132, 133 twice as long; a program
    of 2 warps alone on a multiprocessor leaves two of its four schedulers idle."""
    from aru_kernels.aot import H200, KernelReport
    from aru_kernels.launch import Launch

    report = KernelReport(registers=32, spill_bytes=0, shared_bytes=0, hgmma=0, hmma=0, loads={}, stores={},
                          static_instr=1000, loops=0, dyn_instr_per_warp=1980)
    x = torch.empty(0, device="meta")

    def issue(programs, warps):
        launch = Launch(kernel=None, grid=(programs,), args={"x": x}, num_warps=warps, num_stages=1, role="t", meta={})
        return report.floors(launch, H200)[0]

    one = 2 * 1980 / (H200.clock_GHz * 1e3)  # 8 warps: 2 a scheduler
    assert issue(128, 8) == pytest.approx(one) and issue(132, 8) == pytest.approx(one)
    assert issue(133, 8) == pytest.approx(2 * one) and issue(264, 8) == pytest.approx(2 * one)
    assert issue(132, 2) == pytest.approx(one / 2) and issue(264, 2) == pytest.approx(one / 2)
    assert issue(4 * 132, 4) == pytest.approx(2 * one)


def test_resident_warps_follow_the_occupancy_limits():
    """The warps a multiprocessor holds at once, the first of the limits reached: registers
    (allocated in units of 8 a thread), shared memory (1 KiB reserved a block), 64 warps,
    32 blocks, and the programs the busiest multiprocessor gets."""
    from aru_kernels.aot import resident_warps

    assert resident_warps(255, 0, 2, 528, 132) == 8  # tap_grads_kernel: 256 x 32 registers a warp
    assert resident_warps(138, 0, 4, 528, 132) == 12  # 144 a thread: 14 warps' worth, 3 programs of 4
    assert resident_warps(100, 0, 2, 10**4, 132) == 18  # 104 a thread: 19 warps' worth, 9 programs of 2
    assert resident_warps(234, 0, 8, 6272, 132) == 8
    assert resident_warps(40, 0, 4, 10**4, 132) == 48  # registers for 51 warps: 12 programs of 4
    assert resident_warps(64, 100_000, 4, 10**4, 132) == 8  # shared memory for 2 programs
    assert resident_warps(64, 0, 8, 128, 132) == 8  # one program a multiprocessor at most
    assert resident_warps(64, 0, 8, 133, 132) == 16
    assert resident_warps(16, 0, 1, 10**5, 132) == 32  # 32 blocks


def test_static_tensor_floor_counts_each_mma_by_its_shape():
    """A warpgroup MMA is shared by its 4 warps, a warp MMA is the warp's own, a TF32 FLOP
    costs two bf16 ones; loops repeat them as they repeat instructions, and the floor is the
    busiest multiprocessor's FLOPs at its share of the matrix rate."""
    from aru_kernels.aot import H200, KernelReport, mma_flops
    from aru_kernels.launch import Launch

    assert mma_flops("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT") == 2 * 64 * 128 * 16 // 4
    assert mma_flops("HGMMA.64x32x8.F32.TF32 R24, gdesc[UR4], R24") == 2 * 64 * 32 * 8 * 2 // 4
    assert mma_flops("HMMA.16816.F32.BF16 R4, R8, R12, R4") == 2 * 16 * 8 * 16
    assert mma_flops("HMMA.1688.F32.F16 R4, R8, R12, R4") == 2 * 16 * 8 * 8
    assert mma_flops("HFMA2.MMA R0, -RZ, RZ, 0, 0") == 0 and mma_flops("IMAD R1, R2, R3, R4") == 0
    report = KernelReport(registers=32, spill_bytes=0, shared_bytes=0, hgmma=1, hmma=0, loads={}, stores={},
                          static_instr=100, loops=1, dyn_instr_per_warp=100, loop_sizes=(10,),
                          static_mma_flops=5000, loop_mma_flops=(4000,))
    assert report.with_trips([3]).mma_flops_per_warp == 5000 + 2 * 4000
    x = torch.empty(0, device="meta")

    def tensor(programs, warps, trips):
        launch = Launch(kernel=None, grid=(programs,), args={"x": x}, num_warps=warps, num_stages=1, role="t", meta={})
        return report.with_trips([trips]).floors(launch, H200)[2]

    one = 8 * 13000 / (H200.mm_TFLOPs * 1e6 / H200.sms)  # µs: one program of 8 warps, 13000 FLOPs each
    assert tensor(128, 8, 3) == pytest.approx(one) and tensor(133, 8, 3) == pytest.approx(2 * one)
    assert tensor(132, 4, 3) == pytest.approx(one / 2) and tensor(132, 8, 1) == pytest.approx(one * 5000 / 13000)


def test_training_step_launches_fill_the_multiprocessors():
    """resnext50_32x4d's training step at batch 256 under the GPU's plans (the static model's
    recording, meta device): every launch runs at least one program a multiprocessor of an
    H200, except the batch-norm finalize (a per-channel vector op: C / BLOCK_C programs) and
    the 8-warp weight gradients of one wave of 128 programs (one a multiprocessor; their tiles,
    a power of two, do not divide 132, and filling the last 4 costs more than it gains:
    benchmarks/NOTES.md)."""
    from aru_kernels import plans
    from aru_kernels.aot import H200

    aot_check = static_model()
    with plans.device_block_sizes():
        launches = aot_check.record_step("resnext50_32x4d", "fused", "train", 256, 224, torch.bfloat16).launches
    assert len(launches) > 300
    short = [(l.kernel.fn.__name__, l.role, l.grid, l.num_warps) for l in launches if l.programs < H200.sms]
    one_wave = [s for s in short if s[1] in ("wgrad", "wgrad_dgrad") and s[3] == 8 and s[2][0] * s[2][1] == 128]
    finalize = [s for s in short if s[1] == "bn_finalize"]
    assert finalize and sorted(short) == sorted(finalize + one_wave), sorted(set(short) - set(finalize + one_wave))
    assert len(one_wave) <= 23


def _narrow_seresnext26d():
    timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e .[test]")
    model = timm.create_model("seresnext26d_32x4d", pretrained=False, layers=(1, 1, 1, 1),
                              channels=(16, 32, 64, 128), cardinality=8, base_width=16)
    return aru_models.fuse(model)


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("name,channels_last", [("resnext29_tiny", True), ("resnext29_tiny", False),
                                                ("seresnext26d", True)])
def test_static_autocast_step_launches_what_autocast_launches(name, channels_last, mode):
    """The static model's and the cache warm-up's recording of a step under autocast (meta
    tensors, where ``torch.autocast`` does not apply: ``aot_check.fused_autocast``) makes the
    very launches of a float32 model run under a real ``torch.autocast`` to bfloat16 (here
    on CPU tensors, the launches recorded, not run; the backward outside autocast, as
    benchmarks/run.py runs it): the operators read the float32 weights and vectors in
    place; PyTorch's convolutions of a squeeze-excitation cast theirs. A model converted to
    bfloat16 launches other specializations. Likewise for a model and input left in the
    default layout (``channels_last=False``: the GPU tests' models, moved with ``.cuda()``)."""
    from aru_kernels.launch import recording

    aot_check = static_model()
    build = (lambda: aru_models.resnext29_tiny(impl="fused")) if name == "resnext29_tiny" else _narrow_seresnext26d
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build().to(memory_format=layout)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=layout)
    real = aot_check.StepRecorder()
    with recording(), real:
        if mode == "infer":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model.eval()(x)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.train()(x).float().sum()
            loss.backward()
    emulated = aot_check.record_model_step(build, mode, 2, 32, torch.bfloat16, autocast=True,
                                           channels_last=channels_last)
    in_bf16 = aot_check.record_model_step(build, mode, 2, 32, torch.bfloat16, channels_last=channels_last)
    assert len(real.launches) > 10
    assert launch_signatures(emulated.launches) == launch_signatures(real.launches)
    assert launch_signatures(in_bf16.launches) != launch_signatures(real.launches)
    weights = [l.args["w_ptr"] for l in real.launches if "w_ptr" in l.args]
    assert weights and all(w.dtype == torch.float32 for w in weights)  # read in place, cast as loaded


def test_static_memory_count_follows_live_storages():
    """The static model's memory count: storages alive at once, a view not counted again,
    a freed one no longer."""
    aot_check = static_model()

    rec = aot_check.StepRecorder()
    with rec:
        a = torch.empty(1000, device="meta")
        b = torch.empty(2000, device="meta")
        view = b[10:].view(2, 995)
        del a
        c = torch.empty(500, device="meta")
    assert rec.peak_bytes == 3000 * 4
    assert sum(n for _, n in rec.live.values()) == 2500 * 4
    del view, c


def test_fused_training_step_frees_activations_as_its_backward_passes_them():
    """Counted on the meta device (the static model's count): the fused training step of
    resnext50_32x4d at batch 256 holds at its peak no more than 5% over what its forward
    leaves for the backward. Its blocks run as one autograd node, which frees each
    block's activations as the backward passes it (held to the node's end, the peak was
    13% over the forward's). The stride-1 grouped 3x3s of 16-channel packs recompute their
    normalized inputs in their gradient launch (``aru::tap_conv_grads``), so the forward
    does not hold them; ``recompute_normalized_inputs`` holds the others' (the strided
    3x3s' and stage 4's, 0.72 GiB) no more either."""
    aot_check = static_model()

    with torch.device("meta"):
        model = aru_models.resnext50_32x4d(impl="fused").to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.empty(256, 3, 224, 224, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    model.train()
    forward = aot_check.StepRecorder()
    with forward:
        out = model(x)
    del out
    step = aot_check.StepRecorder()
    with step:
        model(x).float().sum().backward()
    print(f"forward {forward.peak_bytes / 2**30:.2f} GiB, step {step.peak_bytes / 2**30:.2f} GiB")
    assert forward.peak_bytes > 10 * 2**30  # (the activations of batch 256 are counted)
    assert step.peak_bytes <= 1.05 * forward.peak_bytes
    assert step.peak_bytes < 11 * 2**30  # 11.84 GiB while every grouped 3x3's normalized input was held
    # the other grouped 3x3s' normalized inputs, 0.72 GiB, recomputed by the backward instead of held
    lean = aot_check.StepRecorder()
    with aru_kernels.recompute_normalized_inputs(), lean:
        model(x).float().sum().backward()
    print(f"step with recomputed normalized inputs {lean.peak_bytes / 2**30:.2f} GiB")
    assert lean.peak_bytes <= step.peak_bytes - 0.7 * 2**30


_WIDEST_POINTWISE_GRADS = """
import sys, torch
sys.path.insert(0, "benchmarks")
import aot_check
from aru_kernels import aot
from aru_kernels.launch import recording
from aru_kernels.pointwise_ops import pointwise_conv_grads
cl, v = torch.channels_last, torch.empty(256, device="meta")
x = torch.empty(2, 128, 4, 4, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
dy = torch.empty(2, 256, 4, 4, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
w, u = torch.empty(256, 128, 1, 1, dtype=torch.bfloat16, device="meta"), torch.empty(128, device="meta")
with recording() as launches:  # the widest block of outputs, with the input's batch-norm prologue
    pointwise_conv_grads._init_fn(x, dy, w, dy, v, v, v, in_mean=u, in_scale=u, in_shift=u, in_relu=True)
rows, errors = aot_check.kernel_rows(launches, 90, aot.H200)
print(rows[0]["shared_bytes"], aot.H200.max_shared_bytes)
for e in errors:
    print(e)
"""


@pytest.mark.slow
def test_widest_pointwise_gradients_fit_shared_memory():
    """A 1x1 convolution's one-launch gradients at 256 outputs (the widest, ResNeXt-50's
    stage-1 conv3), compiled for sm_90 as the JIT would: the block's shared memory fits
    the 227 KiB an H200 block may have, so it launches (a three-deep pipeline did not)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WIDEST_POINTWISE_GRADS], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    shared, limit = map(int, lines[0].split())
    assert 0 < shared <= limit and lines[1:] == [], proc.stdout


@pytest.mark.slow
def test_static_cost_model_of_a_training_step(tmp_path):
    """benchmarks/aot_check.py on CPU: every kernel a training step of resnext29_tiny
    launches, compiled for sm_90 as the JIT would, with floors and traffic."""
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "aot_check.py"), "--model", "resnext29_tiny",
         "--mode", "train", "--arch", "90", "--batch-size", "8", "--img-size", "32", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1200,
    )
    print(proc.stdout[-6000:])  # the per-kernel table (pytest -s shows it)
    assert proc.returncode == 0, f"static model failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    import json

    from aru_kernels.aot import loop_extra

    report = json.loads(out.read_text())
    assert {"arch", "triton", "model", "mode", "batch_size", "dtype", "gpu_profile", "kernels",
            "total_floor_ms", "floor_img_per_s", "traffic", "memory",
            "recompute_normalized"} <= set(report)
    rows = report["kernels"]
    # the statistics' gradient is folded into the weight-gradient launch: no pass of its own
    # (and a 1x1 conv's two gradients are one launch where its outputs fit one block: wgrad_dgrad;
    # the last block end takes the head's average pool: bn_add_relu_pool; a weight gradient
    # computed in slabs over the pixels is summed into the weight by one launch: wgrad_sum)
    assert {r["pass"] for r in rows} == {"fwd", "dgrad", "wgrad", "wgrad_dgrad", "wgrad_sum", "bn_finalize",
                                         "bn_add_relu", "bn_add_relu_pool", "bn_add_relu_bwd"}
    weight_grads = sum(r["launches"] for r in rows if r["pass"] in ("wgrad", "wgrad_dgrad"))
    assert 0 < sum(r["launches"] for r in rows if r["pass"] == "wgrad_sum") <= weight_grads
    for r in rows:
        assert set(r) == KERNEL_ROW, sorted(set(r) ^ KERNEL_ROW)
        assert r["dyn_instr_per_warp"] > 0
        assert r["floor_us"] == max(r["issue_floor_us"], r["dram_floor_us"], r["tensor_floor_us"])
        # each row counts its own launches' loop trips (one compile serves launches of other trips)
        assert r["dyn_instr_per_warp"] == r["static_instr"] + loop_extra(
            r["loop_sizes"], r["nested_sizes"], r["loop_trips"]), r
        assert (r["conv"] is not None) == (r["pass"] in ("fwd", "dgrad", "wgrad", "wgrad_dgrad")), r
        if r["conv"] is not None and any(r["loop_trips"]):  # (an output phase no tap reaches has no K loop)
            # wgmma, or mma.sync for tiles under 64 rows
            assert r["hgmma"] + r["hmma"] > 0, f"{r['pass']} {r['conv']}: no tensor-core instruction"
        c = r["conv"]
        if r["pass"] == "fwd" and c["kh"] == c["kw"] == 1 and c["groups"] == 1:
            # the tensor-core FLOPs the code issues: the conv's own, its channels padded to the
            # smallest tile (16) and at most the pixel tiles' padding more
            programs = int(np.prod(r["grid"]))
            issued = r["mma_flops_per_warp"] * r["num_warps"] * programs
            pixels = report["batch_size"] * -(-c["h"] // c["stride"]) * -(-c["w"] // c["stride"])
            assert 1 <= issued / (2 * pixels * max(16, c["c_in"]) * max(16, c["c_out"])) < 2, r
    assert all(r["hgmma"] > 0 for r in rows if r["pass"] == "fwd" and r["conv"]["groups"] > 1), \
        "grouped convs should use Hopper's wgmma on sm_90"
    total = sum(r["launches"] * r["floor_us"] for r in rows) / 1e3
    # (rows carry floors rounded to 1 ns)
    assert report["total_floor_ms"] == pytest.approx(total, rel=1e-3, abs=1e-6 * sum(r["launches"] for r in rows))
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in aru_models.resnext29_tiny().modules())
    assert sum(r["launches"] for r in rows if r["pass"] == "fwd") == n_convs
    assert sum(r["launches"] for r in rows if r["pass"] == "bn_finalize") == n_convs
    traffic = report["traffic"]
    assert traffic["eager_GB"] > 0 and traffic["fused_GB"] > 0
    assert 0 < report["memory"]["fused_peak_GiB"] < report["memory"]["eager_peak_GiB"]
    assert "aru::bn_stats_backward" not in traffic["by_op"]["fused"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_bf16_parity_at_real_size(name):
    tv, ours = pair(name)
    tv, ours = tv.cuda().to(memory_format=torch.channels_last), ours.cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = tv.double()(x.double())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = ours(x)
            eager_bf16 = tv.float()(x)
    err, err_eager = rel_error(got, expected), rel_error(eager_bf16, expected)
    assert got.dtype == torch.bfloat16
    assert err < max(2e-2, 2 * err_eager), f"bf16 rel. error {err:.2e} (cuDNN bf16: {err_eager:.2e})"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_bf16_train_gradient_parity_at_real_size(name):
    """bf16 autocast training step at batch 8, 224x224: every gradient as close to
    float64 as torchvision's own bf16 autocast run is (within 3x)."""
    tv = getattr(tv_models, name)().cuda().to(memory_format=torch.channels_last).train()
    ours = getattr(aru_models, name)(impl="fused").cuda().train()
    ours.load_state_dict(tv.state_dict())
    exact = copy.deepcopy(tv).double()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (8,), device="cuda")
    for model in (ours, tv):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
    F.cross_entropy(exact(x.double()), labels).backward()
    for (pname, p), q, r in zip(ours.named_parameters(), tv.parameters(), exact.parameters(), strict=True):
        assert_as_accurate(p.grad, q.grad, r.grad, floor=1e-3, what=f"{name} bf16 gradient of {pname}")
