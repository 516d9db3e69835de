"""Torch-free keyword-spotting runtime: features, audio loading, model bundles, prediction,
streaming detection."""

from .audio import AUDIO_EXTENSIONS, AudioError, fit_length, load_audio, read_audio
from .bundle import Artifact, Bundle, BundleError, file_sha256, load_bundle, write_manifest
from .features import analysis_window, log_mel, mel_filterbank
from .predict import Prediction, Predictor
from .spec import FeatureSpec, SpecError
from .stream import Detector, DetectorConfig, Event

__all__ = [
    "AUDIO_EXTENSIONS",
    "Artifact",
    "AudioError",
    "Bundle",
    "BundleError",
    "Detector",
    "DetectorConfig",
    "Event",
    "FeatureSpec",
    "Prediction",
    "Predictor",
    "SpecError",
    "analysis_window",
    "file_sha256",
    "fit_length",
    "load_audio",
    "load_bundle",
    "log_mel",
    "mel_filterbank",
    "read_audio",
    "write_manifest",
]
