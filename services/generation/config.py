"""Configuration of the generation server."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplingDefaults(BaseModel):
    """Sampling settings used when a request names none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(64, ge=1, le=4096)
    """Most tokens generated per answer."""
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""


class GenerationConfig(BaseModel):
    """How the policy is served (Ray Serve deployment `GenerationServer`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(1, ge=1)
    """Number of Serve replicas, each holding a copy of the policy."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica (fractions share a GPU)."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU threads torch uses in a replica (None: its whole CPUs reserved, at least 1)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica (e.g. {"node:gen": 0.01} to pin replicas to a node type)."""
    max_batch_size: int = Field(16, ge=1)
    """Most requests generated together (dynamic batching)."""
    batch_wait_timeout_s: float = Field(0.25, ge=0)
    """Longest a batch stays open to fill up after its first request."""
    batch_idle_s: float = Field(0.01, ge=0)
    """A batch closes early when no request has arrived for this long (see `batching.py`)."""
    max_prompt_tokens: int = Field(512, ge=8)
    """Prompts are cut to their last this-many tokens."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once (Ray Serve back-pressure)."""
    http_host: str = "127.0.0.1"
    """Address of the OpenAI-compatible HTTP routes."""
    http_port: int = Field(8000, ge=0, le=65535)
    """Port of the OpenAI-compatible HTTP routes."""
    route_prefix: str = "/"
    """Where the HTTP routes are mounted."""
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
