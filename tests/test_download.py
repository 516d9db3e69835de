"""The downloader against a real HTTP server on loopback serving archives built from real clips."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from kws_train import download as dl

from loopback import LoopbackServer, build_archive


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


NAME = dl.archive_info("0.02").filename
DIRNAME = dl.archive_info("0.02").dirname


@pytest.fixture(scope="module")
def archive(real_data):
    return build_archive(real_data)


def fetch_dataset(server, out, data, **kw):
    kw.setdefault("sha256", sha256(data))
    kw.setdefault("size", len(data))
    return dl.download_speech_commands(out, "0.02", base_url=server.url, progress=False, **kw)


def leftovers(out: Path) -> list:
    """Anything in ``out`` except the finished dataset folder."""
    return sorted(p.name for p in out.iterdir() if p.name != DIRNAME) if out.exists() else []


def test_full_download_extracts_verified_files_and_is_idempotent(tmp_path, archive):
    data, members = archive
    with LoopbackServer({NAME: data}) as server:
        target = fetch_dataset(server, tmp_path, data)
        assert target == tmp_path / DIRNAME
        for rel, content in members.items():
            assert (target / rel).read_bytes() == content
        stamp = (target / dl.STAMP_NAME).read_text()
        assert sha256(data) in stamp
        assert leftovers(tmp_path) == []  # archive removed, no temp folders
        n_requests = len(server.requests)
        assert fetch_dataset(server, tmp_path, data) == target
        assert len(server.requests) == n_requests  # verified data is not fetched again


def test_keep_archive_and_reuse_of_a_verified_archive(tmp_path, archive):
    data, _ = archive
    with LoopbackServer({NAME: data}) as server:
        target = fetch_dataset(server, tmp_path, data, keep_archive=True)
        assert (tmp_path / NAME).read_bytes() == data
        # The extraction is lost but the archive is intact: no new download is needed.
        import shutil

        shutil.rmtree(target)
        n_requests = len(server.requests)
        fetch_dataset(server, tmp_path, data, keep_archive=True)
        assert len(server.requests) == n_requests
        assert (target / "yes").is_dir()


def test_interrupted_download_resumes_with_a_range_request(tmp_path, archive):
    data, members = archive
    cut = len(data) // 2
    with LoopbackServer({NAME: data}) as server:
        server.drop_at = cut
        with pytest.raises(dl.DownloadError, match="interrupted.*run the same command again"):
            fetch_dataset(server, tmp_path, data, retries=0)
        part = tmp_path / (NAME + ".part")
        assert part.stat().st_size == cut
        assert not (tmp_path / DIRNAME).exists()

        target = fetch_dataset(server, tmp_path, data, retries=0)
        name, rng, sent = server.requests[-1]
        assert rng == f"bytes={cut}-"
        assert sent == len(data) - cut  # only the missing tail travelled again
        assert (target / "yes").is_dir() and not part.exists()
        assert {p.relative_to(target).as_posix() for p in target.rglob("*.wav")} == {
            r for r in members if r.endswith(".wav")
        }


def test_a_dropped_connection_is_resumed_within_one_call(tmp_path, archive):
    data, _ = archive
    with LoopbackServer({NAME: data}) as server:
        server.drop_at = len(data) // 3
        fetch_dataset(server, tmp_path, data, retries=2)
        assert [r[1] for r in server.requests] == [None, f"bytes={len(data) // 3}-"]


def test_server_ignoring_range_restarts_from_zero(tmp_path, archive):
    data, _ = archive
    part = tmp_path / (NAME + ".part")
    part.write_bytes(b"\0" * 100)  # garbage that a resume would keep
    with LoopbackServer({NAME: data}) as server:
        server.ignore_range = True
        target = fetch_dataset(server, tmp_path, data)
        assert server.requests[-1][2] == len(data)
        assert (target / "no").is_dir()


def test_corrupted_archive_fails_its_checksum_and_is_removed(tmp_path, archive):
    data, _ = archive
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with LoopbackServer({NAME: bytes(corrupt)}) as server:
        with pytest.raises(dl.DownloadError, match="sha256 mismatch") as err:
            fetch_dataset(server, tmp_path, data)
    assert sha256(data) in str(err.value)
    assert not (tmp_path / DIRNAME).exists()
    assert leftovers(tmp_path) == []


def test_wrong_size_is_refused(tmp_path, archive):
    data, _ = archive
    with LoopbackServer({NAME: data + b"extra"}) as server:
        with pytest.raises(dl.DownloadError, match=f"expected {len(data)}"):
            fetch_dataset(server, tmp_path, data)
    assert leftovers(tmp_path) == []


def test_broken_archive_leaves_no_half_extracted_dataset(tmp_path, archive):
    data, _ = archive
    broken = data[: int(len(data) * 0.7)]  # a gzip stream cut short, checksum as "published"
    with LoopbackServer({NAME: broken}) as server:
        with pytest.raises(dl.DownloadError, match="broken archive.*nothing was extracted"):
            fetch_dataset(server, tmp_path, broken)
    assert not (tmp_path / DIRNAME).exists()
    assert not [p for p in tmp_path.iterdir() if ".extracting-" in p.name]


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    data = None
    if kind == tarfile.REGTYPE:
        data = b"escaped"
        info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    "member",
    [
        _member("../evil.wav"),
        _member("./yes/../../evil.wav"),
        _member("/tmp/kws-test-absolute-evil.wav"),
        _member("./yes/link.wav", tarfile.SYMTYPE, "../../evil.wav"),
        _member("./yes/abs-link.wav", tarfile.SYMTYPE, "/etc/passwd"),
        _member("./yes/hard.wav", tarfile.LNKTYPE, "/etc/passwd"),
        _member("./yes/inside-link.wav", tarfile.SYMTYPE, "other.wav"),
        _member("./yes/inside-hard.wav", tarfile.LNKTYPE, "./yes/a.wav"),
        _member("./yes/fifo", tarfile.FIFOTYPE),
        _member("./yes/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-absolute",
         "symlink-inside", "hardlink-inside", "fifo", "device"],
)
def test_unsafe_members_are_refused_and_nothing_is_extracted(tmp_path, real_data, member):
    data, _ = build_archive(real_data, extra=[member])
    out = tmp_path / "out"
    with LoopbackServer({NAME: data}) as server:
        with pytest.raises(dl.DownloadError, match="refused unsafe archive member") as err:
            fetch_dataset(server, out, data)
    assert repr(member[0].name) in str(err.value)
    assert not (out / DIRNAME).exists()
    assert not [p for p in out.iterdir() if ".extracting-" in p.name]
    assert not (tmp_path / "evil.wav").exists() and not (out / "evil.wav").exists()
    assert not Path("/tmp/kws-test-absolute-evil.wav").exists()


def test_http_404_says_which_url(tmp_path, archive):
    with LoopbackServer({}) as server:
        with pytest.raises(dl.DownloadError, match=r"HTTP 404.*--base-url") as err:
            fetch_dataset(server, tmp_path, archive[0])
    assert server.url + NAME in str(err.value)
    assert not (tmp_path / DIRNAME).exists()


def test_unreachable_mirror_is_a_clear_error(tmp_path):
    with pytest.raises(dl.DownloadError, match="cannot reach"):
        dl.download_speech_commands(tmp_path, "0.02", base_url="http://127.0.0.1:9/", progress=False)


def test_existing_unverified_folder_is_not_overwritten(tmp_path, archive):
    data, _ = archive
    (tmp_path / DIRNAME).mkdir()
    (tmp_path / DIRNAME / "mine.txt").write_text("user data")
    with LoopbackServer({NAME: data}) as server:
        with pytest.raises(dl.DownloadError, match="not a verified download"):
            fetch_dataset(server, tmp_path, data)
        assert server.requests == []
    assert (tmp_path / DIRNAME / "mine.txt").read_text() == "user data"


def test_published_archives_and_versions():
    assert dl.archive_info("0.02").filename == "speech_commands_v0.02.tar.gz"
    assert dl.archive_info("v0.01", test_set=True).dirname == "speech_commands_test_set_v0.01"
    for (version, test_set), info in dl.ARCHIVES.items():
        assert info.filename.endswith(f"v{version}.tar.gz")
        assert ("test_set" in info.filename) == test_set
        if info.sha256 is not None:
            assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
    with pytest.raises(dl.DownloadError, match="unknown Speech Commands version"):
        dl.archive_info("0.03")


def test_unpublished_checksum_is_measured_and_recorded(tmp_path, archive):
    data, _ = archive
    info = dl.archive_info("0.01", test_set=True)
    assert info.sha256 is None  # nothing to pin: the size comes from Content-Length
    with LoopbackServer({info.filename: data}) as server:
        target = dl.download_speech_commands(tmp_path, "0.01", True, base_url=server.url, progress=False)
        assert sha256(data) in (target / dl.STAMP_NAME).read_text()
        n = len(server.requests)
        dl.download_speech_commands(tmp_path, "0.01", True, base_url=server.url, progress=False)
        assert len(server.requests) == n
    assert os.listdir(tmp_path) == [info.dirname]


# ---------------------------------------------------------------------------- CVE-2025-4517


def realpath_overflow_archive(dest_len: int) -> bytes:
    """The archive of the public CVE-2025-4517 write-ups, sized for an extraction folder whose
    path is ``dest_len`` characters long.

    Sixteen folders with names long enough that their path, once every symlink ``a`` .. ``p``
    that points at them is expanded, exceeds PATH_MAX; ``os.path.realpath`` then stops
    resolving and tarfile's filter believes the last link, which climbs sixteen levels, stays
    inside. ``escape`` then leads one level above the folder and ``escape/newfile`` lands there.
    """
    steps = "abcdefghijklmnop"
    path_max = os.pathconf("/", "PC_PATH_MAX")
    component = "d" * ((path_max - dest_len - 1) // (len(steps) + 1))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, kind, linkname="", data=None):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, linkname, 0o777 if kind == tarfile.DIRTYPE else 0o644
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        path = ""
        for step in steps:
            add(os.path.join(path, component), tarfile.DIRTYPE)
            add(os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        long_link = os.path.join(*steps, "l" * 254)
        add(long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add("escape", tarfile.SYMTYPE, os.path.join(long_link, ".."))
        add("escape/newfile", tarfile.REGTYPE, data=b"written outside the target")
    return buf.getvalue()


def test_cve_2025_4517_archive_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / DIRNAME
    # the folder extract_archive extracts into: ".<name>.extracting-" + mkdtemp's 8 characters
    dest_len = len(str(out)) + 1 + len(f".{DIRNAME}.extracting-") + 8
    archive = tmp_path / "attack.tar"
    archive.write_bytes(realpath_overflow_archive(dest_len))
    with pytest.raises(dl.DownloadError, match=r"refused unsafe archive member 'a': a symbolic link.*nothing was extracted"):
        dl.extract_archive(archive, target)
    assert sorted(p.name for p in out.iterdir()) == []  # not even the temporary folder
    assert not list(tmp_path.rglob("newfile"))


def test_cve_2025_4517_archive_escapes_the_plain_data_filter_on_this_python(tmp_path):
    """Shows the archive above is a real attack here: tarfile's own filter is led outside."""
    dest = tmp_path / "outer" / "dest"
    dest.mkdir(parents=True)
    archive = tmp_path / "attack.tar"
    archive.write_bytes(realpath_overflow_archive(len(str(dest))))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.FilterError, OSError) as exc:
        pytest.skip(f"this Python's tarfile has the CVE-2025-4517 fix ({type(exc).__name__})")
    assert (tmp_path / "outer" / "newfile").read_bytes() == b"written outside the target"


def test_unverified_archive_that_fails_to_extract_is_deleted(tmp_path, archive):
    data, _ = archive
    info = dl.archive_info("0.01", test_set=True)  # no published sha256 or size
    broken = data[: len(data) // 2]
    with LoopbackServer({info.filename: broken}) as server:
        with pytest.raises(dl.DownloadError, match="broken archive.*unverified archive was deleted"):
            dl.download_speech_commands(tmp_path, "0.01", True, base_url=server.url, progress=False)
        assert os.listdir(tmp_path) == []
        server.files[info.filename] = data  # the mirror is fixed: the next run asks again
        target = dl.download_speech_commands(tmp_path, "0.01", True, base_url=server.url, progress=False)
    assert [name for name, _, _ in server.requests] == [info.filename] * 2  # after the server's threads are joined
    assert (target / "yes").is_dir()


def test_verified_archive_is_kept_when_extraction_is_refused(tmp_path, real_data):
    data, _ = build_archive(real_data, extra=[_member("./yes/link.wav", tarfile.SYMTYPE, "a.wav")])
    with LoopbackServer({NAME: data}) as server:
        with pytest.raises(dl.DownloadError, match="refused unsafe archive member") as err:
            fetch_dataset(server, tmp_path, data)
    assert "deleted" not in str(err.value)
    assert os.listdir(tmp_path) == [NAME]  # its digest matched: nothing to gain by fetching it again


def test_an_unverifiable_file_already_present_is_downloaded_again(tmp_path, archive):
    data, _ = archive
    (tmp_path / NAME).write_bytes(b"left behind by something else")
    with LoopbackServer({NAME: data}) as server:
        dl.fetch(server.url + NAME, tmp_path / NAME, progress=False)
    assert len(server.requests) == 1  # read after the server's threads are joined
    assert (tmp_path / NAME).read_bytes() == data


def test_download_of_unknown_length_is_accepted_only_with_a_warning(tmp_path, archive, capsys):
    data, _ = archive
    with LoopbackServer({NAME: data}) as server:
        server.send_length = False
        dl.fetch(server.url + NAME, tmp_path / NAME, progress=False)
    assert (tmp_path / NAME).read_bytes() == data
    err = capsys.readouterr().err
    assert "warning" in err and "announced no length" in err and "cannot be checked for completeness" in err
    with LoopbackServer({NAME: data}) as server:
        server.send_length = False
        dl.fetch(server.url + NAME, tmp_path / "checked.tar.gz", sha256=sha256(data), progress=False)
    assert "warning" not in capsys.readouterr().err  # the digest vouches for it
