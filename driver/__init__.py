"""Stowage: a local-storage CSI driver."""

from importlib import metadata

DRIVER_NAME = "stowage.csi.io"
TOPOLOGY_KEY = "topology.stowage.csi.io/node"

try:
    __version__ = metadata.version("stowage-csi")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
