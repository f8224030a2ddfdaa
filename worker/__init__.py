"""The GPU worker: Celery tasks that lease a job, run the trainer and stream its events to the DB."""
