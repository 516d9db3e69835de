"""Fetching and unpacking the Speech Commands archives.

`download_speech_commands` is the whole pipeline: download (resumable, with a progress bar)
into ``<archive>.part``, verify size and sha256, rename, check every member of the archive,
extract into a temporary folder beside the target, then rename that folder into place. A
verified dataset carries a small ``.kws-download.json`` stamp so a second run does nothing.

Extraction trusts nothing in the archive. The Speech Commands archives hold only regular
files and folders, so every other member (symbolic and hard links, devices, FIFOs) is refused
before anything is written: links are how extraction filters have been bypassed, e.g.
CVE-2025-4517, a chain of symlinks longer than PATH_MAX that leads tarfile's ``data`` filter
out of the target on Python releases before the fix (3.11.7 among them). The ``data`` filter
stays on as a second line.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Optional

from kws_runtime.bundle import file_sha256
from kws_runtime.files import make_shareable, write_json_atomic

OFFICIAL_BASE_URL = "http://download.tensorflow.org/data/"
VERSIONS = ("0.01", "0.02")
STAMP_NAME = ".kws-download.json"
_CHUNK = 1 << 20
_UNSET = object()


class DownloadError(RuntimeError):
    """A download or extraction that failed; the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class ArchiveInfo:
    """One published archive.

    Attributes:
        filename: name under the base URL, e.g. ``speech_commands_v0.02.tar.gz``.
        sha256: published hex digest, or None where no public source gives one.
        size: published size in bytes, or None.
    """

    filename: str
    sha256: Optional[str]
    size: Optional[int]

    @property
    def dirname(self) -> str:
        """Folder the archive is extracted into (the archive name without ``.tar.gz``)."""
        return self.filename[: -len(".tar.gz")]


# Sources of the pinned digests and sizes:
# - v0.02 train and test: TensorFlow Datasets, tensorflow_datasets/url_checksums/speech_commands.txt
#   (url, size in bytes, sha256).
# - v0.01 train: sha256 from torchaudio's SPEECHCOMMANDS dataset (_CHECKSUMS, which also lists the
#   v0.02 digest above, identical to TFDS'); size 1489096277 bytes is the Content-Length
#   download.tensorflow.org serves for it.
# - v0.01 test: no public digest was found. Its size is checked against Content-Length and
#   the sha256 measured after download is recorded in the dataset's stamp and printed.
ARCHIVES = {
    ("0.02", False): ArchiveInfo(
        "speech_commands_v0.02.tar.gz",
        "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
        2428923189,
    ),
    ("0.02", True): ArchiveInfo(
        "speech_commands_test_set_v0.02.tar.gz",
        "cc2a00c1147c2254e9be3fa0f779d8c17421dc349b86366567a8edfa9acd51df",
        112563277,
    ),
    ("0.01", False): ArchiveInfo(
        "speech_commands_v0.01.tar.gz",
        "743935421bb51cccdb6bdd152e04c5c70274e935c82119ad7faeec31780d811d",
        1489096277,
    ),
    ("0.01", True): ArchiveInfo("speech_commands_test_set_v0.01.tar.gz", None, None),
}


def archive_info(version: str = "0.02", test_set: bool = False) -> ArchiveInfo:
    """The published archive for a dataset version (``"0.01"`` or ``"0.02"``)."""
    version = str(version)
    if version.startswith("v"):
        version = version[1:]
    if version not in VERSIONS:
        raise DownloadError(f"unknown Speech Commands version {version!r}: choose one of {', '.join(VERSIONS)}")
    return ARCHIVES[(version, bool(test_set))]


def fetch(
    url: str,
    dest,
    *,
    sha256: Optional[str] = None,
    size: Optional[int] = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming from ``dest + ".part"`` when it exists.

    The body goes to ``<dest>.part``; an interrupted transfer is resumed with an HTTP Range
    request (up to ``retries`` times within this call, and again by the next call). The
    file is renamed to ``dest`` only once its size and sha256 match. A ``dest`` that already
    matches is not fetched again.

    Args:
        url: http(s) URL.
        dest: final file path.
        sha256: expected hex digest, or None to skip the digest check.
        size: expected size in bytes, or None to trust the server's Content-Length.
        progress: show a tqdm bar on stderr.
        retries: extra attempts after a dropped connection.
        timeout: socket timeout in seconds.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: HTTP error, unreachable host, wrong size or checksum (the bad file
            is deleted so the next run starts clean).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (sha256 is not None or size is not None) and _matches(dest, sha256, size):
        return dest
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            total = _fetch_once(url, part, size=size, progress=progress, timeout=timeout)
            break
        except _Dropped as exc:
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"download of {url} was interrupted ({exc}) after {have} bytes; "
                    f"run the same command again to resume from {part}"
                ) from None
    have = part.stat().st_size
    if total is not None and have != total:
        part.unlink()
        raise DownloadError(
            f"{url}: received {have} bytes but the server announced {total}; the partial file was removed, try again"
        )
    if size is not None and have != size:
        part.unlink()
        raise DownloadError(f"{url}: got {have} bytes, expected {size}; the file was removed (is --base-url a faithful mirror?)")
    if sha256 is not None:
        got = file_sha256(part)
        if got != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{url}: sha256 mismatch (got {got}, expected {sha256}); the corrupt download was removed, "
                "run again or check the mirror"
            )
    elif total is None and size is None:
        print(
            f"warning: {url}: the server announced no length and no size or checksum is known, so this "
            f"download of {have} bytes cannot be checked for completeness",
            file=sys.stderr,
        )
    os.replace(part, dest)
    return dest


class _Dropped(Exception):
    """The connection ended before the body was complete."""


def _fetch_once(url: str, part: Path, *, size: Optional[int], progress: bool, timeout: float) -> Optional[int]:
    """One HTTP request appending to ``part``; returns the full size the server announced."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return size
    request = urllib.request.Request(url, headers={"User-Agent": "kws-data"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # The server says our partial file is not a prefix of anything it has: start over.
            part.unlink()
            raise _Dropped("server refused the resume range; restarting") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or --base-url") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {url}: {exc.reason}; check the network or use --base-url with a mirror") from None
    except (socket.timeout, ConnectionError, http.client.HTTPException) as exc:
        raise _Dropped(str(exc) or type(exc).__name__) from None
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""), url)
            if start != have:
                raise DownloadError(f"{url}: server resumed at byte {start}, asked for {have}")
            mode = "ab"
        else:
            # 200 to a Range request: the server sends the whole file, so start from zero.
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        bar = _progress_bar(total, have, url, progress)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (socket.timeout, ConnectionError, http.client.HTTPException) as exc:
                        raise _Dropped(str(exc) or type(exc).__name__) from None
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Dropped(f"connection closed at byte {got} of {total}")
    return total


def _content_range(value: str, url: str):
    # "bytes 100-199/200"
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total == "*" else int(total))
    except ValueError:
        raise DownloadError(f"{url}: unreadable Content-Range header {value!r}") from None


def _progress_bar(total, initial, url, enabled):
    from tqdm import tqdm

    name = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] or url
    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not enabled, leave=False
    )


def _matches(path: Path, sha256: Optional[str], size: Optional[int]) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    if sha256 is not None and file_sha256(path) != sha256.lower():
        return False
    return True


def extract_archive(archive, target, progress: bool = False) -> Path:
    """Extract a tar(.gz) archive so that ``target`` appears complete or not at all.

    Every member is checked first (`check_members`): only regular files and folders with
    relative names are accepted, so nothing is written from an archive that holds a link.
    Members are then unpacked with tarfile's ``data`` filter into a temporary folder beside
    ``target``, which is renamed to ``target`` only after every member was written.

    Raises:
        DownloadError: unreadable/truncated archive, a refused member, or ``target`` exists.
    """
    archive, target = Path(archive), Path(target)
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("safe extraction needs tarfile's 'data' filter: use Python 3.9.17+, 3.10.12+ or 3.11.4+")
    if target.exists():
        raise DownloadError(f"{target} already exists; remove it or choose another --out")
    broken = f"{archive}: broken archive"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = check_members(tar, archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
            try:
                make_shareable(tmp, folder=True)
                try:
                    tar.extractall(tmp, members=_counted(members, archive, progress), filter=_strict_filter)
                except tarfile.FilterError as exc:
                    raise DownloadError(f"{archive}: refused unsafe archive member ({exc}); nothing was extracted") from None
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except DownloadError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DownloadError(f"{broken} ({type(exc).__name__}: {exc}); nothing was extracted") from None
    return target


def check_members(tar: tarfile.TarFile, archive) -> list:
    """Every member of ``tar``, after checking that each is a regular file or a folder whose
    name stays inside the target; reads the whole archive once and writes nothing.

    Raises:
        DownloadError: naming the first member that is a link, a device or a FIFO, or whose
            name is absolute or climbs out with ``..``, and what it is.
    """
    members = tar.getmembers()
    for member in members:
        why = _unsafe(member)
        if why:
            raise DownloadError(f"{archive}: refused unsafe archive member {member.name!r}: {why}; nothing was extracted")
    return members


def _unsafe(member: tarfile.TarInfo) -> Optional[str]:
    """Why ``member`` may not be extracted, or None."""
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        return f"a {kind} to {member.linkname!r} (Speech Commands archives hold no links)"
    if not (member.isfile() or member.isdir()):
        return f"a {_member_kind(member)}, not a file or folder"
    name = member.name.replace("\\", "/")
    if name.startswith("/") or os.path.isabs(member.name):
        return "an absolute name"
    if ".." in name.split("/"):
        return "a name leading out of the folder ('..')"
    return None


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"tar entry of type {member.type!r}"


def _strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # The second line behind check_members, in case a member changes between the two reads:
    # the same rules, then the data filter.
    if _unsafe(member):
        raise tarfile.FilterError(f"{member.name!r}: {_unsafe(member)}")
    return tarfile.data_filter(member, dest)


def _counted(members: list, archive: Path, enabled: bool):
    from tqdm import tqdm

    with tqdm(total=len(members), unit=" files", desc=f"extracting {archive.name}", disable=not enabled, leave=False) as bar:
        for member in members:
            yield member
            bar.update(1)


def download_speech_commands(
    out,
    version: str = "0.02",
    test_set: bool = False,
    *,
    base_url: str = OFFICIAL_BASE_URL,
    sha256=_UNSET,
    size=_UNSET,
    keep_archive: bool = False,
    progress: bool = True,
    retries: int = 3,
) -> Path:
    """Download and extract one Speech Commands archive into ``out/<archive name>/``.

    Args:
        out: parent folder; the dataset lands in ``out/speech_commands_v0.02`` (or
            ``speech_commands_test_set_v0.02`` with ``test_set``).
        version: ``"0.01"`` or ``"0.02"``.
        test_set: the official 12-class test archive instead of the training archive.
        base_url: folder URL holding the archives (a mirror of download.tensorflow.org/data/).
        sha256, size: expected digest / byte count; default: the published values (see
            `ARCHIVES`); None skips that check.
        keep_archive: keep ``out/<archive>.tar.gz`` after extraction.
        progress: tqdm progress bar on stderr.
        retries: resume attempts after a dropped connection.

    Returns:
        The dataset folder. When it already holds a verified extraction of the same archive,
        nothing is downloaded.
    """
    info = archive_info(version, test_set)
    sha256 = info.sha256 if sha256 is _UNSET else sha256
    size = info.size if size is _UNSET else size
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DownloadError(f"--out {out} is a file, not a folder")
    target = out / info.dirname
    stamp = _read_stamp(target)
    if stamp is not None and stamp.get("archive") == info.filename and (sha256 is None or stamp.get("sha256") == sha256):
        return target
    if target.exists():
        raise DownloadError(
            f"{target} exists but is not a verified download of {info.filename}; remove it or choose another --out"
        )
    url = base_url.rstrip("/") + "/" + info.filename
    archive = fetch(url, out / info.filename, sha256=sha256, size=size, progress=progress, retries=retries)
    measured = sha256 or file_sha256(archive)
    try:
        extract_archive(archive, target, progress=progress)
    except DownloadError as exc:
        if sha256 is not None:
            raise  # the archive is the published one: keep it, the cause is elsewhere (disk, permissions)
        # Never checked against a digest: it may be a bad mirror's or a cut transfer's, and
        # keeping it would reuse it on every rerun. The next run downloads it again.
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{exc}; the unverified archive was deleted, so the next run downloads it again") from None
    record = {"archive": info.filename, "url": url, "sha256": measured, "size": archive.stat().st_size,
              "published_sha256": info.sha256 is not None, "verified_by": _verified_by(sha256, size)}
    write_json_atomic(target / STAMP_NAME, record)
    if not keep_archive:
        archive.unlink()
    return target


def _verified_by(sha256: Optional[str], size: Optional[int]) -> Optional[str]:
    # None: only the server's own Content-Length, if it sent one, vouched for the download
    if sha256 is not None:
        return "sha256"
    return "size" if size is not None else None


def _read_stamp(target: Path) -> Optional[dict]:
    try:
        return json.loads((target / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
