"""The generation server on its own (services/generation/app.py, what the RayService runs):
it starts its engines and serves the policy that a run's LATEST checkpoint names."""

import pytest
import yaml

from rlhf.storage import CheckpointStorage, write_policy

pytestmark = pytest.mark.ray  # the application imports Ray Serve (imported in the tests, so the unit tier can collect this file)

PROFILE = {"model": {"source": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
           "lora": {"enabled": False}, "generation": {"replicas": 1, "num_cpus": 0.25, "max_batch_size": 4},
           "ppo": {"rollout_batch_size": 4}}  # other sections are ignored


def test_arguments_and_sections_are_checked(tmp_path):
    from services.generation.app import engine_spec

    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    assert engine_spec({"config": str(path)}).generation.replicas == 1
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['weights'\]"):
        engine_spec({"config": str(path), "weights": "x"})
    with pytest.raises(ValueError, match="config: required"):
        engine_spec({})
    path.write_text(yaml.safe_dump({**PROFILE, "generation": {"replicas": 0}}))
    with pytest.raises(ValueError, match="(?s)generation: .*replicas"):
        engine_spec({"config": str(path)})


@pytest.mark.slow
def test_it_serves_the_policy_of_the_latest_checkpoint(ray_session, tmp_path):
    from ray import serve

    from services.generation.app import app, engine_spec
    from services.generation.engine import PolicyEngine
    from services.generation.server import EngineSpec

    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    spec = engine_spec({"config": str(path)})
    tensors = {k: v + 0.5 for k, v in PolicyEngine(spec.model, None).weights().items()}  # a "trained" policy
    storage = CheckpointStorage(f"file://{tmp_path}/bucket/checkpoints")
    write_policy(storage, "round-0002/policy", 3, tensors, adapters_only=False)
    storage.write_text("LATEST", "round-0002\n")

    handle = serve.run(app({"config": str(path), "checkpoints": storage.root}), name="hitl-generation-standalone",
                       route_prefix=None)
    try:
        from services.generation.engine import GenerateRequest

        assert handle.policy_version.remote().result() == 3
        result = handle.generate.remote(GenerateRequest(prompt="Hi", max_new_tokens=4, temperature=0.0)).result()
        assert result.policy_version == 3 and result.completion_tokens > 0
    finally:
        serve.delete("hitl-generation-standalone")

    # nothing checkpointed yet: it says where it looked
    with pytest.raises(FileNotFoundError, match="LATEST"):
        EngineSpec(**{**spec.model_dump(), "checkpoints": str(tmp_path / "empty")}).start()
