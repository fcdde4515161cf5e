from __future__ import annotations

import hashlib
import io
import json
import random
import stat
import zipfile
from datetime import UTC, datetime

import pytest

from core.tasks.archive import (
    ARCHIVE_FORMAT,
    FORMAT_VERSION,
    ArchivedExample,
    ArchiveLimits,
    BadArchive,
    TaskArchive,
    archive_filename,
    read_archive,
    write_archive,
)

LIMITS = ArchiveLimits(max_bytes=100_000, max_uncompressed_bytes=50_000, max_examples=4, max_text_chars=200)
WHEN = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)
NOT_A_ZIP = "This file is not a ZIP file, or it is damaged; attach the .zip file that a task export made."
DAMAGED = "The task file is damaged: a file inside it cannot be read back intact."


def jpeg(seed: int, size: int = 200) -> bytes:
    """Looks like a JPEG to a casual reader; images are not decoded by the archive code."""
    return b"\xff\xd8" + random.Random(seed).randbytes(size)


def sample(count: int = 3) -> TaskArchive:
    examples = tuple(ArchivedExample(jpeg(n), f"Caption {n}: a cat, naïvely drawn 🐈") for n in range(1, count + 1))
    return TaskArchive("cats", "Cat captions", "<image>Output:", examples)


def manifest(count: int = 2) -> dict:
    return {
        "format": ARCHIVE_FORMAT,
        "version": FORMAT_VERSION,
        "name": "cats",
        "description": "Cat captions",
        "prompt_template": "<image>Output:",
        "exported_at": WHEN.isoformat(),
        "examples": [
            {"image": f"examples/{n}.jpg", "text": f"text {n}", "sha256": hashlib.sha256(jpeg(n)).hexdigest()}
            for n in range(1, count + 1)
        ],
    }


def images(count: int = 2) -> list[tuple[str, bytes]]:
    return [(f"examples/{n}.jpg", jpeg(n)) for n in range(1, count + 1)]


def build(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buffer.getvalue()


def archive_with(fields: dict | bytes, entries: list[tuple[str | zipfile.ZipInfo, bytes]] | None = None) -> bytes:
    body = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
    return build([("task.json", body), *(images() if entries is None else entries)])


def refusal(data: bytes, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(BadArchive) as caught:
        read_archive(data, limits)
    return str(caught.value)


# Writing and reading back


@pytest.mark.parametrize("count", [0, 1, 4])
def test_a_written_archive_reads_back_as_the_same_task(count):
    task = sample(count)
    assert read_archive(write_archive(task, WHEN), LIMITS) == task


def test_the_same_task_and_time_give_the_same_bytes():
    assert write_archive(sample(), WHEN) == write_archive(sample(), WHEN)
    assert write_archive(sample(), WHEN) != write_archive(sample(), WHEN.replace(year=2025))


def test_the_archive_layout_is_task_json_then_stored_jpegs():
    task = sample(2)
    with zipfile.ZipFile(io.BytesIO(write_archive(task, WHEN))) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["task.json", "examples/1.jpg", "examples/2.jpg"]
        assert [i.compress_type for i in infos] == [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_STORED]
        assert {i.date_time for i in infos} == {(2024, 5, 6, 7, 8, 10)}
        written = json.loads(zf.read("task.json"))
        assert zf.read("examples/2.jpg") == task.examples[1].image
    assert written == {
        "format": "flamingo-bot-task",
        "version": 1,
        "name": "cats",
        "description": "Cat captions",
        "prompt_template": "<image>Output:",
        "exported_at": "2024-05-06T07:08:10+00:00",
        "examples": [
            {"image": f"examples/{n}.jpg", "text": e.text, "sha256": hashlib.sha256(e.image).hexdigest()}
            for n, e in enumerate(task.examples, start=1)
        ],
    }


def test_an_export_time_before_1980_still_writes():
    data = write_archive(sample(1), datetime(1970, 1, 1, tzinfo=UTC))
    assert read_archive(data, LIMITS) == sample(1)


def test_a_hand_made_archive_with_any_image_order_and_extra_keys_reads():
    fields = manifest(2) | {"comment": "ignored"}
    fields["examples"].reverse()
    task = read_archive(archive_with(fields, images(2)[::-1]), LIMITS)
    assert [e.text for e in task.examples] == ["text 2", "text 1"]
    assert [e.image for e in task.examples] == [jpeg(2), jpeg(1)]


@pytest.mark.parametrize(
    ("name", "filename"),
    [("cats", "cats.flamingo-task.zip"), ("My Cats!", "my-cats.flamingo-task.zip"), ("../", "task.flamingo-task.zip")],
)
def test_archive_filename_is_safe_to_attach(name, filename):
    assert archive_filename(name) == filename


# Refusals: the container


def test_a_file_over_the_size_limit_is_refused_before_opening():
    data = write_archive(sample(1), WHEN)
    limits = ArchiveLimits(len(data) - 1, 50_000, 4, 200)
    assert refusal(data, limits) == f"The task file is {len(data):,} bytes; the limit is {len(data) - 1:,} bytes."


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", b"PK\x03\x04" + bytes(100)])
def test_a_file_that_is_not_a_zip_is_refused(data):
    assert refusal(data) == NOT_A_ZIP


def test_a_truncated_zip_is_refused():
    assert refusal(write_archive(sample(1), WHEN)[:-30]) == NOT_A_ZIP


def test_an_image_whose_bytes_fail_the_crc_is_refused():
    data = bytearray(write_archive(sample(1), WHEN))
    data[data.index(jpeg(1)) + 10] ^= 0xFF
    assert refusal(bytes(data)) == DAMAGED


def test_corrupt_deflated_data_is_refused():
    data = bytearray(write_archive(sample(1), WHEN))
    start = 30 + len("task.json")  # the local header, then the compressed task.json
    data[start + 5 : start + 25] = bytes(20)
    assert refusal(bytes(data)) == DAMAGED


def test_an_encrypted_entry_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("task.json", json.dumps(manifest(0)))
        zf.getinfo("task.json").flag_bits |= 0x1  # goes into the central directory on close
    assert refusal(buffer.getvalue()) == "The task file is encrypted; export the task again without a password."


def test_more_entries_than_a_task_can_have_is_refused():
    assert refusal(archive_with(manifest(5), images(5))) == (
        "The task file holds 6 files; it may hold at most 5 (task.json and up to 4 example images)."
    )


def _unparsed(monkeypatch) -> None:
    """zipfile must not be reached: the refusal comes from the end-of-directory record alone."""

    def parse(*args, **kwargs):
        raise AssertionError("the central directory was parsed")

    monkeypatch.setattr("core.tasks.archive.zipfile.ZipFile", parse)


ROOMY = ArchiveLimits(max_bytes=10**8, max_uncompressed_bytes=50_000, max_examples=4, max_text_chars=200)


def test_a_file_listing_many_entries_is_refused_before_its_directory_is_parsed(monkeypatch):
    """A directory of 282,707 entries took 3 s and 150 MiB to parse before its count was checked."""
    data = build([(f"examples/{n}.jpg", b"") for n in range(1, 3001)])
    _unparsed(monkeypatch)
    assert refusal(data, ROOMY) == (
        "The task file holds 3000 files; it may hold at most 5 (task.json and up to 4 example images)."
    )


def test_a_zip64_count_is_read_from_its_own_record(monkeypatch):
    data = build([(f"examples/{n}.jpg", b"") for n in range(1, 70_001)])  # past 65,535: ZIP64 records
    assert b"PK\x06\x06" in data[-200:]
    _unparsed(monkeypatch)
    assert refusal(data, ROOMY).startswith("The task file holds 70000 files;")


def test_a_directory_larger_than_its_declared_count_needs_is_refused_before_it_is_parsed(monkeypatch):
    data = bytearray(build([(f"examples/{n}.jpg", b"") for n in range(1, 501)]))
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = (2).to_bytes(2, "little") * 2  # the count lies; the directory's size does not
    _unparsed(monkeypatch)
    assert refusal(bytes(data), ROOMY) == (
        "The task file's directory is larger than its files need; export the task again from the bot."
    )


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("/task.json", "/task.json"),
        ("../task.json", "../task.json"),
        ("examples/../task.json", "examples/../task.json"),
        ("examples\\1.jpg", "examples\\\\1.jpg"),
        ("examples/", "examples/"),
        ("examples/0.jpg", "examples/0.jpg"),
        ("examples/01.jpg", "examples/01.jpg"),
        ("examples/5.jpg", "examples/5.jpg"),
        ("examples/1.JPG", "examples/1.JPG"),
        ("examples/1.jpg/", "examples/1.jpg/"),
        ("Task.json", "Task.json"),
        ("notes.txt", "notes.txt"),
        ("ex\u00e9mple\n.jpg", "ex\\xe9mple\\n.jpg"),
    ],
)
def test_an_unexpected_entry_name_is_refused(name, shown):
    assert refusal(archive_with(manifest(1), [*images(1), (name, b"x")])) == (
        f"The task file contains an unexpected entry “{shown}”; only task.json "
        "and examples/1.jpg to examples/4.jpg are allowed."
    )


def test_a_name_hidden_behind_a_nul_byte_is_refused():
    """zipfile cuts names at NUL, which would make this entry look like a second task.json."""
    data = archive_with(manifest(1), [*images(1), ("task.json_evil", b"x")]).replace(
        b"task.json_evil", b"task.json\0evil"
    )
    assert refusal(data) == (
        "The task file contains an unexpected entry “task.json\\x00evil”; only task.json "
        "and examples/1.jpg to examples/4.jpg are allowed."
    )


def test_a_long_entry_name_is_cut_in_the_message():
    message = refusal(archive_with(manifest(0), [("x" * 1000, b"")]))
    assert message == (
        f"The task file contains an unexpected entry “{'x' * 60}…”; only task.json "
        "and examples/1.jpg to examples/4.jpg are allowed."
    )


def test_a_duplicate_entry_is_refused():
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = archive_with(manifest(1), [*images(1), ("examples/1.jpg", jpeg(1))])
    assert refusal(data) == "The task file contains “examples/1.jpg” more than once."


def test_a_symbolic_link_with_an_allowed_name_is_refused():
    link = zipfile.ZipInfo("examples/1.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    assert refusal(archive_with(manifest(1), [(link, b"/etc/passwd")])) == (
        "The entry “examples/1.jpg” in the task file is a symbolic link, not a file."
    )


def test_an_entry_compressed_with_another_method_is_refused():
    data = build([("task.json", json.dumps(manifest(0)).encode())], zipfile.ZIP_BZIP2)
    assert refusal(data) == (
        "The entry “task.json” in the task file uses a compression method I do not accept; "
        "export the task again from the bot."
    )


def test_a_missing_task_json_is_refused():
    assert refusal(build(images(1))) == "The task file has no task.json, so it was not made by a task export."


def test_declared_sizes_past_the_unpacked_limit_are_refused():
    bomb = build(
        [("task.json", json.dumps(manifest(0)).encode()), ("examples/1.jpg", bytes(60_000))], zipfile.ZIP_DEFLATED
    )
    assert len(bomb) < 1000
    total = len(json.dumps(manifest(0))) + 60_000
    assert refusal(bomb) == f"The task file unpacks to {total:,} bytes; the limit is 50,000 bytes."


def test_lying_headers_are_caught_while_reading(monkeypatch):
    """A reader that yields more than the headers declare (CPython's stops at the declared size, others may not)."""
    data = write_archive(sample(1), WHEN)
    real_open = zipfile.ZipFile.open

    def open_bigger(self, info, *args, **kwargs):
        if info.filename == "examples/1.jpg":
            return io.BytesIO(bytes(LIMITS.max_uncompressed_bytes))
        return real_open(self, info, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_bigger)
    assert refusal(data) == "The task file unpacks to more than its headers declare, past the 50,000-byte limit."


def test_a_task_json_larger_than_its_texts_allow_is_refused_before_it_is_parsed(monkeypatch):
    """Parsing is the costly part: 50 MiB of JSON list took 1.25 GB and held the event loop's GIL."""
    cap = LIMITS.max_manifest_bytes
    assert cap == 4096 + 7 * (6 * 200 + 256)
    body = b"[" + b"0," * (cap // 2) + b"0]"
    assert refusal(archive_with(body, [])) == (
        f"The task file's task.json is {len(body):,} bytes; it may be at most {cap:,} bytes."
    )
    parsed = []
    monkeypatch.setattr(json, "loads", lambda *args, **kwargs: parsed.append(args) or {})
    data = write_archive(sample(1), WHEN)
    real_open = zipfile.ZipFile.open

    def open_bigger(self, info, *args, **kwargs):  # more than its header declares
        if info.filename == "task.json":
            return io.BytesIO(b" " * (cap + 1))
        return real_open(self, info, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_bigger)
    assert refusal(data) == f"The task file's task.json is {cap + 1:,} bytes; it may be at most {cap:,} bytes."
    assert parsed == []


def test_random_damage_is_refused_with_a_message_not_a_crash():
    good = write_archive(sample(2), WHEN)
    rng = random.Random(1234)
    refused = 0
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            read_archive(bytes(data), LIMITS)
        except BadArchive:
            refused += 1
    assert refused > 300


# Refusals: task.json


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b"{not json", b"[" * 10_000, "{}".encode("utf-16")])
def test_task_json_that_is_not_utf8_json_is_refused(body):
    assert refusal(archive_with(body, [])) == "The task file's task.json is not valid UTF-8 JSON."


@pytest.mark.parametrize("body", [b"[]", b'"cats"', b"null", b"3"])
def test_task_json_that_is_not_an_object_is_refused(body):
    assert refusal(archive_with(body, [])) == "The task file's task.json must hold a JSON object."


@pytest.mark.parametrize("fmt", ["other", None, 1])
def test_a_wrong_format_is_refused(fmt):
    fields = manifest(0) | {"format": fmt}
    assert refusal(archive_with(fields, [])) == (
        "This ZIP file is not a task file from this bot: its task.json has the wrong “format”."
    )


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_a_version_that_is_not_a_whole_number_is_refused(version):
    fields = manifest(0) | {"version": version}
    assert refusal(archive_with(fields, [])) == "The task file's “version” is missing or is not a whole number."


def test_a_missing_version_is_refused():
    fields = manifest(0)
    del fields["version"]
    assert refusal(archive_with(fields, [])) == "The task file's “version” is missing or is not a whole number."


def test_a_newer_version_asks_for_an_update():
    assert refusal(archive_with(manifest(0) | {"version": 2}, [])) == (
        "This task file was made by a newer version of the bot (format 2); update it to import this."
    )


@pytest.mark.parametrize("version", [0, -1])
def test_a_version_below_one_is_refused(version):
    fields = manifest(0) | {"version": version}
    assert refusal(archive_with(fields, [])) == f"The task file has an invalid format version ({version})."


@pytest.mark.parametrize("key", ["name", "description", "prompt_template", "examples"])
def test_a_missing_field_is_refused(key):
    fields = manifest(0)
    del fields[key]
    assert refusal(archive_with(fields, [])) == f"The task file's task.json has no “{key}”."


@pytest.mark.parametrize("key", ["name", "description", "prompt_template"])
@pytest.mark.parametrize("value", [None, 5, ["cats"]])
def test_a_field_that_is_not_a_string_is_refused(key, value):
    fields = manifest(0) | {key: value}
    assert refusal(archive_with(fields, [])) == f"“{key}” in the task file's task.json must be a string."


def test_a_lone_surrogate_is_refused_as_text():
    body = json.dumps(manifest(0)).replace('"cats"', '"cat\\ud800"').encode()
    assert refusal(archive_with(body, [])) == "“name” in the task file's task.json is not valid text."


@pytest.mark.parametrize("value", [{}, "examples/1.jpg", None])
def test_examples_that_are_not_a_list_are_refused(value):
    fields = manifest(0) | {"examples": value}
    assert refusal(archive_with(fields, [])) == "“examples” in the task file's task.json must be a list."


@pytest.mark.parametrize("item", [5, "examples/1.jpg", ["examples/1.jpg"], None])
def test_an_example_that_is_not_an_object_is_refused(item):
    fields = manifest(1)
    fields["examples"].append(item)
    assert refusal(archive_with(fields, images(1))) == "The task file's example 2 must be a JSON object."


@pytest.mark.parametrize("key", ["image", "text", "sha256"])
def test_an_example_missing_a_field_is_refused(key):
    fields = manifest(2)
    del fields["examples"][1][key]
    assert refusal(archive_with(fields)) == f"The task file's example 2 has no “{key}”."


@pytest.mark.parametrize("key", ["image", "text", "sha256"])
def test_an_example_field_that_is_not_a_string_is_refused(key):
    fields = manifest(2)
    fields["examples"][0][key] = 1
    assert refusal(archive_with(fields)) == f"“{key}” in the task file's example 1 must be a string."


def test_more_examples_than_allowed_are_refused():
    fields = manifest(1)
    fields["examples"] *= 5
    assert refusal(archive_with(fields, images(1))) == "The task file has 5 examples; a task may have at most 4."


@pytest.mark.parametrize(
    ("key", "label"), [("name", "name"), ("description", "description"), ("prompt_template", "prompt template")]
)
def test_a_field_longer_than_the_cap_is_refused(key, label):
    fields = manifest(0) | {key: "x" * 201}
    assert refusal(archive_with(fields, [])) == (
        f"The {label} in the task file is 201 characters long; the limit is 200."
    )


def test_text_at_the_cap_is_accepted():
    fields = manifest(1)
    fields["examples"][0]["text"] = "x" * 200
    assert read_archive(archive_with(fields, images(1)), LIMITS).examples[0].text == "x" * 200


def test_an_example_text_longer_than_the_cap_is_refused():
    fields = manifest(2)
    fields["examples"][1]["text"] = "x" * 1000
    assert refusal(archive_with(fields)) == (
        "The text of example 2 in the task file is 1,000 characters long; the limit is 200."
    )


@pytest.mark.parametrize("path", ["examples/3.jpg", "task.json", "../examples/1.jpg"])
def test_an_example_whose_image_is_missing_is_refused(path):
    fields = manifest(2)
    fields["examples"][1]["image"] = path
    assert refusal(archive_with(fields, images(1))) == (
        f"Example 2 refers to “{path}”, which is not an image in the task file."
    )


def test_an_image_used_by_two_examples_is_refused():
    fields = manifest(2)
    fields["examples"][1] = fields["examples"][0]
    assert refusal(archive_with(fields, images(1))) == (
        "Examples 1 and 2 in the task file use the same image “examples/1.jpg”."
    )


def test_an_image_that_does_not_match_its_checksum_is_refused():
    fields = manifest(2)
    fields["examples"][1]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    assert refusal(archive_with(fields)) == (
        "The image of example 2 does not match its checksum; the task file is damaged."
    )


def test_an_upper_case_checksum_is_accepted():
    fields = manifest(1)
    fields["examples"][0]["sha256"] = fields["examples"][0]["sha256"].upper()
    assert read_archive(archive_with(fields, images(1)), LIMITS).examples[0].image == jpeg(1)


def test_an_image_that_no_example_uses_is_refused():
    assert refusal(archive_with(manifest(1), images(3))) == (
        "The task file holds “examples/2.jpg”, which no example uses."
    )
