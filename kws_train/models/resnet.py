"""ResNet-18 for log-mel spectrograms, ready for eager-mode post-training static quantization.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385): basic blocks of two 3x3 convolutions with identity shortcuts, stages
2-2-2-2 of widths 64-128-256-512, global average pooling and one linear classifier.

Input ``(N, in_channels, n_mels, frames)``, output logits ``(N, num_classes)``. Two variants:

* ``"imagenet"``: the paper's layout: 7x7 stride-2 stem, 3x3 stride-2 max-pool, stride 2 at
  the start of stages 2-4 (overall stride 32); a 40 x 32 input ends at a 2 x 1 map.
* ``"default"``: a 3x3 stride-2 stem without max-pool, stage 1 at half the input resolution,
  stride 2 at the start of stages 2-4 (overall stride 16): a 40 x 101 input ends at 3 x 7.
  602 M MACs per 40 x 101 clip. Measurements behind the layout: docs/models.md.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

Stride = Tuple[int, int]

__all__ = ["BasicBlock", "ResNet", "resnet18", "IMAGENET_CONFIG", "DEFAULT_CONFIG"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet's basic block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Stride = (1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if tuple(stride) != (1, 1) or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        # add_relu keeps the sum and its ReLU one quantized op.
        self.skip_add_relu = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.skip_add_relu.add_relu(out, identity)

    def fuse_groups(self, prefix: str) -> list:
        groups = [[f"{prefix}conv1", f"{prefix}bn1", f"{prefix}relu1"], [f"{prefix}conv2", f"{prefix}bn2"]]
        if self.downsample is not None:
            groups.append([f"{prefix}downsample.0", f"{prefix}downsample.1"])
        return groups


# (stem, stage strides). stem "imagenet": 7x7/2 conv + 3x3/2 max-pool; (k, s): a k x k conv of stride s.
IMAGENET_CONFIG = {"stem": "imagenet", "strides": ((1, 1), (2, 2), (2, 2), (2, 2))}
DEFAULT_CONFIG = {"stem": (3, (2, 2)), "strides": ((1, 1), (2, 2), (2, 2), (2, 2))}

WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)


class ResNet(nn.Module):
    """ResNet with basic blocks; QuantStub/DeQuantStub at the ends for eager-mode quantization."""

    def __init__(
        self,
        num_classes: int = 12,
        in_channels: int = 1,
        stem="imagenet",
        strides: Sequence[Stride] = IMAGENET_CONFIG["strides"],
        blocks: Sequence[int] = BLOCKS,
        widths: Sequence[int] = WIDTHS,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.quant = QuantStub()
        if stem == "imagenet":
            kernel, stem_stride = 7, (2, 2)
        else:
            kernel, stem_stride = stem
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel, stem_stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        channels = widths[0]
        stages = []
        for width, count, stride in zip(widths, blocks, strides):
            layers = [BasicBlock(channels, width, tuple(stride))]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.dequant = DeQuantStub()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # No zero-initialised residual BN: an all-zero branch gives QNNPACK's add a zero scale
        # and quantizing a freshly built model would fail.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.dequant(self.fc(x))

    def fuse_model(self) -> None:
        """Fold batch norm (and ReLU) into the convolutions, in place. Call in eval mode."""
        if self.training:
            raise RuntimeError("fuse_model() folds batch norm statistics: call model.eval() first")
        groups = [["conv1", "bn1", "relu"]]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(getattr(self, stage)):
                groups += block.fuse_groups(f"{stage}.{index}.")
        fuse_modules(self, groups, inplace=True)


def resnet18(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2, widths 64-128-256-512).

    Args:
        num_classes: output logits.
        in_channels: input planes (1 for a log-mel spectrogram).
        variant: ``"default"`` (3x3 stride-2 stem, no max-pool, overall stride 16) or
            ``"imagenet"`` (the paper's stem, overall stride 32).
    """
    configs = {"imagenet": IMAGENET_CONFIG, "default": DEFAULT_CONFIG}
    if variant not in configs:
        raise ValueError(f"unknown resnet18 variant {variant!r}; choose one of {', '.join(configs)}")
    return ResNet(num_classes, in_channels, **configs[variant])
