"""Channel-dependency analysis (fxcompress.graph.channels) on torchvision models and small hand-made graphs."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import fxcompress
from fxcompress import PassContext
from fxcompress.cli import main
from fxcompress.graph.channels import ChannelAnalysis, channel_groups, reshape_segments
from fxcompress.models import LeNet5, LeNet300


IMAGE = (torch.randn(1, 3, 64, 64),)


def analyse(model: nn.Module, inputs=IMAGE, leaf_modules=()) -> ChannelAnalysis:
    return channel_groups(fxcompress.trace(model.eval(), leaf_modules), inputs)


def torchvision_groups(name: str) -> ChannelAnalysis:
    return analyse(torchvision.models.get_model(name, weights=None))


def modules(ports) -> set:
    return {p.module for p in ports}


def group_making(result: ChannelAnalysis, module: str):
    group = next((g for g in result.groups if module in modules(g.producers)), None)
    assert group is not None, f"no group has producer {module}"
    return group


def offset_of(group, port) -> int:
    return next(m.offset for m in group.members if (m.tensor, m.dim) == port.axis)


def test_resnet18_residual_stream_ties_each_stage():
    result = torchvision_groups("resnet18")
    stem = group_making(result, "conv1")
    assert modules(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {"layer2.0.conv1", "layer2.0.downsample.0"} <= modules(stem.consumers)
    stage2 = group_making(result, "layer2.0.downsample.0")
    assert modules(stage2.producers) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    inner = group_making(result, "layer1.0.conv1")
    assert modules(inner.producers) == {"layer1.0.conv1"} and modules(inner.consumers) == {"layer1.0.conv2"}
    assert stem.removable and stage2.removable and inner.removable and stem.size == 64


def test_resnet18_classifier_outputs_and_image_channels_are_frozen():
    result = torchvision_groups("resnet18")
    head = group_making(result, "fc")
    assert head.frozen and not head.removable and head.size == 1000
    assert any("model output" in reason for reason in head.frozen_by)
    image = result.consumer_group("conv1")
    assert image.frozen and not image.producers
    assert sum(g.removable for g in result.groups) == len(result.groups) - 2


def test_mobilenet_v2_depthwise_conv_ties_its_input_and_output_channels():
    result = torchvision_groups("mobilenet_v2")
    expand = group_making(result, "features.2.conv.0.0")
    assert modules(expand.producers) == {"features.2.conv.0.0"}
    assert modules(expand.consumers) == {"features.2.conv.2"}
    assert "features_2_conv_1_0" in expand.ops  # the depthwise conv passes the channels through
    assert not any(p.module == "features.2.conv.1.0" for g in result.groups for p in g.producers + g.consumers)


def test_densenet121_concatenation_places_each_layer_at_its_offset():
    result = torchvision_groups("densenet121")
    block = group_making(result, "features.conv0")
    assert block.size == 64 + 6 * 32
    offsets = {p.module: offset_of(block, p) for p in block.producers}
    assert offsets["features.conv0"] == 0
    for k in range(1, 7):
        assert offsets[f"features.denseblock1.denselayer{k}.conv2"] == 64 + 32 * (k - 1)
    assert "features.transition1.conv" in modules(block.consumers)
    assert block.removable


def test_efficientnet_b0_squeeze_excite_gate_joins_the_gated_channels():
    result = torchvision_groups("efficientnet_b0")
    expand = group_making(result, "features.2.0.block.0.0")
    assert modules(expand.producers) == {"features.2.0.block.0.0", "features.2.0.block.2.fc2"}
    assert modules(expand.consumers) == {"features.2.0.block.2.fc1", "features.2.0.block.3.0"}
    squeeze = group_making(result, "features.2.0.block.2.fc1")
    assert modules(squeeze.consumers) == {"features.2.0.block.2.fc2"}


def test_shufflenet_channel_shuffle_freezes_and_is_listed():
    result = torchvision_groups("shufflenet_v2_x0_5")
    concat = group_making(result, "stage2.0.branch1.2")
    assert concat.frozen
    assert any("splits axes (48,) into (2, 24)" in reason for reason in concat.frozen_by)
    shuffles = [f for f in result.frozen_ops if f.op == "view"]
    assert shuffles and all(f.groups for f in shuffles)
    branch = group_making(result, "stage2.0.branch2.0")
    assert branch.removable  # inside a branch, channels still shrink


def tiny_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


def test_vit_stream_joins_attention_and_mlp_outputs_under_layernorm():
    result = analyse(tiny_vit(), (torch.randn(1, 3, 32, 32),))
    stream = group_making(result, "conv_proj")
    assert {"encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.mlp.3"} <= \
        modules(stream.producers)
    assert "heads.head" in modules(stream.consumers)
    assert {"class_token", "encoder.pos_embedding"} <= set(stream.params)
    assert "encoder_layers_encoder_layer_0_ln_1" in stream.normalized_by
    hidden = group_making(result, "encoder.layers.encoder_layer_0.mlp.0")
    assert hidden.removable and modules(hidden.consumers) == {"encoder.layers.encoder_layer_0.mlp.3"}
    assert group_making(result, "heads.head").frozen


def test_swin_window_attention_freezes_the_stream_and_is_listed():
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2],
                           num_classes=10)
    result = analyse(swin, (torch.randn(1, 3, 32, 32),))
    stream = group_making(result, "features.0.0")
    assert stream.frozen
    assert any("shifted_window_attention" in reason for reason in stream.frozen_by)
    assert any(name.startswith("_patch_merging_pad") for name in result.no_rule)
    mlp = group_making(result, "features.1.0.mlp.0")
    assert mlp.removable


class Cumulative(nn.Module):
    """An op no rule knows (cumsum over channels) and a leaf module of an unknown type."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.odd = Odd()
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cumsum(self.a(x), 1)
        return self.c(self.odd(self.b(y)))


class Odd(nn.Module):
    def forward(self, x):
        return x.flip(1)


def test_ops_without_a_rule_freeze_their_channels_and_are_listed():
    result = analyse(Cumulative(), leaf_modules=["Odd"])
    assert set(result.no_rule) == {"cumsum", "odd"}
    for producer in ("a", "b"):
        group = group_making(result, producer)
        assert group.frozen and not group.removable
    frozen = {f.node: f.reason for f in result.frozen_ops}
    assert "no channel rule for call_function 'cumsum'" in frozen["cumsum"]
    assert "module type Odd" in frozen["odd"]


def test_mlp_each_hidden_layer_is_its_own_group_and_the_output_is_frozen():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    result = analyse(mlp, (torch.randn(2, 8),))
    assert [(g.size, g.removable) for g in result.groups] == [(8, False), (16, True), (12, True), (4, False)]
    assert modules(result.groups[1].producers) == {"0"} and modules(result.groups[1].consumers) == {"2"}
    assert any("model output" in r for r in result.groups[3].frozen_by)


def test_flatten_into_a_linear_ties_channels_to_blocks_of_features():
    result = analyse(LeNet5(), (torch.randn(1, 1, 28, 28),))
    group = group_making(result, "conv2")
    assert group.removable and group.size == 50 and modules(group.consumers) == {"fc1"}
    features = next(m for m in group.members if (m.tensor, m.dim) == group.consumers[0].axis)
    assert (features.size, features.inner, features.offset) == (50 * 7 * 7, 49, 0)


class MergeIntoConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv1d(4 * 8, 5, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y.reshape(y.shape[0], 4 * 8, 8))


def test_reshape_merging_channels_with_space_freezes_unless_it_feeds_a_linear():
    result = analyse(MergeIntoConv1d(), (torch.randn(1, 3, 8, 8),))
    group = group_making(result, "a")
    assert group.frozen and any("merges axes (4, 8) into (32,)" in r for r in group.frozen_by)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], 1))


def test_a_tensor_concatenated_twice_is_frozen():
    group = group_making(analyse(Twice()), "a")
    assert group.frozen and any("different offsets" in r for r in group.frozen_by)


class SliceAndShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, 2:6]) + self.d(self.shuffle(self.c(x)))


def test_slices_tie_at_their_offset_and_channel_shuffle_modules_freeze():
    result = analyse(SliceAndShuffle())
    sliced = group_making(result, "a")
    assert not sliced.frozen and offset_of(sliced, sliced.consumers[0]) == 2
    shuffled = group_making(result, "c")
    assert shuffled.frozen and any("channel shuffle" in r for r in shuffled.frozen_by)


def test_reshape_segments_pair_merged_and_split_dims():
    assert reshape_segments((2, 8, 4, 4), (2, 128)) == [([0], [0]), ([1, 2, 3], [1])]
    assert reshape_segments((2, 48, 5, 5), (2, 2, 24, 5, 5)) == [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4])]
    assert reshape_segments((2, 8, 1, 1), (2, 8)) == [([0], [0]), ([1], [1])]
    with pytest.raises(ValueError):
        reshape_segments((6,), (4,))


def test_registered_as_a_cached_analysis():
    gm = fxcompress.trace(LeNet300())
    ctx = PassContext(example_inputs=(torch.randn(2, 1, 28, 28),), progress=False)
    first = ctx.analysis("channels", gm)
    assert isinstance(first, ChannelAnalysis) and first is ctx.analysis("channels", gm)
    assert [g.size for g in first.groups[1:]] == [300, 100, 10] and first.groups[0].frozen


def test_inspect_groups_prints_groups_and_frozen_ops(capsys):
    assert main(["inspect", "--model", "lenet5", "--input-shape", "1", "1", "28", "28", "--groups"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 20 channels, removable" in out
    assert "5 groups, 3 removable, 2 not" in out
    assert "output (output): model output: its size must not change" in out


def test_same_channels_classes_split_the_vit_stream_at_its_layernorms():
    # One dependency group spans the ViT stream, LayerNorms included; a joint selection may not: the
    # readers after each LayerNorm (the attention, mlp.0, the head) each get their own class.
    result = analyse(tiny_vit(), (torch.randn(1, 3, 32, 32),))
    classes = result.same_channels()
    stream = group_making(result, "conv_proj")
    readers = {p.module: classes[p.axis] for p in stream.consumers}
    assert len(readers) >= 3 and len(set(readers.values())) == len(readers)
    resnet = torchvision_groups("resnet18")
    classes = resnet.same_channels()
    last_stage = group_making(resnet, "layer4.1.conv2")
    assert len({classes[p.axis] for p in last_stage.consumers}) == 1  # layer4.1.conv1 and fc (after flatten)


def test_inspect_groups_lists_the_layers_read_as_one_stream(capsys):
    assert main(["inspect", "--model", "torchvision:resnet18", "--input-shape", "1", "3", "64", "64", "--groups"]) == 0
    out = capsys.readouterr().out
    assert "read as one stream (select_neurons residual: joint): layer4.1.conv1, fc" in out
    assert "read as one stream (select_neurons residual: joint): layer1.0.conv1, layer1.1.conv1, layer2.0.conv1, " \
           "layer2.0.downsample.0" in out
