"""The metrics, one implementation for ``fpedit score``, ``fpedit eval`` and library callers.

- CLIP score (the paper's CS) as torchmetrics' ``CLIPScore`` defines it: ``100 * max(cos(E_I, E_T), 0)`` with
  the image prepared by the CLIP folder's own processor; ``..._edit_part`` first multiplies the uint8 image by
  the edit mask (PIE-Bench).
- CLIP directional similarity (the paper's CDS): ``cos(E_I(edited) - E_I(source), E_T(target) - E_T(source))``
  with every embedding L2-normalised first.
- PIE-Bench's background metrics: both images scaled to [0, 1] and multiplied by ``1 - mask`` before PSNR (data
  range 1), MSE, SSIM (torchmetrics, data range 1) and LPIPS (squeeze net, inputs in [-1, 1]); without a mask
  the whole image (``psnr``, ``mse``, ``ssim``, ``lpips``).
- Structure distance (PIE-Bench): MSE between the cosine self-similarity matrices of the last ViT block's
  attention keys (all tokens) of the two images.

Models come only from local folders; a metric whose model is not given is left out with the reason
(:attr:`Scorer.unavailable`), never downloaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fpedit.engine.errors import InvalidInputError

CLIP_METRICS = (
    "clip_similarity_source_image",
    "clip_similarity_target_image",
    "clip_similarity_target_image_edit_part",
    "clip_directional_similarity",
)
#: Column order of results: PIE-Bench's metrics (masked and whole-image variants), then the paper's CDS.
ALL_METRICS = (
    "structure_distance",
    "psnr_unedit_part",
    "lpips_unedit_part",
    "mse_unedit_part",
    "ssim_unedit_part",
    "psnr",
    "lpips",
    "mse",
    "ssim",
    *CLIP_METRICS,
)
#: Lower is better for these; higher for the rest.
LOWER_IS_BETTER = frozenset({"structure_distance", "lpips_unedit_part", "mse_unedit_part", "lpips", "mse"})

#: ImageNet statistics that PIE-Bench applies to 0-255 pixel values before DINO (kept for comparability).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SHORT_SIDE, DINO_MAX_SIDE = 224, 480


class MetricUnavailable(Exception):
    """A metric cannot run here; the message says why and what enables it."""


# --- images -----------------------------------------------------------------------------------------------


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InvalidInputError(
            "image", f"expected an (H, W, 3) uint8 array, got {array.shape} {array.dtype}"
        )
    return array


def unit_tensor(image: np.ndarray, keep: np.ndarray | None = None) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1], times ``keep`` (H, W) where given: PIE-Bench's masking."""
    x = image.astype(np.float32) / 255.0
    if keep is not None:
        x = x * keep.astype(np.float32)[:, :, None]
    return torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).contiguous()


def check_pair(source: np.ndarray, edited: np.ndarray) -> None:
    if source.shape != edited.shape:
        raise InvalidInputError(
            "edited",
            f"is {edited.shape[1]}x{edited.shape[0]} px but the source is {source.shape[1]}x{source.shape[0]}",
        )


def check_mask(mask: np.ndarray | None, image: np.ndarray) -> np.ndarray | None:
    if mask is None:
        return None
    if mask.shape != image.shape[:2]:
        raise InvalidInputError(
            "mask", f"is {mask.shape[1]}x{mask.shape[0]} px, the images {image.shape[1]}x{image.shape[0]}"
        )
    return (mask > 0).astype(np.uint8)


# --- pixel metrics ----------------------------------------------------------------------------------------


def _torchmetrics_image() -> Any:
    try:
        import torchmetrics.functional.image as image_metrics
    except ModuleNotFoundError as exc:
        raise MetricUnavailable(
            f"needs torchmetrics ({exc.name} missing): pip install 'fpedit[eval]'"
        ) from None
    except Exception as exc:  # a broken optional dependency (e.g. a torchvision built for another torch)
        raise MetricUnavailable(f"torchmetrics does not import here ({_first_line(exc)})") from None
    return image_metrics


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def mse(source: np.ndarray, edited: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Mean squared error of the [0, 1] images (times ``keep``)."""
    return float(torch.mean((unit_tensor(source, keep) - unit_tensor(edited, keep)) ** 2))


def psnr(source: np.ndarray, edited: np.ndarray, keep: np.ndarray | None = None) -> float:
    """PSNR with data range 1 (torchmetrics), of the [0, 1] images times ``keep``."""
    metric = _torchmetrics_image().peak_signal_noise_ratio
    return float(metric(unit_tensor(source, keep), unit_tensor(edited, keep), data_range=1.0))


def ssim(source: np.ndarray, edited: np.ndarray, keep: np.ndarray | None = None) -> float:
    """SSIM (torchmetrics: Gaussian 11x11, sigma 1.5) with data range 1, as PIE-Bench configures it."""
    metric = _torchmetrics_image().structural_similarity_index_measure
    return float(metric(unit_tensor(source, keep), unit_tensor(edited, keep), data_range=1.0))


# --- LPIPS ------------------------------------------------------------------------------------------------


class Lpips:
    """LPIPS with the squeeze net: torchmetrics' network and bundled linear heads, the SqueezeNet 1.1
    backbone weights from the user's file (torchvision's ``squeezenet1_1`` state dict), never downloaded."""

    def __init__(self, weights: str | Path, device: str = "cpu") -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise InvalidInputError("lpips_weights", f"no such file: {weights}")
        try:
            import torchvision  # noqa: F401  (torchmetrics builds the squeeze net with it)
        except Exception as exc:
            raise MetricUnavailable(
                f"needs torchvision built for this torch, which does not load here ({_first_line(exc)})"
            ) from None
        _torchmetrics_image()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.net = _NoTrainLpips(net="squeeze", pnet_rand=True)  # random backbone: nothing fetched
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInputError(
                "lpips_weights", f"{weights} is not a torch weights file ({exc})"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        self._load_backbone(state, weights)
        self.net.to(device).eval()
        self.device = device

    def _load_backbone(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """torchvision names the backbone ``features.<i>.*``; torchmetrics splits it into slices."""
        renamed = {}
        for k, block in enumerate(self.net.net.slices):
            for index in block._modules:
                prefix = f"features.{index}."
                for key, value in state.items():
                    if key.startswith(prefix):
                        renamed[f"slices.{k}.{index}.{key[len(prefix) :]}"] = value
        expected = set(self.net.net.state_dict())
        if set(renamed) != expected:
            raise InvalidInputError(
                "lpips_weights",
                f"{path} does not hold torchvision's squeezenet1_1 weights "
                f"({len(expected - set(renamed))} backbone tensors missing)",
            )
        self.net.net.load_state_dict(renamed)

    @torch.inference_mode()
    def __call__(self, source: np.ndarray, edited: np.ndarray, keep: np.ndarray | None = None) -> float:
        a = unit_tensor(source, keep).to(self.device) * 2 - 1
        b = unit_tensor(edited, keep).to(self.device) * 2 - 1
        return float(self.net(a, b).squeeze())


# --- CLIP ---------------------------------------------------------------------------------------------------


def _features(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected features, 5.x an output object holding them."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class Clip:
    """A local CLIP folder (transformers ``CLIPModel`` and its processor)."""

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidInputError("clip", f"no such folder: {folder}")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                "clip", f"{folder} is not a CLIP model folder with its processor ({_first_line(exc)})"
            ) from None
        self.device = device
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, d) L2-normalised image embeddings of uint8 RGB arrays."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        features = _features(
            self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        )
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) L2-normalised text embeddings; captions past the model's length are truncated."""
        inputs = self.processor(
            text=list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
        )
        features = _features(
            self.model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
            )
        )
        return F.normalize(features.float(), dim=-1).cpu()


def clip_score(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """torchmetrics' CLIPScore of normalised embeddings: 100 * max(cos, 0)."""
    return float(max(100.0 * float((image_embedding * text_embedding).sum()), 0.0))


def directional_similarity(
    source_image: torch.Tensor,
    edited_image: torch.Tensor,
    source_text: torch.Tensor,
    target_text: torch.Tensor,
) -> float:
    """cos(E_I(edited) - E_I(source), E_T(target) - E_T(source)) of normalised embeddings."""
    image_direction = edited_image - source_image
    text_direction = target_text - source_text
    return float(F.cosine_similarity(image_direction[None], text_direction[None], eps=1e-8)[0])


# --- structure distance -----------------------------------------------------------------------------------

_KEY_NAME = re.compile(r"(?:^|\.)(\d+)\.attention(?:\.attention)?\.(?:key|k_proj)$")


def dino_input(image: np.ndarray) -> torch.Tensor:
    """PIE-Bench's DINO input: shorter side 224 (longer at most 480; bilinear, antialiased), then ImageNet
    mean/std applied to the 0-255 values (its quirk, kept so numbers match its tables)."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = DINO_SHORT_SIDE, int(DINO_SHORT_SIDE * long / short)
    if new_long > DINO_MAX_SIDE:
        new_short, new_long = int(DINO_MAX_SIDE * new_short / new_long), DINO_MAX_SIDE
    size = (new_short, new_long) if h <= w else (new_long, new_short)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def key_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(T, T) cosine similarities of the (T, D) keys (all heads concatenated)."""
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=eps)


class DinoKeys:
    """A local ViT folder (transformers ``ViTModel``, e.g. DINO ViT-B/8): keys of the last block."""

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        from transformers import ViTModel

        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidInputError("dino", f"no such folder: {folder}")
        try:
            self.model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                "dino", f"{folder} is not a ViT model folder ({_first_line(exc)})"
            ) from None
        self.model.to(device).eval()
        self.device = device
        found = [
            (int(m.group(1)), name)
            for name in dict(self.model.named_modules())
            if (m := _KEY_NAME.search(name))
        ]
        if not found:
            raise InvalidInputError("dino", f"{folder}: no attention key projection found in the model")
        self.key_module = self.model.get_submodule(max(found)[1])
        self.image_size = int(self.model.config.image_size)

    @torch.inference_mode()
    def keys(self, image: np.ndarray) -> torch.Tensor:
        """(T, D) keys of the last block for one uint8 image (CLS token included)."""
        captured: list[torch.Tensor] = []
        handle = self.key_module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            x = dino_input(image).to(self.device)
            interpolate = tuple(x.shape[-2:]) != (self.image_size, self.image_size)
            self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
        finally:
            handle.remove()
        return captured[-1][0].float().cpu()

    def structure_distance(self, source: np.ndarray, edited: np.ndarray) -> float:
        a = key_self_similarity(self.keys(source))
        b = key_self_similarity(self.keys(edited))
        return float(F.mse_loss(b, a))


# --- everything together ------------------------------------------------------------------------------------


class Scorer:
    """Loads the models once and scores (source, edited) pairs.

    ``unavailable`` maps each metric left out to the one line that says why and which flag enables it.
    """

    def __init__(
        self,
        clip: str | Path | None = None,
        dino: str | Path | None = None,
        lpips_weights: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.unavailable: dict[str, str] = {}
        self.clip = Clip(clip, device) if clip else None
        if self.clip is None:
            for name in CLIP_METRICS:
                self.unavailable[name] = (
                    "needs --clip DIR (a CLIP model folder, e.g. openai/clip-vit-large-patch14)"
                )
        self.dino = DinoKeys(dino, device) if dino else None
        if self.dino is None:
            self.unavailable["structure_distance"] = (
                "needs --dino DIR (a ViT model folder, e.g. facebook/dino-vitb8)"
            )
        self.lpips: Lpips | None = None
        lpips_reason = "needs --lpips-weights FILE (torchvision's squeezenet1_1 weights)"
        if lpips_weights:
            try:
                self.lpips = Lpips(lpips_weights, device)
            except MetricUnavailable as exc:
                lpips_reason = str(exc)
        if self.lpips is None:
            self.unavailable["lpips"] = self.unavailable["lpips_unedit_part"] = lpips_reason
        try:
            _torchmetrics_image()
            self.pixel_metrics = True
        except MetricUnavailable as exc:
            self.pixel_metrics = False
            for name in ("psnr", "ssim", "psnr_unedit_part", "ssim_unedit_part"):
                self.unavailable[name] = str(exc)

    def messages(self) -> list[str]:
        """One line per group of metrics left out, naming the flag (or install) that enables them."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.unavailable.items():
            by_reason.setdefault(reason, []).append(name)
        return [f"left out {', '.join(names)}: {reason}" for reason, names in by_reason.items()]

    def score(
        self,
        source: Image.Image | np.ndarray,
        edited: Image.Image | np.ndarray,
        source_prompt: str,
        target_prompt: str,
        mask: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Every available metric of one pair, keyed by name (in :data:`ALL_METRICS` order). With a mask the
        background metrics are ``*_unedit_part`` (NaN where the mask covers everything, as PIE-Bench) and the
        edit-part CLIP score is computed; without one, the whole-image variants."""
        src, out = as_uint8(source), as_uint8(edited)
        check_pair(src, out)
        mask = check_mask(mask, src)
        results: dict[str, float] = {}
        if self.dino is not None:
            results["structure_distance"] = self.dino.structure_distance(src, out)

        suffix = "" if mask is None else "_unedit_part"
        keep = None if mask is None else 1 - mask
        empty = keep is not None and not keep.any()
        pixel: dict[str, Any] = {"mse": mse}
        if self.pixel_metrics:
            pixel.update(psnr=psnr, ssim=ssim)
        if self.lpips is not None:
            pixel["lpips"] = self.lpips
        for name, metric in pixel.items():
            results[name + suffix] = math.nan if empty else float(metric(src, out, keep))

        if self.clip is not None:
            images = [src, out] + ([out * mask[:, :, None]] if mask is not None else [])
            image_emb = self.clip.image_embeddings(images)
            text_emb = self.clip.text_embeddings([source_prompt, target_prompt])
            results["clip_similarity_source_image"] = clip_score(image_emb[0], text_emb[0])
            results["clip_similarity_target_image"] = clip_score(image_emb[1], text_emb[1])
            if mask is not None:
                results["clip_similarity_target_image_edit_part"] = (
                    clip_score(image_emb[2], text_emb[1]) if mask.any() else math.nan
                )
            results["clip_directional_similarity"] = directional_similarity(
                image_emb[0], image_emb[1], text_emb[0], text_emb[1]
            )
        return {name: results[name] for name in ALL_METRICS if name in results}
