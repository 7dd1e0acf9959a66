"""Each metric against an independent computation written here (transformers called directly, numpy,
torchmetrics' functions), masked and unmasked; the RLE decoder against a hand-made mask."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_models import block_network, save_tiny_clip, save_tiny_vit

from fpedit.eval.masks import decode_rle, resize_mask
from fpedit.eval.metrics import Scorer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("metric-models") / "clip")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("metric-models") / "vit")


def pair(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    edited = np.clip(source.astype(int) + rng.integers(-60, 60, source.shape), 0, 255).astype(np.uint8)
    return source, edited


def box_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[8:40, 16:50] = 1
    return mask


@pytest.fixture(scope="module")
def scorer(clip_dir, vit_dir):
    return Scorer(clip=clip_dir, dino=vit_dir)


def test_rle_decoder_matches_a_hand_made_mask():
    # 8x8 grid: run (10, 3) covers 10..12, run (60, 10) is clipped at 63; the border is forced to 1.
    expected = np.zeros((8, 8), np.uint8)
    expected.flat[[10, 11, 12, 60, 61, 62, 63]] = 1
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1
    np.testing.assert_array_equal(decode_rle([10, 3, 60, 10], size=8), expected)
    inner = np.zeros((4, 4), np.uint8)
    inner[1:3, 1:3] = 1
    np.testing.assert_array_equal(resize_mask(inner, (8, 8)), np.kron(inner, np.ones((2, 2), np.uint8)))


@pytest.mark.parametrize("masked", [False, True])
def test_pixel_metrics_match_numpy_and_torchmetrics(masked):
    from torchmetrics.functional.image import structural_similarity_index_measure

    source, edited = pair()
    mask = box_mask() if masked else None
    got = Scorer().score(source, edited, "a", "b", mask)
    keep = np.ones((64, 64), np.float32) if mask is None else (1 - mask).astype(np.float32)
    a = source.astype(np.float64) / 255 * keep[:, :, None]
    b = edited.astype(np.float64) / 255 * keep[:, :, None]
    mse = np.mean((a - b) ** 2)
    suffix = "_unedit_part" if masked else ""
    assert got["mse" + suffix] == pytest.approx(mse, rel=1e-5)
    assert got["psnr" + suffix] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-5)
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float()
    ssim = float(structural_similarity_index_measure(ta, tb, data_range=1.0))
    assert got["ssim" + suffix] == pytest.approx(ssim, abs=1e-5)
    if masked:  # the masked metric really ignores the edited region
        assert got["mse_unedit_part"] != pytest.approx(np.mean((source / 255 - edited / 255) ** 2), rel=1e-3)


def reference_clip(folder, images, texts):
    """CLIP embeddings with transformers' towers and projections called directly."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("masked", [False, True])
def test_clip_metrics_match_transformers(scorer, clip_dir, masked, monkeypatch):
    block_network(monkeypatch)
    source, edited = pair(1)
    mask = box_mask() if masked else None
    got = scorer.score(source, edited, "a cat", "a horse in the park", mask)
    images = [source, edited] + ([edited * mask[:, :, None]] if masked else [])
    image, text = reference_clip(clip_dir, images, ["a cat", "a horse in the park"])
    cs = lambda i, t: max(100 * float(image[i] @ text[t]), 0.0)  # noqa: E731
    assert got["clip_similarity_source_image"] == pytest.approx(cs(0, 0), abs=1e-4)
    assert got["clip_similarity_target_image"] == pytest.approx(cs(1, 1), abs=1e-4)
    assert max(cs(0, 0), cs(1, 1)) > 0  # not both clamped to zero: the comparison means something
    direction_i, direction_t = image[1] - image[0], text[1] - text[0]
    cds = float(direction_i @ direction_t / (direction_i.norm() * direction_t.norm()))
    assert got["clip_directional_similarity"] == pytest.approx(cds, abs=1e-5)
    if masked:
        assert got["clip_similarity_target_image_edit_part"] == pytest.approx(cs(2, 1), abs=1e-4)
        assert not torch.allclose(image[2], image[1], atol=1e-3)  # the mask changed what CLIP saw
    else:
        assert "clip_similarity_target_image_edit_part" not in got
        # A negative cosine is clamped to 0, as torchmetrics' CLIPScore does.
        _, negative = reference_clip(clip_dir, [edited], ["a photo of a dog"])
        assert float(image[1] @ negative[0]) < 0
        assert scorer.score(source, edited, "a", "a photo of a dog")["clip_similarity_target_image"] == 0.0


def test_structure_distance_matches_vit_keys(scorer, vit_dir, monkeypatch):
    from transformers import ViTModel

    block_network(monkeypatch)
    source, edited = pair(2)
    got = scorer.score(source, edited, "a", "b")["structure_distance"]
    model = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False).eval()
    blocks = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1].isdigit() and "layer" in name]
    last = blocks[-1]
    key_proj = getattr(last.attention, "k_proj", None) or last.attention.attention.key
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def self_similarity(image):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            hidden = model(pixel_values=(x - mean) / std, output_hidden_states=True).hidden_states[-2]
            keys = key_proj(last.layernorm_before(hidden))[0]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        return unit @ unit.T

    expected = float(torch.mean((self_similarity(source) - self_similarity(edited)) ** 2))
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-4)


def test_missing_models_are_left_out_with_the_flag_that_enables_them():
    scorer = Scorer()
    got = scorer.score(*pair(), "a", "b", box_mask())
    assert set(got) == {"psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"}
    lines = "\n".join(scorer.messages())
    assert "--clip DIR" in lines and "clip_directional_similarity" in lines
    assert "--dino DIR" in lines and "structure_distance" in lines
    assert "--lpips-weights" in lines


def test_mask_covering_everything_gives_nan_background():
    source, edited = pair()
    got = Scorer().score(source, edited, "a", "b", np.ones((64, 64), np.uint8))
    assert all(math.isnan(v) for v in got.values())


def test_lpips_without_a_working_torchvision_is_reported_not_fatal(tmp_path):
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision loads here: the unavailable path is not reachable")
    except Exception:
        pass
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, weights)
    scorer = Scorer(lpips_weights=weights)
    assert "torchvision" in scorer.unavailable["lpips_unedit_part"]
    assert "mse_unedit_part" in scorer.score(*pair(), "a", "b", box_mask())


def fake_squeezenet_features(seed: int = 5) -> torch.nn.Sequential:
    """13 layers whose slices have SqueezeNet 1.1's channel counts (64, 128, 256, 384, 384, 512, 512)."""
    nn = torch.nn
    torch.manual_seed(seed)
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(), nn.Conv2d(64, 128, 1), nn.ReLU(), pool(),
        nn.Conv2d(128, 256, 1), nn.ReLU(), pool(), nn.Conv2d(256, 384, 1), nn.Conv2d(384, 384, 1),
        nn.Conv2d(384, 512, 1), nn.Conv2d(512, 512, 1),
    )  # fmt: skip


@pytest.mark.parametrize("masked", [False, True])
def test_lpips_loads_the_backbone_file_and_matches_torchmetrics(tmp_path, monkeypatch, masked):
    """Where torchvision does not load, a stand-in module provides the SqueezeNet skeleton torchmetrics
    builds; the weights come from the file (torchvision's key names), the heads from torchmetrics."""
    import sys
    import types

    import torchmetrics.functional.image.lpips as tm_lpips

    features = fake_squeezenet_features()
    try:
        import torchvision  # noqa: F401
    except Exception:
        fake = types.ModuleType("torchvision")
        fake.models = types.SimpleNamespace(
            squeezenet1_1=lambda weights=None: types.SimpleNamespace(features=fake_squeezenet_features(9))
        )
        monkeypatch.setitem(sys.modules, "torchvision", fake)
        monkeypatch.setattr(tm_lpips, "_TORCHVISION_AVAILABLE", True)
    else:
        pytest.skip("a real torchvision is installed: the stand-in would not be used")
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights)

    source, edited = pair(4)
    mask = box_mask() if masked else None
    got = Scorer(lpips_weights=weights).score(source, edited, "a", "b", mask)[
        "lpips" + ("_unedit_part" if masked else "")
    ]

    net = tm_lpips._NoTrainLpips(net="squeeze", pnet_rand=True)
    for block in net.net.slices:
        for index, module in block._modules.items():
            module.load_state_dict(features[int(index)].state_dict())
    keep = np.ones((64, 64), np.float32) if mask is None else (1 - mask).astype(np.float32)
    to_input = lambda x: torch.from_numpy(x / 255.0 * keep[:, :, None]).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
    with torch.no_grad():
        expected = float(net(to_input(source), to_input(edited)).squeeze())
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-5)

    bad = tmp_path / "other.pth"
    torch.save({"classifier.weight": torch.zeros(1)}, bad)
    from fpedit.engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="squeezenet1_1"):
        Scorer(lpips_weights=bad)
