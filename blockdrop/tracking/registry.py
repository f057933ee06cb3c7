"""The model registry: logging and registering the BlockDrop pyfunc, finding versions, tags and aliases.

One registered model per dataset and depth (:func:`registry_name`); ``finetune`` registers each new model as a
version and points ``challenger`` at it, and promotion (:mod:`blockdrop.promotion`) moves ``champion``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from blockdrop.tracking.costs import clock
from blockdrop.tracking.store import check_reachable, client, tracking_uri

__all__ = ["SERVING_PINS", "describe_version", "download_run_file", "find_version", "get_alias_version",
           "latest_version", "load_registered_model", "log_blockdrop_model", "registry_name", "set_alias",
           "set_version_tags", "version_info"]

SERVING_PINS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pydantic", "PyYAML", "psutil", "tqdm",
                "cloudpickle")  # what blockdrop.serving imports, at the versions it was logged with


def registry_name(dataset: str, depth: int) -> str:
    """``("fashion-mnist", 32)`` -> ``"blockdrop-fashion-mnist-resnet32"``; ``dataset`` is the source, or a folder
    source's folder name (:attr:`blockdrop.config.Data.dataset`), kept to letters, digits, ``.``, ``_`` and
    ``-``: MLflow refuses ``/`` and ``:`` in a name, and a name must read unquoted in a ``models:/<name>@alias``
    URI, so accents are dropped (é: e) and any other run of characters (a space, a colon) becomes one ``-``."""
    plain = unicodedata.normalize("NFKD", dataset).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", plain).strip("-.") or "folder"
    return f"blockdrop-{safe}-resnet{depth}"


def log_blockdrop_model(checkpoint: str | Path, spec: Mapping[str, Any], input_example: Any, registered_name: str,
                        version_tags: Mapping[str, Any] | None = None, description: str | None = None) -> int:
    """Log the self-contained pyfunc of :mod:`blockdrop.serving` to the active run: the weights-only
    ``checkpoint`` and ``spec`` (:func:`blockdrop.serving.model_spec`) as artifacts, this library as
    ``code_paths``, :func:`blockdrop.serving.signature` with the model's answer to ``input_example`` (raw
    images: a DataFrame with one column ``image``).
    Register it, describe and tag the new version with ``version_tags`` (e.g. ``dvc_md5``, the md5 DVC records
    for the checkpoint), and only then point the alias ``challenger`` at it, so a version an alias names
    always carries its tags.

    Pinned requirements skip MLflow's slow requirement inference and make serving match training.
    """
    with clock(model=True):
        import tempfile

        import mlflow.pyfunc

        from blockdrop import serving
        from blockdrop.models import load_blockdrop

        local = serving.BlockDropClassifier().setup(dict(spec), *load_blockdrop(checkpoint))
        signature = serving.signature(dict(spec), local.predict(None, input_example))
        pins = [f"{pkg}=={package_version(pkg)}" for pkg in SERVING_PINS]
        with tempfile.TemporaryDirectory(prefix="blockdrop-model-") as tmp:
            spec_file = Path(tmp) / serving.SPEC_FILE
            spec_file.write_text(json.dumps(spec, indent=2))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=serving.BlockDropClassifier(),
                artifacts={"weights": str(checkpoint), "spec": str(spec_file)},
                code_paths=[str(Path(serving.__file__).parent)], signature=signature, input_example=input_example,
                pip_requirements=pins, registered_model_name=registered_name,
            )
        store = MlflowClient()
        registered = info.registered_model_version
        if description:
            store.update_model_version(registered_name, registered, description=description)
        for key, value in (version_tags or {}).items():
            store.set_model_version_tag(registered_name, registered, key, str(value))
        store.set_registered_model_alias(registered_name, "challenger", registered)
        return int(registered)


def latest_version(name: str) -> int | None:
    """The highest version of registered model ``name`` (None: no such model, or no version yet)."""
    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in versions), default=None)


def get_alias_version(name: str, alias: str) -> int | None:
    """The version ``alias`` (``"champion"``, ``"challenger"``) points at, or None if it is not set."""
    try:
        return int(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST for the model or the alias
        return None


def find_version(name: str, tag: str, value: str) -> int | None:
    """The highest version of ``name`` whose tag ``tag`` equals ``value`` (None: none does). Filtered here,
    not in the store's query language, so any store (SQLite, a server) answers the same."""
    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in versions if v.tags.get(tag) == value), default=None)


def version_info(name: str, version: int | str) -> tuple[str | None, dict[str, str]]:
    """The run that logged ``version`` of ``name``, and the version's tags."""
    v = client().get_model_version(name, str(version))
    return v.run_id, dict(v.tags)


def set_version_tags(name: str, version: int | str, tags: Mapping[str, Any]) -> None:
    """Add (or overwrite) tags on one registered version (``test_accuracy``, ``flops_mean``...)."""
    store = client()
    for key, value in tags.items():
        store.set_model_version_tag(name, str(version), key, str(value))


def describe_version(name: str, version: int | str, description: str) -> None:
    """Replace the description of one registered version (evaluate writes the test split's numbers)."""
    client().update_model_version(name, str(version), description=description)


def set_alias(name: str, alias: str, version: int) -> None:
    """Point ``alias`` at ``version`` (moving it if it pointed elsewhere)."""
    client().set_registered_model_alias(name, alias, str(version))


def download_run_file(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """One artifact file of a run, copied under ``dst``; FileNotFoundError if the run has none there."""
    import mlflow.artifacts

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=uri))
    except (MlflowException, OSError) as error:
        raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}: {error}") from None


def load_registered_model(name: str, version: int | str) -> Any:
    """The pyfunc of ``name`` at ``version`` (a number, or an alias such as ``"champion"``)."""
    import mlflow.pyfunc

    ref = f"models:/{name}/{version}" if str(version).isdigit() else f"models:/{name}@{version}"
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(ref)
