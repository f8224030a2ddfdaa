"""Two places where kombu 5.7's Redis transport turns a Redis restart into a dead worker.

After the broker connection drops, the consumer reconnects on a new channel, but the old channel
is still asked (1) on close, to put its unacked messages back, and (2) after a running task ends,
to ack that task's message. Both reach through a connection that is already released and raise
AttributeError, which Celery treats as "Unrecoverable error" and stops consuming. Neither step
matters to tuneq: the database says which jobs are queued and worker.host re-sends them, and a
message left unacked comes back after the visibility timeout only to be dropped by the lease check.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

_ack = kombu_redis.QoS.ack


def _ack_unless_channel_gone(self, delivery_tag):  # noqa: ANN001, ANN202
    try:
        return _ack(self, delivery_tag)
    except AttributeError:
        log.warning("could not ack message %s: its broker connection is gone (Redis restarted)", delivery_tag)
        return None


def install() -> None:
    kombu_redis.QoS.restore_at_shutdown = False
    kombu_redis.QoS.ack = _ack_unless_channel_gone
