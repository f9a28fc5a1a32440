"""params.yaml validation: errors name the key and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from sparsify.errors import ConfigError
from tasks.config import load_config, load_raw, resolve_raw, validate
from tests.conftest import PARAMS


def _raw(**changes):
    raw = load_raw(PARAMS)
    raw.pop("profiles")
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    return raw


def test_default_and_smoke_profiles_validate():
    cfg = load_config(PARAMS)
    smoke = load_config(PARAMS, profile="smoke")
    assert cfg.data.train_tokens > smoke.data.train_tokens
    assert smoke.base.arch.hidden_size < cfg.base.arch.hidden_size
    # A profile changes only what it names.
    assert smoke.data.sources == cfg.data.sources


def test_every_profile_validates():
    for name in load_raw(PARAMS)["profiles"]:
        cfg = load_config(PARAMS, profile=name)
        assert abs(sum(s.weight for s in cfg.data.sources) - 1) < 1e-9, name
    saturated = load_config(PARAMS, profile="saturated")
    # The regime where pruning costs something: fewer parameters, more tokens per parameter.
    assert saturated.base.arch.hidden_size < load_config(PARAMS).base.arch.hidden_size
    assert (
        saturated.base.train.steps * saturated.base.train.batch_size * saturated.data.block_size
        <= saturated.data.train_tokens
    )
    # The paper's setting validates offline; its corpus is written with the checkpoint's ids (the chat
    # model's tokenizer, which the data stage checks against base.source before any work).
    llama = load_config(PARAMS, profile="llama2-7b")
    assert llama.base.source == "meta-llama/Llama-2-7b-hf" and llama.tokenizer_source.endswith("-chat-hf")
    assert llama.pipeline.sparsities == [0.5, 0.7] and "ultrachat" in llama.downstream.tasks


def test_set_overrides_parse_yaml_values():
    cfg = load_config(PARAMS, overrides=["base.train.lr=0.01", "data.dedup=false", "data.sources.0.weight=2"])
    assert cfg.base.train.lr == 0.01 and cfg.data.dedup is False and cfg.data.sources[0].weight == 2.0


def test_nested_params_override():
    cfg = load_config(PARAMS, params={"base": {"train": {"steps": 7}}})
    assert cfg.base.train.steps == 7 and cfg.base.train.batch_size == 8


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError) as err:
        validate(_raw(data__train_tokenz=5))
    msg = str(err.value)
    assert "data.train_tokenz: unknown key" in msg and "train_tokens" in msg


def test_unknown_set_key_is_an_error():
    with pytest.raises(ConfigError, match=r"base\.train\.stepz: unknown key.*steps"):
        load_config(PARAMS, overrides=["base.train.stepz=3"])


def test_wrong_type_and_out_of_range():
    with pytest.raises(ConfigError, match=r"data\.train_tokens: .*integer.*'many'"):
        validate(_raw(data__train_tokens="many"))
    with pytest.raises(ConfigError, match=r"data\.val_fraction: .*less than 1"):
        validate(_raw(data__val_fraction=1.5))
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.weight: .*greater than 0"):
        load_config(PARAMS, overrides=["data.sources.0.weight=-1"])


def test_unknown_source_kind_lists_kinds():
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.kind: .*'stdlib_code'.*'hf'.*got 'ftp'"):
        load_config(PARAMS, overrides=["data.sources.0.kind=ftp"])


def test_files_source_needs_glob():
    with pytest.raises(ConfigError, match="kind 'files' needs 'glob'"):
        load_config(PARAMS, overrides=["data.sources.0.kind=files"])


def test_malformed_yaml_and_unknown_profile(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  train_tokens: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown profile 'huge'; known profiles: llama2-7b, saturated, smoke"):
        load_config(PARAMS, profile="huge")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(PARAMS, overrides=["base.train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_profile_roundtrips_through_yaml(tmp_path):
    raw = resolve_raw(load_raw(PARAMS), "smoke")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path) == load_config(PARAMS, profile="smoke")
