"""A small HuggingFace-Hub-compatible server on 127.0.0.1 for tests: model repos in memory.

It answers what `huggingface_hub` calls to create a repo, upload a folder as one commit (preupload, then an
NDJSON commit with base64 files), read repo info and its file tree, and download files
(HEAD/GET .../resolve/<rev>/<path>).
Point a process at it with HF_ENDPOINT=<server.url> and HF_HUB_DISABLE_XET=1, set before huggingface_hub is
imported (it reads both at import), so clients run in subprocesses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def reply(self, status: int, body: bytes | dict | None = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
                data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
                self.send_response(status)
                if isinstance(body, dict):
                    self.send_header("Content-Type", "application/json")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self) -> None:
                server.requests.append(f"POST {self.path}")
                data = self.body()
                if self.path == "/api/repos/create":
                    request = json.loads(data)
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    server.repos.setdefault(repo, {})
                    server.private[repo] = bool(request.get("private"))
                    return self.reply(200, {"url": f"{server.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if match is None or match.group(1) not in server.repos:
                    return self.reply(404, {"error": f"unknown route or repo: {self.path}"})
                repo, action = match.group(1), match.group(2)
                if action == "preupload":
                    files = json.loads(data)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                for line in data.decode().splitlines():
                    op = json.loads(line)
                    if op["key"] == "file":
                        server.repos[repo][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                sha = hashlib.sha1(repr(sorted(server.repos[repo].items())).encode()).hexdigest()
                server.commits[repo] = sha
                return self.reply(200, {"commitUrl": f"{server.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

            def get_or_head(self, head: bool) -> None:
                server.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
                path = self.path.split("?")[0]
                info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/[^/]+)?", path)
                if info and info.group(1) in server.repos:
                    repo = info.group(1)
                    siblings = [{"rfilename": name} for name in sorted(server.repos[repo])]
                    return self.reply(
                        200, {"id": repo, "modelId": repo, "sha": server.commits.get(repo), "siblings": siblings, "private": server.private[repo]}, head=head
                    )
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if tree and tree.group(1) in server.repos:
                    entries = [
                        {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                        for name, content in sorted(server.repos[tree.group(1)].items())
                    ]
                    return self.reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head=head)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve and resolve.group(1) in server.repos and resolve.group(3) in server.repos[resolve.group(1)]:
                    repo, content = resolve.group(1), server.repos[resolve.group(1)][resolve.group(3)]
                    headers = {"ETag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Repo-Commit": server.commits[repo]}
                    return self.reply(200, content, headers, head=head)
                return self.reply(404, {"error": f"not found: {self.path}"}, {"X-Error-Code": "EntryNotFound"}, head=head)

            def do_GET(self) -> None:
                self.get_or_head(head=False)

            def do_HEAD(self) -> None:
                self.get_or_head(head=True)

        return Handler
