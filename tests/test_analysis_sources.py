"""--data inputs: text, JSONL, chat JSONL, parquet, datasets folders and stdin give the token
ids an independent encode of the same text gives (the raw ``tokenizers`` object, Jinja for
chat), stream in bounded chunks, and bad input is one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from moescope.analysis.errors import AnalyzeError
from moescope.analysis.sources import SNIFF_BYTES, open_data, sniff_binary
from moescope.data import stdlib_dir

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CODE = stdlib_dir() / "bisect.py"
FIXTURE = Path(__file__).parent / "data" / "hf_saved_dataset"
# What tests/data/hf_saved_dataset holds (written by datasets 5.2.0 save_to_disk, 2 shards).
FIXTURE_TEXTS = [
    "def bisect(a, x):",
    "café naïve résumé",
    "",
    None,
    "return lo + hi",
    "x = [1, 2, 3]",
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHATS = [
    [
        {"role": "user", "content": "what is bisect ?"},
        {"role": "assistant", "content": "it finds an insertion point in a sorted list ."},
    ],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "café ?"}],
]


def _corpus() -> str:
    return CODE.read_text(encoding="utf-8") + "\ncafé naïve résumé — déjà vu\n"


def _raw_tokenizer(text: str) -> Any:
    """A word-level tokenizer whose vocabulary covers ``text`` (no unknown words, so any
    misplaced cut would change the ids), plus chat special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module")
def corpus_text() -> str:
    chat_words = " ".join(m["content"] + " " + m["role"] for c in CHATS for m in c)
    extra = " ".join(t for t in FIXTURE_TEXTS if t) + " " + chat_words
    return _corpus() + extra


@pytest.fixture(scope="module")
def raw(corpus_text: str) -> Any:
    return _raw_tokenizer(corpus_text)


@pytest.fixture(scope="module")
def fast(raw: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", chat_template=TEMPLATE)


def _ids(source: Any, chunk_bytes: int = 1 << 20) -> list[int]:
    chunks = list(source.token_chunks(chunk_bytes))
    for c in chunks:
        assert c.dtype == torch.int64 and c.dim() == 1
    return torch.cat(chunks).tolist() if chunks else []


def _ref(raw: Any, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def _render(messages: list[dict[str, str]]) -> str:
    """The chat template rendered by Jinja directly, with the environment settings
    transformers documents for chat templates (trim_blocks, lstrip_blocks)."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(messages=messages, add_generation_prompt=False)


# --------------------------------------------------------------------------- text


def test_text_file_bytes_and_tokenizer(tmp_path: Path, raw: Any, fast: Any) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    src = open_data(path)
    assert (src.kind, src.label, src.size_bytes) == ("text", "corpus", path.stat().st_size)
    assert _ids(src, chunk_bytes=100) == list(path.read_bytes())
    tok = open_data(path, tokenizer=fast)
    whole = _ref(raw, _corpus())
    assert 0 not in whole  # every word known: a bad cut would show
    for chunk in (1 << 20, 333, 7):  # 7 cuts through multi-byte characters too
        assert _ids(tok, chunk_bytes=chunk) == whole, chunk


def test_text_chunks_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = b"the quick brown fox jumps over the lazy dog\n"
    path.write_bytes(line * 60000)  # 2.6 MB
    sizes = [c.numel() for c in open_data(path).token_chunks(1 << 16)]
    assert max(sizes) <= 1 << 16 and sum(sizes) == path.stat().st_size


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"hello\0world", "NUL byte at offset 5"),
        (b"caf\xe9 latin-1", "invalid UTF-8 at byte 3"),
        (b"\x1f\x8b\x08\x00compressed", "gzip"),
        ("utf16 text".encode("utf-16"), "UTF-16"),
    ],
)
def test_binary_text_is_refused(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(data)
    with pytest.raises(AnalyzeError) as err:
        open_data(path)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg, msg
    assert "pass a text, JSONL, parquet file or a datasets folder" in msg or "UTF-16" in msg


def test_sniff_window_edges() -> None:
    text = "é".encode() * (SNIFF_BYTES // 2)
    assert (
        sniff_binary(text[: SNIFF_BYTES - 1], at_eof=False) is None
    )  # cut character: fine mid-file
    assert "invalid UTF-8" in sniff_binary(text[: SNIFF_BYTES - 1], at_eof=True)


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    cases = {
        tmp_path / "nope.txt": "no such file",
        empty: "is empty",
        tmp_path: "is a directory",
        blank: "no JSON record",
    }
    for path, needle in cases.items():
        with pytest.raises(AnalyzeError) as err:
            open_data(path)
        assert needle in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- JSONL


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def test_jsonl_text_field(tmp_path: Path, raw: Any, fast: Any) -> None:
    lines = _corpus().splitlines()
    records = [{"id": i, "text": t, "body": t.upper()} for i, t in enumerate(lines)]
    path = _jsonl(tmp_path / "docs.jsonl", records)
    src = open_data(path, tokenizer=fast)
    assert (src.kind, src.label, src.text_field) == ("jsonl", "docs", "text")
    joined = "".join(t + "\n" for t in lines)  # records joined with "\n"
    assert _ids(src) == _ref(raw, joined)
    assert _ids(src, chunk_bytes=50) == _ref(raw, joined)  # cut between records only
    assert _ids(open_data(path)) == list(joined.encode("utf-8"))
    upper = open_data(path, text_field="body")
    assert _ids(upper) == list("".join(t.upper() + "\n" for t in lines).encode("utf-8"))
    # A *.json file whose first line is an object is JSONL too; blank lines are skipped.
    j = tmp_path / "docs.json"
    j.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert _ids(open_data(j)) == list(b"a\nb\n")


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl", [{"text": "ok"}, {"text": "fine"}, {"content": "x", "id": 3}]
    )
    src = open_data(path)  # the first record is fine: the file opens
    with pytest.raises(AnalyzeError) as err:
        _ids(src)
    msg = str(err.value)
    assert (
        "line 3" in msg and "'content', 'id'" in msg and "--text-field" in msg and "\n" not in msg
    )
    with pytest.raises(AnalyzeError, match=r"line 1 has no field 'body'.*--text-field"):
        open_data(path, text_field="body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(AnalyzeError, match="line 2 is not valid JSON"):
        _ids(open_data(bad))
    arr = tmp_path / "arr.jsonl"
    arr.write_text('["not", "an", "object"]\n')
    with pytest.raises(AnalyzeError, match="line 1 is a JSON list, not an object"):
        open_data(arr)
    typed = _jsonl(tmp_path / "typed.jsonl", [{"text": ["a", "b"]}])
    with pytest.raises(AnalyzeError, match="'text' is a list, not a string"):
        _ids(open_data(typed))
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(AnalyzeError, match="is a JSON document, not JSONL"):
        open_data(doc)


# --------------------------------------------------------------------------- chat


def test_chat_jsonl_rendered_with_the_template(tmp_path: Path, raw: Any, fast: Any) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    src = open_data(path, tokenizer=fast)
    assert (src.kind, src.chat) == ("chat", True)
    rendered = "".join(_render(m) for m in CHATS)
    assert rendered.count("<|end|>") == 4
    want = _ref(raw, rendered)
    specials = {raw.token_to_id(s) for s in SPECIALS}
    assert sum(i in specials for i in want) == 8  # markers are single special-token ids
    assert _ids(src) == want
    assert _ids(src, chunk_bytes=10) == want


def test_chat_needs_a_tokenizer_with_a_template(tmp_path: Path, raw: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    with pytest.raises(AnalyzeError, match="no tokenizer"):
        open_data(path)
    # The pre-flight check before the model is loaded accepts it (the tokenizer comes later).
    assert open_data(path, tokenizer_pending=True).kind == "chat"
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    with pytest.raises(AnalyzeError, match="no chat template"):
        open_data(path, tokenizer=plain)
    broken = _jsonl(tmp_path / "broken.jsonl", [{"messages": "hello"}])
    with pytest.raises(AnalyzeError, match="'messages' is a str, not a list"):
        open_data(broken, tokenizer=plain)


# --------------------------------------------------------------------------- parquet


def test_parquet_by_row_group(tmp_path: Path, raw: Any, fast: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    lines = _corpus().splitlines()
    texts = [t if i % 7 else None for i, t in enumerate(lines)]  # nulls are skipped
    table = pa.table({"text": texts, "n": list(range(len(texts)))})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=10)
    assert pq.ParquetFile(path).num_row_groups > 3
    src = open_data(path, tokenizer=fast)
    assert (src.kind, src.label) == ("parquet", "rows")
    joined = "".join(t + "\n" for t in texts if t is not None)
    assert _ids(src) == _ref(raw, joined)
    assert _ids(open_data(path)) == list(joined.encode("utf-8"))
    # Detected by its magic bytes whatever the name.
    renamed = tmp_path / "rows.bin"
    renamed.write_bytes(path.read_bytes())
    assert open_data(renamed).kind == "parquet"
    with pytest.raises(AnalyzeError, match=r"no column 'body' \(columns: text, n\).*--text-field"):
        open_data(path, text_field="body")
    with pytest.raises(AnalyzeError, match="column 'n' holds int64, not text"):
        open_data(path, text_field="n")
    fake = tmp_path / "fake.parquet"
    fake.write_text("just text")
    with pytest.raises(AnalyzeError, match="not a parquet file"):
        open_data(fake)


def test_parquet_chat_column(tmp_path: Path, raw: Any, fast: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": CHATS}), path)
    src = open_data(path, tokenizer=fast)
    assert (src.kind, src.chat) == ("parquet", True)
    assert _ids(src) == _ref(raw, "".join(_render(m) for m in CHATS))


# --------------------------------------------------------------------------- datasets


def _fixture_joined() -> str:
    return "".join(t + "\n" for t in FIXTURE_TEXTS if t is not None)


@pytest.mark.parametrize("use_lib", [False, True])
def test_datasets_folder_saved_by_datasets(
    use_lib: bool, raw: Any, fast: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed folder was written by ``datasets`` itself: read through
    ``load_from_disk`` when the library is there, else through its Arrow files."""
    pytest.importorskip("pyarrow")
    import moescope.analysis.sources as S

    if use_lib:
        pytest.importorskip("datasets")
    else:
        monkeypatch.setattr(S, "_datasets_lib", lambda: None)
    src = open_data(FIXTURE, tokenizer=fast)
    assert (src.kind, src.label) == ("datasets", "hf_saved_dataset")
    assert _ids(src) == _ref(raw, _fixture_joined())
    assert _ids(open_data(FIXTURE)) == list(_fixture_joined().encode("utf-8"))
    with pytest.raises(AnalyzeError, match=r"no column 'body' \(columns: text, id\)"):
        open_data(FIXTURE, text_field="body")
    with pytest.raises(AnalyzeError, match="row 1: field 'id' is a int, not a string"):
        _ids(open_data(FIXTURE, text_field="id"))


def test_datasets_save_to_disk_roundtrip(tmp_path: Path, raw: Any, fast: Any) -> None:
    datasets = pytest.importorskip("datasets")
    lines = _corpus().splitlines()
    ds = datasets.Dataset.from_dict({"text": lines})
    ds.save_to_disk(str(tmp_path / "corpus"), num_shards=3)
    src = open_data(tmp_path / "corpus", tokenizer=fast)
    assert _ids(src) == _ref(raw, "".join(t + "\n" for t in lines))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        AnalyzeError, match=r"DatasetDict with splits \['train', 'test'\].*dd/train"
    ):
        open_data(tmp_path / "dd")


def test_dataset_dict_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    with pytest.raises(AnalyzeError, match=r"splits \['train', 'validation'\]; pass one split"):
        open_data(tmp_path / "dd")


# --------------------------------------------------------------------------- stdin


def test_stdin_through_a_real_pipe(raw: Any, fast: Any) -> None:
    text = _corpus() * 50  # > 128 KiB: the sniffed head is replayed, then the pipe goes on
    data = text.encode("utf-8")
    assert len(data) > 2 * SNIFF_BYTES
    for tokenizer, want in ((None, list(data)), (fast, _ref(raw, text))):
        r, w = os.pipe()

        def feed(fd: int = w) -> None:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)

        t = threading.Thread(target=feed)
        t.start()
        with os.fdopen(r, "rb") as stream:
            src = open_data("-", tokenizer=tokenizer, stdin=stream)
            assert (src.kind, src.label, src.path) == ("stdin", "stdin", "-")
            assert _ids(src, chunk_bytes=4096) == want
            with pytest.raises(AnalyzeError, match="only once"):
                _ids(src)
        t.join()


def test_stdin_in_a_subprocess() -> None:
    """The default stream is the process's real standard input."""
    code = (
        "from moescope.analysis.sources import open_data\n"
        "src = open_data('-')\n"
        "print(','.join(str(i) for c in src.token_chunks(7) for i in c.tolist()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    good = subprocess.run(
        [sys.executable, "-c", code],
        input="héllo\nworld".encode(),
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.decode().strip() == ",".join(str(b) for b in "héllo\nworld".encode())


@pytest.mark.parametrize(("data", "needle"), [(b"\x00\x01\x02", "NUL byte"), (b"", "is empty")])
def test_bad_stdin_is_one_line(data: bytes, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    with os.fdopen(w, "wb") as fh:
        fh.write(data)
    with os.fdopen(r, "rb") as raw_in:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw_in))
        with pytest.raises(AnalyzeError) as err:
            open_data("-")
    assert needle in str(err.value) and "\n" not in str(err.value)
