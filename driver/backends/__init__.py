"""Storage backends: where a volume's bytes live. No gRPC, no protobuf here."""
