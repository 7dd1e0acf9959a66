"""Image decoding, the resize policy, and conversions between PIL images and model tensors.

Size policy (documented in docs/python-api.md, "Sizes"): an image is edited at a *working size* whose sides are multiples of 64
(SD 1.x's UNet halves the latent three times, so latent sides must be multiples of 8) and whose aspect ratio
is within 5 % of the input's. An image whose sides are already multiples of 64 and whose longer side is at
most ``max_side`` is used as it is. Otherwise it is scaled, aspect kept, so that its longer side fits
``max_side``, and the sides are rounded to multiples of 64; when that rounding bends the aspect ratio by more
than 5 % (small images: 128x96 would become 128x128), the longer side grows in steps of 64, up to
``max_side``, until the rounded shorter side keeps the ratio. Edits are resized back to the input's own size
by default (``output_size`` in :meth:`~.pipeline.EditEngine.edit_real`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import ModelSpec
from .errors import InvalidInputError
from .paths import claimed_format

SIDE_MULTIPLE = 64
DEFAULT_MAX_SIDE = 1024
#: Refuse to even decode more pixels than this (decompression bombs): 64 MP.
DEFAULT_MAX_INPUT_PIXELS = 64 * 1024 * 1024
MIN_INPUT_SIDE = 8
#: The working size's aspect ratio may differ from the input's by at most this fraction.
ASPECT_TOLERANCE = 0.05
#: ``output_size`` values besides an explicit (width, height): the input's own size, or the working size.
OUTPUT_SIZES = ("input", "working")

log = logging.getLogger("fpedit.engine")

ImageInput = Image.Image | np.ndarray | bytes | bytearray | str | os.PathLike


def load_image(
    image: ImageInput,
    *,
    field: str = "image",
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode ``image`` (PIL image, HxWx3 uint8 array, encoded bytes or a path) into an RGB PIL image.

    ``formats`` restricts encoded input to these PIL format names (e.g. ``("PNG", "JPEG", "WEBP")``).
    """
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (3, 4))
        ):
            raise InvalidInputError(
                field, f"arrays must be HxW, HxWx3 or HxWx4 uint8, got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    elif isinstance(image, (bytes, bytearray, str, os.PathLike)):
        image = _decode(image, field, max_input_pixels, formats)
    elif not isinstance(image, Image.Image):
        raise InvalidInputError(field, f"expected an image, bytes or a path, got {type(image).__name__}")
    w, h = image.size
    if w * h > max_input_pixels:
        raise InvalidInputError(field, f"{w}x{h} exceeds the limit of {max_input_pixels} pixels")
    if min(w, h) < MIN_INPUT_SIDE:
        raise InvalidInputError(field, f"{w}x{h} is too small (sides must be at least {MIN_INPUT_SIDE} px)")
    return to_rgb(image, field)


def _decode(
    source: bytes | bytearray | str | os.PathLike, field: str, max_pixels: int, formats: Sequence[str] | None
) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(field, f"no such file: {path}")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise InvalidInputError(field, "is empty")
    try:
        with warnings.catch_warnings():
            # Our own limit is checked on the header's size right below; Pillow's warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidInputError(field, f"{w}x{h} exceeds the limit of {max_pixels} pixels")
            img.load()
    except InvalidInputError:
        raise
    except UnidentifiedImageError:
        claimed = claimed_format(data)
        if claimed is not None and (not formats or claimed in formats):
            # Pillow reports a damaged file (a bad chunk checksum, a cut header) as "unidentified".
            raise InvalidInputError(field, f"is a corrupt or truncated {claimed} file") from None
        accepted = ", ".join(formats) if formats else "a format Pillow reads"
        raise InvalidInputError(field, f"cannot be decoded as an image (expected {accepted})") from None
    except Image.DecompressionBombError:
        # Pillow's hard guard (2 x Image.MAX_IMAGE_PIXELS) fired before our check could see the size.
        hard = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = min(max_pixels, hard) if hard else max_pixels
        raise InvalidInputError(field, f"exceeds the limit of {limit} pixels") from None
    except MemoryError:
        raise InvalidInputError(field, "needs more memory to decode than the server allows") from None
    except Exception as exc:  # a damaged file can make any decoder raise anything: it is bad input
        raise InvalidInputError(field, f"cannot be decoded as an image ({_describe(exc)})") from None
    return _apply_orientation(img)


def _describe(exc: BaseException) -> str:
    """A decoder error for a client: its type and message, without object reprs or heap addresses."""
    text = _ADDRESS.sub("", str(exc)).strip() or "damaged data"
    return f"{type(exc).__name__}: {text}"[:200]


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|\s*at 0x[0-9a-fA-F]+")


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Honour EXIF orientation so phone photos are edited the way they are displayed.

    EXIF is metadata: when it cannot be read (damaged or hostile blocks make Pillow raise SyntaxError,
    struct.error, TypeError...), the pixels are edited as stored and a warning is logged; the edit never
    fails because of it.
    """
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:
        log.warning("unreadable EXIF ignored; using the pixels as stored (%s)", _describe(exc))
        return img


def to_rgb(image: Image.Image, field: str = "image") -> Image.Image:
    """Convert any common mode to RGB; transparent pixels are composited over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        raise InvalidInputError(field, "floating-point images are not supported; save as 8-bit RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidInputError(field, f"mode {mode} cannot be converted to RGB ({exc})") from exc


def working_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """The (width, height) an image is edited at, per the size policy above."""
    largest = max(SIDE_MULTIPLE, max_side // SIDE_MULTIPLE * SIDE_MULTIPLE)
    portrait = height > width
    long_side, short_side = (height, width) if portrait else (width, height)
    ratio = long_side / short_side

    def snap(side: float) -> int:
        return min(largest, max(SIDE_MULTIPLE, round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE))

    fitted = snap(long_side * min(1.0, max_side / long_side))
    best: tuple[float, int, int] | None = None
    for candidate in range(fitted, largest + 1, SIDE_MULTIPLE):
        other = snap(candidate / ratio)
        error = abs(math.log(candidate / other / ratio))
        if best is None or error < best[0]:
            best = (error, candidate, other)
        if error <= math.log1p(ASPECT_TOLERANCE) + 1e-9:  # 5 % exactly counts as within
            break
    assert best is not None  # the range holds at least ``fitted``
    _, long_out, short_out = best
    return (short_out, long_out) if portrait else (long_out, short_out)


def prepare_image(image: Image.Image, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """``image`` resampled (Lanczos) to its working size; the same object when it is already there."""
    size = working_size(*image.size, max_side=max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def check_output_size(value: object, max_pixels: int, field: str = "output_size") -> str | tuple[int, int]:
    """``"input"``, ``"working"`` or a (width, height) pair of positive ints within ``max_pixels``."""
    if isinstance(value, str):
        if value not in OUTPUT_SIZES:
            raise InvalidInputError(field, f"must be 'input', 'working' or (width, height), got {value!r}")
        return value
    try:
        width, height = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidInputError(
            field, f"must be 'input', 'working' or (width, height), got {value!r}"
        ) from None
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise InvalidInputError(field, f"sides must be positive integers, got {value!r}")
    if width * height > max_pixels:
        raise InvalidInputError(field, f"{width}x{height} exceeds the limit of {max_pixels} pixels")
    return int(width), int(height)


def output_image(
    image: Image.Image, original_size: tuple[int, int], output_size: str | tuple[int, int]
) -> Image.Image:
    """A decoded working-size image at the size asked for: the input's (``"input"``), as decoded
    (``"working"``), or an explicit (width, height); resampled with Lanczos only when the size differs."""
    size = (
        image.size if output_size == "working" else original_size if output_size == "input" else output_size
    )
    if tuple(size) == image.size:
        return image
    return image.resize(tuple(size), Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB [0, 255] → ``x / 127.5 - 1``, shape (1, 3, H, W), float32."""
    arr = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(decoded: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], (B, 3, H, W) → PIL images (rounded to the nearest 8-bit value).

    Quantised on the tensor's device, so only uint8 pixels cross to the host.
    """
    pixels = ((decoded.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(a) for a in pixels]


# --- Algorithm 1's starting point ---------------------------------------------------------------------------


def initial_latents(
    spec: ModelSpec,
    max_side: int,
    seed: int | None,
    latents: torch.Tensor | np.ndarray | None,
    height: int | None,
    width: int | None,
) -> tuple[torch.Tensor, int | None]:
    """A generated edit's z_T as float32 (1, C, h, w) on the CPU, and the seed it was drawn with: ``latents``
    if given (checked), else drawn from ``torch.Generator().manual_seed(seed)`` at ``height`` x ``width``
    (default: the model's size; multiples of 8 latent pixels, at most ``max_side``), a random seed when none
    is given."""
    c, f = spec.latent_channels, spec.vae_scale_factor
    if latents is not None:
        z = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents)
        if z.ndim == 3:
            z = z.unsqueeze(0)
        if z.ndim != 4 or z.shape[0] != 1 or z.shape[1] != c or z.shape[2] % 8 or z.shape[3] % 8:
            raise InvalidInputError(
                "latents",
                f"must have shape (1, {c}, h, w) with h and w multiples of 8, got {tuple(z.shape)}",
            )
        if not torch.isfinite(z).all():
            raise InvalidInputError("latents", "contain NaN or infinity")
        return z.detach().to(torch.float32).cpu(), None
    size = spec.default_image_size
    h = size if height is None else height
    w = size if width is None else width
    for name, value in (("height", h), ("width", w)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % (8 * f):
            raise InvalidInputError(name, f"must be a positive multiple of {8 * f}, got {value!r}")
        if value > max_side:
            raise InvalidInputError(name, f"must be at most {max_side}, got {value}")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError("seed", f"must be an integer in [0, 2**63), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, c, h // f, w // f), generator=generator, dtype=torch.float32), seed
