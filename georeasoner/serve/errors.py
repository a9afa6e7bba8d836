"""Every error the service returns: an HTTP status and one JSON shape (OpenAI's), saying what is wrong.

    {"error": {"message": "...", "type": "invalid_request_error", "code": "invalid_base64", "param": "image"}}

4xx for bad requests (the client can fix them), 5xx only for faults of the service itself.
"""

from __future__ import annotations

from typing import Any

from georeasoner.core.images import ImageError

# code -> HTTP status for request errors
STATUS = {
    "invalid_json": 400,
    "invalid_request": 400,
    "missing_field": 400,
    "invalid_field": 400,
    "invalid_base64": 400,
    "invalid_uri": 400,
    "unsupported_url": 400,
    "empty": 400,
    "stream_unsupported": 400,
    "invalid_content_length": 400,
    "unauthorized": 401,
    "bucket_not_allowed": 403,
    "object_access_denied": 403,
    "not_found": 404,
    "model_not_found": 404,
    "object_not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "truncated": 422,
    "not_an_image": 422,
    "too_many_pixels": 422,
    "unreadable": 422,
    "unsupported_image": 422,
    "internal_error": 500,
    "storage_unavailable": 502,
    "model_unavailable": 503,
    "model_error": 500,
}


class ApiError(Exception):
    """A request that gets an error response: ``code`` (see :data:`STATUS`), a message, the field at fault."""

    def __init__(self, code: str, message: str, param: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status or STATUS.get(code, 400)
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}

    @classmethod
    def from_image_error(cls, exc: ImageError, param: str = "image") -> "ApiError":
        what = {
            "empty": "the image is empty (0 bytes)",
            "truncated": "the image data stops early (truncated file)",
            "not_an_image": "the data is not an image Pillow can read",
            "too_many_pixels": "the image declares too many pixels (decompression-bomb limit)",
            "unreadable": "the image cannot be decoded",
        }.get(exc.kind, "the image cannot be decoded")
        return cls(exc.kind, f"{what}: {exc.detail}"[:500], param)


class ClientGone(Exception):
    """The client went away (disconnected mid-upload, or its request was cancelled): nobody reads an answer.
    Logged as one info line, never as an error."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def response(exc: ApiError):
    """The Starlette JSON response of an :class:`ApiError`."""
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
