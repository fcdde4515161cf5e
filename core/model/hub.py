"""The Hugging Face Hub as loading meets it: one quick look before any download, and what it found.

huggingface_hub retries a hub it cannot reach five times per file, waiting up to 8 s between tries,
and open_clip and transformers each ask for several files, so without a route to the hub an error
that named neither way of running offline came after about a minute. One metadata request per
repository, with the hub's own metadata timeout (``HF_HUB_ETAG_TIMEOUT``, 10 s unless set), settles
reachability before anything is fetched, and tells which files are still to download and their sizes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TextIO

import open_clip
import requests
import transformers
from huggingface_hub import HfApi, ModelInfo, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    reset_sessions,
)
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from core.errors import ModelLoadError
from core.model.registry import ModelSpec

log = logging.getLogger(__name__)

# huggingface_hub gives its logger a stderr handler of its own and still passes every record on to
# the process's handlers (describe's, or discord.py's in the bot), so each of its lines came twice.
logging.getLogger("huggingface_hub").handlers.clear()

OFFLINE_WAYS = (
    "to run without it, set HF_HUB_OFFLINE=1 with the weights already in the Hugging Face cache, "
    "or use a local model directory (--model DIR, or model.name in config.toml)"
)
# transformers reads a language model's weights from safetensors when the repository has them.
_LANGUAGE_MODEL_WEIGHTS = (("model.safetensors", "model-*.safetensors"), ("pytorch_model.bin", "pytorch_model-*.bin"))


@dataclass(frozen=True)
class HubFile:
    """A file that loading will download, the cache lacking it."""

    repo: str
    name: str
    size: int


@dataclass(frozen=True)
class _Weights:
    """The large files a loader takes from one repository: the first choice of name patterns the
    repository has files for (a safetensors copy, else the pickled one)."""

    repo: str
    revision: str | None
    choices: tuple[tuple[str, ...], ...]


def _is_local(path: str) -> bool:
    return path.startswith("local-dir:") or Path(path).exists()


def _vision_weights(spec: ModelSpec) -> _Weights | None:
    """Where open_clip fetches the tower's pretrained weights from, as its own download does."""
    tag = spec.clip_vision_encoder_pretrained
    if not tag or _is_local(spec.clip_vision_encoder_path) or _is_local(tag):
        return None
    hub = open_clip.get_pretrained_cfg(spec.clip_vision_encoder_path, tag).get("hf_hub")
    if not hub:
        return None
    repo, name = os.path.split(hub)
    name = name or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if name == HF_WEIGHTS_NAME else re.sub(r"\.(bin|pth)$", ".safetensors", name)
    return _Weights(repo, None, ((safe,), (name,)))


def _weights_of(spec: ModelSpec) -> list[_Weights]:
    """The repositories loading ``spec`` downloads weights from; tokenizers and configs are small."""
    weights = [_vision_weights(spec)]
    if not _is_local(spec.lang_encoder_path):
        weights.append(_Weights(spec.lang_encoder_path, spec.lang_encoder_revision, _LANGUAGE_MODEL_WEIGHTS))
    if spec.checkpoint_repo is not None:
        weights.append(_Weights(spec.checkpoint_repo, None, ((spec.checkpoint_path,),)))
    return [found for found in weights if found is not None]


def _no_route(error: requests.RequestException) -> ModelLoadError:
    if isinstance(error, requests.Timeout):
        reason = "no answer in time"
    else:
        found = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", str(error))  # urllib3 nests the system's words
        reason = found.group(1).strip().lower() if found else "no connection"
    return ModelLoadError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}); {OFFLINE_WAYS}")


def unreachable(error: BaseException) -> ModelLoadError | None:
    """The one-line refusal for an error caused, at any depth (open_clip and transformers wrap
    them), by failing to reach the hub; None for any other error."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
            return _no_route(cause)
        cause = cause.__cause__ or cause.__context__
    return None


class _NoRoute(Exception):
    """The hub did not answer; what to tell the operator if the cache cannot stand in for it."""

    def __init__(self, refusal: ModelLoadError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def _look_up(repo: str, revision: str | None, files_metadata: bool) -> ModelInfo:
    """One request, without huggingface_hub's retries; raises ``ModelLoadError`` in one line."""
    try:
        return HfApi().model_info(
            repo, revision=revision, files_metadata=files_metadata, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except (requests.ConnectionError, requests.Timeout) as error:
        raise _NoRoute(_no_route(error)) from None
    except ValueError:  # only paths missing here are looked up, so this one can be neither
        raise ModelLoadError(f"{repo} is no folder here, nor a name a Hugging Face Hub repository can have") from None
    except HfHubHTTPError as error:
        detail = str(error).strip().splitlines()[0]
        raise ModelLoadError(f"cannot look up {repo} on the Hugging Face Hub: {detail}") from None


def _in_cache(repo: str, etag: str) -> bool:
    """Whether the cache holds this content, under any revision: huggingface_hub then links it
    instead of downloading (its blobs are named by their etag: an LFS file's sha256)."""
    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs" / etag).is_file()


def _missing(weights: _Weights, info: ModelInfo) -> list[HubFile]:
    files = [sibling for sibling in info.siblings or [] if "/" not in sibling.rfilename]  # loaders read the top
    for patterns in weights.choices:
        chosen = [sibling for sibling in files if any(fnmatch(sibling.rfilename, pattern) for pattern in patterns)]
        if chosen:
            return [
                HubFile(weights.repo, sibling.rfilename, sibling.size or 0)
                for sibling in chosen
                if not _in_cache(weights.repo, sibling.lfs.sha256 if sibling.lfs else sibling.blob_id or "")
            ]
    return []


def _snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached copy of a repository that an earlier load left (``refs/main`` names the commit)."""
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def _cached(weights: _Weights) -> bool:
    snapshot = _snapshot(weights.repo, weights.revision)
    return snapshot is not None and any(
        any(snapshot.glob(pattern)) for patterns in weights.choices for pattern in patterns
    )


def _go_offline(refusal: ModelLoadError) -> None:
    """Load from the cache alone for the rest of the process, as ``HF_HUB_OFFLINE=1`` would: a hub
    that is down must not keep a bot whose model is cached from (re)starting, nor cost a minute of
    each loader's retries first."""
    log.warning("%s; the model is in the cache, so it is loaded from there", str(refusal).split(";")[0])
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    transformers.utils.hub._is_offline_mode = True  # transformers reads the variable once, at import
    reset_sessions()  # sessions made from now on refuse requests at once, and the loaders take the cache


def files_to_download(spec: ModelSpec) -> list[HubFile]:
    """The weights loading ``spec`` will download, none when ``HF_HUB_OFFLINE`` is set.

    Raises ``ModelLoadError`` in one line, naming the ways of running offline, when the hub
    cannot be reached, before any loader starts its retries; unless the cache holds every weight
    file, when loading goes on offline.
    """
    if constants.HF_HUB_OFFLINE:
        return []
    needed = _weights_of(spec)
    try:
        found = [(weights, _look_up(weights.repo, weights.revision, files_metadata=True)) for weights in needed]
    except _NoRoute as error:
        if not all(_cached(weights) for weights in needed):
            raise error.refusal from None
        _go_offline(error.refusal)
        return []
    return [file for weights, info in found for file in _missing(weights, info)]


def check_tokenizer_reachable(spec: ModelSpec) -> None:
    """For a process that loads only the tokenizer: the same quick look, at its repository."""
    if constants.HF_HUB_OFFLINE or _is_local(spec.tokenizer_path):
        return
    try:
        _look_up(spec.tokenizer_path, spec.lang_encoder_revision, files_metadata=False)
    except _NoRoute as error:
        if _snapshot(spec.tokenizer_path, spec.lang_encoder_revision) is None:
            raise error.refusal from None
        _go_offline(error.refusal)


@contextmanager
def progress_bars_for(stream: TextIO) -> Iterator[None]:
    """Download and shard-loading bars on a terminal; none in a log (the journal, a file), where
    each redraw of a bar would be a line of noise: the files to download are logged instead."""
    if stream.isatty():
        yield
        return
    hub_bars = not are_progress_bars_disabled()
    transformers_bars = transformers.utils.logging.is_progress_bar_enabled()
    if hub_bars:
        disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_bars:
            enable_progress_bars()
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
