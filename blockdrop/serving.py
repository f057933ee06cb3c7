"""The registered model: BlockDrop as a self-contained MLflow pyfunc that takes raw pixels.

What travels inside a logged model, and why:
* ``artifacts/blockdrop.pt``: the finetune stage's weights-only checkpoint (``blockdrop.models.io``), read
  with ``torch.load(weights_only=True)``. A file replaced by a pickle that runs code on load is refused.
* ``artifacts/serving.json`` (:func:`model_spec`): what the weights alone do not say: the image shape, the
  normalisation statistics, the class names and the FLOPs table, so a caller sends raw pixels (integers
  0-255) as they come and reads back class names and the FLOPs each image cost.
* ``code/blockdrop``: this library (``code_paths``), which MLflow puts on ``sys.path`` when it loads the
  model, so serving needs the pinned packages and nothing from this repository.

``python_model.pkl`` holds a :class:`BlockDropClassifier` with no state of its own: cloudpickle writes it as a
reference to this module's class, not as code. Everything the model knows comes from the two artifacts.

Per image the model answers the class (index and name), the class probabilities, the policy (one character
per residual block, ``1`` = executed), the blocks executed, the FLOPs spent (policy network included) and the
fraction of the full backbone's FLOPs saved. The input is a column ``image``, one image per row, either as raw
pixels (nested lists or arrays of integers 0-255) or as an encoded file (PNG, JPEG, WebP or GIF bytes; base64
text over JSON), decoded here with ``torchvision.io.decode_image`` (:func:`signature` says why the column's type
is ``Any``); ``unwrap_python_model().predict(None, array)`` takes an integer array.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, Schema

from blockdrop.data import Normalize
from blockdrop.flops import FlopTable, count_flops
from blockdrop.inference import BatchedSkippingPredictor
from blockdrop.models import BlockResNet, PolicyNet, load_blockdrop

__all__ = ["IMAGE_COLUMN", "MAX_BATCH_ENV", "SPEC_FILE", "WEIGHTS_FILE", "BlockDropClassifier", "RequestBatcher",
           "as_images", "decode_images", "describe", "model_spec", "signature"]

WEIGHTS_FILE, SPEC_FILE = "blockdrop.pt", "serving.json"
IMAGE_COLUMN = "image"
CHUNK = 256  # images per forward: bounds memory for a large request without costing speed (bench/inference.py)
# The most images concurrent requests may share a forward with (RequestBatcher); 1 runs each request alone.
# Read from the server's environment when the model loads: ``make serve ARGS="--max-batch N"`` sets it.
MAX_BATCH_ENV = "BLOCKDROP_MAX_BATCH"


def model_spec(source: str, classes: list[str], shape: list[int], mean: list[float], std: list[float],
               backbone: BlockResNet, policy_net: PolicyNet) -> dict[str, Any]:
    """The contents of ``serving.json``: everything but the weights that a served model needs."""
    if len(classes) != backbone.fc.out_features:
        raise ValueError(f"{len(classes)} class names for a {backbone.fc.out_features}-way classifier")
    flops = count_flops(backbone, tuple(shape), policy_net)
    return {"source": source, "depth": backbone.depth, "num_blocks": backbone.num_blocks, "classes": list(classes),
            "shape": list(shape), "mean": list(mean), "std": list(std),
            "flops": {"base": flops.base, "blocks": list(flops.blocks), "policy": flops.policy}}


def describe(spec: dict[str, Any], split: str, accuracy: float, blocks_mean: float,
             flops_mean: float | None = None) -> str:
    """A registered version's description: what the model is and how it scored on ``split`` (finetune
    writes the validation split's numbers, evaluate replaces them with the test split's and the FLOPs)."""
    full = spec["flops"]["base"] + sum(spec["flops"]["blocks"])
    text = (f"BlockDrop on {spec['source']}: a ResNet-{spec['depth']} backbone ({spec['num_blocks']} residual "
            f"blocks) and its policy network; input: a column '{IMAGE_COLUMN}' of images {_layouts(spec)}, raw "
            f"pixels 0-255 or PNG/JPEG files (base64 over JSON). On the {split} split: accuracy {accuracy:.2%}, "
            f"{blocks_mean:.2f} of {spec['num_blocks']} blocks per image on average")
    if flops_mean is None:
        return text + "."
    return (text + f", {flops_mean / 1e6:.2f} MFLOPs per image with the policy network, {full / flops_mean:.2f}x "
            f"fewer than the full backbone's {full / 1e6:.2f}.")


def _layouts(spec: dict[str, Any]) -> str:
    c, h, w = spec["shape"]
    return f"({h}, {w})" if c == 1 else f"({c}, {h}, {w})"


def signature(spec: dict[str, Any], answer: pd.DataFrame) -> ModelSignature:
    """Input: one column ``image`` (:func:`as_images` says what a cell may hold); output: the columns of
    ``answer``, a :meth:`BlockDropClassifier.predict` result.

    The column's type is ``Any``, which MLflow passes through as it comes, because the typed alternatives cost
    or mislead: against ``Array(Array(long))`` MLflow's server checks every image row by row in Python, once
    while parsing and again before ``predict`` (a pandas Series per row of pixels), which took most of a
    request's time; a ``binary`` column would refuse pixels; and a uint8 tensor signature makes the server cast
    JSON numbers before the model sees them, so a normalised 0.5 would become a silent 0. The checks a typed
    column made (integers, 0-255, one shape) are :func:`as_images`'s, with a one-line reason (HTTP 400).
    """
    outputs = infer_signature(None, answer).outputs
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]), outputs=outputs)


def _bad(reason: str) -> MlflowException:
    """A refused request: ``mlflow models serve`` answers it with HTTP 400 and this one-line reason."""
    return MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)


def as_images(model_input: Any, shape: list[int]) -> torch.Tensor:
    """Raw images as a (N, C, H, W) uint8 tensor, or a one-line :class:`MlflowException` (HTTP 400) saying
    what is wrong. ``model_input`` is what the logged signature describes, a one-column DataFrame with one image
    per row, each either

    * raw pixels: nested lists or an array of integers 0-255, (H, W) for one channel, else (C, H, W); or
    * an encoded file: PNG, JPEG, WebP or GIF as ``bytes``, or as base64 text (what JSON carries; a
      ``data:image/png;base64,`` prefix and line breaks are allowed), read as greyscale or RGB to match the
      model's channels and of the model's size (not resized),

    one kind for every row of a request; or directly an integer array (N, H, W) or (N, C, H, W)."""
    c, h, w = shape
    layouts = f"({h}, {w}) or ({c}, {h}, {w})" if c == 1 else f"({c}, {h}, {w})"
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise _bad(f"expected one column of images, got {model_input.shape[1]} columns")
        if len(model_input) == 0:
            raise _bad("empty batch: send at least one image")
        cells = model_input.iloc[:, 0].tolist()
        encoded = [isinstance(cell, str | bytes | bytearray) for cell in cells]
        if any(encoded):
            if not all(encoded):
                raise _bad("each request sends either pixels or encoded images (PNG, JPEG), not both")
            images = decode_images(cells, c)
            if any(tuple(image.shape) != (c, h, w) for image in images):
                sizes = sorted({f"{image.shape[2]}x{image.shape[1]}" for image in images})
                raise _bad(f"expected {w}x{h} images, got {', '.join(sizes)} (resize before sending)")
            return torch.from_numpy(np.stack([image.numpy() for image in images]))  # numpy: no torch threads here
        try:  # one C-level conversion of all rows; a ragged row or two sizes make the array uneven
            model_input = np.array(cells)
        except (ValueError, TypeError):
            raise _bad(f"each image must be a rectangular array of pixels {layouts}, all of one shape") from None
        if model_input.dtype == object:
            raise _bad(f"each image must be a rectangular array of pixels {layouts}, all of one shape")
        if model_input.dtype.kind in "US":  # e.g. {"inputs": {"image": [...]}}: MLflow puts a list of str in one row
            raise _bad("expected pixels (integers 0-255) or one encoded image per row, got a list of text in a row "
                       '(send {"dataframe_split": ...}, or {"inputs": [{"image": ...}, ...]} as records)')
        given = "images of shape " + str(model_input.shape[1:])
    else:
        if isinstance(model_input, torch.Tensor):
            model_input = model_input.cpu().numpy()
        if not isinstance(model_input, np.ndarray):
            raise _bad(f"expected images, got {type(model_input).__name__}")
        given = "an array of shape " + str(model_input.shape)
    if model_input.dtype.kind not in "iu":
        raise _bad(f"expected integer pixels 0-255 (raw, not normalised), got {model_input.dtype}")
    if model_input.ndim == 3 and c == 1:
        model_input = model_input[:, None]
    if model_input.ndim != 4 or tuple(model_input.shape[1:]) != (c, h, w):
        raise _bad(f"expected images of shape {layouts}, got {given}")
    if len(model_input) == 0:
        raise _bad("empty batch: send at least one image")
    if model_input.dtype != np.uint8:  # JSON integers arrive as int64: check the range before narrowing
        lo, hi = int(model_input.min()), int(model_input.max())
        if lo < 0 or hi > 255:
            raise _bad(f"pixels must be 0-255, got values from {lo} to {hi}")
        model_input = model_input.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(model_input))


_WHERE = re.compile(r"^.*?\.cpp:\d+, ")  # torchvision's errors start with the C++ file and line


def decode_images(cells: list[str | bytes], channels: int) -> list[torch.Tensor]:
    """Encoded images (bytes, or base64 text) as (C, H, W) uint8 tensors, greyscale for one channel else RGB,
    or a one-line :class:`MlflowException` (HTTP 400) naming the first row that is not base64 or not an image.
    Each row is one call into torchvision's C++ decoders, no Python work per pixel."""
    # Imported here: torchvision's import pulls in torch._dynamo (seconds), which pixels never need.
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = []
    for row, cell in enumerate(cells):
        if isinstance(cell, str):
            text = cell.partition(",")[2] if cell.startswith("data:") else cell
            try:  # strict: a typo is an error, not silently skipped characters; line breaks are allowed
                cell = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise _bad(f"row {row}: not valid base64 (send each image's PNG or JPEG file base64-encoded)"
                           ) from None
        if not cell:
            raise _bad(f"row {row}: empty image file")
        try:
            images.append(decode_image(torch.frombuffer(bytearray(cell), dtype=torch.uint8), mode=mode))
        except RuntimeError as error:
            reason = _WHERE.sub("", str(error).strip().splitlines()[0]).split(". ")[0]  # "Unsupported image file"
            raise _bad(f"row {row}: not a readable PNG, JPEG, WebP or GIF image ({reason})") from None
        if images[-1].dtype != torch.uint8:  # a 16-bit PNG decodes to uint16: its 0-65535 is not our 0-255
            raise _bad(f"row {row}: a {images[-1].dtype} image; send 8 bits per channel")
    return images


class _Request:
    """One caller's images, and the rows of each output once a forward has run them (or the error it raised)."""

    __slots__ = ("done", "error", "images", "outputs")

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.outputs, self.error, self.done = images, None, None, threading.Event()


class RequestBatcher:
    """Concurrent calls' images run as one batch, on one thread that does all of the model's torch work.

    MLflow's scoring server runs each request's ``predict`` in a thread of its own (``asyncio.to_thread``), so
    without this every small request would run the network alone, at the engine's small-batch rate (8 images:
    about 0.6 of its rate at 64 on a 2-core CPU). Here a caller queues its images and waits; the batcher's
    thread runs everything queued so far, up to ``max_images`` (at least one request), as one batch and hands
    each caller its own rows. Nothing waits for a batch to fill: a request alone runs at once, and under load the
    batch grows by itself with the requests that arrived while the last one ran.

    Why one thread of its own (``executor``, which also loads the model): every thread that runs torch's
    parallel regions gets its own OpenMP helper threads, and with more OpenMP threads than cores libgomp stops
    spinning between regions, so a forward from a request thread, after the server's main thread loaded the
    model, ran small batches at about 0.6 of the speed (``bench/thread_pools.py``).

    ``forward`` maps a (N, ...) tensor to a tuple of tensors whose first dimension is N. An image's answer does
    not depend on the others in its batch, up to float rounding (oneDNN may pick another kernel for another N).
    """

    def __init__(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], max_images: int) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.forward, self.max_images = forward, max_images
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockdrop-network")
        weakref.finalize(self, self.executor.shutdown, wait=False)  # a discarded model's thread (and its OpenMP
        # helpers) ends with it, instead of slowing whichever thread runs torch next
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        request = _Request(images)
        with self._lock:
            self._queue.append(request)
        self.executor.submit(self._run_queued)  # one run per request: a run that finds the queue empty returns
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.outputs

    def _run_queued(self) -> None:
        """Run the oldest queued requests, up to ``max_images`` images, as one batch (on the executor's thread)."""
        with self._lock:
            if not self._queue:
                return  # an earlier run took this call's request with others
            batch = [self._queue.popleft()]
            size = len(batch[0].images)
            while self._queue and size + len(self._queue[0].images) <= self.max_images:
                batch.append(self._queue.popleft())
                size += len(batch[-1].images)
        try:
            outputs = self.forward(batch[0].images if len(batch) == 1 else torch.cat([r.images for r in batch]))
            sizes = [len(r.images) for r in batch]
            for request, *rows in zip(batch, *(output.split(sizes) for output in outputs), strict=True):
                request.outputs = tuple(rows)
        except Exception as error:  # every caller in the batch sees it; the next batch runs as usual
            for request in batch:
                request.error = error
        finally:
            for request in batch:
                request.done.set()


def max_batch_from_env() -> int:
    """``$BLOCKDROP_MAX_BATCH`` (``CHUNK`` when unset): a plain ``mlflow models serve`` sets it by hand, so a bad
    value fails at model load with the variable's name, not with ``int()``'s message."""
    value = os.environ.get(MAX_BATCH_ENV, "").strip() or str(CHUNK)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_BATCH_ENV}={value!r}: expected a whole number of images, at least 1")
    return int(value)


class BlockDropClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: raw images in, one row per image out (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        import torchvision.io  # noqa: F401  (here, so the first request of encoded images does not pay the import)

        self.setup(spec, weights=context.artifacts["weights"])  # read with weights_only=True

    def setup(self, spec: dict[str, Any], backbone: BlockResNet | None = None, policy_net: PolicyNet | None = None,
              *, weights: str | Path | None = None, max_batch: int | None = None) -> BlockDropClassifier:
        """Make ready to predict, from in-memory networks or from a weights file (what ``load_context`` does).
        ``max_batch``: the most images concurrent requests share a forward with (default: ``$BLOCKDROP_MAX_BATCH``,
        else ``CHUNK``). The networks are loaded and folded on the batcher's thread, which runs every forward,
        so a server's main thread never starts torch's parallel regions (:class:`RequestBatcher` says why)."""
        if (weights is None) == (backbone is None or policy_net is None):
            raise ValueError("give either the two networks or the weights file")
        self.spec, self.classes = spec, np.array(spec["classes"], dtype=object)
        self.flops = FlopTable(spec["flops"]["base"], tuple(spec["flops"]["blocks"]), spec["flops"]["policy"])
        self.batcher = RequestBatcher(self.forward, max_batch_from_env() if max_batch is None else max_batch)

        def build() -> BatchedSkippingPredictor:
            if weights is None:
                return BatchedSkippingPredictor(backbone, policy_net)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return BatchedSkippingPredictor(*(net.to(device) for net in load_blockdrop(weights)))

        self.predictor = self.batcher.executor.submit(build).result()
        self.normalize = Normalize(spec["mean"], spec["std"], next(self.predictor.backbone.parameters()).device)
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, C, H, W) uint8 images to their class probabilities (float32), (N, K) bool policies, classes and
        FLOPs, on the CPU: all the tensor work of an answer, so that it runs on the batcher's thread."""
        device = next(self.predictor.backbone.parameters()).device
        probs, keeps = [], []
        for chunk in images.split(CHUNK):
            logits, keep = self.predictor(self.normalize(chunk.to(device)))
            probs.append(logits.float().softmax(1).cpu()), keeps.append(keep.cpu())
        prob, keep = torch.cat(probs), torch.cat(keeps)
        return prob, keep, prob.argmax(1), self.flops.per_image(keep)

    # model_input has no annotation on purpose: MLflow 3 reads predict's type hints as a second signature,
    # which would replace the logged one (:func:`signature`); the logged signature is the contract.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # Checked and decoded in the caller's thread (numpy and torchvision's decoders only); the network runs on
        # the batcher's thread with whatever other requests are waiting.
        prob, keep, index, flops = (t.numpy() for t in self.batcher(as_images(model_input, self.spec["shape"])))
        return pd.DataFrame({
            "class_index": index,
            "class_name": self.classes[index],
            "probabilities": list(prob.astype(np.float64)),
            "policy": ["".join("1" if k else "0" for k in row) for row in keep.tolist()],
            "blocks": keep.sum(1),
            "flops": flops,
            "flops_saved": 1.0 - flops / self.flops.full,
        })
