"""The Replicate emulator's catalog routes: files, models and versions, deployments, account, hardware.

A mixin of ``ReplicateEmulator`` (``broker.testing.replicate_emulator``), which owns the
state these read and write. Shapes follow https://replicate.com/docs/reference/http
(read 2026-11-23) as the replicate 1.0.7 client parses them.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from broker.testing.replicate_state import HARDWARE, FileRecord, deployment_json, model_json, problem


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return json_response(problem(status, detail), status, headers)


class CatalogRoutes:
    """Everything but predictions. Expects the attributes and helpers ``ReplicateEmulator`` defines."""

    owner: str
    base_url: str
    models: dict[str, dict[str, Any]]
    deployments: dict[str, dict[str, Any]]
    files: dict[str, FileRecord]

    def _authorized(self, request: Request) -> bool:
        raise NotImplementedError

    def _sign(self, fid: str, expiry: int) -> str:
        raise NotImplementedError

    async def _ensure_version(self, model_name: str) -> None:
        raise NotImplementedError

    # -- files ----------------------------------------------------------------------
    async def create_file(self, request: Request) -> Response:
        raw = await request.body()
        ctype = request.headers.get("content-type", "")
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        content: FileRecord | None = None
        metadata: dict[str, Any] = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            if name == "content":
                fid = secrets.token_urlsafe(24)
                content = FileRecord(fid, part.get_filename() or "file", part.get_content_type(), data, {})
            elif name == "metadata":
                metadata = json.loads(data or b"{}")
        if content is None:
            return error_response(400, "multipart field 'content' is required")
        content.metadata = metadata
        self.files[content.id] = content
        return json_response(content.to_json(self.base_url), 201)

    async def list_files(self) -> Response:
        return json_response({"next": None, "previous": None,
                      "results": [f.to_json(self.base_url) for f in self.files.values()]})

    async def get_file(self, fid: str) -> Response:
        item = self.files.get(fid)
        return json_response(item.to_json(self.base_url)) if item else error_response(404, "Not found.")

    async def delete_file(self, fid: str) -> Response:
        return Response(status_code=204 if self.files.pop(fid, None) else 404)

    async def download_file(self, fid: str, request: Request) -> Response:
        item = self.files.get(fid)
        query = request.query_params
        signed = False
        if "signature" in query and query.get("expiry", "").isdigit():
            expiry = int(query["expiry"])
            signed = expiry >= time.time() and hmac.compare_digest(query["signature"], self._sign(fid, expiry))
        if not (signed or self._authorized(request)):
            return error_response(401, "signature or token required")
        if item is None:
            return error_response(404, "Not found.")
        return Response(item.data, media_type=item.content_type)

    # -- models, deployments, account, hardware --------------------------------------
    async def account(self) -> Response:
        return json_response({"type": "user", "username": self.owner, "name": self.owner, "github_url": None})

    async def hardware(self) -> Response:
        return json_response(list(HARDWARE))

    async def create_model(self, request: Request) -> Response:
        body = await request.json()
        name = f"{body.get('owner')}/{body.get('name')}"
        if name in self.models:
            return error_response(409, f"Model {name} already exists")
        if body.get("hardware") not in {h["sku"] for h in HARDWARE}:
            return error_response(422, f"Invalid hardware {body.get('hardware')!r}")
        self.models[name] = {"versions": [], "hardware": body["hardware"],
                             "visibility": body.get("visibility", "private"), "description": body.get("description")}
        return json_response(model_json(body["owner"], body["name"], self.models[name]), 201)

    async def get_model(self, owner: str, name: str) -> Response:
        key = f"{owner}/{name}"
        if key not in self.models:
            return error_response(404, "Not found.")
        await self._ensure_version(key)
        return json_response(model_json(owner, name, self.models[key]))

    async def list_versions(self, owner: str, name: str) -> Response:
        key = f"{owner}/{name}"
        if key not in self.models:
            return error_response(404, "Not found.")
        await self._ensure_version(key)
        return json_response({"next": None, "previous": None, "results": list(reversed(self.models[key]["versions"]))})

    async def get_version(self, owner: str, name: str, vid: str) -> Response:
        key = f"{owner}/{name}"
        if key in self.models:
            await self._ensure_version(key)
        for v in self.models.get(key, {}).get("versions", []):
            if v["id"] == vid:
                return json_response(v)
        return error_response(404, "Not found.")

    async def list_deployments(self) -> Response:
        results = [deployment_json(*_owner_name(k), d) for k, d in self.deployments.items()]
        return json_response({"next": None, "previous": None, "results": results})

    async def create_deployment(self, request: Request) -> Response:
        body = await request.json()
        key = f"{self.owner}/{body.get('name')}"
        if key in self.deployments:
            return error_response(409, f"Deployment {key} already exists")
        problem_ = await self._check_release(body, require_all=True)
        if problem_:
            return problem_
        self.deployments[key] = {
            "number": 1, "created_at": time.time(), "model": body["model"], "version": body["version"],
            "hardware": body["hardware"], "min_instances": int(body["min_instances"]),
            "max_instances": int(body["max_instances"]),
        }
        return json_response(deployment_json(self.owner, body["name"], self.deployments[key]), 201)

    async def get_deployment(self, owner: str, name: str) -> Response:
        dep = self.deployments.get(f"{owner}/{name}")
        return json_response(deployment_json(owner, name, dep)) if dep else error_response(404, "Not found.")

    async def update_deployment(self, owner: str, name: str, request: Request) -> Response:
        dep = self.deployments.get(f"{owner}/{name}")
        if dep is None:
            return error_response(404, "Not found.")
        body = await request.json()
        problem_ = await self._check_release({**dep, **body}, require_all=False)
        if problem_:
            return problem_
        for key in ("version", "hardware", "min_instances", "max_instances"):
            if key in body:
                dep[key] = body[key]
        dep["number"] += 1
        dep["created_at"] = time.time()
        return json_response(deployment_json(owner, name, dep))

    async def delete_deployment(self, owner: str, name: str) -> Response:
        return Response(status_code=204 if self.deployments.pop(f"{owner}/{name}", None) else 404)

    async def _check_release(self, body: dict[str, Any], *, require_all: bool) -> Response | None:
        fields = ("name", "model", "version", "hardware", "min_instances", "max_instances")
        missing = [f for f in fields if require_all and body.get(f) in (None, "")]
        if missing:
            return error_response(422, f"missing fields: {', '.join(missing)}")
        model = self.models.get(str(body.get("model")))
        if model is None:
            return error_response(404, f"Model {body.get('model')} not found")
        await self._ensure_version(str(body["model"]))
        if not any(v["id"] == body.get("version") for v in model["versions"]):
            return error_response(422, f"Version {body.get('version')} does not belong to {body['model']}")
        if body.get("hardware") not in {h["sku"] for h in HARDWARE}:
            return error_response(422, f"Invalid hardware {body.get('hardware')!r}")
        low, high = int(body["min_instances"]), int(body["max_instances"])
        if low < 0 or high < max(low, 1):
            return error_response(422, "need 0 <= min_instances <= max_instances and max_instances >= 1")
        return None


def _owner_name(key: str) -> tuple[str, str]:
    owner, _, name = key.partition("/")
    return owner, name
