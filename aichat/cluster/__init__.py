"""Many instances on one PostgreSQL: the database is the bus.

A turn's events go to a durable log (:mod:`aichat.cluster.log`), written by the instance that runs it;
``LISTEN/NOTIFY`` only wakes the other instances (:mod:`aichat.cluster.listener`), and a periodic catch-up
read covers a lost notification. :mod:`aichat.cluster.coordinator` holds the live side: the leases of the
turns this instance runs, the mirrors of streams run elsewhere, and the takeover of turns whose instance
died. Text deltas are coalesced first (:mod:`aichat.chat.coalesce`).
"""
