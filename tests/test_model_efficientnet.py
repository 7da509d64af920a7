"""The ImageNet image encoder that installs offline: EfficientNet-Lite0 from its PyPI wheel, as image tokens."""
import pytest
import torch

from codis_lib.config import VisionConfig
from codis_lib.model.efficientnet import (EfficientNetTokens, build_efficientnet_lite0, load_efficientnet_lite0,
                                          read_efficientnet_lite0)

MILITARY_UNIFORM = 652  # ImageNet class index


def _photo(size: int) -> torch.Tensor:
    """Matplotlib's bundled photograph of Grace Hopper, resized, in Lite0's input range (mean = std = 0.5)."""
    import matplotlib.cbook
    import numpy as np
    from PIL import Image

    image = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((size, size))
    pixels = torch.tensor(np.asarray(image) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    return (pixels - 0.5) / 0.5


def test_the_packaged_weights_still_classify_a_real_photo():
    network = build_efficientnet_lite0().eval()
    network.load_state_dict(read_efficientnet_lite0())
    with torch.no_grad():
        probabilities = network(_photo(224)).softmax(-1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities[MILITARY_UNIFORM] > 0.3
    random_network = build_efficientnet_lite0().eval()  # the same photo means nothing to random weights
    with torch.no_grad():
        assert random_network(_photo(224)).softmax(-1)[0].max() < 0.05


def _tokens(**settings) -> EfficientNetTokens:
    return EfficientNetTokens(VisionConfig(image_size=64, width=128, backbone="efficientnet_lite0", **settings))


def test_image_tokens_have_the_vit_shape_and_load_strictly():
    encoder = _tokens()
    report = load_efficientnet_lite0(encoder)
    trunk_keys = {k for k in encoder.state_dict() if k.split(".")[0] in ("conv_stem", "bn1", "blocks")}
    assert set(report.loaded) == trunk_keys
    assert set(report.fresh) == {k for k in encoder.state_dict() if k not in trunk_keys}
    assert any(k.startswith("classifier.") for k in report.dropped)
    tokens = encoder(torch.randn(3, 3, 64, 64))
    assert tokens.shape == (3, 1 + 4 * 4, 128)  # the stride-16 map of a 64-px image: 16 tokens + CLS
    big = _tokens(backbone_size=128)(torch.randn(2, 3, 64, 64))
    assert big.shape == (2, 1 + 8 * 8, 128)


def test_a_fixed_trunk_trains_nothing_keeps_imagenet_statistics_and_caches_exactly():
    encoder = _tokens(freeze_blocks=5)
    load_efficientnet_lite0(encoder)
    encoder.train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    trainable = {name.split(".")[0] for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"cls_proj", "token_proj", "pos_embed", "norm"}
    images = torch.randn(4, 3, 64, 64)
    first = encoder(images)
    assert len(encoder._trunk_cache) == 4
    maps = encoder._cached_trunk(images)
    torch.testing.assert_close(encoder._cached_trunk(images[[2, 0]]), maps[[2, 0]], rtol=0, atol=0)  # from the cache
    assert len(encoder._trunk_cache) == 4
    # the projections after the map are not batch-invariant to the last bit on CPU, hence a tolerance here
    torch.testing.assert_close(encoder(images[[2, 0]]), first[[2, 0]], rtol=0, atol=1e-5)
    encoder.cache_trunk = False
    torch.testing.assert_close(encoder(images), first, rtol=0, atol=0)
    first.sum().backward()
    assert encoder.token_proj.weight.grad is not None


def test_a_damaged_weights_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "lite0.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(bad)):
        read_efficientnet_lite0(bad)
    torch.save({"conv_stem.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="EfficientNet-Lite0 state dict"):
        read_efficientnet_lite0(bad)


def test_codis_with_the_imagenet_tower_starts_its_teacher_equal_and_verified():
    from codis_lib import build_model
    from codis_lib.config import ModelConfig
    from codis_lib.model.verify import verify_pretrained

    config = ModelConfig.preset("tiny").with_overrides({"vision.backbone": "efficientnet_lite0",
                                                        "vision.pretrained": "imagenet", "vision.freeze_blocks": 5})
    model = build_model(config)
    assert verify_pretrained(model, config) > 0  # student and teacher hold the wheel's tensors, buffers included
    for (name, a), (_, b) in zip(model.visual_encoder.state_dict().items(),
                                 model.visual_encoder_m.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_packaged_file_is_checked_by_its_sha256_and_a_changed_copy_is_not_trusted(tmp_path, capsys):
    from codis_lib.data.check import file_sha256
    from codis_lib.model.efficientnet import LITE0_SHA256, efficientnet_lite0_weights_path

    packaged = efficientnet_lite0_weights_path()
    assert file_sha256(packaged) == LITE0_SHA256 and packaged.name.split("-")[-1][:8] == LITE0_SHA256[:8]
    read_efficientnet_lite0()
    assert "warning" not in capsys.readouterr().err  # verified by its digest: nothing to warn about
    copy = tmp_path / "lite0.pth"
    data = bytearray(packaged.read_bytes())
    data[-100] ^= 0x01  # one bit of a tensor
    copy.write_bytes(bytes(data))
    read_efficientnet_lite0(copy)  # no CRCs to check in this legacy format: loaded, with one warning line
    assert "carries no CRC-32 checksums" in capsys.readouterr().err


def test_the_last_stage_gives_a_stride_32_map_and_a_bad_stage_count_is_one_line():
    encoder = _tokens(trunk_stages=7, backbone_size=128)
    report = load_efficientnet_lite0(encoder)
    assert any(key.startswith("blocks.6.") for key in report.loaded)  # ImageNet's last stage is loaded, not fresh
    assert encoder.blocks[-1][-1].conv_pwl.out_channels == 320 and encoder.grid_size == (4, 4)
    assert encoder(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 4 * 4, 128)  # 128 px / 32: 16 tokens + CLS
    assert _tokens().grid_size == (4, 4) and _tokens(trunk_stages=6).stride == 32
    for bad in (0, 8):
        with pytest.raises(ValueError, match=r"^model\.vision\.trunk_stages must be 1\.\.7 .*got " + str(bad) + "$"):
            _tokens(trunk_stages=bad)


def test_the_teacher_reads_the_students_maps_and_the_disk_store_serves_a_later_process(tmp_path, monkeypatch):
    from codis_lib.config import ModelConfig
    from codis_lib.model import build_model
    from codis_lib.model.trunk_store import TRUNK_CACHE_ENV, TrunkStore, trunk_digest

    monkeypatch.setenv(TRUNK_CACHE_ENV, str(tmp_path / "store"))
    assert not any(m.training for m in _tokens().modules() if isinstance(m, torch.nn.BatchNorm2d))  # from the start
    config = ModelConfig.preset("tiny").with_overrides({"vision.backbone": "efficientnet_lite0", "vision.freeze_blocks": 5})
    model = build_model(config)
    student, teacher = model.visual_encoder, model.visual_encoder_m
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        teacher.forward_features(images)  # the teacher asks first: the maps land in the student's cache
    assert len(student._trunk_cache) == 3 and len(teacher._trunk_cache) == 0
    student._trunk_store.flush()
    digest = trunk_digest([student.conv_stem, student.bn1, student.blocks], student.backbone_size, 5)
    stored = TrunkStore(tmp_path / "store", digest).load()
    assert set(stored) == set(student._trunk_cache)
    for key, value in student._trunk_cache.items():
        torch.testing.assert_close(stored[key], value, rtol=0, atol=0)
    # a later process with the same trunk reads them instead of computing
    later = _tokens(freeze_blocks=5)
    later.load_state_dict(student.state_dict())
    later.trunk = None  # computing anything would fail
    torch.testing.assert_close(later._cached_trunk(images), student._cached_trunk(images), rtol=0, atol=0)
    # another trunk (other weights) has another digest: it never reads these maps
    other = _tokens(freeze_blocks=5)
    assert trunk_digest([other.conv_stem, other.bn1, other.blocks], other.backbone_size, 5) != digest
    # a damaged chunk is skipped with one warning naming it; the readable ones still load
    damaged = next((tmp_path / "store" / digest).glob("chunk-*.pt"))
    (damaged.parent / "chunk-0-bad.pt").write_bytes(b"not a chunk")
    assert len(TrunkStore(tmp_path / "store", digest).load()) == 3
