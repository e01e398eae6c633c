"""The CSI edge: gRPC server, interceptors, thin servicers, protobuf <-> domain conversion and
the one error-to-code table. The only layer that imports grpc or csi_proto."""
