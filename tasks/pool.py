"""How long a prefork child waits, when it exits, for the main process to read its results.

billiard 4.3 makes an exiting pool child wait until the main process has read
every result it sent, polling ``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``
times every ``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL`` s: 300 x 0.1 s,
30 s. At a warm shutdown under load the main process never reads them:
Celery's ``AsynPool.flush`` discards the jobs whose "accepted" message it has
not read yet (they will be redelivered), the shutdown result handler drains
only while jobs remain in the cache, so it stops, and ``Pool.join`` then waits
for children that are themselves waiting, 30 s, for a reader that is gone.
That was the 36 s warm shutdown (4.5 s idle, where no result is in flight).

While the worker runs, the main process reads a result within milliseconds,
so a couple of seconds keeps the guarantee where it matters (a child recycled
by ``max_tasks_per_child``) and bounds the shutdown. A result that is not read
is not lost: the child stored it in the result backend, and its message, not
acknowledged (``acks_late``), is delivered again and recomputed harmlessly.
"""

from __future__ import annotations

import billiard.pool

CHILD_EXIT_WAIT_S = 2.0
"""Longest an exiting pool child waits for its results to be read, seconds."""

billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = max(
    1, round(CHILD_EXIT_WAIT_S / billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL)
)
