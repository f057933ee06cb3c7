"""The paper profiles resolve to the authors' settings, whatever params.yaml's defaults become.

Each table below is what the authors ran (their README commands, their scripts' defaults where the README is
silent, He et al.'s backbone recipe; docs/paper.md, the authors' settings), written out key by key. A profile is
checked *resolved*: params.yaml merged with the profile (as ``python -m ops.profile`` does) and
validated, so a default changed later in params.yaml fails here unless the profile pins the key. A ``-fast``
profile must differ from its faithful profile in exactly the keys its header comment lists, to the values
it lists. ``fashion-mnist-resnet110`` is ours, not the authors': its table pins the default recipe on
ResNet-110 in the same way. The last test runs ``bench/gpu_paper.py --smoke`` on the CPU.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blockdrop.config import Params, flatten, parse_params
from ops.profile import merge

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"

# --- the authors' settings ----------------------------------------------------------------------------------

CIFAR10_R32 = {
    "precision": "fp32", "compile": False,  # PyTorch 0.3, fp32
    "data.source": "cifar10", "data.val_size": 5000, "data.train_limit": 0, "data.test_limit": 0,
    "model.depth": 32, "model.policy_pool": 1,  # Policy32 on the whole image
    # the backbone recipe (He et al. 2016, via felixgwu/img_classification_pk_pytorch): 164 epochs, SGD lr 0.1
    # x0.1 at 50% and 75%, momentum 0.9, weight decay 1e-4, batch 128, crop 32 with padding 4, flip
    "pretrain.epochs": 164, "pretrain.batch_size": 128, "pretrain.lr": 0.1, "pretrain.lr_schedule": "step",
    "pretrain.warmup_epochs": 0.0, "pretrain.momentum": 0.9, "pretrain.weight_decay": 1e-4,
    "pretrain.label_smoothing": 0.0, "pretrain.drop_path": 0.0, "pretrain.drop_path_unit": "image",
    "pretrain.crop_padding": 4, "pretrain.crop_size": 0, "pretrain.full_size_epochs": 0, "pretrain.flip": True,
    # cl_training.py's defaults: Adam lr 1e-3, batch 256, 10000 epochs, gamma 1, alpha 0.8, beta 0.1
    "curriculum.epochs": 10000, "curriculum.images_per_epoch": 45000, "curriculum.batch_size": 256,
    "curriculum.lr": 1e-3, "curriculum.alpha": 0.8, "curriculum.beta": 0.1, "curriculum.penalty": 1.0,
    "curriculum.crop_padding": 4, "curriculum.flip": True, "curriculum.val_images": 0, "curriculum.unlock_every": 0,
    # cl_training.py's entropy term: -p' log p' over all K blocks; the README names no checkpoint: the last epoch
    "curriculum.entropy": "authors", "curriculum.keep_epoch": 0,
    "curriculum.cost": "blocks",  # the paper's reward: every block costs 1/K (so in finetuning too)
    # finetune.py's defaults: Adam lr 1e-4 over both nets, batch 256, gamma 5, 2000 epochs, x0.1 at 1600,
    # the policy-gradient term summed over the batch, the dense masked forward, no extra loss
    "finetune.epochs": 2000, "finetune.images_per_epoch": 45000, "finetune.batch_size": 256, "finetune.lr": 1e-4,
    "finetune.backbone_lr": 0.0, "finetune.alpha": 0.8, "finetune.penalty": 5.0, "finetune.pg_reduction": "sum",
    "finetune.execution": "masked", "finetune.greedy_ce": 0.0, "finetune.distill": 0.0, "finetune.lr_decay_epoch": 1600,
    "finetune.lr_decay": 0.1, "finetune.crop_padding": 4, "finetune.flip": True, "finetune.cost": "blocks",
}
CIFAR100_R32 = {**CIFAR10_R32, "data.source": "cifar100"}
# ResNet-110: He et al. warm up at lr 0.01 for about an epoch
CIFAR100_R110 = {**CIFAR100_R32, "model.depth": 110, "pretrain.warmup_epochs": 1.0}
# The README's R110_C10 commands: curriculum batch 2048 for 5000 epochs; finetune gamma 10, from ckpt_E_5300,
# past the 5000 epochs: the last epoch (keep_epoch 0)
CIFAR10_R110 = {**CIFAR10_R32, "model.depth": 110, "pretrain.warmup_epochs": 1.0, "curriculum.epochs": 5000,
                "curriculum.batch_size": 2048, "finetune.penalty": 10.0}
# The README's R101_ImgNet commands: curriculum batch 2048 for 45 epochs; finetune gamma 5, batch 320, 10 epochs
# (finetune.py's decay at epoch 1600 never comes); the backbone imported, not trained; resize 256, crop 224
IMAGENET_R101 = {
    "precision": "fp32", "compile": False,
    "data.source": "imagenet", "data.val_size": 10000, "data.train_limit": 0, "data.test_limit": 0,
    "data.resize": 256, "data.image_size": 224,
    "model.depth": 101, "model.weights": "models/pretrained/resnet101-63fe2227.pth",
    "model.policy_weights": "models/pretrained/resnet18-f37072fd.pth", "model.policy_pool": 2,  # Policy224: 112 px
    "pretrain.epochs": 0, "pretrain.warmup_epochs": 0.0, "pretrain.crop_padding": 0, "pretrain.crop_size": 0,
    "pretrain.full_size_epochs": 0,
    "curriculum.epochs": 45, "curriculum.images_per_epoch": 1271167, "curriculum.batch_size": 2048,
    "curriculum.lr": 1e-3, "curriculum.alpha": 0.8, "curriculum.beta": 0.1, "curriculum.penalty": 1.0,
    "curriculum.crop_padding": 0, "curriculum.flip": True, "curriculum.val_images": 0, "curriculum.unlock_every": 0,
    # the README finetunes from ckpt_E_4 (0-based): the policy after 5 epochs
    "curriculum.entropy": "authors", "curriculum.keep_epoch": 5,
    "curriculum.cost": "blocks",  # the paper's reward: every block costs 1/K (so in finetuning too)
    "finetune.epochs": 10, "finetune.images_per_epoch": 1271167, "finetune.batch_size": 320, "finetune.lr": 1e-4,
    "finetune.backbone_lr": 0.0, "finetune.alpha": 0.8, "finetune.penalty": 5.0, "finetune.pg_reduction": "sum",
    "finetune.execution": "masked", "finetune.greedy_ce": 0.0, "finetune.distill": 0.0, "finetune.lr_decay_epoch": 0,
    "finetune.lr_decay": 0.1, "finetune.crop_padding": 0, "finetune.flip": True, "finetune.cost": "blocks",
}

# The fast profiles: the faithful one plus exactly these departures (each listed in the profile's header).
CIFAR10_R110_FAST = {**CIFAR10_R110, "precision": "bf16", "compile": True, "pretrain.batch_size": 512,
                     "pretrain.lr": 0.4, "pretrain.warmup_epochs": 2.0, "pretrain.drop_path": 0.2,
                     "curriculum.epochs": 300, "curriculum.unlock_every": 40, "finetune.epochs": 400,
                     "finetune.lr_decay_epoch": 320}
IMAGENET_R101_FAST = {**IMAGENET_R101, "precision": "bf16", "compile": True, "data.val_size": 5000,
                      "curriculum.epochs": 30, "curriculum.images_per_epoch": 200000, "curriculum.unlock_every": 40,
                      "curriculum.val_images": 2000, "curriculum.keep_epoch": 0, "finetune.epochs": 6,
                      "finetune.images_per_epoch": 640000}

# Not a paper profile: the default recipe (params.yaml when it was written) on ResNet-110, every key pinned so
# that a later default cannot move it; its header lists what it changed from the default and why.
FASHION_R110 = {
    "precision": "auto", "compile": False,
    "data.source": "fashion-mnist", "data.val_size": 5000, "data.train_limit": 0, "data.test_limit": 0,
    "model.depth": 110, "model.policy_pool": 2,
    "pretrain.epochs": 4, "pretrain.batch_size": 128, "pretrain.lr": 0.1, "pretrain.lr_schedule": "cosine",
    "pretrain.warmup_epochs": 1.0, "pretrain.momentum": 0.9, "pretrain.weight_decay": 5e-4,
    "pretrain.label_smoothing": 0.1, "pretrain.drop_path": 0.5, "pretrain.drop_path_unit": "image",
    "pretrain.crop_padding": 0, "pretrain.crop_size": 20, "pretrain.full_size_epochs": 0, "pretrain.flip": True,
    "curriculum.epochs": 24, "curriculum.images_per_epoch": 5000, "curriculum.batch_size": 256,
    "curriculum.lr": 1e-3, "curriculum.alpha": 0.8, "curriculum.beta": 0.1, "curriculum.penalty": 1.0,
    "curriculum.crop_padding": 4, "curriculum.flip": True, "curriculum.val_images": 2000, "curriculum.unlock_every": 4,
    "curriculum.entropy": "bernoulli", "curriculum.keep_epoch": 0, "curriculum.cost": "blocks",
    "finetune.epochs": 8, "finetune.images_per_epoch": 24000, "finetune.batch_size": 256, "finetune.lr": 1e-4,
    "finetune.backbone_lr": 3e-4, "finetune.alpha": 0.8, "finetune.penalty": 2.0, "finetune.pg_reduction": "mean",
    "finetune.execution": "sparse", "finetune.greedy_ce": 1.0, "finetune.distill": 0.0, "finetune.lr_decay_epoch": 0,
    "finetune.lr_decay": 0.1, "finetune.crop_padding": 4, "finetune.flip": True, "finetune.cost": "blocks",
}

TABLES = {
    "cifar10-resnet32": CIFAR10_R32, "cifar10-resnet110": CIFAR10_R110, "cifar100-resnet32": CIFAR100_R32,
    "cifar100-resnet110": CIFAR100_R110, "imagenet-resnet101": IMAGENET_R101,
    "cifar10-resnet110-fast": CIFAR10_R110_FAST, "imagenet-resnet101-fast": IMAGENET_R101_FAST,
    "fashion-mnist-resnet110": FASHION_R110,
}
FAST = {"cifar10-resnet110-fast": "cifar10-resnet110", "imagenet-resnet101-fast": "imagenet-resnet101"}
# docs/paper.md, backbones: K of each backbone
BLOCKS = {"cifar10-resnet32": 15, "cifar100-resnet32": 15, "cifar10-resnet110": 54, "cifar100-resnet110": 54,
          "cifar10-resnet110-fast": 54, "imagenet-resnet101": 33, "imagenet-resnet101-fast": 33,
          "fashion-mnist-resnet110": 54}

# Keys of the checked sections that change nothing in a profile: where raw files live, a Fashion-MNIST-only
# check, ImageNet-only sizes and weights (the config refuses weights for a CIFAR ResNet), and the pretraining
# optimiser of a backbone that is imported (pretrain.epochs 0).
SECTIONS = ("data", "model", "pretrain", "curriculum", "finetune")
IRRELEVANT_ALWAYS = {"data.raw", "data.verify_checksums", "data.transforms"}
IRRELEVANT_CIFAR = IRRELEVANT_ALWAYS | {"data.resize", "data.image_size", "model.weights", "model.policy_weights"}
IRRELEVANT_IMPORTED = IRRELEVANT_ALWAYS | {f"pretrain.{k}" for k in (
    "batch_size", "lr", "lr_schedule", "momentum", "weight_decay", "label_smoothing", "drop_path", "drop_path_unit",
    "flip")}


def irrelevant(name: str) -> set[str]:
    return IRRELEVANT_IMPORTED if name.startswith("imagenet") else IRRELEVANT_CIFAR


def raw_defaults() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def resolve(name: str, defaults: dict | None = None) -> dict:
    """params.yaml (or ``defaults``) merged with the profile, as ops.profile does; dotted values."""
    raw = copy.deepcopy(defaults if defaults is not None else raw_defaults())
    merge(raw, yaml.safe_load((PROFILES / f"{name}.yaml").read_text()))
    return raw


def resolved_params(name: str) -> Params:
    return parse_params(resolve(name))


def test_every_profile_has_a_table() -> None:
    assert {p.stem for p in PROFILES.glob("*.yaml")} - {"tiny"} == set(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_resolved_profile_is_its_table(name: str) -> None:
    flat = flatten(resolved_params(name).model_dump())
    table = TABLES[name]
    assert {k: flat[k] for k in table} == table
    depth = flat["model.depth"]
    assert (33 if depth == 101 else (depth - 2) // 2) == BLOCKS[name]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_covers_every_key_that_matters(name: str) -> None:
    flat = flatten(resolved_params(name).model_dump())
    keys = {k for k in flat if k.split(".")[0] in SECTIONS} | {"precision", "compile"}
    assert set(TABLES[name]) | irrelevant(name) == keys
    assert not set(TABLES[name]) & irrelevant(name)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_changed_default_cannot_leak_into_a_profile(name: str) -> None:
    # Change params.yaml's default of every key the table holds; the resolved profile must not see any of it.
    defaults = raw_defaults()
    for key in TABLES[name]:
        section, _, leaf = key.rpartition(".")
        (defaults[section] if section else defaults)[leaf] = "<changed default>"
    flat = flatten(resolve(name, defaults))
    leaked = sorted(k for k in TABLES[name] if flat[k] == "<changed default>")
    assert leaked == [], f"{name} does not set {leaked}: it inherits params.yaml's default"


def listed_departures(name: str) -> dict[str, str]:
    """``key: old -> new`` pairs in the profile's header comment: {key: new value as written}."""
    header = [line for line in (PROFILES / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    return {m.group(1): m.group(2) for line in header if line.startswith("#   - ")
            for m in re.finditer(r"([a-z_]+(?:\.[a-z_]+)?): [^ ,]+ -> ([^ ,:]+)", line)}


@pytest.mark.parametrize("fast", sorted(FAST))
def test_fast_profile_departs_exactly_where_its_comments_say(fast: str) -> None:
    base = flatten(resolved_params(FAST[fast]).model_dump())
    ours = flatten(resolved_params(fast).model_dump())
    changed = {k for k in ours if ours[k] != base[k]}
    listed = listed_departures(fast)
    assert changed == set(listed)
    for key, written in listed.items():
        value = yaml.safe_load(written)
        assert ours[key] == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.parametrize("name", [*sorted(FAST), "fashion-mnist-resnet110"])
def test_short_curriculum_unlocks_every_block_within_its_first_half(name: str) -> None:
    c, k = resolved_params(name).curriculum, BLOCKS[name]
    train_images = c.images_per_epoch  # capped by the training split, which is larger in these profiles
    steps = c.epochs * -(-train_images // c.batch_size)
    assert c.unlock_every * (k - 1) < steps / 2  # every block learnable for at least half of the stage


@pytest.mark.parametrize("fast", sorted(FAST))
def test_fast_profile_runs_what_compile_needs(fast: str) -> None:
    p = resolved_params(fast)
    assert p.precision == "bf16" and p.compile and p.finetune.execution == "masked"


@pytest.mark.e2e
def test_paper_profiles_apply_with_the_profile_command(tmp_path: Path) -> None:
    for name in TABLES:
        params = tmp_path / f"{name}.yaml"
        params.write_text((REPO / "params.yaml").read_text())
        subprocess.run([sys.executable, "-m", "ops.profile", str(PROFILES / f"{name}.yaml"), "--params",
                        str(params)], cwd=REPO, check=True, capture_output=True)
        flat = flatten(parse_params(yaml.safe_load(params.read_text())).model_dump())
        assert {k: flat[k] for k in TABLES[name]} == TABLES[name]


# --- bench/gpu_paper.py -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_gpu_bench_smoke_prints_rates_and_a_projection() -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_paper.py", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rates = dict(re.findall(r"^rate +(\w+) +([\d.]+) images/s", out, re.M))
    assert set(rates) == {"pretrain", "curriculum", "finetune", "evaluate"}
    assert all(float(r) > 0 for r in rates.values())
    projected = dict(re.findall(r"^projected +(\w+) +([\d.]+) min", out, re.M))
    assert set(projected) == {"pretrain", "curriculum", "finetune", "evaluate", "total"}
    parts = sum(float(projected[s]) for s in ("pretrain", "curriculum", "finetune", "evaluate"))
    assert float(projected["total"]) == pytest.approx(parts, abs=0.2)
    assert re.search(r"^ratio +curriculum / pretrain +[\d.]+", out, re.M)  # figures measured in this run
