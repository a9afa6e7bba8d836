"""Untrusted request input -> image bytes, or an :class:`~georeasoner.serve.errors.ApiError`.

Bodies are read with a bound (``Content-Length`` checked first, then a counted read that stops past the limit:
413) and within deadlines (:class:`BodyGate`: 408 for a body that does not arrive in time, or that turns slow while
as many slow ones as one replica reads at once are being read), multipart is parsed in memory (nothing is written
to disk), base64 and data URLs are checked, and ``s3://`` URIs are read only from allowed buckets, with plain keys
(no ``..``, ``.`` or empty segments, also percent-encoded), with a ranged GET no larger than the limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from georeasoner.core.storage import key_problem
from georeasoner.serve.errors import ApiError, ClientGone

RAW_TYPES = ("application/octet-stream",)
JSON_TYPES = ("application/json",)
SUPPORTED = "image/* or application/octet-stream (raw bytes), multipart/form-data (field 'image'), application/json"
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*?),(?P<data>.*)$", re.S | re.I)
_B64_JUNK = re.compile(r"\s+")


def media_type(content_type: str | None) -> str:
    """``image/jpeg; charset=x`` -> ``image/jpeg`` ('' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _too_large(limit: int, what: str = "request body", size: int | None = None) -> ApiError:
    """413: ``size`` when it is known (a declared Content-Length), else only that it passed the limit."""
    said = f"is {size} bytes" if size is not None else f"is over {limit} bytes"
    return ApiError("payload_too_large", f"{what} {said}; the limit is {limit} bytes", status=413)


async def _read_all(request, max_bytes: int) -> bytes:
    """The body's chunks as they come, never more than ``max_bytes`` kept (413 past it)."""
    from ray.exceptions import TaskCancelledError
    from starlette.requests import ClientDisconnect

    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"disconnected after sending {total} bytes of the body") from None
    except TaskCancelledError:
        raise ClientGone(f"request cancelled after {total} bytes of the body") from None
    return b"".join(chunks)


class BodyGate:
    """How long, and how many at once, request bodies may hold one ingress replica.

    Every body must arrive within ``timeout_s`` (then 408). A body still arriving after ``slow_s`` is a slow one;
    at most ``max_slow`` slow bodies are read at once, and a body that turns slow beyond that gets 408 at once.
    So clients trickling bytes hold at most ``max_slow`` of the replica's request slots past ``slow_s``; the
    others are freed for normal requests (and ``/healthz``) within ``slow_s``. One gate per replica, used from its
    event loop only."""

    def __init__(self, timeout_s: float, slow_s: float, max_slow: int):
        self.timeout_s, self.slow_s, self.max_slow = timeout_s, min(slow_s, timeout_s), max_slow
        self.slow = 0  # slow bodies being read now

    async def read(self, request, max_bytes: int) -> bytes:
        reader = asyncio.ensure_future(_read_all(request, max_bytes))
        counted = False
        try:
            done, _ = await asyncio.wait({reader}, timeout=self.slow_s)
            if not done and self.slow >= self.max_slow:
                raise ApiError("request_timeout", f"the request body did not arrive within {self.slow_s:g}s while "
                                                  f"{self.slow} other slow uploads are being read (the limit); "
                                                  "send it faster, or retry later", status=408,
                               headers={"Connection": "close"})
            if not done:
                self.slow += 1
                counted = True
                done, _ = await asyncio.wait({reader}, timeout=self.timeout_s - self.slow_s)
            if not done:
                raise ApiError("request_timeout", f"the request body did not arrive within {self.timeout_s:g}s "
                                                  "(body_timeout_s)", status=408, headers={"Connection": "close"})
            return reader.result()
        finally:
            if counted:
                self.slow -= 1
            if not reader.done():
                reader.cancel()


async def read_body(request, max_bytes: int, gate: BodyGate | None = None) -> bytes:
    """The request body, never more than ``max_bytes`` read into memory (413 past it), within the ``gate``'s
    deadlines (408); :class:`ClientGone` when the client goes away."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError("invalid_content_length", f"Content-Length {declared[:40]!r} is not a number") from None
        if size < 0:
            raise ApiError("invalid_content_length", "Content-Length is negative")
        if size > max_bytes:
            raise _too_large(max_bytes, size=size)
    if gate is None:
        return await _read_all(request, max_bytes)
    return await gate.read(request, max_bytes)


# -- base64 and data URLs -------------------------------------------------------------------------

def decode_base64(text: Any, param: str = "image") -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; else 400 ``invalid_base64``."""
    if not isinstance(text, str):
        raise ApiError("invalid_field", f"'{param}' must be a base64 string, not {type(text).__name__}", param)
    clean = _B64_JUNK.sub("", text)
    if not clean:
        raise ApiError("empty", f"'{param}' is an empty string", param)
    if len(clean) % 4 == 1:
        raise ApiError("invalid_base64", f"'{param}' is not valid base64 (length {len(clean)} is impossible)", param)
    clean += "=" * (-len(clean) % 4)
    altchars = b"-_" if ("-" in clean or "_" in clean) else None
    try:
        return base64.b64decode(clean, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError("invalid_base64", f"'{param}' is not valid base64 ({exc})", param) from None


def decode_data_url(url: str, param: str) -> bytes:
    """``data:image/jpeg;base64,...`` -> bytes (image/* or application/octet-stream only)."""
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError("invalid_uri", f"'{param}' is not a valid data URL (data:image/jpeg;base64,...)", param)
    mtype = (match.group("type") or "").lower()
    if mtype and not (mtype.startswith("image/") or mtype in RAW_TYPES):
        raise ApiError("unsupported_media_type", f"'{param}' is a data URL of type '{mtype}'; send an image/* data URL",
                       param, status=415)
    if "base64" not in (match.group("params") or "").lower():
        raise ApiError("invalid_base64", f"'{param}' must be a base64 data URL (data:image/jpeg;base64,...)", param)
    return decode_base64(match.group("data"), param)


# -- s3 -------------------------------------------------------------------------------------------

def check_s3_uri(uri: Any, settings, param: str) -> tuple[str, str]:
    """(bucket, key) of an allowed ``s3://bucket/key``; 400 for other URIs, 403 for a bucket not allowed."""
    if not isinstance(uri, str):
        raise ApiError("invalid_field", f"'{param}' must be a string URI, not {type(uri).__name__}", param)
    if not uri.startswith("s3://"):
        scheme = uri.split("://", 1)[0] + "://" if "://" in uri else "a local path"
        raise ApiError("unsupported_url", f"'{param}': {scheme[:20]} is not read by this service; send the image "
                                          "bytes, or an s3:// URI of an allowed bucket", param)
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ApiError("invalid_uri", f"'{param}' must name an object: s3://bucket/key", param)
    problem = key_problem(key)
    if problem:
        raise ApiError("invalid_uri", f"'{param}': the key of {uri[:200]!r} is not a plain object key: {problem}",
                       param)
    if not settings.bucket_allowed(bucket, key):
        raise ApiError("bucket_not_allowed", f"'{param}': bucket '{bucket[:63]}' is not allowed for this key", param,
                       status=403)
    return bucket, key


def read_s3(uri: str, max_bytes: int, param: str) -> bytes:
    """At most ``max_bytes`` of an allowed object (blocking: run it in a thread); 413 when larger."""
    from botocore.exceptions import BotoCoreError, ClientError

    from georeasoner.core import storage

    try:
        data = storage.read_range(uri, 0, max_bytes + 1)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise ApiError("object_not_found", f"'{param}': {uri} does not exist", param, status=404) from None
        if code in ("AccessDenied", "403", "Forbidden"):
            raise ApiError("object_access_denied", f"'{param}': the service may not read {uri}", param,
                           status=403) from None
        if code == "InvalidRange":  # a 0-byte object
            return b""
        raise ApiError("storage_unavailable", f"reading {uri} failed: {code or type(exc).__name__}", param,
                       status=502) from None
    except (BotoCoreError, OSError) as exc:
        raise ApiError("storage_unavailable", f"reading {uri} failed: {type(exc).__name__}", param,
                       status=502) from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes, f"object {uri}")
    return data


# -- /geolocate bodies -----------------------------------------------------------------------------

@dataclass
class ImageSource:
    """What a request names: bytes in hand, or an allowed s3 URI still to read."""

    data: bytes | None = None
    uri: str | None = None
    param: str = "image"


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise ApiError("invalid_json", "the request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError("invalid_json", "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ApiError("invalid_json", f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError("invalid_json", "malformed JSON: nested too deeply") from None


def _image_from_fields(fields: dict[str, Any], settings, where: str) -> ImageSource:
    has_image = "image" in fields or "image_base64" in fields
    has_uri = "image_uri" in fields
    if has_image and has_uri:
        raise ApiError("invalid_request", f"{where}: send either 'image' or 'image_uri', not both")
    if has_uri:
        uri = fields["image_uri"]
        check_s3_uri(uri, settings, "image_uri")
        return ImageSource(uri=uri, param="image_uri")
    if not has_image:
        raise ApiError("missing_field", f"{where}: missing field 'image' (base64 or a data URL) or 'image_uri' "
                                        "(s3://bucket/key)", "image")
    param = "image" if "image" in fields else "image_base64"
    value = fields[param]
    if isinstance(value, (bytes, bytearray)):
        return ImageSource(data=bytes(value), param=param)
    if value is None:
        raise ApiError("missing_field", f"{where}: field '{param}' is null", param)
    if isinstance(value, str) and value.lstrip().lower().startswith("data:"):
        return ImageSource(data=decode_data_url(value.strip(), param), param=param)
    if isinstance(value, str) and "://" in value[:16]:
        raise ApiError("invalid_field", f"'{param}' holds a URL; put s3:// URIs in 'image_uri' (other URLs are "
                                        "not read)", param)
    return ImageSource(data=decode_base64(value, param), param=param)


def geolocate_source(content_type: str | None, body: bytes, settings) -> ImageSource:
    """The image a ``POST /geolocate`` names, by content type (raw, multipart, JSON)."""
    mtype = media_type(content_type)
    if mtype == "" or mtype.startswith("image/") or mtype in RAW_TYPES:
        return ImageSource(data=body, param="body")
    if mtype == "multipart/form-data":
        fields = parse_multipart(content_type or "", body)
        return _image_from_fields(fields, settings, "multipart form")
    if mtype in JSON_TYPES or mtype.endswith("+json"):
        obj = parse_json(body)
        if not isinstance(obj, dict):
            raise ApiError("invalid_request", f"the JSON body must be an object, not {type(obj).__name__}")
        return _image_from_fields(obj, settings, "JSON body")
    raise ApiError("unsupported_media_type", f"Content-Type '{mtype[:80]}' is not supported; send {SUPPORTED}",
                   status=415)


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """``{field name: bytes (file parts) or str (text fields)}``, parsed in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError("invalid_request", "multipart/form-data without a boundary parameter")
    parts: list[dict[str, Any]] = []
    header = {"field": b"", "value": b""}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][header["field"].decode("latin-1").lower()] = header["value"].decode("latin-1")
        header["field"], header["value"] = b"", b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data}, max_size=len(body) + 1)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
        raise ApiError("invalid_request", f"malformed multipart body: {str(exc)[:200]}") from None
    fields: dict[str, Any] = {}
    for part in parts:
        disposition = part["headers"].get("content-disposition", "")
        _, opts = parse_options_header(disposition)
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            continue
        if b"filename" in opts or name == "image":
            fields.setdefault(name, bytes(part["data"]))
        else:
            fields.setdefault(name, bytes(part["data"]).decode("utf-8", "replace"))
    if "image" not in fields and "image_uri" not in fields:
        files = [name for name, value in fields.items() if isinstance(value, bytes)]
        if len(files) == 1:  # one file under another field name: take it
            fields["image"] = fields[files[0]]
        else:
            names = ", ".join(sorted(fields)) or "none"
            raise ApiError("missing_field", f"multipart form: missing file field 'image' (fields sent: {names[:200]})",
                           "image")
    return fields


# -- OpenAI chat requests -------------------------------------------------------------------------

@dataclass
class ChatRequest:
    model: str
    image_url: str
    stream: bool
    include_usage: bool = False


def parse_chat_request(obj: Any, served: set[str], served_id: str) -> ChatRequest:
    """Validate an OpenAI chat completions request: the model, one image content part, stream flag."""
    if not isinstance(obj, dict):
        raise ApiError("invalid_request", f"the JSON body must be an object, not {type(obj).__name__}")
    model = obj.get("model")
    if model is None:
        raise ApiError("missing_field", "missing field 'model'", "model")
    if not isinstance(model, str):
        raise ApiError("invalid_field", "'model' must be a string", "model")
    if model not in served:
        raise ApiError("model_not_found", f"the model '{model[:100]}' does not exist; this service serves "
                                          f"'{served_id}' (GET /v1/models)", "model", status=404)
    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError("invalid_field", "'stream' must be true or false", "stream")
    n = obj.get("n", 1)
    if n not in (None, 1):
        raise ApiError("invalid_field", "'n' must be 1 (one answer per image)", "n")
    options = obj.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    messages = obj.get("messages")
    if messages is None:
        raise ApiError("missing_field", "missing field 'messages'", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_field", "'messages' must be a non-empty list", "messages")
    urls = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError("invalid_field", f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise ApiError("missing_field", f"messages[{i}] has no 'role'", f"messages[{i}].role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ApiError("invalid_field", f"messages[{i}].content must be a string or a list of parts",
                           f"messages[{i}].content")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError("invalid_field", f"{where} must be an object with a 'type'", where)
            kind = part["type"]
            if kind == "text":
                continue
            if kind != "image_url":
                raise ApiError("invalid_field", f"{where}: content part type '{kind[:40]}' is not supported "
                                                "(text, image_url)", where)
            if role != "user":
                raise ApiError("invalid_field", f"{where}: images are read from user messages only", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise ApiError("missing_field", f"{where}: missing image_url.url (a data:image/...;base64 URL)",
                               f"{where}.image_url.url")
            urls.append((url, f"{where}.image_url.url"))
    if not urls:
        raise ApiError("missing_field", "no image: add a user content part {\"type\": \"image_url\", \"image_url\": "
                                        "{\"url\": \"data:image/jpeg;base64,...\"}}", "messages")
    if len(urls) > 1:
        raise ApiError("invalid_request", f"{len(urls)} images sent; send one image per request", "messages")
    return ChatRequest(model=model, image_url=urls[0][0], stream=stream, include_usage=include_usage)


def chat_image_source(url: str, settings, param: str = "image_url.url") -> ImageSource:
    if url.lstrip().lower().startswith("data:"):
        return ImageSource(data=decode_data_url(url.strip(), param), param=param)
    if url.startswith("s3://"):
        check_s3_uri(url, settings, param)
        return ImageSource(uri=url, param=param)
    raise ApiError("unsupported_url", f"'{param}': only data URLs (data:image/jpeg;base64,...) and s3:// URIs of "
                                      "allowed buckets are read; remote URLs are not fetched", param)
