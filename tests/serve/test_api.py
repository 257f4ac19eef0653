"""``multichex serve`` API through FastAPI's TestClient: uploads, sniffing, limits, results, busy server."""

from __future__ import annotations

import io
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from multichex import CLINICAL_DISCLAIMER
from multichex.inference.predictor import Predictor
from multichex.serve import app as serve_app
from multichex.serve import create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def client(predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor)) as test_client:
        yield test_client


def post(client: TestClient, name: str, data: bytes, content_type: str = "application/octet-stream"):
    return client.post("/predict", files={"file": (name, data, content_type)})


def test_health_summarises_the_model(client, predictor):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["disclaimer"] == CLINICAL_DISCLAIMER
    model = body["model"]
    assert model["encoder"] == "lite-small" and model["image_size"] == 64
    assert model["class_names"] == predictor.model.config.class_names
    assert model["gate"]["threshold"] == predictor.model.config.gate.threshold


def test_png_upload_gives_probabilities_and_fetchable_files(client, xray, predictor):
    response = post(client, xray.name, xray.read_bytes(), "image/png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == xray.name
    assert list(body["classes"]) == predictor.model.config.class_names
    assert all(0.0 <= p <= 1.0 for p in body["classes"].values())
    assert set(body["gate"]) == {"probability", "positive"}
    assert body["disclaimer"] == CLINICAL_DISCLAIMER
    urls = body["urls"]
    assert urls["overlay"] == f"/results/{body['result_id']}/{body['overlay']}"
    assert isinstance(urls["heatmaps"], dict)
    for url in [urls["overlay"], urls["mask"], *urls["heatmaps"].values()]:
        if url is None:
            continue
        fetched = client.get(url)
        assert fetched.status_code == 200, url
        assert fetched.content.startswith(PNG_MAGIC)
        assert fetched.headers["content-type"] == "image/png"


def test_type_is_sniffed_from_content_not_name(client, xray):
    renamed = post(client, "xray.txt", xray.read_bytes(), "text/plain")
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["image"] == "xray.txt"
    fake = post(client, "fake.png", b"just some text, not an image\n" * 10, "image/png")
    assert fake.status_code == 415
    assert "not PNG, JPEG or DICOM" in fake.json()["detail"]


def test_jpeg_upload(client, xray):
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(xray).convert("L").save(buffer, format="JPEG")
    assert post(client, "x.jpeg", buffer.getvalue()).status_code == 200


def test_dicom_upload(client, dicom_factory, tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((60, 80)) * 4000).astype(np.uint16)
    path = dicom_factory.make_dicom(tmp_path / "scan.dcm", pixels)
    response = post(client, "scan-without-extension", path.read_bytes())
    assert response.status_code == 200, response.text
    assert all(0.0 <= p <= 1.0 for p in response.json()["classes"].values())


def test_empty_upload_is_refused(client):
    response = post(client, "empty.png", b"")
    assert response.status_code == 422
    assert "empty" in response.json()["detail"]


def test_truncated_png_is_422_and_the_server_keeps_working(client, xray):
    data = xray.read_bytes()
    broken = post(client, "broken.png", data[: len(data) // 2])
    assert broken.status_code == 422
    detail = broken.json()["detail"]
    assert detail.startswith("could not read the image:")
    assert "broken.png" in detail or "truncated" in detail.lower() or "decode" in detail.lower()
    assert str(client.app.state.serve.root) not in detail  # no server paths leak out
    assert post(client, xray.name, data).status_code == 200


def test_upload_over_the_limit_is_413(predictor, xray):
    data = xray.read_bytes()
    with TestClient(create_app(predictor, max_upload_bytes=len(data) - 1)) as small:
        response = post(small, xray.name, data)
        assert response.status_code == 413
        assert "too large" in response.json()["detail"]
        state = small.app.state.serve
        assert not any(state.uploads.iterdir()), "a refused upload must not stay on disk"
        huge = post(small, "huge.png", PNG_MAGIC + bytes(300_000))  # far past the limit: refused while reading the body
        assert huge.status_code == 413
        assert "too large" in huge.text.lower()
    with TestClient(create_app(predictor, max_upload_bytes=len(data))) as exact:
        assert post(exact, xray.name, data).status_code == 200


def test_chunked_upload_without_content_length_is_counted(predictor, xray):
    """The limit holds when the client sends no Content-Length (chunked body)."""
    boundary = "multichexboundary"
    data = xray.read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with TestClient(create_app(predictor, max_upload_bytes=len(data) // 4)) as small:
        response = small.post("/predict", content=chunks(), headers=headers)
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert response.status_code == 413
    with TestClient(create_app(predictor)) as big:
        assert big.post("/predict", content=chunks(), headers=headers).status_code == 200


def test_results_refuse_traversal_and_unknown_names(client, xray):
    body = post(client, xray.name, xray.read_bytes()).json()
    result_id = body["result_id"]
    assert client.get(f"/results/{result_id}/{body['overlay']}").status_code == 200
    bad = [
        f"/results/{result_id}/..%2F..%2Fetc%2Fpasswd",
        f"/results/{result_id}/..%2F{result_id}%2F{body['overlay']}",
        f"/results/{result_id}/%2E%2E",
        f"/results/{result_id}/.hidden",
        f"/results/{result_id}/nope.png",
        f"/results/{result_id.upper()}/{body['overlay']}",
        f"/results/{'0' * 32}/{body['overlay']}",
        f"/results/not-a-result/{body['overlay']}",
        "/results/..%2F..%2Fetc/passwd",
        "/results/%2E%2E/uploads",
    ]
    for url in bad:
        assert client.get(url).status_code == 404, url


def test_old_results_are_deleted_beyond_keep_results(predictor, xray):
    with TestClient(create_app(predictor, keep_results=2)) as app_client:
        urls = [post(app_client, xray.name, xray.read_bytes()).json()["urls"]["overlay"] for _ in range(3)]
        assert app_client.get(urls[0]).status_code == 404
        assert all(app_client.get(url).status_code == 200 for url in urls[1:])
        assert len(list(app_client.app.state.serve.results.iterdir())) == 2


def test_files_are_written_only_inside_the_app_temp_dir(predictor, xray, tmp_path, monkeypatch):
    """Everything, including anything Starlette spools, lands under the app's temp dir; never the client name."""
    sandbox = tmp_path / "tmp"
    sandbox.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox))
    calls: list[tuple[list[Path], Path]] = []
    real_predict_files = serve_app.predict_files

    def spy(predictor, paths, out_dir, **kwargs):
        calls.append(([Path(p) for p in paths], Path(out_dir)))
        return real_predict_files(predictor, paths, out_dir, **kwargs)

    monkeypatch.setattr(serve_app, "predict_files", spy)
    app = create_app(predictor)
    root = app.state.serve.root
    assert root.parent == sandbox
    with TestClient(app) as app_client:
        response = post(app_client, "../../escape.png", xray.read_bytes())
        assert response.status_code == 200, response.text
        assert response.json()["image"] == "../../escape.png"  # echoed for display only
        [(inputs, out_dir)] = calls
        assert inputs[0].parent == root / "uploads" and "escape" not in inputs[0].name
        assert out_dir.parent == root / "results"
        written = [p for p in sandbox.rglob("*") if p.is_file()]
        assert written and all(root in p.parents for p in written)
        assert not list(tmp_path.rglob("*escape*"))
        assert not any((root / "uploads").iterdir()), "uploads are deleted after prediction"
    assert not root.exists(), "the temp dir is removed on shutdown"


def test_openapi_lists_predict_and_disclaimer(client):
    schema = client.get("/openapi.json").json()
    assert "/predict" in schema["paths"] and "post" in schema["paths"]["/predict"]
    assert CLINICAL_DISCLAIMER in schema["info"]["description"]


def test_index_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.text
    assert 'id="file-input"' in html and 'id="probabilities"' in html
    assert "NOT for clinical use" in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external assets


def test_busy_server_answers_503(predictor, xray):
    started, release = threading.Event(), threading.Event()
    blocking = Predictor(predictor.model)
    real = blocking.predict_prepared

    def slow_predict_prepared(items):
        started.set()
        release.wait(30)
        return real(items)

    blocking.predict_prepared = slow_predict_prepared
    data = xray.read_bytes()
    with TestClient(create_app(blocking, workers=1, max_queue=1)) as app_client:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(response=post(app_client, "a.png", data)))
        thread.start()
        try:
            assert started.wait(30), "the first prediction never started"
            busy = post(app_client, "b.png", data)
            assert busy.status_code == 503
            assert "busy" in busy.json()["detail"]
        finally:
            release.set()
            thread.join(30)
        assert first["response"].status_code == 200
        assert app_client.app.state.serve.in_flight == 0
        assert post(app_client, "c.png", data).status_code == 200


def test_invalid_settings_are_refused(predictor):
    with pytest.raises(ValueError, match="max_queue"):
        create_app(predictor, max_queue=0)


def test_heatmaps_get_urls_when_present(client, xray, fake_heatmaps):
    body = post(client, xray.name, xray.read_bytes()).json()
    url = body["urls"]["heatmaps"]["Mass"]
    assert url == f"/results/{body['result_id']}/{body['heatmaps']['Mass']}"
    assert client.get(url).content.startswith(PNG_MAGIC)


def test_overlay_caption_shows_the_client_file_name_not_the_upload_uuid(client, xray, monkeypatch):
    """The caption drawn on the overlay and the result's ``image`` are the client's own file name."""
    from multichex.inference import predictor as predictor_module

    titles: list[str] = []
    real_render = predictor_module.render_overlay

    def spy(*args, **kwargs):
        titles.append(kwargs.get("title"))
        return real_render(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "render_overlay", spy)
    name = "<b>chest & 1>.png"
    response = post(client, name, xray.read_bytes(), "image/png")
    assert response.status_code == 200, response.text
    body = response.json()
    upload_stem = body["overlay"].removesuffix("_overlay.png")  # the server's uuid name of the upload
    assert len(upload_stem) == 32 and upload_stem != body["result_id"]
    assert titles == [name]
    assert body["image"] == name  # raw in JSON; the page inserts it as text, so the browser escapes it
    stored = client.get(f"/results/{body['result_id']}/{upload_stem}.json").json()
    assert stored["image"] == name
    assert upload_stem not in json.dumps({k: v for k, v in body.items() if k not in {"overlay", "mask", "heatmaps", "urls"}})


@pytest.mark.parametrize("client_name, caption", [
    ("x.png", "x.png"),
    ("<b>chest & 1>.png", "<b>chest & 1>.png"),
    ("../../escape.png", "escape.png"),
    ("C:\\fakepath\\scan.dcm", "scan.dcm"),
    ("two\nlines\u202e.png", "two?lines?.png"),
    ("..", ""),
    ("", ""),
    ("a" * 300, "a" * 79 + "…"),
])
def test_caption_is_one_plain_line(client_name, caption):
    from multichex.serve.uploads import caption_for

    assert caption_for(client_name) == caption
