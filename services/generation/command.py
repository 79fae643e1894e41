"""`hitl generation serve`: the generation server on its own, to serve and probe a policy
without running the loop.

    hitl generation serve configs/local.yaml              # the config's model, as trained so far: none
    hitl generation serve runs/local-0001                 # a run's latest checkpointed policy
    hitl generation serve RUN_DIR --port 8100 --address auto

A run directory's config.json gives the model, LoRA, generation and template sections and its
checkpoints (`coordinator.storage`, default `<run_dir>/checkpoints`); a config file gives the
base model. The routes are those of the loop's server (OpenAI-compatible, API keys and TLS as
the `generation` section says, closed off the loopback address).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click


def _source(path: Path, checkpoints: str | None) -> dict:
    """The application's arguments (services/generation/app.py) for a config file or a run directory."""
    if path.is_dir():
        config = path / "config.json"
        if not config.exists():
            raise click.BadParameter(f"{path}: not a run directory (no config.json)", param_hint="SOURCE")
        storage = (json.loads(config.read_text()).get("coordinator") or {}).get("storage")
        found = checkpoints or storage or str(path / "checkpoints")
        return {"config": str(config), "checkpoints": found}
    if not path.exists():
        raise click.BadParameter(f"{path}: no such file or directory", param_hint="SOURCE")
    return {"config": str(path), **({"checkpoints": checkpoints} if checkpoints else {})}


@click.group()
def generation() -> None:
    """The generation server on its own."""


@generation.command("serve")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--checkpoints", default=None, help="Checkpoint storage to serve from (path or URI); default: the run's.")
@click.option("--host", default=None, help="Address of the HTTP routes (default: the config's generation.http_host).")
@click.option("--port", type=int, default=None, help="Port of the HTTP routes (default: the config's generation.http_port).")
@click.option("--address", default=None, help="Ray cluster to join (default: start a local one).")
def serve_command(source: Path, checkpoints: str | None, host: str | None, port: int | None, address: str | None) -> None:
    """Serve SOURCE's policy: a run directory (its latest checkpoint) or a config file (its base model)."""
    import ray
    from ray import serve

    from services.generation.app import engine_spec
    from services.generation.config import GenerationConfig
    from services.generation.server import APP_NAME, build_app, http_options
    from services.exposure import read_api_keys

    args = _source(source, checkpoints)
    try:
        spec = engine_spec(args)
        overrides = {k: v for k, v in (("http_host", host), ("http_port", port)) if v is not None}
        generation_cfg = GenerationConfig.model_validate({**spec.generation.model_dump(), **overrides})
        if generation_cfg.api_keys_file:
            read_api_keys(generation_cfg.api_keys_file, "generation.api_keys_file")
    except ValueError as err:  # config errors name the field, before anything starts
        raise click.UsageError(str(err)) from None
    spec = spec.model_copy(update={"generation": generation_cfg})
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options=http_options(generation_cfg))
        handle = serve.run(build_app(spec, str(spec.model.path or spec.model.source), generation_cfg), name=APP_NAME,
                           route_prefix=generation_cfg.route_prefix)
        scheme = "https" if generation_cfg.tls_cert_file else "http"
        version = handle.policy_version.remote().result()
        click.echo(f"serving policy version {version} of {args.get('checkpoints') or args['config']} at "
                   f"{scheme}://{generation_cfg.http_host}:{generation_cfg.http_port}{generation_cfg.route_prefix.rstrip('/')}/v1 "
                   "(Ctrl-C stops)", err=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
