"""Torch-free keyword-spotting runtime: features, audio loading, model bundles, prediction."""

from .audio import AUDIO_EXTENSIONS, AudioError, fit_length, load_audio, read_audio
from .features import analysis_window, log_mel, mel_filterbank
from .spec import FeatureSpec, SpecError

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "FeatureSpec",
    "SpecError",
    "analysis_window",
    "fit_length",
    "load_audio",
    "log_mel",
    "mel_filterbank",
    "read_audio",
]
