import contextlib
import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kws_runtime import FeatureSpec
from kws_train.models import ARCHITECTURES, VARIANTS, build_model, canonical_architecture, model_variants
from kws_train.profile import format_table, profile_model, profile_table

SHAPES = [FeatureSpec.preset("seed").shape, FeatureSpec.preset("fine").shape]  # 40x32, 40x101
MODEL_VARIANTS = [(a, v) for a in ARCHITECTURES for v in model_variants(a)]
WITH_IMAGENET = [a for a in ARCHITECTURES if model_variants(a) == VARIANTS]
# The slower checks take one width of BC-ResNet and MobileNetV2: the widths share every line of code.
ONE_WIDTH = [a for a in ARCHITECTURES if a not in ("bc_resnet_3", "bc_resnet_8", "mobilenet_v2_x0_5")]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@contextlib.contextmanager
def _expected_warnings_filtered():
    """torch.ao.quantization, torch.jit and the TorchScript ONNX exporter warn that they are
    deprecated, and tracing a quantized model freezes its (constant) input scale: expected here."""
    with warnings.catch_warnings():
        for message in (
            r".*torch\.ao\.quantization is deprecated",
            r".*torch\.jit\.trace.* is deprecated",
            r".*legacy TorchScript-based ONNX export",
            r"The feature will be removed",
        ):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python", category=torch.jit.TracerWarning)
        yield


def _with_batch_norm_statistics(model: nn.Module, shape) -> nn.Module:
    """Run a few training batches so batch norm has non-trivial running statistics, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 1, *shape) * 3 + 1)
    return model.eval()


@pytest.mark.parametrize("architecture, variant", MODEL_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("num_classes", [2, 12, 35])
def test_output_shape(architecture, variant, shape, num_classes):
    model = build_model(architecture, num_classes, variant).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, *shape))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "architecture, expected",
    [("resnet18", 11.18), ("mobilenet_v2", 0.06), ("shufflenet_v2_x0_5", 0.35)],
)
def test_seed_parameter_counts(architecture, expected):
    params = sum(p.numel() for p in build_model(architecture, 12, "seed").parameters())
    assert round(params / 1e6, 2) == expected


def test_mobilenet_v2_x0_5_is_the_default_layout_at_half_width():
    narrow, full = build_model("mobilenet0.5", 12), build_model("mobilenet_v2", 12)
    assert round(sum(p.numel() for p in narrow.parameters()) / 1e6, 2) == 0.70
    shape = FeatureSpec.preset("fine").shape
    assert _final_map(narrow, shape) == _final_map(full, shape)
    assert narrow.last_channel == full.last_channel == 1280


def _final_map(model, shape):
    """Spatial size of the last feature map, just before global pooling."""
    pool = next(m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d))
    seen = []
    handle = pool.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-2:]))
    with torch.no_grad():
        model.eval()(torch.randn(1, 1, *shape))
    handle.remove()
    return tuple(seen[0])


@pytest.mark.parametrize("architecture", WITH_IMAGENET)
def test_default_keeps_at_least_the_seed_resolution(architecture):
    shape = FeatureSpec.preset("seed").shape
    seed = _final_map(build_model(architecture, 12, "seed"), shape)
    default = _final_map(build_model(architecture, 12, "default"), shape)
    assert seed[0] * seed[1] <= default[0] * default[1]
    assert not any(isinstance(m, nn.MaxPool2d) for m in build_model(architecture, 12, "default").modules())


def test_resnet18_default_has_overall_stride_16():
    # The layout the accuracy table measured: a 40 x 101 input ends at 3 x 7, the seed's at 2 x 4.
    shape = FeatureSpec.preset("fine").shape
    assert _final_map(build_model("resnet18", 12, "default"), shape) == (3, 7)
    assert _final_map(build_model("resnet18", 12, "seed"), shape) == (2, 4)


@pytest.mark.parametrize("architecture, paper", [("bc_resnet_1", 9.2e3), ("bc_resnet_3", 54.2e3), ("bc_resnet_8", 321e3)])
def test_bc_resnet_parameter_counts_match_the_paper(architecture, paper):
    # Kim et al. 2021, Table 2: 9.2 k, 54.2 k and 321 k parameters for the 12-class task.
    params = sum(p.numel() for p in build_model(architecture, 12).parameters())
    assert abs(params - paper) / paper < 0.02, params


def test_bc_resnet_reduces_frequency_to_one_band_and_keeps_time():
    shape = FeatureSpec.preset("fine").shape
    assert _final_map(build_model("bc_resnet_1", 12), shape) == (1, shape[1])


def test_sub_spectral_norm_normalises_each_sub_band_on_its_own():
    from kws_train.models.bc_resnet import SubSpectralNorm

    norm = SubSpectralNorm(2, sub_bands=5).train()
    x = torch.randn(16, 2, 20, 7)
    x[:, :, :4] = x[:, :, :4] * 10 + 50  # the lowest sub-band only: far off in mean and scale
    out = norm(x)
    for band in range(5):
        part = out[:, :, 4 * band:4 * (band + 1)]
        torch.testing.assert_close(part.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(part.var(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="divisible by 5"):
        norm(torch.randn(2, 2, 12, 7))


def test_bc_resnet_refuses_other_inputs_and_variants():
    with pytest.raises(ValueError, match="40 mel bands, got an input of 64"):
        build_model("bcresnet1", 12).eval()(torch.randn(1, 1, 64, 101))
    with pytest.raises(ValueError, match="one variant, 'default'"):
        build_model("bc_resnet_3", 12, "imagenet")
    assert model_variants("bcresnet8") == ("default",)


def test_build_model_names_and_errors():
    assert canonical_architecture("resnet") == "resnet18"
    assert canonical_architecture("mobilenet") == "mobilenet_v2"
    assert canonical_architecture("shufflenet") == "shufflenet_v2_x0_5"
    assert canonical_architecture("resnet18") == "resnet18"
    assert type(build_model("mobilenet", 5)).__name__ == "MobileNetV2"
    with pytest.raises(ValueError, match="unknown architecture 'vgg'; choose one of resnet18, mobilenet_v2"):
        build_model("vgg", 12)
    with pytest.raises(ValueError, match="unknown model variant 'tiny'"):
        build_model("resnet", 12, "tiny")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet", 0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fuse_requires_eval_and_preserves_output(architecture):
    model = build_model(architecture, 12, "default")
    with pytest.raises(RuntimeError, match="eval"):
        model.fuse_model()
    shape = SHAPES[0]
    model = _with_batch_norm_statistics(model, shape)
    fused = copy.deepcopy(model)
    fused.fuse_model()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 1, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture, variant", [(a, v) for a, v in MODEL_VARIANTS if a in ONE_WIDTH])
def test_static_quantization_with_qnnpack(architecture, variant):
    from torch.ao import quantization as tq

    shape = SHAPES[0]
    model = _with_batch_norm_statistics(build_model(architecture, 12, variant), shape)
    x = torch.randn(48, 1, *shape) * 3 + 1
    with torch.no_grad():
        reference = model(x)

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with _expected_warnings_filtered():
            quantized = copy.deepcopy(model)
            quantized.fuse_model()
            quantized.qconfig = tq.get_default_qconfig("qnnpack")
            tq.prepare(quantized, inplace=True)
            with torch.no_grad():
                quantized(x)  # calibration
            tq.convert(quantized, inplace=True)
            with torch.no_grad():
                out = quantized(x)
            assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules())
            traced = torch.jit.trace(quantized, x[:2])
            with torch.no_grad():
                torch.testing.assert_close(traced(x), out)
    finally:
        torch.backends.quantized.engine = previous
    assert out.shape == reference.shape
    agreement = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.8, agreement


@pytest.mark.parametrize("architecture", ONE_WIDTH)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_jit_trace_matches_eager(architecture, shape):
    model = _with_batch_norm_statistics(build_model(architecture, 12, "default"), shape)
    with _expected_warnings_filtered():
        traced = torch.jit.trace(model, torch.randn(2, 1, *shape))
    x = torch.randn(5, 1, *shape)  # another batch size than traced with
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("architecture", ONE_WIDTH)
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(architecture):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    shape = SHAPES[1]
    model = _with_batch_norm_statistics(build_model(architecture, 12, "default"), shape)
    buffer = io.BytesIO()
    # dynamo=True works too but takes 5-10 s per model; the TorchScript exporter keeps this fast.
    with _expected_warnings_filtered():
        torch.onnx.export(
            model, (torch.randn(2, 1, *shape),), buffer, dynamo=False, external_data=False,
            input_names=["log_mel"], output_names=["logits"],
            dynamic_axes={"log_mel": {0: "batch"}, "logits": {0: "batch"}},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, *shape)
    (out,) = session.run(None, {"log_mel": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_profile_counts_and_leaves_model_clean():
    model = build_model("shufflenet", 12, "default")
    before = set(dict(model.named_buffers()))
    params, macs_32 = profile_model(model, (1, 1, 40, 32))
    _, macs_101 = profile_model(model, (1, 1, 40, 101))
    _, macs_batch = profile_model(model, (2, 1, 40, 32))
    assert params == sum(p.numel() for p in model.parameters()) > 0
    assert set(dict(model.named_buffers())) == before
    assert not any(hasattr(m, "total_ops") or hasattr(m, "total_params") for m in model.modules())
    assert macs_32 > 0
    # Frames: 3.2x the time steps -> roughly 3x the work (padding and pooling keep it from exact).
    assert 2.5 < macs_101 / macs_32 < 3.6
    assert macs_batch == 2 * macs_32


def test_profile_table_rows_and_format(capsys):
    rows = profile_table(feature_presets=("seed", "fine"), architectures=["mobilenet_v2"], batch=32)
    assert capsys.readouterr().out == ""  # thop's own prints are swallowed
    assert [(r["variant"], r["preset"], r["input"]) for r in rows] == [
        ("default", "librosa", "40x32"), ("default", "fine", "40x101"),
        ("imagenet", "librosa", "40x32"), ("imagenet", "fine", "40x101"),
    ]
    for row in rows:
        assert row["params"] > 0 and row["macs_per_clip"] > 0
        assert row["macs_per_batch"] == 32 * row["macs_per_clip"]
    seed_row = rows[2]
    assert round(seed_row["params"] / 1e6, 2) == 0.06
    text = format_table(rows)
    assert "mobilenet_v2" in text and "40x101" in text and "MACs/batch 32" in text
    assert len(text.splitlines()) == 2 + len(rows)
