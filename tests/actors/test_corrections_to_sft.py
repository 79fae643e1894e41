"""Corrections flow from the store through curation into the SFT step (no Ray): records
written through the store's own write path, read back by watermark, curated, and trained on
a tiny policy's DeepSpeed engine (CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from rlhf.curation.rules import curate  # noqa: E402
from rlhf.curation.config import CurationConfig  # noqa: E402
from rlhf.curation.memory import CurationMemory  # noqa: E402
from hitl.feedback.v1 import feedback_pb2 as pb  # noqa: E402
from rlhf.ppo import DeepSpeedConfig, PPOConfig  # noqa: E402
from rlhf.sft import SFTConfig, run_sft  # noqa: E402
from services.feedback.records import Task  # noqa: E402
from services.feedback.store import open_store  # noqa: E402

PROMPTS = ["Describe the sea.", "Name a colour.", "Say something kind.", "What is rain?"]
CORRECTED = ["The sea is wide and blue.", "Green.", "You did well today.", "Water falling from clouds."]


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


def _publish(store) -> None:
    tasks = [Task(task_id=f"t{i}", project="p", prompt_id=f"pid{i}", prompt=p,
                  candidates=(pb.Candidate(candidate_id=f"t{i}-0", text="meh"), pb.Candidate(candidate_id=f"t{i}-1", text="no")))
             for i, p in enumerate(PROMPTS)]
    assert all(o.rejection is None for o in store.add_tasks(tasks))


def _correction(i: int, text: str, annotator: str = "ann", version: str = "v2") -> pb.FeedbackRecord:
    return pb.FeedbackRecord(feedback_id=f"c{i}-{annotator}-{len(text)}", project="p", task_id=f"t{i}", annotator_id=annotator,
                             guidelines_version=version, correction=pb.Correction(candidate_id=f"t{i}-0", corrected_text=text))


@pytest.mark.slow
def test_corrections_in_the_store_train_the_policy(store):
    from tests.rlhf.ppo.helpers import make_trainer

    _publish(store)
    records = [_correction(i, t) for i, t in enumerate(CORRECTED)]
    records.append(_correction(0, CORRECTED[0], annotator="other"))  # the same demonstration again
    records.append(_correction(1, "Blue.", version="v1"))  # under old guidelines
    records.append(pb.FeedbackRecord(feedback_id="flag", project="p", task_id="t3", annotator_id="mod",
                                     flag=pb.Flag(candidate_id="", kind=pb.Flag.KIND_SPAM)))
    outcomes = store.write_batch(records)
    assert all(o.rejection is None for o in outcomes), [o.rejection for o in outcomes]

    cfg = CurationConfig(min_guidelines_version="2")
    curated = curate(store.read_after(0, limit=1000), store.get_task, cfg=cfg, memory=CurationMemory(cfg), max_demonstrations=10)
    assert curated.counts == {"used/correction": 3, "dropped/duplicate_exact": 1, "set_aside/old_guidelines": 1,
                              "flag/spam": 1, "dropped/flagged_spam": 1}
    assert [d.response for d in curated.demonstrations] == CORRECTED[:3]

    torch.set_num_threads(1)
    ppo = PPOConfig(advantage_estimator="grpo", rollout_batch_size=4, group_size=2, max_new_tokens=4, minibatch_size=8)
    trainer = make_trainer(ppo, DeepSpeedConfig(zero_stage=0))
    report = run_sft(trainer, curated.demonstrations, SFTConfig(enabled=True, lr=1e-2, epochs=5, batch_size=2))
    assert report.demonstrations == 3 and report.optimizer_steps == 10
    assert report.loss_after < 0.7 * report.loss_before
