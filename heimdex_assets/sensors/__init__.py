"""Sensors: partition discovery for videos and owners, and backfills of stale partitions."""

from heimdex_assets.sensors.owner_discovery import owner_discovery_sensor
from heimdex_assets.sensors.stale_partitions import stale_partitions_sensor
from heimdex_assets.sensors.video_discovery import video_discovery_sensor

__all__ = ["owner_discovery_sensor", "stale_partitions_sensor", "video_discovery_sensor"]
