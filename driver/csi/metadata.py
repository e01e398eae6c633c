"""CSI SnapshotMetadata service (server streaming): validate -> core -> convert. The ranges come
from extent maps (driver/core/metadata.py); each message carries at most max_results of them."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from csi_proto import csi_pb2, csi_pb2_grpc
from driver.backup.extents import Range
from driver.core.metadata import MetadataCore

_VARIABLE = csi_pb2.BlockMetadataType.VARIABLE_LENGTH


def _blocks(page: list[Range]) -> list[csi_pb2.BlockMetadata]:
    return [csi_pb2.BlockMetadata(byte_offset=r.offset, size_bytes=r.length) for r in page]


class SnapshotMetadataServicer(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, core: MetadataCore) -> None:
        self._core = core

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        answer = self._core.allocated(
            request.snapshot_id, request.starting_offset, request.max_results
        )
        for page in answer.pages:
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=_VARIABLE,
                volume_capacity_bytes=answer.capacity,
                block_metadata=_blocks(page),
            )

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        answer = self._core.delta(
            request.base_snapshot_id,
            request.target_snapshot_id,
            request.starting_offset,
            request.max_results,
        )
        for page in answer.pages:
            yield csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=_VARIABLE,
                volume_capacity_bytes=answer.capacity,
                block_metadata=_blocks(page),
            )
