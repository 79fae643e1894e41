"""Generated from protos/ by `python -m services.feedback.codegen`; do not edit."""
