"""TSM models on torchvision backbones: configuration, builder, forward contract and optimizer policies.

The module tree matches the official TSM code so that checkpoints interchange: the backbone is `base_model`
(a torchvision model whose own classifier is replaced by dropout), the classifier is `new_fc`, and shifted
layers are `TemporalShift` wrappers whose wrapped layer is `.net` (`base_model.layer1.0.conv1.net.weight`).

One deliberate difference: the official code puts the Linear at `base_model.fc` when `dropout == 0`. Here the
classifier is *always* `new_fc` (with `dropout == 0` the backbone head is an `nn.Identity`), and
`ssv2prep.models.official` renames `base_model.fc.*` / `base_model.classifier.*` to `new_fc.*` on import, so
official dropout-0 checkpoints still load, and exported checkpoints load in the official code (which builds
its models with dropout > 0).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.models.shift import BIDIRECTIONAL, SHIFT_MODES, TemporalShift

log = logging.getLogger(__name__)

SHIFT_PLACES = ("blockres", "block")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything needed to build a TSM model (see `build_tsm`).

    Attributes:
        backbone: a key of `BACKBONES` (resnet18/34/50/101, mobilenet_v2).
        num_classes: K, the number of output logits.
        num_segments: T, the number of frames per clip the shift is built for.
        shift_div: 1/shift_div of the channels moves each way; 0 = no shift (TSN); 1 = all channels (naive shift).
        shift_mode: "bidirectional" (official) or "unidirectional" (past -> present only, streamable).
        shift_place: "blockres" (inside the residual branch, before its first conv) or "block" (before the block).
        dropout: dropout probability before `new_fc`, in [0, 1).
        weights: None (random init), "imagenet" (torchvision's default ImageNet weights for the backbone), the
            name of a torchvision weights entry (e.g. "IMAGENET1K_V1"), or the path of a local state-dict file
            of the plain torchvision backbone. Only the first option never touches the network.
        partial_bn: freeze every BatchNorm but the first (eval mode, no gradients), as the official `partialBN`.
    """

    backbone: str = "resnet50"
    num_classes: int = 174
    num_segments: int = 8
    shift_div: int = 8
    shift_mode: str = BIDIRECTIONAL
    shift_place: str = "blockres"
    dropout: float = 0.5
    weights: str | None = None
    partial_bn: bool = False

    def validate(self) -> ModelConfig:
        """Check every field; return self so calls chain.

        Raises:
            ConfigError: naming the field, the bad value and what is allowed.
        """
        _check_choice("backbone", self.backbone, sorted(BACKBONES))
        _check_choice("shift_mode", self.shift_mode, sorted(SHIFT_MODES))
        _check_choice("shift_place", self.shift_place, list(SHIFT_PLACES))
        _check_int("num_classes", self.num_classes, minimum=1)
        _check_int("num_segments", self.num_segments, minimum=1)
        _check_int("shift_div", self.shift_div, minimum=0)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ConfigError(
                f"model.weights must be null, 'imagenet', a weights name or a file path, got {self.weights!r}"
            )
        if not isinstance(self.partial_bn, bool):
            raise ConfigError(f"model.partial_bn must be true or false, got {self.partial_bn!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def _check_choice(field: str, value: object, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"model.{field} must be one of {allowed}, got {value!r}")


def _check_int(field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{field} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Shift insertion, per backbone family and place.


def _shift(net: nn.Module, cfg: ModelConfig) -> TemporalShift:
    return TemporalShift(net, cfg.num_segments, cfg.shift_div, cfg.shift_mode)


def _resnet_stages(base: nn.Module) -> list[nn.Sequential]:
    return [base.layer1, base.layer2, base.layer3, base.layer4]


def _shift_resnet_blockres(base: nn.Module, cfg: ModelConfig) -> int:
    # ResNet-101/152 shift every other block, as the official code (and its released checkpoints) do.
    n_round = 2 if len(base.layer3) >= 23 else 1
    count = 0
    for stage in _resnet_stages(base):
        for i, block in enumerate(stage):
            if i % n_round == 0:
                block.conv1 = _shift(block.conv1, cfg)
                count += 1
    return count


def _shift_resnet_block(base: nn.Module, cfg: ModelConfig) -> int:
    # The official "block" placement wraps every block, whatever the depth (no n_round there).
    count = 0
    for stage in _resnet_stages(base):
        for i, block in enumerate(stage):
            stage[i] = _shift(block, cfg)
            count += 1
    return count


def _mobilenet_residual_blocks(base: nn.Module) -> list[int]:
    """Indices in `features` of the inverted-residual blocks with an identity connection (the ones shifted)."""
    return [
        i
        for i, m in enumerate(base.features)
        if isinstance(m, InvertedResidual) and m.use_res_connect and len(m.conv) == 4
    ]


def _shift_mobilenet_blockres(base: nn.Module, cfg: ModelConfig) -> int:
    # conv[0] is the expansion Conv2dNormActivation; the shift goes on its Conv2d, the official `conv[0]`.
    blocks = _mobilenet_residual_blocks(base)
    for i in blocks:
        expand = base.features[i].conv[0]
        expand[0] = _shift(expand[0], cfg)
    return len(blocks)


def _shift_mobilenet_block(base: nn.Module, cfg: ModelConfig) -> int:
    blocks = _mobilenet_residual_blocks(base)
    for i in blocks:
        base.features[i] = _shift(base.features[i], cfg)
    return len(blocks)


@dataclass(frozen=True, slots=True)
class _Backbone:
    """How to turn one torchvision architecture into a TSM backbone."""

    head: str  # attribute of the torchvision model holding its classifier
    feature_dim: Callable[[nn.Module], int]
    add_shift: Mapping[str, Callable[[nn.Module, ModelConfig], int]]  # shift_place -> inserter, returns count


_RESNET = _Backbone(
    head="fc",
    feature_dim=lambda m: m.fc.in_features,
    add_shift={"blockres": _shift_resnet_blockres, "block": _shift_resnet_block},
)
_MOBILENET = _Backbone(
    head="classifier",
    feature_dim=lambda m: m.last_channel,
    add_shift={"blockres": _shift_mobilenet_blockres, "block": _shift_mobilenet_block},
)

# Backbone name (torchvision model name) -> family description.
BACKBONES: dict[str, _Backbone] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "resnet50": _RESNET,
    "resnet101": _RESNET,
    "mobilenet_v2": _MOBILENET,
}


# --------------------------------------------------------------------------------------------------------------
# The model.


class TSM(nn.Module):
    """A TSN/TSM video classifier: per-frame backbone, dropout, `new_fc`, logits averaged over the T frames.

    Attributes:
        cfg: the (validated) configuration it was built from.
        base_model: the torchvision backbone, shifted, with its classifier replaced by dropout (or identity).
        new_fc: `nn.Linear(feature_dim, num_classes)`, initialised normal(0, 0.001) / zero bias.
    """

    def __init__(self, cfg: ModelConfig, base_model: nn.Module, feature_dim: int) -> None:
        """Use `build_tsm`; this only assembles a prepared backbone and a new classifier."""
        super().__init__()
        self.cfg = cfg
        self.base_model = base_model  # registered first, so its keys come before new_fc's, as in the official
        self.new_fc = nn.Linear(feature_dim, cfg.num_classes)
        nn.init.normal_(self.new_fc.weight, 0.0, 0.001)
        nn.init.zeros_(self.new_fc.bias)
        if cfg.partial_bn:
            self._freeze_partial_bn()

    @property
    def num_segments(self) -> int:
        """T, the number of frames per clip."""
        return self.cfg.num_segments

    @property
    def has_shift(self) -> bool:
        """True unless this is a TSN (shift_div 0)."""
        return self.cfg.shift_div > 0

    def frames(self, clips: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Flatten clips to frames: `(N, T, 3, H, W)` or `(N, 3T, H, W)` -> `((N*T, 3, H, W), N, T)`.

        The `(N, 3T, H, W)` layout is the official one: channels `[f0R, f0G, f0B, f1R, ...]`, frame-major.

        Raises:
            ValueError: for another rank, a channel count that is not a multiple of 3, or (with a shift) a T
                different from `num_segments`.
        """
        if clips.dim() == 5 and clips.shape[2] == 3:
            n, t = clips.shape[:2]
        elif clips.dim() == 4 and clips.shape[1] % 3 == 0:
            n, t = clips.shape[0], clips.shape[1] // 3
        else:
            raise ValueError(f"TSM expects (N, T, 3, H, W) or (N, 3T, H, W) input, got shape {tuple(clips.shape)}")
        if self.has_shift and t != self.num_segments:
            raise ValueError(f"TSM built for T={self.num_segments} frames got clips of {t} frames")
        return clips.reshape(n * t, 3, *clips.shape[-2:]), n, t

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N, T, 3, H, W)` or `(N, 3T, H, W)` float clips -> `(N, num_classes)` logits averaged over T."""
        frames, n, t = self.frames(clips)
        logits = self.new_fc(self.base_model(frames))
        return logits.view(n, t, -1).mean(dim=1)

    def train(self, mode: bool = True) -> TSM:
        """Set train/eval mode; with `partial_bn`, every BatchNorm but the first stays in eval mode."""
        super().train(mode)
        if self.cfg.partial_bn and mode:
            self._freeze_partial_bn()
        return self

    def _freeze_partial_bn(self) -> None:
        for bn in _batch_norms(self)[1:]:
            bn.eval()
            for p in bn.parameters():
                p.requires_grad_(False)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d)]


# --------------------------------------------------------------------------------------------------------------
# Building.


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop leading `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes from every key."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        stripped = key
        while stripped.startswith(WRAPPER_PREFIXES):
            stripped = stripped.split(".", 1)[1]
        out[stripped] = value
    return out


def _torchvision_weights(backbone: str, weights: str) -> torchvision.models.WeightsEnum | None:
    """The torchvision weights entry `weights` names for `backbone`, or None when it is not a weights name."""
    entries = torchvision.models.get_model_weights(backbone)
    if weights == "imagenet":
        return entries.DEFAULT
    return entries.__members__.get(weights)


def _load_local_backbone(base: nn.Module, path: str, head: str) -> None:
    """Load a plain torchvision state dict (optionally under 'state_dict' / wrapped) into `base`, head excluded."""
    if not os.path.isfile(path):
        raise CheckpointError(f"backbone weights {path!r} are neither a torchvision weights name nor an existing file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    state = {k: v for k, v in strip_wrapper_prefixes(loaded).items() if not k.startswith(f"{head}.")}
    expected = {k for k in base.state_dict() if not k.startswith(f"{head}.")}
    missing = [k for k in base.state_dict() if k not in state and not k.startswith(f"{head}.")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"backbone weights {path} do not fit: " + describe_key_mismatch(missing, unexpected))
    base.load_state_dict(state, strict=False)


def describe_key_mismatch(missing: list[str], unexpected: list[str], *, limit: int = 10) -> str:
    """One line listing the first `limit` missing and unexpected keys with their counts."""
    return (
        f"{len(missing)} missing keys {missing[:limit]}{' ...' if len(missing) > limit else ''}; "
        f"{len(unexpected)} unexpected keys {unexpected[:limit]}{' ...' if len(unexpected) > limit else ''}"
    )


def _build_backbone(cfg: ModelConfig, *, announce: bool) -> nn.Module:
    spec = BACKBONES[cfg.backbone]
    tv_weights = _torchvision_weights(cfg.backbone, cfg.weights) if cfg.weights else None
    base = torchvision.models.get_model(cfg.backbone, weights=tv_weights)
    if cfg.weights and tv_weights is None:
        _load_local_backbone(base, cfg.weights, spec.head)
    if announce:
        log.info("built %s backbone (weights: %s)", cfg.backbone, cfg.weights or "random init")
    return base


def build_tsm(cfg: ModelConfig, *, announce: bool = True) -> TSM:
    """Build the TSM model `cfg` describes.

    Order, as the official code: backbone (with weights) -> shifts -> head replaced by dropout -> `new_fc`.

    Args:
        cfg: the model configuration; validated here.
        announce: log the backbone's init and the shifts inserted (off for a model whose weights a checkpoint
            replaces next: its loader says what was loaded instead).

    Returns:
        A `TSM` in train mode whose state-dict keys are `base_model.*` then `new_fc.*`.

    Raises:
        ConfigError: for an invalid configuration.
        CheckpointError: when a local backbone weights file cannot be read or does not fit.
    """
    cfg.validate()
    spec = BACKBONES[cfg.backbone]
    base = _build_backbone(cfg, announce=announce)
    feature_dim = spec.feature_dim(base)
    if cfg.shift_div > 0:
        count = spec.add_shift[cfg.shift_place](base, cfg)
        if announce:
            log.info("inserted %d %s %s temporal shifts (1/%d)", count, cfg.shift_mode, cfg.shift_place, cfg.shift_div)
    setattr(base, spec.head, nn.Dropout(p=cfg.dropout) if cfg.dropout > 0 else nn.Identity())
    return TSM(cfg, base, feature_dim)


# --------------------------------------------------------------------------------------------------------------
# Optimizer policies.

# name -> (lr_mult, decay_mult), in the official order.
_POLICIES: dict[str, tuple[float, float]] = {
    "first_conv_weight": (1.0, 1.0),
    "first_conv_bias": (2.0, 0.0),
    "normal_weight": (1.0, 1.0),
    "normal_bias": (2.0, 0.0),
    "bn": (1.0, 0.0),
    "lr5_weight": (5.0, 1.0),
    "lr10_bias": (10.0, 0.0),
}


def _policy_of_params(
    module: nn.Module, *, is_first_conv: bool, fc_lr5: bool, bn_trainable: bool
) -> list[tuple[str, nn.Parameter]]:
    """The (policy, parameter) pairs of one leaf module; raises for a parametrised type it does not know."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        names = ("first_conv_weight", "first_conv_bias") if is_first_conv else ("normal_weight", "normal_bias")
    elif isinstance(module, nn.Linear):
        names = ("lr5_weight", "lr10_bias") if fc_lr5 else ("normal_weight", "normal_bias")
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        names = ("bn", "bn") if bn_trainable else ("", "")
    elif not list(module.parameters(recurse=False)):
        return []
    else:
        raise ConfigError(f"param_groups: no optimizer policy for parametrised module type {type(module).__name__}")
    pairs = [(names[0], weight), (names[1], bias)]
    return [(name, p) for name, p in pairs if name and isinstance(p, nn.Parameter)]


def param_groups(model: TSM, *, lr: float, weight_decay: float, fc_lr5: bool) -> list[dict[str, Any]]:
    """Optimizer parameter groups following the official TSM policies.

    No weight decay on biases and BatchNorm; biases get 2x lr; with `fc_lr5` the `new_fc` weight gets 5x lr and
    its bias 10x (the official setting when fine-tuning from ImageNet), otherwise `new_fc` is a normal layer.
    With `partial_bn`, only the first BatchNorm's parameters are included (the others are frozen).

    Args:
        model: a TSM model (unwrapped, not DDP).
        lr: base learning rate.
        weight_decay: base weight decay.
        fc_lr5: give `new_fc` the 5x / 10x learning rates.

    Returns:
        Non-empty groups, in the official order, each a dict with `params`, `name`, `lr_mult`, `decay_mult`,
        `lr` (= lr * lr_mult) and `weight_decay` (= weight_decay * decay_mult), ready for `torch.optim.SGD`.

    Raises:
        ConfigError: when the model holds a parametrised module type without a policy.
    """
    grouped: dict[str, list[nn.Parameter]] = {name: [] for name in _POLICIES}
    convs = bns = 0
    for module in model.modules():
        is_conv = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        convs += is_conv
        bns += isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
        pairs = _policy_of_params(
            module,
            is_first_conv=is_conv and convs == 1,
            fc_lr5=fc_lr5,
            bn_trainable=not model.cfg.partial_bn or bns == 1,
        )
        for name, param in pairs:
            grouped[name].append(param)
    return [
        {
            "name": name,
            "params": params,
            "lr_mult": _POLICIES[name][0],
            "decay_mult": _POLICIES[name][1],
            "lr": lr * _POLICIES[name][0],
            "weight_decay": weight_decay * _POLICIES[name][1],
        }
        for name, params in grouped.items()
        if params
    ]


def load_model_state(model: TSM, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
    """Load a TSM state dict strictly (wrapper prefixes stripped), with one clear error on mismatch.

    Old checkpoints without BatchNorm `num_batches_tracked` entries are accepted, as in the official loader.

    Raises:
        CheckpointError: listing the first missing and unexpected keys (and shape mismatches) with counts.
    """
    state = strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    # in model / checkpoint order, which reads like the architecture
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit {model.cfg.backbone}: " + describe_key_mismatch(missing, unexpected)
        )
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad_shapes:
        raise CheckpointError(f"checkpoint {source}: {len(bad_shapes)} shape mismatches, e.g. {bad_shapes[:10]}")
    model.load_state_dict(state, strict=False)
