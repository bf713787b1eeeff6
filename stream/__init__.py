"""riverlog's talking half: broker, consumer groups, gRPC server, client and CLI.

The broker arrives with its own issue; until then this package holds the `riverlog` command.
"""

__all__: list[str] = []
