"""The committed stubs are exactly what protoc makes of the contract."""

from services.feedback import codegen


def test_committed_stubs_match_the_proto():
    assert codegen.drifted() == []


def test_drift_is_detected(tmp_path, monkeypatch):
    # a copy of the repo's generated package with one byte changed must be reported
    fake_repo = tmp_path / "repo"
    fake_repo.mkdir()
    (fake_repo / "protos").symlink_to(codegen.REPO / "protos")
    generated = codegen.generate(fake_repo)
    generated[0].write_text(generated[0].read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(codegen, "REPO", fake_repo)
    assert codegen.drifted() == [generated[0].name]
