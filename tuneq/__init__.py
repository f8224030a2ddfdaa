"""The user's side of tuneq: the `tuneq` CLI, a small client, and `tuneq up`."""
