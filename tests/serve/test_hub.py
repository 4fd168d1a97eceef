"""``model.path`` as a Hugging Face hub repo id, fetched with the real ``snapshot_download``.

Nothing here reaches huggingface.co. A small hub on 127.0.0.1 (:class:`FakeHub`) serves the embedded
tiny checkpoint (built by ``build_tiny_checkpoint``) as repos with branches, and the resolution runs in
fresh interpreters with ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` set as a
replica would have them (huggingface_hub reads some of them at import time). The fake hub implements
the calls huggingface_hub's ``snapshot_download`` makes:

* ``GET /api/models/ORG/NAME/revision/REV``: the commit a branch, tag or commit resolves to;
* ``GET /api/models/ORG/NAME/tree/COMMIT?recursive=True``: every file with its size and git blob id,
  and for ``*.safetensors`` an LFS pointer (sha256, size);
* ``HEAD``/``GET /ORG/NAME/resolve/COMMIT/FILE``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) or, for
  LFS files, ``X-Linked-Etag``/``X-Linked-Size`` (sha256), then the body;

with the hub's ``X-Error-Code`` errors (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
``GatedRepo``) and a gated repo that needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from lingbot_ray.checkpoint import checkpoint_folder
from lingbot_ray.hub import hub_repo_id, looks_like_repo_id, node_lock_path
from lingbot_ray.serve.config import load_config

TINY = checkpoint_folder("embedded:lingbot-world-tiny")
REPO = "org/tiny"
TOKEN = "hf_test_secret_token_0123456789"
WEIGHT_FILES = {
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tiny_decoder/model.safetensors",  # the optional tiny decoder (vae.decoder: tiny) travels with the pipeline
}
PIPELINE_FILES = {p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file()}
# in the repo, but never fetched: outside the pipeline's folders, or a weight format nothing here reads
NOT_FETCHED = {".gitattributes", "original/lingbot_world.pt", "transformer/flax_model.msgpack"}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _git_blob_id(data: bytes) -> str:
    return _sha1(b"blob %d\0" % len(data) + data)


@dataclass
class Repo:
    refs: dict[str, str]  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]]  # commit -> path -> content
    token: str | None = None  # gated: needs this bearer token


@dataclass
class FakeHub:
    """The part of the hub API ``snapshot_download`` uses, on a threaded ``http.server``."""

    repos: dict[str, Repo]
    bodies: Counter = field(default_factory=Counter)  # (repo, commit, path) -> GETs of the file body
    requests: list[str] = field(default_factory=list)
    body_delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub.handle(self, head=False)

            def do_HEAD(self):
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request_count(self) -> int:
        with self.lock:
            return len(self.requests)

    # -- routing

    def handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = urlsplit(h.path).path
        with self.lock:
            self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
            repo, commit = self.resolve(h, repo_id, rev)
            if commit is None:
                return
            files = repo.commits[commit]
            if action == "revision":
                body = {"id": repo_id, "sha": commit, "private": False, "siblings": [{"rfilename": p} for p in sorted(files)]}
            else:
                body = [self.tree_entry(p, files[p]) for p in sorted(files)]
            self.send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head=head)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            repo, commit = self.resolve(h, repo_id, rev)
            if commit is None:
                return
            files = repo.commits[commit]
            if filename not in files:
                self.error(h, 404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": commit})
                return
            data = files[filename]
            headers = {"X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
            if filename.endswith(".safetensors"):  # stored with LFS: the linked etag is the sha256
                headers["ETag"] = f'"{_git_blob_id(self.lfs_pointer(data))}"'
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            else:
                headers["ETag"] = f'"{_git_blob_id(data)}"'
            if not head:
                with self.lock:
                    self.bodies[(repo_id, commit, filename)] += 1
                time.sleep(self.body_delay_s)
            self.send(h, 200, data, headers, head=head)
        else:
            self.error(h, 404, None, "Not Found")

    def resolve(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> tuple[Repo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.error(h, 404, "RepoNotFound", "Repository not found")
            return None, None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self.error(h, 401, "GatedRepo", "Access to this model is restricted")
            return None, None
        commit = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self.error(h, 404, "RevisionNotFound", "Invalid rev id")
            return None, None
        return repo, commit

    @staticmethod
    def lfs_pointer(data: bytes) -> bytes:
        return (
            b"version https://git-lfs.github.com/spec/v1\n"
            + f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()
        )

    def tree_entry(self, path: str, data: bytes) -> dict:
        if path.endswith(".safetensors"):
            pointer = self.lfs_pointer(data)
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            return {"type": "file", "path": path, "size": len(data), "oid": _git_blob_id(pointer), "lfs": lfs}
        return {"type": "file", "path": path, "size": len(data), "oid": _git_blob_id(data)}

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], *, head: bool) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def error(self, h, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self.send(h, status, json.dumps({"error": message}).encode(), headers, head=h.command == "HEAD")


def _tiny_files(**overrides: bytes) -> dict[str, bytes]:
    files = {p.relative_to(TINY).as_posix(): p.read_bytes() for p in TINY.rglob("*") if p.is_file()}
    files.update({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                  "original/lingbot_world.pt": b"not for this pipeline" * 100,
                  "transformer/flax_model.msgpack": b"flax weights" * 100})
    files.update(overrides)
    return files


def _with_name(files: dict[str, bytes], name: str) -> bytes:
    serving = json.loads(files["lingbot_ray.json"])
    serving["served_model_name"] = name
    return json.dumps(serving, indent=2).encode()


MAIN = _sha1(b"main commit")
V2 = _sha1(b"v2 commit")


@pytest.fixture
def hub():
    base = _tiny_files()
    repos = {
        REPO: Repo(
            refs={"main": MAIN, "v2": V2},
            commits={MAIN: base, V2: {**base, "lingbot_ray.json": _with_name(base, "lingbot-world-tiny-v2")}},
        ),
        "org/gated": Repo(refs={"main": MAIN}, commits={MAIN: base}, token=TOKEN),
        "org/just-a-readme": Repo(refs={"main": MAIN}, commits={MAIN: {"README.md": b"# nothing\n"}}),
    }
    fake = FakeHub(repos)
    fake.endpoint = fake.start()
    yield fake
    try:
        fake.stop()
    except OSError:
        pass


# -- resolving in a fresh interpreter, as a replica does

RESOLVE = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
args = json.loads(sys.argv[1])
if args.get("ingress"):
    import lingbot_ray.serve.ingress  # the ingress's imports, then the resolution it does
from lingbot_ray.checkpoint import CheckpointFacts, ensure_checkpoint
try:
    folder = ensure_checkpoint(args["path"], revision=args.get("revision"), weights=args.get("weights", True))
except Exception as exc:
    cause = exc.__cause__
    print(json.dumps({"error": type(exc).__name__, "file_not_found": isinstance(exc, FileNotFoundError),
                      "message": str(exc), "cause": type(cause).__module__ + "." + type(cause).__name__ if cause else None}))
    sys.exit(0)
facts = CheckpointFacts.read(folder)
print(json.dumps({"folder": str(folder), "served": facts.defaults.served_model_name,
                  "loaded": sorted(m for m in ("torch", "diffusers", "transformers", "ray") if m in sys.modules)}))
"""


def _env(tmp_path: Path, endpoint: str | None, *, offline: bool = False, token: str | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),  # no token file of this machine's user
        HF_HUB_CACHE=str(tmp_path / "hub-cache"),
        # a closed port where no endpoint is meant: nothing can leave for huggingface.co
        HF_ENDPOINT=endpoint or "http://127.0.0.1:9",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def _args(path: str, **kwargs) -> str:
    return json.dumps({"path": path, **kwargs})


def resolve(tmp_path: Path, endpoint: str | None, path: str = REPO, *, offline=False, token=None, **kwargs) -> dict:
    """Resolve ``path`` in a fresh interpreter (cwd: an empty folder, so ORG/NAME is no local path)."""
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE, _args(path, **kwargs)],
        env=_env(tmp_path, endpoint, offline=offline, token=token),
        cwd=work, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["log"] = done.stderr
    return result


def snapshot_dir(tmp_path: Path, commit: str, repo: str = REPO) -> Path:
    return tmp_path / "hub-cache" / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def fetched(hub: FakeHub, commit: str = MAIN) -> set[str]:
    return {path for (_, c, path) in hub.bodies if c == commit}


# -- the rule


@pytest.mark.parametrize(
    "path, repo_id",
    [
        ("robbyant/lingbot-world-fast-diffusers", "robbyant/lingbot-world-fast-diffusers"),
        ("hf://robbyant/lingbot-world-fast-diffusers", "robbyant/lingbot-world-fast-diffusers"),
        ("Org_1/model.v2", "Org_1/model.v2"),
        ("/models/lingbot-world-fast-diffusers", None),
        ("./org/name", None),
        ("../org/name", None),
        ("~/org/name", None),
        ("embedded:lingbot-world-tiny", None),
        ("name", None),  # a bare name is a local folder: the hub's namespace is required
        ("a/b/c", None),
        ("org--x/name", None),
        ("-org/name", None),
        ("org/name.", None),
        ("org/name.git", None),
        ("org/na me", None),
        ("o/" + "n" * 95, None),  # over 96 characters
    ],
)
def test_which_values_are_hub_repo_ids(path, repo_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_repo_id(path) == repo_id


def test_an_existing_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_repo_id("org/name") == "org/name"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_repo_id("org/name") is None
    assert checkpoint_folder("org/name") == (tmp_path / "org" / "name").resolve()
    # the explicit prefix still means the hub
    assert hub_repo_id("hf://org/name") == "org/name"


def test_a_malformed_hf_prefix_is_refused():
    with pytest.raises(ValueError, match=r"model.path='hf://org/a/b'.*not a hub repo id"):
        hub_repo_id("hf://org/a/b")
    with pytest.raises(ValueError, match=r"model.path='hf://nope'"):
        load_config({"model": {"path": "hf://nope"}})


def test_revision_is_for_hub_ids_only():
    config = load_config({"model": {"path": "robbyant/lingbot-world-fast-diffusers", "revision": "v1.0"}})
    assert config.model.revision == "v1.0"
    assert config.served_model_name == "lingbot-world-fast-diffusers"
    assert load_config({"model": {"path": "hf://robbyant/lingbot-world-fast-diffusers"}}).served_model_name == "lingbot-world-fast-diffusers"
    for model in (
        {"path": "/models/x", "revision": "main"},
        {"path": "embedded:lingbot-world-tiny", "revision": "main"},
        {"path": "org/name", "revision": "main", "build_tiny_if_missing": True},
    ):
        with pytest.raises(ValueError, match=r"model.revision='main': applies to a hub repo id only"):
            load_config({"model": model})
    with pytest.raises(ValueError, match="build_tiny_if_missing builds a local folder"):
        load_config({"model": {"path": "hf://org/name", "build_tiny_if_missing": True}})
    assert looks_like_repo_id("robbyant/lingbot-world-fast-diffusers")


# -- downloads from the local endpoint


def test_a_download_lands_in_the_cache_and_is_not_repeated(hub, tmp_path):
    first = resolve(tmp_path, hub.endpoint)
    folder = snapshot_dir(tmp_path, MAIN)
    assert first["folder"] == str(folder)
    assert first["served"] == "lingbot-world-tiny"
    # the hub cache layout: refs, snapshots of symlinks into blobs named by etag
    repo_cache = folder.parents[1]
    assert (repo_cache / "refs" / "main").read_text() == MAIN
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").resolve().parent == repo_cache / "blobs"
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        TINY / "transformer" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    # every file of the pipeline once, nothing else
    assert fetched(hub) == PIPELINE_FILES
    assert set(hub.bodies.values()) == {1}
    for name in NOT_FETCHED:
        assert not (folder / name).exists()
    assert f"model.path='{REPO}': {REPO} at revision main (commit {MAIN}) in {folder}" in first["log"]

    before = hub.request_count()
    second = resolve(tmp_path, hub.endpoint)
    assert second["folder"] == str(folder)
    assert set(hub.bodies.values()) == {1}  # no file body fetched again
    assert hub.requests[before:] == [f"GET /api/models/{REPO}/revision/main"]  # only the branch is re-resolved


def test_a_branch_and_a_commit_other_than_main(hub, tmp_path):
    resolve(tmp_path, hub.endpoint)
    v2 = resolve(tmp_path, hub.endpoint, revision="v2")
    assert v2["folder"] == str(snapshot_dir(tmp_path, V2))
    assert v2["served"] == "lingbot-world-tiny-v2"
    # blobs are shared between commits: only the file that changed is fetched
    assert fetched(hub, V2) == {"lingbot_ray.json"}
    assert (snapshot_dir(tmp_path, V2).parents[1] / "refs" / "v2").read_text() == V2
    assert "model.revision='v2'" in v2["log"] and f"commit {V2}" in v2["log"]

    before = hub.request_count()
    pinned = resolve(tmp_path, hub.endpoint, revision=MAIN)
    assert pinned["folder"] == str(snapshot_dir(tmp_path, MAIN))
    assert hub.request_count() == before  # a cached commit needs no request at all


def test_concurrent_processes_download_each_file_once(hub, tmp_path):
    """Three replicas start together on one node: they queue on the lock next to the cache, the
    first downloads, the others find the snapshot. The test holds the lock first, so all three
    are known to be waiting before any of them may go."""
    hub.body_delay_s = 0.2
    lock_path = node_lock_path(tmp_path / "hub-cache", REPO)
    lock_path.parent.mkdir(parents=True)
    work = tmp_path / "cwd"
    work.mkdir()
    procs = []
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for i in range(3):
            log = open(tmp_path / f"replica-{i}.log", "w+")
            proc = subprocess.Popen(
                [sys.executable, "-c", RESOLVE, _args(REPO)],
                env=_env(tmp_path, hub.endpoint), cwd=work, stdout=subprocess.PIPE, stderr=log, text=True,
            )
            procs.append((proc, log))
        deadline = time.monotonic() + 120
        while not all("waiting for it to finish" in (tmp_path / f"replica-{i}.log").read_text() for i in range(3)):
            assert time.monotonic() < deadline, [(tmp_path / f"replica-{i}.log").read_text() for i in range(3)]
            assert all(p.poll() is None for p, _ in procs)
            time.sleep(0.1)
        assert hub.request_count() == 0  # nobody went ahead while the lock was held
    results = []
    for proc, log in procs:
        out, _ = proc.communicate(timeout=180)
        log.close()
        assert proc.returncode == 0, (tmp_path / Path(log.name).name).read_text()
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert {r["folder"] for r in results} == {str(snapshot_dir(tmp_path, MAIN))}
    assert fetched(hub) == PIPELINE_FILES and set(hub.bodies.values()) == {1}, hub.bodies


def test_a_process_that_reads_only_facts_fetches_only_configs_and_stays_torch_free(hub, tmp_path):
    facts = resolve(tmp_path, hub.endpoint, weights=False, ingress=True)
    assert facts["folder"] == str(snapshot_dir(tmp_path, MAIN))
    assert facts["served"] == "lingbot-world-tiny"
    assert not {"torch", "diffusers", "transformers"} & set(facts["loaded"])  # no model stack
    assert not fetched(hub) & WEIGHT_FILES
    assert "config files" in facts["log"]
    # a stage replica on the same node then fetches just the weights
    before = dict(hub.bodies)
    full = resolve(tmp_path, hub.endpoint)
    assert full["folder"] == facts["folder"]
    assert {k[2] for k in hub.bodies if k not in before} == WEIGHT_FILES
    assert set(hub.bodies.values()) == {1}


def test_a_configs_only_fetch_does_not_queue_behind_a_weights_download(hub, tmp_path):
    """An ingress starting while a stage replica on its node downloads the weights goes ahead."""
    lock_path = node_lock_path(tmp_path / "hub-cache", REPO, weights=True)
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another replica is downloading the weights"
        facts = resolve(tmp_path, hub.endpoint, weights=False)
    assert facts["served"] == "lingbot-world-tiny"
    assert "waiting" not in facts["log"]


def test_a_gated_repo_uses_hf_token_and_never_shows_it(hub, tmp_path):
    refused = resolve(tmp_path, hub.endpoint, "org/gated")
    assert refused["file_not_found"], refused
    assert "model.path='org/gated'" in refused["message"] and "gated repo" in refused["message"]
    assert "HF_TOKEN" in refused["message"]
    served = resolve(tmp_path, hub.endpoint, "org/gated", token=TOKEN)
    assert served["served"] == "lingbot-world-tiny"
    assert TOKEN not in served["log"] and TOKEN not in refused["log"] + refused["message"]


# -- one clear error


def test_a_bad_id_is_one_clear_error_naming_it(hub, tmp_path):
    missing = resolve(tmp_path, hub.endpoint, "org/nope")
    assert missing["error"] == "HubCheckpointError" and missing["file_not_found"]
    assert missing["message"].startswith("model.path='org/nope': ")
    assert f"{hub.endpoint} has no model repo 'org/nope'" in missing["message"]
    assert "\n" not in missing["message"]
    assert missing["cause"] == "huggingface_hub.errors.RepositoryNotFoundError"  # chained, not printed

    bad_rev = resolve(tmp_path, hub.endpoint, revision="nope")
    assert bad_rev["message"] == f"model.path='{REPO}' model.revision='nope': '{REPO}' on {hub.endpoint} has no branch, tag or commit 'nope'"

    not_a_pipeline = resolve(tmp_path, hub.endpoint, "org/just-a-readme")
    assert "has no model_index.json at its root" in not_a_pipeline["message"]


def test_an_unreachable_hub_without_cache_is_one_clear_error(tmp_path):
    down = resolve(tmp_path, None)  # the endpoint is a closed port
    assert down["file_not_found"]
    assert down["message"].startswith(f"model.path='{REPO}': cannot reach http://127.0.0.1:9")
    assert "holds no snapshot" in down["message"] and "\n" not in down["message"]


# -- offline


def test_offline_with_a_populated_cache(hub, tmp_path):
    # populate the cache the honest way: a real download from the endpoint
    online = resolve(tmp_path, hub.endpoint)
    facts_only = resolve(tmp_path, hub.endpoint, revision="v2", weights=False)
    before = hub.request_count()

    offline = resolve(tmp_path, hub.endpoint, offline=True)
    assert offline["folder"] == online["folder"]
    assert offline["served"] == "lingbot-world-tiny"
    assert "HF_HUB_OFFLINE is set" in offline["log"]
    assert hub.request_count() == before  # HF_HUB_OFFLINE: no request, though the hub is up

    hub.stop()
    for revision in (None, "main", MAIN):
        assert resolve(tmp_path, hub.endpoint, offline=True, revision=revision)["folder"] == online["folder"]
    # only the configs of v2 are cached: enough for the ingress, not for a stage replica
    assert resolve(tmp_path, hub.endpoint, offline=True, revision="v2", weights=False)["folder"] == facts_only["folder"]
    partial = resolve(tmp_path, hub.endpoint, offline=True, revision="v2")
    assert partial["message"].startswith(f"model.path='{REPO}' model.revision='v2': ")
    assert "holds only part of the snapshot" in partial["message"] and "HF_HUB_OFFLINE" in partial["message"]


def test_offline_without_cache_is_one_clear_error(tmp_path):
    result = resolve(tmp_path, None, offline=True, revision="v2")
    assert result["error"] == "HubCheckpointError" and result["file_not_found"]
    assert result["message"].startswith(f"model.path='{REPO}' model.revision='v2': HF_HUB_OFFLINE is set")
    assert str(tmp_path / "hub-cache") in result["message"]
    assert "\n" not in result["message"]
