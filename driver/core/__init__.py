"""Domain services: the orchestration behind each CSI call, free of gRPC and protobuf."""
