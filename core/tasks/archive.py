"""The portable task file: a ZIP that carries one task from one server's library into another's.

Uploads are untrusted, so every entry's name, kind and declared size is checked before anything
is read, and the bytes actually unpacked are counted too, because a ZIP's headers can lie.
Nothing is written to disk. Images are not decoded here: the importer runs them through the same
checks as any upload, and the texts through the task rules.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.config import LimitSettings
from core.errors import FlamingoError
from core.wording import quoted

ARCHIVE_FORMAT = "flamingo-bot-task"
FORMAT_VERSION = 1
TASK_FILE = "task.json"
FILENAME_SUFFIX = ".flamingo-task.zip"

_ENTRY_NAME = re.compile(r"task\.json|examples/([1-9][0-9]{0,8})\.jpg")
_CHUNK = 64 * 1024
# Only what the exporter writes; bzip2 and LZMA decompress without a bound on each step's output.
_ACCEPTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ENCRYPTED = 0x1
_UNIX = 3
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
# ZIP dates cover 1980 to 2107; an export time outside them is stored as the earliest.
_EARLIEST_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# What the zipfile module raises for damaged archives besides BadZipFile.
# The end-of-directory records (APPNOTE 4.3.14 to 4.3.16), read before zipfile parses anything.
_END_OF_DIRECTORY = b"PK\x05\x06"
_END_RECORD_BYTES = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_BYTES = 20
_ZIP64_END_OF_DIRECTORY = b"PK\x06\x06"
# A directory entry is 46 bytes, its name and extra fields: an export's are far below this.
_MOST_DIRECTORY_BYTES_PER_ENTRY = 1024
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, EOFError, ValueError, OSError, RuntimeError)
# Discord ids are 64-bit; the database keeps them as signed 64-bit integers.
_ID_LIMIT = 2**63
_NOT_A_ZIP = "This file is not a ZIP file, or it is damaged; attach the .zip file that a task export made."
_DAMAGED = "The task file is damaged: a file inside it cannot be read back intact."


class BadArchive(FlamingoError):
    """An uploaded task file that cannot be imported; the message says why, for the user."""


@dataclass(frozen=True)
class ArchivedExample:
    image: bytes
    text: str
    # Who added it, written by exports since a later version (older files have none): the importer
    # keeps it, so that the author's /forget-me reaches the imported copy too.
    author_id: int | None = None


@dataclass(frozen=True)
class TaskArchive:
    name: str
    description: str
    prompt_template: str
    examples: tuple[ArchivedExample, ...]


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_uncompressed_bytes: int
    max_examples: int
    # Only a sanity cap: the importer applies the task rules to every text afterwards.
    max_text_chars: int

    @property
    def max_manifest_bytes(self) -> int:
        """task.json's bound, from its texts' (each character at most six bytes, as a JSON escape):
        it is read whole before its fields are checked, so it must not be allowed the images' room."""
        return 4096 + (3 + self.max_examples) * (6 * self.max_text_chars + 256)


def archive_limits(limits: LimitSettings, max_name_chars: int) -> ArchiveLimits:
    """What a task file is read under, from the task rules' limits (its texts: the longest a task
    may hold, ``max_name_chars`` its name's): shared by ``/manage-tasks import`` and the command line."""
    longest = max(limits.max_example_chars, limits.max_template_chars, limits.max_description_chars, max_name_chars)
    return ArchiveLimits(
        max_bytes=limits.max_import_bytes,
        max_uncompressed_bytes=2 * limits.max_import_bytes,
        max_examples=limits.max_examples_per_task,
        max_text_chars=longest,
    )


def archive_filename(name: str) -> str:
    """A safe attachment name even if the task name is not (task names are checked, but old ones may not be)."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-")[:64]
    return f"{stem or 'task'}{FILENAME_SUFFIX}"


# Writing


def _zip_time(moment: datetime) -> tuple[int, int, int, int, int, int]:
    if not 1980 <= moment.year <= 2107:
        return _EARLIEST_ZIP_TIME
    return moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second


def _add(
    zf: zipfile.ZipFile, name: str, data: bytes, compression: int, date_time: tuple[int, int, int, int, int, int]
) -> None:
    """Every header field fixed, so that the same task exports to the same bytes on any machine."""
    info = zipfile.ZipInfo(name, date_time)
    info.compress_type = compression
    info.create_system = _UNIX
    info.external_attr = _FILE_MODE
    zf.writestr(info, data)


def _example_fields(path: str, example: ArchivedExample) -> dict[str, str]:
    fields = {"image": path, "text": example.text, "sha256": hashlib.sha256(example.image).hexdigest()}
    if example.author_id is not None:
        fields["author_id"] = str(example.author_id)  # a string, as Discord writes ids: JSON readers may round
    return fields


def write_archive(archive: TaskArchive, exported_at: datetime) -> bytes:
    """The task as a ZIP: task.json first, then examples/1.jpg, examples/2.jpg, ... stored as they are."""
    images = [(f"examples/{n}.jpg", example) for n, example in enumerate(archive.examples, start=1)]
    manifest = {
        "format": ARCHIVE_FORMAT,
        "version": FORMAT_VERSION,
        "name": archive.name,
        "description": archive.description,
        "prompt_template": archive.prompt_template,
        "exported_at": exported_at.isoformat(),
        "examples": [_example_fields(path, example) for path, example in images],
    }
    body = json.dumps(manifest, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
    date_time = _zip_time(exported_at)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        _add(zf, TASK_FILE, body, zipfile.ZIP_DEFLATED, date_time)
        for path, example in images:
            # JPEGs are already compressed; deflating them again only costs time.
            _add(zf, path, example.image, zipfile.ZIP_STORED, date_time)
    return buffer.getvalue()


# Reading


def _quoted(name: str) -> str:
    """An entry name safe to show: control and non-ASCII characters escaped, long names cut."""
    return quoted(ascii(name)[1:-1], 61)


def _allowed_name(name: str, max_examples: int) -> bool:
    match = _ENTRY_NAME.fullmatch(name)
    return match is not None and (match.group(1) is None or int(match.group(1)) <= max_examples)


def _too_many_files(count: int, limits: ArchiveLimits) -> BadArchive:
    return BadArchive(
        f"The task file holds {count} files; it may hold at most {1 + limits.max_examples} "
        f"(task.json and up to {limits.max_examples} example images)."
    )


def _check_directory(data: bytes, limits: ArchiveLimits) -> None:
    """Refuse, from the end-of-directory record alone, a file that lists more entries (or a larger
    directory) than a task can need, before zipfile parses the directory: one listing 282,707
    entries took 3 s and 150 MiB to parse. A file without the record is left for zipfile to refuse."""
    end = data.rfind(_END_OF_DIRECTORY, max(0, len(data) - _END_RECORD_BYTES - 0xFFFF))
    if end < 0 or end + _END_RECORD_BYTES > len(data):
        return
    count, directory_bytes = struct.unpack_from("<HI", data, end + 10)
    locator = end - _ZIP64_LOCATOR_BYTES
    if count == 0xFFFF and locator >= 0 and data.startswith(_ZIP64_LOCATOR, locator):
        (record,) = struct.unpack_from("<Q", data, locator + 8)
        if data.startswith(_ZIP64_END_OF_DIRECTORY, record) and record + 56 <= len(data):
            count, directory_bytes = struct.unpack_from("<QQ", data, record + 32)
    entries = 1 + limits.max_examples
    if count > entries:
        raise _too_many_files(count, limits)
    if directory_bytes > entries * _MOST_DIRECTORY_BYTES_PER_ENTRY:
        raise BadArchive("The task file's directory is larger than its files need; export the task again from the bot.")


def _check_entries(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > 1 + limits.max_examples:
        raise _too_many_files(len(infos), limits)
    for info in infos:
        if info.flag_bits & _ENCRYPTED:
            raise BadArchive("The task file is encrypted; export the task again without a password.")
        # orig_filename keeps what zipfile cuts at a NUL byte.
        if not _allowed_name(info.orig_filename, limits.max_examples):
            raise BadArchive(
                f"The task file contains an unexpected entry {_quoted(info.orig_filename)}; only task.json "
                f"and examples/1.jpg to examples/{limits.max_examples}.jpg are allowed."
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BadArchive(f"The entry {_quoted(info.filename)} in the task file is a symbolic link, not a file.")
        if info.compress_type not in _ACCEPTED_COMPRESSION:
            raise BadArchive(
                f"The entry {_quoted(info.filename)} in the task file uses a compression method I do not accept; "
                "export the task again from the bot."
            )
    seen: set[str] = set()
    for name in zf.namelist():
        if name in seen:
            raise BadArchive(f"The task file contains {_quoted(name)} more than once.")
        seen.add(name)
    if TASK_FILE not in seen:
        raise BadArchive("The task file has no task.json, so it was not made by a task export.")
    manifest = zf.getinfo(TASK_FILE).file_size
    if manifest > limits.max_manifest_bytes:
        raise BadArchive(_manifest_too_large(manifest, limits))
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_uncompressed_bytes:
        raise BadArchive(
            f"The task file unpacks to {declared:,} bytes; the limit is {limits.max_uncompressed_bytes:,} bytes."
        )
    return infos


def _manifest_too_large(size: int, limits: ArchiveLimits) -> str:
    return f"The task file's task.json is {size:,} bytes; it may be at most {limits.max_manifest_bytes:,} bytes."


def _read_files(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], budget: int) -> dict[str, bytes]:
    """Read in chunks and stop once past the budget, whatever the headers declared."""
    files: dict[str, bytes] = {}
    limit = budget
    for info in infos:
        parts: list[bytes] = []
        with zf.open(info) as member:
            while chunk := member.read(min(_CHUNK, budget + 1)):
                budget -= len(chunk)
                if budget < 0:
                    raise BadArchive(
                        f"The task file unpacks to more than its headers declare, past the {limit:,}-byte limit."
                    )
                parts.append(chunk)
        files[info.filename] = b"".join(parts)
    return files


def _string(fields: Mapping[str, Any], key: str, where: str) -> str:
    if key not in fields:
        raise BadArchive(f"The task file's {where} has no “{key}”.")
    value = fields[key]
    if not isinstance(value, str):
        raise BadArchive(f"“{key}” in the task file's {where} must be a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadArchive(f"“{key}” in the task file's {where} is not valid text.") from None
    return value


def _text(fields: Mapping[str, Any], key: str, where: str, label: str, limits: ArchiveLimits) -> str:
    value = _string(fields, key, where)
    if len(value) > limits.max_text_chars:
        raise BadArchive(
            f"The {label} in the task file is {len(value):,} characters long; the limit is {limits.max_text_chars:,}."
        )
    return value


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BadArchive("The task file's task.json is not valid UTF-8 JSON.") from None
    if not isinstance(manifest, dict):
        raise BadArchive("The task file's task.json must hold a JSON object.")
    if manifest.get("format") != ARCHIVE_FORMAT:
        raise BadArchive("This ZIP file is not a task file from this bot: its task.json has the wrong “format”.")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadArchive("The task file's “version” is missing or is not a whole number.")
    if version > FORMAT_VERSION:
        raise BadArchive(
            f"This task file was made by a newer version of the bot (format {version}); update it to import this."
        )
    if version < 1:
        raise BadArchive(f"The task file has an invalid format version ({version}).")
    return manifest


def _author(item: Mapping[str, Any], number: int) -> int | None:
    """An example's author, a Discord user id, or None where the file names none (files from before
    authors were exported)."""
    if "author_id" not in item:
        return None
    value = item["author_id"]
    if (
        isinstance(value, str)
        and len(value) < 20
        and value.isascii()
        and value.isdigit()
        and 0 < int(value) < _ID_LIMIT
    ):
        return int(value)
    raise BadArchive(f"“author_id” of example {number} in the task file is not a Discord user id.")


def _examples(manifest: dict[str, Any], images: dict[str, bytes], limits: ArchiveLimits) -> tuple[ArchivedExample, ...]:
    if "examples" not in manifest:
        raise BadArchive("The task file's task.json has no “examples”.")
    items = manifest["examples"]
    if not isinstance(items, list):
        raise BadArchive("“examples” in the task file's task.json must be a list.")
    if len(items) > limits.max_examples:
        raise BadArchive(f"The task file has {len(items)} examples; a task may have at most {limits.max_examples}.")
    used: dict[str, int] = {}
    examples = []
    for number, item in enumerate(items, start=1):
        where = f"example {number}"
        if not isinstance(item, dict):
            raise BadArchive(f"The task file's {where} must be a JSON object.")
        path = _string(item, "image", where)
        text = _text(item, "text", where, f"text of {where}", limits)
        digest = _string(item, "sha256", where)
        if path in used:
            raise BadArchive(f"Examples {used[path]} and {number} in the task file use the same image {_quoted(path)}.")
        image = images.get(path)
        if image is None:
            raise BadArchive(f"Example {number} refers to {_quoted(path)}, which is not an image in the task file.")
        if hashlib.sha256(image).hexdigest() != digest.lower():
            raise BadArchive(f"The image of example {number} does not match its checksum; the task file is damaged.")
        used[path] = number
        examples.append(ArchivedExample(image=image, text=text, author_id=_author(item, number)))
    unused = sorted(set(images) - set(used), key=lambda path: (len(path), path))
    if unused:
        raise BadArchive(f"The task file holds {_quoted(unused[0])}, which no example uses.")
    return tuple(examples)


def read_archive(data: bytes, limits: ArchiveLimits) -> TaskArchive:
    """Check an uploaded task file completely and return its contents; images are still undecoded."""
    if len(data) > limits.max_bytes:
        raise BadArchive(f"The task file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes.")
    _check_directory(data, limits)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS:
        raise BadArchive(_NOT_A_ZIP) from None
    with zf:
        infos = _check_entries(zf, limits)
        try:
            files = _read_files(zf, infos, limits.max_uncompressed_bytes)
        except _ZIP_ERRORS:
            raise BadArchive(_DAMAGED) from None
    raw_manifest = files.pop(TASK_FILE)
    if len(raw_manifest) > limits.max_manifest_bytes:  # more than its header declared
        raise BadArchive(_manifest_too_large(len(raw_manifest), limits))
    manifest = _manifest(raw_manifest)
    return TaskArchive(
        name=_text(manifest, "name", "task.json", "name", limits),
        description=_text(manifest, "description", "task.json", "description", limits),
        prompt_template=_text(manifest, "prompt_template", "task.json", "prompt template", limits),
        examples=_examples(manifest, files, limits),
    )
