"""Import and export checkpoints of the official TSM code (mit-han-lab/temporal-shift-module).

An official checkpoint is a `torch.save`d dict `{'epoch', 'arch', 'state_dict', 'best_prec1', ...}` (or a bare
state dict) whose keys carry the `module.` prefix of `DataParallel`, and whose architecture is only recorded in
the file name, e.g. `TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth`.

Key layouts:
- ResNets: identical to ours once `module.` is stripped (`base_model.layer1.0.conv1.net.weight`, `new_fc.*`).
- MobileNetV2: the official backbone is a flat `nn.Sequential` per block (`features.2.conv.0.net.weight`,
  `conv.1` BN, `conv.3` depthwise, ...) while torchvision nests Conv-BN-ReLU triples (`features.2.conv.0.0.net.weight`,
  `conv.0.1` BN, `conv.1.0` depthwise, ...); the keys are translated both ways.
- Older MobileNet checkpoints and dropout-0 models keep the classifier at `base_model.classifier` /
  `base_model.fc`; it is renamed to `new_fc`.

Official meaning, not ours: the official `test_models.py` builds the network from the file name alone, and some
names mean something else there than in ssv2prep. Rather than run a file as another network than the one it names,
these are refused (import and export) or read the official way:

- `shift1`: the official `TemporalShift` with `n_div=1` moves *all* channels from frame t+1 (its second fold is
  empty), while our `shift_div=1` moves half the channels each way.
- unidirectional models (our `shift_mode="unidirectional"`): the official code has no such mode; an earlier
  ssv2prep wrote them with an `_unidir` token, which `test_models.py` ignores, running them bidirectionally.
- MobileNetV2 with `block` placement: the official code shifts MobileNetV2 at `conv[0]` of each residual block
  whatever the place token says. Here the official meaning is implemented on import (a MobileNetV2 name reads as
  `blockres`), and our `block`-placed MobileNetV2 models are refused on export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.fsutil import atomic_open
from ssv2prep.models.shift import BIDIRECTIONAL, SHIFT_ALL
from ssv2prep.models.tsm import TSM, ModelConfig, build_tsm, load_model_state, strip_wrapper_prefixes

log = logging.getLogger(__name__)

# Class counts of the datasets the official code knows (ops/dataset_config.py).
DATASET_CLASSES: dict[str, int] = {
    "somethingv2": 174,
    "something": 174,
    "kinetics": 400,
    "jester": 27,
    "ucf101": 101,
    "hmdb51": 51,
}

# Official `--arch` token -> our backbone name.
OFFICIAL_ARCHS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenetv2": "mobilenet_v2",
}
_ARCH_OF_BACKBONE = {backbone: arch for arch, backbone in OFFICIAL_ARCHS.items()}

# The token an earlier ssv2prep export appended for unidirectional models; such files are refused now.
UNIDIR_SUFFIX = "unidir"
_DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")

_NAME_RE = re.compile(
    r"^TSM_(?P<dataset>[^_]+)_(?P<modality>[^_]+)_(?P<arch>[^_]+)"
    r"(?:_shift(?P<div>\d+)_(?P<place>blockres|block))?(?P<tpool>_tpool)?"
    r"_(?P<consensus>[^_]+)_segment(?P<segments>\d+)_e(?P<epochs>\d+)(?P<suffixes>(?:_[^_.]+)*)"
    r"\.pth(?:\.tar)?$"
)


def parse_official_name(name: str | os.PathLike[str]) -> dict[str, Any]:
    """Infer model settings from an official checkpoint file name (the official `test_models.py` does the same).

    Args:
        name: a file name or path such as `TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth`.

    Returns:
        A dict with `dataset`, `backbone`, `shift_div` (0 without a `shift` token), `shift_place`, `shift_mode`,
        `num_segments`, `epochs`, `num_classes` (the dataset's class count, None for an unknown dataset) and
        `suffixes` (the trailing tokens, e.g. `["dense"]`).

    Raises:
        CheckpointError: when the name does not follow the pattern, or names a modality, architecture or option
            (temporal pool, non-local) these models do not implement.
    """
    base = Path(name).name
    match = _NAME_RE.match(base)
    if match is None:
        raise CheckpointError(
            f"cannot infer the model from checkpoint name {base!r}: expected "
            "TSM_<dataset>_RGB_<arch>[_shift<div>_<place>]_avg_segment<T>_e<epochs>.pth, or pass cfg_overrides"
        )
    suffixes = [s for s in match["suffixes"].split("_") if s]
    problems = {
        "modality": match["modality"] != "RGB",
        "arch": match["arch"] not in OFFICIAL_ARCHS,
        "consensus": match["consensus"] != "avg",
        "temporal pool": match["tpool"] is not None,
        "non-local": "nl" in suffixes,
    }
    unsupported = [what for what, bad in problems.items() if bad]
    if unsupported:
        raise CheckpointError(
            f"checkpoint {base}: unsupported {', '.join(unsupported)} (RGB, avg, {sorted(OFFICIAL_ARCHS)} only)"
        )
    if UNIDIR_SUFFIX in suffixes:
        raise CheckpointError(
            f"checkpoint {base}: the official code has no unidirectional shift and ignores the '_{UNIDIR_SUFFIX}' "
            "token, so it runs this file as a bidirectional network; evaluate the ssv2prep checkpoint it was "
            "exported from (best.pt / last.pt) instead"
        )
    backbone = OFFICIAL_ARCHS[match["arch"]]
    settings = {
        "dataset": match["dataset"],
        "backbone": backbone,
        "shift_div": int(match["div"] or 0),
        # The official MobileNetV2 ignores the place token and always shifts conv[0]: read the name as it would.
        "shift_place": "blockres" if backbone == "mobilenet_v2" else match["place"] or "blockres",
        "shift_mode": BIDIRECTIONAL,
        "num_segments": int(match["segments"]),
        "epochs": int(match["epochs"]),
        "num_classes": DATASET_CLASSES.get(match["dataset"]),
        "suffixes": suffixes,
    }
    problem = official_meaning_differs(
        settings["backbone"], settings["shift_div"], settings["shift_place"], BIDIRECTIONAL
    )
    if problem:
        raise CheckpointError(f"checkpoint {base}: {problem}; refusing to run a network other than the one it names")
    return settings


def official_meaning_differs(backbone: str, shift_div: int, shift_place: str, shift_mode: str) -> str | None:
    """Why the official code would build another network than ssv2prep for these settings, or None when it would not.

    The official `TemporalShift` with `n_div=1` takes all channels from t+1 (ours: half from t+1, half from t-1),
    it has no unidirectional mode, and for MobileNetV2 it ignores the place (always `conv[0]` of residual blocks).
    """
    if shift_div <= 0:
        return None  # a TSN: no shift to disagree about
    if shift_mode != BIDIRECTIONAL:
        return f"the official code has no {shift_mode} shift (it would run the file as bidirectional)"
    if shift_div == SHIFT_ALL:
        return (
            "'shift1' means all channels from frame t+1 in the official code, while ssv2prep's shift-div 1 moves "
            "half the channels each way"
        )
    if backbone == "mobilenet_v2" and shift_place != "blockres":
        return f"the official MobileNetV2 is always shifted 'blockres' (at conv[0]), not {shift_place!r}"
    return None


def official_name(cfg: ModelConfig, *, dataset: str = "somethingv2", epochs: int = 45) -> str:
    """The official file name for a model: `TSM_<dataset>_RGB_<arch>[_shift<div>_<place>]_avg_segment<T>_e<epochs>.pth`.

    Raises:
        ConfigError: for a dataset name that is not letters, digits and '-' (the official parser splits on `_`, and
            the name must stay a plain file name in the folder it is written to).
        CheckpointError: for a model the official code would run as another network (`official_meaning_differs`).
    """
    if not _DATASET_RE.fullmatch(dataset):
        raise ConfigError(
            f"--dataset {dataset!r}: use letters, digits and '-' only (it becomes one '_'-separated token of the "
            "official file name)"
        )
    problem = official_meaning_differs(cfg.backbone, cfg.shift_div, cfg.shift_place, cfg.shift_mode)
    if problem:
        raise CheckpointError(f"cannot export in the official format: {problem}")
    parts = ["TSM", dataset, "RGB", _ARCH_OF_BACKBONE[cfg.backbone]]
    if cfg.shift_div > 0:
        parts += [f"shift{cfg.shift_div}", cfg.shift_place]
    parts += ["avg", f"segment{cfg.num_segments}", f"e{epochs}"]
    return "_".join(parts) + ".pth"


# --------------------------------------------------------------------------------------------------------------
# Key translation.

# MobileNetV2 block sub-module indices: official flat Sequential index <-> torchvision nested path.
_MBV2_EXPANDED = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_MBV2_FIRST = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # features.1: expand ratio 1, no expansion conv
_MBV2_OFFICIAL_KEY = re.compile(r"^(base_model\.features\.(\d+)\.(?:net\.)?conv\.)(\d+)\.((?:net\.)?.+)$")
_MBV2_OUR_KEY = re.compile(r"^(base_model\.features\.(\d+)\.(?:net\.)?conv\.)(\d+(?:\.\d+)?)\.((?:net\.)?.+)$")
_HEAD_KEYS = re.compile(r"^base_model\.(?:fc|classifier)\.(weight|bias)$")


def _mbv2_table(block: str) -> dict[str, str]:
    return _MBV2_FIRST if block == "1" else _MBV2_EXPANDED


def _mbv2_from_official(key: str) -> str:
    match = _MBV2_OFFICIAL_KEY.match(key)
    if match is None or match[3] not in _mbv2_table(match[2]):
        return key
    return f"{match[1]}{_mbv2_table(match[2])[match[3]]}.{match[4]}"


def _mbv2_to_official(key: str) -> str:
    match = _MBV2_OUR_KEY.match(key)
    inverse = {ours: official for official, ours in _mbv2_table(match[2]).items()} if match else {}
    if match is None or match[3] not in inverse:
        return key
    return f"{match[1]}{inverse[match[3]]}.{match[4]}"


def _identity(key: str) -> str:
    return key


# backbone -> (official key -> our key, our key -> official key)
_KEY_MAPS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "resnet18": (_identity, _identity),
    "resnet34": (_identity, _identity),
    "resnet50": (_identity, _identity),
    "resnet101": (_identity, _identity),
    "mobilenet_v2": (_mbv2_from_official, _mbv2_to_official),
}


def from_official_state(state_dict: Mapping[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Official-layout keys (with or without `module.`) -> our keys; the classifier becomes `new_fc`."""
    from_official = _KEY_MAPS[backbone][0]
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        head = _HEAD_KEYS.match(key)
        # A Linear at base_model.fc/.classifier is the dropout-0 / legacy-MobileNet classifier.
        out[f"new_fc.{head[1]}" if head else from_official(key)] = value
    return out


def to_official_state(model: TSM) -> dict[str, torch.Tensor]:
    """Our state dict -> official keys with the `module.` prefix, tensors on the CPU."""
    to_official = _KEY_MAPS[model.cfg.backbone][1]
    return {f"module.{to_official(k)}": v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# Files.


def unreadable_reason(exc: BaseException) -> str:
    """What a `torch.load(weights_only=True)` failure means, in a few words for a one-line message."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = found[1] if found else "Python objects"
        return f"it holds {what}, which weights-only loading refuses to unpickle (only tensors and plain values)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read it ({exc.strerror})"
    return "corrupt or truncated (not a complete PyTorch checkpoint file)"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"checkpoint {path}: {unreadable_reason(exc)}") from exc
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds neither a state dict nor a dict with 'state_dict'")
    return state


def _settings_for(path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Model settings from the file name, unless the overrides already fix the architecture."""
    required = {"backbone", "shift_div", "shift_place", "num_segments"}
    try:
        parsed = parse_official_name(path.name)
    except CheckpointError:
        if not required <= overrides.keys():
            raise
        parsed = {}
    fields = set(ModelConfig.__dataclass_fields__)
    return {k: v for k, v in parsed.items() if k in fields and v is not None}


def build_for_checkpoint(cfg: ModelConfig) -> TSM:
    """`build_tsm(cfg)` for a model whose weights are loaded next, without logging an init that is replaced."""
    return build_tsm(cfg, announce=False)


def load_official(
    path: str | os.PathLike[str], cfg_overrides: Mapping[str, Any] | None = None
) -> tuple[TSM, ModelConfig]:
    """Build the model an official checkpoint describes and load its weights.

    The file is read first (with `weights_only=True`), so a corrupt or truncated file says so whatever its name.
    Settings come from the file name (`parse_official_name`), `num_classes` from the classifier's shape, then
    `cfg_overrides` (any `ModelConfig` field, e.g. `num_segments` to test with another T, or the architecture
    when the file was renamed) win.

    Args:
        path: the checkpoint file.
        cfg_overrides: `ModelConfig` fields to force.

    Returns:
        `(model, cfg)`, the model in eval mode on the CPU.

    Raises:
        CheckpointError: unreadable file, unparseable name without overrides, a name the official code would run
            as another network than ours (see the module docstring), or keys/shapes that do not fit (one message
            listing the first missing and unexpected keys with their counts).
        ConfigError: for invalid overrides.
    """
    path = Path(path)
    overrides = dict(cfg_overrides or {})
    unknown = overrides.keys() - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown model settings {sorted(unknown)} in cfg_overrides for {path.name}")
    raw = _read_state_dict(path)
    settings = _settings_for(path, overrides)
    state = from_official_state(raw, overrides.get("backbone", settings.get("backbone", "resnet50")))
    if "new_fc.weight" in state:
        settings["num_classes"] = int(state["new_fc.weight"].shape[0])
    cfg = ModelConfig(**{**settings, **overrides, "weights": None}).validate()
    model = build_for_checkpoint(cfg)
    load_model_state(model, state, source=path)
    log.info(
        "loaded official checkpoint %s: %s, %d classes, %d frames, shift %s",
        path,
        cfg.backbone,
        cfg.num_classes,
        cfg.num_segments,
        f"1/{cfg.shift_div} {cfg.shift_place}" if cfg.shift_div else "none (TSN)",
    )
    return model.eval(), cfg


def export_official(
    model: TSM,
    directory: str | os.PathLike[str],
    *,
    dataset: str = "somethingv2",
    epochs: int = 45,
    best_prec1: float = 0.0,
) -> Path:
    """Write `model` as an official checkpoint, atomically, under its official file name in `directory`.

    The file holds `{'epoch': epochs, 'arch': <official arch>, 'state_dict': <module.-prefixed official keys>,
    'best_prec1': best_prec1}` and loads both with `load_official` and with the official `test_models.py`.

    Returns:
        The path written (`directory / official_name(model.cfg, dataset=dataset, epochs=epochs)`).

    Raises:
        ConfigError: a bad dataset name, or a folder that cannot be written (nothing is left behind).
        CheckpointError: a model the official code would run as another network (`official_meaning_differs`).
    """
    path = Path(directory) / official_name(model.cfg, dataset=dataset, epochs=epochs)
    expected = DATASET_CLASSES.get(dataset)
    if expected != model.cfg.num_classes:
        log.warning(
            "the official test_models.py builds %s classes for dataset %r and this model has %d: it will not load "
            "%s (ssv2prep will)",
            expected if expected is not None else "no model (an unknown dataset name)",
            dataset,
            model.cfg.num_classes,
            path.name,
        )
    payload = {
        "epoch": int(epochs),
        "arch": _ARCH_OF_BACKBONE[model.cfg.backbone],
        "state_dict": to_official_state(model),
        "best_prec1": float(best_prec1),
    }
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        with atomic_open(path, "wb") as fh:
            torch.save(payload, fh)
    except OSError as exc:
        for folder in created:  # leave nothing behind: the folders this call made, deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    log.info("exported %s", path)
    return path
