"""Settings, tables, the job state machine and artifact storage: the one owner of shared state."""
