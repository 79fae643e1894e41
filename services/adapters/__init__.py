"""Receivers for the webhooks of labeling tools (Argilla, Label Studio) that
turn their events into feedback records submitted over gRPC."""
