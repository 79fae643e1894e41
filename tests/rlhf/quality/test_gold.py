"""Gold tasks from a file (rlhf/quality/gold.py) take the place of a round's task whole: its
ids and its metadata (the template version), so nothing sent tells them apart."""

from __future__ import annotations

import random

from hitl.feedback.v1 import feedback_pb2 as pb
from rlhf.quality.gold import gold_from_file
from rlhf.records import GoldAnswer, Task
from rlhf.templates import TASK_METADATA_KEY, PromptTemplate


def _task(task_id: str, prompt: str, metadata: dict[str, str] | None = None, gold: GoldAnswer | None = None) -> Task:
    candidates = tuple(pb.Candidate(candidate_id=f"{task_id}-{j}", text=f"answer {j}", policy_version=2) for j in range(2))
    return Task(task_id, "proj", f"p-{task_id}", prompt, candidates, metadata=metadata or {}, gold=gold)


def test_round_and_gold_tasks_carry_the_template_version_in_their_metadata():
    template = PromptTemplate(system="Be brief.")
    slot = _task("r0-t1", "a round prompt", metadata=template.task_metadata())
    assert slot.to_proto().metadata[TASK_METADATA_KEY] == template.version
    gold = gold_from_file(slot, _task("g", "a gold prompt", {"source": "file"}, GoldAnswer("g-0")), random.Random(0), lambda p: "p-" + p)
    assert gold.gold is not None and gold.prompt == "a gold prompt"
    assert dict(gold.to_proto().metadata) == {TASK_METADATA_KEY: template.version}  # the slot's, not the file's
