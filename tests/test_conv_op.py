"""Parity and input checking of the fused ``conv_bn_act`` operator.

On a machine without CUDA these run through Triton's interpreter on tiny
shapes; the reference is :mod:`aru_kernels.reference` in float64 on the same
(rounded) inputs.
"""

import pytest
import torch

import aru_kernels
from aru_kernels import conv_ops, plans
from aru_kernels import reference as ref
from helpers import POISON, OpLog, assert_close

# (groups, in channels per group, out channels per group): dense, two groups,
# and the ResNeXt group widths 4 and 8. Channel counts are deliberately not
# multiples of any block size.
GROUPINGS = {
    "dense": (1, 5, 10),
    "g2": (2, 3, 5),
    "gw4": (8, 4, 4),
    "gw8": (6, 8, 8),
    "wide": (1, 40, 72),
}
KERNELS = {1: 0, 3: 1, 7: 3}  # kernel size -> padding
EPILOGUES = {"plain": (False, False), "relu": (False, True), "res": (True, False), "res_relu": (True, True)}


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def make_case(device, dtype, *, n, h, w, groups, cin_g, cout_g, k, stride, padding, dilation=1,
              residual=False, prologue=False):
    cin, cout = groups * cin_g, groups * cout_g
    x = channels_last(torch.randn(n, cin, h, w, device=device).to(dtype))
    weight = (torch.randn(cout, cin_g, k, k, device=device) / (cin_g * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, device=device) + 0.5
    shift = torch.randn(cout, device=device)
    p = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    res = channels_last(torch.randn(n, cout, p, q, device=device).to(dtype)) if residual else None
    pro = (torch.rand(cin, device=device) + 0.5, torch.randn(cin, device=device)) if prologue else (None, None)
    return x, weight, scale, shift, res, pro


def run_both(x, weight, scale, shift, res, pro, *, stride, padding, groups, relu, dilation=1, in_relu=False):
    """Kernel output (into a poisoned buffer) and the float64 reference."""
    n, cout = x.shape[0], weight.shape[0]
    p = (x.shape[2] + 2 * padding - dilation * (weight.shape[2] - 1) - 1) // stride + 1
    q = (x.shape[3] + 2 * padding - dilation * (weight.shape[3] - 1) - 1) // stride + 1
    out = channels_last(torch.full((n, cout, p, q), POISON, dtype=x.dtype, device=x.device))
    conv_ops.conv_bn_act_into(out, x, weight, scale=scale, shift=shift, residual=res, in_scale=pro[0],
                              in_shift=pro[1], stride=stride, padding=padding, dilation=dilation, groups=groups,
                              relu=relu, in_relu=in_relu)

    def d(t):
        return None if t is None else t.double()

    expected = ref.conv_bn_act(
        d(x), d(weight), stride=stride, padding=padding, dilation=dilation, groups=groups,
        scale=d(scale), shift=d(shift), residual=d(res), relu=relu,
        in_scale=d(pro[0]), in_shift=d(pro[1]), in_relu=in_relu,
    )
    return out, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("epilogue", EPILOGUES.values(), ids=EPILOGUES.keys())
@pytest.mark.parametrize("grouping", GROUPINGS.values(), ids=GROUPINGS.keys())
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("k", KERNELS, ids=[f"k{k}" for k in KERNELS])
def test_matches_reference(device, k, stride, grouping, epilogue, dtype):
    groups, cin_g, cout_g = grouping
    residual, relu = epilogue
    case = make_case(device, dtype, n=1, h=7, w=9, groups=groups, cin_g=cin_g, cout_g=cout_g, k=k,
                     stride=stride, padding=KERNELS[k], residual=residual)
    out, expected = run_both(*case, stride=stride, padding=KERNELS[k], groups=groups, relu=relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("grouping", ["dense", "gw4", "gw8"])
def test_prologue_matches_reference(device, grouping, dtype):
    """Batch norm + ReLU of the previous layer applied on load; padding stays zero after it."""
    groups, cin_g, cout_g = GROUPINGS[grouping]
    case = make_case(device, dtype, n=2, h=6, w=5, groups=groups, cin_g=cin_g, cout_g=cout_g, k=3,
                     stride=1, padding=1, residual=True, prologue=True)
    out, expected = run_both(*case, stride=1, padding=1, groups=groups, relu=True, in_relu=True)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dilation,stride", [(2, 1), (2, 2), (3, 1)])
def test_dilation(device, dilation, stride):
    case = make_case(device, torch.float32, n=1, h=11, w=9, groups=8, cin_g=4, cout_g=4, k=3,
                     stride=stride, padding=dilation, dilation=dilation)
    out, expected = run_both(*case, stride=stride, padding=dilation, groups=8, relu=True, dilation=dilation)
    assert_close(out, expected, torch.float32)


def test_batch_and_blocks_larger_than_one_tile(device):
    """Several M tiles and several N blocks per pack, a partial last tile in each."""
    case = make_case(device, torch.float32, n=3, h=9, w=11, groups=1, cin_g=70, cout_g=150, k=1,
                     stride=1, padding=0)
    out, expected = run_both(*case, stride=1, padding=0, groups=1, relu=True)
    assert_close(out, expected, torch.float32)


def test_public_op_matches_launcher_and_is_deterministic(device):
    x, weight, scale, shift, res, _ = make_case(device, torch.float32, n=2, h=5, w=7, groups=8, cin_g=4,
                                                cout_g=4, k=3, stride=1, padding=1, residual=True)
    a = aru_kernels.conv_bn_act(x, weight, padding=1, groups=8, scale=scale, shift=shift, residual=res,
                                relu=True)
    b = aru_kernels.conv_bn_act(x, weight, padding=(1, 1), groups=8, scale=scale, shift=shift,
                                residual=res, relu=True)
    assert torch.equal(a, b), "two identical calls gave different results"
    expected = ref.conv_bn_act(x.double(), weight.double(), padding=1, groups=8, scale=scale.double(),
                               shift=shift.double(), residual=res.double(), relu=True)
    assert_close(a, expected, torch.float32)


def test_pack_factor():
    assert plans.pack_factor(32, 4, 4) == 4  # ResNeXt-50 stage 1: 4 groups of 4 fill a 16-wide dot
    assert plans.pack_factor(32, 8, 8) == 2
    assert plans.pack_factor(32, 16, 16) == 1
    assert plans.pack_factor(1, 3, 64) == 1
    assert plans.pack_factor(3, 4, 4) == 3  # too narrow even all together: one pack


# -- bad input ---------------------------------------------------------------------------------


def _ok_inputs(device):
    x = channels_last(torch.randn(1, 8, 5, 5, device=device))
    w = torch.randn(8, 4, 3, 3, device=device)
    return x, w


def test_error_on_3d_input(device):
    x, w = _ok_inputs(device)
    with pytest.raises(ValueError, match=r"4-D \[N, C, H, W\]; got shape \(8, 5, 5\)"):
        aru_kernels.conv_bn_act(x[0], w, groups=2)


def test_error_groups_not_dividing(device):
    x, w = _ok_inputs(device)
    with pytest.raises(ValueError, match="groups=3 must divide both in_channels=8 and out_channels=8"):
        aru_kernels.conv_bn_act(x, w, groups=3)


def test_error_channel_count_mismatch(device):
    x, _ = _ok_inputs(device)
    w = torch.randn(8, 3, 3, 3, device=device)
    with pytest.raises(ValueError, match="expects 6 input channels; input has 8"):
        aru_kernels.conv_bn_act(x, w, groups=2)


def test_error_dtype_mix(device):
    x, w = _ok_inputs(device)
    with pytest.raises(TypeError, match="input dtype torch.float32 and weight dtype torch.float16 differ"):
        aru_kernels.conv_bn_act(x, w.half(), groups=2)
    res = channels_last(torch.randn(1, 8, 5, 5, device=device).half())
    with pytest.raises(TypeError, match="residual dtype torch.float16 differs"):
        aru_kernels.conv_bn_act(x, w, groups=2, padding=1, residual=res)


def test_error_unsupported_dtype(device):
    x, w = _ok_inputs(device)
    with pytest.raises(TypeError, match="float32, float16, bfloat16; got torch.float64"):
        aru_kernels.conv_bn_act(x.double(), w.double(), groups=2)


def test_error_channels_first_input(device):
    x, w = _ok_inputs(device)
    with pytest.raises(ValueError, match="channels_last"):
        aru_kernels.conv_bn_act(x.contiguous(), w, groups=2)


def test_error_scale_length(device):
    x, w = _ok_inputs(device)
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of 8"):
        aru_kernels.conv_bn_act(x, w, groups=2, scale=torch.ones(7, device=device))


def test_error_wrong_device():
    x = channels_last(torch.randn(1, 8, 5, 5, device="meta"))
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="weight is on cpu but input is on meta"):
        aru_kernels.conv_bn_act(x, w, groups=2)


def test_error_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(aru_kernels.runtime, "interpreting", lambda: False)  # kernels compiled for a GPU
    x = channels_last(torch.randn(1, 8, 5, 5))
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match="must be on a CUDA device"):
        conv_ops.conv_bn_act_into(None, x, w, groups=2)


# -- torch.library integration -----------------------------------------------------------------


def test_opcheck(device):
    x, weight, scale, shift, res, pro = make_case(device, torch.float32, n=1, h=5, w=6, groups=8,
                                                  cin_g=4, cout_g=4, k=3, stride=1, padding=1,
                                                  residual=True, prologue=True)
    mean, var = torch.randn_like(scale), torch.rand_like(scale) + 0.5
    args = (x, weight, mean, var, scale, shift, res, torch.randn_like(pro[0]), pro[0], pro[1], 1, 1, 1, 8, 1e-5,
            True, True)
    torch.library.opcheck(torch.ops.aru.conv_bn_act.default, args)
    torch.library.opcheck(torch.ops.aru.space_to_depth.default,
                          (channels_last(torch.randn(2, 3, 9, 8, device=device)), 3, 7, 7))


def test_torch_compile_fullgraph(device):
    x, weight, scale, shift, res, _ = make_case(device, torch.float32, n=1, h=5, w=6, groups=8, cin_g=4,
                                                cout_g=4, k=3, stride=2, padding=1)

    def f(x):
        y = aru_kernels.conv_bn_act(x, weight, stride=2, padding=1, groups=8, scale=scale, shift=shift,
                                    relu=True)
        return y * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), f(x), torch.float32, what="compiled output")


@pytest.mark.gpu
@pytest.mark.parametrize("channels,size", [(128, 56), (256, 28), (512, 14), (1024, 7)],
                         ids=["stage1", "stage2", "stage3", "stage4"])
def test_bf16_resnext50_grouped_layers_at_real_size(channels, size):
    """The four grouped 3x3 layers of resnext50_32x4d, bf16, batch 8, every element written."""
    case = make_case("cuda", torch.bfloat16, n=8, h=size, w=size, groups=32, cin_g=channels // 32,
                     cout_g=channels // 32, k=3, stride=1, padding=1, residual=True)
    out, expected = run_both(*case, stride=1, padding=1, groups=32, relu=True)
    assert_close(out, expected, torch.bfloat16)


# (input channels, kernel, padding, H, W): the ResNet stem, and other stride-2 convolutions
# over at most 4 channels, odd and even sizes, an even kernel, no padding.
SPACE_TO_DEPTH = [(3, 7, 3, 13, 11), (1, 3, 1, 8, 9), (4, 5, 2, 9, 10), (2, 7, 0, 15, 14), (3, 4, 1, 10, 7)]


@pytest.mark.parametrize("cin,k,padding,h,w", SPACE_TO_DEPTH)
def test_strided_few_channel_conv_runs_over_pixel_blocks(device, cin, k, padding, h, w):
    """A stride-2 conv over <= 4 channels whose input needs no gradient runs as a stride-1
    conv of 2x2 pixel blocks (``aru::space_to_depth``): the eval epilogue's output against
    float64; with an input that needs a gradient it runs as it is."""
    x = channels_last(torch.randn(2, cin, h, w, device=device))
    weight = torch.randn(8, cin, k, k, device=device) / (cin * k * k) ** 0.5
    mean, var = torch.randn(8, device=device), torch.rand(8, device=device) + 0.5
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    log = OpLog()
    with log:
        out = aru_kernels.conv_bn_act(x, weight, stride=2, padding=padding, mean=mean, var=var, scale=scale,
                                      shift=shift, relu=True)
    assert "aru.space_to_depth" in log.ops
    expected = ref.conv_bn_act(x.double(), weight.double(), stride=2, padding=padding, mean=mean.double(),
                               var=var.double(), scale=scale.double(), shift=shift.double(), relu=True)
    assert_close(out, expected, torch.float32)

    x_leaf = x.clone().requires_grad_()  # an input that needs its gradient: the convolution as it is
    log = OpLog()
    with log:
        out = aru_kernels.conv_bn_act(x_leaf, weight, stride=2, padding=padding)
    assert "aru.space_to_depth" not in log.ops
    out.backward(torch.ones_like(out))
    x_ref = x.double().requires_grad_()
    ref.conv_bn_act(x_ref, weight.double(), stride=2, padding=padding).backward(torch.ones_like(out).double())
    assert_close(x_leaf.grad, x_ref.grad, torch.float32, what="input gradient")
