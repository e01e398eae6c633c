"""Generated CSI v1.12.0 protocol stubs (see csi.proto; regenerate with `make proto`)."""
