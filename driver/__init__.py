"""Stowage: a local-storage CSI driver."""

from importlib import metadata

DRIVER_NAME = "stowage.csi.io"
TOPOLOGY_KEY = f"topology.{DRIVER_NAME}/node"
# volume_context keys CreateVolume returns (the PV keeps them as volumeAttributes).
CONTEXT_NODE = f"{DRIVER_NAME}/node"
CONTEXT_ACCESS_TYPE = f"{DRIVER_NAME}/access-type"
CONTEXT_FS_TYPE = f"{DRIVER_NAME}/fs-type"
CONTEXT_POOL_UUID = f"{DRIVER_NAME}/pool-uuid"  # the pool that holds the volume (pool.json)
# What kubelet adds to NodePublish's volume_context with CSIDriver podInfoOnMount: true.
CONTEXT_POD_UID = "csi.storage.k8s.io/pod.uid"
# Mutable parameters (VolumeAttributesClass -> ControllerModifyVolume, CreateVolume's
# mutable_parameters): per-volume I/O limits, applied on the volume's node (docs/design.md).
MUTABLE_READ_IOPS = f"{DRIVER_NAME}/read-iops"
MUTABLE_WRITE_IOPS = f"{DRIVER_NAME}/write-iops"
MUTABLE_READ_BPS = f"{DRIVER_NAME}/read-bps"
MUTABLE_WRITE_BPS = f"{DRIVER_NAME}/write-bps"

try:
    __version__ = metadata.version("stowage-csi")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
