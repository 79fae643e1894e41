"""The generation server: the current policy behind Ray Serve (batched, versioned)."""
