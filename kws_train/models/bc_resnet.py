"""BC-ResNet for log-mel spectrograms, ready for eager-mode post-training static quantization.

Kim, Chang, Lee and Sung, "Broadcasted Residual Learning for Efficient Keyword Spotting",
Interspeech 2021 (arXiv:2106.04140). A block keeps the 2-D (frequency x time) map for a cheap
frequency-wise depthwise convolution, averages the frequency axis away for the temporal part
(a dilated depthwise convolution and a 1x1 convolution on a ``(C, 1, T)`` map), and broadcasts
that result back over frequency as a residual:

    y = relu(x + f2(x) + broadcast(f1(mean_freq(f2(x)))))

with ``f2`` = 3x1 depthwise convolution + SubSpectral Norm (batch norm per channel and per
frequency sub-band, 5 sub-bands) and ``f1`` = 1x3 dilated depthwise convolution + batch norm +
Swish + 1x1 convolution + channel dropout. A transition block opens a stage with a 1x1
convolution to the new width (and the stage's frequency stride) and has no identity path.

Layout (the paper's Table 1; ``w`` is the width multiplier of BC-ResNet-w): a 5x5 stem with
frequency stride 2 to ``16w`` channels; stages of 2, 2, 4 and 4 blocks at ``8w, 12w, 16w, 20w``
channels, frequency stride 2 opening stages 2 and 3, temporal dilation 1, 2, 4, 8; a 5x5
depthwise convolution without frequency padding (5 bands -> 1), a 1x1 convolution to ``32w``,
average pooling over time and a 1x1 classifier. The frequency axis shrinks 40 -> 20 -> 10 -> 5
-> 1, so the model takes exactly 40 mel bands; the time axis is any length.

Input ``(N, in_channels, 40, frames)``, output logits ``(N, num_classes)``. One variant,
``"default"``: the paper's network is already made for 40-band log-mel input.

For quantization: ``fuse_model()`` folds every batch norm into a convolution (SubSpectral Norm
becomes a 1x1 depthwise convolution over the sub-band channels), the additions go through
``FloatFunctional`` and Swish, which has no quantized kernel in eager mode, runs in float
between its own dequantize and quantize steps on the small ``(C, 1, T)`` map.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

__all__ = ["BCResNet", "SubSpectralNorm", "bc_resnet_1", "bc_resnet_3", "bc_resnet_8"]

MEL_BANDS = 40
SUB_BANDS = 5
# Blocks per stage, their width in units of the multiplier, frequency stride of the stage's first
# block and temporal dilation: the paper's Table 1.
STAGES = ((2, 8, 1, 1), (2, 12, 2, 2), (4, 16, 2, 4), (4, 20, 1, 8))
STEM_WIDTH, HEAD_WIDTH = 16, 32


class SubSpectralNorm(nn.Module):
    """Batch norm with separate statistics per channel and per frequency sub-band.

    ``(N, C, F, T)`` is viewed as ``(N, C * sub_bands, F / sub_bands, T)`` so that one
    ``BatchNorm2d`` normalises each sub-band of each channel on its own (the paper's SSN).
    After `fuse()` the same per-sub-band affine map is a 1x1 depthwise convolution, which eager
    quantization and every runtime support.
    """

    def __init__(self, channels: int, sub_bands: int = SUB_BANDS):
        super().__init__()
        self.sub_bands = sub_bands
        self.norm: nn.Module = nn.BatchNorm2d(channels * sub_bands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, f, t = x.shape
        if not torch.jit.is_tracing() and f % self.sub_bands:  # a traced graph has fixed bands already
            raise ValueError(f"SubSpectralNorm needs a frequency axis divisible by {self.sub_bands}, got {f}")
        return self.norm(x.reshape(n, c * self.sub_bands, f // self.sub_bands, t)).reshape(n, c, f, t)

    def fuse(self) -> None:
        """Replace the batch norm by the 1x1 depthwise convolution it computes in eval mode."""
        norm = self.norm
        if not isinstance(norm, nn.BatchNorm2d):
            return
        scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        conv = nn.Conv2d(norm.num_features, norm.num_features, 1, groups=norm.num_features, bias=True)
        with torch.no_grad():
            conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
            conv.bias.copy_(norm.bias.detach() - norm.running_mean * scale)
        self.norm = conv


class _FloatSwish(nn.Module):
    """Swish in float: quantized eager mode has no SiLU kernel, so dequantize around it."""

    def __init__(self):
        super().__init__()
        self.dequant, self.swish, self.quant = DeQuantStub(), nn.SiLU(), QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.swish(self.dequant(x)))


class BCResBlock(nn.Module):
    """One broadcasted residual block; a transition block when the width changes or it strides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, dropout: float = 0.1):
        super().__init__()
        self.transition = in_channels != out_channels or stride != 1
        if self.transition:
            self.expand = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
            )
        self.freq_conv = nn.Conv2d(
            out_channels, out_channels, (3, 1), (stride, 1), (1, 0), groups=out_channels, bias=False
        )
        self.ssn = SubSpectralNorm(out_channels)
        self.temporal = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, (1, 3), padding=(0, dilation), dilation=(1, dilation),
                      groups=out_channels, bias=False),
            nn.BatchNorm2d(out_channels),
            _FloatSwish(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False),
            nn.Dropout2d(dropout),
        )
        self.add_broadcast = FloatFunctional()
        self.add_identity = None if self.transition else FloatFunctional()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.transition:
            x = self.expand(x)
        spectral = self.ssn(self.freq_conv(x))
        temporal = self.temporal(spectral.mean(dim=2, keepdim=True))
        out = self.add_broadcast.add(spectral, temporal.expand_as(spectral))
        if self.add_identity is not None:
            out = self.add_identity.add(out, identity)
        return self.relu(out)

    def fuse(self, prefix: str) -> list:
        """Fold SubSpectral Norm in place; return the module groups for `fuse_modules`."""
        self.ssn.fuse()
        groups = [[f"{prefix}temporal.0", f"{prefix}temporal.1"]]
        if self.transition:
            groups.append([f"{prefix}expand.0", f"{prefix}expand.1", f"{prefix}expand.2"])
        return groups


def _conv_bn_relu(in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BCResNet(nn.Module):
    """BC-ResNet with width multiplier `width`; QuantStub/DeQuantStub at the ends."""

    def __init__(
        self,
        width: float = 1,
        num_classes: int = 12,
        in_channels: int = 1,
        stages: Sequence[tuple] = STAGES,
        dropout: float = 0.1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        stem = round(STEM_WIDTH * width)
        self.quant = QuantStub()
        self.stem = _conv_bn_relu(in_channels, stem, 5, (2, 1), 2)
        blocks, channels = [], stem
        for count, units, stride, dilation in stages:
            out = round(units * width)
            for index in range(count):
                blocks.append(BCResBlock(channels, out, stride if index == 0 else 1, dilation, dropout))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        # No frequency padding: the last 5 bands become one.
        self.head_dw = _conv_bn_relu(channels, channels, 5, 1, (0, 2), groups=channels)
        self.head_pw = _conv_bn_relu(channels, round(HEAD_WIDTH * width), 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(round(HEAD_WIDTH * width), num_classes, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and x.shape[2] != MEL_BANDS:
            raise ValueError(f"BC-ResNet takes {MEL_BANDS} mel bands, got an input of {x.shape[2]}")
        x = self.blocks(self.stem(self.quant(x)))
        x = self.pool(self.head_pw(self.head_dw(x)))
        return self.dequant(torch.flatten(self.classifier(x), 1))

    def fuse_model(self) -> None:
        """Fold every batch norm (and ReLU) into a convolution, in place. Call in eval mode."""
        if self.training:
            raise RuntimeError("fuse_model() folds batch norm statistics: call model.eval() first")
        groups = [[f"{name}.0", f"{name}.1", f"{name}.2"] for name in ("stem", "head_dw", "head_pw")]
        for index, block in enumerate(self.blocks):
            groups += block.fuse(f"blocks.{index}.")
        fuse_modules(self, groups, inplace=True)


def _bc_resnet(width: int, num_classes: int, in_channels: int, variant: str) -> BCResNet:
    if variant != "default":
        raise ValueError(f"bc_resnet_{width} has one variant, 'default' (the paper's layout), not {variant!r}")
    return BCResNet(width, num_classes, in_channels)


def bc_resnet_1(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> BCResNet:
    """BC-ResNet-1 (9.3 k parameters for 12 classes): stem 16, stages 8-12-16-20, head 32 channels.

    Args:
        num_classes: output logits.
        in_channels: input planes (1 for a 40-band log-mel spectrogram).
        variant: only ``"default"``.
    """
    return _bc_resnet(1, num_classes, in_channels, variant)


def bc_resnet_3(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> BCResNet:
    """BC-ResNet-3: stem 48, stages 24-36-48-60, head 96 channels. Arguments as `bc_resnet_1`."""
    return _bc_resnet(3, num_classes, in_channels, variant)


def bc_resnet_8(num_classes: int = 12, in_channels: int = 1, variant: str = "default") -> BCResNet:
    """BC-ResNet-8: stem 128, stages 64-96-128-160, head 256 channels. Arguments as `bc_resnet_1`."""
    return _bc_resnet(8, num_classes, in_channels, variant)
