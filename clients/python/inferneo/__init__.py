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

import http.client
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional

__all__ = ["InferneoClient", "InferneoError", "LoadBalancedClient"]
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
            # A server that dies mid-stream closes it without [DONE]: an error, never a quiet end.
            raise InferneoError(0, {"error": {"message": "the stream ended before [DONE] (the server went away)", "type": "stream_cut"}})
        finally:
            resp.close()


def _retryable(e: BaseException) -> bool:
    """Worth another replica: never reached the server, it went away, or it is draining or busy."""
    if isinstance(e, InferneoError):
        return e.status in (0, 429) or e.status >= 500
    return isinstance(e, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError))


def _carries_token(chunk: Any) -> bool:
    for c in chunk.get("choices") or []:
        delta = c.get("delta") or {}
        if c.get("text") or delta.get("content") or c.get("finish_reason") is not None:
            return True
    return False


class _Replica:
    def __init__(self, url: str, client: InferneoClient):
        self.url = client.base_url
        self.client = client
        self.down_until = 0.0
        self.failures = 0


class _LBEndpoint:
    def __init__(self, lb: "LoadBalancedClient", kind: str):
        self._lb = lb
        self._kind = kind

    def create(self, **params: Any) -> Any:
        return self._lb._create(self._kind, params)


class _LBChat:
    def __init__(self, lb: "LoadBalancedClient"):
        self.completions = _LBEndpoint(lb, "chat")


class LoadBalancedClient:
    """The guide's round-robin client over several replicas, safe when one dies or drains.

    A replica that fails (refused, reset, 503) is skipped with a doubling backoff until its
    /health answers 200; a request that failed before any token reached the caller is retried
    on another replica, so the caller sees one answer; a stream cut after its first token raises.
    strategy="least-loaded" picks the replica with the fewest running + waiting requests.

        lb = LoadBalancedClient(["http://a:8000", "http://b:8000", "http://c:8000"])
        r = lb.completions.create(model=M, prompt="Hello", max_tokens=16)
    """

    def __init__(self, servers: list, api_key: Optional[str] = None, timeout: float = 600.0, strategy: str = "round-robin",
                 max_attempts: Optional[int] = None, backoff: float = 0.5, backoff_max: float = 30.0):
        if not servers:
            raise ValueError("LoadBalancedClient needs at least one server")
        self.replicas = [_Replica(u, InferneoClient(u, api_key=api_key, timeout=timeout, max_retries=0)) for u in servers]
        self.strategy = strategy
        self.max_attempts = max_attempts or 2 * len(servers)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self.completions = _LBEndpoint(self, "completions")
        self.chat = _LBChat(self)

    def _mark_down(self, r: _Replica) -> None:
        with self._lock:
            r.failures += 1
            r.down_until = time.time() + min(self.backoff_max, self.backoff * 2 ** (r.failures - 1))

    def _usable(self, r: _Replica) -> bool:
        if r.failures == 0:
            return True
        if r.down_until > time.time():
            return False
        try:
            with urllib.request.urlopen(r.url + "/health", timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            pass
        self._mark_down(r)
        return False

    def _load(self, r: _Replica) -> float:
        try:
            with urllib.request.urlopen(r.url + "/metrics", timeout=1.0) as resp:
                m = json.loads(resp.read())
            return float(m.get("active_requests", 0)) + float(m.get("queue_size", 0))
        except Exception:
            return float("inf")

    def _pick(self, tried: set) -> Optional[_Replica]:
        start = next(self._counter)
        n = len(self.replicas)
        candidates = [r for r in (self.replicas[(start + i) % n] for i in range(n)) if id(r) not in tried and self._usable(r)]
        if not candidates:
            return None
        if self.strategy == "least-loaded":
            return min(candidates, key=self._load)
        return candidates[0]

    def _failover(self, attempt):
        tried: set = set()
        last: BaseException = ConnectionError("no replica is available")
        wait = 0.25
        n = 0
        while n < self.max_attempts:
            r = self._pick(tried)
            if r is None:
                tried = set()
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
                continue
            tried.add(id(r))
            n += 1
            try:
                out = attempt(r)
                r.failures, r.down_until = 0, 0.0
                return out
            except Exception as e:  # noqa: BLE001 - classified below
                last = e
                if not _retryable(e):
                    raise
                if not (isinstance(e, InferneoError) and e.status == 429):
                    self._mark_down(r)
        raise last

    def _call(self, r: _Replica, kind: str, params: dict) -> Any:
        endpoint = r.client.chat.completions if kind == "chat" else r.client.completions
        return endpoint.create(**params)

    def _create(self, kind: str, params: dict) -> Any:
        if not params.get("stream"):
            return self._failover(lambda r: self._call(r, kind, params))

        def open_stream(r: _Replica):
            it = iter(self._call(r, kind, params))
            held = []
            for chunk in it:  # a failure before the first token is retried elsewhere
                held.append(chunk)
                if _carries_token(chunk):
                    return held, it
            return held, None

        held, rest = self._failover(open_stream)

        def chunks():
            yield from held
            if rest is not None:
                yield from rest

        return chunks()
