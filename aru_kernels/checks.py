"""Input checks shared by the operators' real and fake (meta) implementations.

Each raises ``ValueError`` / ``TypeError`` / ``RuntimeError`` saying what was
expected and what came, before any kernel runs.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .plans import out_size
from .runtime import kernel_device_error

__all__ = ["SUPPORTED_DTYPES", "MAX_PIXELS", "check_pixels", "check_vector", "check_conv_inputs", "check_activation",
           "check_runnable", "check_prologue", "check_batch_norm", "single"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The most pixels (N x H x W) an activation may hold. The kernels index pixels with 32-bit
# integers (element offsets are 64-bit: the channel multiply is taken in int64), and a row
# index runs up to a few hundred thousand past the last pixel; 2**30 leaves room for that.
MAX_PIXELS = 2 ** 30


def check_pixels(op: str, name: str, n: int, h: int, w: int) -> None:
    """At most :data:`MAX_PIXELS` pixels in one activation (a batch of 21,399 at 224 x 224)."""
    if n * h * w > MAX_PIXELS:
        raise ValueError(f"{op}: {name} has {n * h * w:,} pixels (N*H*W = {n}*{h}*{w}); the kernels index "
                         f"pixels with 32-bit integers and take at most {MAX_PIXELS:,}: split the batch")


def single(v, name: str, op: str = "conv_bn_act") -> int:
    """An int from an int or a pair of equal ints (the kernels take square strides and paddings);
    a float, a string (``padding="same"``) or another pair is refused, not rounded."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{op}: {name} must be an int or a pair of equal ints; got {v}")
        v = v[0]
    if isinstance(v, str):
        raise ValueError(f"{op}: {name} must be an int or a pair of equal ints; got {v!r} "
                         f"(string paddings such as 'same' are not taken: pass the int)")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of equal ints; got {v!r} "
                        f"({type(v).__name__})") from None


def check_vector(v: Optional[Tensor], name: str, length: int, what: str, op: str = "conv_bn_act") -> None:
    if v is None:
        return
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != length:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{op}: {name} must be a 1-D tensor of {length} ({what}); got {shape}")
    if not v.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point; got {v.dtype}")


def check_prologue(op: str, in_mean: Optional[Tensor], in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                   in_relu: bool = False) -> None:
    """The prologue ``relu?(in_scale * (x - in_mean) + in_shift)``: ``in_scale`` and ``in_shift``
    together, ``in_mean`` and ``in_relu`` only with them (a ReLU alone would be ignored)."""
    if (in_scale is None) != (in_shift is None) or (in_mean is not None and in_scale is None):
        raise ValueError(f"{op}: in_scale and in_shift come together (the prologue applies both), "
                         f"in_mean only with them")
    if in_relu and in_scale is None:
        raise ValueError(f"{op}: in_relu is the prologue's ReLU, applied after in_scale and in_shift; got "
                         f"in_relu=True without them (for a ReLU alone, pass in_scale=ones and in_shift=zeros)")


def check_batch_norm(op: str, channels: int, device: torch.device, *, bn_weight: Optional[Tensor] = None,
                     bn_bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, num_batches_tracked: Optional[Tensor] = None,
                     momentum: Optional[float] = 0.1, eps: float = 1e-5, training: bool = True) -> None:
    """A batch norm of ``channels`` channels as ``F.batch_norm`` checks it: affine parameters and
    running statistics 1-D of ``channels``, floating point, on ``device``; the running
    statistics in a pair, ``momentum=None`` (the cumulative average) with the batch count;
    ``eps`` positive in training, not negative in eval."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var come together")
    if running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{op}: momentum=None (cumulative moving average) needs num_batches_tracked "
                         "to count the batches; got None")
    for name, v in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_vector(v, name, channels, "one per output channel", op)
        if v is not None and v.device != device:
            raise ValueError(f"{op}: {name} is on {v.device} but the input is on {device}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is not None and v.requires_grad:
            raise ValueError(f"{op}: {name} requires grad; running statistics take no gradient "
                             "(F.batch_norm refuses them too)")
    count = num_batches_tracked
    if count is not None and (not isinstance(count, Tensor) or count.numel() != 1):
        got = tuple(count.shape) if isinstance(count, Tensor) else repr(count)
        raise ValueError(f"{op}: num_batches_tracked must be a tensor of one element; got {got}")
    if training and not eps > 0:
        raise ValueError(f"{op}: eps must be positive during training, but got {eps}")
    if not training and not eps >= 0:
        raise ValueError(f"{op}: eps must be non-negative, but got {eps}")


def check_activation(t: Tensor, name: str, op: str) -> None:
    """A 4-D channels_last activation of a supported dtype."""
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D [N, C, H, W]; got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} dtype must be one of float32, float16, bfloat16; got {t.dtype}")
    check_pixels(op, name, t.shape[0], t.shape[2], t.shape[3])
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"{op}: {name} must be channels_last (NHWC) contiguous; got strides {tuple(t.stride())} "
            f"for shape {tuple(t.shape)}. Convert with t.contiguous(memory_format=torch.channels_last)")


def check_runnable(op: str, *named: tuple[str, Optional[Tensor]]) -> None:
    """Every tensor on a device where the kernels run (meta tensors pass: they only trace)."""
    for name, t in named:
        if t is None or t.device.type == "meta":
            continue
        err = kernel_device_error(t, name)
        if err:
            raise RuntimeError(f"{op}: {err}")


def check_untransformed(op: str, tensors) -> None:
    """``NotImplementedError`` inside a ``torch.func`` transform (vmap, grad, jvp, ...)
    and for an input of ``tensors`` (an iterable, None entries skipped; walked only inside
    a forward-AD level) with a forward-mode tangent (``torch.autograd.forward_ad``): the
    operators have reverse-mode gradients only, and a custom operator without a forward
    derivative gives a zero tangent rather than an error."""
    if torch.compiler.is_compiling():
        return
    if torch._C._functorch.maybe_current_level() is not None:
        raise NotImplementedError(f"{op}: torch.func transforms (vmap, grad, jvp, jacrev, ...) are not "
                                  "supported by the fused operators; call them outside the transform, or "
                                  "use the model with impl='eager' there")
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{op}: forward-mode automatic differentiation is not supported (an input "
                                  "carries a torch.autograd.forward_ad tangent, which the fused operators "
                                  "would drop); use reverse mode (backward), or impl='eager'")


def first_derivatives_only(op) -> None:
    """Give ``op``, a custom operator that computes the fused operators' gradients, a
    derivative that raises: a gradient of those gradients (double backward, after
    ``create_graph=True``) stops with what is unsupported rather than with PyTorch's
    "no autograd formula" for an operator the caller never named."""
    name = op._qualname

    def backward(ctx, *grads):
        raise NotImplementedError(f"{name} computes gradients of the fused operators, which have first "
                                  "derivatives only: double backward (a gradient of a gradient, through "
                                  "create_graph=True) is not supported; use impl='eager' for it")
    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def shared_memory(owned) -> tuple | None:
    """Two owners whose tensors may share elements, from ``owned``, ``(owner, tensor)``
    pairs of tensors on one device with addresses (not meta): the first such pair
    found, or None. Tensors may share where the address ranges they span intersect (a
    conservative test for strided views); tensors of one owner are not compared. One
    sort, not a comparison per pair."""
    spans = []
    for owner, t in owned:
        n = t.numel()
        if n == 0:
            continue
        extent = n - 1 if t.dim() == 1 and t.stride(0) == 1 else sum(
            (k - 1) * abs(st) for k, st in zip(t.shape, t.stride()))
        first = t.data_ptr()
        spans.append((first, first + (extent + 1) * t.element_size(), owner))
    spans.sort()
    active: list = []  # the spans before this one that reach past its start
    for first, end, owner in spans:
        active = [a for a in active if a[1] > first]
        for a in active:
            if a[2] != owner:
                return a[2], owner
        active.append((first, end, owner))
    return None


def check_no_empty_images(op: str, x: Tensor) -> None:
    """``F.conv2d``'s rule: a batch of images without pixels only with no images or no
    channels (zero padding would otherwise make an output, and batch statistics, of
    padding alone)."""
    n, c, h, w = x.shape
    if n > 0 and c > 0 and h * w == 0:
        raise ValueError(f"{op}: only zero batch or zero channel inputs are supported (as for F.conv2d); "
                         f"got input shape {list(x.shape)}")


def check_conv_inputs(x, weight, *, vectors_out=(), vectors_in=(), residual=None, stride=1, padding=0,
                      dilation=1, groups=1, op: str = "conv_bn_act") -> tuple[int, int]:
    """Raise a clear error for anything the conv kernel cannot take; return the output size (P, Q).

    ``vectors_out`` / ``vectors_in`` are ``(name, tensor)`` pairs of
    per-output-channel and per-input-channel vectors; ``op`` names the public
    function in the messages.
    """
    if x.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D [C_out, C_in/groups, KH, KW]; "
                         f"got shape {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: input dtype must be one of float32, float16, bfloat16; got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight must be floating point; got {weight.dtype}")
    if stride < 1 or padding < 0 or dilation < 1:
        raise ValueError(f"{op}: need stride >= 1, padding >= 0, dilation >= 1; "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    check_no_empty_images(op, x)
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"{op}: groups={groups} must divide both in_channels={c_in} "
                         f"and out_channels={c_out}")
    if cin_g * groups != c_in:
        raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} with groups={groups} "
                         f"expects {cin_g * groups} input channels; input has {c_in}")
    p = out_size(h, kh, stride, padding, dilation)
    q = out_size(w, kw, stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"{op}: input of spatial size {h}x{w} is too small for a {kh}x{kw} "
                         f"kernel (padding={padding}, dilation={dilation})")
    check_pixels(op, "input", n, h, w)
    check_pixels(op, "output", n, p, q)
    for name, v in vectors_out:
        check_vector(v, name, c_out, "one per output channel", op)
    for name, v in vectors_in:
        check_vector(v, name, c_in, "one per input channel", op)
    if residual is not None:
        if tuple(residual.shape) != (n, c_out, p, q):
            raise ValueError(f"{op}: residual must have the output's shape {(n, c_out, p, q)}; "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual dtype {residual.dtype} differs from input dtype {x.dtype}")
    for name, t in [("weight", weight), ("residual", residual), *vectors_out, *vectors_in]:
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {x.device}")
    for name, t in (("input", x), ("residual", residual)):
        if t is not None and not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(
                f"{op}: {name} must be channels_last (NHWC) contiguous; got strides "
                f"{tuple(t.stride())} for shape {tuple(t.shape)}. Convert with "
                f"t.contiguous(memory_format=torch.channels_last)")
    return p, q
