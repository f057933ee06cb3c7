"""Champion / challenger: score a BlockDrop model on the test split, and decide whether it replaces the champion.

:func:`decide` is a pure function of the two sets of numbers, so the rule is tested without models or a
registry. The retrain flow (``orchestration/flows.py``) scores both models with :func:`score_model`, calls
:func:`decide`, and moves the registry alias ``champion`` when it says so.

The registry is tied to DVC: the challenger is the version whose ``dvc_md5`` tag is the md5 ``dvc.lock``
records for ``models/blockdrop.pt`` (:func:`select_version`), not whatever the alias ``challenger`` points at
(a ``dvc exp run`` elsewhere may have moved it). A version is scored from its weights-only checkpoint, whose
md5 is checked against that tag before ``torch.load(weights_only=True)`` (:func:`load_version`): a registry
artifact is never unpickled. :func:`promote` moves ``champion`` only if nobody moved it meanwhile.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from blockdrop import tracking
from blockdrop.data import Normalize, Split, load_meta, load_split
from blockdrop.evaluation import variant_metrics
from blockdrop.flops import count_flops
from blockdrop.models import BlockDropNet, load_blockdrop
from blockdrop.predict import run_policy

__all__ = ["ChampionChangedError", "Decision", "PromotionError", "decide", "load_version", "locked_md5",
           "promote", "score_model", "score_on_test", "select_version"]

FLOPS_RTOL = 1e-9  # equal FLOPs, up to float summation order, are "not higher"
MODEL_OUT = "models/blockdrop.pt"  # the finetune stage's DVC out, and the artifact path in its MLflow run
MD5_TAG = "dvc_md5"  # registered-version tag: the md5 DVC records for MODEL_OUT
LOCK_FILE = Path(".dvc/tmp/blockdrop-promotion.lock")  # relative to the project root


class PromotionError(RuntimeError):
    """Promotion cannot go on (no matching version, a checkpoint that fails its md5); one line."""


class ChampionChangedError(PromotionError):
    """``champion`` moved between reading it and setting it: another promotion won."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    accuracy_delta: float | None = None  # challenger - champion (fractions)
    flops_ratio: float | None = None  # challenger / champion mean FLOPs per image

    def as_dict(self) -> dict:
        return asdict(self)


def decide(challenger: dict, champion: dict | None, tolerance: float, require_flops: bool = True) -> Decision:
    """Promote ``challenger`` unless it is less accurate than ``champion`` by more than ``tolerance``
    (accuracies are fractions, so 0.002 is 0.2 points), or, with ``require_flops``, uses more FLOPs per
    image on average. Without a champion the challenger is promoted.

    Both dicts hold at least ``accuracy`` and ``flops_mean`` (as :func:`score_model` returns them).
    """
    if champion is None:
        return Decision(True, "no champion yet")
    delta = challenger["accuracy"] - champion["accuracy"]
    ratio = challenger["flops_mean"] / champion["flops_mean"] if champion["flops_mean"] else float("inf")
    if -delta > tolerance + 1e-12:
        return Decision(False, f"accuracy {challenger['accuracy']:.4f} is {-delta:.4f} below the champion's "
                               f"{champion['accuracy']:.4f} (tolerance {tolerance:g})", delta, ratio)
    if require_flops and challenger["flops_mean"] > champion["flops_mean"] * (1 + FLOPS_RTOL):
        return Decision(False, f"mean FLOPs {challenger['flops_mean']:.4g} above the champion's "
                               f"{champion['flops_mean']:.4g}", delta, ratio)
    return Decision(True, f"accuracy {delta:+.4f} within tolerance {tolerance:g}, FLOPs x{ratio:.3f}", delta, ratio)


@torch.no_grad()
def score_model(model: BlockDropNet, test: Split, normalize: Normalize, batch_size: int = 500) -> dict:
    """Accuracy, blocks and FLOPs per image of ``model`` (greedy policy, policy network FLOPs included),
    measured exactly as the evaluate stage measures its ``blockdrop`` variant."""
    model = model.cpu().eval()
    test = test.to("cpu")
    flops = count_flops(model.backbone, tuple(test.images.shape[1:]), model.policy_net)
    logits, actions = run_policy(model.backbone, model.policy_net, test, normalize, batch_size)
    correct = logits.argmax(1) == test.labels.cpu()
    return {**variant_metrics(correct, actions, flops.per_image(actions)), "images": len(test)}


def score_on_test(model: BlockDropNet, data_dir: str | Path = "data/prepared") -> dict:
    """:func:`score_model` on the prepared test split in ``data_dir``."""
    meta = load_meta(data_dir)
    return score_model(model, load_split(data_dir, "test"), Normalize(meta.mean, meta.std, torch.device("cpu")))


# ------------------------------------------------------------------------------- registry tied to DVC


def locked_md5(root: str | Path, stage: str = "finetune", out: str = MODEL_OUT) -> str:
    """The md5 ``dvc.lock`` records for ``out`` of ``stage``: what ``dvc repro`` last produced (read as YAML,
    no DVC needed)."""
    lock = Path(root) / "dvc.lock"
    try:
        outs = yaml.safe_load(lock.read_text())["stages"][stage]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise PromotionError(f"{lock} records no outs of stage {stage} ({error!r}): run dvc repro first") from None
    for entry in outs:
        if entry.get("path") == out and entry.get("md5"):
            return entry["md5"]
    raise PromotionError(f"{lock}: stage {stage} records no md5 for {out}")


def select_version(name: str, md5: str) -> int:
    """The registered version of ``name`` built from the checkpoint whose DVC md5 is ``md5``."""
    version = tracking.find_version(name, MD5_TAG, md5)
    if version is None:
        raise PromotionError(f"no version of registered model {name} has tag {MD5_TAG}={md5} (the {MODEL_OUT} "
                             "in dvc.lock): set tracking.log_model: true and rerun finetune "
                             "(dvc repro --force --single-item finetune)")
    return version


def _cache_path(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps a file of this md5 in the project's local cache."""
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def load_version(name: str, version: int, root: str | Path = ".") -> BlockDropNet:
    """The weights of ``version``, from the DVC cache when it holds them, else from the artifact
    ``models/blockdrop.pt`` of the run that registered it; refused (PromotionError, one line naming the
    version) unless the file's md5 equals the version's ``dvc_md5`` tag. Only then is it read, with
    ``torch.load(weights_only=True)``: a tampered file is never deserialised, let alone unpickled."""
    run_id, tags = tracking.version_info(name, version)
    want = tags.get(MD5_TAG)
    if not want:
        raise PromotionError(f"registered model {name} version {version} has no {MD5_TAG} tag: it cannot be "
                             "matched to a checkpoint, so it is not loaded")
    with tempfile.TemporaryDirectory(prefix="blockdrop-version-") as tmp:
        path = _cache_path(Path(root), want)
        if not path.is_file():
            try:
                path = tracking.download_run_file(run_id, MODEL_OUT, tmp)
            except FileNotFoundError:
                raise PromotionError(f"registered model {name} version {version}: {MODEL_OUT} is neither in the "
                                     f"DVC cache nor an artifact of run {run_id}") from None
        got = tracking.dvc_md5(path)
        if got != want:
            raise PromotionError(f"registered model {name} version {version}: checkpoint md5 {got} != its "
                                 f"{MD5_TAG} tag {want}: refusing to load a tampered or mismatched file")
        return BlockDropNet(*load_blockdrop(path)).eval()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close, or when the process dies
        yield


def promote(name: str, version: int, expected: int | None, root: str | Path = ".") -> None:
    """Compare-and-swap: point ``champion`` at ``version`` only if it still points at ``expected`` (the
    version read when the decision was made; None: no champion). Raises :class:`ChampionChangedError`
    otherwise, and nothing moves.

    The re-read and the set happen under an exclusive ``flock`` on ``.dvc/tmp/blockdrop-promotion.lock``,
    so two promotions on one machine serialise and the second sees the first's result. Across machines a
    file lock protects nothing: there the retrain deployment's concurrency limit of 1 is what keeps two
    promotions from interleaving.
    """
    with _locked(Path(root) / LOCK_FILE):
        current = tracking.get_alias_version(name, "champion")
        if current != expected:
            raise ChampionChangedError(
                f"champion of {name} changed from {_v(expected)} to {_v(current)} while version {version} was "
                "being scored: not promoted (another promotion won; rerun the retrain flow to compare again)")
        tracking.set_alias(name, "champion", version)


def _v(version: int | None) -> str:
    return "none" if version is None else f"v{version}"
