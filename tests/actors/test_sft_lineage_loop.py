"""Curation, SFT on corrections and lineage in the loop: real Ray, Serve, gRPC and DeepSpeed
(ZeRO-2, 2 workers) on a tiny model. An editor's corrections arrive with each round's
preferences; they are curated, trained on before PPO, and named in each version's lineage."""

import json

import pytest

from actors.config import RunConfig
from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.config import parse_config
from tests.actors.test_loop import tiny_run_config


def _with_sft(cfg: RunConfig, rounds: int) -> RunConfig:
    data = cfg.model_dump(mode="json")
    data["sft"] = {"enabled": True, "lr": 1e-2, "epochs": 2, "batch_size": 4, "max_examples": 8}
    data["coordinator"]["rounds"] = rounds
    return parse_config(data, RunConfig)


def _editing_coordinator():
    from actors.coordinator import Coordinator

    class Edits(Coordinator):
        """Once the round's preferences are in, an editor corrects the first candidates of three
        of its tasks (written after them: a record answers its task, and a task closed by a
        correction would not reach the annotators); in round 2 also a late repeat of a round-0
        correction (a duplicate of an item used in an earlier round)."""

        def wait_for_feedback(self) -> list:
            super().wait_for_feedback()
            r = self.state.next_round
            run = self.identity["run_id"]  # task ids are the run's: <run id>r<round>-t<i>
            fix = [(f"{run}r{r}-t{i}", f"A short and clear answer, number {i}.") for i in range(3)]
            if r == 2:
                fix.append((f"{run}r0-t0", "A short and clear answer, number 0."))
            records = [pb.FeedbackRecord(feedback_id=f"edit-r{r}-{j}", project=self.cfg.feedback.project, task_id=task,
                                         annotator_id="editor", correction=pb.Correction(candidate_id=f"{task}-0", corrected_text=text))
                       for j, (task, text) in enumerate(fix)]
            assert all(o.rejection is None for o in self.store.write_batch(records))
            return self.store.read_after(self.state.watermark, limit=100_000, projects=[self.cfg.feedback.project])

    return Edits


@pytest.mark.slow
def test_corrections_train_before_ppo_and_every_version_has_its_lineage(ray_session, tmp_path):
    cfg = _with_sft(tiny_run_config(tmp_path, rounds=2, feedback_timeout_s=120), rounds=2)
    reports = _editing_coordinator()(cfg).run()
    run_dir = tmp_path / "run"
    for i, rep in enumerate(reports):
        assert rep.feedback["used/correction"] == 3 and rep.sft["demonstrations"] == 3
        assert rep.sft["loss_after"] < rep.sft["loss_before"]
        assert list(rep.stage_seconds)[:6] == ["publish", "feedback", "curate", "reward_model", "sft", "ppo"]
        lineage = json.loads((run_dir / rep.lineage).read_text())
        assert rep.lineage == f"lineage/policy-v{rep.policy_version:04d}.json"
        assert lineage["policy_version"] == rep.policy_version and lineage["round"] == i
        assert (lineage["feedback"]["watermark_from"], lineage["feedback"]["watermark_to"]) == (rep.watermark_from, rep.watermark_to)
        assert lineage["feedback"]["by_annotator"]["editor"] == 3 and lineage["feedback"]["curation"] == rep.feedback
        assert lineage["reward_model"]["id"].startswith(f"rm-r{i:04d}-") and lineage["reward_model"]["trained_this_round"]
        assert lineage["sft"]["demonstrations"] == 3 and lineage["sft"]["report"] == rep.sft
        assert lineage["ppo"]["trainer_iterations"] == [2 * i + 1, 2 * i + 2] and lineage["ppo"]["seed"] == cfg.ppo.seed
    assert (run_dir / "checkpoints" / "round-0001" / "run" / "curation.json").exists()
    saved = json.loads((run_dir / "report.json").read_text())["rounds"]
    assert [r["lineage"] for r in saved] == [r.lineage for r in reports]

    # resumed: the memory of rounds 0-1 comes back with the checkpoint, so the late repeat of a
    # round-0 correction is a duplicate of an item used in an earlier round
    more = _editing_coordinator()(_with_sft(cfg, rounds=3), run_dir, resume=True).run()
    assert [r.round for r in more] == [2]
    assert more[0].feedback["dropped/duplicate_seen"] == 1 and more[0].feedback["used/correction"] == 3
    lineage = json.loads((run_dir / more[0].lineage).read_text())
    assert lineage["parent_version"] == reports[-1].policy_version
    assert lineage["reward_model"]["items_total"] == sum(r.feedback.get("used/preference", 0) + r.feedback.get("used/ranking", 0)
                                                         for r in [*reports, *more])
