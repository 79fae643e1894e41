"""The feedback ingestion service: gRPC server, stores, auth and the Python client."""
