"""agent.atomic_file: a file's content replaced at once, on this machine's filesystem and
where the name exchange is not available."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent import atomic_file
from agent.atomic_file import overwrite_record, replace_text


def test_writes_a_new_file_and_replaces_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "phase"
    replace_text(path, "creating 1\n")
    assert path.read_text() == "creating 1\n"
    inode = path.stat().st_ino
    replace_text(path, "created 1\n")
    assert path.read_text() == "created 1\n"
    assert path.stat().st_ino != inode  # a new file took the name, not a rewrite in place
    assert sorted(os.listdir(tmp_path)) == ["phase"]  # the old content is gone


def test_a_reader_sees_the_old_content_or_the_new_never_a_mix(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    old, new = "a" * 5000, "b" * 7000
    replace_text(path, old)
    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            replace_text(path, new if i % 2 == 0 else old)
    finally:
        done.set()
        reader.join()
    assert seen <= {old, new}
    assert seen  # the reader did read


def test_a_leftover_temporary_file_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    replace_text(path, "{}")
    (tmp_path / "desired.json.tmp").write_text("left by a crash between the two steps")
    replace_text(path, '{"generation": "2"}')
    assert path.read_text() == '{"generation": "2"}'
    assert sorted(os.listdir(tmp_path)) == ["desired.json"]


def test_falls_back_to_a_rename_without_the_exchange(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_file, "_renameat2", None)
    path = tmp_path / "jail.json"
    replace_text(path, "1")
    replace_text(path, "2")
    assert path.read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["jail.json"]


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        replace_text(tmp_path / "gone" / "phase", "x")


def test_a_record_is_written_over_the_last_in_place(tmp_path: Path) -> None:
    path = tmp_path / "phase"
    overwrite_record(path, "creating 1".ljust(20) + "\n")
    inode = path.stat().st_ino
    overwrite_record(path, "created 1".ljust(20) + "\n")
    assert path.read_text() == "created 1".ljust(20) + "\n"
    assert path.stat().st_ino == inode
    assert sorted(os.listdir(tmp_path)) == ["phase"]


def test_a_file_longer_than_the_record_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "phase"
    path.write_text("something else entirely, longer than a record\n")
    overwrite_record(path, "running 4".ljust(20) + "\n")
    assert path.read_text() == "running 4".ljust(20) + "\n"
