"""Before loading: the hub looked at once, then memory and disk checked, each refusal one line.

The hub is a stand-in on 127.0.0.1 (its metadata API only), a closed port, or a socket that never
answers; free disk and memory are faked. Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from types import SimpleNamespace
from urllib.parse import urlsplit

import huggingface_hub
import pytest
import requests
import torch
import transformers
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from core.config import PROJECT_ROOT, ModelSettings
from core.errors import ModelLoadError
from core.model import hub as hub_module
from core.model import resources
from core.model.footprint import parameter_counts
from core.model.hub import HubFile, files_to_download, progress_bars_for, unreachable
from core.model.loading import load_text_side, plan_precision
from core.model.registry import resolve_model
from core.model.resources import GB, GIB, check_memory, load_checked, prepare_to_load
from tests.helpers.cli import run_main
from tests.helpers.settings import IMAGES, free_port

DEFAULT = "openflamingo/OpenFlamingo-9B-vitl-mpt7b"
CPU, GPU = torch.device("cpu"), torch.device("cuda:0")
OFFLINE_WAYS = ("HF_HUB_OFFLINE=1", "--model DIR", "model.name")
# The default model's weights as the stand-in hub lists them (sizes near the real ones): the
# vision repository has a safetensors copy beside the pickle, the language model only pickles.
HUB_FILES = {
    "timm/vit_large_patch14_clip_224.openai": {
        "open_clip_model.safetensors": 1_710_000_000,
        "open_clip_pytorch_model.bin": 1_710_000_000,
        "README.md": 2_000,
    },
    "anas-awadalla/mpt-7b": {
        "pytorch_model-00001-of-00002.bin": 9_943_000_000,
        "pytorch_model-00002-of-00002.bin": 3_355_000_000,
        "pytorch_model.bin.index.json": 16_000,
        "config.json": 1_200,
    },
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": {"checkpoint.pt": 5_630_000_000},
}


def _etag(repo: str, name: str) -> str:
    return hashlib.sha256(f"{repo}/{name}".encode()).hexdigest()


class _Metadata(BaseHTTPRequestHandler):
    """``/api/models/REPO[/revision/REV]``, as HfApi.model_info(files_metadata=True) reads it."""

    def do_GET(self) -> None:
        repo, _, revision = urlsplit(self.path).path.removeprefix("/api/models/").partition("/revision/")
        if repo not in HUB_FILES:
            self.send_error(404)
            return
        siblings = [
            {"rfilename": name, "size": size, "lfs": {"size": size, "sha256": _etag(repo, name), "pointerSize": 134}}
            for name, size in HUB_FILES[repo].items()
        ]
        body = json.dumps({"id": repo, "sha": revision or "0" * 40, "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[Path]:
    """The stand-in hub, and the (empty) cache it downloads into."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    Thread(target=server.serve_forever, daemon=True).start()
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_port}", tmp_path / "hub")
    try:
        yield tmp_path / "hub"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_hub(monkeypatch, tmp_path) -> None:
    """A hub address where nothing listens: every connection is refused at once."""
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path / "hub")


def _free_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: SimpleNamespace(total=free, used=0, free=free))


def _free_memory(monkeypatch, free: int, host: int | None = None) -> None:
    """``free`` on the device (and on this machine, unless ``host`` says otherwise)."""
    available = free if host is None else host
    monkeypatch.setattr(resources.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))


def _prepare(name: str = DEFAULT, skip_checks: bool = False) -> None:
    prepare_to_load(resolve_model(name), plan_precision("bf16", GPU), GPU, True, skip_checks)


def test_the_downloads_are_the_weights_the_loaders_fetch_less_what_the_cache_holds(hub):
    cached = hub / "models--openflamingo--OpenFlamingo-9B-vitl-mpt7b" / "blobs"
    cached.mkdir(parents=True)
    (cached / _etag("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "checkpoint.pt")).write_bytes(b"")
    assert files_to_download(resolve_model(DEFAULT)) == [
        HubFile("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors", 1_710_000_000),
        HubFile("anas-awadalla/mpt-7b", "pytorch_model-00001-of-00002.bin", 9_943_000_000),
        HubFile("anas-awadalla/mpt-7b", "pytorch_model-00002-of-00002.bin", 3_355_000_000),
    ]


def test_a_short_disk_is_refused_naming_both_sizes_and_the_override(hub, monkeypatch):
    _free_memory(monkeypatch, 100 * GIB)
    _free_disk(monkeypatch, 12 * GB)
    with pytest.raises(ModelLoadError) as refused:
        _prepare()
    message = str(refused.value)
    assert message.startswith("the model's files still to download take 20.6 GB (and 1 GB to spare), ")
    assert f"but {hub} has 12.0 GB free; " in message
    assert "HF_HUB_CACHE" in message and "--skip-resource-checks" in message
    assert "model.skip_resource_checks = true" in message


def test_enough_disk_passes_and_each_download_is_one_log_line(hub, monkeypatch, caplog):
    _free_memory(monkeypatch, 100 * GIB)
    _free_disk(monkeypatch, 22 * GB)
    with caplog.at_level(logging.INFO, logger="core.model.resources"):
        _prepare()
    assert [record.getMessage() for record in caplog.records] == [
        "Downloading timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors (1.71 GB)",
        "Downloading anas-awadalla/mpt-7b/pytorch_model-00001-of-00002.bin (9.94 GB)",
        "Downloading anas-awadalla/mpt-7b/pytorch_model-00002-of-00002.bin (3.35 GB)",
        "Downloading openflamingo/OpenFlamingo-9B-vitl-mpt7b/checkpoint.pt (5.63 GB)",
    ]


def test_the_override_skips_the_size_checks(hub, monkeypatch):
    _free_memory(monkeypatch, 1 * GIB)
    _free_disk(monkeypatch, 1 * GB)
    _prepare(skip_checks=True)


def test_an_unknown_repository_is_one_line(hub, tmp_path):
    with pytest.raises(ModelLoadError, match=r"^cannot look up nobody/nothing on the Hugging Face Hub: 404 "):
        prepare_to_load(
            resolve_model("openflamingo/OpenFlamingo-9B", llama_path="nobody/nothing"),
            plan_precision("bf16", GPU),
            GPU,
            True,
            False,
        )


def test_a_missing_folder_is_not_taken_for_a_repository(hub):
    spec = resolve_model("openflamingo/OpenFlamingo-9B", llama_path="/models/llama-7b-hf")
    with pytest.raises(ModelLoadError, match=r"^/models/llama-7b-hf is no folder here, nor a name a Hugging Face"):
        files_to_download(spec)


def test_an_unreachable_hub_is_reported_before_any_size_check(no_hub, monkeypatch):
    _free_memory(monkeypatch, 1 * GIB)
    _free_disk(monkeypatch, 1 * GB)
    with pytest.raises(ModelLoadError) as refused:
        _prepare()
    message = str(refused.value)
    assert message.startswith(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} (connection refused); ")
    assert all(way in message for way in OFFLINE_WAYS)


def test_a_hub_that_never_answers_is_given_up_after_the_metadata_timeout(monkeypatch, tmp_path):
    with socket.socket() as silent:  # connections are accepted by the kernel, and never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        started = time.monotonic()
        with pytest.raises(ModelLoadError, match=r"\(no answer in time\); to run without it, set HF_HUB_OFFLINE=1"):
            files_to_download(resolve_model(DEFAULT))
    assert time.monotonic() - started < 10  # one request; huggingface_hub's retries would take minutes


def test_offline_mode_looks_nothing_up(no_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert files_to_download(resolve_model(DEFAULT)) == []


def test_a_local_model_directory_needs_no_hub(no_hub, model_dirs):
    assert files_to_download(resolve_model(str(model_dirs["llama"]))) == []


def test_the_tokenizer_alone_is_refused_at_once_without_the_hub(no_hub):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"^cannot reach the Hugging Face Hub at .*HF_HUB_OFFLINE=1"):
        load_text_side(ModelSettings(name=DEFAULT))
    assert time.monotonic() - started < 10


def _raised_from(cause: BaseException, wrapper: BaseException) -> BaseException:
    """``wrapper`` raised while handling ``cause``, as open_clip and transformers wrap the hub's errors."""
    try:
        try:
            raise cause
        except type(cause):
            raise wrapper  # noqa: B904 (the implicit context is the point)
    except type(wrapper) as raised:
        return raised


def test_losing_the_hub_during_a_download_is_the_same_line():
    refused = requests.ConnectionError("... [Errno 101] Network is unreachable')")
    not_found = _raised_from(refused, LocalEntryNotFoundError("cannot find the requested files in the local cache"))
    wrapped = _raised_from(not_found, RuntimeError("Failed to download weights for tag 'openai'"))
    line = str(unreachable(wrapped))
    assert "(network is unreachable); " in line
    assert all(way in line for way in OFFLINE_WAYS)


def test_offline_mode_keeps_the_loaders_own_words():
    offline = _raised_from(OfflineModeIsEnabled("offline"), LocalEntryNotFoundError("not in the cache"))
    assert unreachable(offline) is None


def _refusal(precision: str, device: torch.device) -> str:
    """Why the default model in ``precision`` is refused on ``device``, with the memory stood in."""
    with pytest.raises(ModelLoadError) as refused:
        check_memory(resolve_model(DEFAULT), plan_precision(precision, device), device, True)
    return str(refused.value)


def test_too_little_memory_names_the_sizes_and_the_precisions_that_fit(monkeypatch):
    _free_memory(monkeypatch, 20 * GIB)
    assert _refusal("auto", CPU) == (
        f"{DEFAULT} in fp32 needs 30.3 GiB for its weights and about 1 GiB to run, but cpu has 20.0 GiB free; "
        "a smaller precision fits: bf16 (15.1 GiB), int8 (8.1 GiB), nf4 (6.1 GiB) (--precision, or model.precision "
        "in config.toml); --skip-resource-checks (model.skip_resource_checks = true in config.toml) skips this check"
    )


def test_a_gpu_short_of_memory_is_offered_only_what_fits_it(monkeypatch):
    _free_memory(monkeypatch, 7 * GIB)
    assert re.search(r"in bf16 needs 15\.1 GiB .* but cuda:0 has 7\.0 GiB free; .*fits: nf4 \(5", _refusal("bf16", GPU))
    _free_memory(monkeypatch, 3 * GIB)
    assert "has 3.0 GiB free; choose a smaller model" in _refusal("bf16", GPU)


def test_a_gpu_load_that_this_machines_memory_cannot_carry_is_refused_before_it_starts(monkeypatch):
    """The language model (unless quantized), the vision encoder and the cross-attention layers are in
    this machine's memory before they move to the GPU: too little, and the kernel kills the bot mid-load."""
    _free_memory(monkeypatch, 40 * GIB, host=12 * GIB)
    assert _refusal("bf16", GPU) == (
        f"{DEFAULT} in bf16 passes through about 17.9 GiB of this machine's memory on its way to cuda:0 (its "
        "vision and cross-attention layers as built, in fp32, and its language model in bf16) and needs about "
        "1 GiB more, but 12.0 GiB is available; int8 and nf4 load the language model straight to the GPU and "
        "need about 5.5 GiB here (--precision, or model.precision in config.toml); --skip-resource-checks "
        "(model.skip_resource_checks = true in config.toml) skips this check"
    )
    check_memory(resolve_model(DEFAULT), plan_precision("int8", GPU), GPU, True)  # fits
    _free_memory(monkeypatch, 40 * GIB, host=4 * GIB)
    assert re.search(
        r"in int8 passes through about 5\.5 GiB .* \(its vision and cross-attention layers as built, in fp32\) "
        r".* 4\.0 GiB is available; free memory on this machine \(with swap to spare, the load may still go "
        r"through, slowly\); --skip-resource-checks",
        _refusal("int8", GPU),
    )
    _free_memory(monkeypatch, 40 * GIB, host=20 * GIB)
    check_memory(resolve_model(DEFAULT), plan_precision("bf16", GPU), GPU, True)


def test_sizing_a_model_before_loading_it_says_nothing(monkeypatch, caplog):
    """open_clip narrates building its tower at INFO, which the load itself says again just after."""
    parameter_counts.cache_clear()
    _free_memory(monkeypatch, 100 * GIB)
    with caplog.at_level(logging.INFO):
        check_memory(resolve_model(DEFAULT), plan_precision("bf16", GPU), GPU, True)
    assert [record.getMessage() for record in caplog.records] == []


def test_loading_checks_memory_unless_told_not_to(model_dirs, monkeypatch):
    _free_memory(monkeypatch, GIB // 2)
    settings = ModelSettings(name=str(model_dirs["llama"]), precision="fp32", device="cpu")
    with pytest.raises(ModelLoadError, match=r"in fp32 needs 0\.0 GiB .* but cpu has 0\.5 GiB free; "):
        load_checked(settings)
    assert load_checked(settings.model_copy(update={"skip_resource_checks": True})).precision.name == "fp32"


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_and_not_in_a_log():
    assert not huggingface_hub.utils.are_progress_bars_disabled()
    with progress_bars_for(_Terminal()):  # type: ignore[arg-type]
        assert not huggingface_hub.utils.are_progress_bars_disabled()
        assert transformers.utils.logging.is_progress_bar_enabled()
    with progress_bars_for(sys.stderr):  # captured by pytest: no terminal
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not huggingface_hub.utils.are_progress_bars_disabled()
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_the_hubs_warnings_are_printed_once():
    """huggingface_hub's logger had a stderr handler of its own besides the process's."""
    code = (
        "import logging, sys; logging.basicConfig(stream=sys.stderr, format='%(message)s'); "
        "import core.model.loading; from huggingface_hub.utils import logging as hub_logging; "
        "hub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.stderr.splitlines() == ["Retrying in 1s [Retry 1/5]."]


def test_describe_without_a_route_to_the_hub_is_one_line_at_once(tmp_path):
    """It took 55 s and 49 lines (every retry of the hub client, twice) before naming no way out."""
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = run_main("describe", IMAGES / "chelsea.jpg", "--model", DEFAULT, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(way in errors[0] for way in OFFLINE_WAYS), result.stderr
    assert len(lines) <= 3, result.stderr
    assert "Retrying" not in result.stderr
    assert elapsed < 40  # no retry storm: its waits alone came to 46 s (the rest is importing torch and co.)


def _cache_a_load_of(spec, commit: str = "0123abcd") -> Path:
    """The cache as a finished load leaves it: each repository's snapshot with its weights."""
    for weights in hub_module._weights_of(spec):
        folder = Path(constants.HF_HUB_CACHE) / f"models--{weights.repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / (weights.revision or "main")).write_text(commit)
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / weights.choices[-1][-1].replace("*", "00001-of-00002")).write_bytes(b"weights")
    return snapshot


def test_a_hub_that_is_down_does_not_stop_a_model_the_cache_holds(no_hub, monkeypatch, caplog):
    """A restart during a hub outage loads the cached model offline, without the loaders' retries."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", False)
    spec = resolve_model(DEFAULT)
    snapshot = _cache_a_load_of(spec)
    try:
        with caplog.at_level(logging.WARNING):
            assert files_to_download(spec) == []
        assert constants.HF_HUB_OFFLINE and transformers.utils.hub.is_offline_mode()
        assert "cannot reach the Hugging Face Hub" in caplog.text and "loaded from there" in caplog.text
        started = time.monotonic()
        name = next(snapshot.iterdir()).name
        repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
        assert Path(huggingface_hub.hf_hub_download(repo, name)).read_bytes() == b"weights"
        assert time.monotonic() - started < 5  # from the cache, not after the hub client's retries
    finally:  # the process's sessions refuse requests from now on: back to online for the next tests
        constants.HF_HUB_OFFLINE = False
        huggingface_hub.utils.reset_sessions()


def test_a_hub_that_is_down_still_refuses_a_model_the_cache_lacks_a_part_of(no_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    spec = resolve_model(DEFAULT)
    _cache_a_load_of(spec)
    checkpoint = Path(constants.HF_HUB_CACHE) / f"models--{spec.checkpoint_repo.replace('/', '--')}"
    for file in (checkpoint / "snapshots").rglob("*.*"):
        file.unlink()
    with pytest.raises(ModelLoadError, match=r"^cannot reach the Hugging Face Hub at .*HF_HUB_OFFLINE=1"):
        files_to_download(spec)
    assert not constants.HF_HUB_OFFLINE
