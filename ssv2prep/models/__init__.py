"""TSM models: the temporal shift, the torchvision-based builder, official checkpoints and online inference."""

from ssv2prep.models.official import export_official, load_official, official_name, parse_official_name
from ssv2prep.models.online import OnlineTSM
from ssv2prep.models.shift import TemporalShift, temporal_shift, temporal_shift_zeros_copy
from ssv2prep.models.tsm import TSM, ModelConfig, build_tsm, param_groups

__all__ = [
    "TSM",
    "ModelConfig",
    "OnlineTSM",
    "TemporalShift",
    "build_tsm",
    "export_official",
    "load_official",
    "official_name",
    "param_groups",
    "parse_official_name",
    "temporal_shift",
    "temporal_shift_zeros_copy",
]
