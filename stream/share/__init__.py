"""Share groups: queue semantics on the log (see proto/riverlog/v1/share.proto)."""
