"""Backbone registry, weight loading (torchvision cache and the efficientnet-lite0 package), truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from padim_core.backbones import (
    BACKBONES,
    FeatureExtractor,
    efficientnet_lite0_imagenet,
    get_backbone,
)
from padim_core.errors import BackboneError, PadimError


def test_unknown_backbone_lists_the_allowed_names():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg16'.*efficientnet_lite0.*resnet18"):
        get_backbone("vgg16")


def test_unknown_layer_names_the_backbone_and_allowed_layers():
    with pytest.raises(BackboneError, match=r"unknown layer\(s\) \['layer9'\] for backbone 'resnet18'.*layer1"):
        get_backbone("resnet18").validate_layers(["layer1", "layer9"])


def test_layers_come_back_in_network_order():
    assert get_backbone("resnet50").validate_layers(["layer3", "layer2"]) == ("layer2", "layer3")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_random_init_extractor_shapes_match_the_registry(name):
    spec = get_backbone(name)
    layers = spec.default_layers["padim"]
    extractor = FeatureExtractor(name, layers, pretrained=False)
    assert extractor.channels == [spec.layer_channels[layer] for layer in layers]
    assert extractor.strides == [spec.layer_strides[layer] for layer in layers]
    with torch.no_grad():
        features = extractor(torch.zeros(1, 3, 64, 64))
    assert len(features) == len(layers)
    for feature, channels, stride in zip(features, extractor.channels, extractor.strides):
        assert feature.shape[1] == channels
        assert feature.shape[-1] == 64 // stride


def test_backbone_errors_are_padim_errors_not_value_errors():
    assert issubclass(BackboneError, PadimError) and not issubclass(BackboneError, ValueError)


def test_extraction_stops_at_the_deepest_requested_layer():
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False)
    assert extractor.stage_names == ["stem", "layer1", "layer2"]


def test_resnet_weights_load_from_torchvision_cache(tmp_path, monkeypatch):
    """Place a checkpoint where torchvision's cache looks; the extractor must use exactly it."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet18(weights=None)
    with torch.no_grad():
        reference.conv1.weight.normal_(0, 1, generator=torch.Generator().manual_seed(7))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    extractor = FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=True)
    assert torch.equal(extractor.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(extractor.stages[2][0].conv1.weight, reference.layer2[0].conv1.weight)


def test_missing_resnet_weights_name_the_file_and_never_fall_back_to_random(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # An unroutable proxy makes the download fail at once, as it does on an offline machine.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(BackboneError, match=f"Put the file at {expected}"):
        FeatureExtractor("resnet50", ["layer2", "layer3"], pretrained=True)


def _top_class(net: torch.nn.Module, image: np.ndarray) -> int:
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
    tensor = torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return int(net(tensor).argmax())


def test_efficientnet_lite0_weights_classify_real_photos():
    """The packaged weights are ImageNet's: skimage's cat is a cat (281-285), its coffee a cup (967/968/504)."""
    net = efficientnet_lite0_imagenet().eval()
    assert 281 <= _top_class(net, data.chelsea()) <= 285
    assert _top_class(net, data.coffee()) in {504, 967, 968}


def test_efficientnet_lite0_extractor_uses_the_packaged_weights():
    extractor = FeatureExtractor("efficientnet_lite0", ["blocks.1", "blocks.2"], pretrained=True)
    full = efficientnet_lite0_imagenet()
    assert torch.equal(extractor.stages[0][0].weight, full.conv_stem.weight)
    assert extractor.stage_names[-1] == "blocks.2"
