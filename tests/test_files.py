"""kws_runtime.files: whole files, usual permissions, OS errors in words, on real file systems."""

import errno
import os
import stat

import pytest

from kws_runtime import files
from kws_runtime.files import WriteError, atomic_open, copy_atomic, write_json_atomic, write_text_atomic

from filesystems import small_disk


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def test_written_files_get_the_usual_mode_and_respect_the_umask(tmp_path, umask):
    umask(0o022)
    assert mode(write_text_atomic(tmp_path / "a.txt", "x")) == 0o644
    umask(0o027)
    assert files.current_umask() == 0o027
    assert mode(write_json_atomic(tmp_path / "b.json", {"a": 1})) == 0o640
    assert mode(copy_atomic(tmp_path / "a.txt", tmp_path / "sub" / "c.txt")) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError, match="writer broke"):
        with atomic_open(target) as stream:
            stream.write("half of the new")
            raise RuntimeError("writer broke")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_full_disk_is_reported_with_the_file_and_in_words(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, 64):
        old = write_text_atomic(disk / "last.pt", "the previous checkpoint")
        with pytest.raises(WriteError) as err:
            files.write_bytes_atomic(old, b"\0" * (256 * 1024))
        assert err.value.errno == errno.ENOSPC
        assert str(err.value) == f"{old}: cannot be written: the disk is full; free some space or choose another output folder"
        assert old.read_text() == "the previous checkpoint"
        assert os.listdir(disk) == ["last.pt"]


def test_read_only_folder_fails_the_write_check_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    with small_disk(folder, 64, read_only=True):
        with pytest.raises(WriteError, match="ro: cannot be written: the file system is read-only"):
            files.check_writable_folder(folder)
        with pytest.raises(WriteError, match="read-only"):
            files.check_writable_folder(folder / "run")  # cannot even be created
    assert files.check_writable_folder(tmp_path / "new" / "run").is_dir()


def test_an_unreadable_source_is_reported_as_itself(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        copy_atomic(tmp_path / "missing", tmp_path / "copy")
    assert not isinstance(err.value, WriteError)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "code, words",
    [(errno.EACCES, "permission denied"), (errno.ENAMETOOLONG, "longer than the file system allows"),
     (errno.ENOSPC, "the disk is full"), (errno.EXDEV, "invalid cross-device link")],
)
def test_os_error_reasons_are_words(code, words):
    assert words in files.os_error_reason(OSError(code, os.strerror(code)))
