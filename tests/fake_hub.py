"""A Hugging Face hub on the loopback address, answering as huggingface.co does for what
``snapshot_download`` / ``hf_hub_download`` / ``list_repo_files`` ask: model info, the file
tree, file metadata and content, and the errors with the status codes and ``X-Error-Code`` /
``X-Error-Message`` headers huggingface_hub parses (gated repositories without a token or
without access, a rejected token, a missing repository or revision). Point ``HF_ENDPOINT``
(or ``huggingface_hub.constants.ENDPOINT`` in-process) at :attr:`FakeHub.url`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Repo:
    """A model repository: its files (path → bytes) at one commit of ``main``."""

    files: dict[str, bytes]
    gated: bool = False
    #: Tokens of the accounts that accepted the licence of a gated repository.
    allowed: set[str] = field(default_factory=set)
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.commit = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> Repo:
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kwargs)


class FakeHub:
    """The server; ``with FakeHub(repos, tokens) as hub:`` serves until the block ends.
    ``tokens``: the valid tokens (any other ``Authorization: Bearer`` is rejected)."""

    def __init__(self, repos: dict[str, Repo], tokens: set[str]) -> None:
        self.repos = repos
        self.tokens = tokens
        #: Every request: (method, path, whether it carried a token).
        self.requests: list[tuple[str, str, bool]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


_INFO = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?/?$")
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$")
_FILE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._serve(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def _error(self, status: int, code: str | None, message: str) -> None:
            self.send_response(status)
            if code is not None:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            payload = json.dumps({"error": message}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _send(self, payload: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            hub.requests.append((self.command, path, token is not None))
            if token is not None and token not in hub.tokens:
                return self._error(401, None, "Invalid credentials in Authorization header")
            info, tree, file = _INFO.match(path), _TREE.match(path), _FILE.match(path)
            match = info or tree or file
            if match is None:
                return self._error(404, None, "Not Found")
            repo_id, revision = match.group(1), match.group(2) or "main"
            repo = hub.repos.get(repo_id)
            if repo is None:  # as the hub: 401 without a token, 404 with one
                return self._error(401 if token is None else 404, "RepoNotFound",
                                   "Repository not found")
            if repo.gated and token not in repo.allowed:
                if token is None:
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is "
                                       "restricted. You must have access to it and be "
                                       "authenticated to access it. Please log in.")
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted "
                                   "and you are not in the authorized list.")
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if info is not None:
                payload = json.dumps({
                    "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }).encode()
                return self._send(payload, {"Content-Type": "application/json"}, body)
            if tree is not None:
                entries = [{"type": "file", "path": name, "size": len(content),
                            "oid": hashlib.sha1(content).hexdigest()}
                           for name, content in sorted(repo.files.items())]
                return self._send(json.dumps(entries).encode(),
                                  {"Content-Type": "application/json"}, body)
            assert file is not None
            content = repo.files.get(file.group(3))
            if content is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            etag = f'"{hashlib.sha256(content).hexdigest()}"'
            return self._send(content, {"ETag": etag, "X-Repo-Commit": repo.commit,
                                        "Content-Type": "application/octet-stream"}, body)

    return Handler
