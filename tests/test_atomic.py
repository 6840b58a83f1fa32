"""pipeline/atomic.py: a file or folder is replaced whole or not at all."""

from __future__ import annotations

import json

import pytest

from pipeline.atomic import write_file_atomically, write_folder_atomically, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"a": 1})

    def half(tmp):
        tmp.write_text('{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_file_atomically(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_json_is_replaced_and_the_suffix_can_stay_last(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert path.read_text() == '{\n  "b": 2\n}\n'
    seen = []
    write_file_atomically(tmp_path / "fig.png", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")),
                          keep_suffix=True)
    assert seen == ["fig.tmp.png"] and (tmp_path / "fig.png").read_bytes() == b"x"


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    out = tmp_path / "student"
    write_folder_atomically(out, lambda d: (d / "config.json").write_text("old"))

    def fail(d):
        (d / "config.json").write_text("new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_folder_atomically(out, fail)
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
