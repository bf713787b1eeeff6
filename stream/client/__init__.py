"""The Python client: Producer, Consumer, Admin and their asyncio flavours (stream.aio)."""
