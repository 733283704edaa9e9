"""The Dagster code location ``heimdex_assets``: assembles assets, sensors and resources."""

import dagster as dg

from heimdex_assets.assets import DERIVED_ASSETS, SOURCE_ASSETS
from heimdex_assets.checks import FRESHNESS_CHECKS, FRESHNESS_SPECS
from heimdex_assets.jobs import reprocess_job
from heimdex_assets.schedules import prune_generations_job, prune_generations_schedule
from heimdex_assets.sensors import (
    freshness_checks_sensor,
    generation_activation_sensor,
    owner_discovery_sensor,
    stale_partitions_sensor,
    video_discovery_sensor,
)
from heimdex_assets.settings import resources_from_env

defs = dg.Definitions(
    assets=[*SOURCE_ASSETS, *DERIVED_ASSETS, *FRESHNESS_SPECS],
    asset_checks=FRESHNESS_CHECKS,
    sensors=[
        video_discovery_sensor,
        owner_discovery_sensor,
        stale_partitions_sensor,
        generation_activation_sensor,
        freshness_checks_sensor,
    ],
    jobs=[prune_generations_job, reprocess_job],
    schedules=[prune_generations_schedule],
    resources=resources_from_env(),
    executor=dg.in_process_executor,
)
