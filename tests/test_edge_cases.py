"""The cases other projects' convolution and batch-norm test grids hold (PyTorch's
own, attorch's, FlagGems'), on the fused operators, against float64 PyTorch.

Kernel shapes and geometry (non-square kernels, padding past k/2, dilation,
depthwise, empty batch, zero channels, 1x1 images), NaN and inf, every way a
user can change a weight or a batch-norm buffer, ``nn.BatchNorm2d``'s options
and its errors, and launches that span several tiles, weight-gradient splits
and finalize blocks (forced on small shapes with the GPU's block sizes). Every
test runs with ``poisoned``: an output element a kernel does not write is NaN.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import aru_kernels
from aru_kernels import plans
from aru_kernels import reference as ref
from aru_models.fused import conv_bn
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("poisoned")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def leaf(t):
    return t.detach().clone().requires_grad_()


def exact(t):
    return None if t is None else t.detach().double().requires_grad_()


def grads_match(ours: dict, refs: dict, out, out_ref, what: str) -> None:
    """Backpropagate the same random gradient through both and compare every leaf's gradient."""
    g = torch.randn_like(out_ref)
    out.backward(g.float())
    out_ref.backward(g)
    for name, t in ours.items():
        assert_close(t.grad, refs[name].grad, torch.float32, what=f"{what}: gradient of {name}")


# -- convolution geometry ---------------------------------------------------------------------

# (kh, kw, stride, padding, dilation, groups, cin, cout, h, w): kernel sizes 1-7, non-square,
# padding past k/2, dilation, dense / 2 / 4 groups / depthwise, in != out channels.
GEOMETRY = {
    "k1": (1, 1, 1, 0, 1, 1, 6, 10, 5, 6),
    "k2s2": (2, 2, 2, 0, 1, 1, 5, 7, 6, 7),
    "k3p3": (3, 3, 1, 3, 1, 2, 6, 4, 4, 5),
    "k4p1": (4, 4, 1, 1, 1, 4, 8, 12, 6, 5),
    "k5x3": (5, 3, 1, 2, 1, 1, 3, 5, 7, 6),
    "k3x5s2": (3, 5, 2, 2, 1, 2, 4, 6, 7, 8),
    "k6s3p4": (6, 6, 3, 4, 1, 1, 4, 3, 9, 8),
    "k7s2p3": (7, 7, 2, 3, 1, 1, 3, 8, 10, 9),
    "depthwise": (3, 3, 1, 1, 1, 8, 8, 8, 5, 6),
    "depthwise_x2": (3, 3, 2, 1, 1, 6, 6, 12, 7, 7),
    "dil2_g4": (3, 3, 1, 2, 2, 4, 16, 16, 7, 6),
    "dil3_s2": (3, 3, 2, 1, 3, 1, 4, 6, 9, 10),
    "dil2_k5x3": (5, 3, 1, 0, 2, 2, 4, 4, 11, 7),
}


def _conv_case(device, kh, kw, stride, padding, dilation, groups, cin, cout, h, w, n=2):
    x = cl(torch.randn(n, cin, h, w, device=device))
    weight = torch.randn(cout, cin // groups, kh, kw, device=device) / (cin // groups * kh * kw) ** 0.5
    return x, weight, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("case", GEOMETRY.values(), ids=GEOMETRY.keys())
def test_geometry_forward_and_gradients(device, case):
    """Output and dx, dW, bias (through ``shift``) gradients against float64 ``F.conv2d``."""
    x, weight, geo = _conv_case(device, *case)
    bias = torch.randn(weight.shape[0], device=device)
    ours = {"x": leaf(x), "weight": leaf(weight), "bias": leaf(bias)}
    refs = {k: exact(v) for k, v in ours.items()}
    out = aru_kernels.conv_bn_act(ours["x"], ours["weight"], shift=ours["bias"], **geo)
    out_ref = F.conv2d(refs["x"], refs["weight"], refs["bias"], **geo)
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "conv")


@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
def test_dilated_gradients_with_prologue(device, stride):
    """Dilation 2 in the input gradient's transposed tap map and in the weight gradient,
    with a batch-norm + ReLU prologue (grouped, packed)."""
    x, weight, geo = _conv_case(device, 3, 3, stride, 2, 2, 8, 32, 32, 9, 8)
    c = x.shape[1]
    ours = {"x": leaf(x), "weight": leaf(weight), "in_mean": leaf(torch.randn(c, device=device)),
            "in_scale": leaf(torch.rand(c, device=device) + 0.5), "in_shift": leaf(torch.randn(c, device=device))}
    refs = {k: exact(v) for k, v in ours.items()}
    out = aru_kernels.conv_bn_act(ours["x"], ours["weight"], in_mean=ours["in_mean"], in_scale=ours["in_scale"],
                                  in_shift=ours["in_shift"], in_relu=True, **geo)
    out_ref = ref.conv_bn_act(refs["x"], refs["weight"], in_mean=refs["in_mean"], in_scale=refs["in_scale"],
                              in_shift=refs["in_shift"], in_relu=True, **geo)
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "dilated conv")


# Epilogue and prologue variants: (epilogue terms, prologue terms, stride).
VARIANTS = {
    "scale_only": (("scale",), (), 1),
    "shift_only": (("shift",), (), 1),
    "bn_eval": (("mean", "var", "scale", "shift"), (), 1),
    "var_only_relu": (("var",), (), 2),
    "prologue_no_relu": ((), ("in_scale", "in_shift"), 1),
    "strided_prologue_relu": (("scale", "shift"), ("in_mean", "in_scale", "in_shift", "in_relu"), 2),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_epilogue_and_prologue_variants(device, variant):
    epilogue, prologue, stride = variant
    x, weight, geo = _conv_case(device, 3, 3, stride, 1, 1, 4, 16, 24, 7, 6)
    cin, cout = x.shape[1], weight.shape[0]
    make = {"mean": lambda c: torch.randn(c, device=device), "var": lambda c: torch.rand(c, device=device) + 0.2,
            "scale": lambda c: torch.rand(c, device=device) + 0.5, "shift": lambda c: torch.randn(c, device=device)}
    ours = {"x": leaf(x), "weight": leaf(weight)}
    for name in epilogue:
        ours[name] = leaf(make[name](cout))
    for name in prologue:
        if name != "in_relu":
            ours[name] = leaf(make[name[3:]](cin))
    refs = {k: exact(v) for k, v in ours.items()}
    kwargs = dict(geo, relu="var" in epilogue, in_relu="in_relu" in prologue, eps=1e-3)

    def vectors(d):
        return {k: v for k, v in d.items() if k not in ("x", "weight")}

    out = aru_kernels.conv_bn_act(ours["x"], ours["weight"], **vectors(ours), **kwargs)
    out_ref = ref.conv_bn_act(refs["x"], refs["weight"], **vectors(refs), **kwargs)
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "variant")


def test_batch_of_one_and_one_pixel_images(device):
    x = cl(torch.randn(1, 8, 1, 1, device=device))
    weight = torch.randn(12, 8, 1, 1, device=device)
    out = aru_kernels.conv_bn_act(x, weight, relu=True)
    assert_close(out, torch.relu(F.conv2d(x.double(), weight.double())), torch.float32)
    out = aru_kernels.conv_bn_act(x, torch.randn(8, 2, 3, 3, device=device), padding=1, groups=4)
    assert out.shape == (1, 8, 1, 1)


def test_empty_batch_forward_and_backward(device):
    x = leaf(cl(torch.randn(0, 8, 5, 5, device=device)))
    weight = leaf(torch.randn(8, 2, 3, 3, device=device))
    out = aru_kernels.conv_bn_act(x, weight, padding=1, groups=4, relu=True)
    assert out.shape == (0, 8, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)), "an empty batch has a zero weight gradient"


def test_images_without_pixels_are_refused_as_f_conv2d_refuses_them(device):
    """Images of zero height or width: ``F.conv2d`` takes them only with no images or no
    channels. With padding the kernels would make an output of padding alone and, in
    training, batch statistics of it that move the running statistics; each
    convolution refuses them first, nothing changed. No images, or no channels, are
    still taken."""
    w = torch.randn(4, 4, 3, 3, device=device)
    for shape in ((2, 4, 0, 5), (2, 4, 5, 0)):
        x = cl(torch.randn(*shape, device=device))
        with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs are supported"):
            F.conv2d(x, w, padding=2)
        rm, rv = torch.full((4,), 5.0, device=device), torch.full((4,), 5.0, device=device)
        nb = torch.tensor(0, device=device)
        calls = {
            "conv_bn_act": lambda: aru_kernels.conv_bn_act(x, w, padding=2),
            "conv_bn_train": lambda: aru_kernels.conv_bn_train(x, w, None, None, rm, rv, nb, padding=2),
            "residual_block_train": lambda: aru_kernels.residual_block_train(
                x, [aru_kernels.ConvBN(w, None, None, rm, rv, nb, padding=2),
                    aru_kernels.ConvBN(w, None, None, padding=0)]),
            "stem_train": lambda: aru_kernels.stem_train(
                cl(torch.randn(shape[0], 3, *shape[2:], device=device)),
                aru_kernels.ConvBN(torch.randn(4, 3, 7, 7, device=device), None, None, rm, rv, nb, stride=2,
                                   padding=3)),
        }
        for op, call in calls.items():
            with pytest.raises(ValueError, match=rf"^{op}: only zero batch or zero channel inputs are supported "
                                                 rf"\(as for F.conv2d\); got input shape \[2, [34], {shape[2]}, "
                                                 rf"{shape[3]}\]"):
                call()
            assert (rm == 5).all() and (rv == 5).all() and nb.item() == 0, op
    out = aru_kernels.conv_bn_act(cl(torch.randn(0, 4, 0, 5, device=device)), w, padding=2)
    assert out.shape == (0, 4, 2, 7)


def test_zero_input_channels(device):
    """F.conv2d's backward takes no input channels: dx and dW are empty."""
    x = leaf(cl(torch.randn(2, 0, 4, 4, device=device)))
    weight = leaf(torch.randn(3, 0, 3, 3, device=device))
    shift = torch.randn(3, device=device)
    out = aru_kernels.conv_bn_act(x, weight, padding=1, shift=shift)
    assert_close(out, shift.double().view(1, 3, 1, 1).expand(2, 3, 4, 4), torch.float32,
                 what="a conv over no channels is its bias")
    out.sum().backward()
    assert x.grad.shape == (2, 0, 4, 4) and weight.grad.shape == (3, 0, 3, 3)


def test_weight_gradient_without_input_channels_still_folds_the_statistics_term(device):
    """With no input channels the weight-gradient kernel has nothing to launch, yet
    dL/dy' = dL/dy + a + b*(y - mean) is still what it returns for the input gradient."""
    x = cl(torch.randn(2, 0, 4, 4, device=device))
    weight = torch.randn(3, 0, 3, 3, device=device)
    dy, y = cl(torch.randn(2, 3, 4, 4, device=device)), cl(torch.randn(2, 3, 4, 4, device=device))
    mean, a, b = (torch.randn(3, device=device) for _ in range(3))
    dw, folded = torch.ops.aru.conv_weight_grad(x, dy, weight, None, None, None, 1, 1, 1, 1, False, y, mean, a, b)
    assert dw.shape == (3, 0, 3, 3)
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    assert_close(folded, dy.double() + v(a) + v(b) * (y.double() - v(mean)), torch.float32, what="dL/dy'")


# -- non-finite values ----------------------------------------------------------------------------


def test_relu_keeps_nan_in_epilogue_and_prologue(device):
    nan = cl(torch.full((1, 4, 2, 2), float("nan"), device=device))
    out = aru_kernels.conv_bn_act(nan, torch.ones(4, 4, 1, 1, device=device), relu=True)
    assert torch.isnan(out).all(), "ReLU turned NaN into a number (torch.relu keeps NaN)"
    x = cl(torch.randn(1, 4, 3, 3, device=device))
    in_scale = torch.tensor([1.0, float("nan"), 1.0, 1.0], device=device)
    out = aru_kernels.conv_bn_act(x, torch.ones(4, 4, 1, 1, device=device), in_scale=in_scale,
                                  in_shift=torch.zeros(4, device=device), in_relu=True)
    assert torch.isnan(out).all(), "the prologue's ReLU turned a NaN channel into zeros"


def test_nan_gradients_follow_pytorch(device):
    """A NaN input element: the same NaN pattern in the output and in dx, dW as float64
    autograd through F.conv2d and torch.relu (dense conv: the NaN reaches every output channel)."""
    x = torch.randn(1, 6, 5, 5, device=device)
    x[0, 2, 1, 3] = float("nan")
    x = cl(x)
    weight = torch.randn(8, 6, 3, 3, device=device)
    in_scale, in_shift = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    ours = {"x": leaf(x), "weight": leaf(weight)}
    refs = {k: exact(v) for k, v in ours.items()}
    out = aru_kernels.conv_bn_act(ours["x"], ours["weight"], padding=1, relu=True, in_scale=in_scale,
                                  in_shift=in_shift, in_relu=True)
    out_ref = ref.conv_bn_act(refs["x"], refs["weight"], padding=1, relu=True, in_scale=in_scale.double(),
                              in_shift=in_shift.double(), in_relu=True)
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref)), "NaN pattern of the output"
    g = torch.randn_like(out_ref)
    out.backward(g.float())
    out_ref.backward(g)
    for name in ours:
        got, expected = ours[name].grad, refs[name].grad
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"NaN pattern of d{name}"
        finite = ~torch.isnan(expected)
        assert_close(got[finite], expected[finite], torch.float32, what=f"the numbers of d{name}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf in the interpreter
@pytest.mark.parametrize("case", ["packed-groups", "stem"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_non_finite_input_never_gives_a_finite_result_where_pytorch_does_not(device, value, case):
    """Packed small groups may spread a non-finite value to the other groups of its
    pack, and the stem's 2x2-block form to the outputs beside its window (documented);
    they must never hide one."""
    if case == "packed-groups":
        x = torch.randn(1, 32, 3, 3, device=device)
        x[0, 3, 1, 1] = value
        weight, conv = torch.randn(32, 4, 3, 3, device=device), dict(padding=1, groups=8)
    else:  # a 7x7 stride-2 conv over 3 channels: a stride-1 conv of 2x2 pixel blocks, its taps padded to 8x8
        x = torch.randn(1, 3, 11, 11, device=device)
        x[0, 1, 4, 6] = value
        weight, conv = torch.randn(8, 3, 7, 7, device=device), dict(stride=2, padding=3)
    x = cl(x)
    out = aru_kernels.conv_bn_act(x, weight, **conv)
    expected = F.conv2d(x.double(), weight.double(), **conv)
    hidden = ~torch.isfinite(expected) & torch.isfinite(out)
    assert not hidden.any(), f"{int(hidden.sum())} outputs are finite where F.conv2d's are not"
    finite = torch.isfinite(out)
    assert_close(out[finite], expected[finite], torch.float32, what="the finite outputs")


def test_nan_in_training_reaches_the_loss(device):
    """A NaN channel must not come out as zeros while its running statistics go NaN:
    the block's output is NaN where eager's is, so divergence is seen."""
    x = torch.randn(2, 8, 4, 4, device=device)
    x[1, 5, 2, 2] = float("nan")
    x = cl(x)
    eye = torch.eye(8, device=device).view(8, 8, 1, 1)
    state = dict(running_mean=torch.zeros(8, device=device), running_var=torch.ones(8, device=device),
                 num_batches_tracked=torch.tensor(0, device=device))
    y, mean, scale, shift = aru_kernels.conv_bn_train(x, eye, None, None, **state)
    out = aru_kernels.bn_add_relu(y, scale, shift, mean=mean)
    rm = torch.zeros(8, dtype=torch.float64, device=device)
    expected = torch.relu(F.batch_norm(F.conv2d(x.double(), eye.double()), rm, torch.ones_like(rm), training=True))
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern of the block output"
    assert torch.equal(torch.isnan(state["running_mean"]), torch.isnan(rm))


# -- changing a weight or a buffer, every way a user can ---------------------------------------------


def _mutations():
    def data_copy(conv, bn):
        conv.weight.data.copy_(torch.randn_like(conv.weight))

    def data_assign(conv, bn):
        conv.weight.data = torch.randn_like(conv.weight)

    def data_add(conv, bn):  # a hand-written SGD step
        conv.weight.data.add_(torch.randn_like(conv.weight), alpha=-0.5)

    def vector_to_parameters(conv, bn):
        vec = torch.nn.utils.parameters_to_vector(conv.parameters())
        torch.nn.utils.vector_to_parameters(torch.randn_like(vec), conv.parameters())

    def optimizer_step(conv, bn):
        conv.weight.grad = torch.randn_like(conv.weight)
        torch.optim.SGD(conv.parameters(), lr=0.5).step()

    def load_state_dict(conv, bn):
        conv.load_state_dict({"weight": torch.randn_like(conv.weight)})

    def running_stats_data(conv, bn):
        bn.running_mean.data.add_(1.0)
        bn.running_var.data.mul_(3.0)
        bn.weight.data.mul_(-1.0)

    def running_stats_train_forward(conv, bn):
        bn.train()
        bn(torch.randn(4, bn.num_features, 3, 3, device=bn.weight.device) * 3 + 1)
        bn.eval()

    return {f.__name__: f for f in (data_copy, data_assign, data_add, vector_to_parameters, optimizer_step,
                                    load_state_dict, running_stats_data, running_stats_train_forward)}


MUTATIONS = _mutations()


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_every_weight_and_buffer_change_is_seen(device, mutate):
    """Eval-mode conv + batch norm through the fused path, before and after the change."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(16).to(device).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    x = cl(torch.randn(1, 16, 5, 5, device=device))

    def check(what):
        with torch.no_grad():
            expected = bn.double()(conv.double()(x.double()))
            bn.float(), conv.float()
            assert_close(conv_bn(conv, bn, x), expected, torch.float32, what=what)

    check("before the change")
    mutate(conv, bn)
    check(f"after {mutate.__name__}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
def test_module_dtype_conversion_is_seen(device, dtype):
    """``.half()`` / ``.to(dtype)`` replace the parameters: the next call reads the new ones."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False).to(device)
    bn = torch.nn.BatchNorm2d(16).to(device).eval()
    x = cl(torch.randn(1, 16, 5, 5, device=device))
    with torch.no_grad():
        conv_bn(conv, bn, x)
        conv.to(dtype)
        out = conv_bn(conv, bn, x.to(dtype))
        expected = bn.double()(conv.double()(x.to(dtype).double()))
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


# -- batch norm: nn.BatchNorm2d's options and errors --------------------------------------------------

BN_CASES = {
    "default": dict(),
    "eps1e-6": dict(eps=1e-6),
    "momentum0": dict(momentum=0.0),
    "momentum1": dict(momentum=1.0),
    "cumulative": dict(momentum=None),
    "no_affine": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
}


def _bn_through_conv(x, bn: torch.nn.BatchNorm2d, relu=True):
    """``relu(bn(x))`` through conv_bn_train (1x1 identity conv) and bn_add_relu."""
    c = x.shape[1]
    eye = torch.eye(c, device=x.device).view(c, c, 1, 1)
    track = bn.track_running_stats
    y, mean, scale, shift = aru_kernels.conv_bn_train(
        x, eye, bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
        bn.num_batches_tracked if track else None, momentum=bn.momentum, eps=bn.eps)
    return aru_kernels.bn_add_relu(y, scale, shift, mean=mean)


@pytest.mark.parametrize("options", BN_CASES.values(), ids=BN_CASES.keys())
def test_batch_norm_options_match_nn_batchnorm2d(device, options):
    """Two training steps then eval: outputs, gradients and buffers against nn.BatchNorm2d in float64."""
    bn = torch.nn.BatchNorm2d(6, **options).to(device)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    twin = copy.deepcopy(bn).double()
    for step in range(2):
        x = cl(torch.randn(3, 6, 4, 5, device=device) * (step + 1) + step)
        xo, xr = leaf(x), exact(x)
        out = _bn_through_conv(xo, bn)
        out_ref = torch.relu(twin(xr))
        assert_close(out, out_ref, torch.float32, what=f"step {step} output")
        g = torch.randn_like(out_ref)
        out.backward(g.float())
        out_ref.backward(g)
        assert_close(xo.grad, xr.grad, torch.float32, what=f"step {step} input gradient")
        if bn.affine:
            for name in ("weight", "bias"):
                assert_close(getattr(bn, name).grad, getattr(twin, name).grad, torch.float32,
                             what=f"step {step} gradient of {name}")
                getattr(bn, name).grad = getattr(twin, name).grad = None
    for (name, a), b in zip(bn.named_buffers(), twin.buffers()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, what=name)
        else:
            assert torch.equal(a, b), name
    if bn.track_running_stats:  # eval after train: the running statistics, folded in the epilogue
        bn.eval(), twin.eval()
        x = cl(torch.randn(2, 6, 3, 3, device=device))
        conv = torch.nn.Conv2d(6, 6, 1, bias=False).to(device)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
            assert_close(conv_bn(conv, bn, x, relu=True), torch.relu(twin(x.double())), torch.float32,
                         what="eval after train")


def test_constant_channel_has_zero_variance(device):
    """A constant channel normalizes to exactly its bias, as PyTorch's does (y - mean == 0)."""
    x = torch.randn(2, 4, 3, 3, device=device)
    x[:, 1] = 7.25
    x = cl(x)
    bn = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    out = _bn_through_conv(x, bn)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])), "values equal to the mean must land on the bias"
    assert_close(out, torch.relu(copy.deepcopy(bn).double()(x.double())), torch.float32)


def test_empty_batch_leaves_running_statistics_unchanged(device):
    bn = torch.nn.BatchNorm2d(4).to(device)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
    x = leaf(cl(torch.randn(0, 4, 3, 3, device=device)))
    out = _bn_through_conv(x, bn)
    out.sum().backward()
    assert out.shape == x.shape
    assert torch.equal(bn.running_mean, torch.full((4,), 0.3, device=device))
    assert torch.equal(bn.running_var, torch.full((4,), 2.0, device=device))
    assert bn.num_batches_tracked.item() == 1  # the module counts the call, as nn.BatchNorm2d does
    assert torch.equal(bn.weight.grad, torch.zeros(4, device=device))


def test_one_value_per_channel_raises_like_pytorch(device):
    x = cl(torch.randn(1, 10, 1, 1, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm2d(10).to(device)(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        aru_kernels.conv_bn_train(x, torch.eye(10, device=device).view(10, 10, 1, 1), None, None)


def test_refused_synchronized_squeeze_counts_no_batch(device, monkeypatch):
    """A call refused before computing anything leaves the batch count as it was
    (the statistics' exchange is stood in for: the refusal comes first)."""
    monkeypatch.setattr(aru_kernels.functional, "synchronized", lambda group: True)
    x = cl(torch.randn(2, 4, 3, 3, device=device))
    rm, rv, count = torch.zeros(4, device=device), torch.ones(4, device=device), torch.tensor(5, device=device)
    with pytest.raises(NotImplementedError, match="squeeze with statistics synchronized"):
        aru_kernels.conv_bn_train(x, torch.eye(4, device=device).view(4, 4, 1, 1), None, None, rm, rv, count,
                                  sync_stats=True, squeeze=True)
    assert count.item() == 5
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))


def test_cumulative_average_needs_the_batch_count(device):
    x = cl(torch.randn(2, 4, 3, 3, device=device))
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        aru_kernels.conv_bn_train(x, torch.eye(4, device=device).view(4, 4, 1, 1), None, None, rm, rv, None,
                                  momentum=None)
    assert torch.equal(rm, torch.zeros(4, device=device)), "the failed call must not touch the buffers"


# -- launches of several tiles, splits and finalize blocks (the GPU's block sizes) --------------------


@pytest.fixture
def device_blocks():
    with plans.device_block_sizes():
        yield


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2_by_phase"])
def test_gradients_over_several_tiles_and_weight_gradient_splits(device, stride):
    """dx (several transposed M tiles, strided or not), dW (several pixel splits) and
    the prologue's vector gradients (per-tile partial sums) against float64."""
    x, weight, geo = _conv_case(device, 3, 3, stride, 1, 1, 8, 32, 32, 32, 48)
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, **geo)
    wplan = plans.plan_wgrad(plan, x.device)
    dgrad = plans.plan_conv((2, 32, plan.p, plan.q), (32, 4, 3, 3), x.dtype, **geo, transposed_out_hw=(32, 48))
    assert dgrad.m_tiles >= 3, dgrad.m_tiles
    assert plan.m_tiles >= 3 and wplan.splits >= 2, (plan.m_tiles, wplan.splits)
    if stride == 1:
        assert wplan.m_per_split > wplan.block_m, "each split must walk several pixel blocks"
    c = x.shape[1]
    ours = {"x": leaf(x), "weight": leaf(weight), "in_mean": leaf(torch.randn(c, device=device)),
            "in_scale": leaf(torch.rand(c, device=device) + 0.5), "in_shift": leaf(torch.randn(c, device=device))}
    refs = {k: exact(v) for k, v in ours.items()}
    kwargs = dict(geo, in_relu=True)
    out = aru_kernels.conv_bn_act(ours["x"], ours["weight"], in_mean=ours["in_mean"], in_scale=ours["in_scale"],
                                  in_shift=ours["in_shift"], **kwargs)
    out_ref = ref.conv_bn_act(refs["x"], refs["weight"], in_mean=refs["in_mean"], in_scale=refs["in_scale"],
                              in_shift=refs["in_shift"], **kwargs)
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "several tiles")


# (kh, kw, stride, padding, dilation, groups, cin, cout, h, w): the training conv's paths: the
# weight gradient (stride-1 1x1 read without decoding, taps x channels in one or several k blocks,
# few input channels) with the statistics term added to dL/dy as it loads it, the prologue on
# load (1x1) or in a pass ahead (strided 3x3, 7x7), the strided input gradient by output phase;
# a stride-1 grouped 3x3 of 16-channel packs takes the ring kernels (tap_forward_kernel,
# aru::tap_conv_grads) instead.
TRAIN_GEOMETRY = {
    "pointwise": (1, 1, 1, 0, 1, 1, 32, 48, 16, 16),
    "pointwise_s2": (1, 1, 2, 0, 1, 1, 16, 32, 32, 32),
    "grouped_s1": (3, 3, 1, 1, 1, 8, 32, 32, 16, 16),
    "grouped_s2": (3, 3, 2, 1, 1, 8, 32, 32, 33, 32),
    "stem_k7s2": (7, 7, 2, 3, 1, 1, 3, 16, 36, 34),
}


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("case", TRAIN_GEOMETRY.values(), ids=TRAIN_GEOMETRY.keys())
def test_training_conv_gradients_over_several_tiles(device, case):
    """conv_bn_train with a batch-norm + ReLU prologue, normalized and backpropagated:
    dL/dy reaches the input- and weight-gradient kernels with the statistics term added
    on load, over several tiles, k blocks and pixel splits; every gradient against float64."""
    _check_training_conv(device, case)


# Small shapes of the 256-row tiles, with their block of N: 16-channel packs (strided: behind a
# batch norm, the stride-1 ones train through the ring kernels, aru::tap_conv_grads, tested in
# test_train_ops), 64 output channels, and 32-channel groups.
WIDE_ROW_GEOMETRY = {
    "grouped_s2": (TRAIN_GEOMETRY["grouped_s2"], 16),
    "64_columns": ((3, 3, 1, 1, 1, 1, 16, 64, 12, 11), 64),
    "grouped_32_columns": ((3, 3, 1, 1, 1, 2, 64, 64, 12, 11), 32),
}


def test_256_row_tiles_where_the_rules_give_them():
    """The rules give 256-row tiles to launches with programs enough and at most 64 columns:
    every grouped 3x3 of resnext50_32x4d at batch 256 (16-channel packs, 4 warps; stage 4's
    32-channel groups, 8 warps) and a ResNet stem (its 7x7 stride-2 conv as a 4x4 over 2x2
    pixel blocks, 64 outputs); not a small shape of the same conv."""
    with plans.device_block_sizes():
        big = plans.plan_conv((256, 128, 56, 56), (128, 4, 3, 3), torch.bfloat16, padding=1, groups=32)
        stage4 = plans.plan_conv((256, 1024, 7, 7), (1024, 32, 3, 3), torch.bfloat16, padding=1, groups=32)
        stem = plans.plan_conv((256, 16, 115, 115), (64, 16, 4, 4), torch.bfloat16, stats=True)
        small = plans.plan_conv((2, 128, 16, 16), (128, 4, 3, 3), torch.bfloat16, padding=1, groups=32)
    assert [(p.block_m, p.block_n, p.num_warps) for p in (big, stage4, stem)] == [(256, 16, 4), (256, 32, 8),
                                                                                    (256, 64, 8)]
    assert small.block_m == 128


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("name", WIDE_ROW_GEOMETRY, ids=WIDE_ROW_GEOMETRY.keys())
def test_training_conv_gradients_with_256_row_tiles(device, name, monkeypatch):
    """The 256-row tiles (test_256_row_tiles_where_the_rules_give_them) on small shapes,
    given them by lowering the launch size the rule asks for; every gradient against float64."""
    case, block_n = WIDE_ROW_GEOMETRY[name]
    x, weight, geo = _conv_case(device, *case)
    assert plans.plan_conv(x.shape, weight.shape, x.dtype, **geo).block_m == 128
    monkeypatch.setattr(plans, "LARGE_TILE_PROGRAMS", 1)
    assert plans.plan_conv(x.shape, weight.shape, x.dtype, **geo).block_n == block_n
    _check_training_conv(device, case, block_m=256)


def _check_training_conv(device, case, block_m=None):
    x, weight, geo = _conv_case(device, *case)
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, **geo)
    wplan = plans.plan_wgrad(plan, x.device)
    assert plan.m_tiles >= 2 and wplan.splits >= 2, (plan.m_tiles, wplan.splits)
    assert block_m in (None, plan.block_m), plan.block_m
    cin, cout = x.shape[1], weight.shape[0]
    ours = {"x": leaf(x), "weight": leaf(weight), "in_mean": leaf(torch.randn(cin, device=device)),
            "in_scale": leaf(torch.rand(cin, device=device) + 0.5),
            "in_shift": leaf(torch.randn(cin, device=device)),
            "bn_weight": leaf(torch.rand(cout, device=device) + 0.5), "bn_bias": leaf(torch.randn(cout, device=device))}
    refs = {k: exact(v) for k, v in ours.items()}
    y, mean, scale, shift = aru_kernels.conv_bn_train(
        ours["x"], ours["weight"], ours["bn_weight"], ours["bn_bias"], in_mean=ours["in_mean"],
        in_scale=ours["in_scale"], in_shift=ours["in_shift"], in_relu=True, **geo)
    out = scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1)
    a = torch.relu(refs["in_scale"].view(1, -1, 1, 1) * (refs["x"] - refs["in_mean"].view(1, -1, 1, 1))
                   + refs["in_shift"].view(1, -1, 1, 1))
    out_ref = F.batch_norm(F.conv2d(a, refs["weight"], **geo), None, None, refs["bn_weight"], refs["bn_bias"],
                           training=True)
    assert_close(out, out_ref, torch.float32, what="normalized output")
    grads_match(ours, refs, out, out_ref, "training conv")


# Convs whose weight gradient takes the wide tiles (plans.WIDE_WGRAD_BLOCK_K rows of k, 32 pixels a
# step): 1x1s with two blocks of k and three of N where the input and weight gradients are separate
# launches (more than 256 outputs), a strided downsample conv, and 3x3s (9 blocks of k; 3 for 64
# outputs, k = 576 padded to 768); each with a GPU small enough that the shape plans as
# resnext50_32x4d's and resnet50's do on an H200: several weight-gradient splits, and the
# 512 -> 384 forward's 8 wide programs one wave against the 16 narrow ones' two
# (plans.ConvPlan.wide_forward).
WIDE_TILES_MULTIPROCESSORS = 12
WIDE_WGRAD_GEOMETRY = {
    "pointwise_wide": ((1, 1, 1, 0, 1, 1, 512, 384, 16, 16), WIDE_TILES_MULTIPROCESSORS),
    "pointwise_wide_s2": ((1, 1, 2, 0, 1, 1, 256, 128, 32, 30), WIDE_TILES_MULTIPROCESSORS),
    "taps_wide": ((3, 3, 1, 1, 1, 1, 256, 128, 12, 11), 3 * WIDE_TILES_MULTIPROCESSORS),
    "taps_wide_64": ((3, 3, 1, 1, 1, 1, 64, 64, 12, 11), 3 * WIDE_TILES_MULTIPROCESSORS),
}


@pytest.mark.parametrize("case,multiprocessors", WIDE_WGRAD_GEOMETRY.values(), ids=WIDE_WGRAD_GEOMETRY.keys())
def test_training_conv_gradients_with_wide_weight_gradient_tiles(device, case, multiprocessors):
    """The wide weight gradient's tiles, as resnext50_32x4d's 1x1s of stages 2-4 and
    resnet50's 3x3s take them (64 pixels a step for 64 outputs), with the statistics term on load
    (and the prologue, 1x1), over several splits; every gradient against float64. The
    512 -> 384 forward runs the wide forward tiles."""
    with plans.device_block_sizes(multiprocessors):
        x, weight, geo = _conv_case(device, *case)
        wplan = plans.plan_wgrad(plans.plan_conv(x.shape, weight.shape, x.dtype, has_prologue=True, **geo),
                                 x.device)
        assert (wplan.block_k, wplan.num_stages, wplan.num_warps) == (plans.WIDE_WGRAD_BLOCK_K, 2, 8), wplan
        assert (wplan.block_n, wplan.block_m) == ((128, 32) if weight.shape[0] >= 128 else (64, 64)), wplan
        assert wplan.splits >= 2, wplan
        fplan = plans.plan_conv(x.shape, weight.shape, x.dtype, has_prologue=True, stats=True, **geo)
        assert fplan.wide_forward == (weight.shape[0] > 256), fplan  # the forward's 128 x 256 tiles too
        _check_training_conv(device, case)


@pytest.mark.usefixtures("device_blocks")
def test_training_conv_with_a_frozen_weight(device):
    """Without a weight gradient to take, dL/dx still gets the statistics term."""
    x, weight, geo = _conv_case(device, *TRAIN_GEOMETRY["grouped_s1"])
    xo, xr = leaf(x), exact(x)
    y, mean, scale, shift = aru_kernels.conv_bn_train(xo, weight, None, None, **geo)
    out = scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1))
    out_ref = F.batch_norm(F.conv2d(xr, weight.double(), **geo), None, None, training=True)
    grads_match({"x": xo}, {"x": xr}, out, out_ref, "frozen weight")


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "mean1e4"])
def test_bn_add_relu_over_several_tiles(device, offset):
    """Forward and backward of the block end, identity through its own batch norm,
    over several row tiles (each with its own partial sums); with channels far from
    zero, normalized as ``scale*(y - mean)`` without cancellation."""
    shape = (2, 16, 24, 24)
    ours = {"y": leaf(cl(torch.randn(shape, device=device) + offset)),
            "identity": leaf(cl(torch.randn(shape, device=device) + offset))}
    for name in ("mean", "scale", "shift", "id_mean", "id_scale", "id_shift"):
        ours[name] = leaf(torch.randn(16, device=device) + (offset if "mean" in name else 0.0))
    assert -(-24 * 24 * 2 // plans.elementwise_blocks(16)[0]) >= 3
    refs = {k: exact(v) for k, v in ours.items()}
    names = ("y", "scale", "shift", "identity", "id_scale", "id_shift")
    out = aru_kernels.bn_add_relu(*(ours[k] for k in names), mean=ours["mean"], id_mean=ours["id_mean"])
    out_ref = ref.bn_add_relu(*(refs[k] for k in names), mean=refs["mean"], id_mean=refs["id_mean"])
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "bn_add_relu")


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("case", [(1, 1, 1, 0, 1, 16, 32, 13, 11), (3, 3, 2, 1, 8, 32, 32, 25, 23)],
                         ids=["pointwise_2_tiles_per_image", "grouped_s2_partial_tile"])
def test_squeeze_means_per_image_and_their_gradient(device, case):
    """conv_bn_act(squeeze=True): the per-(image, channel) means of the output from the
    epilogue (row tiles that end inside an image, several tiles per image), and the
    gradient through both outputs, against float64."""
    kh, kw, stride, pad, groups, cin, cout, h, w = case
    x, weight, geo = _conv_case(device, kh, kw, stride, pad, 1, groups, cin, cout, h, w, n=3)
    geo["padding"] = pad
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, **geo, squeeze=True)
    assert plan.p * plan.q % plan.block_m != 0, "the last tile of each image must be partial"
    ours = {"x": leaf(x), "weight": leaf(weight), "mean": leaf(torch.randn(cout, device=device)),
            "scale": leaf(torch.rand(cout, device=device) + 0.5), "shift": leaf(torch.randn(cout, device=device))}
    refs = {k: exact(v) for k, v in ours.items()}
    y, means = aru_kernels.conv_bn_act(ours["x"], ours["weight"], mean=ours["mean"], scale=ours["scale"],
                                       shift=ours["shift"], squeeze=True, **geo)
    y_ref = ref.conv_bn_act(refs["x"], refs["weight"], mean=refs["mean"], scale=refs["scale"],
                            shift=refs["shift"], **geo)
    assert means.shape == (3, cout) and means.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, what="output")
    assert_close(means, y_ref.mean((2, 3)), torch.float32, what="squeeze means")
    g1, g2 = torch.randn_like(y_ref), torch.randn(3, cout, dtype=torch.float64, device=device)
    ((y * g1.float()).sum() + (means * g2.float()).sum()).backward()
    ((y_ref * g1).sum() + (y_ref.mean((2, 3)) * g2).sum()).backward()
    for name in ours:
        assert_close(ours[name].grad, refs[name].grad, torch.float32, what=f"gradient of {name}")


@pytest.mark.usefixtures("device_blocks")
def test_training_squeeze_from_per_image_statistics_tiles(device):
    """conv_bn_train(squeeze=True): row tiles per image (several, the last partial), their
    statistics merged per image then over the batch: batch mean, 1/std, running
    statistics, the per-image means, and the gradient through all of them, vs float64."""
    x, weight, geo = _conv_case(device, 1, 1, 1, 0, 1, 1, 16, 32, 13, 11, n=3)
    x = cl(x * 0.5 + 3.0)  # channels far from zero: the merge must not cancel
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, stats=True, squeeze=True)
    assert plan.m_tiles == 3 * 2 and 13 * 11 % plan.block_m != 0, plan.m_tiles
    state = dict(running_mean=torch.zeros(32, device=device), running_var=torch.ones(32, device=device),
                 num_batches_tracked=torch.tensor(0, device=device))
    state_ref = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
    ours = {"x": leaf(x), "weight": leaf(weight), "bn_weight": leaf(torch.rand(32, device=device) + 0.5),
            "bn_bias": leaf(torch.randn(32, device=device))}
    refs = {k: exact(v) for k, v in ours.items()}
    y, mean, scale, shift, means = aru_kernels.conv_bn_train(ours["x"], ours["weight"], ours["bn_weight"],
                                                             ours["bn_bias"], **state, squeeze=True)
    z = scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1)
    y_ref = F.conv2d(refs["x"], refs["weight"])
    z_ref = ref.batch_norm(y_ref, refs["bn_weight"], refs["bn_bias"], state_ref["running_mean"],
                           state_ref["running_var"], state_ref["num_batches_tracked"], training=True)
    assert_close(z, z_ref, torch.float32, what="normalized output")
    assert_close(means, y_ref.mean((2, 3)), torch.float32, what="per-image means")
    for key in ("running_mean", "running_var"):
        assert_close(state[key], state_ref[key], torch.float32, what=key)
    g1, g2 = torch.randn_like(z_ref), torch.randn(3, 32, dtype=torch.float64, device=device)
    ((z * g1.float()).sum() + (means * g2.float()).sum()).backward()
    ((z_ref * g1).sum() + (y_ref.mean((2, 3)) * g2).sum()).backward()
    for name in ours:
        assert_close(ours[name].grad, refs[name].grad, torch.float32, what=f"gradient of {name}")


def test_training_squeeze_where_its_tiles_are_narrower_than_the_plain_convs(device):
    """A training 1x1 of 256 channels takes 128-row tiles without ``squeeze`` but 64 with it,
    where 128 would pad an image's rows more (12 x 16 pixels: 2 x 128 against 3 x 64; on an
    H200 the SE-ResNeXt's stage-2 conv3 at 28 x 28 and batch 256): the batch statistics
    merge the tiles the launch wrote, so the mean, 1/std and per-image means match float64."""
    if device.type != "cpu":
        pytest.skip("the GPU's own rules are those on a GPU: this is their case on a 1-multiprocessor GPU")
    g = torch.Generator().manual_seed(0)
    x = cl(torch.randn(2, 256, 12, 16, generator=g) + 0.5)
    weight = cl(torch.randn(256, 256, 1, 1, generator=g) / 16)
    with plans.device_block_sizes(multiprocessors=1):
        squeezed = plans.plan_conv(x.shape, weight.shape, x.dtype, stats=True, squeeze=True)
        plain = plans.plan_conv(x.shape, weight.shape, x.dtype, stats=True)
        assert (squeezed.block_m, plain.block_m) == (64, 128)
        y, mean, scale, shift, means = aru_kernels.conv_bn_train(x, weight, None, None, squeeze=True)
    y_ref = F.conv2d(x.double(), weight.double())
    var = y_ref.var((0, 2, 3), unbiased=False)
    assert_close(mean, y_ref.mean((0, 2, 3)), torch.float32, what="batch mean")
    assert_close(scale, (var + 1e-5).rsqrt(), torch.float32, what="1/std")
    assert_close(means, y_ref.mean((2, 3)), torch.float32, what="per-image means")


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("affine", [False, True], ids=["identity", "downsample_bn"])
def test_bn_add_relu_with_a_branch_scale(device, affine):
    """relu(e*(scale*(y - mean) + shift) + identity'), e per image and channel
    (squeeze-excitation's excitation): output and every gradient, e's included."""
    shape = (3, 16, 27, 25)
    block_m = plans.elementwise_blocks(16)[0]
    assert 27 * 25 > block_m and 27 * 25 % block_m, "several tiles per image, the last partial"
    ours = {"y": leaf(cl(torch.randn(shape, device=device))), "identity": leaf(cl(torch.randn(shape, device=device))),
            "e": leaf(torch.rand(3, 16, device=device) + 0.2)}
    for name in ("mean", "scale", "shift") + (("id_mean", "id_scale", "id_shift") if affine else ()):
        ours[name] = leaf(torch.randn(16, device=device) + (0.5 if "scale" in name else 0.0))
    refs = {k: exact(v) for k, v in ours.items()}

    def run(t, fn):
        ids = (t["identity"], t.get("id_scale"), t.get("id_shift"))
        return fn(t["y"], t["scale"], t["shift"], *ids, mean=t["mean"], id_mean=t.get("id_mean"),
                  branch_scale=t["e"])
    out, out_ref = run(ours, aru_kernels.bn_add_relu), run(refs, ref.bn_add_relu)
    assert_close(out, out_ref, torch.float32, what="output")
    grads_match(ours, refs, out, out_ref, "branch-scaled bn_add_relu")
    with pytest.raises(ValueError, match="branch_scale must be"):
        aru_kernels.bn_add_relu(ours["y"], ours["scale"], ours["shift"], branch_scale=torch.ones(3, 8))


@pytest.mark.usefixtures("device_blocks")
@pytest.mark.parametrize("c_out", [32, 96])
def test_batch_statistics_over_more_tiles_than_one_finalize_block(device, c_out):
    """More statistics tiles than the finalize reads at once, channels with a large mean:
    batch mean, 1/std, running statistics and the gradient through them. 32 outputs: the
    tile statistics summed in the accumulator's layout; 96 (a 128-wide block, 32 of it
    masked): read back from the stored tile. The last tile of rows is partial."""
    x = cl(torch.randn(2, 4, 66, 66, device=device) * 0.5 + 100.0)
    weight = torch.randn(c_out, 4, 1, 1, device=device) / 2
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, stats=True)
    block_t, _ = plans.finalize_blocks(c_out)
    assert plan.m_tiles > block_t, (plan.m_tiles, block_t)
    assert (plan.block_n >= 64) == (c_out > 64) and plan.m_tiles * plan.block_m > 2 * 66 * 66, plan
    state = dict(running_mean=torch.zeros(c_out, device=device), running_var=torch.ones(c_out, device=device),
                 num_batches_tracked=torch.tensor(0, device=device))
    state_ref = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
    xo, xr = leaf(x), exact(x)
    y, mean, scale, shift = aru_kernels.conv_bn_train(xo, weight, None, None, **state)
    normalized = scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1)
    expected = ref.conv_bn(xr, weight.double(), None, None, **state_ref, training=True)
    assert_close(normalized, expected, torch.float32, what="normalized output")
    for key in ("running_mean", "running_var"):
        assert_close(state[key], state_ref[key], torch.float32, what=key)
    g = torch.randn_like(expected)
    normalized.backward(g.float())
    expected.backward(g)
    assert_close(xo.grad, xr.grad, torch.float32, what="input gradient through the batch statistics")


def test_tuned_tiles_are_used_and_exact(device):
    """A tuned table entry (exact plan match) changes the launch's tiles, not its result."""
    from dataclasses import asdict

    from aru_kernels.launch import recording

    x, weight, geo = _conv_case(device, 3, 3, 1, 1, 1, 8, 32, 32, 9, 9)
    plan = plans.plan_conv(x.shape, weight.shape, x.dtype, **geo, device=x.device)
    tiles = plans.Tiles(block_m=32, block_n=16, block_k=16, num_warps=4, num_stages=1)
    assert tiles != plan.default_tiles()
    with plans.use_tuned_table({plan.key(): {"tiles": asdict(tiles)}}):
        with recording() as launches:
            aru_kernels.conv_bn_act(x, weight, **geo)
        out = aru_kernels.conv_bn_act(x, weight, **geo)
    (launch,) = launches
    assert (launch.args["BLOCK_M"], launch.args["BLOCK_N"], launch.num_stages) == (32, 16, 1)
    assert_close(out, F.conv2d(x.double(), weight.double(), **geo), torch.float32)


@pytest.mark.usefixtures("device_blocks")
def test_parallel_finalize_over_many_chunks(device):
    """More chunks of tiles than the finalize reads at once (two combining passes, each
    looping), a ragged last tile, channels with mean 1e3: the batch statistics and the
    running update against float64."""
    rows, tile_rows, c = 9999, 2, 4
    x = (torch.randn(rows, c, dtype=torch.float64) * 0.5 + 1e3).to(device)
    tiles = -(-rows // tile_rows)
    assert -(-tiles // plans.finalize_chunks(tiles, c, x.device)) > plans.finalize_blocks(c)[0]
    padded = torch.cat([x, x[-1:].expand(tiles * tile_rows - rows, c)])  # the ragged tile's rows are its own
    groups = padded.view(tiles, tile_rows, c)
    tile_mean = groups.mean(1)
    tile_mean[-1] = x[(tiles - 1) * tile_rows:].mean(0)
    tile_m2 = ((groups - tile_mean[:, None]) ** 2).sum(1)
    tile_m2[-1] = ((x[(tiles - 1) * tile_rows:] - tile_mean[-1]) ** 2).sum(0)
    y = torch.empty(1, c, 1, rows, device=device)  # only its shape is read
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    mean, invstd, new_rm, new_rv = torch.ops.aru.bn_stats(y, tile_mean.float(), tile_m2.float(), rm, rv, None,
                                                          tile_rows, 0.1, 1e-5)
    var = x.var(0, unbiased=False)
    assert_close(mean, x.mean(0), torch.float32, what="batch mean")
    assert_close(invstd, torch.rsqrt(var + 1e-5), torch.float32, what="1/std")
    assert_close(new_rm, 0.1 * x.mean(0), torch.float32, what="running mean")
    assert_close(new_rv, 0.9 + 0.1 * x.var(0), torch.float32, what="running var")


# -- mixed precision -------------------------------------------------------------------------------------


def test_cpu_autocast_training_ops(device):
    if device.type != "cpu":
        pytest.skip("CPU autocast: runs where the kernels run on CPU tensors")
    x = cl(torch.randn(2, 16, 5, 5))
    weight = torch.randn(16, 4, 3, 3) / 6
    bn_w, bn_b = torch.rand(16) + 0.5, torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, mean, scale, shift = aru_kernels.conv_bn_train(x, weight, bn_w, bn_b, padding=1, groups=4)
        out = aru_kernels.bn_add_relu(y, scale, shift, x, mean=mean)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert mean.dtype == scale.dtype == shift.dtype == torch.float32
    xb, wb = x.bfloat16().double(), weight.bfloat16().double()
    y_ref = F.conv2d(xb, wb, padding=1, groups=4)
    assert_close(y, y_ref, torch.bfloat16, what="conv output")
    expected = torch.relu(F.batch_norm(y_ref, None, None, bn_w.double(), bn_b.double(), training=True) + xb)
    assert_close(out, expected, torch.bfloat16, what="block output")



def test_bn_add_relu_takes_strided_vectors(device):
    """Batch-norm vectors that are views with a stride (every other element of a buffer)
    give what their contiguous copies give."""
    c = 12
    y = cl(torch.randn(2, c, 5, 4, device=device))
    idn = cl(torch.randn(2, c, 5, 4, device=device))
    buffers = [torch.rand(2 * c, device=device) + 0.5 if i in (0, 3) else torch.randn(2 * c, device=device)
               for i in range(5)]
    strided = [b[::2] for b in buffers]  # scale, shift, mean, id_scale, id_shift
    assert not strided[0].is_contiguous()
    outs = [aru_kernels.bn_add_relu(y, v[0], v[1], idn, v[3], v[4], mean=v[2])
            for v in (strided, [t.contiguous() for t in strided])]
    assert (outs[1] > 0).any()
    assert torch.equal(outs[0], outs[1])


# -- what F.conv2d and F.batch_norm refuse, refused too (never a plausible wrong number) -------------


def _bn_buffers(c, device, **wrong):
    """A batch norm's parameters and buffers for ``c`` channels, some replaced by ``wrong``."""
    t = {"bn_weight": torch.rand(c, device=device) + 0.5, "bn_bias": torch.randn(c, device=device),
         "running_mean": torch.zeros(c, device=device), "running_var": torch.ones(c, device=device),
         "num_batches_tracked": torch.tensor(0, device=device)}
    t.update(wrong)
    return t


_WRONG_BN = {  # name -> (replacement for 8 channels, the error's type and message)
    "running_mean_short": ("running_mean", lambda d: torch.zeros(4, device=d), ValueError,
                           r"running_mean must be a 1-D tensor of 8 \(one per output channel\); got \(4,\)"),
    "running_var_long": ("running_var", lambda d: torch.ones(16, device=d), ValueError,
                         r"running_var must be a 1-D tensor of 8 .*got \(16,\)"),
    "bn_bias_short": ("bn_bias", lambda d: torch.zeros(4, device=d), ValueError,
                      r"bn_bias must be a 1-D tensor of 8 .*got \(4,\)"),
    "bn_weight_2d": ("bn_weight", lambda d: torch.ones(8, 1, device=d), ValueError,
                     r"bn_weight must be a 1-D tensor of 8 .*got \(8, 1\)"),
    "running_mean_int": ("running_mean", lambda d: torch.zeros(8, dtype=torch.int64, device=d), TypeError,
                         "running_mean must be floating point; got torch.int64"),
    "running_var_meta": ("running_var", lambda d: torch.ones(8, device="meta"), ValueError,
                         "running_var is on meta but the input is on"),
    "running_mean_requires_grad": ("running_mean", lambda d: torch.zeros(8, device=d, requires_grad=True), ValueError,
                                   "running_mean requires grad; running statistics take no gradient"),
}


@pytest.mark.parametrize("op", ["conv_bn_train", "residual_block_train", "stem_train"])
@pytest.mark.parametrize("wrong", list(_WRONG_BN))
def test_batch_norm_vectors_of_another_size_dtype_or_device_are_refused(device, op, wrong):
    """As ``F.batch_norm`` refuses them ("running_mean should contain 8 elements not 4"): a
    running statistic or an affine parameter of another length, rank, dtype or device. The
    kernels would read or write past it. Nothing is updated by the failed call."""
    name, make, error, message = _WRONG_BN[wrong]
    t = _bn_buffers(8, device, **{name: make(device)})
    before = {k: v.clone() for k, v in t.items() if v.device.type != "meta"}
    if op == "conv_bn_train":
        x = cl(torch.randn(2, 8, 4, 4, device=device))
        call = lambda: aru_kernels.conv_bn_train(x, torch.randn(8, 8, 1, 1, device=device), **t)  # noqa: E731
    elif op == "residual_block_train":
        x = cl(torch.randn(2, 8, 4, 4, device=device))
        good = aru_kernels.ConvBN(torch.randn(8, 8, 1, 1, device=device), None, None)
        wrong_one = aru_kernels.ConvBN(torch.randn(8, 8, 1, 1, device=device), **t)
        call = lambda: aru_kernels.residual_block_train(x, [good, wrong_one])  # noqa: E731
    else:
        x = cl(torch.randn(2, 3, 16, 16, device=device))
        conv = aru_kernels.ConvBN(torch.randn(8, 3, 7, 7, device=device), **t, stride=2, padding=3)
        call = lambda: aru_kernels.stem_train(x, conv)  # noqa: E731
    with pytest.raises(error, match=message):
        call()
    for k, v in before.items():
        assert torch.equal(t[k], v), f"{k} changed by a refused call"


def test_the_finalize_refuses_running_statistics_of_another_size(device):
    """The batch-norm finalize writes one running mean and variance per channel: every path to it
    (here the operator itself, under the public functions' own checks) refuses buffers of
    another length rather than writing past them."""
    x = cl(torch.randn(2, 8, 4, 4, device=device))
    w = torch.randn(8, 8, 1, 1, device=device)
    for rm, rv in ((torch.zeros(4, device=device), torch.ones(4, device=device)),
                   (torch.zeros(8, device=device), torch.ones(16, device=device))):
        with pytest.raises(ValueError, match="batch norm: running_(mean|var) must be a 1-D tensor of 8"):
            torch.ops.aru.conv_bn_stats(x, w, None, None, None, rm, rv, torch.tensor(0, device=device), 1, 0, 1, 1,
                                        False, 0.1, 1e-5)


def test_eps_is_checked_as_pytorch_checks_it(device):
    """Positive in training, not negative in eval (``F.batch_norm``'s rule)."""
    x = cl(torch.randn(2, 4, 3, 3, device=device))
    w = torch.randn(4, 4, 1, 1, device=device)
    for eps in (0.0, -1e-3):
        with pytest.raises((ValueError, RuntimeError), match="eps must be positive"):  # torch 2.11: no "during"
            F.batch_norm(x, None, None, training=True, eps=eps)
        with pytest.raises(ValueError, match=f"eps must be positive during training, but got {eps}"):
            aru_kernels.conv_bn_train(x, w, None, None, eps=eps)
    v = torch.rand(4, device=device) + 0.5
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1"):
        aru_kernels.conv_bn_act(x, w, mean=v, var=v, eps=-1.0)
    out = aru_kernels.conv_bn_act(x, w, mean=v, var=v, eps=0.0)  # allowed in eval, as PyTorch 2.14 allows it
    vd = v.double().view(1, -1, 1, 1)
    expected = (F.conv2d(x.double(), w.double()) - vd) / vd.sqrt()
    assert_close(out, expected, torch.float32)


def test_a_block_whose_identity_is_not_the_chains_shape_is_refused(device):
    """``relu(bn(conv(...)) + identity)`` needs the identity (the block input, or its
    downsample's output) in the chain output's shape; each conv needs the channels the one
    before it gives. PyTorch raises on the addition; so does the fused block, before any
    kernel runs (the kernels would read the identity's memory as the chain's shape)."""
    x = cl(torch.randn(2, 8, 4, 4, device=device))

    def cb(c_out, c_in, k=1, stride=1):
        return aru_kernels.ConvBN(torch.randn(c_out, c_in, k, k, device=device), None, None, stride=stride,
                                  padding=k // 2)

    cases = [
        ([cb(8, 8), cb(4, 8)], None, r"the chain gives \[C, H, W\] = \[4, 4, 4\] but the identity \(the block "
                                     r"input\) is \[8, 4, 4\]"),
        ([cb(8, 8), cb(8, 8, 3, 2)], None, r"the chain gives \[C, H, W\] = \[8, 2, 2\] but the identity"),
        ([cb(8, 8), cb(16, 8, 3, 2)], cb(16, 8), r"\[16, 2, 2\] but the identity \(its downsample\) is \[16, 4, 4\]"),
        ([cb(8, 8), cb(16, 8, 3, 2)], cb(8, 8, 1, 2),
         r"\[16, 2, 2\] but the identity \(its downsample\) is \[8, 2, 2\]"),
        ([cb(8, 8), cb(8, 4)], None, r"its conv 1 takes 4 input channels .*; conv 0 gives 8"),
        ([cb(8, 8)], cb(8, 4), r"its downsample takes 4 input channels .*; the block input has 8"),
    ]
    for chain, downsample, message in cases:
        with pytest.raises(ValueError, match=message):
            aru_kernels.residual_block_train(x, chain, downsample)
    with pytest.raises(RuntimeError):  # PyTorch, the first case
        torch.relu(torch.randn(2, 4, 4, 4, device=device) + x)


def test_a_node_whose_batch_norms_share_running_statistics_is_refused(device):
    """One ``nn.BatchNorm2d`` applied after two convs updates its running statistics twice,
    in order; a fused node updates each from the values before the call, so buffers shared
    by two of its batch norms (in a block, or across the blocks of one node) are refused
    before anything changes. Disjoint views of one flat buffer are taken, and match
    PyTorch's updates."""
    x = cl(torch.randn(2, 8, 4, 4, device=device))
    ws = [torch.randn(8, 8, 1, 1, device=device) / 3 for _ in range(4)]
    rm, rv, nb = torch.zeros(8, device=device), torch.ones(8, device=device), torch.tensor(0, device=device)
    shared = [aru_kernels.ConvBN(w, None, None, rm, rv, nb) for w in ws]
    big = torch.zeros(16, device=device)
    calls = {
        "in a block": lambda: aru_kernels.residual_block_train(x, shared[:2]),
        "across blocks": lambda: aru_kernels.residual_blocks_train(
            x, [([shared[0], aru_kernels.ConvBN(ws[1], None, None)], None), ([shared[2], shared[3]], None)]),
        "a running var": lambda: aru_kernels.residual_block_train(
            x, [aru_kernels.ConvBN(ws[0], None, None, rm.clone(), rv, nb), shared[1]]),
        "overlapping views": lambda: aru_kernels.residual_block_train(
            x, [aru_kernels.ConvBN(ws[0], None, None, big[:8], rv.clone(), nb),
                aru_kernels.ConvBN(ws[1], None, None, big[4:12], rv.clone(), nb)]),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"the batch norms of convs \d and \d .* share running statistics"):
            call()
        assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv)), what
        assert nb.item() == 0, what

    flat = torch.zeros(32, device=device)  # [mean 0 | var 0 | mean 1 | var 1]
    flat[8:16], flat[24:32] = 1.0, 1.0
    bns = [torch.nn.BatchNorm2d(8).to(device) for _ in range(2)]
    convs = [aru_kernels.ConvBN(w, None, None, flat[16 * i:16 * i + 8], flat[16 * i + 8:16 * i + 16],
                                torch.tensor(0, device=device)) for i, w in enumerate(ws[:2])]
    aru_kernels.residual_block_train(x, convs)
    h = torch.relu(bns[0](F.conv2d(x, ws[0])))
    bns[1](F.conv2d(h, ws[1]))
    for i, bn in enumerate(bns):
        assert_close(flat[16 * i:16 * i + 8], bn.running_mean, torch.float32, what=f"running mean {i}")
        assert_close(flat[16 * i + 8:16 * i + 16], bn.running_var, torch.float32, what=f"running var {i}")


def _normalized(train_outputs):
    """``relu(bn(y))`` from ``conv_bn_train``'s ``(y, mean, scale, shift)``."""
    y, mean, scale, shift = train_outputs
    return aru_kernels.bn_add_relu(y, scale, shift, mean=mean)


def _public_op_calls(device, requires_grad=False):
    """Each public operator on small random inputs: name -> (differentiable inputs, call)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, cl_=False, pos=False):
        t = torch.randn(*shape, generator=g)
        t = (t.abs() + 0.5 if pos else t).to(device)
        t = cl(t) if cl_ else t
        return t.requires_grad_(requires_grad)
    x, w3, w1 = r(2, 8, 5, 5, cl_=True), r(8, 8, 3, 3), r(8, 8, 1, 1)
    bw, bb, img, ws = r(8, pos=True), r(8), cl(torch.randn(2, 3, 16, 16, generator=g).to(device)), r(8, 3, 7, 7)
    return {
        "conv_bn_act": ((x, w3, bw), lambda x, w, s: aru_kernels.conv_bn_act(x, w, padding=1, scale=s, shift=bb)),
        "conv_bn_train": ((x, w3, bw), lambda x, w, s: _normalized(
            aru_kernels.conv_bn_train(x, w, s, bb, padding=1))),
        "bn_add_relu": ((x, bw, bb), lambda y, s, b: aru_kernels.bn_add_relu(y, s, b, identity=x.detach())),
        "bn_relu_maxpool": ((x, bw, bb), lambda y, s, b: aru_kernels.bn_relu_maxpool(y, s, b)),
        "residual_block_train": ((x, w1, bw), lambda x, w, s: aru_kernels.residual_block_train(
            x, [aru_kernels.ConvBN(w, s, bb), aru_kernels.ConvBN(w3, None, None, padding=1)])),
        "stem_train": ((ws, bw), lambda w, s: aru_kernels.stem_train(img, aru_kernels.ConvBN(w, s, bb, stride=2,
                                                                                               padding=3))),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # (torch.func's own import)
def test_torch_func_transforms_and_forward_mode_ad_are_refused(device):
    """The operators have reverse-mode gradients only. A custom operator without a forward
    derivative gives a zero tangent under ``torch.func.jvp`` and none under
    ``torch.autograd.forward_ad`` rather than an error, and vmap and grad fail inside
    with PyTorch's own messages: each public operator refuses them, naming itself and
    what is unsupported. Inside a dual level without a tangent, nothing is refused."""
    import torch.autograd.forward_ad as fwAD

    for name, (inputs, call) in _public_op_calls(device).items():
        tangents = tuple(torch.randn_like(t) for t in inputs)
        with pytest.raises(NotImplementedError, match=f"^{name}: torch.func transforms"):
            torch.func.jvp(call, inputs, tangents)
        with pytest.raises(NotImplementedError, match=f"^{name}: torch.func transforms"):
            torch.func.vmap(call, in_dims=(None,) * (len(inputs) - 1) + (0,))(
                *inputs[:-1], torch.stack([inputs[-1]] * 2))
        with pytest.raises(NotImplementedError, match=f"^{name}: torch.func transforms"):
            torch.func.grad(lambda *a: call(*a).sum())(*inputs)
        with fwAD.dual_level():
            for k in range(len(inputs)):  # a tangent on any one input
                duals = [fwAD.make_dual(t, d) if i == k else t for i, (t, d) in enumerate(zip(inputs, tangents))]
                with pytest.raises(NotImplementedError, match=f"^{name}: forward-mode automatic differentiation"):
                    call(*duals)
            assert torch.equal(call(*inputs), call(*inputs))  # no tangent: runs


def test_double_backward_is_refused_with_a_message(device):
    """First derivatives only: after ``create_graph=True`` the gradients take part in a
    graph, and a gradient of them stops at the first gradient operator it reaches with
    a message saying double backward is unsupported (not PyTorch's "no autograd formula"
    for an operator the caller never called). The first-order gradients themselves are
    those of a plain backward."""
    for name, (inputs, call) in _public_op_calls(device, requires_grad=True).items():
        plain = torch.autograd.grad(call(*inputs).square().sum(), inputs)
        first = torch.autograd.grad(call(*inputs).square().sum(), inputs, create_graph=True)
        for a, b in zip(first, plain):
            assert_close(a, b, tol=1e-6, what=f"{name}: first-order gradient with create_graph")
        with pytest.raises(NotImplementedError, match=r"aru::\w+ computes gradients of the fused operators, which "
                                                      r"have first derivatives only: double backward"):
            torch.autograd.grad(sum(g.square().sum() for g in first), inputs)


def test_in_relu_without_the_prologue_is_refused(device):
    """``in_relu`` is the prologue's ReLU, after ``in_scale`` and ``in_shift``: alone it would be
    dropped, so it is refused."""
    x = cl(torch.randn(2, 8, 4, 4, device=device))
    w = torch.randn(8, 8, 1, 1, device=device)
    with pytest.raises(ValueError, match="in_relu=True without them"):
        aru_kernels.conv_bn_act(x, w, in_relu=True)
    with pytest.raises(ValueError, match="in_relu=True without them"):
        aru_kernels.conv_bn_train(x, w, None, None, in_relu=True)
    ones, zeros = torch.ones(8, device=device), torch.zeros(8, device=device)  # the ReLU alone, as the message says
    assert_close(aru_kernels.conv_bn_act(x, w, in_scale=ones, in_shift=zeros, in_relu=True),
                 F.conv2d(x.double().relu(), w.double()), torch.float32)


@pytest.mark.parametrize("padding,error,message", [
    ("same", ValueError, "padding must be an int or a pair of equal ints; got 'same'"),
    (1.5, TypeError, r"padding must be an int or a pair of equal ints; got 1.5 \(float\)"),
    ((1.0, 1.0), TypeError, r"got 1.0 \(float\)"),
])
def test_paddings_that_are_not_ints_are_refused_not_rounded(device, padding, error, message):
    import numpy as np

    x = cl(torch.randn(1, 4, 5, 5, device=device))
    w = torch.randn(4, 4, 3, 3, device=device)
    with pytest.raises(error, match=message):
        aru_kernels.conv_bn_act(x, w, padding=padding)
    assert aru_kernels.conv_bn_act(x, w, padding=np.int64(1)).shape == (1, 4, 5, 5)  # an int by operator.index


def _printed_without_interpreter(script: str, count: int) -> list[str]:
    """The non-empty lines ``script`` prints in a fresh CPU-only process started without
    TRITON_INTERPRET (the kernels are the JIT's own); it must exit 0 and print ``count``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line]
    assert proc.returncode == 0 and len(lines) == count, proc.stdout + proc.stderr[-2000:]
    return lines


_STEM_ON_CPU = """
import torch, aru_kernels
x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
conv = aru_kernels.ConvBN(torch.randn(8, 3, 7, 7), None, None, stride=2, padding=3)
for call in (lambda: aru_kernels.conv_bn_act(x, conv.weight, stride=2, padding=3),
             lambda: aru_kernels.stem_train(x, conv)):
    try:
        call()
        print("ran")
    except Exception as exc:
        print(type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
"""


def test_the_stem_says_where_it_runs_before_rewriting_its_input():
    """A stride-2 conv of 3 channels (the stem) is rewritten over 2x2 blocks by a kernel of its
    own: on the CPU without the interpreter (Triton compiling for a GPU that is not there),
    the device error comes first, as for every op, not Triton's driver error."""
    lines = _printed_without_interpreter(_STEM_ON_CPU, 2)
    for line, op in zip(lines, ("conv_bn_act", "stem_train")):
        assert line.startswith(f"RuntimeError {op}: ") and "must be on a CUDA device" in line, line


_INTERPRET_LATE = """
import os, torch, aru_kernels
os.environ["TRITON_INTERPRET"] = "1"  # after the import: Triton has made the kernels for a GPU
print(aru_kernels.interpreting(), aru_kernels.fused_available())
x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
try:
    aru_kernels.conv_bn_act(x, torch.randn(16, 4, 3, 3), padding=1, groups=4)
except Exception as exc:
    print(type(exc).__name__, str(exc).splitlines()[0])
"""


def test_the_interpreter_chosen_after_import_is_named_in_the_error():
    """Triton reads TRITON_INTERPRET as the kernels are imported. Set later, the kernels are
    still the GPU's: the library says so (not Triton's driver error), and does not claim to
    run on the CPU."""
    lines = _printed_without_interpreter(_INTERPRET_LATE, 2)
    assert lines[0] == "False False", lines[0]
    assert lines[1].startswith("RuntimeError conv_bn_act: ") and "only after aru_kernels was imported" in lines[1], \
        lines[1]


@pytest.mark.parametrize("case", ["conv_bn_train", "stem_train", "groups"])
def test_input_errors_name_the_function_called(case):
    """The shared input checks name the public function the user called, and a block's groups
    that do not divide its channels are reported as such."""
    cl = torch.channels_last
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=cl)
    one = dict(bn_weight=None, bn_bias=None)
    if case == "conv_bn_train":
        with pytest.raises(ValueError, match=r"^conv_bn_train: groups=3 must divide"):
            aru_kernels.conv_bn_train(x, torch.randn(16, 5, 3, 3), **one, padding=1, groups=3)
        with pytest.raises(ValueError, match=r"^conv_bn_train: input must be channels_last"):
            aru_kernels.conv_bn_train(x.contiguous(), torch.randn(16, 4, 3, 3), **one, padding=1, groups=4)
    elif case == "stem_train":
        imgs = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl)
        with pytest.raises(ValueError, match=r"^stem_train: input of spatial size 4x4 is too small"):
            aru_kernels.stem_train(imgs, aru_kernels.ConvBN(torch.randn(8, 3, 7, 7), None, None, stride=2))
    else:
        chain = [aru_kernels.ConvBN(torch.randn(8, 16, 1, 1), None, None),
                 aru_kernels.ConvBN(torch.randn(8, 3, 3, 3), None, None, padding=1, groups=3),
                 aru_kernels.ConvBN(torch.randn(16, 8, 1, 1), None, None)]
        with pytest.raises(ValueError, match=r"its conv 1's groups=3 must divide its in_channels=8"):
            aru_kernels.residual_block_train(x, chain)


# The largest batch of 224 x 224 images the kernels take (32-bit pixel indices).
_MOST_IMAGES = aru_kernels.checks.MAX_PIXELS // (224 * 224)


def _meta(n, c=8, size=224):
    """An activation that holds no memory: the checks run on shapes alone."""
    return cl(torch.empty(n, c, size, size, device="meta"))


def _vec(c=8):
    return torch.ones(c, device="meta")


_TOO_MANY_PIXELS = {
    "conv_bn_act_input": lambda n: aru_kernels.conv_bn_act(_meta(n + 1), torch.empty(8, 8, 1, 1, device="meta")),
    # in range, but the padding makes a 226 x 226 output of too many pixels
    "conv_bn_act_output": lambda n: aru_kernels.conv_bn_act(_meta(n), torch.empty(8, 8, 1, 1, device="meta"),
                                                            padding=1),
    "conv_bn_train": lambda n: aru_kernels.conv_bn_train(_meta(n + 1), torch.empty(8, 8, 1, 1, device="meta"),
                                                         _vec(), _vec()),
    "bn_add_relu": lambda n: aru_kernels.bn_add_relu(_meta(n + 1), _vec(), _vec()),
    "bn_relu_maxpool": lambda n: aru_kernels.bn_relu_maxpool(_meta(n + 1), _vec(), _vec()),
    "stem_train": lambda n: aru_kernels.stem_train(
        _meta(n + 1, 3), aru_kernels.ConvBN(torch.empty(8, 3, 1, 1, device="meta"), _vec(), _vec())),
    # the block input in range, its second conv's output (padded) not
    "residual_block_train": lambda n: aru_kernels.residual_block_train(
        _meta(n), [aru_kernels.ConvBN(torch.empty(8, 8, 1, 1, device="meta"), _vec(), _vec()),
                   aru_kernels.ConvBN(torch.empty(8, 8, 1, 1, device="meta"), _vec(), _vec(), padding=1)]),
}


@pytest.mark.parametrize("case", sorted(_TOO_MANY_PIXELS))
def test_activations_of_more_pixels_than_32_bit_indices_reach_are_refused(case):
    """The kernels index pixels (N x H x W) with 32-bit integers: an activation of more than
    ``MAX_PIXELS`` is refused with what came and what to do, not indexed past its end. On the
    meta device (no memory), every public operator."""
    with pytest.raises(ValueError, match=r"pixels \(N\*H\*W = \d+\*\d+\*\d+\); the kernels index pixels with "
                                         r"32-bit integers and take at most 1,073,741,824: split the batch"):
        _TOO_MANY_PIXELS[case](_MOST_IMAGES)


def test_the_most_pixels_are_taken():
    x = _meta(_MOST_IMAGES)
    assert aru_kernels.conv_bn_act(x, torch.empty(8, 8, 1, 1, device="meta")).shape == x.shape
    assert aru_kernels.bn_add_relu(x, _vec(), _vec()).shape == x.shape
