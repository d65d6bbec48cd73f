"""The worker's Redis broker transport: kombu's, surviving a broker outage.

kombu 5.7 + Celery 5.7: when the broker connection drops, the worker's
consumer collects the connection (which drops the transport's ``client``) and
then closes it. Closing a channel that holds unacknowledged messages (always
the case with ``task_acks_late`` and a task running, or one prefetched), and
later acknowledging such a message when its task ends, both build a Redis
client from that dropped ``client``: ``AttributeError: 'NoneType' object has
no attribute 'hostname'``. Celery's handlers expect connection errors there,
so the AttributeError escapes and the whole worker exits ("Unrecoverable
error"): a Redis restart would take every busy worker down.

This channel reports that case as the connection error it is, so Celery logs
it and reconnects. Nothing is lost: the unacknowledged messages are also in
Redis's unacked index and are delivered again after the visibility timeout.
Selected for ``celery worker`` only (``celeryd_init``): the API's client and
Flower (whose broker view knows transports by URL scheme) keep kombu's own.
"""

from __future__ import annotations

from typing import Any

from celery import signals
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, raising a connection error once its connection is gone."""

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("this broker channel's connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


@signals.celeryd_init.connect
def _use_in_worker(conf: Any = None, **kwargs: Any) -> None:
    """Make ``celery worker`` connect to its broker through :class:`Transport`."""
    if conf is not None and str(conf.broker_url).startswith("redis://"):
        conf.broker_transport = f"{__name__}:Transport"
