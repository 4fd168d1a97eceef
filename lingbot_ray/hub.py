"""Checkpoints from the Hugging Face Hub: ``model.path: robbyant/lingbot-world-fast-diffusers``.

Which values are hub repo ids (:func:`hub_repo_id`, docs/DEPLOYING.md "Models from the hub"):

* ``hf://ORG/NAME`` always is one;
* a bare ``ORG/NAME`` is one when it has exactly one ``/``, both parts are valid hub names (letters,
  digits, ``_``, ``-``, ``.``; not starting or ending with ``-`` or ``.``; no ``--`` or ``..``; at most
  96 characters) and no file or folder of that relative name exists, so an existing local folder with
  the same name wins;
* anything starting with ``/``, ``.``, ``~`` or ``embedded:``, and anything else, is a local path.

:func:`snapshot` fetches a repo with ``huggingface_hub.snapshot_download`` into the standard cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and returns the snapshot
folder ``models--ORG--NAME/snapshots/<commit>``. huggingface_hub reads ``HF_ENDPOINT``, ``HF_TOKEN``
and ``HF_HUB_OFFLINE`` itself; with ``HF_HUB_OFFLINE=1`` the snapshot comes from the cache and nothing
touches the network. Processes on one node serialise on a file lock next to the cache, so the node
downloads once and the others find the snapshot (:func:`node_lock_path`).

This module imports nothing heavy: huggingface_hub (which does not import torch) is imported only
when a repo is fetched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import EXPECTED_COMPONENTS, MODEL_INDEX_FILE, SERVING_DEFAULTS_FILE, TINY_DECODER_FOLDER

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
LOCAL_PREFIXES = ("/", ".", "~", "embedded:")
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_MAX_REPO_ID = 96

# The five component folders, and the optional tiny decoder a repo may carry
COMPONENTS = (*EXPECTED_COMPONENTS, TINY_DECODER_FOLDER)
TOP_LEVEL_FILES = (MODEL_INDEX_FILE, SERVING_DEFAULTS_FILE, "README.md")
# What the pipeline uses: the index, the serving defaults, the model card and the component folders
WEIGHTS_PATTERNS = (*TOP_LEVEL_FILES, *(f"{c}/*" for c in COMPONENTS))
# What a process that reads only the JSON facts needs (ingress, app builder): a few kB to a few MB
CONFIG_PATTERNS = (*TOP_LEVEL_FILES, *(f"{c}/*.json" for c in COMPONENTS))
# Weight formats no loader here reads (Flax, TensorFlow, ONNX, GGUF, rust-bert)
IGNORE_PATTERNS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf", "*.ot")


class HubCheckpointError(FileNotFoundError):
    """A hub ``model.path`` could not be resolved to a checkpoint folder; the message says why and
    what to do (the hub's own exception is chained as ``__cause__``)."""


def looks_like_repo_id(value: str) -> bool:
    """Whether ``value`` has the shape of a hub model repo id ``ORG/NAME`` (no file system check)."""
    return (
        len(value) <= _MAX_REPO_ID
        and _REPO_ID.fullmatch(value) is not None
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def hub_repo_id(path: str) -> str | None:
    """The repo id ``model.path`` names on the hub, or None for a local path (see the module doc)."""
    if path.startswith(HUB_PREFIX):
        repo_id = path[len(HUB_PREFIX):]
        if not looks_like_repo_id(repo_id):
            raise ValueError(f"model.path={path!r}: {repo_id!r} is not a hub repo id (ORG/NAME)")
        return repo_id
    if path.startswith(LOCAL_PREFIXES) or not looks_like_repo_id(path):
        return None
    if os.path.lexists(path):
        return None  # an existing local folder of that relative name wins
    return path


def may_be_repo_id(path: str) -> bool:
    """Whether ``model.path`` can name a hub repo (syntax only: a local folder of the same name would
    still win on a node that has one). Used to check ``model.revision`` when the config is loaded."""
    if path.startswith(HUB_PREFIX):
        return True
    return not path.startswith(LOCAL_PREFIXES) and looks_like_repo_id(path)


def _describe(path: str, revision: str | None) -> str:
    return f"model.path={path!r}" + (f" model.revision={revision!r}" if revision is not None else "")


def node_lock_path(cache: Path, repo_id: str, *, weights: bool = True) -> Path:
    """The lock the processes of one node take to fetch ``repo_id``: in the cache's ``.locks`` folder,
    beside huggingface_hub's own per-file locks. Fetching only the configs takes a lock of its own, so
    an ingress never queues behind a stage replica's 86 GB download (a file both fetch is still
    fetched once: huggingface_hub locks each file)."""
    name = "lingbot_ray.weights.lock" if weights else "lingbot_ray.configs.lock"
    return cache / ".locks" / ("models--" + repo_id.replace("/", "--")) / name


@contextmanager
def _node_lock(cache: Path, repo_id: str, what: str, *, weights: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` for ``repo_id`` next to the cache, so the processes of one node
    fetch the repo one after another: the first downloads, the others then find every file cached.

    A cache where the lock cannot be created (a read-only volume) is used without it."""
    lock_path = node_lock_path(cache, repo_id, weights=weights)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as exc:
        logger.warning("%s: cannot create the lock %s (%s): fetching without it", what, lock_path, exc)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process on this node is fetching it; waiting for it to finish", what)
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            logger.info("%s: waited %.1f s for the other process", what, time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _explain(exc: BaseException, *, path: str, repo_id: str, revision: str | None, endpoint: str, cache: Path, offline: bool) -> str:
    """One message for a failed fetch: what went wrong, in this project's terms, and what to do."""
    from huggingface_hub import errors

    what = _describe(path, revision)
    local = (
        f" (not a local folder on this node either: a local checkpoint needs an absolute path or ./{path})"
        if not path.startswith(HUB_PREFIX)
        else ""
    )
    where = f"the cache {str(cache)!r}"
    if isinstance(exc, errors.GatedRepoError):
        return (
            f"{what}: {repo_id!r} on {endpoint} is a gated repo: accept its conditions on its hub page with your "
            "account, then set HF_TOKEN to a read token of that account on every node"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (
            f"{what}: {endpoint} has no model repo {repo_id!r}{local}, or it is private and "
            f"{'the token in HF_TOKEN has no access to it' if os.environ.get('HF_TOKEN') else 'HF_TOKEN is not set'}; "
            "check the id"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{what}: {repo_id!r} on {endpoint} has no branch, tag or commit {revision!r}"
    if isinstance(exc, errors.IncompleteSnapshotError):
        return (
            f"{what}: {where} holds only part of the snapshot and the hub "
            f"{'may not be used (HF_HUB_OFFLINE is set)' if offline else f'could not be reached at {endpoint}'}; "
            "fetch it once with network access (`hf download " + repo_id
            + (f" --revision {revision}" if revision else "") + "`) into that cache"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        if offline:
            return (
                f"{what}: HF_HUB_OFFLINE is set and {where} holds no snapshot of {repo_id!r}"
                f"{f' at {revision!r}' if revision else ''}{local}; fetch it once with network access "
                f"(`hf download {repo_id}{f' --revision {revision}' if revision else ''}`) into that cache, "
                "point HF_HUB_CACHE at a cache that has it, or unset HF_HUB_OFFLINE"
            )
        cause = exc.__cause__ or exc.__context__
        reason = f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""
        return (
            f"{what}: cannot reach {endpoint}{reason} and {where} holds no snapshot of {repo_id!r}{local}; "
            "check the network (HF_ENDPOINT, proxies), or pre-populate the cache and set HF_HUB_OFFLINE=1"
        )
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return f"{what}: {endpoint} refused the token in HF_TOKEN (401: invalid credentials); set a valid read token"
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        return f"{what}: {endpoint} answered {exc.response.status_code} ({_first_line(exc)}); try again later"
    return f"{what}: fetching {repo_id!r} from {endpoint} into {where} failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def snapshot(path: str, *, revision: str | None = None, weights: bool = True) -> Path:
    """The snapshot folder of the hub repo that ``model.path`` names, fetched into the cache if needed.

    ``weights=False`` fetches only the JSON files (what :class:`lingbot_ray.checkpoint.CheckpointFacts`
    reads), for processes that never load a model. ``revision`` is a branch, tag or commit (default:
    the repo's main branch); a branch is resolved when the process starts, so pin a commit to be sure
    every replica serves the same weights.
    """
    repo_id = hub_repo_id(path)
    if repo_id is None:
        raise ValueError(f"model.path={path!r}: not a hub repo id")
    from huggingface_hub import constants, snapshot_download  # no torch: see the module doc

    from lingbot_ray import __version__

    what = _describe(path, revision)
    cache = Path(constants.HF_HUB_CACHE).expanduser()
    endpoint = constants.ENDPOINT
    offline = constants.is_offline_mode()
    kind = "all files" if weights else "config files"
    started = time.monotonic()
    try:
        # offline, the cache is only read: no lock to take (the cache may be read-only)
        with contextlib.nullcontext() if offline else _node_lock(cache, repo_id, what, weights=weights):
            if offline:
                logger.info("%s: HF_HUB_OFFLINE is set: looking for %s in the cache %s", what, kind, cache)
            else:
                logger.info("%s: fetching %s of %s from %s into the cache %s", what, kind, repo_id, endpoint, cache)
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(WEIGHTS_PATTERNS if weights else CONFIG_PATTERNS),
                ignore_patterns=list(IGNORE_PATTERNS),
                library_name="lingbot_ray",
                library_version=__version__,
            )
    except Exception as exc:
        raise HubCheckpointError(
            _explain(exc, path=path, repo_id=repo_id, revision=revision, endpoint=endpoint, cache=cache, offline=offline)
        ) from exc
    folder_path = Path(folder)
    commit = folder_path.name
    if not (folder_path / MODEL_INDEX_FILE).is_file():
        raise HubCheckpointError(
            f"{what}: commit {commit} of {repo_id!r} has no {MODEL_INDEX_FILE} at its root, so it is not a "
            "diffusers-format LingBot checkpoint (the published one is robbyant/lingbot-world-fast-diffusers)"
        )
    logger.info(
        "%s: %s at revision %s (commit %s) in %s (%.1f s)",
        what, repo_id, revision or constants.DEFAULT_REVISION, commit, folder_path, time.monotonic() - started,
    )
    return folder_path
