"""Storage: backends behind Protocols (the image pool), the metadata store and the keyed locks.
No gRPC, no protobuf here."""
