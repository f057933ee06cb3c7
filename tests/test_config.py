"""blockdrop.config: every mistake in params.yaml stops a stage with the key's dotted name."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blockdrop.config import (
    Params,
    ParamsError,
    check_data_fit,
    flatten,
    load_params,
    params_sha256,
    parse_params,
    select_params,
)
from blockdrop.lineage import stage_param_keys

REPO = Path(__file__).resolve().parents[1]
REPO_PARAMS = REPO / "params.yaml"


def repo_params() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def merged(snippet: str) -> dict:
    """The repo's params.yaml with the YAML ``snippet`` deep-merged over it."""

    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(repo_params(), yaml.safe_load(snippet))


# (YAML snippet merged into the repo's params.yaml, the dotted key the message must name)
MISTAKES = [
    ("colour: red", "colour"),  # unknown top-level key
    ("pretrain: {epochz: 3}", "pretrain.epochz"),  # misspelt nested key
    ("pretrain: {epochs: '5'}", "pretrain.epochs"),  # a string is not an int
    ("pretrain: {epochs: 5.0}", "pretrain.epochs"),  # nor is a float
    ("pretrain: {flip: 1}", "pretrain.flip"),  # 1 is not a bool
    ("finetune: {lr: fast}", "finetune.lr"),
    ("pretrain: {epochs: -1}", "pretrain.epochs"),  # must not be negative
    ("curriculum: {alpha: 0.4}", "curriculum.alpha"),  # alpha <= 0.5 would invert the policy
    ("curriculum: {alpha: 1.5}", "curriculum.alpha"),
    ("pretrain: {label_smoothing: 1.0}", "pretrain.label_smoothing"),
    ("data: {val_size: -1}", "data.val_size"),
    ("data: {source: mnist}", "data.source"),
    ("precision: fp16", "precision"),
    ("finetune: {pg_reduction: max}", "finetune.pg_reduction"),
    ("model: {depth: 2}", "model.depth"),  # below the smallest ResNet
    ("pretrain: {crop_size: 22}", "pretrain.crop_size"),  # 22 -> 11 -> the shortcut's pooling gives 5, not 6
    ("evaluate: {batch_size: 0}", "evaluate.batch_size"),
    ("curriculum: {penalty: -1.0}", "curriculum.penalty"),
    ("seed: -3", "seed"),
    ("data: {raw: 5}", "data.raw"),
    ("data: {raw: ''}", "data.raw"),
    ("finetune: {lr: .inf}", "finetune.lr"),  # non-finite floats: exit 0 with NaN weights before
    ("flow: {retry_delay_s: .nan}", "flow.retry_delay_s"),
    ("data: {val_size: 0}", "data.val_size"),  # the RL stages score the policy on val
    ("curriculum: {cost: time}", "curriculum.cost"),  # blocks | flops | latency
    ("finetune: {cost: Flops}", "finetune.cost"),
]


@pytest.mark.parametrize(("snippet", "key"), MISTAKES, ids=[k + ":" + s for s, k in MISTAKES])
def test_parse_params_names_the_dotted_key(snippet: str, key: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(merged(snippet))
    message = str(info.value)
    assert "\n" not in message
    # The message starts with the key (one mistake), so "pretrain.epochs" is not matched by "epochs" alone.
    assert message.startswith(f"{key}:"), message


def test_bad_depth_names_model_depth() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(merged("model: {depth: 33}"))
    assert "model.depth" in str(info.value)


def test_bad_depth_is_rejected_with_the_6n_plus_2_rule() -> None:
    # What holds today: depth 33 is refused, the message says why and which section.
    with pytest.raises(ParamsError, match=r"^model\b.*6n\+2.*33"):
        parse_params(merged("model: {depth: 33}"))


@pytest.mark.parametrize("depth", [8, 20, 32, 56, 110])
def test_valid_depths(depth: int) -> None:
    assert parse_params(merged(f"model: {{depth: {depth}}}")).model.depth == depth


def test_two_mistakes_are_both_reported_on_one_line() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(merged("pretrain: {epochs: 0}\ncurriculum: {alpha: 0.4}"))
    message = str(info.value)
    assert "pretrain.epochs" in message and "curriculum.alpha" in message and "\n" not in message


def test_unknown_key_message_says_unknown() -> None:
    with pytest.raises(ParamsError, match=r"^pretrain\.epochz: unknown key$"):
        parse_params(merged("pretrain: {epochz: 3}"))


def test_strict_types_accept_the_right_ones() -> None:
    p = parse_params(merged("finetune: {lr: 1}\npretrain: {flip: false, epochs: 7}"))
    assert p.finetune.lr == 1.0 and p.pretrain.flip is False and p.pretrain.epochs == 7


@pytest.mark.parametrize("cost", ["blocks", "flops", "latency"])
def test_block_costs_are_accepted(cost: str) -> None:
    p = parse_params(merged(f"curriculum: {{cost: {cost}}}\nfinetune: {{cost: {cost}}}"))
    assert (p.curriculum.cost, p.finetune.cost) == (cost, cost)
    assert (Params().curriculum.cost, Params().finetune.cost) == ("blocks", "blocks")  # the paper's reward


def test_params_are_frozen() -> None:
    p = parse_params({})
    with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError on a frozen model)
        p.seed = 1  # type: ignore[misc]


def test_empty_mapping_gives_the_defaults() -> None:
    p = parse_params({})
    assert p == Params()
    assert (p.model.depth, p.data.source, p.curriculum.alpha) == (32, "fashion-mnist", 0.8)


def test_repo_params_yaml_loads() -> None:
    p = load_params(REPO_PARAMS)
    raw = repo_params()
    assert p.model.depth == raw["model"]["depth"]
    assert p.data.source == raw["data"]["source"]
    assert p.finetune.penalty == raw["finetune"]["penalty"]
    # Every key written in params.yaml is a field: nothing was silently dropped.
    written = flatten(raw)
    loaded = flatten(p.model_dump())
    assert {k: loaded[k] for k in written} == written


def test_load_params_bad_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(merged("curriculum: {alpha: 1.5}")))
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "curriculum.alpha" in lines[0] and str(path) in lines[0]


def test_load_params_can_raise_instead(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("pretrain: {epochs: 0}\n")
    with pytest.raises(ParamsError, match=r"pretrain\.epochs"):
        load_params(path, exit_on_error=False)


@pytest.mark.parametrize(("text", "expected"), [
    ("pretrain: {epochs: [1\n", "cannot read"),  # broken YAML
    ("- 1\n- 2\n", "top level must be a mapping"),
])
def test_load_params_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture, text: str, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        load_params(path)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_load_params_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        load_params(tmp_path / "nope.yaml")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nope.yaml" in lines[0]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_flatten() -> None:
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": {}, "f": 3, "g": [1, 2]}
    assert flatten(tree) == {"a.b": 1, "a.c.d": 2, "e": {}, "f": 3, "g": [1, 2]}
    assert flatten({"x": {"y": 1}}, "p.") == {"p.x.y": 1}


DVC_YAML = {
    "stages": {
        "pretrain": {
            "cmd": "python -m pipelines.pretrain",
            "params": ["seed", "model", "pretrain.epochs", {"params.yaml": ["pretrain.lr"]},
                       {"other.yaml": ["ignored.key"]}],
        },
        "bare": {"cmd": "true"},
    }
}


def test_stage_param_keys(tmp_path: Path) -> None:
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(yaml.safe_dump(DVC_YAML))
    assert stage_param_keys("pretrain", dvc_yaml) == ["seed", "model", "pretrain.epochs", "pretrain.lr"]
    assert stage_param_keys("bare", dvc_yaml) == []
    assert stage_param_keys("nope", dvc_yaml) is None
    assert stage_param_keys("pretrain", tmp_path / "missing.yaml") is None


def test_stage_param_keys_reads_cwd_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    monkeypatch.chdir(tmp_path)
    assert stage_param_keys("pretrain") == ["seed", "model", "pretrain.epochs", "pretrain.lr"]


def test_repo_dvc_yaml_keys_are_real_params() -> None:
    # Every key a stage of the repo's dvc.yaml declares selects at least one param.
    params = load_params(REPO_PARAMS)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages:
        for key in stage_param_keys(name, REPO / "dvc.yaml") or []:
            assert select_params(params, [key]), f"stage {name}: params key {key!r} selects nothing"


def test_select_params() -> None:
    p = parse_params(merged("seed: 4\npretrain: {epochs: 9}"))
    selected = select_params(p, ["seed", "model", "pretrain.epochs", "pretrain.lr"])
    assert selected == {"seed": 4, "model.depth": 32, "model.weights": "", "model.policy_weights": "",
                        "model.policy_pool": p.model.policy_pool, "pretrain.epochs": 9, "pretrain.lr": p.pretrain.lr}
    # A key is a whole name or a section: "pretrain.epoch" selects nothing.
    assert select_params(p, ["pretrain.epoch"]) == {}
    assert select_params(p, []) == {}
    everything = select_params(p, None)
    assert everything["finetune.pg_reduction"] == "mean" and everything["data.source"] == "fashion-mnist"
    assert set(select_params(p, ["pretrain"])) == {k for k in everything if k.startswith("pretrain.")}


def test_params_sha256_depends_only_on_selected_keys() -> None:
    a = parse_params({})
    b = parse_params({"finetune": {"penalty": 9.0}})
    keys = ["seed", "pretrain"]
    assert params_sha256(a, keys) == params_sha256(b, keys)
    assert params_sha256(a) != params_sha256(b)
    assert params_sha256(a, ["finetune"]) != params_sha256(b, ["finetune"])
    assert len(params_sha256(a)) == 64


@pytest.mark.e2e
def test_prepare_stage_refuses_bad_params_before_writing(tmp_path: Path) -> None:
    raw = repo_params()
    raw["data"]["val_size"] = -5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "data.val_size" in lines[0]
    assert not (tmp_path / "data" / "prepared").exists()
    assert not (tmp_path / "data").exists()


def test_conflict_names_every_key_it_involves() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(merged("pretrain: {warmup_epochs: 4.5, epochs: 4}"))
    assert str(info.value) == "pretrain.warmup_epochs, pretrain.epochs: warm-up of 4.5 epochs is longer than the " \
                              "4 epochs of training"
    assert parse_params(merged("pretrain: {warmup_epochs: 4, epochs: 4}")).pretrain.warmup_epochs == 4


def test_transforms_choose_only_for_a_folder_of_images() -> None:
    assert parse_params(merged("data: {source: imagenet}\nmodel: {depth: 101, weights: w.pth}\n"
                               "pretrain: {crop_size: 0}\ncurriculum: {crop_padding: 0}\nfinetune: {crop_padding: 0}"
                               )).data.streamed  # auto: ImageNet's own
    assert not parse_params(merged("data: {source: folder}")).data.streamed  # auto: a folder in memory
    for yaml_text in ("data: {transforms: imagenet}", "data: {source: imagenet, transforms: cifar}"):
        with pytest.raises(ParamsError, match=r"^data\.transforms, data\.source: \S+ is read with \w+-style "):
            parse_params(merged(yaml_text))
    streamed = "data: {source: folder, transforms: imagenet, resize: 36, image_size: 32}\n"
    folder = parse_params(merged(streamed + "pretrain: {crop_size: 0}\ncurriculum: {crop_padding: 0}\n"
                                            "finetune: {crop_padding: 0}"))
    assert folder.data.streamed and folder.model.depth == 32  # a folder goes with a CIFAR ResNet too
    with pytest.raises(ParamsError, match=r"^pretrain\.crop_size, curriculum\.crop_padding, finetune\.crop_padding, "
                                          r"data\.transforms: imagenet-style images"):
        parse_params(merged(streamed))


def test_conflict_across_sections_names_keys_from_the_root() -> None:
    # pydantic reports a model-level error at the section (loc ends before the key): _describe adds the keys.
    with pytest.raises(ParamsError) as info:
        parse_params(merged("data: {test_limit: 100}"))  # 30 warm-up + 300 timed latency images
    assert str(info.value).startswith("evaluate.latency_warmup, evaluate.latency_images, data.test_limit: 30 "), info
    # Conflicts are checked once every field is valid: a field error alone is reported first.
    with pytest.raises(ParamsError, match=r"^seed: [^;]*$"):
        parse_params(merged("data: {test_limit: 100}\nseed: -1"))


# (stage, YAML over the repo params, shape C H W, split sizes, the key the message must start with or None)
DATA_FIT = [
    ("pretrain", "pretrain: {crop_size: 32, crop_padding: 0}", [1, 28, 28], {}, "pretrain.crop_size"),
    ("pretrain", "pretrain: {crop_size: 32, crop_padding: 2}", [1, 28, 28], {}, None),  # fits once padded
    ("pretrain", "pretrain: {crop_size: 28, crop_padding: 0}", [3, 32, 28], {}, None),
    ("prepare", "data: {val_size: 100}", [1, 28, 28], {"train": 100, "test": 10}, "data.val_size"),
    ("prepare", "data: {val_size: 99, train_limit: 2}", [1, 28, 28], {"train": 100, "test": 10}, "data.train_limit"),
    ("prepare", "data: {val_size: 98, train_limit: 2, test_limit: 10}", [1, 28, 28],
     {"train": 100, "test": 10}, None),
    ("prepare", "data: {test_limit: 11}", [1, 28, 28], {"train": 60000, "test": 10}, "data.test_limit"),
    ("curriculum", "", [1, 28, 28], {"train": 10, "val": 0}, "data.val_size"),
    ("finetune", "", [1, 28, 28], {"train": 10, "val": 1}, None),
    # finetune-full trains on finetune's budget: under several processes, finetune's batch must fit the data
    ("finetune-full", "dist: {nproc: 2}\nfinetune: {batch_size: 64}", [1, 28, 28], {"train": 50, "val": 1},
     "finetune.batch_size"),
    ("finetune-full", "dist: {nproc: 2}\nfinetune: {batch_size: 64}", [1, 28, 28], {"train": 64, "val": 0}, None),
    ("evaluate", "evaluate: {latency_warmup: 5, latency_images: 6}", [1, 28, 28], {"test": 10},
     "evaluate.latency_warmup"),
    ("evaluate", "evaluate: {latency_warmup: 5, latency_images: 5}", [1, 28, 28], {"test": 10}, None),
]


def fit_params(snippet: str) -> Params:
    """The repo params with ``snippet``; unless it sets them, 1 + 5 latency images, so that a small
    ``data.test_limit`` passes the schema's own latency check and the case tests check_data_fit alone."""
    raw = merged(snippet or "{}")
    if "evaluate" not in (yaml.safe_load(snippet) or {}):
        raw["evaluate"] |= {"latency_warmup": 1, "latency_images": 5}
    return parse_params(raw)


@pytest.mark.parametrize(("stage", "snippet", "shape", "sizes", "key"), DATA_FIT)
def test_check_data_fit(stage: str, snippet: str, shape: list[int], sizes: dict, key: str | None) -> None:
    params = fit_params(snippet)
    if key is None:
        check_data_fit(params, stage, shape, sizes)
        return
    with pytest.raises(ParamsError) as info:
        check_data_fit(params, stage, shape, sizes)
    assert str(info.value).startswith(key) and "\n" not in str(info.value), info.value


def test_device_cuda_without_a_gpu_is_a_params_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from blockdrop.runtime import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match=r"^device: cuda"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
