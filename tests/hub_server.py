"""A loopback HTTP server answering the hub endpoints ``huggingface_hub`` calls.

Serves fixture repositories (``{"org/name": directory}``) so that tests run the real
client and its real cache against ``HF_ENDPOINT=http://127.0.0.1:PORT`` without internet:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info
  (``id``, ``sha``, ``siblings``);
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: file metadata headers
  (``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the bytes, honouring ``Range``.

A repository directory holding a file ``.gated`` answers 403 ``GatedRepo`` unless the
request carries ``Authorization: Bearer <the file's content>``. Unknown repositories get
404 ``RepoNotFound``, missing files 404 ``EntryNotFound``, unknown revisions 404
``RevisionNotFound``: the error codes the real hub sends in ``X-Error-Code``.
Every request is recorded (method, path, Range) so tests can check that weights were
never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def repo_commit(directory: Path) -> str:
    """A stable 40-hex commit id from the repository's file names and sizes."""
    h = hashlib.sha1()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(directory)}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.commits = {k: repo_commit(v) for k, v in self.repos.items()}
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._handle(self, body=True)

            def do_HEAD(self):
                server._handle(self, body=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- request handling ---------------------------------------------------

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, body: bool) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        payload = json.dumps({"error": code}).encode()
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _authorized(self, h: BaseHTTPRequestHandler, repo: str) -> bool:
        gate = self.repos[repo] / ".gated"
        if not gate.is_file():
            return True
        return h.headers.get("Authorization", "") == f"Bearer {gate.read_text().strip()}"

    def _revision_ok(self, repo: str, rev: str) -> bool:
        return rev in ("main", self.commits[repo])

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        m = re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2) or "main", body)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(h, m.group(1), m.group(2), m.group(3), body)
        self._error(h, 404, "EntryNotFound", body)

    def _model_info(self, h, repo: str, rev: str, body: bool) -> None:
        if repo not in self.repos:
            return self._error(h, 401, "RepoNotFound", body)  # the hub answers 401 for unknown and private repos
        if not self._authorized(h, repo):
            return self._error(h, 403, "GatedRepo", body)
        if not self._revision_ok(repo, rev):
            return self._error(h, 404, "RevisionNotFound", body)
        d = self.repos[repo]
        siblings = [{"rfilename": str(p.relative_to(d))} for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".gated"]
        payload = json.dumps({"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                              "gated": (d / ".gated").is_file() and "manual", "siblings": siblings}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if body:
            h.wfile.write(payload)

    def _resolve(self, h, repo: str, rev: str, filename: str, body: bool) -> None:
        if repo not in self.repos:
            return self._error(h, 401, "RepoNotFound", body)
        if not self._authorized(h, repo):
            return self._error(h, 403, "GatedRepo", body)
        if not self._revision_ok(repo, rev):
            return self._error(h, 404, "RevisionNotFound", body)
        f = self.repos[repo] / filename
        if not f.is_file() or f.name == ".gated":
            return self._error(h, 404, "EntryNotFound", body)
        size = f.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", self.commits[repo])
        h.send_header("ETag", f'"{hashlib.sha1(f"{filename}:{size}".encode()).hexdigest()}"')
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if body:
            with f.open("rb") as fh:
                fh.seek(start)
                h.wfile.write(fh.read(end - start + 1))
