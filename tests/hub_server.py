"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It answers the calls listed in /work/shared/HUB_API.md well enough for huggingface_hub 2.4
(`create_repo`, `upload_folder`, `list_repo_files`, `list_repo_tree`, `hf_hub_download`,
`snapshot_download`, `model_info`, `list_repo_commits`, `create_branch`, `delete_branch`) with Xet
disabled on the client.

Storage is real, not mocked: every commit is a full snapshot of the repo's files plus its parent
(kept in memory), its oid is the sha1 of that snapshot; file contents live in a temporary folder,
regular files by git blob sha1 and LFS objects by sha256 (checked on upload). Revisions resolve
branches and full commit oids. A commit either lands whole or not at all, like the Hub's.

Bounded: it listens on 127.0.0.1 only (port chosen by the OS), runs in daemon threads, removes its
folder on `stop()`, and stops by itself after `max_lifetime_s` in case a test forgets to.

    with LocalHub() as hub:
        HfApi(endpoint=hub.url).create_repo("user/model")
        hub.fail_next("commit", status=500)   # the next commit POST answers 500
        hub.authorizations                    # Authorization headers seen (kept in memory only)
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

# The Hub's initial commit holds a .gitattributes with its default LFS patterns (abridged).
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in ["*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.msgpack", "*.npy", "*.npz",
              "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors",
              "*.tar", "*.tflite", "*.tgz", "*.xz", "*.zip", "*.zst", "*tfevents*"]
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files of 10 MB and more to LFS
PREFIX_TO_TYPE = {"datasets": "dataset", "spaces": "space"}
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The oid git (and the Hub's preupload answer) gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.refs: dict[str, str] = {}  # branch -> commit oid
        self.commits: dict[str, dict] = {}  # oid -> {"parent", "title", "message", "date", "files"}


class LocalHub:
    """Hub-compatible server on 127.0.0.1:<random port>; use as a context manager or call stop()."""

    def __init__(self, max_lifetime_s: float = 600.0, tree_page_size: int = 1000):
        self.root = tempfile.mkdtemp(prefix="localhub-")
        os.makedirs(os.path.join(self.root, "lfs"))
        os.makedirs(os.path.join(self.root, "blobs"))
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for assertions
        self.authorizations: list[str] = []  # Authorization header values, in memory only
        self.tree_page_size = tree_page_size
        self._failures: dict[str, list] = {}  # stage -> [status, remaining]
        self._connections: set = set()  # open client sockets, closed on stop()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False
        self._timer = threading.Timer(max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    # ---- lifecycle and test hooks ------------------------------------------------------------
    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        with self.lock:  # idle keep-alive connections would otherwise keep their threads alive
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, stage: str, status: int = 500, times: int = 1) -> None:
        """Make the next `times` requests of a stage answer `status`, changing nothing.

        Stages: "create", "preupload", "lfs_batch", "lfs_upload" (the PUT), "lfs_verify", "commit",
        "branch" (create a branch), "delete_branch".
        Note the client retries 429/500/502/503/504 on preupload, LFS batch and LFS PUT (with
        back-off, about 23 s for 5 retries): use another status (e.g. 507) there to fail fast.
        """
        with self.lock:
            self._failures[stage] = [status, times]

    def _maybe_fail(self, stage: str) -> None:
        with self.lock:
            failure = self._failures.get(stage)
            if not failure or failure[1] <= 0:
                return
            failure[1] -= 1
        raise HubError(failure[0], f"injected failure at {stage}")

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """The commit oid a branch points to (None if no such repo or branch)."""
        repo = self.repos.get((repo_type, repo_id))
        return repo.refs.get(revision) if repo else None

    # ---- storage -------------------------------------------------------------------------------
    def _blob_path(self, entry: dict) -> str:
        if entry["lfs"]:
            return os.path.join(self.root, "lfs", entry["sha256"])
        return os.path.join(self.root, "blobs", entry["oid"])

    def _store_regular(self, data: bytes) -> dict:
        oid = git_blob_sha1(data)
        path = os.path.join(self.root, "blobs", oid)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        return {"lfs": False, "oid": oid, "size": len(data)}

    def _read(self, entry: dict) -> bytes:
        with open(self._blob_path(entry), "rb") as f:
            return f.read()

    def _commit(self, repo: _Repo, branch: str, files: dict, title: str, message: str = "",
                parent: str | None = None) -> str:
        body = json.dumps({"parent": parent, "title": title, "message": message, "files": files,
                           "date": time.time()}, sort_keys=True)
        oid = hashlib.sha1(body.encode()).hexdigest()
        repo.commits[oid] = {"parent": parent, "title": title, "message": message, "files": files,
                             "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        repo.refs[branch] = oid
        return oid

    def _resolve(self, repo: _Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if SHA1_RE.match(revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _is_lfs(self, files: dict, path: str, size: int, sample: bytes) -> bool:
        """LFS if .gitattributes says so, if large, or if binary (the Hub refuses binaries in git)."""
        attrs = self._read(files[".gitattributes"]).decode() if ".gitattributes" in files else ""
        patterns = [line.split()[0] for line in attrs.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return (size >= LFS_SIZE_THRESHOLD or b"\0" in sample
                or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns))

    # ---- API ------------------------------------------------------------------------------------
    def create_repo(self, body: dict) -> tuple[int, dict]:
        self._maybe_fail("create")
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = {"url": f"{self.url}/{prefix}{repo_id}"}
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return 409, {"error": "You already created this model repo", **url}
            repo = _Repo(repo_type, repo_id, body.get("private") or body.get("visibility") == "private")
            entry = self._store_regular(DEFAULT_GITATTRIBUTES.encode())
            self._commit(repo, "main", {".gitattributes": entry}, "initial commit")
            self.repos[(repo_type, repo_id)] = repo
        return 200, url

    def preupload(self, repo: _Repo, revision: str, body: dict) -> dict:
        self._maybe_fail("preupload")
        files = repo.commits[self._resolve(repo, revision)]["files"]
        answer = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            remote = files.get(f["path"])
            answer.append({
                "path": f["path"],
                "uploadMode": "lfs" if self._is_lfs(files, f["path"], f["size"], sample) else "regular",
                "shouldIgnore": False,
                # The client compares this to its own oid to drop unchanged files (no empty commits).
                "oid": None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"]),
            })
        return {"files": answer, "commitOid": repo.refs.get(revision)}

    def lfs_batch(self, body: dict) -> dict:
        self._maybe_fail("lfs_batch")
        objects = []
        for obj in body.get("objects", []):
            path = os.path.join(self.root, "lfs", obj["oid"])
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not (os.path.exists(path) and os.path.getsize(path) == obj["size"]):
                href = f"{self.url}/__lfs/{obj['oid']}"
                item["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(item)
        return {"transfer": "basic", "objects": objects}

    def commit(self, repo: _Repo, revision: str, lines: list[dict]) -> dict:
        self._maybe_fail("commit")
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), {})
        with self.lock:
            if revision not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.refs[revision]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head]["files"])
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    files[value["path"]] = self._store_regular(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    path = os.path.join(self.root, "lfs", value["oid"])
                    if not os.path.exists(path) or os.path.getsize(path) != value["size"]:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                    files[value["path"]] = {"lfs": True, "sha256": value["oid"], "size": value["size"],
                                            "oid": git_blob_sha1(_lfs_pointer(value["oid"], value["size"]))}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(folder)}
                elif key != "header":
                    raise HubError(400, f"unsupported commit operation {key!r}")
            oid = self._commit(repo, revision, files, header.get("summary", ""), header.get("description", ""), head)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{oid}", "commitOid": oid,
                "pullRequestUrl": None}

    def info(self, repo: _Repo, revision: str) -> dict:
        sha = self._resolve(repo, revision)
        commit = repo.commits[sha]
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                "lastModified": commit["date"], "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p} for p in sorted(commit["files"])]}

    def tree(self, repo: _Repo, revision: str, path: str, recursive: bool) -> list[dict]:
        files = repo.commits[self._resolve(repo, revision)]["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries: dict[str, dict] = {}
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                item = {"type": "file", "path": p, "size": e["size"], "oid": e["oid"]}
                if e["lfs"]:
                    item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": 134}
                entries[p] = item
        return [entries[k] for k in sorted(entries)]

    def commits_of(self, repo: _Repo, revision: str) -> list[dict]:
        out, oid = [], self._resolve(repo, revision)
        while oid:
            c = repo.commits[oid]
            out.append({"id": oid, "title": c["title"], "message": c["message"], "date": c["date"],
                        "authors": [{"user": "user"}]})
            oid = c["parent"]
        return out


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
    server_version = "LocalHub/1.0"
    timeout = 60  # an idle or stalled connection gives its thread back

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
        pass

    # ---- plumbing -----------------------------------------------------------------------------
    def _body_chunks(self):
        """Yield the request body, Content-Length or chunked (httpx streams file uploads)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        if not hasattr(self, "_cached_body"):
            self._cached_body = b"".join(self._body_chunks())
        return self._cached_body

    def _json_body(self):
        return json.loads(self._body() or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        with self.hub.lock:  # recorded before the client can see the reply, so a test reading it never races
            self.hub.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD reply never has a body, errors included
            self.wfile.write(body)

    def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        # One handler serves every request of a keep-alive connection: reset per-request state.
        self.__dict__.pop("_cached_body", None)
        auth = self.headers.get("Authorization")
        if auth:
            with self.hub.lock:
                self.hub.authorizations.append(auth)
        self._authorized = bool(auth)
        try:
            self._route()
        except HubError as e:
            if self.command in ("POST", "PUT"):
                self._body()  # drain, so the keep-alive connection stays usable
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send_json(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug here must show as a 500, not a hung client
            self._send_json(500, {"error": f"{type(e).__name__}: {e}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ---- routes --------------------------------------------------------------------------------
    def _route(self) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        parts = [unquote(p) for p in split.path.strip("/").split("/")] if split.path.strip("/") else []
        hub, method = self.hub, self.command

        if parts == ["api", "agent-harnesses"]:
            raise HubError(404, "Not found")
        if method == "POST" and parts == ["api", "repos", "create"]:
            status, obj = hub.create_repo(self._json_body())
            return self._send_json(status, obj)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            self._body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if parts[:1] == ["__lfs"] and len(parts) >= 2:
            return self._lfs_object(parts[1], verify=parts[2:] == ["verify"])
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
            return self._api_repo(parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:], query)
        # /{prefix}{ns}/{name}.git/info/lfs/objects/batch and /{prefix}{ns}/{name}/resolve/{rev}/{path}
        repo_type = PREFIX_TO_TYPE.get(parts[0], "model") if parts else "model"
        rest = parts[1:] if parts and parts[0] in PREFIX_TO_TYPE else parts
        if len(rest) >= 3 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            hub._get_repo(repo_type, f"{rest[0]}/{rest[1][:-4]}", self._authorized)
            return self._send(200, json.dumps(hub.lfs_batch(self._json_body())).encode(),
                              content_type="application/vnd.git-lfs+json")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub._get_repo(repo_type, f"{rest[0]}/{rest[1]}", self._authorized)
            return self._resolve_file(repo, rest[3], "/".join(rest[4:]))
        raise HubError(404, f"no route for {method} {split.path}")

    def _api_repo(self, repo_type: str, repo_id: str, rest: list[str], query: dict) -> None:
        hub, method = self.hub, self.command
        repo = hub._get_repo(repo_type, repo_id, self._authorized)
        if method == "GET" and not rest:
            return self._send_json(200, hub.info(repo, "main"))
        action, args = rest[0], rest[1:]
        if method == "GET" and action == "revision" and args:
            return self._send_json(200, hub.info(repo, "/".join(args)))
        if method == "GET" and action == "tree" and args:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries = hub.tree(repo, args[0], "/".join(args[1:]), recursive)
            start = int(query.get("cursor", ["0"])[0])
            page = entries[start:start + hub.tree_page_size]
            headers = {}
            if start + hub.tree_page_size < len(entries):
                split = urlsplit(self.path)
                q = {k: v for k, v in parse_qs(split.query).items() if k != "cursor"}
                qs = "&".join(f"{k}={quote(x)}" for k, vs in q.items() for x in vs)
                nxt = f"{hub.url}{split.path}?{qs}{'&' if qs else ''}cursor={start + hub.tree_page_size}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            return self._send_json(200, page, headers)
        if method == "GET" and action == "commits" and args:
            return self._send_json(200, hub.commits_of(repo, "/".join(args)))
        if method == "GET" and action == "refs":
            return self._send_json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                                                      for b, o in sorted(repo.refs.items())],
                                         "converts": [], "tags": [], "pullRequests": []})
        if method == "POST" and action == "preupload" and args:
            return self._send_json(200, hub.preupload(repo, "/".join(args), self._json_body()))
        if method == "POST" and action == "commit" and args:
            if query.get("create_pr"):
                raise HubError(400, "pull requests are not supported by LocalHub")
            lines = [json.loads(ln) for ln in self._body().splitlines() if ln.strip()]
            return self._send_json(200, hub.commit(repo, "/".join(args), lines))
        if method == "POST" and action == "branch" and args:
            body, branch = self._json_body(), "/".join(args)
            hub._maybe_fail("branch")
            with hub.lock:
                if branch in repo.refs:
                    raise HubError(409, f"Branch {branch} already exists")
                repo.refs[branch] = hub._resolve(repo, body.get("startingPoint") or "main")
            return self._send_json(200, {})
        if method == "DELETE" and action == "branch" and args:
            branch = "/".join(args)
            hub._maybe_fail("delete_branch")
            with hub.lock:
                if branch == "main":
                    raise HubError(403, "The main branch cannot be deleted")
                if repo.refs.pop(branch, None) is None:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return self._send_json(200, {})
        raise HubError(404, f"no route for {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _lfs_object(self, oid: str, verify: bool) -> None:
        hub = self.hub
        path = os.path.join(hub.root, "lfs", oid)
        if verify and self.command == "POST":
            hub._maybe_fail("lfs_verify")
            body = self._json_body()
            if not os.path.exists(path) or os.path.getsize(path) != body.get("size"):
                raise HubError(404, f"LFS object {oid} not found")
            return self._send_json(200, {})
        if self.command != "PUT":
            raise HubError(405, "only PUT")
        hub._maybe_fail("lfs_upload")
        # Stream to a temp file and check the hash before the object becomes visible.
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=hub.root)
        with os.fdopen(fd, "wb") as f:
            for chunk in self._body_chunks():
                digest.update(chunk)
                f.write(chunk)
        self._cached_body = b""
        if digest.hexdigest() != oid:
            os.unlink(tmp)
            raise HubError(400, f"sha256 mismatch for LFS object {oid}")
        os.replace(tmp, path)
        self._send(200, b"", content_type="text/plain")

    def _resolve_file(self, repo: _Repo, revision: str, path: str) -> None:
        hub = self.hub
        sha = hub._resolve(repo, revision)
        entry = repo.commits[sha]["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"]),
                            "ETag": f'"{entry["sha256"]}"'})
        rng = self.headers.get("Range")
        if self.command == "HEAD" and not rng:  # headers only: no need to read the file
            return self._send(200, b"", headers, "application/octet-stream", length=entry["size"])
        data = hub._read(entry)
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            size = len(data)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
                else:
                    start, end = max(size - int(m.group(2)), 0), size - 1
                end = min(end, size - 1)
                if start <= end:
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                    return self._send(206, data[start:end + 1], headers, "application/octet-stream")
            headers["Content-Range"] = f"bytes */{size}"
            return self._send(416, b"", headers, "text/plain")
        self._send(200, data, headers, "application/octet-stream")
