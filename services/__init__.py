"""Long-running processes with a port: the feedback service and the generation server."""
