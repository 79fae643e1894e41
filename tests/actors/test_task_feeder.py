"""Continuous mode's publisher (actors/task_feeder.py) against a real SQLite store: the depth
it keeps, retiring tasks of stale versions, the budget, and picking up where a lost process
left off."""

from hitl.feedback.v1 import feedback_pb2 as pb
from actors.config import ContinuousConfig
from actors.task_feeder import TaskFeeder, task_version
from services.feedback.records import Task
from services.feedback.store import open_store


def _task(task_id: str, version: int) -> Task:
    return Task(task_id=task_id, project="p", prompt_id=f"p-{task_id}", prompt=f"prompt {task_id}",
                candidates=tuple(pb.Candidate(candidate_id=f"{task_id}-{j}", text=f"answer {j}", policy_version=version)
                                 for j in range(2)))


class Run:
    """What the coordinator gives the feeder: publishing by the served version."""

    def __init__(self, store):
        self.store, self.version, self.batches = store, 0, []

    def publish(self, n: int, published: int) -> int:
        tasks = [_task(f"run1-c{published + i:04d}", self.version) for i in range(n)]
        self.batches.append(n)
        return sum(o.created for o in self.store.add_tasks(tasks))


def _judge(store, annotator: str, n: int, leased: list | None = None) -> int:
    leased = store.lease_tasks("p", annotator, n, 60) if leased is None else leased
    records = [pb.FeedbackRecord(feedback_id=f"{annotator}-{lease.task.task_id}", project="p", task_id=lease.task.task_id,
                                 annotator_id=annotator,
                                 preference=pb.Preference(candidate_a_id=lease.task.candidates[0].candidate_id,
                                                          candidate_b_id=lease.task.candidates[1].candidate_id,
                                                          choice=pb.Preference.CHOICE_A)) for lease in leased]
    store.write_batch(records)
    return len(records)


def test_keeps_the_depth_retires_stale_tasks_and_spends_the_budget(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    run = Run(store)
    cfg = ContinuousConfig(open_tasks=6, publish_batch=4, max_policy_lag=1)
    feeder = TaskFeeder(run.publish, store, "p", "run1-c", cfg, budget=20, annotations_per_task=1, served_version=lambda: run.version)
    assert feeder.tick() and feeder.tick() and not feeder.tick()  # 8 tasks: 6 wanted, batches of 4
    assert feeder.state.ready == 8 and run.batches == [4, 4]
    assert _judge(store, "alice", 3) == 3
    feeder.tick()  # 5 ready < 6: one more batch
    assert feeder.state.ready == 9 and store.task_count("p", "run1-c") == 12

    run.version = 1  # one version behind is within max_policy_lag: nothing retired
    feeder.tick()
    assert feeder.state.retired == 0
    run.version = 2  # the open version-0 tasks are now two behind: retired, replaced by version 2's
    bobs = store.lease_tasks("p", "bob", 1, 60)  # bob holds one of them
    feeder.tick()
    assert feeder.state.retired == 9
    open_versions = [task_version(o.task) for o in store.open_tasks("p", "run1-c")]
    assert open_versions == [2, 2, 2, 2]
    # bob's judgement of the task he held is kept, and that task counts against the budget again
    assert _judge(store, "bob", 1, bobs) == 1
    assert store.read_after(0)[-1].record.task_id == bobs[0].task.task_id
    # the budget counts tasks that are judged or open, not retired ones
    assert store.task_count("p", "run1-c", include_retired=False) == 3 + 1 + 4
    while feeder.tick():
        pass
    assert store.task_count("p", "run1-c", include_retired=False) == 12 and not feeder.spent()

    # a lost process: a new feeder on the same store goes on with the same budget
    run.version = 3
    again = TaskFeeder(run.publish, store, "p", "run1-c", cfg, budget=20, annotations_per_task=1, served_version=lambda: run.version)
    while not again.spent():
        _judge(store, "carol", 5)
        again.tick()
    assert store.task_count("p", "run1-c", include_retired=False) == 20
    assert store.task_count("p", "run1-c") == 20 + 8  # and the eight retired that nobody judged
    assert not again.tick()  # spent: nothing more is published
    store.close()


def test_a_failing_batch_is_retried_not_fatal(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    run = Run(store)
    calls = []

    def flaky(n, published):
        calls.append(n)
        if len(calls) == 1:
            raise ConnectionError("engine lost")
        return run.publish(n, published)

    feeder = TaskFeeder(flaky, store, "p", "run1-c", ContinuousConfig(open_tasks=2, publish_batch=2), budget=2,
                        annotations_per_task=1, served_version=lambda: 0)
    feeder.start()
    try:
        import time

        deadline = time.monotonic() + 20
        while not feeder.spent() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        feeder.stop()
    assert feeder.spent() and feeder.state.errors == 1 and "engine lost" in feeder.state.last_error
    store.close()
