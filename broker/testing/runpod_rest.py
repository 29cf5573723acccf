"""RunPod's management REST API (``https://rest.runpod.io/v1``), templates and endpoints only.

Shapes follow RunPod's OpenAPI document (github.com/runpod/docs, api-reference/openapi.json,
commit a900806 of 2026-08-20): Bearer auth; ``POST/GET /templates``, ``GET/PATCH/DELETE
/templates/{id}`` (+ ``POST /templates/{id}/update``), the same for ``/endpoints``. Unknown body
fields are refused with 400, so a deploy that sends a misspelt field fails here as it would there.
"""

from __future__ import annotations

import datetime
import secrets
import string
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

#: gpuTypeIds RunPod accepts for serverless endpoints (the OpenAPI enum, 2026-08-20)
GPU_TYPE_IDS = frozenset({
    "NVIDIA GeForce RTX 4090", "NVIDIA A40", "NVIDIA RTX A5000", "NVIDIA GeForce RTX 5090",
    "NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 3090", "NVIDIA RTX A4500", "NVIDIA L40S", "NVIDIA H200",
    "NVIDIA L4", "NVIDIA RTX 6000 Ada Generation", "NVIDIA A100-SXM4-80GB", "NVIDIA RTX 4000 Ada Generation",
    "NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe", "NVIDIA RTX 2000 Ada Generation", "NVIDIA RTX A4000",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA L40",
    "NVIDIA B200", "NVIDIA GeForce RTX 3080 Ti", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
    "NVIDIA GeForce RTX 3080", "NVIDIA GeForce RTX 3070", "AMD Instinct MI300X OAM",
    "NVIDIA GeForce RTX 4080 SUPER", "Tesla V100-PCIE-16GB", "Tesla V100-SXM2-32GB",
    "NVIDIA RTX 5000 Ada Generation", "NVIDIA GeForce RTX 4070 Ti", "NVIDIA RTX 4000 SFF Ada Generation",
    "NVIDIA GeForce RTX 3090 Ti", "NVIDIA RTX A2000", "NVIDIA GeForce RTX 4080", "NVIDIA A30",
    "NVIDIA GeForce RTX 5080", "Tesla V100-FHHL-16GB", "NVIDIA H200 NVL", "Tesla V100-SXM2-16GB",
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition", "Tesla T4",
})

#: EndpointCreateInput.cpuFlavorIds enum and TemplateCreateInput.category enum (the same document)
CPU_FLAVOR_IDS = frozenset({"cpu3c", "cpu3g", "cpu5c", "cpu5g"})
TEMPLATE_CATEGORIES = frozenset({"NVIDIA", "AMD", "CPU"})

_TEMPLATE_CREATE = {
    "category", "containerDiskInGb", "containerRegistryAuthId", "dockerEntrypoint", "dockerStartCmd", "env",
    "imageName", "isPublic", "isServerless", "name", "ports", "readme", "volumeInGb", "volumeMountPath",
}
_TEMPLATE_UPDATE = _TEMPLATE_CREATE - {"category", "isServerless"}
_ENDPOINT_FIELDS = {
    "allowedCudaVersions", "computeType", "cpuFlavorIds", "dataCenterIds", "executionTimeoutMs", "flashboot",
    "gpuCount", "gpuTypeIds", "idleTimeout", "minCudaVersion", "name", "networkVolumeId", "networkVolumeIds",
    "scalerType", "scalerValue", "templateId", "vcpuCount", "workersMax", "workersMin",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _id(length: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


class RestStore:
    """Templates and endpoints of the emulated account."""

    def __init__(self, authorized: Callable[[web.Request], bool]) -> None:
        self.templates: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self._authorized = authorized

    def routes(self, prefix: str = "/v1") -> list[web.RouteDef]:
        g = self._guard
        return [
            web.post(f"{prefix}/templates", g(self.create_template)),
            web.get(f"{prefix}/templates", g(self.list_templates)),
            web.get(f"{prefix}/templates/{{id}}", g(self.get_template)),
            web.patch(f"{prefix}/templates/{{id}}", g(self.update_template)),
            web.post(f"{prefix}/templates/{{id}}/update", g(self.update_template)),
            web.delete(f"{prefix}/templates/{{id}}", g(self.delete_template)),
            web.post(f"{prefix}/endpoints", g(self.create_endpoint)),
            web.get(f"{prefix}/endpoints", g(self.list_endpoints)),
            web.get(f"{prefix}/endpoints/{{id}}", g(self.get_endpoint)),
            web.patch(f"{prefix}/endpoints/{{id}}", g(self.update_endpoint)),
            web.post(f"{prefix}/endpoints/{{id}}/update", g(self.update_endpoint)),
            web.delete(f"{prefix}/endpoints/{{id}}", g(self.delete_endpoint)),
        ]

    def _guard(self, fn: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return _bad("Unauthorized", 401)
            return await fn(request)

        return guarded

    @staticmethod
    async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("body is not JSON")
        if not isinstance(body, dict):
            return _bad("body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            return _bad(f"unknown field(s): {', '.join(unknown)}")
        return body

    # -- templates ---------------------------------------------------------------------
    async def create_template(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, _TEMPLATE_CREATE)
        if isinstance(body, web.Response):
            return body
        if not body.get("name") or not body.get("imageName"):
            return _bad("name and imageName are required")
        if body.get("category", "NVIDIA") not in TEMPLATE_CATEGORIES:
            return _bad(f"category must be one of {', '.join(sorted(TEMPLATE_CATEGORIES))}")
        if any(t["name"] == body["name"] for t in self.templates.values()):
            return _bad(f"a template named {body['name']!r} already exists; template names are unique")
        template: dict[str, Any] = {
            "id": _id(10), "category": "NVIDIA", "containerDiskInGb": 50, "containerRegistryAuthId": None,
            "dockerEntrypoint": [], "dockerStartCmd": [], "earned": 0, "env": {}, "isPublic": False,
            "isRunpod": False, "isServerless": False, "ports": [], "readme": "", "runtimeInMin": 0,
            "volumeInGb": 20, "volumeMountPath": "/workspace",
        }
        template.update(body)
        self.templates[template["id"]] = template
        return web.json_response(template)

    async def list_templates(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(list(self.templates.values()))

    async def get_template(self, request: web.Request) -> web.StreamResponse:
        template = self.templates.get(request.match_info["id"])
        return web.json_response(template) if template else _bad("template not found", 404)

    async def update_template(self, request: web.Request) -> web.StreamResponse:
        template = self.templates.get(request.match_info["id"])
        if template is None:
            return _bad("template not found", 404)
        body = await self._body(request, _TEMPLATE_UPDATE)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if name and any(t["name"] == name and t is not template for t in self.templates.values()):
            return _bad(f"a template named {name!r} already exists")
        template.update(body)
        for endpoint in self.endpoints.values():  # a new image or env is a new endpoint version
            if endpoint["templateId"] == template["id"]:
                endpoint["version"] += 1
        return web.json_response(template)

    async def delete_template(self, request: web.Request) -> web.StreamResponse:
        template_id = request.match_info["id"]
        if template_id not in self.templates:
            return _bad("template not found", 404)
        if any(e["templateId"] == template_id for e in self.endpoints.values()):
            return _bad("template is in use by an endpoint")
        del self.templates[template_id]
        return web.Response(status=204)

    # -- endpoints ---------------------------------------------------------------------
    def _check_endpoint(self, merged: dict[str, Any]) -> str | None:
        if merged.get("templateId") not in self.templates:
            return f"templateId {merged.get('templateId')!r} does not exist"
        compute = merged.get("computeType", "GPU")
        if compute not in ("GPU", "CPU"):
            return "computeType must be GPU or CPU"
        if compute == "CPU":
            # GPU fields are ignored on a CPU endpoint; its flavours and vCPUs are checked instead.
            bad = [f for f in merged.get("cpuFlavorIds") or [] if f not in CPU_FLAVOR_IDS]
            if bad:
                return f"unknown cpuFlavorIds: {', '.join(bad)}"
            if not isinstance(merged.get("vcpuCount", 2), int) or int(merged.get("vcpuCount", 2)) < 1:
                return "vcpuCount must be a positive integer"
            return self._check_scaling(merged)
        bad = [g for g in merged.get("gpuTypeIds") or [] if g not in GPU_TYPE_IDS]
        if bad:
            return f"unknown gpuTypeIds: {', '.join(bad)}"
        return self._check_scaling(merged)

    @staticmethod
    def _check_scaling(merged: dict[str, Any]) -> str | None:
        if not 1 <= int(merged.get("idleTimeout", 5)) <= 3600:
            return "idleTimeout must be between 1 and 3600 seconds"
        if int(merged.get("workersMin", 0)) > int(merged.get("workersMax", 3)):
            return "workersMin cannot exceed workersMax"
        if int(merged.get("workersMin", 0)) < 0:
            return "workersMin must be >= 0"
        return None

    async def create_endpoint(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, _ENDPOINT_FIELDS)
        if isinstance(body, web.Response):
            return body
        cpu = body.get("computeType") == "CPU"
        compute: dict[str, Any] = ({"cpuFlavorIds": ["cpu3c"], "vcpuCount": 2} if cpu
                                   else {"gpuCount": 1, "gpuTypeIds": []})
        endpoint: dict[str, Any] = {
            "id": _id(14), "name": None, "computeType": "GPU", **compute,
            "workersMin": 0, "workersMax": 3, "idleTimeout": 5, "flashboot": False,
            "executionTimeoutMs": 600_000, "scalerType": "QUEUE_DELAY", "scalerValue": 4, "env": {},
            "createdAt": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "userId": "user_emulated", "version": 0, "dataCenterIds": [], "allowedCudaVersions": [],
        }
        endpoint.update(body)
        problem = self._check_endpoint(endpoint)
        if problem:
            return _bad(problem)
        self.endpoints[endpoint["id"]] = endpoint
        return web.json_response(endpoint)

    async def list_endpoints(self, request: web.Request) -> web.StreamResponse:
        with_template = request.query.get("includeTemplate") == "true"
        return web.json_response([self._view(e, with_template) for e in self.endpoints.values()])

    async def get_endpoint(self, request: web.Request) -> web.StreamResponse:
        endpoint = self.endpoints.get(request.match_info["id"])
        if endpoint is None:
            return _bad("endpoint not found", 404)
        return web.json_response(self._view(endpoint, request.query.get("includeTemplate") == "true"))

    async def update_endpoint(self, request: web.Request) -> web.StreamResponse:
        endpoint = self.endpoints.get(request.match_info["id"])
        if endpoint is None:
            return _bad("endpoint not found", 404)
        body = await self._body(request, _ENDPOINT_FIELDS)
        if isinstance(body, web.Response):
            return body
        merged = {**endpoint, **body}
        problem = self._check_endpoint(merged)
        if problem:
            return _bad(problem)
        if merged["templateId"] != endpoint["templateId"]:
            merged["version"] += 1
        endpoint.update(merged)
        return web.json_response(endpoint)

    async def delete_endpoint(self, request: web.Request) -> web.StreamResponse:
        if self.endpoints.pop(request.match_info["id"], None) is None:
            return _bad("endpoint not found", 404)
        return web.Response(status=204)

    def _view(self, endpoint: dict[str, Any], with_template: bool) -> dict[str, Any]:
        if not with_template:
            return endpoint
        return {**endpoint, "template": self.templates.get(endpoint["templateId"])}
