"""Activations of more than 2**31 elements, where a 32-bit element offset would wrap.

The kernels take each element offset in 64 bits (the channel multiply in int64; pixel
indices stay 32-bit, ``aru_kernels.checks.MAX_PIXELS``). On a GPU, a training pair of
convs -- a 1x1 and a grouped 3x3 whose prologue applies the first one's batch norm and
ReLU, then the block end with the input as identity -- runs forward and backward over a
batch of 2.16e9-element bf16 activations, and the first and last images, the last past
2**31 elements, are compared with float64 PyTorch (``chunk`` images at a time, the batch
statistics over all of them). On the CPU the same comparison runs at a small batch
through the interpreter: it checks the reference and the bookkeeping the GPU case uses.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

import aru_kernels
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("poisoned")

EPS, MOMENTUM = 1e-5, 0.1


def _col(v):
    return v[None, :, None, None]


def _case(n, c, groups, size, device, dtype):
    """Random inputs of the pair: x, the two weights, the batch norms' parameters and
    running statistics, and the output's gradient."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=torch.float32):
        return torch.randn(*shape, device=device, dtype=dt, generator=gen)

    x = rand(n, c, size, size, dt=dtype).contiguous(memory_format=torch.channels_last)
    w1 = (rand(c, c, 1, 1) / c ** 0.5).to(dtype)
    w2 = (rand(c, c // groups, 3, 3) / (9 * c // groups) ** 0.5).to(dtype)
    bn = [rand(c) * 0.2 + 1, rand(c) * 0.2, rand(c) * 0.2 + 1, rand(c) * 0.2]
    running = [(rand(c) * 0.1, torch.rand(c, device=device, generator=gen) + 0.5) for _ in range(2)]
    gy = rand(n, c, size, size, dt=dtype).contiguous(memory_format=torch.channels_last)
    return x, w1, w2, bn, running, gy


def _ours(x, w1, w2, bn, running, gy, groups):
    """The pair forward and backward on the fused operators: (out, leaves, running statistics)."""
    x, w1, w2, *bn = (t.detach().clone().requires_grad_() for t in (x, w1, w2, *bn))
    (rm1, rv1), (rm2, rv2) = ((m.clone(), v.clone()) for m, v in running)
    nbt = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(2)]
    y1, m1, s1, t1 = aru_kernels.conv_bn_train(x, w1, bn[0], bn[1], rm1, rv1, nbt[0], momentum=MOMENTUM, eps=EPS)
    y2, m2, s2, t2 = aru_kernels.conv_bn_train(y1, w2, bn[2], bn[3], rm2, rv2, nbt[1], momentum=MOMENTUM, eps=EPS,
                                               padding=1, groups=groups, in_mean=m1, in_scale=s1, in_shift=t1,
                                               in_relu=True)
    del y1
    out = aru_kernels.bn_add_relu(y2, s2, t2, x, mean=m2)
    del y2
    out.backward(gy)
    return out.detach(), {"x": x, "w1": w1, "w2": w2, "g1": bn[0], "b1": bn[1], "g2": bn[2], "b2": bn[3]}, \
        {"rm1": rm1, "rv1": rv1, "rm2": rm2, "rv2": rv2}


def _reference(x, w1, w2, bn, running, gy, groups, chunk, keep):
    """float64 PyTorch, ``chunk`` images at a time (recomputed in each pass): the outputs and
    input gradients of the chunks numbered in ``keep``, every parameter's gradient, and the
    running statistics. The batch norms' backward in closed form over the whole batch."""
    n, _, h, w = x.shape
    count = n * h * w  # pixels of every activation (1x1, and 3x3 padded by 1)
    spans = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    W1, W2 = w1.double(), w2.double()
    g1, b1, g2, b2 = (v.double() for v in bn)

    def xs(sp):
        return x[sp].double()

    def moments(fn):
        s = q = 0
        for sp in spans:
            t = fn(sp)
            s, q = s + t.sum((0, 2, 3)), q + (t * t).sum((0, 2, 3))
        mean = s / count
        return mean, q / count - mean * mean

    def hat(t, mean, var):
        return (t - _col(mean)) / _col(torch.sqrt(var + EPS))

    def y1(sp):
        return F.conv2d(xs(sp), W1)

    m1, v1 = moments(y1)

    def a1(sp):
        return torch.relu(_col(g1) * hat(y1(sp), m1, v1) + _col(b1))

    def y2(sp):
        return F.conv2d(a1(sp), W2, padding=1, groups=groups)

    m2, v2 = moments(y2)

    def out(sp):
        return torch.relu(_col(g2) * hat(y2(sp), m2, v2) + _col(b2) + xs(sp))

    def g_out(sp):
        return gy[sp].double() * (out(sp) > 0)

    def bn_sums(grad, xhat):
        s = q = 0
        for sp in spans:
            g = grad(sp)
            s, q = s + g.sum((0, 2, 3)), q + (g * xhat(sp)).sum((0, 2, 3))
        return s, q

    s2, q2 = bn_sums(g_out, lambda sp: hat(y2(sp), m2, v2))

    def dy2(sp):
        xhat = hat(y2(sp), m2, v2)
        return _col(g2 / torch.sqrt(v2 + EPS)) * (g_out(sp) - _col(s2 / count) - xhat * _col(q2 / count))

    def g_a1(sp):
        a = a1(sp)
        return conv2d_input(a.shape, W2, dy2(sp), padding=1, groups=groups) * (a > 0)

    s1, q1 = bn_sums(g_a1, lambda sp: hat(y1(sp), m1, v1))

    def dy1(sp):
        xhat = hat(y1(sp), m1, v1)
        return _col(g1 / torch.sqrt(v1 + EPS)) * (g_a1(sp) - _col(s1 / count) - xhat * _col(q1 / count))

    grads = {"w1": sum(conv2d_weight(xs(sp), W1.shape, dy1(sp)) for sp in spans),
             "w2": sum(conv2d_weight(a1(sp), W2.shape, dy2(sp), padding=1, groups=groups) for sp in spans),
             "g1": q1, "b1": s1, "g2": q2, "b2": s2}
    kept = {i: (out(spans[i]), conv2d_input(xs(spans[i]).shape, W1, dy1(spans[i])) + g_out(spans[i]))
            for i in keep}
    unbiased = count / (count - 1)
    (rm1, rv1), (rm2, rv2) = running
    stats = {"rm1": (1 - MOMENTUM) * rm1.double() + MOMENTUM * m1,
             "rv1": (1 - MOMENTUM) * rv1.double() + MOMENTUM * v1 * unbiased,
             "rm2": (1 - MOMENTUM) * rm2.double() + MOMENTUM * m2,
             "rv2": (1 - MOMENTUM) * rv2.double() + MOMENTUM * v2 * unbiased}
    return kept, grads, stats, spans


def _check(n, c, groups, size, device, dtype, chunk):
    x, w1, w2, bn, running, gy = _case(n, c, groups, size, device, dtype)
    out, leaves, stats = _ours(x, w1, w2, bn, running, gy, groups)
    last = (n - 1) // chunk
    kept, grads, ref_stats, spans = _reference(x, w1, w2, bn, running, gy, groups, chunk, keep=(0, last))
    for i, (ref_out, ref_dx) in kept.items():
        assert_close(out[spans[i]], ref_out, dtype, what=f"output, images {spans[i].start}-{spans[i].stop - 1}")
        assert_close(leaves["x"].grad[spans[i]], ref_dx, dtype,
                     what=f"input gradient, images {spans[i].start}-{spans[i].stop - 1}")
    for name, ref_grad in grads.items():
        assert_close(leaves[name].grad, ref_grad, dtype, what=f"gradient of {name}")
    for name, ref_stat in ref_stats.items():
        assert_close(stats[name], ref_stat, dtype, what=name)
    return spans[last], x[0].numel()


def test_the_large_batch_check_holds_at_a_small_batch(device):
    """The GPU case's comparison at 5 images of 16 channels in 4 groups, 2 images a chunk."""
    last, _ = _check(5, 16, 4, 6, device, torch.float32, chunk=2)
    assert (last.start, last.stop) == (4, 5)


@pytest.mark.gpu
def test_activations_past_2_to_the_31_elements_train():
    """A training pair over [10752, 64, 56, 56] bf16 activations (2.16e9 elements, 4.3 GB
    each); the last chunk's images from the 10,700th start past element 2**31."""
    last, per_image = _check(10752, 64, 16, 56, "cuda", torch.bfloat16, chunk=256)
    assert (last.stop - 1) * per_image >= 2 ** 31  # the compared images reach past 2**31 elements
    torch.cuda.empty_cache()
