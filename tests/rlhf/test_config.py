"""The RLHF config: the shipped YAML files load; bad keys, types and ranges fail at load
with the dotted field path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from rlhf.config import ConfigError, RLHFConfig, load_config, parse_config
from rlhf.models import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_config_loads() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert isinstance(cfg, RLHFConfig)
    assert cfg.model.source == "tiny" and cfg.model.hidden_size == 32 and cfg.model.num_layers == 2
    assert cfg.deepspeed.zero_stage == 0
    assert cfg.reward_model == cfg.model  # the reward model starts from the policy's weights


def test_local_config_is_the_embedded_default() -> None:
    from actors.config import RunConfig  # local.yaml is a whole run: the core's sections plus the loop's

    cfg = load_config(ROOT / "configs" / "local.yaml", RunConfig)
    assert cfg.model.source == "smollm2" and cfg.model.path is None
    assert cfg.model.cache_dir == Path.home() / ".cache" / "hitl" / "models"
    assert cfg.lora.enabled and cfg.lora.rank == 8
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.use_bf16("cpu") is False
    assert cfg.reward.lora is not None and cfg.reward.lora.enabled


def test_the_continuous_config_is_local_yaml_in_continuous_mode() -> None:
    """bench/loop.py compares the two files as the two modes of one run: everything but how
    the coordinator runs (and where it writes) is the same, the task budget included."""
    from actors.config import RunConfig

    rounds = load_config(ROOT / "configs" / "local.yaml", RunConfig)
    continuous = load_config(ROOT / "configs" / "local-continuous.yaml", RunConfig)
    assert (rounds.coordinator.mode, continuous.coordinator.mode) == ("rounds", "continuous")
    assert continuous.coordinator.task_budget() == rounds.coordinator.rounds * rounds.coordinator.tasks_per_round
    same = {"mode", "continuous", "selection", "run_dir"}
    assert rounds.coordinator.model_dump(exclude=same) == continuous.coordinator.model_dump(exclude=same)
    assert rounds.model_dump(exclude={"coordinator"}) == continuous.model_dump(exclude={"coordinator"})


def test_a_step_threshold_the_budget_cannot_reach_is_named() -> None:
    from actors.config import RunConfig
    from rlhf.config import parse_config

    data = {"coordinator": {"mode": "continuous", "rounds": 1, "tasks_per_round": 8, "continuous": {"min_feedback_per_step": 9}}}
    with pytest.raises(ConfigError, match="coordinator.continuous.min_feedback_per_step"):
        parse_config(data, RunConfig)
    data["coordinator"]["continuous"]["task_budget"] = 9
    assert parse_config(data, RunConfig).coordinator.task_budget() == 9


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _issues(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert str(tmp_path / "run.yaml") in str(caught.value)
    return {issue.field: issue.message for issue in caught.value.issues}


@pytest.mark.parametrize(
    ("yaml_text", "field", "expected"),
    [
        ("ppo:\n  clip_range: -1\n", "ppo.clip_range", "must be > 0.0, got -1"),
        ("model:\n  hidden_size: big\n", "model.hidden_size", "valid integer, unable to parse"),
        ("model:\n  layers: 2\n", "model.layers", "unknown key; expected one of: source, path"),
        ("bogus: 1\n", "bogus", "unknown key; expected one of: model, lora, critic, reward"),
        ("reward:\n  ties: maybe\n", "reward.ties", "must be one of 'half' or 'exclude', got 'maybe'"),
        ("lora:\n  dropout: 1.5\n", "lora.dropout", "must be < 1.0, got 1.5"),
        ("deepspeed:\n  zero_stage: 4\n", "deepspeed.zero_stage", "must be <= 3, got 4"),
        ("critic:\n  kind: separate\n  model:\n    hidden_size: 2\n",
         "critic.model.hidden_size", "must be >= 8, got 2"),
        ("data:\n  prompt_sources:\n    - kind: jsonl\n", "data.prompt_sources[0]",
         "path is required for kind='jsonl'"),
        ("model:\n  source: hf\n", "model", "path is required for source='hf'"),
        ("ppo:\n  advantage_estimator: rloo\n", "ppo", "group_size must be >= 2"),
        ("data:\n  max_prompt_tokens: 999\n", "<root>", "data.max_prompt_tokens (999) must be <="),
    ],
)
def test_bad_values_fail_naming_the_field(
    tmp_path: Path, yaml_text: str, field: str, expected: str
) -> None:
    issues = _issues(tmp_path, yaml_text)
    assert field in issues, issues
    assert expected in issues[field]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    issues = _issues(tmp_path, "ppo:\n  clip_range: 0\n  top_p: 2\nmodel:\n  extra: 1\n")
    assert set(issues) == {"ppo.clip_range", "ppo.top_p", "model.extra"}


def test_union_alternatives_are_joined(tmp_path: Path) -> None:
    issues = _issues(tmp_path, "deepspeed:\n  bf16: sometimes\n")
    assert issues["deepspeed.bf16"].endswith("or must be one of 'auto', got 'sometimes'")


def test_not_a_mapping_and_broken_yaml_fail(tmp_path: Path) -> None:
    assert "<root>" in _issues(tmp_path, "- just\n- a list\n")
    assert "<yaml>" in _issues(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="<file>"):
        load_config(tmp_path / "missing.yaml")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == RLHFConfig()


def test_load_config_is_generic_for_larger_run_configs(tmp_path: Path) -> None:
    class ClusterConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        workers: int = 1

    class RunConfig(RLHFConfig):
        cluster: ClusterConfig = ClusterConfig()

    cfg = load_config(_write(tmp_path, "cluster:\n  workers: 2\nmodel:\n  source: tiny\n"), RunConfig)
    assert isinstance(cfg, RunConfig) and cfg.cluster.workers == 2
    assert cfg.model == ModelConfig(source="tiny")
    with pytest.raises(ConfigError, match=r"cluster\.workers: input should be a valid integer"):
        parse_config({"cluster": {"workers": "two"}}, RunConfig)
