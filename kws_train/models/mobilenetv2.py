"""MobileNetV2 for log-mel spectrograms, ready for eager-mode post-training static quantization.

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (arXiv:1801.04381): the paper's table 2 of inverted residual blocks
(1x1 expansion, 3x3 depthwise, linear 1x1 projection, shortcut when shapes allow), a 1x1
convolution to 1280 channels, average pooling and one linear classifier. ReLU replaces ReLU6
so every convolution, batch norm and ReLU fuse into one quantized op.

Input ``(N, in_channels, n_mels, frames)``, output logits ``(N, num_classes)``. Two variants:

* ``"imagenet"``: width multiplier 1/32 with the paper's stride-2 stem and stage strides
  (overall stride 32); as in the reference definition the last 1x1 convolution keeps 1280
  channels for multipliers below 1.
* ``"default"``: width 1.0 with a stride-1 stem, and no stride 2 in the 160-channel stage
  (overall stride 16): a 40 x 32 input ends at 3 x 2. 58 M MACs per 40 x 101 clip.
  Measurements behind the layout: docs/models.md.

`mobilenet_v2_x0_5` is the same network at width 0.5 (0.70 M parameters against 2.24 M), in
either layout: the MobileNetV2 whose bundle is small enough to ship in the repository.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

__all__ = ["MobileNetV2", "mobilenet_v2", "mobilenet_v2_x0_5", "make_divisible"]

# (expansion t, output channels c, repeats n): the paper's table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1),
    (6, 24, 2),
    (6, 32, 3),
    (6, 64, 4),
    (6, 96, 3),
    (6, 160, 3),
    (6, 320, 1),
)
# Stride of each stage's first block, and of the stem.
IMAGENET_STRIDES = (1, 2, 2, 2, 1, 2, 1)
DEFAULT_STRIDES = (2, 2, 2, 2, 1, 1, 1)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU(nn.Sequential):
    """Convolution, batch norm, ReLU: one fused op after `fuse_model`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        # Only blocks with a residual get an add: an unused one would never be observed.
        self.skip_add = FloatFunctional() if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return self.skip_add.add(x, self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; QuantStub/DeQuantStub at the ends for eager-mode quantization."""

    def __init__(
        self,
        num_classes: int = 12,
        in_channels: int = 1,
        width_mult: float = 1.0,
        stem_stride: int = 2,
        strides: Tuple[int, ...] = IMAGENET_STRIDES,
        dropout: float = 0.2,
        round_nearest: int = 8,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        channels = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.quant = QuantStub()
        layers = [ConvBNReLU(in_channels, channels, stride=stem_stride)]
        if len(strides) != len(INVERTED_RESIDUAL_SETTING):
            raise ValueError(f"strides needs one entry per stage ({len(INVERTED_RESIDUAL_SETTING)}), got {strides}")
        for (t, c, n), s in zip(INVERTED_RESIDUAL_SETTING, strides):
            out_channels = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        layers.append(ConvBNReLU(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self.dequant = DeQuantStub()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.quant(x))
        x = torch.flatten(self.pool(x), 1)
        return self.dequant(self.classifier(x))

    def fuse_model(self) -> None:
        """Fold batch norm (and ReLU) into the convolutions, in place. Call in eval mode."""
        if self.training:
            raise RuntimeError("fuse_model() folds batch norm statistics: call model.eval() first")
        groups = []
        for name, m in self.named_modules():
            if isinstance(m, ConvBNReLU):
                groups.append([f"{name}.0", f"{name}.1", f"{name}.2"])
            elif isinstance(m, InvertedResidual):
                # The linear projection: conv + batch norm, the last two layers of the block.
                n = len(m.conv)
                groups.append([f"{name}.conv.{n - 2}", f"{name}.conv.{n - 1}"])
        fuse_modules(self, groups, inplace=True)


LAYOUTS = {
    "imagenet": dict(stem_stride=2, strides=IMAGENET_STRIDES),
    "default": dict(stem_stride=1, strides=DEFAULT_STRIDES),
}
# The project's first MobileNetV2 was the ImageNet layout at width 1/32.
WIDTHS = {"imagenet": 1 / 32, "default": 1.0}


def mobilenet_v2(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> MobileNetV2:
    """MobileNetV2 (the paper's table 2 of inverted residual blocks).

    Args:
        num_classes: output logits.
        in_channels: input planes (1 for a log-mel spectrogram).
        variant: ``"default"`` (width 1.0, stride-1 stem) or ``"imagenet"`` (width 1/32, stride-2 stem).
    """
    if variant not in LAYOUTS:
        raise ValueError(f"unknown mobilenet_v2 variant {variant!r}; choose one of {', '.join(LAYOUTS)}")
    return MobileNetV2(num_classes, in_channels, width_mult=WIDTHS[variant], **LAYOUTS[variant])


def mobilenet_v2_x0_5(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> MobileNetV2:
    """MobileNetV2 at width multiplier 0.5.

    Args:
        num_classes: output logits.
        in_channels: input planes (1 for a log-mel spectrogram).
        variant: ``"default"`` (stride-1 stem, overall stride 16, as `mobilenet_v2`'s default) or
            ``"imagenet"`` (the paper's stride-2 stem and stage strides).
    """
    if variant not in LAYOUTS:
        raise ValueError(f"unknown mobilenet_v2_x0_5 variant {variant!r}; choose one of {', '.join(LAYOUTS)}")
    return MobileNetV2(num_classes, in_channels, width_mult=0.5, **LAYOUTS[variant])
