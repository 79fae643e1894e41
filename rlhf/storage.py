"""Checkpoint storage every node reaches: a shared filesystem path or an object-store URI.

    storage = CheckpointStorage("s3://bucket/runs/exp-1")    # or "/mnt/runs/exp-1", "file:///..."
    with storage.writing("round-0003/trainer") as local:      # a local folder to write into;
        engine.save_checkpoint(local)                          # uploaded when the block ends
    with storage.reading("round-0003/trainer") as local:      # a local copy (downloaded if remote)
        engine.load_checkpoint(local)
    storage.write_text("LATEST", "round-0003\\n")

A plain path is used in place: on a cluster it must be a filesystem that every node mounts
(the runs volume, ReadWriteMany). A URI goes through `pyarrow.fs` (s3://, gs://, hdfs://,
abfs://, file://), as Ray Train's `storage_path` does: each process writes into a private
local folder and uploads it, so no two processes need the same disk. Several processes may
upload into the same folder (the trainer ranks each add their own shard files).

A checkpoint is committed by the caller writing its pointer (`LATEST`) last; a half-written
round folder without a pointer to it is never read.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in location


class CheckpointStorage:
    """Files under one root, local or remote; paths given to its methods are relative."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.remote = is_uri(self.root)
        if self.remote:
            import pyarrow.fs as pafs

            try:
                self._fs, self._base = pafs.FileSystem.from_uri(self.root)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds; say which root
                raise ValueError(f"checkpoint storage {self.root!r}: {err}") from err
            self._base = self._base.rstrip("/")
        else:
            self._local = Path(self.root).resolve()

    def __reduce__(self):  # travels to actors as its root; each process opens its own filesystem
        return (CheckpointStorage, (self.root,))

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.root!r})"

    def _remote_path(self, rel: str) -> str:
        return f"{self._base}/{rel}".rstrip("/") if rel else self._base

    def location(self, rel: str = "") -> str:
        """Where `rel` is, as a user would name it (for logs and errors)."""
        if self.remote:
            return f"{self.root.rstrip('/')}/{rel}" if rel else self.root
        return str(self._local / rel)

    # -- folders ------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[str]:
        """A local folder whose contents end up at `rel` (merged with what is there)."""
        if not self.remote:
            target = self._local / rel
            target.mkdir(parents=True, exist_ok=True)
            yield str(target)
            return
        import pyarrow.fs as pafs

        staging = Path(tempfile.mkdtemp(prefix="hitl-ckpt-"))
        try:
            yield str(staging)
            self._fs.create_dir(self._remote_path(rel), recursive=True)
            pafs.copy_files(str(staging), self._remote_path(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self._fs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def reading(self, rel: str) -> Iterator[str]:
        """A local folder holding what is at `rel` (a download, removed after the block)."""
        if not self.remote:
            target = self._local / rel
            if not target.is_dir():
                raise FileNotFoundError(f"no checkpoint folder {target}")
            yield str(target)
            return
        import pyarrow.fs as pafs

        if self._fs.get_file_info(self._remote_path(rel)).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"no checkpoint folder {self.location(rel)}")
        staging = Path(tempfile.mkdtemp(prefix="hitl-ckpt-"))
        try:
            pafs.copy_files(self._remote_path(rel), str(staging), source_filesystem=self._fs,
                            destination_filesystem=pafs.LocalFileSystem())
            yield str(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, rel: str) -> None:
        """Remove the folder `rel` if it is there."""
        if not self.remote:
            shutil.rmtree(self._local / rel, ignore_errors=True)
            return
        import pyarrow.fs as pafs

        if self._fs.get_file_info(self._remote_path(rel)).type == pafs.FileType.Directory:
            self._fs.delete_dir(self._remote_path(rel))

    # -- small files --------------------------------------------------------------------

    def write_text(self, rel: str, text: str) -> None:
        if not self.remote:
            path = self._local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # readers see the old text or the new, never half
            return
        parent = self._remote_path(rel).rsplit("/", 1)[0]
        self._fs.create_dir(parent, recursive=True)
        with self._fs.open_output_stream(self._remote_path(rel)) as out:
            out.write(text.encode())

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when it is not there."""
        if not self.remote:
            path = self._local / rel
            return path.read_text() if path.exists() else None
        import pyarrow.fs as pafs

        if self._fs.get_file_info(self._remote_path(rel)).type != pafs.FileType.File:
            return None
        with self._fs.open_input_stream(self._remote_path(rel)) as src:
            return src.read().decode()


# -- the policy a checkpoint serves ---------------------------------------------------------

POLICY_TENSORS = "policy.safetensors"
POLICY_META = "policy.json"


def write_policy(storage: CheckpointStorage, rel: str, version: int, tensors: dict, adapters_only: bool) -> None:
    """The tensors a weight update carries (LoRA adapters, or the full state dict) as a served
    policy: what a generation server started on its own loads (services/generation/app.py)."""
    import json

    from safetensors.torch import save_file

    out, seen = {}, set()
    for name, t in tensors.items():  # tied weights (embeddings and LM head) share storage: save each once
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    with storage.writing(rel) as local:
        save_file(out, str(Path(local) / POLICY_TENSORS))
        (Path(local) / POLICY_META).write_text(json.dumps({"policy_version": version, "adapters_only": adapters_only}) + "\n")


def read_policy(storage: CheckpointStorage, rel: str) -> tuple[int, dict, bool]:
    """(version, tensors, adapters_only) of what `write_policy` wrote at `rel`."""
    import json

    from safetensors.torch import load_file

    with storage.reading(rel) as local:
        meta = json.loads((Path(local) / POLICY_META).read_text())
        tensors = load_file(str(Path(local) / POLICY_TENSORS))
    return int(meta["policy_version"]), tensors, bool(meta["adapters_only"])
