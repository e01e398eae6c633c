"""stowagectl: the operator CLI over the CSI socket, and the `make run` demo client."""
