"""A small HuggingFace-Hub-compatible server on 127.0.0.1 for tests: model repos in memory.

It answers what `huggingface_hub` and `datasets` call to create a model or dataset repo, upload files as one commit
(preupload; parquet and safetensors through the git-LFS batch API and a PUT, the rest base64 in the NDJSON commit),
read repo info and its file tree, answer whoami for its one token (TOKEN), and download files (HEAD/GET .../resolve/<rev>/<path>).
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

TOKEN = "hf_test_token"


def key(kind: str, repo: str) -> str:
    """Model repos are stored under their id, others as "<kind>:<id>" (e.g. "datasets:user/name")."""
    return repo if kind == "models" else f"{kind}:{repo}"


class HubServer:
    def __init__(self, port: int = 0) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}  # key(kind, repo id) -> path -> content
        self.commits: dict[str, str] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content of git-LFS uploads (parquet shards, safetensors)
        self.private: dict[str, bool] = {}
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}

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
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    kind = request.get("type") or "model"
                    repo = key(f"{kind}s", repo_id)
                    if repo not in server.repos:  # a new repo starts with one empty commit
                        server.repos[repo], server.commits[repo] = {}, hashlib.sha1(repo.encode()).hexdigest()
                    server.private[repo] = bool(request.get("private"))
                    url = f"{server.url}/{repo_id}" if kind == "model" else f"{server.url}/{kind}s/{repo_id}"
                    return self.reply(200, {"url": url, "name": repo_id})
                lfs = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.path)
                if lfs:  # git-LFS batch API: every object is uploaded with one PUT to this server
                    objects = json.loads(data)["objects"]
                    actions = [{**o, "actions": {"upload": {"href": f"{server.url}/lfs-upload/{o['oid']}"}}} for o in objects if o["oid"] not in server.lfs]
                    return self.reply(
                        200,
                        {"transfer": "basic", "objects": actions + [o for o in objects if o["oid"] in server.lfs]},
                        {"Content-Type": "application/vnd.git-lfs+json"},
                    )
                if self.path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                repo = None if match is None else key(match.group(1), match.group(2))
                if repo not in server.repos:
                    server.requests.append(f"unanswered POST {self.path}")
                    return self.reply(404, {"error": f"unknown route or repo: {self.path}"})
                action = match.group(3)
                if action == "preupload":
                    files = json.loads(data)["files"]
                    mode = {f["path"]: "lfs" if f["path"].endswith((".parquet", ".safetensors")) else "regular" for f in files}
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": mode[f["path"]], "shouldIgnore": False} for f in files]})
                for line in data.decode().splitlines():
                    op = json.loads(line)
                    if op["key"] == "file":
                        server.repos[repo][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    elif op["key"] == "lfsFile":
                        server.repos[repo][op["value"]["path"]] = server.lfs[op["value"]["oid"]]
                sha = hashlib.sha1(repr(sorted(server.repos[repo].items())).encode()).hexdigest()
                server.commits[repo] = sha
                prefix = "" if match.group(1) == "models" else f"{match.group(1)}/"
                return self.reply(200, {"commitUrl": f"{server.url}/{prefix}{match.group(2)}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

            def get_or_head(self, head: bool) -> None:
                server.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
                path = self.path.split("?")[0]
                if path == "/api/whoami-v2":  # the one token this server knows, with write access
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        return self.reply(401, {"error": "Invalid credentials in Authorization header"}, head=head)
                    return self.reply(200, {"type": "user", "name": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}}, head=head)
                info = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(/revision/[^/]+)?", path)
                if info and key(info.group(1), info.group(2)) in server.repos:
                    repo = key(info.group(1), info.group(2))
                    siblings = [{"rfilename": name} for name in sorted(server.repos[repo])]
                    return self.reply(
                        200, {"id": repo, "modelId": repo, "sha": server.commits.get(repo), "siblings": siblings, "private": server.private[repo]}, head=head
                    )
                tree = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if tree and key(tree.group(1), tree.group(2)) in server.repos:
                    files = server.repos[key(tree.group(1), tree.group(2))]
                    prefix = (tree.group(4) or "").strip("/")
                    recursive = "recursive=true" in self.path.lower()
                    under = {n: c for n, c in files.items() if not prefix or n.startswith(prefix + "/")}
                    if prefix and not under:
                        return self.reply(404, {"error": f"no {prefix}"}, {"X-Error-Code": "EntryNotFound"}, head=head)
                    entries, folders = [], set()
                    for name, content in sorted(under.items()):
                        rest = name[len(prefix) + 1 :] if prefix else name
                        if "/" in rest and not recursive:
                            folders.add((f"{prefix}/" if prefix else "") + rest.split("/")[0])
                            continue
                        entries.append({"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()})
                    entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
                    return self.reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head=head)
                resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = None if resolve is None else key("datasets" if resolve.group(1) else "models", resolve.group(2))
                if repo in server.repos and resolve.group(4) in server.repos[repo]:
                    content = server.repos[repo][resolve.group(4)]
                    headers = {"ETag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Repo-Commit": server.commits[repo]}
                    return self.reply(200, content, headers, head=head)
                server.requests.append(f"unanswered {'HEAD' if head else 'GET'} {self.path}")
                code = "RepoNotFound" if path.startswith("/api/") else "EntryNotFound"  # clients create a repo after RepoNotFound
                return self.reply(404, {"error": f"not found: {self.path}"}, {"X-Error-Code": code}, head=head)

            def do_PUT(self) -> None:
                server.requests.append(f"PUT {self.path}")
                upload = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                data = self.body()
                if upload is None or hashlib.sha256(data).hexdigest() != upload.group(1):
                    return self.reply(400, {"error": "bad LFS upload"})
                server.lfs[upload.group(1)] = data
                return self.reply(200, {})

            def do_GET(self) -> None:
                self.get_or_head(head=False)

            def do_HEAD(self) -> None:
                self.get_or_head(head=True)

        return Handler


if __name__ == "__main__":  # python tests/hub_server.py [PORT]: a Hub for trying push and pull by hand (README, "On the Hub")
    import sys

    with HubServer(int(sys.argv[1]) if len(sys.argv) > 1 else 8808) as hub:
        print(f"A Hub-compatible server at {hub.url}, repos in memory until Ctrl-C. In another shell:", flush=True)
        print("export " + " ".join(f"{k}={v}" for k, v in hub.env().items()), flush=True)
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass
