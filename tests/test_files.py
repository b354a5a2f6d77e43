"""plca.files: atomic writes leave the old file or the new one, never half a file or a temporary
file; flatten turns nested dicts into dotted keys."""

import errno
import json
import os
import stat

import pytest

from plca.files import (atomic_open, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, flatten,
                        temporary_name)


class Boom(Exception):
    pass


def test_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "néw\n")
    assert path.read_text(encoding="utf-8") == "néw\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write_json(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    atomic_write_json(path, {"a": 1}, indent=None)
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["a.txt"]


def test_the_temporary_name_is_hidden_beside_the_file(tmp_path):
    name = temporary_name(tmp_path / "last.pt")
    assert name.parent == tmp_path and name.name.startswith(".last.pt.") and name.name.endswith(".tmp")
    assert len(name.name) == len(".last.pt.") + 32 + len(".tmp")
    assert temporary_name(tmp_path / "last.pt") != name


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, error):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    with pytest.raises(error):
        with atomic_open(path, "w") as handle:
            handle.write("half of the new")
            raise error()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]

    with pytest.raises(error):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise error()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_an_unserialisable_json_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["a.json"]


def test_a_failing_rename_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "folder", folder=True) as tmp:
            (tmp / "inside.txt").write_text("x")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_a_real_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    """The temporary file is /dev/full: the write fails with the kernel's ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    real_open = os.open

    def open_full(name, flags, mode=0o777, **kwargs):
        if str(name).endswith(".tmp"):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(name, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, bytes(1 << 20))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_new_files_and_folders_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.unlink()  # a writer that makes its own private file (as safetensors may)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        with atomic_path(tmp_path / "data", folder=True) as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755


def test_a_folder_replaces_an_absent_or_empty_folder_as_a_whole(tmp_path):
    root = tmp_path / "data"
    with atomic_path(root, folder=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".data.")
        (tmp / "a.txt").write_text("a")
    assert sorted(os.listdir(tmp_path)) == ["data"] and (root / "a.txt").read_text() == "a"

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_path(empty, folder=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert os.listdir(empty) == ["b.txt"]

    with pytest.raises(Boom):
        with atomic_path(tmp_path / "broken", folder=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "c.txt").write_text("c")
            raise Boom()
    assert sorted(os.listdir(tmp_path)) == ["data", "empty"]

    with pytest.raises(OSError):  # os.replace does not replace a folder that holds files
        with atomic_path(root, folder=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(root) == ["a.txt"] and sorted(os.listdir(tmp_path)) == ["data", "empty"]


def test_atomic_open_refuses_modes_that_do_not_write_a_new_file(tmp_path):
    for mode in ("a", "r", "r+b", "ab"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_open(tmp_path / "a", mode):
                pass
    assert os.listdir(tmp_path) == []


def test_flatten_nested_dicts_and_lists():
    assert flatten({"train": {"lr": 1, "schedule": {"name": "poly", "power": 0.9}}, "seed": 0}) == {
        "train.lr": 1, "train.schedule.name": "poly", "train.schedule.power": 0.9, "seed": 0}
    # lists (of anything, dicts included) and tuples are values, not flattened
    assert flatten({"a": [1, {"b": 2}], "c": (3, 4), "d": []}) == {"a": [1, {"b": 2}], "c": (3, 4), "d": []}
    # an empty dict inside is kept as a value; an empty dict at the top has no keys
    assert flatten({"a": {}, "b": {"c": {}}}) == {"a": {}, "b.c": {}}
    assert flatten({}) == {}
    assert flatten(5) == {"": 5} and flatten([1], "x") == {"x": [1]}
    assert flatten({"a": {"b": 1}}, "top") == {"top.a.b": 1}
    assert flatten({1: {2: "x"}, None: 3}) == {"1.2": "x", "None": 3}
