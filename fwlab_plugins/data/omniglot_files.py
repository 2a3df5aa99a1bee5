"""Omniglot (Lake et al. 2015) from its standard on-disk layout: ``alphabet/character/*.png``.

Under ``root``, every ``*.zip`` (``images_background.zip``, ``images_evaluation.zip``, or the
subsets such as ``images_background_small1.zip``) and every extracted folder holding that layout
is read, torchvision's ``omniglot-py/`` folder included. A folder and a zip of the same name are
read once (the folder). A character class is (alphabet, character); images are 105×105 binary
drawings, black ink on white, loaded as ink-is-1 floats resized to ``size``×``size``.

With ``download=True`` and nothing found, torchvision's ``Omniglot(root, download=True)``
fetches the background and evaluation sets (the real path; it needs torchvision and the network).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fwlab.errors import ConfigError

CharacterKey = tuple[str, str]  # (alphabet, character)


def _png_sources(root: Path) -> Iterator[tuple[str, bytes | Path]]:
    """(relative path, PNG bytes or file path) for every drawing under ``root``."""
    folders = [p for p in sorted(root.rglob("*")) if p.is_dir()]
    extracted = {folder.name for folder in folders}
    for archive in sorted(root.rglob("*.zip")):
        if archive.stem in extracted:
            continue  # the same set, already extracted beside its zip
        try:
            with zipfile.ZipFile(archive) as zipped:
                for name in sorted(zipped.namelist()):
                    if name.lower().endswith(".png"):
                        yield name, zipped.read(name)
        except zipfile.BadZipFile:
            raise ConfigError(f"{archive} is not a readable zip file") from None
    for png in sorted(root.rglob("*.png")):
        yield str(png.relative_to(root)), png


def load_omniglot(
    root: str | Path, size: int, download: bool = False
) -> dict[CharacterKey, np.ndarray]:
    """``{(alphabet, character): float32 (drawings, size, size)}``, ink = 1."""
    from PIL import Image

    root = Path(root).expanduser()
    drawings: dict[CharacterKey, list[np.ndarray]] = {}
    seen: set[tuple[str, str, str]] = set()
    if root.is_dir():
        for relative, source in _png_sources(root):
            parts = Path(relative).parts
            if len(parts) < 3:
                continue
            alphabet, character, filename = parts[-3], parts[-2], parts[-1]
            if (alphabet, character, filename) in seen:
                continue
            seen.add((alphabet, character, filename))
            data = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(data) as image:
                small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            ink = 1.0 - np.asarray(small, dtype=np.float32) / 255.0
            drawings.setdefault((alphabet, character), []).append(ink)
    if not drawings and download:
        try:
            from torchvision.datasets import Omniglot
        except ImportError as error:
            raise ConfigError(
                f"data.download=true needs torchvision ({error}); or put Omniglot in {root}"
            ) from None
        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
        return load_omniglot(root, size, download=False)
    if not drawings:
        raise ConfigError(
            f"no Omniglot drawings under data.root={root}: expected images_background.zip, "
            f"images_evaluation.zip (or their extracted alphabet/character/*.png folders). "
            f"Pass data.download=true to fetch them with torchvision, or copy them there."
        )
    return {key: np.stack(images) for key, images in sorted(drawings.items())}


def split_classes(
    keys: list[CharacterKey], train_fraction: float, seed: int
) -> tuple[list[CharacterKey], list[CharacterKey]]:
    """A seeded split of the character classes: (train, held out). On the full 1623 classes
    the default fraction gives Santoro et al.'s 1200 / 423."""
    if not 0 < train_fraction < 1:
        raise ConfigError(f"data.train_class_fraction must be in (0, 1), got {train_fraction}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(keys))
    cut = int(round(train_fraction * len(keys)))
    return [keys[i] for i in sorted(order[:cut])], [keys[i] for i in sorted(order[cut:])]


def write_example_omniglot(
    directory: Path,
    alphabets: int,
    characters: int,
    drawings: int,
    zipped: bool = False,
    seed: int = 0,
) -> None:
    """Write random 105×105 'drawings' in Omniglot's layout (a folder, or a zip of it)."""
    from PIL import Image

    rng = np.random.Generator(np.random.PCG64(seed))
    root = directory / "images_background"
    files = {}
    for a in range(alphabets):
        for c in range(characters):
            for d in range(drawings):
                pixels = np.where(rng.random((105, 105)) < 0.9, 255, 0).astype(np.uint8)
                buffer = png_bytes(Image.fromarray(pixels).convert("1"))
                files[f"Alphabet_{a}/character{c + 1:02d}/{a:02d}{c:02d}_{d + 1:02d}.png"] = buffer
    if zipped:
        directory.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(directory / "images_background.zip", "w") as archive:
            for name, data in files.items():
                archive.writestr(f"images_background/{name}", data)
        return
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
