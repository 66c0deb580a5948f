"""Placement: where workers are, how loaded, and which prefix blocks each one caches."""

from router.placement.base import KVEventBatch, PlacementStore, WorkerRecord, WorkerRole
from router.placement.embedded import EmbeddedPlacementStore

__all__ = ["EmbeddedPlacementStore", "KVEventBatch", "PlacementStore", "WorkerRecord", "WorkerRole"]
