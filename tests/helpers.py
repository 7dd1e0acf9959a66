"""Helpers shared by the test modules: the structured test image, its encodings and its pixels.

Fixtures live in conftest.py; plain functions live here so that a test module imports them by name.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def make_image(width: int = 128, height: int = 128, seed: int = 0) -> Image.Image:
    """A structured RGB test image: gradients, a disc and a bar, plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = np.full_like(x, 80.0)
    disc = (x - width * 0.4) ** 2 + (y - height * 0.55) ** 2 < (min(width, height) * 0.22) ** 2
    bar = (np.abs(x - width * 0.75) < width * 0.06) & (y > height * 0.2)
    rgb = np.stack([r, g, b], axis=-1)
    rgb[disc] = (230, 40, 40)
    rgb[bar] = (20, 20, 200)
    rgb += rng.normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image | None = None, **save_args) -> bytes:
    """``image`` (default: a 64x64 test image) encoded as PNG, as a client would send it."""
    buf = io.BytesIO()
    (image if image is not None else make_image(64, 64)).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def decoded_pixels(data: bytes | str | Image.Image) -> np.ndarray:
    """RGB pixels of encoded image bytes, their base64 text (JSON) or an image, as int16 so that differences
    do not wrap around."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64(data: bytes) -> str:
    """Bytes as the base64 text a JSON body carries."""
    return base64.b64encode(data).decode()


class CancelAt:
    """A cancel_check that raises on its ``n``-th call (1-based), and counts the calls."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> None:
        from fpedit.engine.errors import CancelledError

        self.calls += 1
        if self.calls >= self.n:
            raise CancelledError("deadline passed")


def model_input(image: Image.Image) -> torch.Tensor:
    """An RGB image as the VAE's input, (1, 3, H, W) in [-1, 1], computed here rather than by the engine."""
    arr = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
    return torch.tensor(arr, dtype=torch.float32).permute(2, 0, 1)[None]


#: Relative L2 allowed between two computations of the same edit whose UNet calls batch rows differently (a
#: re-edit reusing maps captured in a call of another batch size, cross-request batching, batched capture).
#: CPU kernels pick blockings by batch shape, and CPUs differ, so such runs agree only up to float rounding:
#: 3.3e-6 measured (re-edit of tests/engine/test_real.py) on two machines. Each test using it also shows that a
#: deliberately wrong computation (maps of another step, no injection) misses by >= 10x this.
BATCH_SHAPE_TOL = 1e-4


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for localhost/127.0.0.1 and its key (PEM) into ``folder``.

    Why: the TLS tests of gRPC, HTTP and ``fpedit serve`` need a real certificate that a client trusts when
    given it as the root, without anything fetched or a CA on the machine.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``fpedit`` main() or argparse's exit: the status and stderr (the CLI tests check both)."""
    from fpedit.cli import main

    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    """The CLI's error contract: one ``fpedit: error:`` line, no traceback or object repr, naming ``fragments``."""
    assert err.startswith("fpedit: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert " object at 0x" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


#: diffusers' DDIM settings for SD 1.x/2.x (docs/design.md): the independent schedules the tests compare with.
SD_DDIM = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "clip_sample": False,
}


def diffusers_inversion(
    unet, z0: torch.Tensor, empty: torch.Tensor, steps: int, prediction_type: str = "epsilon"
):
    """The DDIM inversion trajectory [z_0, ..., z_T] driven by diffusers' DDIMInverseScheduler (SD 1.x/2.x betas).

    Why: an independent second opinion on the engine's inversion, shared by the epsilon and v-prediction tests.
    """
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler(**SD_DDIM, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    z, trajectory = z0, [z0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(unet(z, t, encoder_hidden_states=empty).sample, t, z).prev_sample
            trajectory.append(z)
    return trajectory


def check_generated_edit(engine, ref, source: str, target: str, latents: torch.Tensor, options, tol: float):
    """Edit generated ``latents`` with the engine and the reference and assert they agree within ``tol``.

    The comparison must be able to fail: the same run without injection has to miss the reference's edit by at
    least 10x ``tol``. Returns the engine's result for further checks.
    """
    from reference import rel_l2

    result = engine.edit_generated(source, target, latents=latents, options=options)
    o = options
    ref_src, ref_tgt = ref.edit_generated(
        source, target, latents, o.steps, o.guidance_scale, o.replace_window, o.layers
    )
    assert rel_l2(result.source_latents, ref_src) < tol
    assert rel_l2(result.edited_latents, ref_tgt) < tol
    off = engine.edit_generated(source, target, latents=latents, options=o.replace(replace_window=(0.0, 0.0)))
    assert rel_l2(off.edited_latents, ref_tgt) >= 10 * tol
    return result


def run_concurrently(jobs: list[Callable[[], Any]], timeout_s: float = 600) -> list[Any]:
    """Start every job at once (one thread each); return results or the exceptions they raised."""
    results: list[Any] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = jobs[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


@contextmanager
def json_server_log() -> Iterator[list[dict[str, Any]]]:
    """The ``fpedit.server`` log at INFO as ``--log-format json`` writes it: the yielded list holds the parsed
    objects once the block ends."""
    from fpedit.server.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fpedit.server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    entries: list[dict[str, Any]] = []
    try:
        yield entries
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        entries.extend(json.loads(line) for line in stream.getvalue().splitlines())


def serving_engine(model: Any, config: Any = None) -> Any:
    """An engine as ``fpedit serve`` builds one: the server's limits (``config``, default ServerConfig())
    are the engine's own, set through its EngineConfig."""
    from fpedit.engine import EditEngine, EngineConfig
    from fpedit.server.config import ServerConfig
    from fpedit.server.runner import serving_engine_config

    engine_config = EngineConfig(model=str(model), backend="torch")
    return EditEngine.from_config(serving_engine_config(engine_config, config or ServerConfig()))


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from a real HTTP scrape of the text exposition format at /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
