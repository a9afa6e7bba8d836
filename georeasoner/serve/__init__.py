"""The Ray Serve service: ``POST /geolocate``, OpenAI-compatible ``POST /v1/chat/completions``, ``GET /healthz``
and ``GET /v1/models``.

Three deployments (``configs/serve/{local,cluster}.yaml``, Ray Serve's own config format):

- ``Ingress`` (FastAPI): authenticates, reads the body with a size bound and deadlines, resolves the image (raw
  bytes, multipart, JSON base64, an ``s3://`` URI with a plain key from an allowed bucket, an OpenAI data URL),
  decodes it with :func:`georeasoner.core.images.decode_image_sized` (a pixel limit, reduced while decoding, a few
  at a time) and calls the two model deployments; every bad input is a 4xx JSON error
  (:mod:`georeasoner.serve.errors`), a client that goes away one info line.
- ``Geolocator``: :class:`georeasoner.vlm.predict.Geolocator` behind ``@serve.batch`` (autoscaled; GPUs from config).
- ``Scorer``: the locatability student (:class:`georeasoner.locatability.student.LocatabilityScorer`), batched.

Entry point for ``serve run`` / ``serve deploy`` / a RayService: ``georeasoner.serve.app:build_app``.
"""

from georeasoner.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
