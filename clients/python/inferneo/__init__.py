"""InferneoClient: a standard-library-only Python client for Inferneo's OpenAI-compatible API.

    from inferneo import InferneoClient
    client = InferneoClient("http://localhost:8000")
    r = client.completions.create(model=M, prompt="Explain quantum computing", max_tokens=100)
    print(r.choices[0].text)
    for chunk in client.chat.completions.create(model=M, messages=[...], stream=True):
        if chunk.choices[0].delta.content is not None:
            print(chunk.choices[0].delta.content, end="")
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional

__all__ = ["InferneoClient", "InferneoError"]
__version__ = "0.1.0"


class InferneoError(Exception):
    """An error answer from the server, with its HTTP status and OpenAI-shaped body."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.type = err.get("type")
        self.code = err.get("code")
        self.param = err.get("param")
        super().__init__(err.get("message") or "HTTP %d" % status)


class Obj(dict):
    """A JSON object whose keys read as attributes; a missing key reads as None, as in the openai SDK."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    @staticmethod
    def wrap(value: Any) -> Any:
        if isinstance(value, dict):
            return Obj({k: Obj.wrap(v) for k, v in value.items()})
        if isinstance(value, list):
            return [Obj.wrap(v) for v in value]
        return value


class _Endpoint:
    def __init__(self, client: "InferneoClient", path: str):
        self._client = client
        self._path = path

    def create(self, **params: Any) -> Any:
        if params.get("stream"):
            return self._client._stream(self._path, params)
        return Obj.wrap(self._client._request("POST", self._path, params))


class _Chat:
    def __init__(self, client: "InferneoClient"):
        self.completions = _Endpoint(client, "/v1/chat/completions")


class _Models:
    def __init__(self, client: "InferneoClient"):
        self._client = client

    def list(self) -> Any:
        return Obj.wrap(self._client._request("GET", "/v1/models", None))


class InferneoClient:
    def __init__(self, base_url: str = "http://localhost:8000", api_key: Optional[str] = None, timeout: float = 600.0, max_retries: int = 3):
        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.completions = _Endpoint(self, "/v1/completions")
        self.chat = _Chat(self)
        self.models = _Models(self)

    def _open(self, method: str, path: str, body: Any):
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        attempt = 0
        while True:
            req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
            try:
                return urllib.request.urlopen(req, timeout=self.timeout)
            except urllib.error.HTTPError as e:
                retryable = e.code == 429 or e.code >= 500
                payload = e.read()
                if not retryable or attempt >= self.max_retries:
                    try:
                        body_json = json.loads(payload)
                    except ValueError:
                        body_json = None
                    raise InferneoError(e.code, body_json) from None
                retry_after = e.headers.get("Retry-After")
                delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else 0.5 * (2**attempt)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt >= self.max_retries:
                    raise
                delay = 0.5 * (2**attempt)
            time.sleep(delay)
            attempt += 1

    def _request(self, method: str, path: str, body: Any) -> Any:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())

    def _stream(self, path: str, body: Any) -> Iterator[Any]:
        resp = self._open("POST", path, body)
        try:
            data_lines = []
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].lstrip())
                    continue
                if line != "" or not data_lines:
                    continue  # comments (heartbeats) and blank lines between them
                data = "\n".join(data_lines)
                data_lines = []
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise InferneoError(200, chunk)
                yield Obj.wrap(chunk)
        finally:
            resp.close()
