"""Byte-level stdlib data: deterministic bytes, fixed-length blocks, splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moescope.data import (
    SKIP_DIRS,
    ByteDataset,
    iter_stdlib_files,
    stdlib_bytes,
    stdlib_datasets,
    stdlib_dir,
)


def make_tree(root: Path) -> dict[str, bytes]:
    """A small source tree; returns {relative path: content} of the files that count."""
    files = {
        "b.py": b"print('b')\n",
        "a.py": b"import os\n",
        "pkg/__init__.py": b"# pkg\n",
        "pkg/z.py": b"z = 1\n",
        "pkg/sub/m.py": b"def m():\n    return 2\n",
        "aa/x.py": b"x = 'aa'\n",
    }
    skipped = {
        "site-packages/third.py": b"third party\n",
        "test/test_a.py": b"test\n",
        "pkg/__pycache__/z.py": b"cache\n",
        "notes.txt": b"not python\n",
        "empty.py": b"",
    }
    for rel, data in {**files, **skipped}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def reference_bytes(root: Path, files: dict[str, bytes]) -> bytes:
    # Depth-first with sorted entries == sorting by path components.
    order = sorted(files, key=lambda rel: Path(rel).parts)
    return b"".join(files[rel] + b"\n\n" for rel in order)


def test_file_order_skips_and_exact_bytes(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    listed = [p.relative_to(tmp_path).as_posix() for p in iter_stdlib_files(tmp_path)]
    # Empty files are listed but contribute no bytes.
    assert listed == [
        "a.py",
        "aa/x.py",
        "b.py",
        "empty.py",
        "pkg/__init__.py",
        "pkg/sub/m.py",
        "pkg/z.py",
    ]
    full = reference_bytes(tmp_path, files)
    assert stdlib_bytes(10_000, root=tmp_path) == full
    assert stdlib_bytes(17, root=tmp_path) == full[:17]
    assert stdlib_bytes(17, root=tmp_path) == stdlib_bytes(17, root=tmp_path)


def test_no_sources_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match=r"no \.py source files.*root="):
        stdlib_bytes(100, root=tmp_path)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_bytes(0, root=tmp_path)


def test_real_stdlib_is_deterministic() -> None:
    a = stdlib_bytes(50_000)
    b = stdlib_bytes(50_000)
    assert a == b and len(a) == 50_000
    first = next(iter_stdlib_files())
    assert a.startswith(first.read_bytes())
    assert first.is_relative_to(stdlib_dir())
    paths = list(iter_stdlib_files())
    assert len(paths) > 50
    for path in paths:
        assert path.suffix == ".py"
        assert not SKIP_DIRS.intersection(path.relative_to(stdlib_dir()).parts[:-1])


def test_blocks_labels_and_split() -> None:
    data = bytes((i * 7) % 256 for i in range(1000))
    tokens = torch.tensor(list(data))
    train = ByteDataset(data, seq_len=32, split="train", eval_fraction=0.2)
    evals = ByteDataset(data, seq_len=32, split="eval", eval_fraction=0.2)
    assert len(train) == 800 // 32 and len(evals) == 200 // 32
    # The two splits are one contiguous cut of the stream.
    assert torch.equal(torch.cat([train.tokens, evals.tokens]), tokens)
    item = train[3]
    assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.int64
    assert torch.equal(item["input_ids"], tokens[96:128])
    assert torch.equal(item["labels"], item["input_ids"])
    assert torch.equal(item["attention_mask"], torch.ones(32, dtype=torch.int64))
    assert torch.equal(evals[-1]["input_ids"], tokens[800 + 5 * 32 : 800 + 6 * 32])
    with pytest.raises(IndexError):
        train[len(train)]


def test_sample_batch_windows_are_contiguous_and_seeded() -> None:
    data = bytes(range(256)) * 4
    ds = ByteDataset(data, seq_len=16, split="all")
    a = ds.sample_batch(5, torch.Generator().manual_seed(3))
    b = ds.sample_batch(5, torch.Generator().manual_seed(3))
    assert a["input_ids"].shape == (5, 16)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["labels"], a["input_ids"])
    # bytes(range(256)) repeated: every window increases by one modulo 256.
    diffs = (a["input_ids"][:, 1:] - a["input_ids"][:, :-1]) % 256
    assert torch.equal(diffs, torch.ones_like(diffs))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        ByteDataset(b"abc", seq_len=1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ByteDataset(b"abcdef", seq_len=64, split="all")
    with pytest.raises(ValueError, match="split"):
        ByteDataset(b"abcdef", seq_len=2, split="valid")


def test_stdlib_datasets_collate_for_trainer() -> None:
    transformers = pytest.importorskip("transformers")
    train, evals = stdlib_datasets(seq_len=64, max_bytes=20_000)
    assert len(train) == 18_000 // 64 and len(evals) == 2_000 // 64
    batch = transformers.default_data_collator([train[0], train[1]])
    assert batch["input_ids"].shape == (2, 64)
    assert torch.equal(batch["labels"], batch["input_ids"])
