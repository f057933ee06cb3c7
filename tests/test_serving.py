"""The registered model is self-contained, refuses tampered weights, and serves over HTTP.

The model comes from the tiny project reproduced once per session (``tiny_reproduced``): its finetune stage
logged and registered it exactly as ``dvc repro`` does, and its evaluate stage wrote the per-image classes and
policies the served model must reproduce. Loading happens in a separate interpreter from which the repository
is removed (its path and the editable install's finder), so only the model's own ``code/`` can supply
``blockdrop``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from tinyrepo import tiny_params

from blockdrop import serving, tracking
from blockdrop.flops import FlopTable

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

# Runs in a fresh interpreter: forget the repository, prove blockdrop is gone, then load and predict.
PROBE = r"""
import importlib.util, json, sys
sys.path[:] = [p for p in sys.path if p not in ("", REPO)]
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in getattr(f, "__module__", "") + getattr(type(f), "__module__", "")]
assert importlib.util.find_spec("blockdrop") is None, "the repository is still importable"
import mlflow.pyfunc, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import blockdrop
out = model.predict(pd.DataFrame({"image": list(np.load(sys.argv[2]))}))
print(json.dumps({"blockdrop": blockdrop.__file__, "classes": out["class_index"].tolist(),
                  "names": out["class_name"].tolist(), "policies": out["policy"].tolist(),
                  "flops": out["flops"].tolist(), "signature": str(model.metadata.signature.inputs)}))
"""


@pytest.fixture(scope="module")
def served(tiny_reproduced: Path) -> dict:
    """The tiny project's registered model: its name, tracking URI, raw test images and evaluate's answers."""
    p = tiny_params(tiny_reproduced)
    test = torch.load(tiny_reproduced / "data/prepared/test.pt", weights_only=True)
    per_image = pd.read_csv(tiny_reproduced / "data/evaluate/per_image.csv", dtype={"policy": str})
    return {"root": tiny_reproduced, "name": tracking.registry_name(p["data"]["source"], p["model"]["depth"]),
            "uri": f"sqlite:///{tiny_reproduced / 'mlflow.db'}", "images": test["images"].numpy()[:, 0],
            "per_image": per_image}


def _probe(model_uri: str, images: np.ndarray, tmp_path: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": ""}
    code = PROBE.replace("REPO", repr(str(Path(__file__).resolve().parents[1])))
    return subprocess.run([sys.executable, "-c", code, model_uri, str(tmp_path / "images.npy")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_registered_model_loads_without_the_repository_and_answers_like_evaluate(served: dict, tmp_path: Path
                                                                                 ) -> None:
    proc = _probe(f"models:/{served['name']}@challenger", served["images"], tmp_path, served["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "/artifacts/code/blockdrop/" in out["blockdrop"]  # the model's own copy of the library
    ref = served["per_image"]
    assert out["classes"] == ref["predicted"].tolist()
    assert out["policies"] == ref["policy"].tolist()
    np.testing.assert_allclose(out["flops"], ref["flops"], rtol=1e-12)
    meta = json.loads((served["root"] / "data/prepared/meta.json").read_text())
    assert out["names"] == [meta["classes"][i] for i in out["classes"]]
    assert out["signature"] == "['image': Any (required)]"


class Payload:
    """A pickle that runs code when it is unpickled: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _version_uri(served: dict, version: int | str) -> str:
    """Where a version's files are, asked of the tiny project's store by name (not through the process-wide
    tracking URI, which other tests in this session set)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=served["uri"], registry_uri=served["uri"])
    return client.get_model_version_download_uri(served["name"], str(version))


def test_weights_replaced_by_a_code_running_pickle_are_refused(served: dict, tmp_path: Path) -> None:
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_version_uri(served, 1),
                                                     dst_path=str(tmp_path / "model")))
    weights = local / "artifacts" / serving.WEIGHTS_FILE
    assert weights.is_file()
    marker = tmp_path / "code-ran"
    torch.save(Payload(marker), weights)
    torch.load(weights, weights_only=False)  # the payload is real: unpickling it runs code
    assert marker.exists()
    marker.unlink()

    proc = _probe(str(local), served["images"][:2], tmp_path, served["uri"])
    assert proc.returncode != 0
    assert "corrupted or unreadable" in proc.stderr and serving.WEIGHTS_FILE in proc.stderr
    assert not marker.exists()


def test_version_description_and_requirements(served: dict) -> None:
    from importlib.metadata import version

    import mlflow.pyfunc
    from mlflow import MlflowClient

    v = MlflowClient(served["uri"], served["uri"]).get_model_version_by_alias(served["name"], "challenger")
    metrics = json.loads((served["root"] / "reports/evaluate/metrics.json").read_text())["blockdrop"]
    # evaluate replaced finetune's validation numbers with the test split's
    assert v.description.startswith("BlockDrop on fashion-mnist: a ResNet-")
    assert f"On the test split: accuracy {metrics['accuracy']:.2%}" in v.description
    assert f"{metrics['blocks_mean']:.2f} of" in v.description and "MFLOPs per image" in v.description
    reqs = Path(mlflow.pyfunc.get_model_dependencies(_version_uri(served, v.version))).read_text().split()
    for pkg in ("torch", "torchvision", "numpy", "pandas", "mlflow"):
        assert f"{pkg}=={version(pkg)}" in reqs


# ------------------------------------------------------------------------- the pyfunc's input checks


SHAPE = [1, 28, 28]


@pytest.mark.parametrize("given", [
    np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1, 28, 28), np.uint8), np.full((2, 28, 28), 255, np.int64),
    pd.DataFrame({"image": [np.zeros((28, 28), np.uint8)] * 2}),
    pd.DataFrame({"image": [[[0] * 28] * 28] * 2}),  # nested lists, as JSON delivers them
])
def test_images_are_accepted_in_each_layout(given) -> None:
    images = serving.as_images(given, SHAPE)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, 1, 28, 28)


@pytest.mark.parametrize(("given", "reason"), [
    (np.zeros((2, 28, 28), np.float32), "expected integer pixels 0-255 (raw, not normalised), got float32"),
    (np.zeros((2, 27, 28), np.uint8), "expected images of shape (28, 28) or (1, 28, 28), got an array of shape "
                                      "(2, 27, 28)"),
    (pd.DataFrame({"image": [np.zeros((27, 27), np.int64)]}), "got images of shape (27, 27)"),
    (np.zeros((2, 3, 28, 28), np.uint8), "got an array of shape (2, 3, 28, 28)"),
    (np.zeros((0, 28, 28), np.uint8), "empty batch: send at least one image"),
    (pd.DataFrame({"image": []}), "empty batch: send at least one image"),
    (np.full((1, 28, 28), 256), "pixels must be 0-255, got values from 256 to 256"),
    (np.full((1, 28, 28), -3), "pixels must be 0-255, got values from -3 to -3"),
    (pd.DataFrame({"image": [[[0] * 28] * 27 + [[0] * 5]]}), "each image must be a rectangular array of pixels"),
    ("a cat", "expected images, got str"),
    (pd.DataFrame({"a": [1], "b": [2]}), "expected one column of images, got 2 columns"),
])
def test_bad_inputs_are_refused_with_a_one_line_reason(given, reason: str) -> None:
    with pytest.raises(MlflowException) as error:
        serving.as_images(given, SHAPE)
    assert reason in error.value.message and "\n" not in error.value.message
    assert error.value.get_http_status_code() == 400


def _png(image: np.ndarray) -> bytes:
    """The PNG file of one (H, W) or (C, H, W) uint8 image."""
    from torchvision.io import encode_png

    x = torch.from_numpy(image)
    return encode_png(x[None] if x.ndim == 2 else x).numpy().tobytes()


def _png16(image: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG (torchvision writes 8-bit ones only)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoded_images_decode_to_the_same_pixels() -> None:
    """PNG bytes, their base64 text (with line breaks and a data-URL prefix too) and the pixels give one
    tensor; a JPEG is read as greyscale for a one-channel model, and RGB images for a three-channel one."""
    from torchvision.io import encode_jpeg

    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    files = [_png(image) for image in pixels]
    texts = [base64.b64encode(f).decode() for f in files]
    expected = serving.as_images(pd.DataFrame({"image": list(pixels)}), SHAPE)
    for cells in (files, texts, [base64.encodebytes(f).decode() for f in files],
                  ["data:image/png;base64," + t for t in texts]):
        assert torch.equal(serving.as_images(pd.DataFrame({"image": cells}), SHAPE), expected)
    colour = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    decoded = serving.as_images(pd.DataFrame({"image": [_png(image) for image in colour]}), [3, 32, 32])
    assert torch.equal(decoded, torch.from_numpy(colour))
    jpeg = encode_jpeg(torch.from_numpy(colour[0])).numpy().tobytes()
    assert tuple(serving.as_images(pd.DataFrame({"image": [jpeg]}), [1, 32, 32]).shape) == (1, 1, 32, 32)


@pytest.mark.parametrize(("cells", "reason"), [
    (["iVBORw0KGgo!!!"], "row 0: not valid base64"),
    ([base64.b64encode(b"GIF89a, not really").decode()], "row 0: not a readable PNG, JPEG, WebP or GIF image"),
    ([_png(np.zeros((28, 28), np.uint8)), b"\x89PNG\r\n\x1a\n"], "row 1: not a readable PNG, JPEG, WebP or GIF"),
    ([b""], "row 0: empty image file"),
    ([_png(np.zeros((27, 28), np.uint8))], "expected 28x28 images, got 28x27 (resize before sending)"),
    ([_png(np.zeros((28, 28), np.uint8)), [[0] * 28] * 28], "either pixels or encoded images"),
    ([_png16(np.full((28, 28), 40000, np.uint16))], "row 0: a torch.uint16 image; send 8 bits per channel"),
])
def test_bad_encoded_images_are_refused_with_a_one_line_reason(cells: list, reason: str) -> None:
    with pytest.raises(MlflowException) as error:
        serving.as_images(pd.DataFrame({"image": cells}), SHAPE)
    assert reason in error.value.message and "\n" not in error.value.message
    assert error.value.get_http_status_code() == 400


def test_predictions_carry_policy_blocks_and_flops() -> None:
    """The answer's FLOPs are the table's for the policy it reports, and the probabilities sum to 1."""
    from blockdrop.models import cifar_resnet, policy_resnet8

    torch.manual_seed(0)
    backbone, policy = cifar_resnet(8, 3, 1).eval(), policy_resnet8(3, 1).eval()
    with torch.no_grad():
        policy.fc.bias.copy_(torch.tensor([5.0, -5.0, 5.0]))  # keep blocks 0 and 2, drop block 1
        policy.fc.weight.zero_()
    table = FlopTable(base=100, blocks=(10, 20, 40), policy=5)
    spec = {"shape": SHAPE, "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25],
            "flops": {"base": table.base, "blocks": list(table.blocks), "policy": table.policy}}
    model = serving.BlockDropClassifier().setup(spec, backbone, policy)
    out = model.predict(None, np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    assert out["policy"].tolist() == ["101"] * 3 and out["blocks"].tolist() == [2] * 3
    assert out["flops"].tolist() == [155.0] * 3
    np.testing.assert_allclose(out["flops_saved"], 1 - 155 / 170)
    np.testing.assert_allclose(np.stack(out["probabilities"]).sum(1), 1.0, rtol=1e-6)
    assert out["class_name"].tolist() == [spec["classes"][i] for i in out["class_index"]]


# ------------------------------------------------------------------------------ mlflow models serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _split(*images) -> dict:
    """A request in MLflow's ``dataframe_split`` form: one row per image, in the column ``image``."""
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}


def _reason(answer: dict) -> str:
    """The one-line reason of a refusal. A request refused while predicting gets MLflow's echo of the input
    first ("Failed to predict data '<the array>'") and the reason last; one refused while parsing, the reason
    first (then, for unparsable JSON, the bytes received)."""
    lines = answer["message"].strip().splitlines()
    return lines[-1] if lines[0].startswith("Failed to predict data") else lines[0]


def test_mlflow_models_serve_answers_images_and_refuses_bad_requests(served: dict, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
           f"models:/{served['name']}@challenger", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
           "--env-manager", "local"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115  (closed below, after the server)
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
                time.sleep(1)

        images, ref = served["images"][:3], served["per_image"][:3]
        status, answer = _post(port, _split(*images.tolist()))
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["class_index"] for r in rows] == ref["predicted"].tolist()
        assert [r["policy"] for r in rows] == ref["policy"].tolist()
        assert [r["blocks"] for r in rows] == ref["blocks"].tolist()
        assert all(len(r["probabilities"]) == 10 for r in rows)
        status, records = _post(port, {"dataframe_records": [{"image": images[0].tolist()}]})
        assert status == 200 and records["predictions"][0]["policy"] == rows[0]["policy"]
        # the same images as PNG files, base64 in JSON: the same answer to the last digit
        status, png = _post(port, _split(*(base64.b64encode(_png(image)).decode() for image in images)))
        assert status == 200 and png == answer

        black = [[0] * 28] * 28
        bad = {  # what a client gets wrong -> the reason it reads
            "normalised floats": (_split([[0.5] * 28] * 28), "expected integer pixels 0-255 (raw, not normalised), "
                                                             "got float64"),
            "wrong shape": (_split([[0] * 27] * 27), "expected images of shape (28, 28) or (1, 28, 28), got "
                                                     "images of shape (27, 27)"),
            "above 255": (_split([[300] * 28] * 28), "pixels must be 0-255, got values from 300 to 300"),
            "negative": (_split([[-1] * 28] * 28), "pixels must be 0-255, got values from -1 to -1"),
            "not numbers": (_split([["a"] * 28] * 28), "expected pixels (integers 0-255) or one encoded image per "
                                                       "row, got a list of text in a row"),
            "not an image": (_split("a cat"), "row 0: not a readable PNG, JPEG, WebP or GIF image (Unsupported "
                                              "image file)"),
            "not base64": (_split(base64.b64encode(_png(images[0])).decode()[:-3] + "!"), "row 0: not valid base64"),
            "a PNG of another size": (_split(base64.b64encode(_png(images[0][:27])).decode()),
                                      "expected 28x28 images, got 28x27"),
            "ragged": (_split([*black[:27], [0] * 5]), "each image must be a rectangular array of pixels"),
            "two sizes": (_split(black, [[0] * 27] * 27), "each image must be a rectangular array of pixels"),
            "empty batch": ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
            "not json": (b"{", "valid JSON"),
        }
        for case, (body, reason) in bad.items():
            status, answer = _post(port, body)
            assert status == 400, (case, status)
            assert reason in _reason(answer), (case, answer["message"][-500:])
            assert "stack_trace" not in answer and "Traceback" not in answer["message"], case
        status, again = _post(port, _split(images[0].tolist()))  # still serving after all of them
        assert status == 200
        first = again["predictions"][0]
        assert {k: v for k, v in first.items() if k != "probabilities"} == \
            {k: v for k, v in rows[0].items() if k != "probabilities"}
        np.testing.assert_allclose(first["probabilities"], rows[0]["probabilities"], atol=1e-5)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_serve_divides_the_cpus_among_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make serve ARGS="--workers N"`` gives each worker its share of the CPUs as torch threads, unless told."""
    from ops.serve import worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [worker_threads(w) for w in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert worker_threads(2, omp_env="3") == 3  # OMP_NUM_THREADS already set: kept
    assert worker_threads(2, threads=1, omp_env="3") == 1  # --threads wins
    assert worker_threads(2, omp_env="lots") == 4
