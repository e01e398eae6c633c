"""Stowage: a local-storage CSI driver."""

from importlib import metadata

DRIVER_NAME = "stowage.csi.io"
TOPOLOGY_KEY = f"topology.{DRIVER_NAME}/node"
# volume_context keys CreateVolume returns (the PV keeps them as volumeAttributes).
CONTEXT_NODE = f"{DRIVER_NAME}/node"
CONTEXT_ACCESS_TYPE = f"{DRIVER_NAME}/access-type"
CONTEXT_FS_TYPE = f"{DRIVER_NAME}/fs-type"
CONTEXT_POOL_UUID = f"{DRIVER_NAME}/pool-uuid"  # the pool that holds the volume (pool.json)

try:
    __version__ = metadata.version("stowage-csi")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
