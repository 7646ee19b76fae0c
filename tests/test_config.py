"""Run config: YAML file, `--set` overrides, unknown keys, frozen stage configs, saving."""

from __future__ import annotations

import pydantic
import pytest

from flows.config import ConfigError, RunConfig, parse_set, resolve_config, save_config
from tasks.ingest import IngestConfig


def test_defaults_are_the_embedded_world():
    cfg = resolve_config()
    assert cfg.ingest.source == "synthetic" and cfg.ingest.world.size == 16


def test_yaml_then_overrides_win_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("ingest:\n  world:\n    num_clips: 50\n    seed: 3\n")
    cfg = resolve_config(config_file=f, overrides=["ingest.world.num_clips=20", "ingest.heldout_fraction=0.2"])
    assert (cfg.ingest.world.num_clips, cfg.ingest.world.seed, cfg.ingest.heldout_fraction) == (20, 3, 0.2)


def test_saved_config_is_reused_and_round_trips(tmp_path):
    cfg = resolve_config(overrides=["ingest.world.num_clips=7"])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    again = resolve_config(saved=saved)
    assert again == cfg and again.ingest.hash() == cfg.ingest.hash()
    assert resolve_config(saved=saved, overrides=["ingest.world.num_clips=8"]).ingest.world.num_clips == 8


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=["ingest.sorce=/data"])
    msg = str(err.value)
    assert "unknown key `ingest.sorce`" in msg and "source" in msg and "caption_column" in msg
    with pytest.raises(ConfigError, match="unknown key `ingest.world.clips`.*num_clips"):
        resolve_config(overrides=["ingest.world.clips=3"])
    f = tmp_path / "bad.yaml"
    f.write_text("ingset: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key `ingset`; valid keys: bootstrap, evaluate, finetune, generate, ingest, label, run, select, train_reward"):
        resolve_config(config_file=f)


def test_bad_values_and_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="ingest.world.num_clips"):
        resolve_config(overrides=["ingest.world.num_clips=-1"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(overrides=[f"ingest.source={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="unknown defect"):
        resolve_config(overrides=["ingest.world.defect_rates={smudge: 0.1}"])
    with pytest.raises(ConfigError, match="stage.key=value"):
        parse_set("ingest.source")


def test_stage_configs_are_frozen_and_forbid_extras():
    cfg = IngestConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.source = "x"
    with pytest.raises(pydantic.ValidationError):
        IngestConfig(sorce="x")
    assert IngestConfig().hash() == IngestConfig().hash() != IngestConfig(heldout_fraction=0.3).hash()


def test_ingest_source_folder_becomes_a_data_root(tmp_path):
    cfg = RunConfig(ingest=IngestConfig(source=str(tmp_path)))
    layout = cfg.layout(tmp_path / "runs", "r")
    assert tmp_path.absolute() in layout.data_roots


def test_which_round_trains_the_reward_model_each_round_uses():
    every = resolve_config(overrides=["run.rounds=3", "run.train_reward=every_round"])
    assert [every.reward_round(k) for k in (1, 2, 3)] == [1, 2, 3]
    assert [every.reward_round(k, for_label=True) for k in (1, 2, 3)] == [None, 1, 2]  # never the round's own
    first = resolve_config(overrides=["run.train_reward=first_round"])
    assert [first.reward_round(k) for k in (1, 2, 3)] == [1, 1, 1]
    assert [first.reward_round(k, for_label=True) for k in (1, 2, 3)] == [None, 1, 1]
    never = resolve_config(overrides=["run.train_reward=never", "evaluate.win_rates=false"])
    assert [never.reward_round(k) for k in (1, 2)] == [None, None]
    with pytest.raises(ConfigError, match="evaluate.win_rates=false"):
        resolve_config(overrides=["run.train_reward=never"])
