"""Byte-level training data from the Python standard library's own ``.py`` sources.

Every Python installation ships a few megabytes of source code, so demos and tests can
train a byte-level LM (vocabulary = the 256 byte values) with no download. Files are read in
a fixed order (sorted relative paths, depth first), so for one Python installation the
bytes are the same on every run.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset

# Directories skipped: third-party packages, the (large, repetitive) test suites, caches.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "lib2to3",  # mostly grammar fixtures and tests in the versions that still ship it
    }
)


def stdlib_dir() -> Path:
    """The standard library directory of the running interpreter (``sysconfig``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield the ``.py`` files under ``root`` (default: the stdlib) in a fixed order.

    Order: depth first, entries of each directory sorted by name; directories in
    ``SKIP_DIRS`` and hidden ones are skipped; symlinked directories are not followed.
    """
    base = Path(root) if root is not None else stdlib_dir()

    def walk(d: Path) -> Iterator[Path]:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if e.name not in SKIP_DIRS:
                    yield from walk(Path(e.path))
            elif e.name.endswith(".py") and e.is_file():
                yield Path(e.path)

    yield from walk(base)


def stdlib_bytes(max_bytes: int = 2_000_000, root: str | os.PathLike[str] | None = None) -> bytes:
    """Concatenated source bytes of the standard library, at most ``max_bytes`` long.

    Files are separated by a blank line and read in :func:`iter_stdlib_files` order; the
    result is the same on every call for one installation. ``root`` overrides the
    directory (any tree of ``.py`` files works).

    Raises:
        ValueError: ``max_bytes`` < 1.
        FileNotFoundError: no ``.py`` source was found (e.g. a stripped, bytecode-only
            Python); pass ``root=`` pointing at a directory with ``.py`` files, or build a
            :class:`ByteDataset` from your own bytes.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    base = Path(root) if root is not None else stdlib_dir()
    chunks: list[bytes] = []
    total = 0
    for path in iter_stdlib_files(base):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        data = data + b"\n\n"
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(
            f"no .py source files found under {str(base)!r} (is this a bytecode-only Python?). "
            "Pass root= pointing at a directory of .py files, or build "
            "ByteDataset(your_bytes, seq_len) from your own data."
        )
    return b"".join(chunks)


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """[N] int64 tensor of byte values (0..255)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


class ByteDataset(Dataset):
    """Fixed-length byte blocks for causal LM training; a map-style torch Dataset.

    Args:
        data: bytes, or an [N] integer tensor of token ids.
        seq_len: S, the block length.
        split: "train" (the first ``1 - eval_fraction`` of the stream), "eval" (the
            rest) or "all". The split is a cut of the byte stream, so it is
            deterministic and the two parts never overlap.
        eval_fraction: share of the stream held out for "eval".

    ``ds[i]`` is ``{"input_ids": [S] int64, "labels": [S] (= input_ids; the model shifts),
    "attention_mask": [S] int64 ones}``: non-overlapping consecutive blocks, the form the
    transformers Trainer and its default collator take. :meth:`sample_batch` draws blocks
    at random offsets instead (more distinct windows for a short demo run).
    """

    def __init__(
        self,
        data: bytes | torch.Tensor,
        seq_len: int,
        split: str = "train",
        eval_fraction: float = 0.1,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one input and one target), got {seq_len}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        tokens = bytes_to_tensor(data) if isinstance(data, (bytes, bytearray)) else data
        tokens = torch.as_tensor(tokens).reshape(-1).to(torch.int64)
        n_train = int(tokens.numel() * (1.0 - eval_fraction))
        if split == "train":
            tokens = tokens[:n_train]
        elif split == "eval":
            tokens = tokens[n_train:]
        if tokens.numel() < seq_len:
            raise ValueError(
                f"the {split!r} split has {tokens.numel()} tokens, fewer than seq_len={seq_len}; "
                "use more data (a larger max_bytes) or a shorter seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.split = split

    def __len__(self) -> int:
        return self.tokens.numel() // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"block {index} out of range for {n} blocks")
        block = self.tokens[index * self.seq_len : (index + 1) * self.seq_len].clone()
        return {
            "input_ids": block,
            "labels": block.clone(),
            "attention_mask": torch.ones_like(block),
        }

    def sample_batch(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """B blocks at uniformly random offsets: dict of [B, S] tensors (as ``ds[i]``)."""
        high = self.tokens.numel() - self.seq_len + 1
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        idx = starts.unsqueeze(1) + torch.arange(self.seq_len)
        block = self.tokens[idx]
        return {
            "input_ids": block,
            "labels": block.clone(),
            "attention_mask": torch.ones_like(block),
        }


def stdlib_datasets(
    seq_len: int, max_bytes: int = 2_000_000, eval_fraction: float = 0.1
) -> tuple[ByteDataset, ByteDataset]:
    """(train, eval) :class:`ByteDataset` over :func:`stdlib_bytes` (``max_bytes``)."""
    data = stdlib_bytes(max_bytes)
    return (
        ByteDataset(data, seq_len, "train", eval_fraction),
        ByteDataset(data, seq_len, "eval", eval_fraction),
    )


__all__ = [
    "ByteDataset",
    "bytes_to_tensor",
    "iter_stdlib_files",
    "stdlib_bytes",
    "stdlib_datasets",
    "stdlib_dir",
]
