#!/bin/sh
# One image, several roles: `api` (migrates first), `worker`, `serve`, `migrate`, `flower`; anything else runs as given.
set -eu

case "${1:-api}" in
  api)
    shift || true
    # Every API replica may run this: Alembic takes a lock and a second run finds head.
    python -m core.migrate
    # --http: uvicorn's protocol with header and body read deadlines (api/server.py).
    exec uvicorn api.main:app --host 0.0.0.0 --port "${PORT:-8000}" --http api.server:GuardedHttpToolsProtocol --proxy-headers \
      --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" --workers "${TUNEQ_API_WORKERS:-2}" "$@"
    ;;
  worker)
    shift
    exec python -m worker "$@"
    ;;
  serve)
    shift
    # Chat completions; on a GPU host it holds one GPU (the workers' lock files) while it runs.
    exec python -m worker.serve "$@"
    ;;
  migrate)
    exec python -m core.migrate
    ;;
  flower)
    shift
    exec celery -A worker.app flower --port="${PORT:-5555}" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
