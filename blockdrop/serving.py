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
fraction of the full backbone's FLOPs saved. The input is a column ``image`` of images (:func:`signature`
says why a column and not a tensor); ``unwrap_python_model().predict(None, array)`` takes an integer array.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema

from blockdrop.data import Normalize
from blockdrop.flops import FlopTable, count_flops
from blockdrop.inference import BatchedSkippingPredictor
from blockdrop.models import BlockResNet, PolicyNet, load_blockdrop

__all__ = ["IMAGE_COLUMN", "SPEC_FILE", "WEIGHTS_FILE", "BlockDropClassifier", "as_images", "describe", "model_spec",
           "signature"]

WEIGHTS_FILE, SPEC_FILE = "blockdrop.pt", "serving.json"
IMAGE_COLUMN = "image"
CHUNK = 256  # images per forward: bounds memory for a large request without costing speed (bench/inference.py)


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
            f"blocks) and its policy network; input: a column '{IMAGE_COLUMN}' of raw images {_layouts(spec)}, "
            f"pixels 0-255. On the {split} split: accuracy {accuracy:.2%}, {blocks_mean:.2f} of "
            f"{spec['num_blocks']} blocks per image on average")
    if flops_mean is None:
        return text + "."
    return (text + f", {flops_mean / 1e6:.2f} MFLOPs per image with the policy network, {full / flops_mean:.2f}x "
            f"fewer than the full backbone's {full / 1e6:.2f}.")


def _layouts(spec: dict[str, Any]) -> str:
    c, h, w = spec["shape"]
    return f"({h}, {w})" if c == 1 else f"({c}, {h}, {w})"


def signature(spec: dict[str, Any], answer: pd.DataFrame) -> ModelSignature:
    """Input: one column ``image`` of integer arrays ((H, W) for one channel, else (C, H, W)); output: the
    columns of ``answer``, a :meth:`BlockDropClassifier.predict` result.

    A column of integer arrays, not a uint8 tensor: MLflow's server casts JSON numbers to a tensor
    signature's dtype before the model sees them, so 0.5 would become a silent 0; against ``long`` arrays
    it refuses fractional numbers and strings with HTTP 400. The range 0-255 is checked by :func:`as_images`.
    """
    pixels: Array = Array(Array(DataType.long))
    if spec["shape"][0] != 1:
        pixels = Array(pixels)
    outputs = infer_signature(None, answer).outputs
    return ModelSignature(inputs=Schema([ColSpec(pixels, IMAGE_COLUMN)]), outputs=outputs)


def _bad(reason: str) -> MlflowException:
    """A refused request: ``mlflow models serve`` answers it with HTTP 400 and this one-line reason."""
    return MlflowException(reason, error_code=INVALID_PARAMETER_VALUE)


def as_images(model_input: Any, shape: list[int]) -> torch.Tensor:
    """Raw images as a (N, C, H, W) uint8 tensor, or a one-line :class:`MlflowException` (HTTP 400) saying
    what is wrong. ``model_input`` is what the logged signature describes, a one-column DataFrame whose cells
    are images ((H, W) for one channel, else (C, H, W)) as nested lists or arrays of integers 0-255, or
    directly an integer array (N, H, W) or (N, C, H, W)."""
    c, h, w = shape
    layouts = f"({h}, {w}) or ({c}, {h}, {w})" if c == 1 else f"({c}, {h}, {w})"
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise _bad(f"expected one column of images, got {model_input.shape[1]} columns")
        if len(model_input) == 0:
            raise _bad("empty batch: send at least one image")
        try:
            model_input = np.stack([np.asarray(cell) for cell in model_input.iloc[:, 0]])
        except (ValueError, TypeError):
            raise _bad(f"each image must be a rectangular array of pixels {layouts}, all of one shape") from None
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


class BlockDropClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: raw images in, one row per image out (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        backbone, policy_net = load_blockdrop(context.artifacts["weights"])  # weights_only=True
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.setup(spec, backbone.to(device), policy_net.to(device))

    def setup(self, spec: dict[str, Any], backbone: BlockResNet, policy_net: PolicyNet) -> BlockDropClassifier:
        """Make ready to predict from in-memory networks (what ``load_context`` does from the artifacts)."""
        self.spec, self.classes = spec, np.array(spec["classes"], dtype=object)
        self.flops = FlopTable(spec["flops"]["base"], tuple(spec["flops"]["blocks"]), spec["flops"]["policy"])
        self.normalize = Normalize(spec["mean"], spec["std"], next(backbone.parameters()).device)
        self.predictor = BatchedSkippingPredictor(backbone, policy_net)
        return self

    # model_input has no annotation on purpose: MLflow 3 reads predict's type hints as a second signature,
    # which would replace the logged one (:func:`signature`); the logged signature is the contract.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = as_images(model_input, self.spec["shape"])
        device = next(self.predictor.backbone.parameters()).device
        probs, keeps = [], []
        for chunk in images.split(CHUNK):
            logits, keep = self.predictor(self.normalize(chunk.to(device)))
            probs.append(logits.float().softmax(1).cpu()), keeps.append(keep.cpu())
        prob, keep = torch.cat(probs), torch.cat(keeps)
        index = prob.argmax(1).numpy()
        flops = self.flops.per_image(keep).numpy()
        return pd.DataFrame({
            "class_index": index,
            "class_name": self.classes[index],
            "probabilities": list(prob.double().numpy()),
            "policy": ["".join("1" if k else "0" for k in row) for row in keep.tolist()],
            "blocks": keep.sum(1).numpy(),
            "flops": flops,
            "flops_saved": 1.0 - flops / self.flops.full,
        })
