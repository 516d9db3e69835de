"""Keyword-spotting CNNs: ResNet-18, MobileNetV2, ShuffleNetV2 0.5x and BC-ResNet.

Every model takes a log-mel batch ``(N, 1, n_mels, frames)`` and returns logits
``(N, num_classes)``, has QuantStub/DeQuantStub at its ends and a ``fuse_model()`` method for
eager-mode post-training static quantization. The three image-classification architectures come
in two variants: ``"imagenet"`` (the ImageNet layout of the architecture's paper, where the
project started) and ``"default"`` (adapted to 40-band log-mel inputs); ``"seed"``, the first
name of ``"imagenet"``, is accepted. BC-ResNet was designed for 40-band log-mel input and has
only ``"default"`` (`model_variants`).
"""

from __future__ import annotations

from torch import nn

from .bc_resnet import BCResNet, bc_resnet_1, bc_resnet_3, bc_resnet_8
from .mobilenetv2 import MobileNetV2, mobilenet_v2, mobilenet_v2_x0_5
from .resnet import ResNet, resnet18
from .shufflenetv2 import ShuffleNetV2, shufflenet_v2_x0_5

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "BCResNet",
    "BUILDERS",
    "MobileNetV2",
    "ResNet",
    "ShuffleNetV2",
    "VARIANTS",
    "VARIANT_ALIASES",
    "VARIANT_NAMES",
    "bc_resnet_1",
    "bc_resnet_3",
    "bc_resnet_8",
    "build_model",
    "canonical_architecture",
    "canonical_variant",
    "mobilenet_v2",
    "mobilenet_v2_x0_5",
    "model_variants",
    "resnet18",
    "shufflenet_v2_x0_5",
]

BUILDERS = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_x0_5": mobilenet_v2_x0_5,
    "shufflenet_v2_x0_5": shufflenet_v2_x0_5,
    "bc_resnet_1": bc_resnet_1,
    "bc_resnet_3": bc_resnet_3,
    "bc_resnet_8": bc_resnet_8,
}
ARCHITECTURES = tuple(BUILDERS)
VARIANTS = ("default", "imagenet")
VARIANT_ALIASES = {"seed": "imagenet"}
VARIANT_NAMES = VARIANTS + tuple(VARIANT_ALIASES)
# Short names accepted on the command line.
ALIASES = {
    "resnet": "resnet18", "mobilenet": "mobilenet_v2", "mobilenet0.5": "mobilenet_v2_x0_5",
    "shufflenet": "shufflenet_v2_x0_5",
    "bcresnet1": "bc_resnet_1", "bcresnet3": "bc_resnet_3", "bcresnet8": "bc_resnet_8",
}
# Made for log-mel input: no ImageNet layout of their paper to offer.
_DEFAULT_ONLY = ("bc_resnet_1", "bc_resnet_3", "bc_resnet_8")


def canonical_architecture(name: str) -> str:
    """The full architecture name for `name` or one of its short aliases.

    Raises:
        ValueError: `name` is neither an architecture nor an alias.
    """
    if name in BUILDERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    choices = ", ".join(list(ARCHITECTURES) + list(ALIASES))
    raise ValueError(f"unknown architecture {name!r}; choose one of {choices}")


def model_variants(architecture: str) -> tuple:
    """The variants `architecture` (or its alias) comes in: a subset of `VARIANTS`."""
    return ("default",) if canonical_architecture(architecture) in _DEFAULT_ONLY else VARIANTS


def canonical_variant(name: str) -> str:
    """The variant name for ``name`` or an accepted older spelling (`VARIANT_ALIASES`).

    Raises:
        ValueError: neither a variant nor an alias.
    """
    name = VARIANT_ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return name


def build_model(architecture: str, num_classes: int, variant: str = "default", in_channels: int = 1) -> nn.Module:
    """A freshly initialised model.

    Args:
        architecture: one of `ARCHITECTURES` or an alias (``"resnet"``, ``"mobilenet"``, ``"shufflenet"``).
        num_classes: output logits.
        variant: ``"default"`` or ``"imagenet"`` (or an alias, `VARIANT_ALIASES`).
        in_channels: input planes (1 for a log-mel spectrogram).

    Raises:
        ValueError: unknown architecture or variant, or a bad class count.
    """
    variant = canonical_variant(variant)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return BUILDERS[canonical_architecture(architecture)](num_classes=num_classes, in_channels=in_channels, variant=variant)
