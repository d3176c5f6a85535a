"""lfm2vl/files: atomic writes (the result's modes, nothing left behind on failure) and output-path checks."""
from __future__ import annotations

import json
import stat

import pytest

from lfm2vl.files import atomic, jsontext
from lfm2vl.files.check import OutputError, check_file, check_folder


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_file_gives_the_mode_of_a_plain_write(tmp_path, umask_022):
    atomic.write_text(tmp_path / "a.json", "{}")
    atomic.write_file(tmp_path / "lib.so", lambda tmp: tmp.write_bytes(b"x"), mode=atomic.EXEC_MODE)
    assert (mode(tmp_path / "a.json"), mode(tmp_path / "lib.so")) == (0o644, 0o755)


def test_folder_and_its_files_get_the_modes_of_mkdir_and_open(tmp_path, umask_022):
    with atomic.folder(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
        (tmp / "f.txt").chmod(0o600)  # as safetensors' save_file makes them
        (tmp / "run.sh").write_text("")
        (tmp / "run.sh").chmod(0o700)
    out = tmp_path / "out"
    assert (mode(out), mode(out / "f.txt"), mode(out / "run.sh")) == (0o755, 0o644, 0o755)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_file(tmp_path / "a.txt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"


def test_folder_replaces_an_old_one_only_when_complete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.folder(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in (tmp_path / "out").iterdir()] == [
        "old.txt"]
    with atomic.folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in (tmp_path / "out").iterdir()] == [
        "new.txt"]


@pytest.mark.parametrize("path, message", [
    ("missing/x.json", "--json {t}/missing/x.json: folder {t}/missing does not exist"),
    ("file/x.json", "--json {t}/file/x.json: {t}/file is a file, not a folder"),
    ("file/sub/x.json", "--json {t}/file/sub/x.json: {t}/file is a file, not a folder"),
    ("", "--json {t} is a folder; expected a file name"),
])
def test_check_file_names_the_path_and_why(tmp_path, path, message):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError) as e:
        check_file("--json", f"{tmp_path}/{path}".rstrip("/"))
    assert str(e.value) == message.format(t=tmp_path)


def test_check_file_accepts_missing_folders_that_the_write_creates(tmp_path):
    assert check_file("--output", tmp_path / "a" / "b.tsv", make_parents=True) == tmp_path / "a" / "b.tsv"
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_check_reports_a_folder_that_takes_no_files():
    with pytest.raises(OutputError, match=r"^--output /proc/p.tsv: cannot create files in /proc \("):
        check_file("--output", "/proc/p.tsv")


def test_check_folder_refuses_a_file_on_the_way(tmp_path):
    (tmp_path / "ok.png").write_text("")
    with pytest.raises(OutputError, match=r"^--out .*/ok.png is a file, not a folder$"):
        check_folder("--out", tmp_path / "ok.png")
    with pytest.raises(OutputError, match=r"^--output .*/ok.png/sub: .*/ok.png is a file, not a folder$"):
        check_folder("--output", tmp_path / "ok.png" / "sub", beside=True)


# ---- jsontext: JSON from outside, its nesting bounded ----

def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_loads_reports_too_deep_text_as_a_json_error_at_its_place():
    """Text nested past the recursion limit (and past MAX_DEPTH below it) is a JSONDecodeError pointing at the
    bracket that opens one level too many, never a RecursionError."""
    assert jsontext.loads(nested(jsontext.MAX_DEPTH)) is not None
    before = ' {"a": "[[", "b": '  # brackets inside a string do not count
    for levels in (jsontext.MAX_DEPTH + 1, 100_000):
        with pytest.raises(json.JSONDecodeError) as e:
            jsontext.loads(before + nested(levels) + "}")
        assert e.value.msg == jsontext.too_deep() and e.value.pos == len(before) + jsontext.MAX_DEPTH - 1


def test_loads_reports_an_integer_too_long_to_convert_as_a_json_error():
    with pytest.raises(json.JSONDecodeError) as e:
        jsontext.loads("[1, " + "7" * 5000 + "]")
    assert "more than" in e.value.msg and e.value.pos == 4


def test_check_depth_names_the_field_and_ends_on_a_cycle():
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match=r"^tools\[0\] is nested too deeply"):
        jsontext.check_depth(loop, "tools[0]")
    assert jsontext.check_depth({"a": json.loads(nested(jsontext.MAX_DEPTH - 1))}, "x")
