"""How many runs (one backfill each) the stale sensor and the ``reprocess`` job make, and how full they are.

    .venv/bin/python bench/run_sizing.py [--videos 10000 --seed 0]

Two stale sets over ``--videos`` registered videos with 5 to 35 scenes each (seeded): contiguous (the
first 1,000) and scattered (every 10th: 1,000 stale videos); each packed by ``pack_runs`` for the CPU
and GPU defaults of scenes per run, under the assets' present ``max_partitions_per_run`` and uncapped.
Prints a table and JSON; no database or Dagster needed (the packing is pure).
"""

import argparse
import json
import random
import statistics
import uuid

from heimdex_assets.assets import VIDEO_ASSETS
from heimdex_assets.launch import CPU_SCENES_PER_RUN, GPU_SCENES_PER_RUN, pack_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ordered = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(args.videos)]
    weights = {k: rng.randint(5, 35) for k in ordered}
    policy_cap = min(a.backfill_policy.max_partitions_per_run for a in VIDEO_ASSETS)
    cases = {"contiguous": set(ordered[:1000]), "scattered 1/10": set(ordered[::10][:1000])}
    rows = []
    for case, stale in cases.items():
        for per_run_name, per_run in (("cpu", CPU_SCENES_PER_RUN), ("gpu", GPU_SCENES_PER_RUN)):
            for cap_name, cap in ((f"policy {policy_cap}", policy_cap), ("uncapped", None)):
                runs = pack_runs(ordered, stale, weights, per_run, cap)
                stale_per_run = [sum(k in stale for k in run) for run in runs]
                scenes = [sum(weights[k] for k in run if k in stale) for run in runs]
                assert sum(stale_per_run) == len(stale)
                rows.append(
                    {
                        "case": case,
                        "stale_videos": len(stale),
                        "stale_scenes": sum(weights[k] for k in stale),
                        "scenes_per_run": per_run,
                        "device": per_run_name,
                        "max_partitions": cap_name,
                        "runs": len(runs),
                        "runs_per_1000_stale": round(len(runs) * 1000 / len(stale), 1),
                        "partitions_per_run_mean": round(statistics.mean(len(r) for r in runs), 1),
                        "stale_per_run_mean": round(statistics.mean(stale_per_run), 1),
                        "scenes_per_run_mean": round(statistics.mean(scenes), 1),
                        "scenes_per_run_max": max(scenes),
                    }
                )
    header = (
        f"{'case':<15}{'dev':<5}{'cap':<11}{'runs':>6}{'/1000':>7}{'parts/run':>11}{'stale/run':>11}{'scenes/run':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['case']:<15}{r['device']:<5}{r['max_partitions']:<11}{r['runs']:>6}{r['runs_per_1000_stale']:>7}"
            f"{r['partitions_per_run_mean']:>11}{r['stale_per_run_mean']:>11}{r['scenes_per_run_mean']:>12}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
