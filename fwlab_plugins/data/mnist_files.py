"""MNIST from its original idx files (LeCun et al.), gzipped or not, as torchvision lays them out.

Looked for under ``root`` and ``root/MNIST/raw`` (torchvision's layout)::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]     60,000 images
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]      10,000 images

With ``download=True`` and nothing found, torchvision's ``MNIST(root, download=True)`` fetches
them (the real download path; it needs torchvision and the network). A root that holds only one
of the two sets (e.g. the test set alone) is used as a pool that :func:`split_pool` divides.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from fwlab.errors import ConfigError

SETS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (``.gz`` or raw) as an array of its declared type and shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise ConfigError(f"cannot read idx file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ConfigError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[data[2]])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ConfigError(f"{path}: header says shape {shape}, file holds {body.size} values")
    return body.reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_sets(root: Path) -> dict[str, tuple[Path, Path]]:
    """The MNIST sets (``train``, ``t10k``) whose image and label files are under ``root``."""
    found = {}
    for name, (images, labels) in SETS.items():
        image_path, label_path = _find(root, images), _find(root, labels)
        if image_path is not None and label_path is not None:
            found[name] = (image_path, label_path)
    return found


def load_mnist(
    root: str | Path, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{set: (images uint8 (N, 28, 28), labels int64 (N,))}`` for every set found."""
    root = Path(root).expanduser()
    found = find_sets(root)
    if not found and download:
        try:
            from torchvision.datasets import MNIST
        except ImportError as error:
            raise ConfigError(
                f"data.download=true needs torchvision ({error}); or put the idx files in {root}"
            ) from None
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
        found = find_sets(root)
    if not found:
        wanted = ", ".join(f"{n}[.gz]" for pair in SETS.values() for n in pair)
        raise ConfigError(
            f"no MNIST idx files under data.root={root} (nor {root / 'MNIST' / 'raw'}): looked for "
            f"{wanted}. Pass data.download=true to fetch them with torchvision, or copy them there."
        )
    result = {}
    for name, (image_path, label_path) in found.items():
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"{image_path} and {label_path} do not match: shapes {images.shape}, {labels.shape}"
            )
        result[name] = (images, labels.astype(np.int64))
    return result


def split_pool(
    count: int, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, disjoint train/val/test indices covering ``range(count)`` in the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"data split fractions must be >= 0 and sum to 1, got {fractions}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(count)
    train_end = int(round(fractions[0] * count))
    val_end = train_end + int(round(fractions[1] * count))
    return order[:train_end], order[train_end:val_end], order[val_end:]


def mnist_splits(
    root: str | Path,
    download: bool,
    val_size: int,
    pool_fractions: tuple[float, float, float],
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"val"|"test": (images, labels)}`` from whatever MNIST sets ``root`` holds.

    Both sets: ``val_size`` seeded images of the 60,000 for validation, the 10,000 for test.
    One set only (e.g. ``shared/data/mnist``'s test set): a seeded split of that pool by
    ``pool_fractions`` (train, val, test).
    """
    sets = load_mnist(root, download)
    if "train" in sets and "t10k" in sets:
        images, labels = sets["train"]
        if not 0 <= val_size < len(images):
            raise ConfigError(f"data.val_size={val_size} must be in [0, {len(images)})")
        order = np.random.Generator(np.random.PCG64(seed)).permutation(len(images))
        val, train = order[:val_size], order[val_size:]
        return {
            "train": (images[train], labels[train]),
            "val": (images[val], labels[val]),
            "test": sets["t10k"],
        }
    ((images, labels),) = sets.values()
    train, val, test = split_pool(len(images), pool_fractions, seed)
    return {
        name: (images[index], labels[index])
        for name, index in (("train", train), ("val", val), ("test", test))
    }


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(payload)


def write_idx_set(
    directory: Path, name: str, images: np.ndarray, labels: np.ndarray, gzipped: bool = True
) -> None:
    """Write one MNIST set (``train`` or ``t10k``) in the original file names."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    image_name, label_name = SETS[name]
    write_idx(directory / f"{image_name}{suffix}", images)
    write_idx(directory / f"{label_name}{suffix}", labels)


def random_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random 28×28 uint8 'images' and labels 0-9, for tiny examples and tests."""
    rng = np.random.Generator(np.random.PCG64(seed))
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return images, np.arange(count, dtype=np.uint8) % 10
