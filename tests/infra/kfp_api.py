"""A small stand-in for the Kubeflow Pipelines API server on loopback, multi-user mode:
every request must carry ``Authorization: Bearer <token>`` with a token it accepts (the
real server reviews it with the Kubernetes TokenReview API, audience
pipelines.kubeflow.org), else 401 with the real server's message. It answers the v2beta1
paths the kfp SDK uses to submit a run and wait for it (healthz, experiments, runs) in
the JSON the SDK's generated models read, and keeps every request for the test to check.

No KFP backend can run on this machine (it needs a Kubernetes cluster and Argo), so this
one plays the part that decides whether a pod's submission is accepted: authentication.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from json_api import serve_json

NO_IDENTITY = (
    "Failed to check authorization. User identity is empty in the request header: "
    "Request header error: there is no user identity header."
)


@dataclass
class Request:
    method: str
    path: str
    query: dict
    token: str | None
    cookie: str | None
    body: dict
    code: int = 0  # the answer's status


@dataclass
class FakeKfpApi:
    tokens: set[str] = field(default_factory=set)  # the bearer tokens the server accepts
    final_state: str = "FAILED"  # what a run ends in (at its first GET)
    on_run_created: Callable[[FakeKfpApi], None] | None = None  # e.g. rotate the token
    requests: list[Request] = field(default_factory=list)
    experiments: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, method: str, url: str, headers, body: bytes) -> tuple[int, dict]:
        parts = urlsplit(url)
        authorization = headers.get("Authorization") or ""
        token = (
            authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        )
        payload = json.loads(body) if body else {}
        with self._lock:
            request = Request(method, parts.path, parse_qs(parts.query), token,
                              headers.get("Cookie"), payload)  # fmt: skip
            self.requests.append(request)
            if token is None or token not in self.tokens:
                request.code = 401
                return 401, {"error": NO_IDENTITY, "code": 16, "message": NO_IDENTITY}
            request.code, answer = self._route(method, parts.path, request.query, payload)
            return request.code, answer

    def _route(self, method: str, path: str, query: dict, payload: dict) -> tuple[int, dict]:
        if path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": True}
        if path == "/apis/v2beta1/experiments" and method == "GET":
            wanted = json.loads(query.get("filter", ["{}"])[0]).get("predicates", [{}])[0]
            namespace = query.get("namespace", [None])[0]
            found = [e for e in self.experiments.values()
                     if e["display_name"] == wanted.get("stringValue")
                     and e.get("namespace") == namespace]  # fmt: skip
            return 200, {"experiments": found, "total_size": len(found)}
        if path == "/apis/v2beta1/experiments" and method == "POST":
            experiment = payload | {"experiment_id": str(uuid.uuid4())}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if path == "/apis/v2beta1/runs" and method == "POST":
            if payload.get("experiment_id") not in self.experiments:
                return 400, {"error": "experiment not found", "code": 3}
            run = payload | {"run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs[run["run_id"]] = run
            if self.on_run_created:
                self.on_run_created(self)
            return 200, run
        if (match := re.fullmatch(r"/apis/v2beta1/runs/([^/]+)", path)) and method == "GET":
            if match[1] not in self.runs:
                return 404, {"error": f"run {match[1]} not found", "code": 5}
            self.runs[match[1]]["state"] = self.final_state
            return 200, self.runs[match[1]]
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def serve(self) -> ThreadingHTTPServer:
        return serve_json(self.handle)
