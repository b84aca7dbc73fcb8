"""The gateway's upstream HTTP/1.1 client: keep-alive pools over asyncio transports and httptools.

``UpstreamPool(settings).request(method, target, headers, body, idempotent=...)`` returns an
``UpstreamResponse`` once the head arrived; its body streams with bounded buffering. See ``pool`` for pooling and
retries, ``connection`` for the wire protocol and flow control, ``balancer`` for round robin and ejection.
"""

from wasm_gateway.upstream.balancer import RoundRobinBalancer
from wasm_gateway.upstream.connection import BodySource, RequestBodyError, Target, UpstreamResponse
from wasm_gateway.upstream.pool import UpstreamPool, UpstreamSettings

__all__ = [
    "BodySource",
    "RequestBodyError",
    "RoundRobinBalancer",
    "Target",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamSettings",
]
