"""``embeddings``: aligned per-modality embedding vectors from an ``.npz`` file.

The file maps modality names to ``(N, D_m)`` arrays whose row i belongs to the same item
(e.g. ``tests/fixtures/msrvtt884_gram_step0.npz``: ``text``, ``video``, ``audio``,
``subtitles``, each (884, 512)). Records are ``{<modality>: (D_m,) float32, "index": row}``;
the split is a seeded random partition of the rows (``split_rows``), rows kept in ascending
order inside each split.

Two equivalent sources:

* the TFDS builder ``Embeddings`` (``prepare("embeddings", data_dir, npz_path=...)``), so
  the same ``prepare`` / ``load_source`` / ArrayRecord path serves every dataset; the config
  name hashes the file's bytes, the test fraction and the seed;
* ``NpzEmbeddingSource``: the same records straight from memory, with no files written.
  Embedding tables are small (884 x 4 x 512 floats = 7 MB), so for quick evaluation and
  notebooks a copy on disk buys nothing; it is picklable for grain workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from gram_jax.data._tfds import LocalBuilder

SPLITS = ("train", "test")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{modality: (N, D) float32}`` from ``path``; raises ValueError on malformed files."""
    with np.load(path) as z:
        arrays = {k: np.asarray(z[k]) for k in z.files}
    return check_arrays(arrays, source=str(path))


def check_arrays(arrays: dict[str, np.ndarray], source: str = "arrays") -> dict[str, np.ndarray]:
    """Validate aligned ``{name: (N, D)}`` float arrays and cast them to float32."""
    if not arrays:
        raise ValueError(f"{source}: no arrays")
    out, n = {}, None
    for k, v in arrays.items():
        if not _NAME.match(k) or k == "index":
            raise ValueError(
                f"{source}: invalid modality name {k!r} (letters, digits, _; not 'index')"
            )
        if v.ndim != 2 or not np.issubdtype(v.dtype, np.floating):
            raise ValueError(
                f"{source}: {k!r} must be a 2-D float array, got {v.dtype}{list(v.shape)}"
            )
        if n is not None and v.shape[0] != n:
            raise ValueError(f"{source}: {k!r} has {v.shape[0]} rows, expected {n}")
        n = v.shape[0]
        out[k] = v.astype(np.float32)
    if n < 2:
        raise ValueError(f"{source}: need at least 2 rows, got {n}")
    return out


def split_rows(n: int, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted row ids of ``split`` ("train" / "test"): a seeded partition of ``range(n)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test == 0 or n_test == n:
        raise ValueError(f"test_fraction {test_fraction} of {n} rows leaves an empty split")
    perm = np.random.default_rng(seed).permutation(n)
    rows = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(rows)


class NpzEmbeddingSource:
    """In-memory random-access source: ``source[i] = {name: (D,) float32, "index": row}``."""

    def __init__(
        self,
        npz: str | os.PathLike | dict[str, np.ndarray],
        split: str = "train",
        *,
        test_fraction: float = 0.2,
        seed: int = 0,
    ):
        arrays = check_arrays(dict(npz)) if isinstance(npz, dict) else read_npz(npz)
        n = next(iter(arrays.values())).shape[0]
        self._rows = split_rows(n, split, test_fraction, seed)
        self._arrays = {k: v[self._rows] for k, v in arrays.items()}
        self.modalities = {k: "features" for k in arrays}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        i = int(i)
        out = {k: v[i] for k, v in self._arrays.items()}
        out["index"] = np.int32(self._rows[i])
        return out

    def __repr__(self) -> str:
        dims = {k: v.shape[1] for k, v in self._arrays.items()}
        return f"NpzEmbeddingSource(len={len(self)}, dims={dims})"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """First 12 hex digits of the file's SHA-256 (part of the config name)."""
    return sha256_file(path)[:12]


@dataclasses.dataclass
class EmbeddingsConfig(tfds.core.BuilderConfig):
    """Builder configuration. ``npz_path`` is required."""

    npz_path: str = ""
    test_fraction: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        if not self.npz_path:
            raise ValueError("the embeddings dataset needs npz_path=<file.npz>")
        if not os.path.isfile(self.npz_path):
            raise ValueError(f"npz_path {self.npz_path!r} is not a file")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    def identity(self) -> dict:
        """What makes two configs the same data: file content, fraction and seed."""
        return {
            "sha256": file_digest(self.npz_path),
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }


class Embeddings(LocalBuilder):
    """TFDS builder of ``embeddings`` (see the module docstring)."""

    BUILDER_CONFIGS = [EmbeddingsConfig(name="default")]

    def _arrays(self) -> dict[str, np.ndarray]:
        return read_npz(self.builder_config.npz_path)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        arrays = self._arrays() if c.npz_path else {}
        feats = {
            k: tfds.features.Tensor(shape=(v.shape[1],), dtype=np.float32)
            for k, v in arrays.items()
        }
        feats["index"] = tfds.features.Scalar(dtype=np.int32)
        return self.local_info(
            "Aligned per-modality embeddings from an .npz file.",
            feats,
            modalities={k: "features" for k in arrays},
            npz_path=os.path.abspath(c.npz_path) if c.npz_path else "",
            test_fraction=c.test_fraction,
            seed=c.seed,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split: str):
        c = self.builder_config
        arrays = self._arrays()
        n = next(iter(arrays.values())).shape[0]
        for row in split_rows(n, split, c.test_fraction, c.seed):
            yield int(row), {**{k: v[row] for k, v in arrays.items()}, "index": int(row)}
