"""The daemon's one outbound HTTP stack, shared by the model providers and the remote MCP transports.

``client`` makes the treq client on one persistent connection pool (connect timeout, bodies written at
once); ``body`` reads a response body chunk by chunk with a size cap and can abort it; ``scrub`` removes a
secret from any text before it is cut or shown; ``exchange`` is one streaming request bounded by a deadline
to the first byte, an idle timer reset on every chunk and a cap on the total size, classifying failures
(with the status carried on the error) and retrying before any output, honouring ``Retry-After`` and
``retry-after-ms``. What the bytes of a stream mean is decided by a sink (a codec), never here.
"""

from aichat.transport.body import BodyReader, BodyTooLarge, read_body
from aichat.transport.client import DEFAULT_MAX_IDLE_CONNECTIONS, HTTPClient, make_http_client, make_pool
from aichat.transport.exchange import Limits, RetryPolicy, StreamingClient, StreamSink, UpstreamError
from aichat.transport.scrub import Scrubber, short_reason

__all__ = [
    "DEFAULT_MAX_IDLE_CONNECTIONS",
    "BodyReader",
    "BodyTooLarge",
    "HTTPClient",
    "Limits",
    "RetryPolicy",
    "Scrubber",
    "StreamSink",
    "StreamingClient",
    "UpstreamError",
    "make_http_client",
    "make_pool",
    "read_body",
    "short_reason",
]
