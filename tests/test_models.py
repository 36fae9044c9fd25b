"""The eager models against torchvision's: structure, initialisation, outputs,
weights files and enums, conversion of existing models, and ``impl``.

The eager forward runs the same torch operators in the same order as
torchvision's on the same CPU, so outputs and updated statistics are compared
bitwise (``torch.equal``), not within a tolerance: any difference means a
module is wired differently.
"""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

tv_models = pytest.importorskip("torchvision.models")
from torchvision.models import resnet as tv_resnet  # noqa: E402

import aru_models  # noqa: E402
from aru_kernels.runtime import default_impl  # noqa: E402
from aru_models.resnet import BasicBlock, Bottleneck, ResNet, make_layer  # noqa: E402

BUILDERS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

# Small and odd, so that every stride-2 layer sees an odd size and rounds.
IMAGES = (2, 3, 45, 61)


def shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def assert_same_tensors(actual: dict, expected: dict, what: str) -> None:
    """Equal keys in the same order, and bitwise equal tensors of the same dtype and device."""
    assert list(actual) == list(expected), f"{what}: keys differ"
    differ = [k for k in expected
              if actual[k].dtype != expected[k].dtype or actual[k].device != expected[k].device
              or not torch.equal(actual[k], expected[k])]
    assert not differ, f"{what}: {len(differ)} of {len(expected)} tensors differ, first {differ[0]!r}"


def assert_equal_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"outputs differ: max |diff| {(actual - expected).abs().max().item():.3g}"


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    """Give every batch norm its own affine parameters and running statistics,
    so that a norm applied in the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
            m.running_mean.normal_(0.0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)


@pytest.fixture(scope="module", params=BUILDERS, ids=BUILDERS)
def pair(request):
    """One builder's model and torchvision's, each built right after ``torch.manual_seed(0)``.

    Shared by the tests of that builder (the big ones take seconds to build).
    The tensors that differ right after construction are recorded in
    ``init_differences``; then both models get the same random batch-norm
    parameters and statistics, so that a norm applied in the wrong place
    changes the outputs.
    """
    name = request.param
    torch.manual_seed(0)
    ours = getattr(aru_models, name)(impl="eager")
    torch.manual_seed(0)
    theirs = getattr(tv_models, name)()
    at_init = ours.state_dict()
    init_differences = [k for k, v in theirs.state_dict().items()
                        if k not in at_init or not torch.equal(at_init[k], v)]
    randomize_norms(theirs)
    ours.load_state_dict(theirs.state_dict())
    return types.SimpleNamespace(name=name, ours=ours, theirs=theirs, init_differences=init_differences)


# --- structure, initialisation, outputs: every builder --------------------------------------


def test_state_dict_keys_order_and_shapes_match_torchvision(pair):
    assert shapes(pair.ours) == shapes(pair.theirs)


def test_modules_match_torchvision(pair):
    # repr lists every conv's stride, padding, dilation and groups, which shapes do not show
    assert repr(pair.ours) == repr(pair.theirs)


def test_initialisation_is_bitwise_torchvisions(pair):
    assert not pair.init_differences, \
        f"{len(pair.init_differences)} tensors differ after init, first {pair.init_differences[0]!r}"


def test_state_dicts_load_strictly_both_ways(pair):
    # Into models built on the meta device, with assign=True: every key and shape is
    # checked, and nothing is initialised or copied.
    with torch.device("meta"):
        ours = getattr(aru_models, pair.name)(impl="eager")
        theirs = getattr(tv_models, pair.name)()
    ours.load_state_dict(pair.theirs.state_dict(), strict=True, assign=True)
    theirs.load_state_dict(pair.ours.state_dict(), strict=True, assign=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_match_torchvision(pair, mode):
    ours, theirs = pair.ours.train(mode == "train"), pair.theirs.train(mode == "train")
    x = torch.randn(IMAGES)
    with torch.no_grad():
        assert_equal_outputs(ours(x.clone()), theirs(x.clone()))
    # in train mode this compares the running statistics both forwards updated
    assert_same_tensors(ours.state_dict(), theirs.state_dict(), f"state after a {mode}-mode forward")


# --- builder arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", dict(num_classes=10, zero_init_residual=True)),
    ("resnet50", dict(replace_stride_with_dilation=[False, True, True],
                      norm_layer=lambda c: nn.GroupNorm(8, c))),
    ("resnext50_32x4d", dict(zero_init_residual=True, groups=32)),
], ids=["resnet18-zero_init-10classes", "resnet50-dilated-groupnorm", "resnext50-zero_init"])
def test_builder_kwargs_reach_resnet_as_in_torchvision(name, kwargs):
    torch.manual_seed(0)
    ours = getattr(aru_models, name)(impl="eager", **kwargs)
    torch.manual_seed(0)
    theirs = getattr(tv_models, name)(**kwargs)
    assert repr(ours) == repr(theirs)
    assert_same_tensors(ours.state_dict(), theirs.state_dict(), "parameters and buffers after init")


@pytest.mark.parametrize("name, kwargs, key", [
    ("resnext50_32x4d", dict(groups=8), "groups"),
    ("resnext101_64x4d", dict(width_per_group=8), "width_per_group"),
    ("wide_resnet50_2", dict(width_per_group=64), "width_per_group"),
])
def test_builders_refuse_kwargs_that_contradict_the_architecture(name, kwargs, key):
    with pytest.raises(ValueError, match=key):
        getattr(aru_models, name)(**kwargs)


def test_blocks_keep_torchvisions_constructor_signatures():
    for ours, theirs in [(BasicBlock, tv_resnet.BasicBlock), (Bottleneck, tv_resnet.Bottleneck)]:
        params = list(inspect.signature(ours).parameters.values())
        expected = list(inspect.signature(theirs).parameters.values())
        assert [(p.name, p.default) for p in params[:len(expected)]] == [(p.name, p.default) for p in expected]
        assert ours.expansion == theirs.expansion


@pytest.mark.parametrize("block, inplanes, planes, stride, dilation, dilate, groups, base_width", [
    (BasicBlock, 64, 128, 2, 1, False, 1, 64),
    (Bottleneck, 256, 128, 2, 1, False, 32, 4),
    (Bottleneck, 512, 256, 2, 2, True, 32, 4),
], ids=["basic-stride2", "aru-stride2", "aru-dilated"])
def test_make_layer_builds_torchvisions_stage(block, inplanes, planes, stride, dilation, dilate, groups,
                                              base_width):
    torch.manual_seed(0)
    ours = make_layer(block, inplanes, planes, 3, stride, dilation=dilation, dilate=dilate, groups=groups,
                      base_width=base_width, impl="eager")
    # torchvision's _make_layer reads and advances these attributes of the ResNet it builds
    builder = types.SimpleNamespace(inplanes=inplanes, dilation=dilation, groups=groups, base_width=base_width,
                                    _norm_layer=nn.BatchNorm2d)
    tv_block = {BasicBlock: tv_resnet.BasicBlock, Bottleneck: tv_resnet.Bottleneck}[block]
    torch.manual_seed(0)
    theirs = tv_resnet.ResNet._make_layer(builder, tv_block, planes, 3, stride, dilate)
    assert repr(ours) == repr(theirs)
    assert_same_tensors(ours.state_dict(), theirs.state_dict(), "stage parameters")


def test_importing_and_building_do_not_import_torchvision(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(aru_models.resnet18().state_dict(), path)
    code = (f"import sys, aru_models; aru_models.resnet18(weights={str(path)!r}); "
            "sys.exit(int('torchvision' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "torchvision was imported"


# --- weights= a file ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["state_dict", "state_dict-pathlike", "checkpoint-state_dict", "checkpoint-model"])
def test_weights_file_round_trip(tmp_path, layout):
    torch.manual_seed(1)
    source = aru_models.resnet18(num_classes=10)
    randomize_norms(source)
    saved = source.state_dict()
    if layout.startswith("checkpoint"):
        saved = {layout.split("-")[1]: saved, "epoch": 3}
    path = tmp_path / "weights.pt"
    torch.save(saved, path)

    loaded = aru_models.resnet18(weights=path if layout.endswith("pathlike") else str(path), num_classes=10)
    assert_same_tensors(loaded.state_dict(), source.state_dict(), "loaded weights")


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlike"])
def test_missing_weights_file_is_named(tmp_path, as_path):
    path = tmp_path / "no_such_weights.pt"
    with pytest.raises(FileNotFoundError, match="no_such_weights.pt"):
        aru_models.resnet50(weights=path if as_path else str(path))


def _drop_a_key(sd):
    del sd["layer4.1.bn2.running_var"]


def _add_a_key(sd):
    sd["head.weight"] = torch.zeros(3)


@pytest.mark.parametrize("change, num_classes, key", [
    (_drop_a_key, 1000, "layer4.1.bn2.running_var"),
    (_add_a_key, 1000, "head.weight"),
    (None, 10, "fc.weight"),
], ids=["missing-key", "unexpected-key", "shape-mismatch"])
def test_mismatched_weights_file_names_the_file_and_the_key(tmp_path, change, num_classes, key):
    state_dict = aru_models.resnet18(num_classes=num_classes).state_dict()
    if change is not None:
        change(state_dict)
    path = tmp_path / "other_model.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError) as info:
        aru_models.resnet18(weights=str(path))
    assert str(path) in str(info.value) and repr(key) in str(info.value), str(info.value)


def test_weights_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="list.pt"):
        aru_models.resnet18(weights=path)


# --- weights= a torchvision enum (nothing is downloaded) ------------------------------------


@pytest.fixture
def fake_download(monkeypatch):
    """Make ResNet18_Weights.IMAGENET1K_V1 a 3-class model whose download returns a known state_dict."""
    member = tv_models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setitem(member.meta, "categories", ["cat", "dog", "fish"])
    torch.manual_seed(2)
    weights = tv_models.resnet18(num_classes=3).state_dict()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return weights

    monkeypatch.setattr(tv_models.ResNet18_Weights, "get_state_dict", get_state_dict)
    return types.SimpleNamespace(member=member, weights=weights, calls=calls)


@pytest.mark.parametrize("given", ["member", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_load_as_torchvision_loads_them(fake_download, given):
    weights = fake_download.member if given == "member" else given
    model = aru_models.resnet18(weights=weights, progress=False)
    assert fake_download.calls == [(fake_download.member, (), {"progress": False, "check_hash": True})]
    assert model.fc.out_features == 3, "num_classes must follow the weights' categories"
    assert_same_tensors(model.state_dict(), fake_download.weights, "loaded weights")


def test_torchvision_weights_refuse_a_contradicting_num_classes(fake_download):
    with pytest.raises(ValueError, match="num_classes"):
        aru_models.resnet18(weights=fake_download.member, num_classes=10)


def test_torchvision_weights_of_another_model_are_refused():
    with pytest.raises(TypeError, match="ResNet18_Weights"):
        aru_models.resnet18(weights=tv_models.ResNet50_Weights.IMAGENET1K_V1)


# --- from_torchvision -----------------------------------------------------------------------


def _resnet18_eval_10_classes():
    return tv_models.resnet18(num_classes=10).eval()


def _aru_partly_frozen():
    model = tv_resnet.ResNet(tv_resnet.Bottleneck, [2, 1, 1, 1], groups=32, width_per_group=4)
    model.layer1.eval()
    model.conv1.weight.requires_grad_(False)
    return model


def _custom_dilated_float64():
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.3)
    return tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 2, 1, 1], num_classes=5, groups=8, width_per_group=4,
                            replace_stride_with_dilation=[False, True, True], norm_layer=norm).double()


@pytest.mark.parametrize("build", [_resnet18_eval_10_classes, _aru_partly_frozen, _custom_dilated_float64],
                         ids=["resnet18-eval-10classes", "aru-32x4d-partly-frozen", "custom-dilated-float64"])
def test_from_torchvision_keeps_weights_modes_and_outputs(build):
    theirs = build()
    randomize_norms(theirs)
    rng = torch.get_rng_state()
    ours = aru_models.from_torchvision(theirs, impl="eager")
    assert torch.equal(torch.get_rng_state(), rng), "conversion must not draw random numbers"

    assert isinstance(ours, ResNet) and ours.impl == "eager"
    assert repr(ours) == repr(theirs)
    assert_same_tensors(ours.state_dict(), theirs.state_dict(), "converted parameters and buffers")
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(ours.parameters(), theirs.parameters())), \
        "the converted model must hold copies"
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert [(n, m.training) for n, m in ours.named_modules()] == \
        [(n, m.training) for n, m in theirs.named_modules()]

    x = torch.randn(IMAGES, dtype=next(theirs.parameters()).dtype)
    with torch.no_grad():
        assert_equal_outputs(ours(x.clone()), theirs(x.clone()))
    assert_same_tensors(ours.state_dict(), theirs.state_dict(), "state after a forward")


def _resnet18_without_maxpool():
    model = tv_models.resnet18()
    model.maxpool = nn.Identity()
    return model


@pytest.mark.parametrize("build, message", [
    (lambda: nn.Linear(2, 2), "expected a torchvision.models.ResNet"),
    (lambda: aru_models.resnet18(), "expected a torchvision.models.ResNet"),
    (_resnet18_without_maxpool, re.escape("'(maxpool): Identity()'")),
], ids=["linear", "our-resnet", "resnet18-without-maxpool"])
def test_from_torchvision_refuses_other_models(build, message):
    with pytest.raises(TypeError, match=message):
        aru_models.from_torchvision(build())


def test_from_torchvision_keeps_a_group_norm():
    theirs = tv_models.resnet18(norm_layer=lambda channels: nn.GroupNorm(4, channels, eps=1e-3)).eval()
    ours = aru_models.from_torchvision(theirs, impl="eager")
    assert repr(ours) == repr(theirs)
    x = torch.randn(IMAGES)
    with torch.no_grad():
        assert_equal_outputs(ours(x), theirs(x))


def test_from_torchvision_keeps_a_sync_batch_norms_process_group():
    """A SyncBatchNorm's process group is not in its repr: the conversion must carry it
    (a lost one syncs over every process instead of the group), and refuse norms of
    several groups it cannot express with one norm layer."""
    group, other = object(), object()  # stand-ins: the modules only hold the group until a forward
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(tv_models.resnet18(num_classes=10), process_group=group)
    ours = aru_models.from_torchvision(theirs, impl="eager")
    norms = [m for m in ours.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(norms) == 20 and all(m.process_group is group for m in norms)
    theirs.layer3[1].bn2.process_group = other
    with pytest.raises(TypeError, match="layer3.1.bn2's is not bn1's"):
        aru_models.from_torchvision(theirs)


# --- impl -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda impl: aru_models.resnet18(impl=impl),
    lambda impl: ResNet(BasicBlock, [1, 1, 1, 1], impl=impl),
    lambda impl: Bottleneck(64, 16, impl=impl),
    lambda impl: aru_models.resnet18(impl="eager").set_impl(impl),
], ids=["builder", "ResNet", "Bottleneck", "set_impl"])
@pytest.mark.parametrize("impl", ["cuda", "Fused", 1])
def test_unknown_impl_is_refused_naming_the_allowed_values(make, impl):
    with pytest.raises(ValueError, match="'eager', 'fused'"):
        make(impl)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def test_impl_defaults_to_the_runtime_default():
    model = aru_models.resnet18()
    assert {model.impl} | {b.impl for b in blocks_of(model)} == {default_impl()}


def test_set_impl_switches_every_block_and_leaves_the_state_dict():
    model = aru_models.resnet18(impl="eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.set_impl("fused") is model
    assert model.impl == "fused" and all(b.impl == "fused" for b in blocks_of(model))
    assert_same_tensors(model.state_dict(), before, "state_dict after set_impl")
    with pytest.raises(ValueError):
        model.set_impl("triton")
    assert model.impl == "fused" and all(b.impl == "fused" for b in blocks_of(model))
