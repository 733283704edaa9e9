"""Sensors: partition discovery for videos and owners."""

from heimdex_assets.sensors.owner_discovery import owner_discovery_sensor
from heimdex_assets.sensors.video_discovery import video_discovery_sensor

__all__ = ["owner_discovery_sensor", "video_discovery_sensor"]
