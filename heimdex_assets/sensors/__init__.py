"""Sensors: partition discovery (and, later, stale-partition backfills)."""

from heimdex_assets.sensors.video_discovery import video_discovery_sensor

__all__ = ["video_discovery_sensor"]
