"""Training-mode operators: gradients, batch statistics, running statistics.

References are float64 PyTorch autograd through :mod:`aru_kernels.reference`.
The cases of other projects' grids (geometry, NaN, ``nn.BatchNorm2d``'s
options, several tiles) are in ``test_edge_cases.py``.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import aru_kernels
from aru_kernels import block_ops, plans
from aru_kernels import reference as ref
from helpers import OpLog, assert_as_accurate, assert_close, rel_error
from test_conv_op import GROUPINGS, KERNELS, channels_last

# Every buffer an operator allocates starts as NaN: unwritten gradient elements fail.
pytestmark = pytest.mark.usefixtures("poisoned")


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _d(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.parametrize("epilogue", ["plain", "scale_shift_res_relu"])
@pytest.mark.parametrize("grouping", ["dense", "g2", "gw4", "gw8"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("k", KERNELS, ids=[f"k{k}" for k in KERNELS])
def test_conv_bn_act_gradients(device, k, stride, grouping, epilogue):
    """dx, dW and the prologue/epilogue vector gradients against float64 autograd."""
    groups, cin_g, cout_g = GROUPINGS[grouping]
    cin, cout, pad = groups * cin_g, groups * cout_g, KERNELS[k]
    full = epilogue != "plain"
    x = channels_last(torch.randn(2, cin, 7, 9, device=device))
    w = torch.randn(cout, cin_g, k, k, device=device) / (cin_g * k * k) ** 0.5
    in_scale, in_shift = torch.rand(cin, device=device) + 0.5, torch.randn(cin, device=device)
    p = (7 + 2 * pad - k) // stride + 1
    q = (9 + 2 * pad - k) // stride + 1
    scale = torch.rand(cout, device=device) + 0.5 if full else None
    shift = torch.randn(cout, device=device) if full else None
    res = channels_last(torch.randn(2, cout, p, q, device=device)) if full else None
    inputs = [x, w, scale, shift, res, in_scale, in_shift]
    ours = [None if t is None else _leaf(t) for t in inputs]
    exact = [_d(t) for t in inputs]
    y = aru_kernels.conv_bn_act(ours[0], ours[1], stride=stride, padding=pad, groups=groups, scale=ours[2],
                                shift=ours[3], residual=ours[4], relu=full, in_scale=ours[5],
                                in_shift=ours[6], in_relu=True)
    y_ref = ref.conv_bn_act(exact[0], exact[1], stride=stride, padding=pad, groups=groups, scale=exact[2],
                            shift=exact[3], residual=exact[4], relu=full, in_scale=exact[5],
                            in_shift=exact[6], in_relu=True)
    g = torch.randn_like(y_ref)
    y.backward(g.float())
    y_ref.backward(g)
    names = ["x", "weight", "scale", "shift", "residual", "in_scale", "in_shift"]
    for name, a, e in zip(names, ours, exact):
        if a is not None:
            assert_close(a.grad, e.grad, torch.float32, what=f"gradient of {name}")


def _bn_state(c, device, momentum_none=False):
    return dict(running_mean=torch.randn(c, device=device) * 0.1, running_var=torch.rand(c, device=device) + 0.5,
                num_batches_tracked=torch.tensor(3 if momentum_none else 0, device=device))


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_bottleneck_train_gradients_and_running_stats(device, downsample):
    """conv_bn_train x3 (+ downsample) + bn_add_relu: a training-mode ARU, end to end."""
    n, cin, width, groups = 2, 32 if downsample else 24, 32, 8
    cout = 24
    stride = 2 if downsample else 1
    x = _leaf(channels_last(torch.randn(n, cin, 7, 9, device=device)))
    ws = [_leaf(torch.randn(width, cin, 1, 1, device=device) / cin ** 0.5),
          _leaf(torch.randn(width, width // groups, 3, 3, device=device) / (9 * width / groups) ** 0.5),
          _leaf(torch.randn(cout, width, 1, 1, device=device) / width ** 0.5),
          _leaf(torch.randn(cout, cin, 1, 1, device=device) / cin ** 0.5)]
    affine = [(_leaf(torch.rand(c, device=device) + 0.5), _leaf(torch.randn(c, device=device)))
              for c in (width, width, cout, cout)]
    states = [_bn_state(c, device) for c in (width, width, cout, cout)]
    convs = [dict(), dict(stride=stride, padding=1, groups=groups), dict(), dict(stride=stride)]

    ours_states = [{k: v.clone() for k, v in s.items()} for s in states]
    y, pro = x, None
    for i in range(3):
        y, *pro = aru_kernels.conv_bn_train(
            y, ws[i], *affine[i], **ours_states[i], **convs[i],
            **({} if pro is None else dict(in_mean=pro[0], in_scale=pro[1], in_shift=pro[2], in_relu=True)))
    m, s, b = pro
    if downsample:
        yd, md, sd, bd = aru_kernels.conv_bn_train(x, ws[3], *affine[3], **ours_states[3], **convs[3])
        out = aru_kernels.bn_add_relu(y, s, b, yd, sd, bd, mean=m, id_mean=md)
    else:
        out = aru_kernels.bn_add_relu(y, s, b, x, mean=m)

    exact_states = [{k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in s.items()}
                    for s in states]
    xd = x.detach().double().requires_grad_()
    wd = [_d(w) for w in ws]
    ad = [(_d(a), _d(b)) for a, b in affine]
    o = xd
    for i in range(3):
        o = ref.conv_bn(o, wd[i], *ad[i], exact_states[i]["running_mean"], exact_states[i]["running_var"],
                        exact_states[i]["num_batches_tracked"], training=True, relu=i < 2, **convs[i])
    if downsample:
        idn = ref.conv_bn(xd, wd[3], *ad[3], exact_states[3]["running_mean"], exact_states[3]["running_var"],
                          exact_states[3]["num_batches_tracked"], training=True, **convs[3])
    else:
        idn = xd
    out_ref = torch.relu(o + idn)
    assert_close(out, out_ref, torch.float32, what="block output")

    g = torch.randn_like(out_ref)
    leaves = [x, *ws, *[t for pair in affine for t in pair]]
    leaves_ref = [xd, *wd, *[t for pair in ad for t in pair]]
    used = 4 if downsample else 3
    keep = [0, *range(1, 1 + used), *range(5, 5 + 2 * used)]
    grads = torch.autograd.grad(out, [leaves[i] for i in keep], g.float())
    grads_ref = torch.autograd.grad(out_ref, [leaves_ref[i] for i in keep], g)
    for i, a, e in zip(keep, grads, grads_ref):
        assert_close(a, e, torch.float32, what=f"gradient of leaf {i}")
    for i in range(used):
        for key in ("running_mean", "running_var"):
            assert_close(ours_states[i][key], exact_states[i][key], torch.float32, what=f"bn{i} {key}")
        assert ours_states[i]["num_batches_tracked"].item() == 1


# (chain: (c_out, k, stride, groups) per conv; downsample stride or None; affine; running statistics; momentum)
BLOCKS = {
    "bottleneck": ([(16, 1, 1, 1), (16, 3, 1, 4), (24, 1, 1, 1)], None, True, True, 0.1),
    "bottleneck_down": ([(16, 1, 1, 1), (16, 3, 2, 4), (24, 1, 1, 1)], 2, True, True, 0.1),
    "basic_down": ([(24, 3, 2, 1), (24, 3, 1, 1)], 2, True, True, None),
    "plain_bn": ([(16, 1, 1, 1), (24, 3, 1, 8)], None, False, False, 0.1),
    "frozen": ([(16, 1, 1, 1), (16, 3, 1, 4), (24, 1, 1, 1)], 1, True, True, 0.1),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_residual_block_train_matches_float64(device, kind):
    """One autograd node per block: output, every gradient (the residual gradient added
    in the first conv's input-gradient epilogue, dL/dz scaled as the last convs load it)
    and the running statistics, against float64 autograd."""
    spec, down, affine, running, momentum = BLOCKS[kind]
    n, cin, h, w = 2, 24 if down is None else 20, 7, 9
    x = _leaf(channels_last(torch.randn(n, cin, h, w, device=device) * 1.5 + 0.5))
    convs, c_in = [], cin
    for c_out, k, stride, groups in [*spec, *([(spec[-1][0], 1, down, 1)] if down else [])]:
        if len(convs) == len(spec):
            c_in = cin  # the downsample conv reads the block input
        w_ = _leaf(torch.randn(c_out, c_in // groups, k, k, device=device) / (c_in // groups * k * k) ** 0.5)
        g_, b_ = ((_leaf(torch.rand(c_out, device=device) + 0.5), _leaf(torch.randn(c_out, device=device)))
                  if affine else (None, None))
        state = _bn_state(c_out, device, momentum_none=momentum is None) if running else {}
        convs.append(dict(weight=w_, bn_weight=g_, bn_bias=b_, state=state, stride=stride, padding=k // 2,
                          groups=groups))
        c_in = c_out
    if kind == "frozen":  # neither the input nor the first weight needs a gradient
        x = x.detach()
        convs[0]["weight"] = convs[0]["weight"].detach()

    def tup(c):
        st = {k: v.clone() for k, v in c["state"].items()}
        c["ours"] = st
        return aru_kernels.ConvBN(c["weight"], c["bn_weight"], c["bn_bias"], st.get("running_mean"),
                                  st.get("running_var"), st.get("num_batches_tracked"), c["stride"], c["padding"],
                                  1, c["groups"], momentum, 1e-5)

    out = aru_kernels.residual_block_train(x, [tup(c) for c in convs[:len(spec)]],
                                           tup(convs[-1]) if down else None)

    def exact(c, inp, relu):
        c["exact"] = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in c["state"].items()}
        return ref.conv_bn(inp, c["weight_d"], c["g_d"], c["b_d"], c["exact"].get("running_mean"),
                           c["exact"].get("running_var"), c["exact"].get("num_batches_tracked"), training=True,
                           momentum=momentum, stride=c["stride"], padding=c["padding"], groups=c["groups"], relu=relu)

    xd = _d(x) if x.requires_grad else x.detach().double()
    for c in convs:
        c["weight_d"], c["g_d"], c["b_d"] = _d(c["weight"]), _d(c["bn_weight"]), _d(c["bn_bias"])
        if not c["weight"].requires_grad:
            c["weight_d"] = c["weight_d"].detach()
    o = xd
    for i, c in enumerate(convs[:len(spec)]):
        o = exact(c, o, relu=i < len(spec) - 1)
    out_ref = torch.relu(o + (exact(convs[-1], xd, False) if down else xd))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, out_ref, torch.float32, what="block output")

    g = torch.randn_like(out_ref)
    pairs = [(x, xd)] + [(c[a], c[b]) for c in convs for a, b in
                         (("weight", "weight_d"), ("bn_weight", "g_d"), ("bn_bias", "b_d"))]
    pairs = [(a, e) for a, e in pairs if a is not None and a.requires_grad]
    frozen = kind == "frozen"
    assert len(pairs) == (0 if frozen else 1) + len(convs) * (3 if affine else 1) - frozen
    grads = torch.autograd.grad(out, [a for a, _ in pairs], g.float())
    grads_ref = torch.autograd.grad(out_ref, [e for _, e in pairs], g)
    for i, (a, e) in enumerate(zip(grads, grads_ref)):
        assert_close(a, e, torch.float32, what=f"gradient of leaf {i} ({tuple(a.shape)})")
    for i, c in enumerate(convs):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if key in c["ours"]:
                assert_close(c["ours"][key].double(), c["exact"][key].double(), torch.float32,
                             what=f"bn{i} {key}")


# Blocks in one node: (chain as (c_out, k, stride, groups), downsample stride or None). Each
# block's last input gradient takes the previous block's end: a 1x1 after a block with a
# downsample branch, a 1x1 downsample conv, a strided 1x1 one (phased), a 3x3, and a grouped
# conv (no fused path: the plain input gradient, then the block end's own pass). A block
# starting with a stride-1 1x1 conv computes the previous block's end as it loads its input
# (blocks 1, 5, 6 and 7: an identity with and without its own batch norm; 136 input channels,
# two blocks of K, and 264 outputs, two blocks of N, of which only the first writes it). A
# stride-1 1x1 conv of at most 256 outputs takes its weight and input gradients in one launch:
# the first conv of blocks 0, 1, 5 and 7 (a plain input gradient, through a block end with and
# without a downsample branch), the last of blocks 0, 1, 6 and 7 (through the prologue) and
# block 5's stride-1 downsample conv (adding the first conv's input gradient).
SEQUENCE = [
    ([(12, 1, 1, 1), (12, 3, 2, 4), (24, 1, 1, 1)], 2),
    ([(12, 1, 1, 1), (12, 3, 1, 4), (24, 1, 1, 1)], None),
    ([(32, 3, 2, 1), (32, 3, 1, 1)], 2),
    ([(32, 3, 1, 1), (32, 3, 1, 1)], None),
    ([(32, 3, 1, 4)], None),
    ([(136, 1, 1, 1)], 1),
    ([(264, 1, 1, 1), (136, 1, 1, 1)], None),
    ([(40, 1, 1, 1), (136, 1, 1, 1)], None),
]
FUSED_ENDS = 4  # blocks of SEQUENCE whose first conv computes the previous block's end
FUSED_GRADS = 9  # convs of SEQUENCE whose two gradients are one launch


def test_residual_blocks_train_matches_float64(device):
    """Several blocks as one node: the gradient between two blocks is never written
    (the next block's last input gradient applies the block end), against float64
    autograd through the blocks one by one: output, every gradient, running statistics."""
    n, cin, h, w = 2, 20, 9, 11
    x = _leaf(channels_last(torch.randn(n, cin, h, w, device=device) * 1.5 + 0.5))
    blocks, c_in = [], cin
    for spec, down in SEQUENCE:
        convs, c_block = [], c_in
        for j, (c_out, k, stride, groups) in enumerate([*spec, *([(spec[-1][0], 1, down, 1)] if down else [])]):
            if j == len(spec):
                c_in = c_block
            convs.append(dict(
                weight=_leaf(torch.randn(c_out, c_in // groups, k, k, device=device) / (c_in // groups * k * k) ** 0.5),
                bn_weight=_leaf(torch.rand(c_out, device=device) + 0.5), bn_bias=_leaf(torch.randn(c_out, device=device)),
                state=_bn_state(c_out, device), stride=stride, padding=k // 2, groups=groups))
            c_in = c_out
        blocks.append((convs, len(spec), down is not None))

    def tup(c):
        c["ours"] = {k: v.clone() for k, v in c["state"].items()}
        return aru_kernels.ConvBN(c["weight"], c["bn_weight"], c["bn_bias"], c["ours"]["running_mean"],
                                  c["ours"]["running_var"], c["ours"]["num_batches_tracked"], c["stride"],
                                  c["padding"], 1, c["groups"], 0.1, 1e-5)

    with OpLog() as log:
        out = aru_kernels.residual_blocks_train(
            x, [([tup(c) for c in convs[:chain]], tup(convs[-1]) if ds else None) for convs, chain, ds in blocks])
    assert log.ops.count("aru.block_end_conv_bn_stats") == FUSED_ENDS
    assert log.ops.count("aru.bn_add_relu_mask") == len(SEQUENCE) - FUSED_ENDS

    def exact(c, inp, relu):
        c["exact"] = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in c["state"].items()}
        return ref.conv_bn(inp, _d(c["weight"]) if "wd" not in c else c["wd"], c["gd"], c["bd"],
                           c["exact"]["running_mean"], c["exact"]["running_var"], c["exact"]["num_batches_tracked"],
                           training=True, momentum=0.1, stride=c["stride"], padding=c["padding"],
                           groups=c["groups"], relu=relu)

    xd = _d(x)
    o = xd
    for convs, chain, ds in blocks:
        for c in convs:
            c["wd"], c["gd"], c["bd"] = _d(c["weight"]), _d(c["bn_weight"]), _d(c["bn_bias"])
        block_in, y = o, o
        for i, c in enumerate(convs[:chain]):
            y = exact(c, y, relu=i < chain - 1)
        o = torch.relu(y + (exact(convs[-1], block_in, False) if ds else block_in))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, o, torch.float32, what="output")
    g = torch.randn_like(o)
    pairs = [(x, xd)] + [(c[a], c[b]) for convs, _, _ in blocks for c in convs
                         for a, b in (("weight", "wd"), ("bn_weight", "gd"), ("bn_bias", "bd"))]
    with OpLog() as log:
        grads = torch.autograd.grad(out, [a for a, _ in pairs], g.float())
    assert log.ops.count("aru.pointwise_conv_grads") == FUSED_GRADS
    grads_ref = torch.autograd.grad(o, [e for _, e in pairs], g)
    for i, (a, e) in enumerate(zip(grads, grads_ref)):
        assert_close(a, e, torch.float32, what=f"gradient of leaf {i} ({tuple(a.shape)})")
    for b, (convs, _, _) in enumerate(blocks):
        for i, c in enumerate(convs):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(c["ours"][key].double(), c["exact"][key].double(), torch.float32,
                             what=f"block {b} bn{i} {key}")


def test_residual_blocks_train_errors(device):
    x = channels_last(torch.randn(2, 8, 4, 4, device=device))
    conv = aru_kernels.ConvBN(torch.randn(8, 8, 1, 1, device=device), None, None)
    wide = aru_kernels.ConvBN(torch.randn(16, 8, 1, 1, device=device), None, None)
    with pytest.raises(ValueError, match="needs at least one block"):
        aru_kernels.residual_blocks_train(x, [])
    with pytest.raises(ValueError, match=r"block 1: its conv 0 takes 8 input channels .*; the block input has 16"):
        aru_kernels.residual_blocks_train(x, [([wide], wide), ([conv], None)])


def test_residual_blocks_train_second_backward_and_saved_tensor_hooks(device):
    """The node holds its blocks' activations itself and frees each block's as the
    backward passes it: a second backward with ``retain_graph=True`` gives the same
    gradients, one without it raises PyTorch's error, and saved-tensor hooks
    (``save_on_cpu``, non-reentrant checkpointing) still see every activation. Under
    ``recompute_normalized_inputs`` the gradients are the same, bit for bit."""
    torch.manual_seed(0)

    def conv_bn(c_in, c_out, k=1, groups=1):
        return aru_kernels.ConvBN(_leaf(torch.randn(c_out, c_in // groups, k, k, device=device) / (c_in // groups * k * k) ** 0.5),
                                  _leaf(torch.rand(c_out, device=device) + 0.5), _leaf(torch.randn(c_out, device=device)),
                                  padding=k // 2, groups=groups)

    x = _leaf(channels_last(torch.randn(2, 8, 5, 4, device=device)))
    blocks = [([conv_bn(8, 8), conv_bn(8, 8, 3, 4), conv_bn(8, 16)], conv_bn(8, 16)),
              ([conv_bn(16, 8), conv_bn(8, 8, 3, 4), conv_bn(8, 16)], None)]
    leaves = [x] + [t for chain, ds in blocks for c in [*chain, *([ds] if ds else [])]
                    for t in (c.weight, c.bn_weight, c.bn_bias)]
    g = torch.randn(2, 16, 5, 4, device=device)
    out = aru_kernels.residual_blocks_train(x, blocks)
    first = torch.autograd.grad(out, leaves, g, retain_graph=True)
    again = torch.autograd.grad(out, leaves, g)
    for i, (a, b) in enumerate(zip(first, again)):
        assert torch.equal(a, b), f"leaf {i}: the second backward differs"
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, leaves, g)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = aru_kernels.residual_blocks_train(x, blocks)
    hooked = torch.autograd.grad(out, leaves, g)
    # the activations went through the hook too, not only the input and the parameters
    assert (2, 8, 5, 4) in packed[len(leaves):] and len(packed) > len(leaves), packed
    for i, (a, b) in enumerate(zip(first, hooked)):
        assert torch.equal(a, b), f"leaf {i}: the backward under saved-tensor hooks differs"
    # a backward that stopped half-way (here: an error in the first block's) freed the later
    # blocks' activations: another one says so
    out = aru_kernels.residual_blocks_train(x, blocks)
    real = block_ops._block_backward

    def fails_at_block_0(*args):
        if args[2].shape == x.shape:  # the first block's input
            raise MemoryError("planted")
        return real(*args)

    block_ops._block_backward = fails_at_block_0
    try:
        with pytest.raises(MemoryError, match="planted"):
            torch.autograd.grad(out, leaves, g, retain_graph=False)
    finally:
        block_ops._block_backward = real
    with pytest.raises(RuntimeError, match="freed by an earlier backward"):
        torch.autograd.grad(out, leaves, g)
    # the 3x3s' normalized inputs not kept: the backward writes them again, by the same pass
    with aru_kernels.recompute_normalized_inputs():
        out = aru_kernels.residual_blocks_train(x, blocks)
    with OpLog() as log:
        recomputed = torch.autograd.grad(out, leaves, g)
    assert log.ops.count("aru.bn_add_relu") == 2  # one per grouped 3x3
    for i, (a, b) in enumerate(zip(first, recomputed)):
        assert torch.equal(a, b), f"leaf {i}: the backward with recomputed normalized inputs differs"


def test_residual_block_train_errors(device):
    x = channels_last(torch.randn(1, 8, 1, 1, device=device))
    conv = aru_kernels.ConvBN(torch.randn(8, 8, 1, 1, device=device), None, None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        aru_kernels.residual_block_train(x, [conv, conv])
    with pytest.raises(ValueError, match="at least one"):
        aru_kernels.residual_block_train(x, [])
    with pytest.raises(ValueError, match="running_mean and running_var come together"):
        aru_kernels.residual_block_train(x, [conv._replace(running_mean=torch.zeros(8, device=device))])
    with pytest.raises(ValueError, match="channels_last"):
        aru_kernels.residual_block_train(torch.randn(2, 8, 3, 3, device=device), [conv, conv])


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["m0.1", "m0.5", "cumulative"])
def test_running_statistics_over_several_steps(device, momentum):
    c = 12
    w = torch.randn(c, 8, 3, 3, device=device)
    ours = _bn_state(c, device, momentum_none=momentum is None)
    exact = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in ours.items()}
    for step in range(4):
        x = channels_last(torch.randn(3, 8, 6, 7, device=device) * (step + 1) + step)
        aru_kernels.conv_bn_train(x, w, None, None, **ours, momentum=momentum, padding=1)
        ref.conv_bn(x.double(), w.double(), None, None, exact["running_mean"], exact["running_var"],
                    exact["num_batches_tracked"], training=True, momentum=momentum, padding=1)
    for key in ("running_mean", "running_var"):
        assert_close(ours[key], exact[key], torch.float32, what=key)
    assert torch.equal(ours["num_batches_tracked"], exact["num_batches_tracked"])


def test_no_running_statistics_leaves_nothing_to_update(device):
    x = channels_last(torch.randn(2, 8, 5, 5, device=device))
    w = torch.randn(6, 8, 1, 1, device=device)
    y, mean, scale, shift = aru_kernels.conv_bn_train(x, w, None, None)
    expected = ref.conv_bn(x.double(), w.double(), None, None, None, None, training=True)
    assert_close(scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1), expected,
                 torch.float32)


def test_variance_is_right_for_large_mean_channels(device):
    """Channels with mean 1e3 and std 1: a naive E[y^2] - E[y]^2 in fp32 loses it all."""
    n, c, h, w = 4, 16, 30, 30  # several statistics tiles per channel
    x = channels_last(1e3 + torch.randn(n, c, h, w, device=device))
    weight = torch.eye(c, device=device).view(c, c, 1, 1)  # y = x
    y, mean, scale, shift = aru_kernels.conv_bn_train(x, weight, None, None)
    yd = x.double()
    var = yd.var((0, 2, 3), unbiased=False)
    assert rel_error(scale, torch.rsqrt(var + 1e-5)) < 1e-4, "batch variance lost to cancellation"
    assert rel_error(mean, yd.mean((0, 2, 3))) < 1e-6


def test_bn_add_relu_gradients(device):
    y = _leaf(channels_last(torch.randn(2, 20, 5, 3, device=device)))
    idn = _leaf(channels_last(torch.randn(2, 20, 5, 3, device=device)))
    vecs = [_leaf(torch.randn(20, device=device)) for _ in range(4)]
    out = aru_kernels.bn_add_relu(y, *vecs[:2], idn, *vecs[2:])
    ex = [_d(t) for t in (y, *vecs[:2], idn, *vecs[2:])]
    out_ref = ref.bn_add_relu(*ex)
    assert_close(out, out_ref, torch.float32)
    g = torch.randn_like(out_ref)
    out.backward(g.float())
    out_ref.backward(g)
    for name, a, e in zip(["y", "scale", "shift", "identity", "id_scale", "id_shift"],
                          (y, *vecs[:2], idn, *vecs[2:]), ex):
        assert_close(a.grad, e.grad, torch.float32, what=f"gradient of {name}")


def _unpack_bits(bits, c):
    """[M, ceil(C/8)] uint8 -> [M, 8*ceil(C/8)] bool, channel 8j + b from bit b of byte j."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)


@pytest.mark.parametrize("affine", [False, True], ids=["identity", "identity_bn"])
@pytest.mark.parametrize("c,c_out", [
    (72, 264),  # two blocks of K (64) and of N (256) under the GPU's rules
    (264, 520),  # 128 x 256 tiles, 32 input channels a step (wide_forward): 9 blocks of K, 3 of N
])
def test_block_end_conv_matches_its_two_operators(device, affine, c, c_out):
    """``aru::block_end_conv_bn_stats`` (the block end computed as the 1x1 conv loads it)
    gives exactly what ``aru::bn_add_relu_mask`` then ``aru::conv_bn_stats`` give: the
    block output, its mask bits, the conv output and its batch statistics; over tiles
    of several blocks of rows, K and N, only the first block of N writing the output."""
    shape = (2, c, 8, 16)
    # on one multiprocessor, halving the programs costs the busiest one no rows: the 264-channel
    # input takes the wide tiles (ConvPlan.wide_forward), as stage 3 does on an H200's 132
    with plans.device_block_sizes(multiprocessors=1):
        plan = plans.plan_conv(shape, (c_out, c, 1, 1), torch.float32, stats=True, pro_end=True)
        assert plan.wide_forward == (c >= 256)
    y = channels_last(torch.randn(shape, device=device) * 2 + 0.3)
    idn = channels_last(torch.randn(shape, device=device))
    m, s, b = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    idv = (torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)) \
        if affine else (None, None, None)
    w = torch.randn(c_out, c, 1, 1, device=device) / c ** 0.5
    state = _bn_state(c_out, device)
    with plans.device_block_sizes(multiprocessors=1):
        got = torch.ops.aru.block_end_conv_bn_stats(y, m, s, b, idn, *idv, w, *state.values(), 1, 0, 1, 1, 0.1,
                                                    1e-5)
        out, bits = torch.ops.aru.bn_add_relu_mask(y, m, s, b, idn, *idv)
        ref_y, mean, invstd, rm, rv, _, _ = torch.ops.aru.conv_bn_stats(out, w, None, None, None, *state.values(),
                                                                         1, 0, 1, 1, False, 0.1, 1e-5)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, e in zip(("block output", "mask bits", "y", "mean", "invstd", "running mean", "running var"),
                          got, (out, bits, ref_y, mean, invstd, rm, rv)):
        assert torch.equal(a, e), f"{name} differs"
    assert (out > 0).any() and (out == 0).any()


def test_weight_gradient_takes_the_statistics_term_from_the_input_gram(device):
    """Without ``stat_y``, ``conv_weight_grad`` (input_sums, a 1x1 conv) takes the batch-norm
    term ``stat_b * (y - mean)``'s share of dW from the input's Gram matrix (y = W a): dW of
    ``c*dy + stat_a + stat_b*(y - mean)`` and the input's sums against float64, over
    several pixel splits, the Gram column of programs, and two blocks of N."""
    n, cin, cout, h, w = 3, 24, 40, 14, 13
    x = channels_last(torch.randn(n, cin, h, w, device=device) * 1.5 + 0.5)
    m, s, b = torch.randn(cin, device=device), torch.rand(cin, device=device) + 0.5, torch.randn(cin, device=device)
    weight = torch.randn(cout, cin, 1, 1, device=device) / cin ** 0.5
    dy = channels_last(torch.randn(n, cout, h, w, device=device))
    st_a, st_b, c = (torch.randn(cout, device=device) for _ in range(3))

    def v(t):
        return t.double().view(1, -1, 1, 1)
    a = torch.relu(v(s) * (x.double() - v(m)) + v(b))
    y = torch.nn.functional.conv2d(a, weight.double())
    g = v(c) * dy.double() + v(st_a) + v(st_b) * (y - y.mean((0, 2, 3), keepdim=True))
    expected = torch.einsum("nkhw,nchw->ck", a, g).view(cout, cin, 1, 1)
    with plans.device_block_sizes():
        plan = plans.plan_wgrad(plans.plan_conv(x.shape, weight.shape, x.dtype, has_prologue=True), x.device,
                                gram=True)
        assert plan.splits > 1 and plan.block_n < cout
        dw, sums = torch.ops.aru.conv_weight_grad(x, dy, weight, m, s, b, 1, 0, 1, 1, True, None, None, st_a, st_b,
                                                  c, None, True)
    assert_close(dw, expected, torch.float32, what="dW")
    assert_close(sums, a.sum((0, 2, 3)), torch.float32, what="input sums")
    with pytest.raises(ValueError, match="without stat_y needs input_sums"):
        torch.ops.aru.conv_weight_grad(x, dy, weight, m, s, b, 1, 0, 1, 1, True, None, None, st_a, st_b)
    with pytest.raises(ValueError, match="stat_a comes with stat_b"):
        torch.ops.aru.conv_weight_grad(x, dy, weight, m, s, b, 1, 0, 1, 1, True, None, None, st_a, None)


def test_wide_forward_tiles_only_where_they_were_measured():
    """128 x 256 tiles, 32 input channels a step (plans.ConvPlan.wide_forward): training forwards
    of 1x1s with 256 outputs a program and at least 256 inputs, whose statistics epilogue they
    amortize, a block-end prologue's too; not inference (spills with the residual epilogue), grouped
    or input-gradient launches, squeeze tiles that would pad an image's rows further, nor where half
    the programs would leave the busiest multiprocessor more rows."""
    bf16 = torch.bfloat16
    with plans.device_block_sizes():
        def tiles(x, w, **kw):
            p = plans.plan_conv(x, w, bf16, **kw)
            return p.block_m, p.block_n, p.block_k, p.num_warps

        assert tiles((256, 512, 14, 14), (1024, 512, 1, 1), has_prologue=True, stats=True) == (128, 256, 32, 8)
        assert tiles((256, 512, 28, 28), (1024, 512, 1, 1), stride=2, stats=True) == (128, 256, 32, 8)
        assert tiles((256, 512, 14, 14), (1024, 512, 1, 1), stats=True, squeeze=True)[0] == 128  # 196 rows
        assert tiles((256, 2048, 7, 7), (1024, 2048, 1, 1), stats=True, pro_end=True) == (128, 256, 32, 8)
        others = [
            dict(x=(256, 512, 14, 14), w=(1024, 512, 1, 1)),  # inference
            dict(x=(256, 512, 14, 14), w=(1024, 512, 1, 1), has_residual=True, stats=True),
            dict(x=(256, 128, 56, 56), w=(256, 128, 1, 1), stats=True),  # 128 inputs
            dict(x=(256, 512, 14, 14), w=(128, 512, 1, 1), stats=True),  # 128 outputs
            dict(x=(256, 1024, 7, 7), w=(2048, 1024, 1, 1), stats=True, squeeze=True),  # 49 rows an image
            # 392 programs of 64 rows, 3 a multiprocessor, against 196 of 128, 2 of twice the rows
            dict(x=(256, 2048, 7, 7), w=(512, 2048, 1, 1), stats=True, pro_end=True),
            dict(x=(256, 512, 14, 14), w=(512, 16, 3, 3), padding=1, groups=32, stats=True),
            dict(x=(256, 1024, 14, 14), w=(512, 1024, 1, 1), transposed_out_hw=(14, 14)),
        ]
        for case in others:
            x, w = case.pop("x"), case.pop("w")
            assert tiles(x, w, **case)[:3] != (128, 256, 32), case
    with plans.device_block_sizes(multiprocessors=98):  # 196 programs of 128 rows, 2 each; 392 of 64, 4
        assert tiles((256, 2048, 7, 7), (512, 2048, 1, 1), stats=True, pro_end=True)[0] == 128
    with pytest.raises(ValueError, match="at least 1, got 0"):
        with plans.device_block_sizes(multiprocessors=0):
            pass
    # the interpreter's own rules (large blocks) are not the GPU's
    assert not plans.plan_conv((256, 512, 14, 14), (1024, 512, 1, 1), bf16, stats=True).wide_forward


def test_weight_gradient_splits_take_the_fewest_for_the_soonest_finish():
    """Splits of the pixel sum of 8-warp programs, one a multiprocessor at a time: a launch
    of s splits over t tiles takes ceil(s t / 132) waves of 1/s of a tile's work. The rule
    takes the soonest finish up to two waves (four where the tiles alone take more than one;
    within plans.WGRAD_SPLIT_SLACK), and no fewer splits (fp32 slabs) would finish as soon.
    4-warp programs (two a multiprocessor) keep two programs a multiprocessor where the
    tiles do not divide them."""
    def time(s, t):
        return -(-s * t // 132) / s

    conv = plans.plan_conv((256, 64, 56, 56), (64, 64, 1, 1), torch.bfloat16)
    for t in range(1, 300):
        plan = type("P", (), {"tiles": t, "conv": conv, "block_m": 64, "num_warps": 8})()
        with plans.device_block_sizes():
            s = plans._wgrad_splits(plan, torch.device("meta"))
        most = max(-(-132 // t), (2 if t <= 132 else 4) * 132 // t)
        best = min(time(c, t) for c in range(1, most + 1))
        assert 1 <= s <= most and time(s, t) <= best * plans.WGRAD_SPLIT_SLACK, (t, s)
        assert all(time(c, t) > time(s, t) for c in range(1, s)), (t, s)
        if 132 % t == 0:
            assert s == 132 // t, (t, s)  # one program a multiprocessor, one wave
    # resnext50_32x4d's stage-3 last conv at batch 256: 16 tiles of 256 x 128, one wave of 8 splits
    with plans.device_block_sizes():
        wide = plans.plan_wgrad(plans.plan_conv((256, 512, 14, 14), (1024, 512, 1, 1), torch.bfloat16,
                                                has_prologue=True), torch.device("meta"))
    assert (wide.tiles, wide.splits, wide.block_k, wide.block_n) == (16, 8, plans.WIDE_WGRAD_BLOCK_K, 128)
    with plans.device_block_sizes():  # the stage-1 grouped 3x3: 8 tiles of 4 warps, 33 splits, two a multiprocessor
        grouped = plans.plan_wgrad(plans.plan_conv((256, 128, 56, 56), (128, 4, 3, 3), torch.bfloat16, padding=1,
                                                   groups=32), torch.device("meta"))
    assert (grouped.tiles, grouped.num_warps, grouped.splits) == (8, 4, 33)
    with plans.device_block_sizes():  # resnet50's 256 -> 1024: 8 tiles, one wave of 16 splits, not two of 33
        eight = plans.plan_wgrad(plans.plan_conv((256, 256, 14, 14), (1024, 256, 1, 1), torch.bfloat16,
                                                 has_prologue=True), torch.device("meta"))
    assert (eight.tiles, eight.splits) == (8, 16)
    with plans.device_block_sizes():  # the stage-4 grouped 3x3: 96 tiles of 4 warps (k = 9 x 32 in 3 blocks of 128)
        wide_packs = plans.plan_wgrad(plans.plan_conv((256, 1024, 7, 7), (1024, 32, 3, 3), torch.bfloat16, padding=1,
                                                      groups=32), torch.device("meta"))
    assert (wide_packs.tiles, wide_packs.num_warps, wide_packs.block_k) == (96, 4, 128)
    assert time(wide_packs.splits, 96) <= 96 / 132 * 1.1, wide_packs.splits
    # 144 tiles of 8 warps (resnet50's stage-4 3x3 in 128 x 128 tiles): 1 split put 2 on 12 SMs
    plan = type("P", (), {"tiles": 144, "conv": conv, "block_m": 64, "num_warps": 8})()
    with plans.device_block_sizes():
        assert plans._wgrad_splits(plan, torch.device("meta")) == 3


@pytest.mark.parametrize("plan_tap", ["plan_tap_grads", "plan_tap_forward"])
@pytest.mark.parametrize("per_sm", [None, 6, 8], ids=["rules", "tuned6", "tuned8"])
def test_tap_kernel_splits_keep_the_busiest_multiprocessor_even(plan_tap, per_sm):
    """The ring kernels' grid (packs x splits, about four programs a multiprocessor, or a tuned
    entry's ``programs_per_sm``) on an H200: the busiest multiprocessor takes within
    plans.WGRAD_SPLIT_SLACK of an even share of the work, for resnext50_32x4d's stride-1
    grouped 3x3s (8, 16 and 32 packs at batch 256; 17 splits of 32 packs put a fifth program
    on 16 multiprocessors)."""
    kind = "tap_grads" if plan_tap == "plan_tap_grads" else "tap_forward"
    for c, hw in ((128, 56), (256, 28), (512, 14)):
        with plans.device_block_sizes():
            conv = plans.plan_conv((256, c, hw, hw), (c, c // 32, 3, 3), torch.bfloat16, padding=1, groups=32,
                                   has_prologue=True)
            table = {plans.tap_key(kind, conv): {"tiles": {"block_m": 64, "num_warps": 2, "programs_per_sm": per_sm}}}
            with plans.use_tuned_table(table if per_sm else {}):
                plan, _ = getattr(plans, plan_tap)(conv, torch.device("meta"))
        packs, splits = plan.conv.packs, plan.splits
        busiest = -(-packs * splits // 132) / splits
        target = per_sm or plans.TAP_PROGRAMS_PER_SM
        assert target * 132 <= 1.1 * packs * splits <= 1.1 * 1.1 * target * 132, (packs, splits)
        assert busiest <= packs / 132 * plans.WGRAD_SPLIT_SLACK, (packs, splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits,packs,gp,cin_g,cout_g,k", [
    (3, 1, 1, 40, 24, 1),  # a 1x1, groups=1: the slab is dW transposed
    (2, 2, 4, 4, 4, 3),  # packs of 4 groups: only the diagonal blocks are dW
    (5, 3, 2, 8, 2, 3),
    (1, 1, 1, 3, 8, 7),  # one split, a stem
    (2, 1, 1, 300, 200, 1),  # 128-element tiles, partial along C_in
], ids=["1x1", "packs", "packs_wide", "stem", "1x1_wide"])
@pytest.mark.parametrize("extra", ["plain", "scale_term"])
@pytest.mark.parametrize("rules", ["gpu_tiles", "interpreter_tiles"])
def test_sum_slabs_adds_in_split_order_into_the_weight_layout(device, splits, packs, gp, cin_g, cout_g, k, dtype,
                                                             extra, rules):
    """``sum_slabs``: the weight-gradient kernel's fp32 slabs added in split order, each
    pack's diagonal blocks moved to ``[C_out, C_in/groups, KH, KW]``, times ``scale`` plus
    ``term`` and rounded once to the weight's dtype: in fp32 bitwise what the same sums
    in PyTorch give, every element written; with a GPU's tiles (16 to 2048 elements) and
    the interpreter's (whole packs)."""
    from aru_kernels.conv_ops import sum_slabs

    taps, cout = k * k, packs * gp * cout_g
    part = torch.randn(splits, packs, taps * gp * cin_g, gp * cout_g, device=device)
    weight = torch.empty(cout, cin_g, k, k, dtype=dtype, device=device)
    scale = torch.rand(cout, device=device) + 0.5 if extra == "scale_term" else None
    term = torch.randn(cout, cin_g * taps, device=device) if extra == "scale_term" else None
    total = part[0].clone()
    for s in range(1, splits):  # split order, in fp32
        total = total + part[s]
    full = total.reshape(packs, taps, gp, cin_g, gp, cout_g)
    expected = torch.diagonal(full, dim1=2, dim2=4).permute(0, 4, 3, 2, 1).reshape(cout, cin_g, k, k)
    if extra == "scale_term":
        expected = expected * scale.view(-1, 1, 1, 1) + term.view(cout, cin_g, k, k)
    with plans.device_block_sizes() if rules == "gpu_tiles" else contextlib.nullcontext():
        out = sum_slabs(part, weight, gp, scale, term)
    assert out.dtype == dtype and out.shape == weight.shape and out.is_contiguous()
    if dtype == torch.float32:
        assert torch.equal(out, expected)
    else:  # rounded once: within one bf16 step (Triton's interpreter truncates where a GPU rounds to nearest)
        assert torch.all((out.float() - expected).abs() <= expected.abs() * 2.0 ** -7)


@pytest.mark.parametrize("splits,packs,gp,cin_g,cout_g,k", [
    (2, 1, 1, 1024, 2048, 1),  # resnext50_32x4d's widest 1x1
    (8, 1, 1, 64, 256, 1),  # stage 1's conv3
    (4, 8, 4, 4, 4, 3),  # stage 1's grouped 3x3: 4608 elements
    (2, 1, 1, 12, 64, 4),  # the stem over 2x2 pixel blocks
])
def test_sum_slabs_fills_the_gpu(splits, packs, gp, cin_g, cout_g, k):
    """A slab-sum launch runs at least two programs per SM of an H200 (132) for the
    weights of resnext50_32x4d, none with over 2048 elements (recorded on the meta device)."""
    from aru_kernels.conv_ops import sum_slabs
    from aru_kernels.launch import recording

    part = torch.empty(splits, packs, k * k * gp * cin_g, gp * cout_g, device="meta")
    weight = torch.empty(packs * gp * cout_g, cin_g, k, k, dtype=torch.bfloat16, device="meta")
    with recording() as launches, plans.device_block_sizes():
        sum_slabs(part, weight, gp)
    (launch,) = launches
    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
    tile = launch.args["BLOCK_R"] * launch.args["BLOCK_C"]
    assert programs >= 264 and tile <= 2048 and launch.args["BLOCK_C"] >= 8, (launch.grid, launch.args["BLOCK_R"],
                                                                              launch.args["BLOCK_C"])


def test_interpreter_dot_keeps_flat_regions_flat(device):
    """A constant image region gives one output value over its interior, exactly (the
    kernels' dots must round identical rows alike: what keeps batch-norm ties exact)."""
    x = torch.randn(1, 16, 1, 1, device=device).expand(2, 16, 24, 24)
    x = channels_last(x.contiguous())
    w = torch.randn(32, 16, 3, 3, device=device)
    y = aru_kernels.conv_bn_act(x, w, padding=1)
    interior = y[:, :, 1:-1, 1:-1]
    assert torch.equal(interior, interior[:1, :, :1, :1].expand_as(interior))


@pytest.mark.parametrize("case", ["plain", "residual_scaled", "end", "end_id", "prologue"])
def test_pointwise_conv_grads_match_the_two_launches(device, case):
    """``aru::pointwise_conv_grads`` (a 1x1 conv's weight and input gradients from the same
    dL/dy' tiles) gives what ``conv_weight_grad`` then ``conv_input_grad`` (or
    ``conv_input_grad_block_end``) give, under the GPU's tiles: several splits of the
    pixels, three blocks of input channels (mask bytes and sums of each), every output."""
    n, cin, cout, h, w = 3, 136, 200, 14, 13
    x = channels_last(torch.randn(n, cin, h, w, device=device).relu())
    dy, y = (channels_last(torch.randn(n, cout, h, w, device=device)) for _ in range(2))
    weight = torch.randn(cout, cin, 1, 1, device=device) / cin ** 0.5
    mean, st_a, st_b = (torch.randn(cout, device=device) for _ in range(3))
    st_c = torch.rand(cout, device=device) + 0.5 if case == "residual_scaled" else None
    residual = channels_last(torch.randn_like(x)) if case not in ("plain", "prologue") else None
    pro = (torch.randn(cin, device=device) * 0.1, torch.rand(cin, device=device) + 0.5,
           torch.randn(cin, device=device)) if case == "prologue" else (None, None, None)
    end = (None,) * 5
    if case.startswith("end"):
        end_y = channels_last(torch.randn_like(x))
        end_id = channels_last(torch.randn_like(x)) if case == "end_id" else None
        _, bits = torch.ops.aru.bn_add_relu_mask(end_y, torch.zeros(cin, device=device), torch.ones(cin, device=device),
                                                 torch.zeros(cin, device=device), x - 0.5, None, None, None)
        end = (bits, end_y, torch.randn(cin, device=device), end_id,
               torch.randn(cin, device=device) if end_id is not None else None)
    with plans.device_block_sizes():
        plan = plans.plan_pointwise_grads(plans.plan_conv(x.shape, weight.shape, x.dtype), x.device)
        assert plan.splits > 1 and cin > 2 * plan.block_k
        dw, dx, sums = torch.ops.aru.pointwise_conv_grads(x, dy, weight, y, mean, st_a, st_b, st_c, residual, *end,
                                                          *pro, case == "prologue")
        dw_ref, dy_stat = torch.ops.aru.conv_weight_grad(x, dy, weight, *pro, 1, 0, 1, 1, case == "prologue", y,
                                                         mean, st_a, st_b, st_c)
        if end[0] is not None:
            dx_ref, sums_ref = torch.ops.aru.conv_input_grad_block_end(dy_stat, weight, 1, 0, 1, 1, residual, *end)
        else:
            dx_ref, part_shift, part_scale = torch.ops.aru.conv_input_grad(dy_stat, weight, x, *pro, 1, 0, 1, 1,
                                                                           case == "prologue", residual)
            if case == "prologue":
                sums_ref = torch.stack((part_shift.sum(0), part_scale.sum(0)))
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert_close(dw, dw_ref, torch.float32, what="dW")
    assert_close(dx, dx_ref, torch.float32, what="dx")
    if end[0] is not None or case == "prologue":
        assert (dx == 0).any() and (dx != 0).any()  # the ReLU's mask
        assert_close(sums, sums_ref, torch.float32, what="block-end or prologue sums")
    else:
        assert sums.numel() == 0
    with pytest.raises(ValueError, match="1x1 convolution of x's 136 channels"):
        torch.ops.aru.pointwise_conv_grads(x, dy, weight[:, :8], y, mean, st_a, st_b)


def _tap_grads_reference(x, dy, weight, y, mean, st_a, st_b, st_c, pro, relu, dil, groups, dtype):
    """float64 (dW, dx, sums) of a 3x3 conv behind a batch-norm prologue, its dL/dy
    ``(st_c*) dy + st_a + st_b*(y - mean)``, the normalized input and dL/dy' rounded to
    ``dtype`` as the kernel's dots read them."""
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    mu, s, b = pro
    xc = x.double() - (v(mu) if mu is not None else 0)
    pre = v(s) * xc + v(b)
    a = (pre.relu() if relu else pre).to(dtype).double()
    g = (v(st_c) * dy.double() if st_c is not None else dy.double()) + v(st_a) + v(st_b) * (y.double() - v(mean))
    g = g.to(dtype).double()
    w = weight.to(dtype).double()
    dw = torch.nn.grad.conv2d_weight(a, weight.shape, g, padding=dil, dilation=dil, groups=groups)
    da = torch.nn.grad.conv2d_input(a.shape, w, g, padding=dil, dilation=dil, groups=groups)
    if relu:
        da = torch.where(pre <= 0, 0.0, da)
    return dw, da * v(s), torch.stack((da.sum((0, 2, 3)), (da * xc).sum((0, 2, 3))))


@pytest.mark.parametrize("rules", ["gpu", "interpreter", "tuned"])
@pytest.mark.parametrize("case", ["gw4", "gw8_scaled", "gw2_no_mean_no_relu", "dense16_dil2", "bf16"])
def test_tap_conv_grads_match_float64(device, case, rules):
    """``aru::tap_conv_grads`` (a stride-1 grouped 3x3's weight and input gradients from one
    ring of dL/dy' rows a program) against float64: packs of 4, 8 and 2 groups, a dense
    16-channel conv at dilation 2, the statistics term scaled or not, the prologue with
    and without its mean and ReLU. Under the GPU's rules the pixels run in several
    splits of several steps each, so the ring wraps and the taps reach across steps,
    splits and images; unwritten outputs read NaN. ``tuned``: the GPU's rules with a
    tuned table's entry for the launch (32 pixels a step on 4 warps, registers capped at
    200, 6 programs a multiprocessor), which the launch takes."""
    groups, cg, dil = {"gw4": (32, 4, 1), "gw8_scaled": (8, 8, 1), "gw2_no_mean_no_relu": (4, 8, 1),
                       "dense16_dil2": (1, 16, 2), "bf16": (8, 4, 1)}[case]
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    c = groups * cg
    n, h, w = 3, 17, 19
    x = channels_last(torch.randn(n, c, h, w, device=device)).to(dtype)
    dy, y = (channels_last(torch.randn(n, c, h, w, device=device)).to(dtype) for _ in range(2))
    weight = torch.randn(c, cg, 3, 3, device=device) / (3 * cg ** 0.5)
    mean = torch.randn(c, device=device) * 0.1
    st_a, st_b = torch.randn(c, device=device) * 0.1, torch.randn(c, device=device) * 0.1
    st_c = torch.rand(c, device=device) + 0.5 if case == "gw8_scaled" else None
    plain = case == "gw2_no_mean_no_relu"
    pro = (None if plain else torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5,
           torch.randn(c, device=device) * 0.5)
    from aru_kernels.launch import recording

    args = (x, dy, weight, y, mean, st_a, st_b, st_c, *pro, not plain, dil, dil, groups)
    with plans.device_block_sizes() if rules != "interpreter" else contextlib.nullcontext():
        conv = plans.plan_conv(x.shape, weight.shape, dtype, padding=dil, dilation=dil, groups=groups,
                               has_prologue=True, pro_mean=pro[0] is not None)
        table = {plans.tap_key("tap_grads", conv): {"tiles": {"block_m": 32, "num_warps": 4, "maxnreg": 200,
                                                              "programs_per_sm": 6}}}
        with plans.use_tuned_table(table) if rules == "tuned" else contextlib.nullcontext():
            plan, ring = plans.plan_tap_grads(conv, x.device)
            if rules != "interpreter":  # several steps a split
                assert plan.splits > 1 and plan.m_per_split >= 4 * plan.block_m
            if rules == "gpu":  # more rows of dL/dy' formed a split than the ring holds
                assert ring < plan.m_per_split + 2 * dil * (w + 1)
            with recording() as launches:
                torch.ops.aru.tap_conv_grads(*args)
            assert (launches[0].args["BLOCK_M"], launches[0].num_warps) == (plan.block_m, plan.num_warps)
            assert launches[0].args.get("maxnreg") == plan.maxnreg  # a compile option, with the cap only
            assert ((plan.block_m, plan.num_warps, plan.maxnreg) == (32, 4, 200) if rules == "tuned"
                    else plan.block_m != 32 and plan.maxnreg is None)
            if rules == "tuned":
                assert plan == plans.tap_plan(conv, x.device, 32, 4, 200, 6)[0]
            dw, dx, sums = torch.ops.aru.tap_conv_grads(*args)
    dw_ref, dx_ref, sums_ref = _tap_grads_reference(x, dy, weight, y, mean, st_a, st_b, st_c, pro, not plain, dil,
                                                    groups, dtype)
    assert dx.is_contiguous(memory_format=torch.channels_last) and dx.dtype == dtype and dw.dtype == weight.dtype
    assert_close(dw, dw_ref, dtype, what="dW")
    assert_close(dx, dx_ref, dtype, what="dx")
    assert_close(sums, sums_ref, dtype, what="prologue sums")
    if not plain:
        assert (dx == 0).any() and (dx != 0).any()  # the prologue's ReLU


def test_tap_conv_grads_errors(device):
    x = channels_last(torch.randn(2, 64, 6, 6, device=device))
    w = torch.randn(64, 4, 3, 3, device=device)
    v = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="packs of groups hold 16 to 16 channels each way.*64 -> 64 channels in 2"):
        torch.ops.aru.tap_conv_grads(x, x, torch.randn(64, 32, 3, 3, device=device), x, v, v, v, None, v, v, v,
                                     True, 1, 1, 2)
    with pytest.raises(ValueError, match="padding=2, dilation=1"):
        torch.ops.aru.tap_conv_grads(x, x, w, x, v, v, v, None, v, v, v, True, 2, 1, 16)
    with pytest.raises(ValueError, match=r"dy must be a torch.float32 tensor of shape \(2, 64, 6, 6\)"):
        torch.ops.aru.tap_conv_grads(x, x[:, :, :5].contiguous(memory_format=torch.channels_last), w, x, v, v, v,
                                     None, v, v, v, True, 1, 1, 16)
    with pytest.raises(ValueError, match="stat_b must be a 1-D tensor of 64"):
        torch.ops.aru.tap_conv_grads(x, x, w, x, v, v, v[:8], None, v, v, v, True, 1, 1, 16)
    with pytest.raises(ValueError, match="channels_last"):
        torch.ops.aru.tap_conv_grads(x.contiguous(), x, w, x, v, v, v, None, v, v, v, True, 1, 1, 16)
    assert not plans.tap_grads_fuse(3, 3, 2, 1, 1, 32, 128, 128)  # strided: two launches, by phase
    assert not plans.tap_grads_fuse(3, 3, 1, 1, 1, 32, 1024, 1024)  # packs of 32: spill
    assert plans.tap_grads_fuse(3, 3, 1, 1, 1, 32, 512, 512) and not plans.tap_grads_fuse(1, 1, 1, 0, 1, 1, 16, 16)


@pytest.mark.parametrize("tuned", [False, True], ids=["rules", "tuned"])
@pytest.mark.parametrize("case", ["gw4", "gw2_no_mean_no_relu", "dense16_dil2", "bf16"])
def test_conv_bn_stats_normalizing_in_the_launch_matches_float64(device, case, tuned):
    """``aru::conv_bn_stats`` on a grouped 3x3 that ``tap_grads_fuse`` takes
    (``tap_forward_kernel``: the input's batch norm applied once into a ring of rows a
    program, each tile's statistics of the stored y) against float64: y, the batch mean
    and invstd, the running statistics; the normalized input is not returned, and the
    op's own backward (``aru::tap_conv_grads``, which recomputes it) matches float64
    autograd. Under the GPU's rules the pixels run in several splits of several
    steps each, so the ring wraps and the taps reach across
    steps, splits and images. ``tuned``: with a tuned table's entries for both tap kernels
    (128 pixels a step on 2 warps, 168 registers at most, forward; 32 on 4 for the gradients), which they take."""
    groups, cg, dil = {"gw4": (32, 4, 1), "gw2_no_mean_no_relu": (4, 8, 1), "dense16_dil2": (1, 16, 2),
                       "bf16": (8, 4, 1)}[case]
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    plain = case == "gw2_no_mean_no_relu"
    c, n, h, w, eps, momentum = groups * cg, 3, 29, 33, 1e-5, 0.1  # tiles and splits start mid-row
    x = channels_last(torch.randn(n, c, h, w, device=device)).to(dtype)
    weight = torch.randn(c, cg, 3, 3, device=device) / (3 * cg ** 0.5)
    pro = (None if plain else torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5,
           torch.randn(c, device=device) * 0.5)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    nbt = torch.tensor(1, device=device)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with plans.device_block_sizes():  # the GPU's splits
        conv = plans.plan_conv(x.shape, weight.shape, dtype, padding=dil, dilation=dil, groups=groups,
                               has_prologue=True, pro_mean=pro[0] is not None)
        table = {plans.tap_key("tap_forward", conv): {"tiles": {"block_m": 128, "num_warps": 2, "maxnreg": 168}},
                 plans.tap_key("tap_grads", conv): {"tiles": {"block_m": 32, "num_warps": 4}}}
        stack = contextlib.ExitStack()
        if tuned:
            stack.enter_context(plans.use_tuned_table(table))
        with stack:
            plan, ring = plans.plan_tap_forward(conv, x.device)
            assert (plan.block_m, plan.num_warps, plan.maxnreg) == ((128, 2, 168) if tuned else (256, 4, None))
            assert plan.splits > 1 and plan.m_per_split >= 4 * plan.block_m  # several steps a split, more rows
            assert ring < plan.m_per_split + 2 * dil * (w + 1)  # formed a split than the ring holds
            y, mean, invstd, new_rm, new_rv, a, _ = torch.ops.aru.conv_bn_stats(
                xg, wg, *pro, rm, rv, nbt, 1, dil, dil, groups, not plain, momentum, eps)
    assert a.numel() == 0 and y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    x64, w64 = x.double().requires_grad_(), weight.to(dtype).double().requires_grad_()
    pre = v(pro[1]) * (x64 - (v(pro[0]) if not plain else 0)) + v(pro[2])
    a64 = pre if plain else pre.relu()
    y64 = torch.nn.functional.conv2d(a64, w64, padding=dil, dilation=dil, groups=groups)
    assert_close(y, y64, dtype, what="y")
    stored = y.detach().double()  # the statistics are of y as stored
    var = stored.var((0, 2, 3), unbiased=False)
    assert_close(mean, stored.mean((0, 2, 3)), torch.float32, what="mean")
    assert_close(invstd, (var + eps).rsqrt(), torch.float32, what="invstd")
    count = n * h * w
    assert_close(new_rm, (1 - momentum) * rm.double() + momentum * stored.mean((0, 2, 3)), torch.float32,
                 what="running mean")
    assert_close(new_rv, (1 - momentum) * rv.double() + momentum * var * count / (count - 1), torch.float32,
                 what="running var")
    if dtype == torch.float32:  # the backward against float64 autograd (bf16: the forward only)
        gy, gm, gi = torch.randn_like(y), torch.randn_like(mean), torch.randn_like(invstd)
        with OpLog() as log, plans.device_block_sizes(), \
                plans.use_tuned_table(table) if tuned else contextlib.nullcontext():
            torch.autograd.backward((y, mean, invstd), (gy, gm, gi))
        assert "aru.tap_conv_grads" in log.ops and "aru.conv_weight_grad" not in log.ops, log.ops
        var64 = y64.var((0, 2, 3), unbiased=False)
        loss = (y64 * gy.double()).sum() + (y64.mean((0, 2, 3)) * gm.double()).sum() + \
            ((var64 + eps).rsqrt() * gi.double()).sum()
        dx64, dw64 = torch.autograd.grad(loss, (x64, w64))
        assert_close(xg.grad, dx64, dtype, what="dx")
        assert_close(wg.grad, dw64, dtype, what="dW")


def test_prologue_backward_passes_no_gradient_where_its_relu_input_is_zero(device):
    """Where a conv's prologue ``relu(s*(x - mu) + b)`` sees exactly 0 (x at its mean, b = 0),
    torch.relu passes no gradient: the input-gradient launch and the one-launch 1x1
    gradients against float64 autograd."""
    n, cin, cout, h, w = 2, 16, 24, 5, 6
    mu, s, b = torch.randn(cin, device=device), torch.rand(cin, device=device) + 0.5, torch.randn(cin, device=device)
    b[:8] = 0
    x = torch.randn(n, cin, h, w, device=device)
    x[:, :8, :2] = mu[:8].view(1, 8, 1, 1)  # the prologue's ReLU input is exactly 0 there
    x = channels_last(x)
    weight = torch.randn(cout, cin, 1, 1, device=device)
    dy = channels_last(torch.randn(n, cout, h, w, device=device))
    x64 = x.double().requires_grad_()
    a = torch.relu(s.double().view(1, -1, 1, 1) * (x64 - mu.double().view(1, -1, 1, 1)) + b.double().view(1, -1, 1, 1))
    (torch.nn.functional.conv2d(a, weight.double()) * dy.double()).sum().backward()
    zero = torch.zeros(cout, device=device)
    _, dx, _ = torch.ops.aru.pointwise_conv_grads(x, dy, weight, dy, zero, zero, zero, None, None, None, None, None,
                                                  None, None, mu, s, b, True)
    dx2, _, _ = torch.ops.aru.conv_input_grad(dy, weight, x, mu, s, b, 1, 0, 1, 1, True)
    for got in (dx, dx2):
        assert torch.equal(got[:, :8, :2], torch.zeros_like(got[:, :8, :2]))
        assert_close(got, x64.grad, torch.float32, what="dL/dx")


def test_relu_mask_bits_and_block_end_gradient(device):
    """``aru::bn_add_relu_mask``'s bits are torch.relu's gradient mask of the stored
    output (exact zeros closed, NaN open, the pad bits of a partial byte clear), and
    ``aru::bn_add_relu_grad_sums`` reading them gives dz and the sums."""
    n, c, h, w = 3, 20, 7, 5  # 20 channels: 3 bytes a pixel, the last half used
    y = channels_last(torch.randn(n, c, h, w, device=device))
    idn = channels_last(torch.randn(n, c, h, w, device=device))
    mean, scale, shift = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    y[0, :, 0, 0] = mean  # bn lands exactly on shift: identity = -shift gives an exact zero
    idn[0, :, 0, 0] = -shift
    y[1, 3, 2, 2] = float("nan")
    out, bits = torch.ops.aru.bn_add_relu_mask(y, mean, scale, shift, idn, None, None, None)
    assert bits.dtype == torch.uint8 and bits.shape == (n * h * w, 3)
    expected = ~(out.permute(0, 2, 3, 1).reshape(-1, c) <= 0)
    unpacked = _unpack_bits(bits, c)
    assert torch.equal(unpacked[:, :c], expected)
    assert not unpacked[:, c:].any(), "bits past the last channel are set"
    assert not expected[0].any() and expected[n * h * w // n + 2 * w + 2, 3]  # the zeros closed, the NaN open
    dout = channels_last(torch.randn(n, c, h, w, device=device))
    dz, sums = torch.ops.aru.bn_add_relu_grad_sums(dout, bits, y, mean, None, None)
    dz_ref = torch.where(out <= 0, 0.0, dout)
    assert torch.equal(dz, dz_ref)
    ok = ~torch.isnan(y).any((0, 2, 3))  # the NaN channel's sum is NaN on both sides
    yc = y - mean.view(1, c, 1, 1)
    assert_close(sums[0], dz_ref.sum((0, 2, 3)), torch.float32, what="sum of dz")
    assert_close(sums[1][ok], (dz_ref * yc).sum((0, 2, 3))[ok], torch.float32, what="sum of dz*(y - mean)")


@pytest.mark.parametrize("identity", ["plain", "affine"])
def test_block_end_with_global_average_pool(device, identity):
    """``aru::bn_add_relu_mask(..., pool=True)``: each image's mean of the block end
    over its pixels (several steps of pixels, two channel blocks, the last partial) and
    the same ReLU bits, the end itself never written; ``bn_add_relu_grad_sums(...,
    pooled=True)`` spreads the pooled gradient as the mean's backward: against float64."""
    n, c, h, w = 2, 136, 9, 11  # 99 pixels: two steps of 64; 136 channels: 128 + 8
    y, idn = (channels_last(torch.randn(n, c, h, w, device=device)) for _ in range(2))
    mean, scale, shift = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    id_vecs = ((torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device))
               if identity == "affine" else (None, None, None))
    pooled, bits = torch.ops.aru.bn_add_relu_mask(y, mean, scale, shift, idn, *id_vecs, pool=True)
    _, bits_full = torch.ops.aru.bn_add_relu_mask(y, mean, scale, shift, idn, *id_vecs)
    assert torch.equal(bits, bits_full)

    def v(t):
        return t.double().view(1, c, 1, 1)
    r = idn.double() if identity == "plain" else (idn.double() - v(id_vecs[0])) * v(id_vecs[1]) + v(id_vecs[2])
    z = torch.relu((y.double() - v(mean)) * v(scale) + v(shift) + r)
    assert pooled.shape == (n, c, 1, 1)
    assert_close(pooled, z.mean((2, 3), keepdim=True), torch.float32, what="pooled block end")

    dout = torch.randn(n, c, 1, 1, device=device)
    ident = (idn, id_vecs[0]) if identity == "affine" else (None, None)
    dz, sums = torch.ops.aru.bn_add_relu_grad_sums(dout, bits, y, mean, *ident, pooled=True)
    dz_ref = torch.where(z > 0, dout.double() / (h * w), 0.0)
    assert_close(dz, dz_ref, torch.float32, what="dz from the pooled gradient")
    assert_close(sums[0], dz_ref.sum((0, 2, 3)), torch.float32, what="sum of dz")
    assert_close(sums[1], (dz_ref * (y.double() - v(mean))).sum((0, 2, 3)), torch.float32, what="sum of dz*(y - mean)")
    if identity == "affine":
        assert_close(sums[2], (dz_ref * (idn.double() - v(id_vecs[0]))).sum((0, 2, 3)), torch.float32,
                     what="sum of dz*(identity - id_mean)")
    with pytest.raises(ValueError, match=r"pooled gradient is \[2, 136, 1, 1\]"):
        torch.ops.aru.bn_add_relu_grad_sums(dout[:1], bits, y, mean, None, None, pooled=True)


# k, s, p, h, w. Windows overlapping by one row (k = s + 1) have the forward keep that row:
# k3s2p1 and k2s1p0. The last: 19 x 21 pooled, so that the forward's programs walk 8 rows
# down strips of 16 columns (plans.max_pool_blocks) and the last of each is partial
POOLS = [(3, 2, 1, 13, 11), (2, 2, 0, 9, 8), (3, 1, 1, 7, 10), (5, 3, 2, 11, 12), (2, 3, 1, 10, 11),
         (2, 1, 0, 6, 7), (3, 2, 1, 37, 41)]
POOL_IDS = [f"k{k}s{s}p{p}_{h}x{w}" for k, s, p, h, w in POOLS]


def _bn_relu_pool_ref(y, mean, scale, shift, k, s, p):
    def v(t):
        return t.view(1, -1, 1, 1)
    return torch.nn.functional.max_pool2d(torch.relu((y - v(mean)) * v(scale) + v(shift)), k, s, p)


@pytest.mark.parametrize("k,s,p,h,w", POOLS, ids=POOL_IDS)
def test_bn_relu_maxpool_matches_float64(device, k, s, p, h, w):
    """The stem's batch norm, ReLU and max-pool in one pass, and its gradient in every input."""
    c = 24  # one full and one partial channel block in the interpreter's tiles
    y = _leaf(channels_last(torch.randn(2, c, h, w, device=device)))
    vecs = [_leaf(torch.randn(c, device=device)) for _ in range(3)]
    out = aru_kernels.bn_relu_maxpool(y, vecs[1], vecs[2], mean=vecs[0], kernel_size=k, stride=s, padding=p)
    ex = [_d(t) for t in (y, *vecs)]
    out_ref = _bn_relu_pool_ref(*ex, k, s, p)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, out_ref, torch.float32)
    g = torch.randn_like(out_ref)
    out.backward(g.float())
    out_ref.backward(g)
    for name, a, e in zip(["y", "mean", "scale", "shift"], (y, *vecs), ex):
        assert_close(a.grad, e.grad, torch.float32, what=f"gradient of {name}")
    # the sums alone (a stem whose conv gathers dL/dy itself), from the windows' side
    _, code = torch.ops.aru.bn_relu_maxpool(y.detach(), *[v.detach() for v in vecs], k, s, p)
    dy, sums = torch.ops.aru.bn_relu_maxpool_backward(channels_last(g.float()), code, y.detach(), vecs[0].detach(),
                                                      vecs[1].detach(), k, s, p, write_dy=False)
    assert dy.numel() == 0
    assert_close(sums[0], ex[3].grad, torch.float32, what="sum of g (the shift's gradient)")
    assert_close(sums[1], ex[2].grad, torch.float32, what="sum of g * (y - mean) (the scale's gradient)")


# conv k, s, p; pool k, s, p; h, w (a 2-wide pool of stride 3 leaves pixels in no window; the
# last: rows of 35 pooled blocks, over two steps of the weight gradient's 32, the second partial)
STEMS = [(7, 2, 3, 3, 2, 1, 19, 15), (3, 1, 1, 2, 2, 0, 9, 12), (3, 1, 1, 2, 3, 1, 11, 10),
         (3, 1, 1, 2, 2, 0, 6, 70)]


@pytest.mark.parametrize("ck,cs,cp,k,s,p,h,w", STEMS,
                         ids=["7x7s2_pool3s2", "3x3s1_pool2s2", "3x3s1_pool2s3", "3x3s1_pool2s2_wide"])
def test_stem_train_matches_float64(device, ck, cs, cp, k, s, p, h, w):
    """``aru_kernels.stem_train``: conv, batch norm, ReLU, max-pool as one node whose
    weight gradient gathers dL/dy from the pooled gradient (never written): output,
    the gradients of the weight and the batch norm's vectors, running statistics,
    against float64 autograd through the operators one at a time."""
    n, cin, cout = 2, 3, 20  # 20 channels: a partial channel block
    x = channels_last(torch.randn(n, cin, h, w, device=device))
    weight = _leaf(torch.randn(cout, cin, ck, ck, device=device) / (cin * ck * ck) ** 0.5)
    gamma, beta = _leaf(torch.rand(cout, device=device) + 0.5), _leaf(torch.randn(cout, device=device))
    state = _bn_state(cout, device)
    ours = {key: v.clone() for key, v in state.items()}
    exact = {key: v.clone().double() if v.is_floating_point() else v.clone() for key, v in state.items()}
    conv = aru_kernels.ConvBN(weight, gamma, beta, ours["running_mean"], ours["running_var"],
                              ours["num_batches_tracked"], cs, cp, 1, 1, 0.1, 1e-5)
    with OpLog() as log:
        out = aru_kernels.stem_train(x, conv, kernel_size=k, stride=s, padding=p)
    # a strided stem reads the image as 2x2 pixel blocks (aru_kernels.space_to_depth), built once
    assert log.ops.count("aru.space_to_depth") == (cs == 2)
    wd, gd, bd = _d(weight), _d(gamma), _d(beta)
    y = ref.conv_bn(x.double(), wd, gd, bd, exact["running_mean"], exact["running_var"],
                    exact["num_batches_tracked"], training=True, momentum=0.1, stride=cs, padding=cp, relu=True)
    out_ref = torch.nn.functional.max_pool2d(y, k, s, p)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, out_ref, torch.float32, what="pooled output")
    g = torch.randn_like(out_ref)
    with OpLog() as log:
        grads = torch.autograd.grad(out, [weight, gamma, beta], g.float())
    assert "aru.conv_input_grad" not in log.ops and log.shapes[log.ops.index("aru.bn_relu_maxpool_backward")][0] == (0,)
    # ... and so does its weight gradient: dL/dW' of the 4x4 stride-1 conv over 16 channels
    assert "aru.space_to_depth" not in log.ops
    assert log.shapes[log.ops.index("aru.conv_weight_grad")][0] == ((cout, 16, 4, 4) if cs == 2 else (cout, cin, ck, ck))
    for name, a, e in zip(["weight", "bn weight", "bn bias"], grads, torch.autograd.grad(out_ref, [wd, gd, bd], g)):
        assert_close(a, e, torch.float32, what=f"gradient of the {name}")
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(ours[key].double(), exact[key].double(), torch.float32, what=key)
    with pytest.raises(ValueError, match="x takes no gradient here"):
        aru_kernels.stem_train(_leaf(x), conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_bn_relu_maxpool_ties_nan_and_code(device, dtype):
    """Ties go to the window's first maximum and a NaN to its last, as PyTorch's
    max-pool routes them; ``code`` is -1 exactly where the pooled value is <= 0.
    (16-bit outputs take the maximum of integer keys: bits over position.)"""
    n, c, h, w = 2, 16, 9, 9
    y = channels_last(torch.randint(-2, 3, (n, c, h, w), device=device).to(dtype))  # many equal values
    y[0, 3, 4, 4] = float("nan")
    y[1, 5, 2, 3] = float("nan")
    y[1, 5, 3, 3] = float("nan")  # two NaN in one window
    ones, zeros = torch.ones(c, device=device), torch.zeros(c, device=device)
    out, code = torch.ops.aru.bn_relu_maxpool(y, zeros, ones, zeros, 3, 2, 1)
    yr = _leaf(y.float())  # (the same values; its gradient summed in fp32, as ours)
    out_ref = torch.nn.functional.max_pool2d(torch.relu(yr), 3, 2, 1)
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref))
    assert torch.equal(torch.nan_to_num(out.float()), torch.nan_to_num(out_ref.detach()))
    assert torch.equal(code.permute(0, 3, 1, 2) == -1, out_ref.detach() <= 0), "code's -1 is not where out <= 0"
    dout = channels_last(torch.randn_like(out_ref).to(dtype))
    out_ref.backward(dout.float())
    dy, sums = torch.ops.aru.bn_relu_maxpool_backward(dout, code, y, zeros, ones, 3, 2, 1)
    assert torch.equal(dy != 0, yr.grad != 0), "the gradient went to another element of a window than PyTorch's"
    assert_close(dy, yr.grad, dtype, what="dL/dy")  # (sums of up to 4 values, rounded once)
    assert_close(sums[0], yr.grad.sum((0, 2, 3)), torch.float32, what="sum of g")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,s,p,h,w", POOLS, ids=POOL_IDS)
def test_bn_relu_maxpool_16bit_takes_pytorchs_maximum(device, dtype, k, s, p, h, w):
    """16-bit outputs: the pooled value, and the position ``code`` names, are PyTorch's
    max-pool (its first maximum) over the stored normalized values. Inputs are quarters,
    means, scales (some negative) and shifts dyadic, so every normalized value is exact
    in 16 bits (the interpreter truncates fp32 to bf16 where a GPU rounds) and many tie."""
    c = 24
    y = channels_last((torch.randint(-12, 13, (2, c, h, w), device=device) / 4).to(dtype))
    g = torch.Generator().manual_seed(0)

    def pick(values):
        return torch.tensor(values)[torch.randint(len(values), (c,), generator=g)].to(device)

    mean, scale, shift = pick([0.0, 0.125, -0.25]), pick([0.5, 1.0, 2.0, -1.0, -2.0]), pick([-0.5, 0.0, 0.25, 0.5])
    out, code = torch.ops.aru.bn_relu_maxpool(y, mean, scale, shift, k, s, p)
    v = mean.view(1, -1, 1, 1), scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    z = torch.relu((y.float() - v[0]) * v[1] + v[2]).to(dtype)
    out_ref, index = torch.nn.functional.max_pool2d(z.cpu().float(), k, s, p, return_indices=True)
    assert torch.equal(out.cpu().float(), out_ref), "pooled values differ from PyTorch's"
    code = code.permute(0, 3, 1, 2).cpu().long()  # [N, C, P, Q]
    pp, qq = torch.meshgrid(torch.arange(out.shape[2]), torch.arange(out.shape[3]), indexing="ij")
    flat = (pp * s - p + code // k) * w + (qq * s - p + code % k)
    live = out_ref > 0
    assert torch.equal(code == -1, ~live)
    assert live.float().mean() > 0.3 and torch.equal(flat[live], index[live]), "another maximum than PyTorch's"


def test_bn_relu_maxpool_errors(device):
    y = channels_last(torch.randn(1, 8, 5, 5, device=device))
    one, zero = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of 8"):
        aru_kernels.bn_relu_maxpool(y, torch.ones(7, device=device), zero)
    with pytest.raises(ValueError, match="channels_last"):
        aru_kernels.bn_relu_maxpool(y.contiguous(), one, zero)
    with pytest.raises(ValueError, match="padding <= kernel_size // 2; got kernel_size=3, stride=2, padding=2"):
        aru_kernels.bn_relu_maxpool(y, one, zero, padding=2)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair of equal ints"):
        aru_kernels.bn_relu_maxpool(y, one, zero, kernel_size=(3, 2))
    with pytest.raises(ValueError, match="smaller than the 7x7 window"):
        aru_kernels.bn_relu_maxpool(y, one, zero, kernel_size=7, padding=0)
    # stride=None is the window's size, as for F.max_pool2d
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    out = aru_kernels.bn_relu_maxpool(y, scale, shift, kernel_size=2, stride=None, padding=0)
    expected = F.max_pool2d(torch.relu(y.double() * scale.double().view(1, -1, 1, 1)
                                       + shift.double().view(1, -1, 1, 1)), 2, stride=None)
    assert out.shape == (1, 8, 2, 2)
    assert_close(out, expected, torch.float32)


def test_weight_gradient_is_deterministic_across_runs(device):
    x = channels_last(torch.randn(4, 32, 9, 9, device=device))
    w = _leaf(torch.randn(32, 4, 3, 3, device=device))
    grads = []
    for _ in range(2):
        w.grad = None
        aru_kernels.conv_bn_act(x, w, padding=1, groups=8).square().sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1]), "two identical backward passes differ"


def test_train_op_errors(device):
    x = channels_last(torch.randn(1, 8, 5, 5, device=device))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        aru_kernels.conv_bn_train(x, torch.randn(8, 4, 3, 3, device=device), None, None, groups=3)
    y = channels_last(torch.randn(1, 8, 5, 5, device=device))
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of 8"):
        aru_kernels.bn_add_relu(y, torch.ones(7, device=device), torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="identity must match y"):
        aru_kernels.bn_add_relu(y, torch.ones(8, device=device), torch.zeros(8, device=device), y[:, :4])
    with pytest.raises(ValueError, match="channels_last"):
        aru_kernels.bn_add_relu(y.contiguous(), torch.ones(8, device=device), torch.zeros(8, device=device))


def test_opcheck_training_ops(device):
    x = channels_last(torch.randn(2, 16, 5, 6, device=device))
    w = torch.randn(16, 4, 3, 3, device=device)
    s, b = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    m = torch.randn(16, device=device)
    torch.library.opcheck(torch.ops.aru.conv_stats.default, (x, w, m, s, b, 1, 1, 1, 4, True))
    y, tm, tm2 = torch.ops.aru.conv_stats(x, w, None, None, None, 1, 1, 1, 4, False)
    state = _bn_state(16, device)
    torch.library.opcheck(torch.ops.aru.bn_stats.default,
                          (y, tm, tm2, state["running_mean"], state["running_var"], state["num_batches_tracked"],
                           plans.plan_conv(x.shape, w.shape, x.dtype, padding=1, groups=4).block_m, 0.1, 1e-5))
    torch.library.opcheck(torch.ops.aru.bn_add_relu.default, (y, m, s, b, x, m, s, b))
    e = torch.rand(2, 16, device=device) + 0.5  # per (image, channel)
    torch.library.opcheck(torch.ops.aru.bn_add_relu_mask.default, (y, m, s, b, x, m, s, b))
    _, bits = torch.ops.aru.bn_add_relu_mask(y, m, s, b, x, m, s, b)
    torch.library.opcheck(torch.ops.aru.bn_add_relu_grad_sums.default, (torch.randn_like(y), bits, y, m, x, m))
    torch.library.opcheck(torch.ops.aru.bn_add_relu_mask.default, (y, m, s, b, x, m, s, b, True))
    torch.library.opcheck(torch.ops.aru.bn_add_relu_grad_sums.default,
                          (torch.randn(y.shape[0], y.shape[1], 1, 1, device=device), bits, y, m, x, m, True))
    torch.library.opcheck(torch.ops.aru.bn_add_relu.default, (y, m, s, b, x, m, s, b, e))
    torch.library.opcheck(torch.ops.aru.bn_add_relu_scaled_backward.default,
                          (torch.randn_like(y), x, y, m, s, b, e, x, m, s))
    torch.library.opcheck(torch.ops.aru.conv_bn_squeeze.default,
                          (x, w, m, None, s, b, None, None, None, None, 1, 1, 1, 4, 1e-5, False, False))
    torch.library.opcheck(torch.ops.aru.conv_input_grad.default,
                          (torch.randn_like(y), w, x, None, None, None, 1, 1, 1, 4, False, torch.randn_like(x)))
    torch.library.opcheck(torch.ops.aru.conv_weight_grad.default,
                          (x, torch.randn_like(y), w, m, s, b, 1, 1, 1, 4, True, y, m, s, b, s, e))
    # the statistics term folded through a 1x1 conv: input sums from the weight gradient, gram in dgrad
    w1 = torch.randn(24, 16, 1, 1, device=device)
    y1 = channels_last(torch.randn(2, 24, 5, 6, device=device))
    v24 = [torch.randn(24, device=device) for _ in range(3)]
    torch.library.opcheck(torch.ops.aru.conv_weight_grad.default,
                          (x, torch.randn_like(y1), w1, m, s, b, 1, 0, 1, 1, True, y1, *v24, v24[0], None, True))
    gram = torch.randn(16, 16, device=device)
    torch.library.opcheck(torch.ops.aru.conv_input_grad.default,
                          (torch.randn_like(y1), w1, x, m, s, b, 1, 0, 1, 1, True, None, gram, m, b))
    torch.library.opcheck(torch.ops.aru.conv_weight_grad.default,
                          (x, torch.randn_like(y), w, m, s, b, 1, 1, 1, 4, True, y, m, s, b, s, None, False, False))
    state = _bn_state(24, device)
    end_args = (y, m, s, b, x, m, s, b, w1, *state.values(), 1, 0, 1, 1, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.aru.block_end_conv_bn_stats.default, end_args)
    torch.library.opcheck(torch.ops.aru.block_end_conv_bn_stats.default, (y, m, s, b, x, None, None, None, w1,
                                                                          None, None, None, 1, 0, 1, 1, 0.1, 1e-5))
    with pytest.raises(ValueError, match="needs a stride-1 1x1 convolution without padding"):
        torch.ops.aru.block_end_conv_bn_stats(*end_args[:8], w, *end_args[9:])
    with pytest.raises(ValueError, match="needs its identity"):
        torch.ops.aru.block_end_conv_bn_stats(y, m, s, b, None, None, None, None, *end_args[8:])
    with pytest.raises(ValueError, match="identity must match y_end"):
        torch.ops.aru.block_end_conv_bn_stats(y, m, s, b, x[:1], m, s, b, *end_args[8:])
    with pytest.raises(ValueError, match="id_mean, id_scale and id_shift come together"):
        torch.ops.aru.block_end_conv_bn_stats(y, m, s, b, x, None, s, b, *end_args[8:])
    torch.library.opcheck(torch.ops.aru.bn_relu_maxpool.default, (y, m, s, b, 3, 2, 1))
    pooled, code = torch.ops.aru.bn_relu_maxpool(y, m, s, b, 3, 2, 1)
    torch.library.opcheck(torch.ops.aru.bn_relu_maxpool_backward.default,
                          (torch.randn_like(pooled), code, y, m, s, 3, 2, 1))
    with pytest.raises(ValueError, match="input_sums needs a stride-1 1x1 convolution"):
        torch.ops.aru.conv_weight_grad(x, torch.randn_like(y), w, m, s, b, 1, 1, 1, 4, True, y, m, s, b, s, None,
                                       True)
    with pytest.raises(ValueError, match="gram needs a prologue"):
        torch.ops.aru.conv_input_grad(torch.randn_like(y1), w1, x, None, None, None, 1, 0, 1, 1, False, None,
                                      gram, m, b)
    with pytest.raises(ValueError, match="gram comes with gram_mean and acc_bias"):
        torch.ops.aru.conv_input_grad(torch.randn_like(y1), w1, x, m, s, b, 1, 0, 1, 1, True, None, gram, None, b)


def _sync_worker(rank, world, init_file, x, ws, affine, result_file, split):
    """One process of test_sync_stats_two_processes_match_one: its ``split[rank]`` images
    of the batch. The forward and backward read no number back to the host (``Tensor.item``
    raises): a read would wait for the statistics' exchange at every batch norm."""
    import os as _os

    _os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    item = torch.Tensor.item
    try:
        start = sum(split[:rank])
        torch.Tensor.item = _no_host_read
        try:
            out = _sync_block(x[start:start + split[rank]].clone(), ws, affine, sync=True)
            (out.float().square().sum() / x.shape[0]).backward()
        finally:
            torch.Tensor.item = item
        grads = [t.grad for t in (*ws, *affine)]
        for g in grads:
            dist.all_reduce(g)  # DDP's reduction (a sum here: each process holds 1/world of the loss)
        if rank == 0:
            torch.save({"grads": grads, "running": affine[0].running}, result_file)
    finally:
        dist.destroy_process_group()


def _one_value_worker(rank, world, init_file, x, w, result_file):
    """One process of test_sync_stats_one_value_a_channel: rank 0 holds the one image, rank 1 none."""
    import os as _os

    _os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), num_batches_tracked=torch.tensor(0))
        y, mean, scale, shift = aru_kernels.conv_bn_train(x[:1 - rank], w, None, None, **state, sync_stats=True)
        from aru_models.train import _CPUSyncBatchNorm2d  # the training CLI's eager one, for CPUs

        eager = _CPUSyncBatchNorm2d(4).train()
        eager(torch.nn.functional.conv2d(x[:1 - rank], w))
        if rank == 0:
            torch.save({"y": scale.view(1, -1, 1, 1) * (y - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1),
                        "eager_running_var": eager.running_var, **state}, result_file)
    finally:
        dist.destroy_process_group()


def test_sync_stats_one_value_a_channel(tmp_path):
    """One value a channel over all processes: no error (PyTorch's SyncBatchNorm raises
    only in one process), the output normalized to 0 and the running variance NaN, as
    PyTorch's count / (count - 1) makes it; the running mean moves to the value."""
    import torch.multiprocessing as mp

    x = channels_last(torch.randn(1, 4, 1, 1))
    w = torch.randn(4, 4, 1, 1)
    result = tmp_path / "rank0.pt"
    mp.spawn(_one_value_worker, args=(2, str(tmp_path / "init"), x, w, str(result)), nprocs=2)
    got = torch.load(result)
    assert torch.equal(got["y"], torch.zeros_like(got["y"]))
    assert_close(got["running_mean"], 0.1 * torch.nn.functional.conv2d(x, w).flatten(), torch.float32,
                 what="running mean")
    assert got["running_var"].isnan().all(), got["running_var"]
    assert got["eager_running_var"].isnan().all(), got["eager_running_var"]  # the CLI's eager path agrees
    assert got["num_batches_tracked"].item() == 1


def _no_host_read(self):
    raise AssertionError("a synchronized batch norm read a tensor's value on the host")


def _sync_block(x, ws, affine, sync):
    """conv_bn_train -> conv_bn_train (prologue) -> bn_add_relu, statistics synchronized if asked."""
    states = [dict(running_mean=torch.zeros(16), running_var=torch.ones(16), num_batches_tracked=torch.tensor(0))
              for _ in range(2)]
    y1, m1, s1, b1 = aru_kernels.conv_bn_train(x, ws[0], affine[0], affine[1], **states[0], sync_stats=sync)
    y2, m2, s2, b2 = aru_kernels.conv_bn_train(y1, ws[1], affine[2], affine[3], **states[1], padding=1, groups=4,
                                               in_mean=m1, in_scale=s1, in_shift=b1, in_relu=True, sync_stats=sync)
    affine[0].running = torch.stack([torch.stack([s["running_mean"], s["running_var"]]) for s in states])
    return aru_kernels.bn_add_relu(y2, s2, b2, x, mean=m2)


@pytest.mark.parametrize("split", [(2, 2), (3, 1), (0, 4)], ids=["even", "uneven", "one-empty"])
def test_sync_stats_two_processes_match_one(tmp_path, split):
    """Batch statistics all-gathered over two gloo processes, gradients all-reduced:
    the same gradients and running statistics as one process on the whole batch,
    however the images are split between the processes (one may have none)."""
    import torch.multiprocessing as mp

    x = channels_last(torch.randn(4, 16, 6, 5) * 2 + 1)
    ws = [_leaf(torch.randn(16, 16, 1, 1) / 4), _leaf(torch.randn(16, 4, 3, 3) / 6)]
    affine = [_leaf(torch.rand(16) + 0.5), _leaf(torch.randn(16)), _leaf(torch.rand(16) + 0.5),
              _leaf(torch.randn(16))]
    out = _sync_block(x, ws, affine, sync=False)
    (out.float().square().sum() / x.shape[0]).backward()
    expected = [t.grad for t in (*ws, *affine)]
    expected_running = affine[0].running

    fresh = [_leaf(t.detach()) for t in (*ws, *affine)]
    result = tmp_path / "rank0.pt"
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), x, fresh[:2], fresh[2:], str(result), split), nprocs=2)
    got = torch.load(result, weights_only=False)
    for i, (g, e) in enumerate(zip(got["grads"], expected)):
        assert_close(g, e, torch.float32, what=f"gradient {i} with synchronized statistics")
    assert_close(got["running"], expected_running, torch.float32, what="running statistics")


@pytest.mark.parametrize("conv", [dict(k=1, stride=1, groups=1, hw=4), dict(k=3, stride=2, groups=2, hw=4)],
                         ids=["1x1", "3x3s2g2"])
def test_float16_weight_gradient_of_channels_far_from_zero(device, conv):
    """float16, channels whose mean is 100 standard deviations from zero, a loss scale of 64:
    the batch statistics' term of dL/dy is large where y is far from the mean, so the
    weight gradient's tile rows past the last pixel (y = 0 there) must not take it (it
    overflowed float16 to inf, and inf * 0 made the weight gradient NaN). float16 keeps
    y - mean to a few percent here, so the gradients are held to eager float16's accuracy."""
    k, stride, groups, hw = conv["k"], conv["stride"], conv["groups"], conv["hw"]
    torch.manual_seed(0)
    c, cg = 4, 4 // groups
    x = channels_last((1.0 + 0.01 * torch.randn(2, c, hw, hw, device=device)).half())
    w = torch.randn(c, cg, k, k, device=device) * 0.002
    w[torch.arange(c), torch.arange(c) % cg, k // 2, k // 2] += 1.0  # each output near its own input channel
    w = w.half()
    p = (hw - k) // stride + 1
    gz = 64.0 * torch.randn(2, c, p, p, device=device, dtype=torch.float64)
    grads = {}
    for impl, dtype in (("ours", torch.float16), ("eager", torch.float16), ("exact", torch.float64)):
        xs, ws = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        if impl == "ours":
            y, mean, scale, shift = aru_kernels.conv_bn_train(xs, ws, None, None, stride=stride, groups=groups)
            z = scale.view(1, -1, 1, 1) * (y.float() - mean.view(1, -1, 1, 1)) + shift.view(1, -1, 1, 1)
        else:
            y = torch.nn.functional.conv2d(xs, ws, stride=stride, groups=groups)
            z = torch.nn.functional.batch_norm(y if dtype == torch.float64 else y.float(), None, None, training=True)
        (z.double() * gz).sum().backward()
        grads[impl] = (ws.grad, xs.grad)
    assert all(torch.isfinite(g).all() for g in grads["exact"])
    for i, name in enumerate(("weight", "input")):
        assert torch.isfinite(grads["ours"][i]).all(), f"{name} gradient not finite"
        assert_as_accurate(grads["ours"][i], grads["eager"][i], grads["exact"][i], what=f"{name} gradient")
