"""The Serve application: the ``Ingress`` (FastAPI) in front of the ``Geolocator`` and ``Scorer`` deployments.

    serve run configs/serve/local.yaml            # import_path: georeasoner.serve.app:build_app
    serve deploy configs/serve/cluster.yaml       # or the same applications block in a KubeRay RayService

Endpoints:

- ``POST /geolocate``: raw image bytes (``image/*``, ``application/octet-stream``), multipart (file field ``image``),
  or JSON ``{"image": <base64 or data URL>}`` / ``{"image_uri": "s3://<allowed bucket>/key"}`` -> the answer
  (``country`` ISO2 or null, ``city``, ``lat``, ``lon``, ``reasons``, ``confidence``) plus ``locatability``,
  ``model_version``, ``scorer_version`` (and ``raw_text``).
- ``POST /v1/chat/completions``: OpenAI-compatible; one ``image_url`` content part (a data URL, or an allowed s3://
  URI); the assistant message holds the answer as JSON (``georeasoner`` holds it as an object). ``stream: true``
  streams it as server-sent events (the answer is computed first, then sent in chunks; not token by token). The
  text of the messages is not used: the model answers the question it was trained on.
- ``GET /healthz`` (never needs the token), ``GET /v1/models`` (model id, model and adapter versions, scorer).

Every bad request gets a 4xx JSON error (:mod:`georeasoner.serve.errors`); uploaded images live only in memory
for the request.

Hostile clients are bounded per ingress replica (``args`` of the config, :class:`ServeSettings`): a body must
arrive within ``body_timeout_s`` and at most ``max_slow_bodies`` may still be arriving after ``slow_body_s`` (408
otherwise), so trickling clients cannot take every request slot; images declaring over ``max_pixels`` are refused
from the header (422), the rest are reduced while decoding (JPEG DCT scaling, integer box reduction, 16-bit data
converted band by band) and at most ``max_concurrent_decodes`` decode at once; a client that goes away is logged
as one info line (status 499 in the access log), not as an error.

No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations (``Request``) as
objects once Serve's ingress has wrapped them. Helpers the ``Ingress`` calls are defined above the class.
"""

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from georeasoner.core.images import ImageError, decode_image_sized
from georeasoner.serve import inputs
from georeasoner.serve.errors import ApiError, ClientGone, response
from georeasoner.serve.models import GeolocatorDeployment, ScorerDeployment
from georeasoner.serve.settings import ConfigError, ServeSettings, parse_settings, resolve_models
from georeasoner.vlm.answers import clean_answer

logger = logging.getLogger("ray.serve")

ANSWER_FIELDS = ("country", "city", "lat", "lon", "reasons", "confidence")
MAX_ASPECT = 200  # Qwen2-VL's image processor refuses longer strips

api = FastAPI(title="georeasoner", description="Street-view geolocation with reasons (GeoReasoner on Ray Serve)",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return response(exc)


@api.exception_handler(ClientGone)
async def _client_gone(request: Request, exc: ClientGone):
    logger.info("client went away on %s %s: %s", request.method, request.url.path[:200], exc.why)
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the access log shows it


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        err = ApiError("not_found", f"no endpoint {request.method} {request.url.path[:200]}; see POST /geolocate, "
                                    "POST /v1/chat/completions, GET /healthz, GET /v1/models", status=404)
    elif exc.status_code == 405:
        err = ApiError("method_not_allowed", f"{request.method} is not allowed on {request.url.path[:200]}",
                       status=405, headers=dict(exc.headers or {}))
    else:
        err = ApiError("invalid_request", str(exc.detail), status=exc.status_code)
    return response(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return response(ApiError("invalid_request", str(exc.errors()[:1])[:300]))


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return response(ApiError("internal_error", f"internal error ({type(exc).__name__})", status=500))


def _sse_chunks(ident: str, created: int, model: str, fingerprint: str, content: str, answer: dict,
                include_usage: bool, piece: int = 24):
    def event(delta: dict, finish: str | None = None, **extra) -> str:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "system_fingerprint": fingerprint,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    for i in range(0, len(content), piece):
        yield event({"content": content[i:i + piece]})
    yield event({}, "stop", georeasoner=answer)
    if include_usage:
        usage = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [], "usage": None}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    """Validates and decodes requests; asks the model deployments; shapes the answers."""

    def __init__(self, geolocator: DeploymentHandle, settings: dict[str, Any], fallback_used: bool = False):
        self.settings = ServeSettings.model_validate(settings)
        self.settings.storage.apply()
        self.geolocator = geolocator
        self.fallback_used = fallback_used
        self.token = ""
        if self.settings.auth_token_env:
            self.token = os.environ.get(self.settings.auth_token_env, "").strip()  # a Secret file's trailing newline
            if not self.token and self.settings.auth_required:
                raise RuntimeError(f"auth_required: environment variable {self.settings.auth_token_env} is unset "
                                   "or empty in the ingress replica")
            if not self.token:
                logger.warning("auth_token_env=%s is unset or empty: the service answers without a token",
                               self.settings.auth_token_env)
        self._info: dict[str, Any] | None = None
        self.created = int(time.time())
        s = self.settings
        self.bodies = inputs.BodyGate(s.body_timeout_s, s.slow_body_s, s.max_slow_bodies)
        # at most max_concurrent_decodes images decode at once, on threads of their own (few threads: few malloc
        # arenas holding freed decode buffers)
        self.decoder = ThreadPoolExecutor(s.max_concurrent_decodes, thread_name_prefix="decode")

    # -- helpers ----------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError("unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'",
                           status=401, headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError("unauthorized", "invalid bearer token", status=401,
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def _info_cached(self) -> dict[str, Any]:
        if self._info is None:
            try:
                geo = await asyncio.wait_for(self.geolocator.info.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - not up yet: report, do not cache
                raise ApiError("model_unavailable", f"the models are not ready ({type(exc).__name__})",
                               status=503) from None
            self._info = {**geo, "fallback": self.fallback_used}
        return self._info

    async def _image_bytes(self, source: inputs.ImageSource) -> bytes:
        if source.data is not None:
            return source.data
        return await asyncio.to_thread(inputs.read_s3, source.uri, self.settings.max_bytes, source.param)

    def _decode(self, data: bytes, param: str):
        side = self.settings.max_image_side
        try:
            # reduced while decoding to >= 2x the side (as thumbnail's reducing_gap), then shrunk exactly
            img, (width, height) = decode_image_sized(data, self.settings.max_pixels, reduce_to=2 * side)
        except ImageError as exc:
            raise ApiError.from_image_error(exc, param) from None
        if max(img.size) > side:
            img.thumbnail((side, side))
        if max(img.size) > MAX_ASPECT * min(img.size):  # checked after the shrink, which rounds the short side
            raise ApiError("unsupported_image", f"the image is {width}x{height}: an aspect ratio over {MAX_ASPECT}:1 "
                                                "(the VLM's limit)", param, status=422)
        return img

    async def _answer(self, source: inputs.ImageSource) -> dict[str, Any]:
        data = await self._image_bytes(source)
        # the decode pool's threads are the bound: a request cancelled mid-decode keeps its thread busy until the
        # decode ends (a thread cannot be stopped); one cancelled while queued leaves the queue
        img = await asyncio.get_running_loop().run_in_executor(self.decoder, self._decode, data, source.param)
        del data
        info = await self._info_cached()
        # one copy of the pixels in the object store, read by both model deployments
        pixels = ray.put(np.asarray(img, dtype=np.uint8))
        del img
        try:
            result = await asyncio.wait_for(self.geolocator.remote({"pixels": pixels}),
                                            timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError("model_unavailable", f"no answer within {self.settings.request_timeout_s:.0f}s "
                                                "(the service is overloaded)", status=503) from None
        except ray.exceptions.TaskCancelledError:  # Serve's RequestCancelledError: the client went away
            raise ClientGone("request cancelled while the models answered") from None
        except Exception as exc:  # noqa: BLE001 - a replica died or Serve refused: a server fault
            logger.exception("model call failed")
            raise ApiError("model_unavailable", f"the models could not be reached ({type(exc).__name__})",
                           status=503) from None
        geo, scored = result["answer"], result["locatability"]
        if "error" in geo:
            raise ApiError("model_error", f"the geolocator failed on this image: {geo['error']}", status=500)
        if "unavailable" in scored:
            raise ApiError("model_unavailable", f"the scorer could not be reached: {scored['unavailable']}",
                           status=503)
        if "error" in scored:
            raise ApiError("model_error", f"the scorer failed on this image: {scored['error']}", status=500)
        answer = {k: v for k, v in clean_answer(geo["ok"]).items() if k in ANSWER_FIELDS}
        score = scored["ok"]
        answer.update(locatability=None if score is None else min(1.0, max(0.0, float(score))),
                      model_version=info["model_version"], scorer_version=info["scorer_version"])
        if self.settings.include_raw_text:
            answer["raw_text"] = geo["ok"].get("raw_text", "")
        return answer

    # -- endpoints --------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        info = await self._info_cached()
        return {"status": "ok", "model": self.settings.model_name, "model_version": info["model_version"],
                "scorer_version": info["scorer_version"], "index_version": info.get("index_version"),
                "fallback_model": info["fallback"], "auth": bool(self.token), "max_bytes": self.settings.max_bytes}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        info = await self._info_cached()
        card = {
            "id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "georeasoner",
            "model_version": info["model_version"], "adapters": info["adapters"], "family": info["family"],
            "base_model": info["base_model"], "scorer_version": info["scorer_version"],
            "fallback_model": info["fallback"], "commercial_use": info.get("commercial_use"),
            "index_version": info.get("index_version"), "retrieval": info.get("retrieval"),
        }
        return {"object": "list", "data": [card]}

    @api.post("/geolocate")
    async def geolocate(self, request: Request):
        self._authorize(request)
        body = await inputs.read_body(request, self.settings.max_bytes, self.bodies)
        source = inputs.geolocate_source(request.headers.get("content-type"), body, self.settings)
        del body
        return await self._answer(source)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        if inputs.media_type(request.headers.get("content-type")) not in ("application/json", ""):
            raise ApiError("unsupported_media_type", "send the chat request as application/json", status=415)
        body = await inputs.read_body(request, self.settings.max_bytes, self.bodies)
        obj = inputs.parse_json(body)
        del body
        info = await self._info_cached()
        chat = inputs.parse_chat_request(obj, {self.settings.model_name, info["model_version"]},
                                         self.settings.model_name)
        del obj
        source = inputs.chat_image_source(chat.image_url, self.settings,
                                          "messages[].content[].image_url.url")
        answer = await self._answer(source)
        content = json.dumps({k: answer[k] for k in (*ANSWER_FIELDS, "locatability")})
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not chat.stream:
            return {
                "id": ident, "object": "chat.completion", "created": created, "model": chat.model,
                "system_fingerprint": info["model_version"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": None}],
                "georeasoner": answer,
            }
        return StreamingResponse(_sse_chunks(ident, created, chat.model, info["model_version"], content, answer,
                                             chat.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- building the application -------------------------------------------------------------------

def make_app(settings: ServeSettings | dict[str, Any], options: dict[str, dict[str, Any]] | None = None,
             resolve: bool = True):
    """The bound application; ``options`` = ``{deployment name: Serve options}`` (as a config's ``deployments:``).

    ``max_ongoing_requests`` of a model deployment defaults to twice its ``max_batch_size`` and may not be lower
    than it (a batch could never fill)."""
    settings = parse_settings(settings)
    if resolve:
        settings = resolve_models(settings)
    options = {k: dict(v) for k, v in (options or {}).items()}
    unknown = set(options) - {"Ingress", "Geolocator", "Scorer"}
    if unknown:
        raise ConfigError(f"config error: unknown deployment '{sorted(unknown)[0]}' (Ingress, Geolocator, Scorer)")
    plain = settings.model_dump(mode="json")

    def opts(name: str, batch) -> dict[str, Any]:
        o = options.get(name, {})
        o.setdefault("max_ongoing_requests", max(2 * batch.max_batch_size, 8))
        if o["max_ongoing_requests"] < batch.max_batch_size:
            raise ConfigError(f"config error: deployments.{name}.max_ongoing_requests ({o['max_ongoing_requests']}) "
                              f"must be >= its max_batch_size ({batch.max_batch_size})")
        return o

    ingress_slots = options.get("Ingress", {}).get("max_ongoing_requests", Ingress.max_ongoing_requests)
    if settings.max_slow_bodies >= ingress_slots:
        raise ConfigError(f"config error: args.max_slow_bodies ({settings.max_slow_bodies}) must be below "
                          f"deployments.Ingress.max_ongoing_requests ({ingress_slots}), or slow uploads can hold "
                          "every request slot of the ingress")
    scorer = ScorerDeployment.options(**opts("Scorer", settings.scorer_batch)).bind(plain) if settings.scorer else None
    geo = GeolocatorDeployment.options(**opts("Geolocator", settings.geolocator)).bind(plain, scorer)
    return Ingress.options(**options.get("Ingress", {})).bind(geo, plain, settings.fallback_used)


def build_app(args: dict[str, Any]):
    """``import_path`` target of ``configs/serve/*.yaml``: validate the args (one-line error naming the key),
    check the model packages, bind the deployments (their options come from the config's ``deployments:``)."""
    return make_app(parse_settings(args, "the serve app args (applications[].args)"))


def app_from_config(path: str, overrides: list[str] | None = None, app: str | None = None):
    """``(application, http_options, app name, route_prefix)`` from a Ray Serve config file, with the config's
    ``deployments:`` options applied as ``serve deploy`` would; for launchers that run it with ``serve.run``."""
    from georeasoner.serve.settings import deployment_options, load_serve_config

    data = load_serve_config(path, overrides, app)
    target = next((a for a in data["applications"] if a.get("name") == app), None) if app else data["applications"][0]
    application = make_app(target.get("args") or {}, deployment_options(target))
    return application, data.get("http_options") or {}, target.get("name", "default"), target.get("route_prefix", "/")
