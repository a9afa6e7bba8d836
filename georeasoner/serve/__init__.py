"""The Ray Serve service: ``POST /geolocate``, OpenAI-compatible ``POST /v1/chat/completions``, ``GET /healthz``
and ``GET /v1/models``.

Three deployments (``configs/serve/{local,cluster}.yaml``, Ray Serve's own config format):

- ``Ingress`` (FastAPI): authenticates, reads the body with a size bound, resolves the image (raw bytes, multipart,
  JSON base64, an ``s3://`` URI from an allowed bucket, an OpenAI data URL), decodes it with
  :func:`georeasoner.core.images.decode_image` and calls the two model deployments; every bad input is a 4xx JSON
  error (:mod:`georeasoner.serve.errors`).
- ``Geolocator``: :class:`georeasoner.vlm.predict.Geolocator` behind ``@serve.batch`` (autoscaled; GPUs from config).
- ``Scorer``: the locatability student (:class:`georeasoner.locatability.student.LocatabilityScorer`), batched.

Entry point for ``serve run`` / ``serve deploy`` / a RayService: ``georeasoner.serve.app:build_app``.
"""

from georeasoner.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
