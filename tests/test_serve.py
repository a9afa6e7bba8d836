"""Ray Serve service on 127.0.0.1: every endpoint answers a valid image with a schema-valid answer, the OpenAI client
works, bad requests get 4xx JSON errors (and 1,000 of them leave the service answering), bearer auth, s3 URIs from
allowed buckets only, autoscaling up under load and down after; hostile clients (slow uploads, disconnects, huge
PNGs, path tricks in s3 keys) are bounded. One Serve app for the module, shut down at its end.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO, free_port
from georeasoner.core.config import ConfigError
from georeasoner.serve.settings import load_serve_config, parse_settings, resolve_models
from samples import bad_files, bomb_png, cut_jpeg, good_files, large_png

pytestmark = pytest.mark.timeout(600)

TOKEN = "test-token-" + uuid.uuid4().hex[:8]
TOKEN_ENV = "GEOREASONER_TEST_SERVE_TOKEN"
MAX_BYTES = 256 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = good_files()
JPEG = GOOD["rgb.jpg"]
APP = "georeasoner-test"
SHARED = "shared-bucket/street/"  # an allow-list entry with a prefix (no such bucket: refused before any read)
MAX_PIXELS = 20_000_000  # the service's max_pixels (below Pillow's 89,478,485)
BODY_TIMEOUT_S, SLOW_BODY_S, MAX_SLOW = 5.0, 1.5, 2
ISO2 = re.compile(r"^[A-Z]{2}$")


def check_answer(answer: dict) -> None:
    """The answer schema (docs/conventions.md › Answers), plus the service's fields."""
    for key in ("country", "city", "lat", "lon", "reasons", "confidence", "locatability", "model_version",
                "scorer_version"):
        assert key in answer, key
    assert answer["country"] is None or ISO2.match(answer["country"]), answer["country"]
    assert answer["city"] is None or isinstance(answer["city"], str)
    assert (answer["lat"] is None) == (answer["lon"] is None)
    if answer["lat"] is not None:
        assert -90 <= answer["lat"] <= 90 and -180 <= answer["lon"] <= 180
    assert isinstance(answer["reasons"], str)
    assert 0.0 <= answer["confidence"] <= 1.0
    assert 0.0 <= answer["locatability"] <= 1.0
    assert answer["model_version"] and answer["scorer_version"]


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 160, 60)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat_body(url: str, model: str = "georeasoner", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Where was this photo taken?"},
        {"type": "image_url", "image_url": {"url": url}}]}], **extra}


# -- the service -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_buckets(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    allowed, other = f"serve-ok-{uuid.uuid4().hex[:8]}", f"serve-no-{uuid.uuid4().hex[:8]}"
    for name in (allowed, other):
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="street/photo 1.jpg", Body=JPEG)
    client.put_object(Bucket=allowed, Key="street/truncated.jpg", Body=JPEG[: len(JPEG) // 2])
    client.put_object(Bucket=allowed, Key="street/big.bin", Body=b"\xff" * (MAX_BYTES + 10))
    return allowed, other


@pytest.fixture(scope="module")
def service(ray_session, vlm_package, student_package, s3_buckets, gallery):
    """The app on a free loopback port (autoscaling 1..2 geolocator replicas, short delays); its base URL."""
    from ray import serve

    from georeasoner.serve.app import make_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "model": vlm_package, "scorer": student_package, "model_name": "georeasoner", "device": "cpu",
        "max_new_tokens": 16, "torch_threads": 1, "max_bytes": MAX_BYTES, "allowed_buckets": [s3_buckets[0], SHARED],
        "auth_token_env": TOKEN_ENV, "auth_required": True, "max_pixels": MAX_PIXELS,
        "body_timeout_s": BODY_TIMEOUT_S, "slow_body_s": SLOW_BODY_S, "max_slow_bodies": MAX_SLOW,
        "geolocator": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        "neighbours": {"index": gallery[0], "k": 3},  # retrieval-augmented prompts: one gallery per replica
    }
    options = {
        # the token reaches the ingress replica through its environment, as a Secret would on Kubernetes (a file
        # read into a variable keeps its trailing newline: the service strips it)
        "Ingress": {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {TOKEN_ENV: TOKEN + "\n"}}}},
        "Geolocator": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5},
                       "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                              "upscale_delay_s": 1, "downscale_delay_s": 3,
                                              "look_back_period_s": 2, "metrics_interval_s": 0.5}},
        "Scorer": {"ray_actor_options": {"num_cpus": 0.2}},
    }
    start = time.monotonic()
    serve.run(make_app(settings, options), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    print(f"serve app up in {time.monotonic() - start:.1f}s at {url}")
    try:
        yield url
    finally:
        serve.shutdown()


def _replicas(state: str | None = None) -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["Geolocator"].replica_states
    return sum(n for s, n in states.items() if state is None or str(getattr(s, "value", s)) == state)


# -- valid requests ----------------------------------------------------------------------------------

def test_geolocate_raw_multipart_json(service):
    answers = []
    r = requests.post(f"{service}/geolocate", data=JPEG, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    answers.append(r.json())
    r = requests.post(f"{service}/geolocate", files={"image": ("street.png", GOOD["rgba.png"], "image/png")},
                      headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    answers.append(r.json())
    r = requests.post(f"{service}/geolocate", json={"image": base64.b64encode(GOOD["photo.webp"]).decode()},
                      headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    answers.append(r.json())
    r = requests.post(f"{service}/geolocate", json={"image": data_url(GOOD["cmyk.jpg"])}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    answers.append(r.json())
    for answer in answers:
        check_answer(answer)
    assert "raw_text" in answers[0]


def test_every_good_format(service):
    """Each format/mode the decoder accepts is answered (16-bit PNG, EXIF-rotated, GIF, TIFF, ...), and odd sizes."""
    images = {**GOOD, "1x1.png": _png(1, 1), "1x150.png": _png(1, 150), "3000x40.png": _png(3000, 40)}
    with ThreadPoolExecutor(len(images)) as pool:
        rs = list(pool.map(lambda d: requests.post(f"{service}/geolocate", data=d, timeout=120,
                                                   headers={**AUTH, "Content-Type": "application/octet-stream"}),
                           images.values()))
    for name, r in zip(images, rs):
        assert r.status_code == 200, (name, r.text)
        check_answer(r.json())


def test_healthz_and_models(service, vlm_package, gallery):
    r = requests.get(f"{service}/healthz", timeout=30)  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = requests.get(f"{service}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    card = json.loads((Path(vlm_package) / "model_card.json").read_text())
    assert data[0]["id"] == "georeasoner" and data[0]["model_version"] == card["version"]
    assert data[0]["adapters"] == [] and data[0]["scorer_version"].startswith("student-untrained")
    assert data[0]["index_version"] == json.loads((Path(gallery[0]) / "_index_card.json").read_text())["version"]
    assert data[0]["retrieval"] == {"k": 3, "far": 0, "fusion": True, "vote_k": 16, "vote_weight": 1.0}


def test_s3_uri_allowed_and_refused(service, s3_buckets):
    allowed, other = s3_buckets
    r = requests.post(f"{service}/geolocate", json={"image_uri": f"s3://{allowed}/street/photo 1.jpg"}, headers=AUTH,
                      timeout=120)
    assert r.status_code == 200, r.text
    check_answer(r.json())
    r = requests.post(f"{service}/geolocate", json={"image_uri": f"s3://{other}/street/photo 1.jpg"}, headers=AUTH,
                      timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "bucket_not_allowed", r.text
    r = requests.post(f"{service}/v1/chat/completions", json=chat_body(f"s3://{allowed}/street/photo 1.jpg"),
                      headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    expected = {f"s3://{allowed}/street/missing.jpg": (404, "object_not_found"),
                f"s3://{allowed}/street/truncated.jpg": (422, "truncated"),
                f"s3://{allowed}/street/big.bin": (413, "payload_too_large"),
                f"s3://{allowed}": (400, "invalid_uri"),
                "/etc/passwd": (400, "unsupported_url"),
                "https://images.invalid/a.jpg": (400, "unsupported_url")}
    for uri, (status, code) in expected.items():
        r = requests.post(f"{service}/geolocate", json={"image_uri": uri}, headers=AUTH, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (uri, r.text)


def test_openai_client(service):
    import openai

    client = openai.OpenAI(base_url=f"{service}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["georeasoner"]
    messages = chat_body(data_url(JPEG))["messages"]
    resp = client.chat.completions.create(model="georeasoner", messages=messages)
    assert resp.choices[0].finish_reason == "stop"
    answer = json.loads(resp.choices[0].message.content)
    check_answer({**answer, "model_version": "-", "scorer_version": "-"})
    check_answer(resp.model_extra["georeasoner"])
    # stream: true streams server-sent events
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="georeasoner", messages=messages, stream=True) if c.choices]
    assert len(pieces) > 2 and json.loads("".join(pieces)) == answer
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{service}/v1", api_key="wrong", max_retries=0).models.list()


# -- bad requests ------------------------------------------------------------------------------------

def bad_requests(service: str, allowed_bucket: str) -> dict[str, tuple[dict, int, str]]:
    """Name -> (requests.request kwargs, expected status, expected error code)."""
    bad = bad_files()
    geo, chat = f"{service}/geolocate", f"{service}/v1/chat/completions"
    img = {**AUTH, "Content-Type": "image/jpeg"}
    js = {**AUTH, "Content-Type": "application/json"}
    return {
        "non-image bytes": (dict(method="POST", url=geo, data=bad["not_image.jpg"][0], headers=img), 422, "not_an_image"),
        "truncated jpeg": (dict(method="POST", url=geo, data=bad["truncated.jpg"][0], headers=img), 422, "truncated"),
        "jpeg cut in its header": (dict(method="POST", url=geo, data=cut_jpeg(300), headers=img), 422, "truncated"),
        "decompression bomb": (dict(method="POST", url=geo, data=bomb_png(), headers=img), 422, "too_many_pixels"),
        "image 1x300 (aspect ratio)": (dict(method="POST", url=geo, data=_png(1, 300), headers=img), 422,
                                       "unsupported_image"),
        "empty body": (dict(method="POST", url=geo, data=b"", headers=img), 400, "empty"),
        "payload over the limit": (dict(method="POST", url=geo, data=b"\xff" * (MAX_BYTES + 1), headers=img), 413,
                                   "payload_too_large"),
        "chunked payload over the limit": (dict(method="POST", url=geo, headers=img,
                                                data=(b"\xff" * 65536 for _ in range(MAX_BYTES // 65536 + 2))),
                                           413, "payload_too_large"),
        "malformed json": (dict(method="POST", url=geo, data=b'{"image": "abc', headers=js), 400, "invalid_json"),
        "json not an object": (dict(method="POST", url=geo, data=b'["image"]', headers=js), 400, "invalid_request"),
        "missing field": (dict(method="POST", url=geo, json={"picture": "x"}, headers=AUTH), 400, "missing_field"),
        "bad base64": (dict(method="POST", url=geo, json={"image": "not*base64!"}, headers=AUTH), 400,
                       "invalid_base64"),
        "base64 of non-image": (dict(method="POST", url=geo, json={"image": base64.b64encode(b"hello").decode()},
                                     headers=AUTH), 422, "not_an_image"),
        "data url of text": (dict(method="POST", url=geo, json={"image": "data:text/plain;base64,aGk="}, headers=AUTH),
                             415, "unsupported_media_type"),
        "unsupported content type": (dict(method="POST", url=geo, data=b"hello", headers={**AUTH, "Content-Type":
                                                                                          "text/plain"}),
                                     415, "unsupported_media_type"),
        "multipart without image": (dict(method="POST", url=geo, files={"note": (None, "hi")}, headers=AUTH), 400,
                                    "missing_field"),
        "disallowed bucket": (dict(method="POST", url=geo, json={"image_uri": "s3://someone-else/x.jpg"}, headers=AUTH),
                              403, "bucket_not_allowed"),
        "no token": (dict(method="POST", url=geo, data=JPEG, headers={"Content-Type": "image/jpeg"}), 401,
                     "unauthorized"),
        "wrong token": (dict(method="GET", url=f"{service}/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                        "unauthorized"),
        "unknown model": (dict(method="POST", url=chat, json=chat_body(data_url(JPEG), model="gpt-9"), headers=AUTH),
                          404, "model_not_found"),
        "chat without image": (dict(method="POST", url=chat, headers=AUTH, json={
            "model": "georeasoner", "messages": [{"role": "user", "content": "where is this?"}]}), 400, "missing_field"),
        "chat missing messages": (dict(method="POST", url=chat, json={"model": "georeasoner"}, headers=AUTH), 400,
                                  "missing_field"),
        "chat remote image url": (dict(method="POST", url=chat, json=chat_body("https://images.invalid/a.jpg"),
                                       headers=AUTH), 400, "unsupported_url"),
        "chat truncated image": (dict(method="POST", url=chat, json=chat_body(data_url(bad["truncated.jpg"][0])),
                                      headers=AUTH), 422, "truncated"),
        "chat stream not a bool": (dict(method="POST", url=chat, json=chat_body(data_url(JPEG), stream="yes"),
                                        headers=AUTH), 400, "invalid_field"),
        "chat bucket not allowed": (dict(method="POST", url=chat, json=chat_body("s3://someone-else/x.jpg"),
                                         headers=AUTH), 403, "bucket_not_allowed"),
        "unknown path": (dict(method="GET", url=f"{service}/v2/nothing", headers=AUTH), 404, "not_found"),
        "wrong method": (dict(method="GET", url=geo, headers=AUTH), 405, "method_not_allowed"),
    }


def test_bad_requests_get_4xx_json(service, s3_buckets):
    cases = bad_requests(service, s3_buckets[0])
    assert len(cases) >= 8
    for name, (kwargs, status, code) in cases.items():
        r = requests.request(timeout=60, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == code and len(err["message"]) > 5, (name, err)
        if status == 401:
            assert r.headers.get("www-authenticate", "").startswith("Bearer")


def test_thousand_bad_requests_then_good(service, s3_buckets):
    cases = [c for name, c in bad_requests(service, s3_buckets[0]).items() if not name.startswith("chunked")]
    local = __import__("threading").local()

    def send(i: int) -> tuple[int, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        kwargs, status, _ = cases[i % len(cases)]
        r = local.session.request(timeout=60, **kwargs)
        r.json()["error"]["message"]  # noqa: B018 - a JSON error every time
        return r.status_code, status

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(1000)))
    took = time.monotonic() - start
    wrong = [(got, want) for got, want in results if got != want]
    assert not wrong, wrong[:10]
    assert all(400 <= got < 500 for got, _ in results)
    print(f"1000 bad requests in {took:.1f}s ({1000 / took:.0f} req/s)")
    r = requests.post(f"{service}/geolocate", data=JPEG, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    check_answer(r.json())


# -- hostile clients ---------------------------------------------------------------------------------

def _port(service: str) -> int:
    return int(service.rsplit(":", 1)[1])


def test_slow_uploads_get_408_and_leave_room(service):
    """70 clients trickling a byte every 0.5 s (more than the ingress's 64 request slots): a normal request and
    /healthz beside them answer, and every slow one ends with 408 (past slow_body_s beyond max_slow_bodies, or at
    body_timeout_s)."""
    from hostile import slow_uploads, upload_header

    beside = {}

    def normal():
        time.sleep(0.5)
        start = time.monotonic()
        r = requests.post(f"{service}/geolocate", data=JPEG, headers={**AUTH, "Content-Type": "image/jpeg"},
                          timeout=30)
        beside["geolocate"] = (r.status_code, time.monotonic() - start)
        start = time.monotonic()
        beside["healthz"] = (requests.get(f"{service}/healthz", timeout=30).status_code, time.monotonic() - start)

    helper = __import__("threading").Thread(target=normal, daemon=True)
    helper.start()
    ended = slow_uploads(_port(service), 70, bound_s=BODY_TIMEOUT_S + 20, every_s=0.5, headers=AUTH)
    helper.join(timeout=60)
    assert beside["geolocate"][0] == 200 and beside["geolocate"][1] < 10, beside
    assert beside["healthz"][0] == 200 and beside["healthz"][1] < 10, beside
    statuses = [status for status, _ in ended.values()]
    assert len(ended) == 70 and set(statuses) == {"408"}, sorted(set(statuses))
    # all but max_slow_bodies were cut as they turned slow (slow_body_s), not at the deadline (body_timeout_s)
    early = sum(t < BODY_TIMEOUT_S - 1 for _, t in ended.values())
    assert early >= 70 - MAX_SLOW - 2, sorted(round(t, 1) for _, t in ended.values())
    # one body that stops: 408 at body_timeout_s, a JSON error naming the deadline
    with socket.create_connection(("127.0.0.1", _port(service)), timeout=BODY_TIMEOUT_S + 10) as sock:
        start = time.monotonic()
        sock.sendall(upload_header(_port(service), 1000, AUTH) + b"\xff" * 10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer[:500]
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 5, took


def test_disconnect_mid_upload_is_one_info_line(service):
    from hostile import cut_uploads, ended, ingress_log, log_since

    log = ingress_log(APP)
    mark = log.stat().st_size
    cut_uploads(_port(service), 5, headers=AUTH)
    text = log_since(log, mark, lambda t: ended(t) >= 5, timeout_s=6)  # Serve's access line for each
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]
    assert not re.search(r"^ERROR", text, re.M), text[-3000:]
    assert "client went away on POST /geolocate" in text, text[-3000:]


def test_huge_pngs_from_small_files(service):
    """16-bit and RGB PNGs of tens of KB that decode to ~20 MP: answered under max_pixels (the ingress's memory
    stays bounded, 4 at once), 422 above it (from the header, before decoding)."""
    from hostile import RssPeak, ingress_process

    grey16, rgb8 = large_png(4400, 4400, 16), large_png(4400, 4400, 8, colour=True)
    over, pillow_cap = large_png(4600, 4400, 16), large_png(9400, 9400, 16)
    assert max(map(len, (grey16, rgb8, over, pillow_cap))) < MAX_BYTES

    def send(data: bytes):
        return requests.post(f"{service}/geolocate", data=data, headers={**AUTH, "Content-Type": "image/png"},
                             timeout=120)

    with RssPeak(ingress_process(APP)) as rss, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [grey16, rgb8, grey16, rgb8]))
    for r in answers:
        assert r.status_code == 200, r.text
        check_answer(r.json())
    # before: ~0.6 GB of float64 copies per 16-bit image (2.3 GB at 9400x9400); now the decoded image and a band
    assert rss.growth < 400 * 2**20, f"ingress RSS grew {rss.growth / 2**20:.0f} MiB"
    for data in (over, pillow_cap):
        r = send(data)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_pixels", r.text
        assert str(MAX_PIXELS) in r.json()["error"]["message"], r.text


def test_s3_keys_with_dot_segments_are_400(service, s3_buckets):
    allowed = s3_buckets[0]
    bucket, prefix = SHARED.split("/", 1)
    keys = [f"s3://{allowed}/street/../street/photo 1.jpg", f"s3://{bucket}/{prefix}../../private/k.jpg",
            f"s3://{bucket}/{prefix}%2e%2e/%2E%2E/private/k.jpg", f"s3://{bucket}/{prefix}a/%252e%252e/k.jpg",
            f"s3://{bucket}/{prefix}/k.jpg", f"s3://{bucket}/{prefix}./k.jpg", f"s3://{allowed}/street\\..\\x.jpg",
            f"s3://{allowed}//street/photo 1.jpg", f"s3://{allowed}/street/photo\x00.jpg"]
    for uri in keys:
        r = requests.post(f"{service}/geolocate", json={"image_uri": uri}, headers=AUTH, timeout=30)
        err = r.json()["error"]
        assert (r.status_code, err["code"], err["param"]) == (400, "invalid_uri", "image_uri"), (uri, r.text)
        assert "image_uri" in err["message"] and "key" in err["message"], err
    r = requests.post(f"{service}/v1/chat/completions", json=chat_body(keys[1]), headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[].content[].image_url.url", r.text
    # refused buckets and prefixes: the 403 names the refused bucket only, never the allow-list
    for uri in (f"s3://{bucket}/private/k.jpg", f"s3://{s3_buckets[1]}/street/photo 1.jpg"):
        r = requests.post(f"{service}/geolocate", json={"image_uri": uri}, headers=AUTH, timeout=30)
        message = r.json()["error"]["message"]
        assert r.status_code == 403 and uri.split("/")[2] in message, r.text
        assert allowed not in message and prefix not in message, message


def test_413_states_the_size(service):
    r = requests.post(f"{service}/geolocate", data=b"\xff" * MAX_BYTES, headers={**AUTH, "Content-Type": "image/jpeg"},
                      timeout=30)
    assert r.status_code == 422, r.text  # exactly the limit is read (and is not an image)
    big = b"\xff" * (MAX_BYTES + 1)
    r = requests.post(f"{service}/geolocate", data=big, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=30)
    assert r.status_code == 413
    assert f"is {MAX_BYTES + 1} bytes; the limit is {MAX_BYTES} bytes" in r.json()["error"]["message"], r.text
    r = requests.post(f"{service}/geolocate", headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=30,
                      data=(big[i:i + 65536] for i in range(0, len(big), 65536)))
    assert r.status_code == 413 and f"is over {MAX_BYTES} bytes" in r.json()["error"]["message"], r.text


def test_package_keys_outside_the_cache_are_refused(s3_server, bucket, tmp_path, monkeypatch):
    """An s3:// package or checkpoint holding a key with '..' (or a leading '/' after its prefix) would be copied
    outside the local cache: refused before anything is written."""
    import boto3

    from georeasoner.core import packages
    from georeasoner.vlm.model import local_checkpoint

    monkeypatch.setenv("GEOREASONER_CACHE", str(tmp_path / "cache" / "nested"))
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="vlm/model_card.json", Body=b'{"version": "v1"}')
    client.put_object(Bucket=bucket, Key="vlm/../../escaped.txt", Body=b"outside")
    client.put_object(Bucket=bucket, Key="ckpt/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="ckpt//abs.txt", Body=b"outside")
    with pytest.raises(ValueError, match=r"'s3://.*/vlm' holds the key '../../escaped.txt'.*'\.\.' segment"):
        packages.local_copy(f"s3://{bucket}/vlm")
    with pytest.raises(ValueError, match=r"holds the key '/abs.txt': it starts with '/'"):
        local_checkpoint(f"s3://{bucket}/ckpt")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# -- autoscaling (last: it changes the replica count) ------------------------------------------------

def test_autoscaling_rises_under_load_and_falls_after(service):
    import threading

    settle = time.monotonic()  # earlier tests' traffic may have scaled it up: wait for the floor
    while _replicas() > 1 and time.monotonic() - settle < 60:
        time.sleep(0.5)
    assert _replicas() == 1
    stop = threading.Event()
    answered = []

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{service}/geolocate", data=JPEG, headers={**AUTH, "Content-Type": "image/jpeg"},
                           timeout=120)
                answered.append(r.status_code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    peak_running, peak_total = 1, 1
    try:  # bounded load: until a second replica runs, at most 75 s
        while time.monotonic() - start < 75 and peak_running < 2:
            time.sleep(0.5)
            peak_running = max(peak_running, _replicas("RUNNING"))
            peak_total = max(peak_total, _replicas())
        time.sleep(2)  # the new replica takes requests
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    rose_after = time.monotonic() - start
    assert peak_running == 2, f"replicas never rose: peak running {peak_running}, total {peak_total}"
    assert answered and all(code == 200 for code in answered), set(answered)
    fall_start = time.monotonic()
    while time.monotonic() - fall_start < 60 and _replicas() > 1:
        time.sleep(0.5)
    print(f"autoscaling: 2 replicas running {rose_after:.0f}s into the load ({len(answered)} answers); back to "
          f"{_replicas()} replica {time.monotonic() - fall_start:.0f}s after it")
    assert _replicas() == 1
    r = requests.post(f"{service}/geolocate", data=JPEG, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200


# -- configs and build-time validation (no Serve needed) ----------------------------------------------

@pytest.mark.parametrize("variant", ["local", "cluster"])
def test_serve_configs_are_valid(variant):
    path = REPO / "configs" / "serve" / f"{variant}.yaml"
    data = load_serve_config(path)  # Ray Serve's schema + the app args
    app = data["applications"][0]
    assert app["import_path"] == "georeasoner.serve.app:build_app"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"Ingress", "Geolocator", "Scorer"}
    args = parse_settings(app["args"])
    assert deps["Geolocator"]["max_ongoing_requests"] >= args.geolocator.max_batch_size
    assert deps["Scorer"]["max_ongoing_requests"] >= args.scorer_batch.max_batch_size
    auto = deps["Geolocator"]["autoscaling_config"]
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
    if variant == "local":
        assert data["http_options"]["host"] == "127.0.0.1"
        assert auto["upscale_delay_s"] <= 5 and auto["downscale_delay_s"] <= 10
        assert all(d["ray_actor_options"]["num_cpus"] < 1 for d in deps.values())
        assert args.model == "outputs/local/vlm" and args.scorer == "outputs/local/student"
    else:
        assert deps["Geolocator"]["ray_actor_options"]["num_gpus"] == 1 and auto["max_replicas"] == 8
        assert args.model.startswith("s3://") and args.auth_required


def test_build_time_validation(tmp_path, student_package):
    with pytest.raises(ConfigError, match="unknown key 'max_byte'"):
        parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "max_byte": 5})
    with pytest.raises(ConfigError, match="max_bytes"):
        parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "max_bytes": "lots"})
    with pytest.raises(ConfigError, match="missing required key 'scorer'"):
        parse_settings({"model": "tiny:qwen2-vl"})
    missing = str(tmp_path / "no-vlm")
    with pytest.raises(ConfigError, match="jobs/finetune.py"):
        resolve_models(parse_settings({"model": missing, "scorer": student_package}))
    s = resolve_models(parse_settings({"model": missing, "fallback_model": "tiny:qwen2-vl", "scorer": student_package}))
    assert s.model == "tiny:qwen2-vl" and s.fallback_used
    with pytest.raises(ConfigError, match="jobs/train_locatability.py"):
        resolve_models(parse_settings({"model": "tiny:qwen2-vl", "scorer": str(tmp_path / "no-student")}))
    no_index = {"index": str(tmp_path / "no-index"), "k": 5}
    with pytest.raises(ConfigError, match=r"index '.*no-index' does not exist.*args.neighbours.index"):
        resolve_models(parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "neighbours": no_index}))
    s = resolve_models(parse_settings({"model": missing, "fallback_model": "tiny:qwen2-vl", "scorer": None,
                                       "neighbours": no_index}))
    assert s.fallback_used and s.neighbours.index is None  # the local fallback answers without neighbours
    from georeasoner.serve.app import make_app

    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        make_app({"model": "tiny:qwen2-vl", "scorer": None}, {"Geolocator": {"max_ongoing_requests": 4}})
    with pytest.raises(ConfigError, match=r"max_slow_bodies \(64\) must be below .*Ingress.max_ongoing_requests"):
        make_app({"model": "tiny:qwen2-vl", "scorer": None, "max_slow_bodies": 64})
    with pytest.raises(ConfigError, match="slow_body_s"):
        parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "slow_body_s": 40, "body_timeout_s": 30})
    with pytest.raises(ConfigError, match="max_pixels"):
        parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "max_pixels": 100_000_000})
    with pytest.raises(ConfigError, match="max_concurrent_decodes"):
        parse_settings({"model": "tiny:qwen2-vl", "scorer": None, "max_concurrent_decodes": 0})
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "georeasoner.serve.app:build_app",
                                                     "args": {"model": "tiny:qwen2-vl", "scorer": None,
                                                              "allowed_buckets": ["*"]}}]}))
    with pytest.raises(ConfigError, match="allowed_buckets"):
        load_serve_config(cfg)
