"""A flag that arrives rounds after what it flags was used: the reward-model actor (real Ray,
tiny model) leaves the earlier items it reaches out of later updates, and of its checkpoint."""

from types import SimpleNamespace

from rlhf.curation.rules import Curated, FlaggedContent
from rlhf.preferences import Choice, PreferencePair, Ranking
from rlhf.storage import CheckpointStorage
from tests.actors.test_loop import tiny_run_config


def pair(prompt: str, a: str, b: str) -> PreferencePair:
    return PreferencePair(prompt=prompt, response_a=a, response_b=b, choice=Choice.A, prompt_id=prompt)


def test_flags_of_a_later_round_leave_earlier_items_out(ray_session, tmp_path):
    from actors.coordinator import Coordinator
    from actors.reward_model import RewardModelActor, RewardModelGroup

    cfg = tiny_run_config(tmp_path)
    actor = RewardModelActor.options(num_cpus=0.5).remote(cfg.reward_model_spec())
    first = [pair(f"prompt {i}", f"short {i}", f"a much longer answer number {i}") for i in range(6)]
    first.append(Ranking(prompt="prompt r", responses=("x", "y", "z"), ranks=(1, 2, 3), prompt_id="prompt r"))
    report = ray_session.get(actor.train.remote(first))
    assert report["pairs_total"] == 7 and report["forgotten_flagged"] == 0

    # round 2 brings new pairs and flags on a prompt and on a ranked response used in round 1
    second = [pair(f"prompt {i}", f"short {i}", f"a much longer answer number {i}") for i in range(6, 8)]
    flagged = [FlaggedContent("prompt 0", None, "pii"), FlaggedContent("prompt r", "y", "harmful")]
    update = Coordinator.update_reward_model
    group = RewardModelGroup([actor], timeout_s=300)  # what the coordinator holds
    report = update(SimpleNamespace(reward_model=group), Curated(items=second, flagged=flagged))
    assert report["forgotten_flagged"] == 2
    assert report["pairs_total"] == 6 - 1 + 1 + 2  # prompt 0 gone, the ranking kept without "y", 2 new

    # a round with flags and nothing new to train on still leaves them out
    report = update(SimpleNamespace(reward_model=group), Curated(flagged=[FlaggedContent("prompt 1", "short 1", "spam")]))
    assert report == {"skipped": "no usable records", "forgotten_flagged": 1}

    # through an object-store URI (pyarrow.fs), as a cluster without a shared disk would
    storage = CheckpointStorage(f"file://{tmp_path}/bucket/run")
    ray_session.get(actor.save.remote(storage, "round-0001/reward_model"))
    assert (tmp_path / "bucket" / "run" / "round-0001" / "reward_model" / "trained.safetensors").exists()
    restored = RewardModelActor.options(num_cpus=0.5).remote(cfg.reward_model_spec())
    assert ray_session.get(restored.load.remote(storage, "round-0001/reward_model")) == 7
    ray_session.kill(actor)
    ray_session.kill(restored)
