"""The treq client every outbound request uses: one persistent connection pool, a connect timeout, and
request bodies written in one go."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from treq.client import HTTPClient as TreqHTTPClient
    from twisted.web.client import HTTPConnectionPool

#: Idle connections kept per upstream host; enough for the turns one daemon streams at once.
DEFAULT_MAX_IDLE_CONNECTIONS = 256


class HTTPClient(Protocol):
    """What we use of :class:`treq.HTTPClient` (and of ``treq.testing.StubTreq``)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers | None = None,
        data: bytes | None = None,
        unbuffered: bool = False,
    ) -> Deferred[Any]:
        """Send a request; the Deferred fires with the response once its headers have arrived."""
        ...


def make_pool(reactor: Any, max_idle: int = DEFAULT_MAX_IDLE_CONNECTIONS) -> HTTPConnectionPool:
    """A persistent connection pool keeping up to ``max_idle`` idle connections per host.

    Each streaming turn holds its connection for the whole answer, so after a burst of ``n`` concurrent
    turns ``n`` connections come back; the ones beyond ``max_idle`` are closed and the next burst has to
    connect again. Close the pool with ``closeCachedConnections()`` at shutdown.
    """
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_idle
    return pool


def make_http_client(
    reactor: Any,
    *,
    connect_timeout: float = 10.0,
    pool: HTTPConnectionPool | None = None,
) -> TreqHTTPClient:
    """A treq client whose agent gives up connecting after ``connect_timeout`` seconds.

    ``reactor`` must provide TCP, SSL and time (the real reactor). Without ``pool`` one is made by
    :func:`make_pool`.
    """
    from treq.client import HTTPClient as TreqHTTPClient
    from twisted.web.client import Agent

    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool or make_pool(reactor))
    return TreqHTTPClient(agent, data_to_body_producer=body_producer)


def body_producer(data: Any) -> IBodyProducer:
    """treq's ``data_to_body_producer``: bytes as a :class:`BytesBody`, anything else as treq would."""
    return BytesBody(data) if isinstance(data, bytes) else IBodyProducer(data)


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written in one go.

    treq would wrap bytes in a ``FileBodyProducer``, which writes from a cooperative task on a later
    turn of the reactor; with this the request line, headers and body leave together.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""
