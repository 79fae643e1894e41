"""Checkpoint storage (rlhf/storage.py): a plain path used in place, or a URI through pyarrow.fs
where each writer uploads its own files into a shared folder."""

import pickle

import pytest

from rlhf.storage import CheckpointStorage


@pytest.fixture(params=["path", "uri"])
def storage(request, tmp_path):
    root = tmp_path / "ckpts"
    return CheckpointStorage(str(root) if request.param == "path" else f"file://{root}")


def test_two_writers_merge_into_one_folder_and_read_back(storage, tmp_path):
    for rank in (0, 1):  # two trainer ranks, each with its own local folder when remote
        with storage.writing("round-0001/trainer") as local:
            with open(f"{local}/shard-{rank}.pt", "w") as f:
                f.write(f"rank {rank}")
    with storage.reading("round-0001/trainer") as local:
        import os

        assert sorted(os.listdir(local)) == ["shard-0.pt", "shard-1.pt"]
        assert open(f"{local}/shard-1.pt").read() == "rank 1"
    assert (tmp_path / "ckpts" / "round-0001" / "trainer" / "shard-0.pt").read_text() == "rank 0"


def test_pointer_text_and_missing_things(storage):
    assert storage.read_text("LATEST") is None
    storage.write_text("LATEST", "round-0002\n")
    assert storage.read_text("LATEST") == "round-0002\n"
    storage.write_text("LATEST", "round-0003\n")  # replaced whole
    assert storage.read_text("LATEST") == "round-0003\n"
    with pytest.raises(FileNotFoundError, match="round-0009"):
        with storage.reading("round-0009/trainer"):
            pass


def test_delete_removes_a_half_written_round(storage, tmp_path):
    with storage.writing("round-0004/run") as local:
        open(f"{local}/state.json", "w").write("{}")
    storage.delete("round-0004")
    assert not (tmp_path / "ckpts" / "round-0004").exists()
    storage.delete("round-0004")  # nothing there: fine


def test_it_travels_as_its_root(storage):
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.root == storage.root and copy.remote == storage.remote


def test_an_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="nosuch://x"):
        CheckpointStorage("nosuch://x/y")


def test_a_policy_with_tied_weights_round_trips(storage):
    import torch

    from rlhf.storage import read_policy, write_policy

    embed = torch.randn(5, 3)
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(3)}
    write_policy(storage, "round-0001/policy", 4, tensors, adapters_only=False)
    version, back, adapters_only = read_policy(storage, "round-0001/policy")
    assert version == 4 and adapters_only is False and set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
