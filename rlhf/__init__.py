"""The Ray-free RLHF core of hitl.

Plain Python on torch, transformers and peft: typed config models (``rlhf.config``), policy,
reference and critic models (``rlhf.models``), preference data (``rlhf.preferences``), the
Bradley–Terry reward model (``rlhf.reward``) and PPO (``rlhf.ppo``). The Ray actors in
``actors/`` and the services in ``services/`` wrap it; nothing in this package imports Ray or
gRPC, so all of it runs and is tested in one ordinary process.
"""
