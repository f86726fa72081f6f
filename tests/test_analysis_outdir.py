"""--out safety: a foreign non-empty directory is refused, a previous moescope output is
reused (its stale files removed), writes never follow a planted symlink, names cannot
escape the directory, and files appear whole (temp file + rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moescope.analysis.errors import AnalyzeError
from moescope.analysis.outdir import (
    MARKER,
    is_moescope_output,
    prepare_out_dir,
    save_figure,
    write_bytes,
    write_text,
)


def test_new_and_empty_directories_get_a_marker(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "a" / "b", overwrite=False)
    assert out.is_dir()
    marker = json.loads((out / MARKER).read_text())
    from moescope import __version__

    assert marker["tool"] == "moescope" and marker["version"] == __version__
    assert marker["files"] == [] and marker["created"].endswith("Z")
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_out_dir(empty, overwrite=False)
    assert is_moescope_output(empty)
    assert not is_moescope_output(tmp_path)


def test_foreign_non_empty_directory_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AnalyzeError) as err:
        prepare_out_dir(out, overwrite=False)
    msg = str(err.value)
    assert "\n" not in msg and "--overwrite" in msg and "notes.txt" in msg
    assert not (out / MARKER).exists()  # nothing written on refusal
    prepare_out_dir(out, overwrite=True)
    write_text(out, "report.html", "<html></html>")
    assert (out / "notes.txt").read_text() == "keep me"  # overwrite deletes nothing of yours
    assert (out / "report.html").read_text() == "<html></html>"


def test_a_file_is_not_an_out_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AnalyzeError, match="is not a directory"):
        prepare_out_dir(f, overwrite=True)


def test_a_forged_marker_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    outside = tmp_path / "marker.json"
    outside.write_text(json.dumps({"tool": "moescope", "files": ["data.csv"]}))
    (out / MARKER).symlink_to(outside)  # a symlink is not our marker
    with pytest.raises(AnalyzeError, match="not a moescope output"):
        prepare_out_dir(out, overwrite=False)
    (out / MARKER).unlink()
    (out / MARKER).write_text(json.dumps({"tool": "other", "files": ["data.csv"]}))
    with pytest.raises(AnalyzeError, match="not a moescope output"):
        prepare_out_dir(out, overwrite=False)
    assert (out / "data.csv").read_text() == "1,2"


def test_previous_output_is_reused_and_its_stale_files_removed(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    write_text(out, "summary.json", "{}")
    write_bytes(out, "neurons.png", b"\x89PNG old")
    (out / "user_added.txt").write_text("not recorded")
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == [
        "neurons.png",
        "summary.json",
    ]
    # A second run into the same directory: no --overwrite needed, stale figures gone.
    prepare_out_dir(out, overwrite=False)
    assert not (out / "neurons.png").exists() and not (out / "summary.json").exists()
    assert (out / "user_added.txt").read_text() == "not recorded"
    assert json.loads((out / MARKER).read_text())["files"] == []


def test_symlink_at_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    (out / "report.html").symlink_to(victim)
    (out / "summary.json").symlink_to(tmp_path / "does-not-exist")  # dangling
    write_text(out, "report.html", "<html>report</html>")
    write_text(out, "summary.json", "{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "does-not-exist").exists()
    for name, text in (("report.html", "<html>report</html>"), ("summary.json", "{}")):
        assert not (out / name).is_symlink()
        assert (out / name).read_text() == text
    # Stale-file removal also unlinks a symlink entry without touching its target.
    (out / "x.png").symlink_to(victim)
    marker = json.loads((out / MARKER).read_text())
    marker["files"].append("x.png")
    (out / MARKER).write_text(json.dumps(marker))
    prepare_out_dir(out, overwrite=False)
    assert not os.path.lexists(out / "x.png") and victim.read_text() == "precious"


def test_symlinked_marker_or_subdir_cannot_redirect(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    (out / "figs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AnalyzeError, match="one path component"):
        write_text(out, "figs/a.png", "x")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "..", ".", "", "a/b", "/etc/passwd", "a\\b", MARKER])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    with pytest.raises(AnalyzeError) as err:
        write_text(out, name, "x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "evil").exists()


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    payload = os.urandom(3 << 20)
    write_bytes(out, "big.bin", payload)
    write_bytes(out, "big.bin", payload[::-1])  # replaced in one rename
    assert (out / "big.bin").read_bytes() == payload[::-1]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "big.bin"]
    assert (out / "big.bin").stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_directory_in_the_way_is_one_line(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    (out / "report.html").mkdir()
    with pytest.raises(AnalyzeError, match="directory of that name is in the way"):
        write_text(out, "report.html", "x")


def test_write_failure_is_one_line(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    (out / MARKER).unlink()
    out.rmdir()  # the directory vanished between runs of the pipeline
    with pytest.raises(AnalyzeError) as err:
        write_text(out, "report.html", "x")
    assert "choose a writable directory" in str(err.value) and "\n" not in str(err.value)


def test_save_figure_writes_a_real_png(tmp_path: Path) -> None:
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out = prepare_out_dir(tmp_path / "o", overwrite=False)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (out / "usage.png").symlink_to(victim)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = save_figure(out, "usage.png", fig, dpi=50)
    plt.close(fig)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and victim.read_bytes() == b"keep"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (100, 100)  # 2 in x 50 dpi, read back from the IHDR chunk
    assert "usage.png" in json.loads((out / MARKER).read_text())["files"]
