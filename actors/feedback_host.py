"""The feedback service inside the cluster: a Ray actor hosting `FeedbackServer`."""

from __future__ import annotations

import ray


@ray.remote
class FeedbackServiceActor:
    async def start(self, cfg_json: str) -> str:
        """Start serving; returns the reachable host:port."""
        from services.feedback.config import FeedbackServiceConfig
        from services.feedback.server import FeedbackServer

        cfg = FeedbackServiceConfig.model_validate_json(cfg_json)
        self.server = FeedbackServer(cfg)
        port = await self.server.start()
        host = cfg.host if cfg.host not in ("0.0.0.0", "[::]") else ray.util.get_node_ip_address()
        return f"{host}:{port}"

    async def stop(self) -> None:
        await self.server.stop()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
