"""Request/reply over topics: a price-quote service answers requests with Responder, a client
asks with Requester.

The requester produces each request with the headers riverlog-reply-to (its reply topic) and
riverlog-correlation-id, and waits for the reply carrying the same id. The responder is a
member of a share group on the request topic (start more in the same group and they split the
requests); it produces the handler's answer to the reply topic, then acknowledges the request.
A handler that raises releases the request, which comes back after the group's retry backoff.

    python examples/request_reply.py       (a broker on $RIVERLOG_SERVER or 127.0.0.1:7171)
"""

from __future__ import annotations

import contextlib
import threading
import time

from stream import (
    Admin,
    AlreadyExistsError,
    GroupError,
    Requester,
    Responder,
    ShareRecord,
)

REQUESTS = "quote-requests"
REPLIES = "quote-replies"  # the requester creates it (one partition) when it is missing
GROUP = "quote-service"
PRICES_CENTS = {"AAPL": 23_412, "MSFT": 41_530, "NVDA": 12_875}
ORDERS = ["AAPL 10", "MSFT 3", "NVDA 100", "ACME 1"]
DEADLINE_S = 20.0


def quote(request: ShareRecord) -> bytes:
    """The service: "SYMBOL QUANTITY" in, the total price (or why there is none) out."""
    symbol, quantity = (request.value or b"").decode().split()
    cents = PRICES_CENTS.get(symbol)
    if cents is None:
        return f"no quote: unknown symbol {symbol}".encode()
    total = cents * int(quantity)
    return f"{quantity} x {symbol} = {total // 100:,}.{total % 100:02d} USD".encode()


def wait_for_responder(admin: Admin) -> None:
    """Wait until the responder has joined its share group. A new share group starts at the
    end of the request topic: a request sent before the group exists is never answered."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            if admin.describe_share_group(GROUP).members:
                return
        except GroupError as e:
            if e.name != "UNKNOWN_GROUP":  # not created yet: the responder is still joining
                raise
        time.sleep(0.02)
    raise SystemExit(f"the responder did not join share group {GROUP} in {DEADLINE_S} s")


def main() -> None:
    with Admin() as admin:
        with contextlib.suppress(AlreadyExistsError):
            admin.create_topic(REQUESTS, 2)
        with (
            Responder(topic=REQUESTS, group=GROUP, handler=quote) as responder,
            Requester(topic=REQUESTS, reply_topic=REPLIES, timeout_s=5.0) as requester,
        ):
            # serve() blocks: answer exactly our requests on a thread of its own.
            served: list[int] = []
            server = threading.Thread(
                target=lambda: served.append(
                    responder.serve(max_requests=len(ORDERS), timeout_s=DEADLINE_S)
                )
            )
            server.start()
            try:
                wait_for_responder(admin)
                for order in ORDERS:
                    started = time.monotonic()
                    reply = requester.request(order.encode())
                    took_ms = (time.monotonic() - started) * 1000
                    print(f"{order:<9} -> {(reply.value or b'').decode()}  ({took_ms:.1f} ms)")
            finally:
                responder.close()  # leaves the group; ends serve() early if a request failed
                server.join(DEADLINE_S)
    print(f"the service answered {sum(served)} requests")
    if served != [len(ORDERS)]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
