"""Consumer groups: the coordinator state machine, the assignor, the committed-offset store."""
