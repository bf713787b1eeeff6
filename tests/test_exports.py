"""The packages' public surface is exactly their `__all__` (a drift fails here)."""

from __future__ import annotations

import types

import pytest

import storage
import stream
import stream.aio as stream_aio


@pytest.mark.parametrize("package", [storage, stream, stream_aio])
def test_all_lists_every_public_name(package: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    exported = set(package.__all__)
    assert public - exported == set(), "public but missing from __all__"
    assert exported - public == set(), "in __all__ but not defined"


def test_storage_surface_is_stable() -> None:
    # The names other packages build on; removing one is a breaking change.
    for name in ("PartitionLog", "LogConfig", "FsyncPolicy", "encode_batch", "decode_records"):
        assert name in storage.__all__


def test_client_surface_is_stable() -> None:
    # The client API users write against (the list); removing one breaks them.
    for name in ("Producer", "Consumer", "Admin", "Record", "RecordMetadata", "TopicPartition"):
        assert name in stream.__all__
    for name in ("ShareConsumer", "ShareRecord", "AckFailure", "Requester", "Responder"):
        assert name in stream.__all__
    # What Admin's share-group calls answer with.
    for name in (
        "ShareGroupListing",
        "ShareGroupDescription",
        "ShareMemberDescription",
        "SharePartitionState",
        "ShareGroupConfig",
    ):
        assert name in stream.__all__
    # Security: connection options, the Admin security calls' answers, their errors.
    for name in (
        "TlsOptions",
        "WhoAmI",
        "AclEntry",
        "Quota",
        "QuotaListing",
        "AuthenticationError",
        "AuthorizationError",
    ):
        assert name in stream.__all__
    assert set(stream_aio.__all__) == {
        "AsyncProducer",
        "AsyncConsumer",
        "AsyncAdmin",
        "AsyncShareConsumer",
        "AsyncRequester",
        "AsyncResponder",
    }
