"""aru_models.fuse: the ResNet-family models people already hold, switched in place.

timm models and torchvision detection backbones, random init with non-trivial
batch-norm statistics (no weights are downloaded), at tiny odd inputs through
the interpreter: outputs against the unconverted model, a training step
against float64, keys, undo, what is reported, torch.compile.
"""

import copy
import warnings

import pytest
import torch

import aru_models
from helpers import OpLog, assert_as_accurate, assert_close, rel_error, static_model

timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e .[test]")
backbone_utils = pytest.importorskip("torchvision.models.detection.backbone_utils")

pytestmark = pytest.mark.usefixtures("poisoned")


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters in every (frozen) batch norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if type(m).__name__ == "FrozenBatchNorm2d":
                    m.eps = 0.05  # (torchvision's default equals nn.BatchNorm2d's: show the module's own is read)
    return model


# A quarter of ResNeXt-50's widths: 8 groups of 4, 8, 16 and 32 channels in the four stages
# (ResNeXt-50's group widths, so every stage takes its packing of groups), 64 to 512 outputs.
NARROW = dict(channels=(16, 32, 64, 128), cardinality=8, base_width=16)


def plain_resnext(**kwargs):
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(block=Bottleneck, layers=[1, 1, 1, 1], stem_width=32, **NARROW, **kwargs)


def seresnext26d(**kwargs):
    """Squeeze-excitation, the deep stem and the average-pool downsample in one small model
    (one block a stage: every kind of block the 26-layer model has, at half its depth)."""
    return timm.create_model("seresnext26d_32x4d", pretrained=False, **{"layers": (1, 1, 1, 1), **NARROW, **kwargs})


def fpn_body():
    """A detection backbone's body: IntermediateLayerGetter over a ResNet-18 with FrozenBatchNorm2d."""
    return backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)


def _fused_forwards(model) -> list[str]:
    return [name for name, m in model.named_modules()
            if {"forward", "_forward_impl", "forward_features"} & set(m.__dict__)]


@pytest.mark.slow
@pytest.mark.parametrize("build", [plain_resnext, seresnext26d], ids=["resnext", "seresnext26d"])
def test_timm_eval_matches_unconverted_and_keeps_keys(build, device):
    model = randomize_norms(build()).to(device).eval()
    x = torch.randn(2, 3, 37, 29, device=device)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of these models is left unfused
        assert aru_models.fuse(model) is model
    assert "layer1.0" in _fused_forwards(model) and "" in _fused_forwards(model)
    assert list(model.state_dict()) == list(state)
    log = OpLog()
    with torch.no_grad(), log:
        got = model(x)
    assert rel_error(got, expected) < 1e-4
    assert_close(got, expected, torch.float32, what="fused timm logits")
    # only squeeze-excitation's two 1x1 convolutions on vectors stay aten convolutions
    se_convs = 2 * sum(1 for m in model.modules() if type(m).__name__ == "SEModule")
    assert log.ops.count("aten.convolution") == se_convs and not [op for op in log.ops if "batch_norm" in op]
    model.load_state_dict(state, strict=True)  # checkpoints load both ways
    aru_models.fuse(model, impl="eager")
    assert _fused_forwards(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def _double_twin(model):
    twin = copy.deepcopy(model).double()
    return twin


@pytest.mark.slow
def test_timm_training_step_matches_float64(device):
    """Loss, every gradient and the running statistics of one training step (timm's
    plain ResNeXt in training: test_timm_stochastic_depth_and_drop_block_draw_as_timm_does)."""
    model = randomize_norms(seresnext26d(num_classes=5)).to(device).train()
    twin = _double_twin(model)
    aru_models.fuse(model)
    x = torch.randn(2, 3, 33, 35, device=device)
    target = torch.tensor([1, 3], device=device)
    log = OpLog()
    with log:
        loss = torch.nn.functional.cross_entropy(model(x), target)
    # squeeze-excitation's squeeze comes from conv3's epilogue: the one aten.mean is the classifier's pooling;
    # its two 1x1 convolutions on vectors are the only aten convolutions
    se_convs = 2 * sum(1 for m in model.modules() if type(m).__name__ == "SEModule")
    assert log.ops.count("aten.mean") == 1 and not [op for op in log.ops if "batch_norm" in op]
    assert log.ops.count("aten.convolution") == se_convs
    loss_ref = torch.nn.functional.cross_entropy(twin(x.double()), target)
    loss.backward()
    loss_ref.backward()
    assert_close(loss, loss_ref, torch.float32, what="loss")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, torch.float32, what=f"gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        assert_close(b.double(), c, torch.float32, what=name)


@pytest.mark.slow
def test_timm_stochastic_depth_and_drop_block_draw_as_timm_does(device):
    """drop_path and drop_block in training: the same masks (the same random draws) as
    timm's forward, against the float64 model drawing them from the same seed."""
    draws = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(7)
        draws.append(torch.empty(64, device=device, dtype=dtype).bernoulli_(0.6).tolist())
    if draws[0] != draws[1]:
        pytest.skip(f"bernoulli_ draws differ between float32 and float64 on {device}: no float64 twin")
    model = randomize_norms(plain_resnext(drop_path_rate=0.5, drop_block_rate=0.5, num_classes=5)).to(device).train()
    assert sum(type(m).__name__ == "DropBlock2d" for m in model.modules()) == 2
    twin = _double_twin(model)
    aru_models.fuse(model)
    x = torch.randn(4, 3, 45, 43, device=device)  # (layer3 and layer4, where timm drops blocks, 3x3 and 2x2)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    expected = twin(x.double())
    assert_close(out, expected, torch.float32, what="logits with stochastic depth")
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, torch.float32, what=f"gradient of {name}")


@pytest.mark.slow
def test_squeeze_excitation_fused_in_eval_mode_and_its_gradients(device):
    """Batch norms in eval mode (fine-tuning with frozen statistics): the squeeze comes
    from conv3's epilogue and the excitation scales the block's final pass; output and
    every gradient (the SE layers' included) against float64."""
    model = randomize_norms(plain_resnext(num_classes=5, block_args=dict(attn_layer="se"))).to(device).eval()
    twin = _double_twin(model)
    aru_models.fuse(model)
    x = torch.randn(2, 3, 23, 19, device=device)
    log = OpLog()
    with log:
        out = model(x)
    # the squeeze of every block from its conv3; the one aten.mean left is the classifier's pooling
    assert log.ops.count("aru.conv_bn_squeeze") == 4 and log.ops.count("aten.mean") == 1
    expected = twin(x.double())
    assert_close(out, expected, torch.float32, what="logits")
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, torch.float32, what=f"gradient of {name}")


@pytest.mark.slow
def test_other_attention_modules_run_as_they_are(device):
    """An attention module other than SEModule (timm's ECA) runs as its own module on the
    normalized branch, in training: the step as accurate (against float64) as eager
    float32's, which this small configuration leaves about 1e-3 off."""
    model = randomize_norms(plain_resnext(num_classes=5, block_args=dict(attn_layer="eca"))).to(device).train()
    assert type(model.layer1[0].se).__name__ == "EcaModule"
    twin, eager = _double_twin(model), copy.deepcopy(model)
    aru_models.fuse(model)
    x = torch.randn(2, 3, 23, 21, device=device)
    outs = [model(x), eager(x), twin(x.double())]
    assert_close(outs[0], outs[2], torch.float32, what="logits")
    for out in outs:
        out.square().sum().backward()
    for (name, p), q, r in zip(model.named_parameters(), eager.parameters(), twin.parameters()):
        assert_as_accurate(p.grad, q.grad, r.grad, what=f"gradient of {name}")


@pytest.mark.slow
def test_detection_backbone_with_frozen_batch_norm(device):
    """The FPN backbone's feature maps, eval and train (frozen statistics), and its
    trainable layers' gradients, against the unconverted backbone in float64."""
    backbone = randomize_norms(fpn_body()).to(device)
    twin = _double_twin(backbone)
    keys = list(backbone.state_dict())
    aru_models.fuse(backbone)
    assert "body" in _fused_forwards(backbone) and list(backbone.state_dict()) == keys
    x = torch.randn(1, 3, 37, 29, device=device)
    for train in (False, True):
        backbone.train(train)
        twin.train(train)
        feats, expected = backbone(x), twin(x.double())
        assert list(feats) == list(expected)
        for name in expected:
            assert_close(feats[name], expected[name], torch.float32, what=f"feature map {name} (train={train})")
    sum(f.float().square().mean() for f in feats.values()).backward()
    sum(f.square().mean() for f in expected.values()).backward()
    grads = [(n, p, q) for (n, p), q in zip(backbone.named_parameters(), twin.parameters()) if p.requires_grad]
    assert any(n.startswith("body.layer2") for n, _, _ in grads)
    for name, p, q in grads:
        assert_close(p.grad, q.grad, torch.float32, what=f"gradient of {name}")


def test_unsupported_modules_are_reported_and_left_eager():
    model = plain_resnext(act_layer=torch.nn.SiLU)
    with pytest.warns(aru_models.UnfusedWarning, match=r"layer1\.0: act1 is SiLU, not ReLU") as record:
        aru_models.fuse(model)
    message = str(record[0].message)
    assert all(f"layer{i}.0" in message for i in range(1, 5)) and "activation is SiLU" in message
    assert _fused_forwards(model) == []
    with pytest.raises(ValueError, match="act1 is SiLU"):
        aru_models.fuse(model, strict=True)
    with pytest.raises(ValueError, match="impl must be"):
        aru_models.fuse(model, impl="triton")


def test_fuse_switches_this_package_models():
    model = aru_models.resnext29_tiny(impl="eager")
    assert aru_models.fuse(model).impl == "fused"
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"fused"}
    assert aru_models.fuse(model, impl="eager").impl == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_over_fused_timm_model(train, device):
    """Squeeze-excitation included: its squeeze, excitation and their gradients trace too."""
    model = randomize_norms(plain_resnext(num_classes=5, block_args=dict(attn_layer="se"))).to(device).train(train)
    twin = copy.deepcopy(model)
    aru_models.fuse(model)
    aru_models.fuse(twin)
    x = torch.randn(2, 3, 19, 21, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    expected = twin(x)
    assert_close(out, expected, torch.float32, what="compiled fused timm logits")
    if train:
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert_close(p.grad, q.grad, torch.float32, what=f"compiled gradient of {name}")


def test_fused_squeeze_excitation_inference_holds_no_more_than_eager():
    """Counted on the meta device (the static model's count, ``benchmarks/aot_check.py``):
    timm's seresnext50_32x4d at batch 256, inference. The fused block's last pass (the
    excitation, the add and the ReLU) does not run with the middle conv's output still
    held (it did: 1.44 GiB against eager's 1.24)."""
    aot_check = static_model()
    peaks = {impl: aot_check.record_step("timm:seresnext50_32x4d", impl, "infer", 256, 224, torch.bfloat16).peak_bytes
             for impl in ("eager", "fused")}
    print({k: f"{v / 2**30:.3f} GiB" for k, v in peaks.items()})
    assert peaks["eager"] > 2**30  # (the activations of batch 256 are counted)
    assert peaks["fused"] <= 1.01 * peaks["eager"]


# --- what the kernels do not compute stays PyTorch's -----------------------------------------


def _eval_pair(model):
    """A model with non-trivial statistics in eval mode and its unconverted float64 twin."""
    model = randomize_norms(model).eval()
    return model, _double_twin(model)


def test_hooks_inside_blocks_and_stem_run(device):
    """Hooks on a block's or the stem's submodules (a weight-norm pre-hook, a feature grab,
    one that changes the output) run: the kernels would skip them, so those modules run
    as PyTorch's, with an UnfusedWarning; the logits are the hooked model's."""
    model, twin = _eval_pair(plain_resnext(num_classes=5))
    model, twin = model.to(device), twin.to(device)
    for m in (model, twin):
        m.layer1[0].conv2.register_forward_hook(lambda mod, args, out: out * 2)
    seen = []
    model.conv1.register_forward_hook(lambda mod, args, out: seen.append("stem"))
    model.layer2[0].bn1.register_forward_pre_hook(lambda mod, args: seen.append("bn1"))
    aru_models.fuse(model)
    x = torch.randn(2, 3, 21, 19, device=device)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = model(x)
    unfused = [r for r in record if issubclass(r.category, aru_models.UnfusedWarning)]
    messages = " | ".join(str(r.message) for r in unfused)
    for why in ("the stem runs on PyTorch's path", "hooks on conv2", "hooks on bn1"):
        assert why in messages, messages
    assert {r.filename for r in unfused} == {__file__}, "the warnings name the caller's line"
    assert seen == ["stem", "bn1"]
    with torch.no_grad():
        assert_close(out, twin(x.double()), torch.float32, what="logits with hooks")


@pytest.mark.parametrize("variant", ["se-maxpool", "bn-act", "std-conv", "same-conv"])
def test_layers_computing_something_else_are_not_fused_as_plain_ones(variant, device):
    """A squeeze-excitation with a max beside its mean, a batch norm with its activation
    inside (timm's BatchNormAct2d), convolutions with a forward of their own (weight
    standardization, "same" padding per input): each is computed as the model's own
    module, never as the plain layer the kernels take it for."""
    from functools import partial

    from timm.layers import BatchNormAct2d, Conv2dSame, SEModule, StdConv2d

    kwargs = {"se-maxpool": dict(block_args=dict(attn_layer=partial(SEModule, add_maxpool=True))),
              "bn-act": dict(norm_layer=BatchNormAct2d)}.get(variant, {})
    model = plain_resnext(num_classes=5, **kwargs)
    if variant in ("std-conv", "same-conv"):
        c = model.layer2[0].conv2
        make = StdConv2d if variant == "std-conv" else Conv2dSame
        model.layer2[0].conv2 = make(c.in_channels, c.out_channels, 3, stride=2, groups=c.groups, bias=False,
                                     **({"padding": 1} if variant == "std-conv" else {}))
    model, twin = _eval_pair(model)
    model, twin = model.to(device), twin.to(device)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        aru_models.fuse(model)
    reported = [str(r.message) for r in record if issubclass(r.category, aru_models.UnfusedWarning)]
    if variant == "se-maxpool":
        assert reported == []  # (the block is fused; its squeeze-excitation runs as the module)
    else:
        assert reported and ("layer2.0" in reported[0]) and ("BatchNormAct2d" in reported[0] or
                                                            "has a forward of its own" in reported[0])
    x = torch.randn(2, 3, 21, 19, device=device)
    with torch.no_grad():
        assert_close(model(x), twin(x.double()), torch.float32, what=f"logits ({variant})")


def test_other_models_with_the_block_names_are_left_alone():
    """timm's RegNet and TResNet and torchvision's video ResNets name their blocks
    Bottleneck or BasicBlock too; they are not ResNet blocks of the kinds fuse knows."""
    tv_video = pytest.importorskip("torchvision.models.video")
    for model in (timm.create_model("regnetx_002"), timm.create_model("tresnet_m", num_classes=10),
                  tv_video.r3d_18(num_classes=10)):
        with pytest.warns(aru_models.UnfusedWarning, match="no ResNet-family block or stem found"):
            aru_models.fuse(model)
        assert _fused_forwards(model) == []


def test_detection_getter_over_a_timm_resnet(device):
    """An IntermediateLayerGetter over timm's ResNet (its stem's activation is ``act1``):
    its blocks are fused, the getter runs as it is."""
    from torchvision.models._utils import IntermediateLayerGetter

    model, _ = _eval_pair(plain_resnext(num_classes=5))
    getter = IntermediateLayerGetter(model, {"layer1": "c2", "layer2": "c3"}).to(device)
    twin = _double_twin(getter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aru_models.fuse(getter)
    assert _fused_forwards(getter) == ["layer1.0", "layer2.0"]
    x = torch.randn(2, 3, 21, 19, device=device)
    with torch.no_grad():
        feats, expected = getter(x), twin(x.double())
    for name in ("c2", "c3"):
        assert_close(feats[name], expected[name], torch.float32, what=f"feature map {name}")


def test_fused_model_saved_whole_loads(tmp_path, device):
    """torch.save(model) of a fused model loads back fused, its forwards bound to the loaded
    modules (and deepcopy's to the copy's); fuse(impl="eager") still undoes them."""
    model, twin = _eval_pair(plain_resnext(num_classes=5))
    model, twin = model.to(device), twin.to(device)
    aru_models.fuse(model)
    torch.save(model, tmp_path / "model.pt")
    for loaded in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert _fused_forwards(loaded) == _fused_forwards(model) and _fused_forwards(model)
        assert loaded.layer1[0].forward.args[0] is loaded.layer1[0]
        x = torch.randn(2, 3, 21, 19, device=device)
        log = OpLog()
        with torch.no_grad(), log:
            out = loaded(x)
        assert "aru.conv_bn_act" in log.ops
        with torch.no_grad():
            assert_close(out, twin(x.double()), torch.float32, what="logits of the loaded model")
        aru_models.fuse(loaded, impl="eager")
        assert _fused_forwards(loaded) == []


def _replicate_on_one_device(model, scales, monkeypatch):
    """``torch.nn.parallel.replicate`` (what nn.DataParallel runs before each forward) without
    CUDA: its broadcast gives replica j copies of the parameters and buffers with the
    floating-point ones multiplied by ``scales[j]``, so that each replica computes something else."""
    import sys

    rep = sys.modules["torch.nn.parallel.replicate"]
    monkeypatch.setattr(rep, "_get_device_index", lambda d, optional=False: d)
    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape", lambda tensors, scales, detach=False: [
        [t.detach() * s if t.is_floating_point() else t.clone() for t in tensors] for s in scales])
    return rep.replicate(model, scales)


def test_data_parallel_replicas_run_with_their_own_parameters(monkeypatch, device):
    """nn.DataParallel's replicas of a fused model share the original's instance dict, fused
    forwards included: each replica's forwards are bound to it, so it computes with its own
    (per-device) parameters, not the original's."""
    model, twin64 = _eval_pair(plain_resnext(num_classes=5))
    model, twin64 = model.to(device), twin64.to(device)
    aru_models.fuse(model)
    replicas = _replicate_on_one_device(model, [1.0, 1.5], monkeypatch)
    x = torch.randn(2, 3, 21, 19, device=device)
    for scale, replica in zip([1.0, 1.5], replicas):
        assert replica.layer1[0].forward.args[0] is replica.layer1[0]
        twin = copy.deepcopy(twin64)
        with torch.no_grad():
            for t in [*twin.parameters(), *twin.buffers()]:
                if t.is_floating_point():
                    t.mul_(scale)
            log = OpLog()
            with log:
                out = replica(x)
            assert "aru.conv_bn_act" in log.ops
            assert_close(out, twin(x.double()), torch.float32, what=f"logits of the replica scaled by {scale}")
    aru_models.fuse(model, impl="eager")
    assert not [n for n, m in model.named_modules() if "_replicate_for_data_parallel" in m.__dict__]


@pytest.mark.parametrize("change", ["conv-bias", "mixed-modes"])
def test_block_the_kernels_cannot_train_as_it_is_runs_eagerly(change, device):
    """In training, a block with a biased convolution, or whose batch norms are partly in
    eval mode, runs as timm's own forward at that call (an UnfusedWarning says why):
    the step is the unconverted model's."""
    model = randomize_norms(plain_resnext(num_classes=5)).to(device).train()
    block = model.layer2[0]
    if change == "conv-bias":
        c = block.conv1
        block.conv1 = torch.nn.Conv2d(c.in_channels, c.out_channels, 1, bias=True).to(device)
    else:
        block.bn2.eval()
    twin, eager = _double_twin(model), copy.deepcopy(model)
    aru_models.fuse(model, strict=True)
    x = torch.randn(2, 3, 21, 19, device=device)
    why = "a convolution with a bias" if change == "conv-bias" else "in training and in eval mode at once"
    with pytest.warns(aru_models.UnfusedWarning, match=why):
        out = model(x)
    outs = [out, eager(x), twin(x.double())]
    assert_close(out, outs[2], torch.float32, what="logits")
    for o in outs:
        o.square().sum().backward()
    # (batch norms over 2 images at 2x2 leave eager float32 itself about 1e-3 off float64)
    for (name, p), q, r in zip(model.named_parameters(), eager.parameters(), twin.parameters()):
        assert_as_accurate(p.grad, q.grad, r.grad, what=f"gradient of {name}")


def test_grad_checkpointing_switched_on_after_fuse_is_honoured(device):
    """fuse refuses a timm model with grad_checkpointing on; switched on afterwards, the
    stem and stages run as timm's checkpointed forward (an UnfusedWarning says so)."""
    model, twin = _eval_pair(plain_resnext(num_classes=5))
    model, twin = model.to(device), twin.to(device)
    aru_models.fuse(model)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 21, 19, device=device)
    with pytest.warns(aru_models.UnfusedWarning, match="grad_checkpointing is on"):
        out = model(x)
    assert_close(out, twin(x.double()), torch.float32, what="logits")


def test_a_forward_replaced_on_the_instance_is_kept():
    """A block whose forward the user replaced on the instance keeps it: fuse reports the
    block instead of overwriting it, and fuse(impl="eager") leaves it in place."""
    model = plain_resnext(num_classes=5)
    block = model.layer2[0]
    mine = block.forward
    block.forward = lambda x: mine(x)
    patched = block.forward
    with pytest.warns(aru_models.UnfusedWarning, match=r"layer2\.0: its forward was replaced on the instance"):
        aru_models.fuse(model)
    assert block.forward is patched and "layer1.0" in _fused_forwards(model)
    aru_models.fuse(model, impl="eager")
    assert block.forward is patched and _fused_forwards(model) == ["layer2.0"]


@pytest.mark.parametrize("change", ["hook", "mixed-modes"])
def test_torch_compile_fullgraph_traces_the_per_call_fallback(change, device):
    """A block the kernels cannot compute at this call (a hook on its conv, batch norms in
    both modes) runs as timm's forward under torch.compile(fullgraph=True) too: the
    fallback traces (its warning is not issued while tracing)."""
    model = randomize_norms(plain_resnext(num_classes=5)).to(device).train(change == "mixed-modes")
    if change == "hook":
        model.layer1[0].conv2.register_forward_hook(lambda mod, args, out: out * 2)
    else:
        model.layer1[0].bn2.eval()
    twin = copy.deepcopy(model)
    aru_models.fuse(model)
    x = torch.randn(2, 3, 19, 21, device=device)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_close(out, twin(x), torch.float32, what="compiled logits")
