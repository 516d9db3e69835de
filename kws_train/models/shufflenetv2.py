"""ShuffleNetV2 0.5x for log-mel spectrograms, ready for eager-mode post-training static quantization.

Ma, Zhang, Zheng and Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018 (arXiv:1807.11164): units that split the channels in two, transform one half
(1x1, 3x3 depthwise, 1x1) and shuffle them together again; stages of 4-8-4 units with widths
48-96-192 at 0.5x, a 1x1 convolution to 1024 channels, pooling and one linear classifier.
The branch concatenation goes through ``FloatFunctional.cat`` and the channel shuffle only
reshapes and transposes, so the quantized model runs the same graph.

Input ``(N, in_channels, n_mels, frames)``, output logits ``(N, num_classes)``. Two variants:

* ``"imagenet"``: the paper's layout (3x3 stride-2 stem, 3x3 stride-2 max-pool, three stride-2
  stages: overall stride 32); a 40 x 32 input ends at 2 x 1.
* ``"default"``: a 3x3 stride-1 stem and no max-pool, so the first downsampling is the learned
  stride-2 unit that opens stage 2 (overall stride 8).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

__all__ = ["ShuffleNetV2", "shufflenet_v2_x0_5", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave `groups` channel groups: ``(N, g*k, H, W) -> (N, k*g, H, W)``.

    Only the channel axis is reshaped, so the batch size and map size stay symbolic when traced
    or exported, and quantized tensors support every step.
    """
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _conv_bn(in_channels, out_channels, kernel_size, stride=1, groups=1, relu=True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit: split (or duplicate, when striding), transform one half, concatenate, shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even, got {out_channels}")
        self.stride = stride
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError("a stride-1 unit must keep its channel count")
        if stride > 1:
            self.branch1 = nn.Sequential(
                *_conv_bn(in_channels, in_channels, 3, stride, groups=in_channels, relu=False),
                *_conv_bn(in_channels, branch, 1),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            *_conv_bn(in_channels if stride > 1 else branch, branch, 1),
            *_conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
            *_conv_bn(branch, branch, 1),
        )
        self.cat = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = self.cat.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = self.cat.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)

    def fuse_groups(self, prefix: str) -> list:
        groups = [[f"{prefix}branch2.{i}" for i in (0, 1, 2)], [f"{prefix}branch2.3", f"{prefix}branch2.4"]]
        groups.append([f"{prefix}branch2.{i}" for i in (5, 6, 7)])
        if self.stride > 1:
            groups += [[f"{prefix}branch1.0", f"{prefix}branch1.1"], [f"{prefix}branch1.{i}" for i in (2, 3, 4)]]
        return groups


# Stage widths of the 0.5x model: stem, stages 2-4, last 1x1 convolution.
WIDTHS_X0_5 = (24, 48, 96, 192, 1024)
REPEATS = (4, 8, 4)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2; QuantStub/DeQuantStub at the ends for eager-mode quantization."""

    def __init__(
        self,
        num_classes: int = 12,
        in_channels: int = 1,
        widths: Sequence[int] = WIDTHS_X0_5,
        repeats: Sequence[int] = REPEATS,
        stem_stride: int = 2,
        max_pool: bool = True,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.quant = QuantStub()
        self.conv1 = nn.Sequential(*_conv_bn(in_channels, widths[0], 3, stem_stride))
        self.maxpool = nn.MaxPool2d(3, 2, 1) if max_pool else nn.Identity()
        channels = widths[0]
        stages = []
        for width, count in zip(widths[1:-1], repeats):
            units = [InvertedResidual(channels, width, 2)]
            units += [InvertedResidual(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            channels = width
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = nn.Sequential(*_conv_bn(channels, widths[-1], 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(self.quant(x)))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.dequant(self.fc(x))

    def fuse_model(self) -> None:
        """Fold batch norm (and ReLU) into the convolutions, in place. Call in eval mode."""
        if self.training:
            raise RuntimeError("fuse_model() folds batch norm statistics: call model.eval() first")
        groups = [["conv1.0", "conv1.1", "conv1.2"], ["conv5.0", "conv5.1", "conv5.2"]]
        for stage in ("stage2", "stage3", "stage4"):
            for index, unit in enumerate(getattr(self, stage)):
                groups += unit.fuse_groups(f"{stage}.{index}.")
        fuse_modules(self, groups, inplace=True)


VARIANTS = {
    "imagenet": dict(stem_stride=2, max_pool=True),
    "default": dict(stem_stride=1, max_pool=False),
}


def shufflenet_v2_x0_5(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> ShuffleNetV2:
    """ShuffleNetV2 with 0.5x widths (24-48-96-192, last convolution 1024).

    Args:
        num_classes: output logits.
        in_channels: input planes (1 for a log-mel spectrogram).
        variant: ``"default"`` (stride-1 stem, no max-pool) or ``"imagenet"`` (the paper's stem and max-pool).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown shufflenet_v2_x0_5 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return ShuffleNetV2(num_classes, in_channels, **VARIANTS[variant])
