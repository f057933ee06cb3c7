"""The sweep's grid, without running it: settings and their experiment names, ``--set``, the ``-S`` spelling."""

from __future__ import annotations

import pytest

from blockdrop.config import ParamsError
from orchestration.grid import expand, parse_set


def test_every_combination_is_one_setting_named_after_its_values_in_grid_order():
    settings = expand({"finetune.penalty": [1.0, 3.4], "model.policy_pool": [0, 2]})
    assert [s.name for s in settings] == ["sweep-penalty-1_policy_pool-0", "sweep-penalty-1_policy_pool-2",
                                          "sweep-penalty-3.4_policy_pool-0", "sweep-penalty-3.4_policy_pool-2"]
    assert settings[3].values == (("finetune.penalty", 3.4), ("model.policy_pool", 2))


def test_keys_that_end_alike_keep_their_section_and_odd_values_stay_valid_ref_names():
    settings = expand({"curriculum.penalty": [1.0], "finetune.penalty": [2.5], "data.source": ["cifar10"],
                       "finetune.pg_reduction": ["a b/c"]}, prefix="grid")
    assert [s.name for s in settings] == [
        "grid-curriculum-penalty-1_finetune-penalty-2.5_source-cifar10_pg_reduction-a_b_c"]


def test_overrides_are_yaml_so_dvc_reads_back_the_same_types():
    (setting,) = expand({"finetune.penalty": [2.0], "pretrain.flip": [False], "seed": [1], "data.source": ["cifar10"],
                         "finetune.lr": [1e-4]})
    assert setting.overrides == ["finetune.penalty=2.0", "pretrain.flip=false", "seed=1", "data.source=cifar10",
                                 "finetune.lr=0.0001"]


def test_set_arguments_become_a_grid_of_yaml_values():
    assert parse_set(["finetune.penalty=1,2.5", "pretrain.flip=true,false", "data.source=cifar10"]) == {
        "finetune.penalty": [1, 2.5], "pretrain.flip": [True, False], "data.source": ["cifar10"]}
    for bad in ("finetune.penalty", "=1", "finetune.penalty="):
        with pytest.raises(ParamsError, match="key=value"):
            parse_set([bad])
