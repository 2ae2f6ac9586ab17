"""The embeddings artifact: user and item vectors with their ids, as one directory.

The directory is replaced as a whole:

| file               | content                                                     |
| ------------------ | ----------------------------------------------------------- |
| `item_vectors.npy` | float32 [n_items, rank]; row i belongs to `item_ids[i]`     |
| `item_ids.json`    | list of item ids in row order                               |
| `user_vectors.npy` | float32 [n_users, rank]                                     |
| `user_ids.json`    | list of user ids in row order                               |
| `manifest.json`    | model `als`, its config, counts, the data's time range, ... |

`batch.als.train_als` writes it; the retrieval server and the index build read it
with `load_embeddings`, which needs numpy only.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inkling.errors import InvalidInputError, NotFoundError

FORMAT_VERSION = 1
FILES = ("item_vectors.npy", "item_ids.json", "user_vectors.npy", "user_ids.json", "manifest.json")


@dataclass(frozen=True)
class EmbeddingsArtifact:
    """User and item vectors with their ids (row i of the vectors belongs to id i)."""

    item_ids: list[str]
    item_vectors: np.ndarray
    user_ids: list[str]
    user_vectors: np.ndarray
    manifest: dict[str, Any]

    @property
    def rank(self) -> int:
        return int(self.item_vectors.shape[1])


def write_embeddings(artifact: EmbeddingsArtifact, out_dir: Path) -> None:
    """Write the artifact as a whole: readers see the old directory or the new one."""
    _check(artifact, out_dir)
    with atomic_directory(out_dir) as tmp:
        np.save(tmp / "item_vectors.npy", artifact.item_vectors)
        np.save(tmp / "user_vectors.npy", artifact.user_vectors)
        (tmp / "item_ids.json").write_text(json.dumps(artifact.item_ids))
        (tmp / "user_ids.json").write_text(json.dumps(artifact.user_ids))
        (tmp / "manifest.json").write_text(json.dumps(artifact.manifest, indent=1) + "\n")


@contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """A fresh temporary sibling of `target`, renamed over it when the block succeeds.

    Nothing of a failed block is left behind, and `target` is untouched by it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load_embeddings(directory: Path | str) -> EmbeddingsArtifact:
    """Read an artifact that `train_als` (or `write_embeddings`) wrote."""
    root = Path(directory)
    missing = [name for name in FILES if not (root / name).exists()]
    if missing:
        raise NotFoundError(f"embeddings directory {root} lacks {', '.join(missing)}")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        item_ids = json.loads((root / "item_ids.json").read_text())
        user_ids = json.loads((root / "user_ids.json").read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"embeddings directory {root} holds invalid JSON: {e}") from e
    try:
        item_vectors = np.load(root / "item_vectors.npy", allow_pickle=False)
        user_vectors = np.load(root / "user_vectors.npy", allow_pickle=False)
    except ValueError as e:
        raise InvalidInputError(f"embeddings directory {root} holds an unreadable .npy: {e}") from e
    artifact = EmbeddingsArtifact(item_ids, item_vectors, user_ids, user_vectors, manifest)
    _check(artifact, root)
    return artifact


def _check(artifact: EmbeddingsArtifact, where: Path) -> None:
    for kind in ("item", "user"):
        ids: list[str] = getattr(artifact, f"{kind}_ids")
        vectors: np.ndarray = getattr(artifact, f"{kind}_vectors")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidInputError(f"{where}: {kind}_ids must be a list of strings")
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise InvalidInputError(
                f"{where}: {kind}_vectors must be a float32 matrix, got {vectors.dtype} "
                f"of shape {vectors.shape}"
            )
        if len(ids) != vectors.shape[0]:
            raise InvalidInputError(
                f"{where}: {len(ids)} {kind} ids but {vectors.shape[0]} {kind} vectors"
            )
        if len(set(ids)) != len(ids):
            raise InvalidInputError(f"{where}: {kind}_ids has duplicates")
    if artifact.item_vectors.shape[1] != artifact.user_vectors.shape[1]:
        raise InvalidInputError(
            f"{where}: item vectors have dimension {artifact.item_vectors.shape[1]}, "
            f"user vectors {artifact.user_vectors.shape[1]}"
        )
