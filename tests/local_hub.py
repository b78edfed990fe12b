"""A stand-in for the Hugging Face Hub, for tests: stdlib `http.server` on 127.0.0.1, in a thread, in memory.

It speaks just enough of the Hub's HTTP API for `HfApi.create_repo / create_branch / create_commit / repo_info` and for
`from_pretrained` downloads (`HEAD`/`GET .../resolve/...`). Every file is answered as a "regular" (non-LFS) upload, so
neither Xet nor LFS is involved. Like the Hub, `preupload` returns each file's current git blob id, which is what lets
`create_commit` skip unchanged files. Faults (401, 403, 5xx) are injected with `fail()`; requests are recorded.
This is a test fixture, not a product feature: no persistence, no security, no LFS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TOKEN = "hf_dummy"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub's ETag for a non-LFS file) gives to a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def free_port() -> int:
    """A port nothing listens on (bound, then released): a stand-in for a Hub that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit id
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> {path: content}


class LocalHub:
    """`with LocalHub() as hub:` serves at `hub.url`; `hub.commits` lists (repo, ref, summary, paths) per commit."""

    def __init__(self, token: str = TOKEN):
        self.token, self.repos, self.commits, self.requests = token, {}, [], []
        self._faults: list[list] = []  # [method, path regex, status, times left or None]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path_regex: str, status: int, times: int | None = None) -> None:
        """Answer matching requests with `status` (`times` times, or always)."""
        self._faults.append([method, re.compile(path_regex), status, times])

    def _fault(self, method: str, path: str) -> int | None:
        for fault in self._faults:
            if fault[0] == method and fault[1].search(path) and fault[3] != 0:
                fault[3] = None if fault[3] is None else fault[3] - 1
                return fault[2]
        return None

    def _commit(self, repo: Repo, ref: str, files: dict[str, bytes], summary: str, repo_id: str) -> str:
        sha = hashlib.sha1(f"{repo_id}:{len(self.commits)}:{summary}".encode()).hexdigest()
        repo.trees[sha], repo.refs[ref] = files, sha
        self.commits.append((repo_id, ref, summary, sorted(files)))
        return sha

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.trees[repo.refs[ref]]

    # Route handlers: (status, body as dict/list/bytes, extra headers)

    def create_repo(self, body: dict, _):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        self.repos[repo_id] = repo = Repo(private=private)
        self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit", repo_id)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def create_branch(self, body: dict, m):
        repo, branch = self.repos[m["repo"]], unquote(m["rev"])
        if branch in repo.refs:
            return 409, {"error": f"Reference {branch} already exists"}, {}
        repo.refs[branch] = repo.refs[body.get("startingPoint") or "main"]
        return 200, {}, {}

    def preupload(self, body: dict, m):
        tree = self.files(m["repo"], unquote(m["rev"]))
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_id(tree[f["path"]]) if f["path"] in tree else None,
            }
            for f in body["files"]
        ]
        return 200, {"files": files}, {}

    def commit(self, lines: list[dict], m, create_pr: bool):
        repo, ref = self.repos[m["repo"]], unquote(m["rev"])
        files = dict(self.files(m["repo"], ref))
        header = next(line["value"] for line in lines if line["key"] == "header")
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
        pr_url = None
        if create_pr:
            number = 1 + sum(r.startswith("refs/pr/") for r in repo.refs)
            ref, pr_url = f"refs/pr/{number}", f"{self.url}/{m['repo']}/discussions/{number}"
        sha = self._commit(repo, ref, files, header["summary"], m["repo"])
        url = f"{self.url}/{m['repo']}/commit/{sha}"
        return 200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": pr_url}, {}

    def repo_info(self, m):
        repo_id, ref = m["repo"], unquote(m["rev"] or "main")
        sha = self.repos[repo_id].refs[ref]
        siblings = [{"rfilename": p} for p in sorted(self.repos[repo_id].trees[sha])]
        private = self.repos[repo_id].private
        info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": private, "siblings": siblings, "tags": []}
        return 200, info, {}

    def resolve(self, m, head: bool):
        repo_id, ref, path = m["repo"], unquote(m["rev"]), unquote(m["path"])
        repo = self.repos[repo_id]
        sha = repo.refs.get(ref, ref if ref in repo.trees else None)
        if sha is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        if path not in repo.trees[sha]:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        data = repo.trees[sha][path]
        headers = {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        return 200, (b"" if head else data), {**headers, "Content-Length": str(len(data))}

    def tree(self, m):
        repo_id, ref, folder = m["repo"], unquote(m["rev"]), unquote(m["path"] or "").strip("/")
        paths = [p for p in self.files(repo_id, ref) if not folder or p.startswith(folder + "/")]
        if folder and not paths:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        return 200, [{"type": "file", "path": p, "oid": git_blob_id(self.files(repo_id, ref)[p])} for p in paths], {}


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    post_routes = [
        (rf"^/api/models/{REPO}/preupload/{REV}$", hub.preupload),
        (rf"^/api/models/{REPO}/branch/{REV}$", hub.create_branch),
        (r"^/api/repos/create$", hub.create_repo),
        (r"^/api/validate-yaml$", lambda body, m: (200, {}, {})),
    ]
    get_routes = [
        (rf"^/api/models/{REPO}(?:/revision/{REV})?$", hub.repo_info),
        (rf"^/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?$", hub.tree),
        (r"^/api/whoami-v2$", lambda m: (200, {"name": "local", "type": "user", "orgs": []}, {})),
    ]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _send(self, status: int, body, headers: dict) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _handle(self) -> None:
            url = urlsplit(self.path)
            hub.requests.append((self.command, url.path))
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hub._lock:
                try:
                    answer = self._answer(url, raw)
                except KeyError as err:  # a branch or commit this repo does not have
                    answer = 404, {"error": f"Invalid rev id: {err}"}, {"X-Error-Code": "RevisionNotFound"}
                self._send(*answer)

        def _answer(self, url, raw: bytes):
            status = hub._fault(self.command, url.path)
            if status is not None:
                return status, {"error": f"injected HTTP {status}"}, {}
            auth = self.headers.get("Authorization")
            if auth is not None and auth != f"Bearer {hub.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}, {}
            match = re.match(rf"^/api/models/{REPO}/commit/{REV}$", url.path)
            if self.command == "POST" and match:
                lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
                return hub.commit(lines, match, create_pr="create_pr=1" in url.query)
            if self.command == "POST":
                return _route(post_routes, url.path, json.loads(raw or b"{}"))
            match = re.match(rf"^/{REPO}/resolve/{REV}/(?P<path>.+)$", url.path)
            if match:
                if match["repo"] not in hub.repos:
                    return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                return hub.resolve(match, head=self.command == "HEAD")
            return _route(get_routes, url.path)

        do_GET = do_POST = do_HEAD = _handle

    def _route(routes, path: str, *body):
        for pattern, handler in routes:
            match = re.match(pattern, path)
            if match:
                if "repo" in match.groupdict() and match["repo"] not in hub.repos:
                    return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                return handler(*body, match)
        return 404, {"error": f"no route for {path}"}, {}

    return Handler
