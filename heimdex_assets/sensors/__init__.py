"""Sensors: partition discovery for videos and owners, backfills of stale partitions, generation flips."""

from heimdex_assets.sensors.freshness_checks import freshness_checks_sensor
from heimdex_assets.sensors.generation_activation import generation_activation_sensor
from heimdex_assets.sensors.owner_discovery import owner_discovery_sensor
from heimdex_assets.sensors.stale_partitions import stale_partitions_sensor
from heimdex_assets.sensors.video_discovery import video_discovery_sensor

__all__ = [
    "freshness_checks_sensor",
    "generation_activation_sensor",
    "owner_discovery_sensor",
    "stale_partitions_sensor",
    "video_discovery_sensor",
]
