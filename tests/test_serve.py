"""``imgtune serve``'s API on 127.0.0.1: every endpoint, the API key, the limits, dynamic batching, and
served probabilities equal to ``imgtune predict``'s."""

from __future__ import annotations

import base64
import io
import json
import time
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from imgtune.cli import main
from imgtune.ort_predict import open_predictor
from imgtune.serve.limits import Limits
from imgtune.serve.service import ServeOptions, Service
from serving import finish_slow_request, open_slow_request, png_bytes, served, tiny_run  # noqa: F401

KEY = "k" * 24
LIMITS = Limits(max_upload_bytes=1 << 20, max_pixels=1_000_000, decode_timeout_s=10, max_images=8,
                max_concurrency=12)


@pytest.fixture(scope="module")
def server(tiny_run):
    run, _ = tiny_run
    service = Service(open_predictor(run, "torch", "cpu"), ServeOptions(max_batch=4, max_wait_ms=30, limits=LIMITS,
                                                                        decode_threads=2))
    with served(service) as base:
        yield base, service


@pytest.fixture(scope="module")
def keyed(tiny_run):
    run, _ = tiny_run
    with served(Service(open_predictor(run, "torch", "cpu"), ServeOptions(api_key=KEY, limits=LIMITS))) as base:
        yield base


def val_images(data, count: int = 8) -> list:
    return sorted((data / "val").glob("*/*.png"))[:count]


def post_files(base: str, files: list[tuple[str, bytes]], params: str = "", **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/predict{params}", files=[("file", f) for f in files], timeout=30, **kwargs)


def served_probs(result: dict) -> dict[str, float]:
    return {item["label"]: item["prob"] for item in result["top"]}


@pytest.mark.parametrize("calibrated", [False, True])
def test_served_probabilities_equal_imgtune_predict(server, tiny_run, capsys, calibrated):
    base, service = server
    run, data = tiny_run
    paths = val_images(data)
    flag = ["--calibrated"] if calibrated else []
    assert main(["-q", "predict", str(run), *map(str, paths), "--format", "json", "--engine", "torch", *flag]) == 0
    expected = json.loads(capsys.readouterr().out)
    query = f"?top_k=3&calibrated={'true' if calibrated else 'false'}"

    def one(path):  # each image its own request, concurrently: batches of mixed composition
        answer = post_files(base, [(path.name, path.read_bytes())], query).json()
        assert "results" in answer, answer
        return answer["results"][0]

    with ThreadPoolExecutor(6) as pool:
        singles = list(pool.map(one, paths))
    together = post_files(base, [(p.name, p.read_bytes()) for p in paths], query).json()["results"]
    for want, single, joint in zip(expected, singles, together):
        for got in (single, joint):
            assert got["label"] == want["label"]
            probs, reference = served_probs(got), {t["label"]: t["prob"] for t in want["top"]}
            assert probs.keys() == reference.keys()
            assert max(abs(probs[k] - reference[k]) for k in probs) < 1e-5


def test_dynamic_batching_gathers_concurrent_requests(server, tiny_run):
    base, service = server
    paths = val_images(tiny_run[1], 8)
    before = _batches(base)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: post_files(base, [(p.name, p.read_bytes())]), paths))
    count, images = (after - was for after, was in zip(_batches(base), before))
    assert images == 8 and count < 8  # some batch held more than one request's image
    assert max(service.options.max_batch, 1) >= images / count


def _batches(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    count = float(re.search(r"^imgtune_batch_size_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^imgtune_batch_size_sum (\S+)", text, re.M).group(1))
    return count, total


def test_json_base64_answers_as_multipart_and_errors_stay_per_image(server, tiny_run):
    base, _ = server
    path = val_images(tiny_run[1], 1)[0]
    encoded = base64.b64encode(path.read_bytes()).decode()
    answer = httpx.post(f"{base}/predict", json={"images": [encoded, "%%%not base64", ""]}).json()["results"]
    multipart = post_files(base, [(path.name, path.read_bytes())]).json()["results"][0]
    assert answer[0]["label"] == multipart["label"] and abs(answer[0]["prob"] - multipart["prob"]) < 1e-6
    assert answer[1]["error"]["kind"] == "bad-encoding" and answer[2]["error"]["kind"] == "empty"
    mixed = post_files(base, [("a.png", path.read_bytes()), ("b.jpg", b"not an image"),
                              ("c.png", path.read_bytes()[:200])]).json()["results"]
    assert [r["index"] for r in mixed] == [0, 1, 2] and "label" in mixed[0]
    assert mixed[1]["error"]["kind"] == "not-an-image" and mixed[2]["error"]["kind"] in ("truncated", "corrupt")


@pytest.mark.parametrize("send, status, kind", [
    (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported-content-type"),
    (dict(content=b"", headers={"Content-Type": "application/json"}), 400, "empty-body"),
    (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "bad-json"),
    (dict(json={"pictures": []}), 400, "bad-json"),
    (dict(json={"images": []}), 400, "no-image"),
    (dict(content=b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n",
          headers={"Content-Type": "multipart/form-data; boundary=x"}), 400, "bad-multipart"),
    (dict(content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400, "no-image"),
    (dict(content=b"x", headers={"Content-Type": "multipart/form-data"}), 400, "bad-multipart"),
    (dict(files=[("other", ("a.png", b"x"))]), 400, "no-image"),
    (dict(files=[("file", ("a.png", b"x"))] * 9), 413, "too-many-images"),
    (dict(json={"images": ["AAAA"] * 9}), 413, "too-many-images"),
    (dict(files=[("file", ("a.png", b"\0" * (1 << 20)))]), 413, "too-large"),
    (dict(content=iter([b" " * 600_000] * 2), headers={"Content-Type": "application/json"}), 413, "too-large"),
    (dict(files=[("file", ("a.png", b"not an image"))]), 422, "no-readable-image"),
])
def test_bad_requests_get_a_4xx_json_error_with_a_reason(server, send, status, kind):
    base, _ = server
    response = httpx.post(f"{base}/predict", timeout=30, **send)
    assert response.status_code == status, response.text
    assert response.json()["error"]["kind"] == kind and response.json()["error"]["message"]


def test_too_many_pixels_are_refused_from_the_header(server):
    base, _ = server
    for side in (1100, 2000):  # over the limit, and over twice it (where Pillow itself refuses)
        bomb = png_bytes(Image.new("L", (side, side)), optimize=True)  # zeros: a few KB
        result = post_files(base, [("bomb.png", bomb)]).json()["results"][0]
        assert result["error"]["kind"] == "too-many-pixels" and "pixels" in result["error"]["message"]
    assert Image.MAX_IMAGE_PIXELS > LIMITS.max_pixels  # the server's limit is its own, not Pillow's global


def test_decode_timeout_and_a_run_without_calibration(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("checkpoints", "calibration.json"))
    limits = Limits(decode_timeout_s=0.001)
    predictor = open_predictor(run, "torch", "cpu")
    load_one = predictor.load_one
    predictor.load_one = lambda ref: time.sleep(0.05) or load_one(ref)  # every decode over the 1 ms limit
    # the server still gets ready: its warm-up decodes its own image, not held to --decode-timeout
    with served(Service(predictor, ServeOptions(limits=limits))) as base:
        slow = png_bytes(Image.effect_noise((2000, 2000), 64))  # noise: a few ms to decode, far over 1 ms
        assert post_files(base, [("noise.png", slow)]).json()["results"][0]["error"]["kind"] == "decode-timeout"
        refused = post_files(base, [("noise.png", slow)], "?calibrated=true")
        assert refused.status_code == 400 and refused.json()["error"]["kind"] == "no-calibration"


def test_query_parameters_are_checked(server, tiny_run):
    base, _ = server
    path = val_images(tiny_run[1], 1)[0]
    assert post_files(base, [("a.png", path.read_bytes())], "?top_k=0").status_code == 422
    top = post_files(base, [("a.png", path.read_bytes())], "?top_k=2").json()["results"][0]["top"]
    assert len(top) == 2


def test_concurrency_limit_answers_503_with_retry_after(server):
    base, _ = server
    held = [open_slow_request(base) for _ in range(LIMITS.max_concurrency)]
    try:
        time.sleep(0.3)  # the held requests are in flight
        refused = httpx.get(f"{base}/metadata")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["kind"] == "busy"
        assert httpx.get(f"{base}/healthz").status_code == 200  # never refused
    finally:
        statuses = [finish_slow_request(conn, b'{"images": []}') for conn in held]
    assert statuses == [400] * LIMITS.max_concurrency
    assert httpx.get(f"{base}/metadata").status_code == 200


def test_endpoints_describe_the_model(server, tiny_run):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
    meta = httpx.get(f"{base}/metadata").json()
    assert meta["classes"] == ["blue_triangle", "green_square", "red_circle"]
    assert meta["preprocessing"]["img_size"] == 32 and meta["metrics"]["val"]["ci95"]["accuracy"]
    assert meta["trained_on"]["images"]["train"] == 24 and meta["limits"]["max_images"] == 8
    assert "| val | 9 | 1.0000 (1.000-1.000)" in meta["model_card"]  # metrics with their intervals
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("imgtune_requests_total{", "imgtune_errors_total{", "imgtune_request_duration_seconds_bucket{",
                 "imgtune_batch_size_bucket{", "imgtune_ready 1.0"):
        assert name in metrics.text
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "Trained on 24 images of 3 classes" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from elsewhere
    assert httpx.get(f"{base}/openapi.json").json()["paths"].keys() >= {"/predict", "/explain", "/metrics"}
    assert httpx.get(f"{base}/nowhere").json()["error"]["kind"] == "not-found"


def test_explain_returns_the_overlay_of_the_default_method(server, tiny_run):
    base, _ = server
    path = val_images(tiny_run[1], 1)[0]
    predicted = post_files(base, [("a.png", path.read_bytes())]).json()["results"][0]
    response = httpx.post(f"{base}/explain", files={"file": ("a.png", path.read_bytes())}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-imgtune-method"] == "gradcam"
    assert response.headers["x-imgtune-explained"] == predicted["label"]
    assert abs(float(response.headers["x-imgtune-predicted-prob"]) - predicted["prob"]) < 1e-4
    with Image.open(io.BytesIO(response.content)) as overlay:
        assert overlay.size == Image.open(path).size
    other = httpx.post(f"{base}/explain?class=green_square&method=gradcam%2B%2B",
                       files={"file": ("a.png", path.read_bytes())}, timeout=60)
    assert other.headers["x-imgtune-explained"] == "green_square" and other.headers["x-imgtune-method"] == "gradcam++"


@pytest.mark.parametrize("query, files, status, kind", [
    ("?method=scorecam", 1, 400, "bad-method"),
    ("?class=zebra", 1, 400, "unknown-class"),
    ("", 2, 400, "one-image"),
    ("", 0, 422, "not-an-image"),
])
def test_explain_refuses_what_it_cannot_do(server, tiny_run, query, files, status, kind):
    base, _ = server
    path = val_images(tiny_run[1], 1)[0]
    sent = [("file", ("a.png", path.read_bytes()))] * files or [("file", ("a.png", b"plain text"))]
    response = httpx.post(f"{base}/explain{query}", files=sent, timeout=60)
    assert response.status_code == status and response.json()["error"]["kind"] == kind


def test_api_key_is_needed_everywhere_but_healthz(keyed, tiny_run):
    path = val_images(tiny_run[1], 1)[0]
    assert httpx.get(f"{keyed}/healthz").status_code == 200
    for method, endpoint in (("GET", "/"), ("GET", "/readyz"), ("GET", "/metadata"), ("GET", "/metrics"),
                             ("GET", "/docs"), ("POST", "/predict"), ("POST", "/explain")):
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {KEY}x"}):
            response = httpx.request(method, f"{keyed}{endpoint}", headers=headers)
            assert response.status_code == 401, (endpoint, headers)
            assert response.json()["error"]["kind"] == "unauthorized"
    files = [("file", ("a.png", path.read_bytes()))]
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(f"{keyed}/predict", files=files, headers=headers).status_code == 200
    assert httpx.get(f"{keyed}/", auth=("anyone", KEY)).status_code == 200  # a browser's Basic prompt


def test_cli_refuses_an_open_address_without_a_key_and_bad_runs(tiny_run, tmp_path, monkeypatch):
    run, _ = tiny_run
    assert main(["serve", str(run), "--host", "0.0.0.0"]) == 2
    monkeypatch.delenv("IMGTUNE_NO_SUCH_KEY", raising=False)
    assert main(["serve", str(run), "--api-key-env", "IMGTUNE_NO_SUCH_KEY"]) == 2
    assert main(["serve", str(tmp_path / "missing")]) == 3
    assert main(["serve", str(run), "--engine", "onnxruntime"]) == 2  # no export



@pytest.mark.slow
def test_onnxruntime_engine_serves_the_export_as_imgtune_predict_does(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["-q", "export", str(run)]) == 0
    capsys.readouterr()
    paths = val_images(tiny_run[1])
    assert main(["-q", "predict", str(run), *map(str, paths), "--format", "json", "--engine", "onnxruntime"]) == 0
    expected = json.loads(capsys.readouterr().out)
    service = Service(open_predictor(run, "auto", "cpu"), ServeOptions(limits=LIMITS))
    assert service.engine == "onnxruntime"
    with served(service) as base:
        got = post_files(base, [(p.name, p.read_bytes()) for p in paths], "?top_k=3").json()["results"]
        explained = httpx.post(f"{base}/explain", files={"file": ("a.png", paths[0].read_bytes())}, timeout=60)
        meta = httpx.get(f"{base}/metadata").json()
    for want, answer in zip(expected, got):
        reference = {t["label"]: t["prob"] for t in want["top"]}
        assert answer["label"] == want["label"]
        assert max(abs(p - reference[k]) for k, p in served_probs(answer).items()) < 1e-5
    assert explained.status_code == 200 and explained.headers["x-imgtune-explained"] == got[0]["label"]
    assert meta["engine"] == "onnxruntime" and meta["model_card"].startswith("# ")


def test_the_listening_socket_says_tcp_so_asyncio_turns_nagle_off():
    from imgtune.serve.server import bind

    with bind("127.0.0.1", 0) as listening:  # with proto 0, every answer waited about 40 ms (delayed ACK)
        assert listening.proto == socket.IPPROTO_TCP
