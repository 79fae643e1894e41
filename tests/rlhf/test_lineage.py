"""Lineage records (rlhf/lineage.py, no Ray): stable hashes, the reward model's id chain,
and the policy-version file with what trained it."""

import json

from actors.config import RunConfig
from rlhf.curation.rules import Curated
from rlhf.lineage import chain, digest, forget_in_reward_model, next_reward_model, policy_lineage, republished_lineage, write_lineage
from rlhf.preferences import Choice, PreferencePair
from rlhf.sft import Demonstration


def _pairs(n: int, start: int = 0) -> list[PreferencePair]:
    return [PreferencePair(f"prompt {i}", "a", "b", Choice.A, annotator_id="x", prompt_id=f"p{i}") for i in range(start, start + n)]


def test_digests_are_stable_and_see_every_field_and_the_order():
    a, b = _pairs(2)
    assert digest([a, b]) == digest(_pairs(2))
    assert digest([a, b]) != digest([b, a])
    assert digest(a) != digest(PreferencePair("prompt 0", "a", "b", Choice.B, annotator_id="x", prompt_id="p0"))
    assert digest(a) != digest(PreferencePair("prompt 0", "a", "b", Choice.A, annotator_id="x", prompt_id="p0", weight=0.5))
    # the chain depends on the ordered items, not on how rounds split them
    items = _pairs(5)
    assert chain(chain("", items[:2]), items[2:]) == chain("", items)


def test_the_reward_model_id_names_its_round_items_and_config():
    config = {"lr": 1e-4}
    first = next_reward_model({}, 0, _pairs(3), config)
    second = next_reward_model(first, 1, _pairs(2, start=3), config)
    assert first["id"].startswith("rm-r0000-") and second["id"].startswith("rm-r0001-")
    assert second["items_total"] == 5 and second["items_sha256"] == chain("", _pairs(5))
    # the same items under another config, or other items, give another id
    assert next_reward_model(first, 1, _pairs(2, start=3), {"lr": 2e-4})["id"] != second["id"]
    assert next_reward_model(first, 1, _pairs(2, start=4), config)["id"] != second["id"]
    # items that later flags left out are counted; a round that only forgets keeps the id
    assert first["items_forgotten"] == 0
    third = next_reward_model(second, 2, _pairs(1, start=5), config, forgotten=2)
    assert third["items_forgotten"] == 2 and third["items_total"] == 6
    fourth = forget_in_reward_model(third, 1)
    assert fourth["items_forgotten"] == 3 and fourth["id"] == third["id"] and fourth["items_total"] == 6


def test_a_policy_versions_lineage_is_written_with_what_trained_it(tmp_path):
    cfg = RunConfig()
    curated = Curated(items=_pairs(3), demonstrations=[Demonstration("q", "better answer", annotator_id="y")])
    curated.counts.update({"used/preference": 3, "used/correction": 1, "dropped/duplicate_near": 2})
    curated.received.update({"preference": 5, "correction": 1})
    curated.by_annotator.update({"x": 5, "y": 1})
    curated.used_by_annotator.update({"x": 3, "y": 1})
    rm = next_reward_model({}, 4, curated.items, {"lr": 1e-4})
    ppo = [{"iteration": 9.0, "reward": 0.1}, {"iteration": 10.0, "reward": 0.2}]
    record = policy_lineage(
        policy_version=5, parent_version=4, round_=4, cfg=cfg, config_json=cfg.model_dump_json(), project="proj",
        watermark_from=100, watermark_to=160, curated=curated, reward_model=rm, reward_report={"validation_accuracy": 0.7},
        sft_report={"loss_before": 3.0, "loss_after": 2.0}, ppo_metrics=ppo, train_prompts=["a", "b"],
    )
    path = write_lineage(tmp_path, record)
    assert path == "lineage/policy-v0005.json"
    saved = json.loads((tmp_path / path).read_text())
    assert saved["feedback"]["watermark_from"] == 100 and saved["feedback"]["watermark_to"] == 160
    assert saved["feedback"]["by_kind"] == {"correction": 1, "preference": 5}
    assert saved["feedback"]["by_annotator"] == {"x": 5, "y": 1}
    assert saved["feedback"]["curation"]["dropped/duplicate_near"] == 2
    assert saved["reward_model"]["id"] == rm["id"] and saved["reward_model"]["trained_this_round"]
    assert saved["sft"]["demonstrations"] == 1 and saved["sft"]["demonstrations_sha256"] == digest(curated.demonstrations)
    assert saved["ppo"]["seed"] == cfg.ppo.seed and saved["ppo"]["trainer_iterations"] == [9, 10]
    assert saved["ppo"]["settings"]["clip_range"] == cfg.ppo.clip_range
    assert saved["prompts"]["train_prompts_sha256"] == digest(["a", "b"])
    assert len(saved["run"]["config_sha256"]) == 64
    assert not list(tmp_path.glob("lineage/*.tmp"))


def test_a_version_republished_by_a_restore_carries_the_restored_versions_record(tmp_path):
    write_lineage(tmp_path, {"policy_version": 2, "round": 1, "feedback": {"watermark_to": 40}})
    again = republished_lineage(tmp_path, policy_version=4, same_as=2)  # v3 was served, then lost
    assert write_lineage(tmp_path, again) == "lineage/policy-v0004.json"
    saved = json.loads((tmp_path / "lineage" / "policy-v0004.json").read_text())
    assert saved["republished_from"] == 2 and saved["feedback"] == {"watermark_to": 40} and saved["round"] == 1
    assert republished_lineage(tmp_path, policy_version=1, same_as=0)["note"] == "the initial weights"


def test_a_policy_versions_lineage_names_its_prompt_template():
    cfg = RunConfig(template={"name": "pirate", "system": "You answer like a pirate."})
    record = policy_lineage(
        policy_version=1, parent_version=0, round_=0, cfg=cfg, config_json=cfg.model_dump_json(), project="proj",
        watermark_from=0, watermark_to=1, curated=Curated(), reward_model={}, reward_report={}, sft_report={},
        ppo_metrics=[], train_prompts=["a"],
    )
    assert record["template"]["version"] == cfg.template.version != RunConfig().template.version
    assert record["template"]["name"] == "pirate" and record["template"]["system"] == "You answer like a pirate."
    assert json.loads(cfg.model_dump_json())["template"]["version"] == cfg.template.version  # config.json too
