"""The broker's security core: bearer tokens, Kafka-style ACLs and per-principal quotas."""
