"""Inputs of the image workflows: init images, masks, outpaint canvases, LoRA/embedding refs.

Everything a backend receives is prepared here, once, the same for every backend:

- ``init_image: generated`` is a deterministic picture drawn from the cell's seed (smooth
  colour gradients and a few discs, so it has structure at every scale); otherwise a file
  path, resized to the cell's resolution.
- ``mask``: ``center`` (the middle half), ``left`` / ``right`` / ``top`` / ``bottom`` (that
  half), or a file (white = repaint) that must have the cell's resolution.
- ``outpaint`` extends the init image by ``outpaint_px`` on every side (edge pixels
  repeated) and masks exactly the new border: an inpaint on the larger canvas.
- LoRA and embedding references (``zoo:NAME`` or a path) are resolved to files by the zoo.
- ControlNet: ``control_image: generated`` is an edge map of the generated picture (white
  Sobel edges on black, the kind of input a canny ControlNet takes); otherwise a file, or
  ``+``-joined files, one per net. A ``zoo:NAME`` net comes in the layout of the model's
  source: the diffusers folder for ``source: hub``, the original single file otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from backends.base import ControlRef, EmbeddingRef, LoraRef
from harness.errors import UserError

MASK_SHAPES: tuple[str, ...] = ("center", "left", "right", "top", "bottom")


def generated_image(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic test picture, float32 ``[height, width, 3]`` in ``[0, 1]``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    image = np.stack(
        [0.5 + 0.5 * np.sin(2 * np.pi * (x * (c + 1) + y) + phases[c]) for c in range(3)],
        axis=-1,
    )
    for _ in range(3):
        cx, cy, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        image[inside] = rng.uniform(0, 1, size=3)
    return image.astype(np.float32)


def load_image(
    path: str | Path, width: int, height: int, field: str = "init_image"
) -> np.ndarray:
    """An image file as float32 RGB in ``[0, 1]``, resized to ``width`` x ``height``;
    ``field`` is the axis errors name."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise UserError(f"{field} {str(path)!r}: no such file") from None
    except OSError as error:
        raise UserError(f"{field} {str(path)!r}: not a readable image ({error})") from None


def make_mask(spec: str, width: int, height: int) -> np.ndarray:
    """A mask by shape name or from a file; float32 ``[height, width]``, 1 = repaint."""
    mask = np.zeros((height, width), dtype=np.float32)
    if spec == "center":
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 1
    elif spec == "left":
        mask[:, : width // 2] = 1
    elif spec == "right":
        mask[:, width // 2 :] = 1
    elif spec == "top":
        mask[: height // 2] = 1
    elif spec == "bottom":
        mask[height // 2 :] = 1
    else:
        return _mask_file(spec, width, height)
    return mask


def _mask_file(path: str, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except FileNotFoundError:
        raise UserError(
            f"mask {path!r}: no such file (or use one of {', '.join(MASK_SHAPES)})"
        ) from None
    except OSError as error:
        raise UserError(f"mask {path!r}: not a readable image ({error})") from None
    if gray.size != (width, height):
        raise UserError(
            f"mask {path!r}: size {gray.size[0]}x{gray.size[1]}, expected the cell's "
            f"resolution {width}x{height}"
        )
    return (np.asarray(gray, dtype=np.float32) / 255.0 > 0.5).astype(np.float32)


def outpaint_canvas(image: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Extend ``image`` by ``pad`` pixels per side; return (canvas, mask of the new border)."""
    canvas = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    mask = np.ones(canvas.shape[:2], dtype=np.float32)
    mask[pad:-pad, pad:-pad] = 0
    return canvas, mask


def parse_loras(spec: str, model: str) -> tuple[LoraRef, ...]:
    """``zoo:style@0.8+my.safetensors@0.5`` → LoRA refs (files resolved by the zoo)."""
    if spec == "none":
        return ()
    refs = []
    for part in spec.split("+"):
        reference, strength = part.strip().rsplit("@", 1)
        refs.append(
            LoraRef(path=_resolve_extra(reference, "lora", model), strength=float(strength))
        )
    return tuple(refs)


@lru_cache(maxsize=64)
def lora_types(spec: str, model: str) -> str | None:
    """The network type of each file of a ``lora`` axis value, ``+``-joined (``loha``,
    ``lora+locon``; :data:`harness.vocabulary.NETWORK_TYPES`), read from the files' headers;
    ``None`` when a file cannot be had or read (the cell's own error says why)."""
    from models import file_network_type

    try:
        return "+".join(file_network_type(ref.path) for ref in parse_loras(spec, model))
    except Exception:  # noqa: BLE001 - safetensors raises its own error type
        return None


#: The fraction of pixels an edge map marks as edges.
EDGE_FRACTION = 0.12


def edge_map(image: np.ndarray) -> np.ndarray:
    """White edges on black: the pixels of largest Sobel gradient magnitude of ``image``'s
    luminance (the top :data:`EDGE_FRACTION`), float32 ``[H, W, 3]`` in ``{0, 1}``."""
    from scipy import ndimage

    gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    magnitude = np.hypot(ndimage.sobel(gray, axis=0), ndimage.sobel(gray, axis=1))
    edges = (magnitude > np.quantile(magnitude, 1.0 - EDGE_FRACTION)).astype(np.float32)
    return np.repeat(edges[:, :, None], 3, axis=2)


def control_images(spec: str, count: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """The control image of each of ``count`` nets: ``generated`` (the edge map of the
    generated picture of ``seed``, the same for every net), one file for all, or one file
    per net (``a.png+b.png``)."""
    if spec == "generated":
        return [edge_map(generated_image(width, height, seed))] * count
    files = [part.strip() for part in spec.split("+")]
    if len(files) not in (1, count):
        raise UserError(
            f"control_image {spec!r}: {len(files)} files for {count} ControlNets; "
            "expected one file for all or one per net"
        )
    images = [load_image(path, width, height, field="control_image") for path in files]
    return images * count if len(images) == 1 else images


def parse_controls(
    spec: str,
    model: str,
    source: str,
    *,
    scale: float,
    image: str,
    width: int,
    height: int,
    seed: int,
) -> tuple[ControlRef, ...]:
    """``auto`` or ``zoo:canny@0.8+my-net.safetensors`` → ControlNet refs with their images;
    a net without ``@SCALE`` gets ``scale`` (the ``control_scale`` axis)."""
    from models import DEFAULT_CONTROLNET

    parts = [f"zoo:{DEFAULT_CONTROLNET}"] if spec == "auto" else spec.split("+")
    named: list[tuple[str, float]] = []
    for part in parts:
        reference, at, value = part.strip().rpartition("@")
        named.append((reference, float(value)) if at else (part.strip(), scale))
    images = control_images(image, len(named), width, height, seed)
    return tuple(
        _control_ref(reference, model, source, strength, picture)
        for (reference, strength), picture in zip(named, images, strict=True)
    )


def _control_ref(
    reference: str, model: str, source: str, scale: float, image: np.ndarray
) -> ControlRef:
    from models import controlnet_config_folder, extra_file

    if reference.startswith("zoo:"):
        name = reference[len("zoo:") :]
        if source == "hub":
            folder = extra_file("controlnet", name, model, layout="folder")
            return ControlRef(path=None, scale=scale, image=image, folder=folder)
        path = extra_file("controlnet", name, model)
        return ControlRef(path, scale, image, config=controlnet_config_folder(model))
    location = Path(reference).expanduser()
    if location.is_dir():
        if not (location / "config.json").is_file():
            raise UserError(
                f"controlnet {reference!r}: a folder without config.json; expected a "
                "diffusers ControlNetModel folder or a single file"
            )
        return ControlRef(path=None, scale=scale, image=image, folder=location)
    if not location.is_file():
        raise UserError(f"controlnet {reference!r}: no such file or folder")
    try:
        config: Path | None = controlnet_config_folder(model)
    except UserError:  # an architecture the zoo does not know: no config to offer
        config = None
    return ControlRef(location, scale, image, config=config)


def parse_embeddings(spec: str, model: str) -> tuple[EmbeddingRef, ...]:
    """``zoo:tiny-token+my-style.pt`` → embedding refs; the trigger word is the file's stem."""
    if spec == "none":
        return ()
    refs = []
    for part in spec.split("+"):
        path = _resolve_extra(part.strip(), "embedding", model)
        refs.append(EmbeddingRef(token=path.stem, path=path))
    return tuple(refs)


def _resolve_extra(reference: str, kind: str, model: str) -> Path:
    if reference.startswith("zoo:"):
        from models import extra_file

        return Path(extra_file(kind, reference[len("zoo:") :], model))
    path = Path(reference)
    if not path.is_file():
        raise UserError(f"{kind} {reference!r}: no such file")
    return path
