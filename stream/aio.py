"""The asyncio flavour of the client: the same cores the sync classes run on a loop thread.

async with AsyncProducer() as producer:
    metadata = await (await producer.send("orders", b"order 1"))
"""

from .client._admin import AsyncAdmin
from .client._consumer import AsyncConsumer
from .client._producer import AsyncProducer
from .client._reqreply import AsyncRequester, AsyncResponder
from .client._share import AsyncShareConsumer

__all__ = [
    "AsyncAdmin",
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncRequester",
    "AsyncResponder",
    "AsyncShareConsumer",
]
