"""Ray actors of the loop: placement, the reward model, the PPO trainer group, the
feedback service host and the coordinator. They wrap `rlhf/` and `services/`; Ray is
imported here and nowhere in `rlhf/`."""
