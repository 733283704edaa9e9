#!/usr/bin/env bash
# The scene-embeddings bench on a CUDA machine, from a fresh clone: set up .venv (scripts/setup.sh), check
# that torch sees the GPU, then ViT-B-32 (random weights: same compute) model-bound vs pipeline, and the
# pipeline's zero-cost ceiling. Prints CLIP img/s and the pipeline / model-bound ratio. The bench runs
# stay under 5 minutes (BENCH_TIMEOUT_S, default 280 s for both); the first setup downloads torch.
# Written for issue 8; not yet run on a GPU.
#
#   bench/gpu.sh                      # 200 videos x 10 scenes
#   VIDEOS=500 SCENES=10 bench/gpu.sh # more work per run
set -euo pipefail
cd "$(dirname "$0")/.."

VIDEOS="${VIDEOS:-200}"
SCENES="${SCENES:-10}"
PG_PORT="${PG_PORT:-55532}"
OUT="${OUT:-bench/results}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-280}"

scripts/setup.sh
PY=.venv/bin/python
"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "no GPU"); sys.exit(0 if ok else 1)' \
  || { echo "gpu.sh: torch sees no CUDA device (driver? a CPU-only torch wheel?)" >&2; exit 1; }
mkdir -p "$OUT"
deadline=$((SECONDS + BENCH_TIMEOUT_S))

run_bench() {  # name, then bench arguments
  local name=$1 left=$((deadline - SECONDS))
  shift
  ((left > 10)) || { echo "gpu.sh: no time left for $name" >&2; return 1; }
  timeout "$left" "$PY" bench/scene_embeddings.py --device cuda --videos "$VIDEOS" --scenes "$SCENES" \
    --pg-port "$PG_PORT" --work-dir /tmp/heimdex-bench-gpu --quiet --json-out "$OUT/gpu-$name.json" "$@" >/dev/null
}

run_bench vit-b-32 --clip-model ViT-B-32
run_bench zero-cost --zero-cost

"$PY" - "$OUT/gpu-vit-b-32.json" "$OUT/gpu-zero-cost.json" <<'PYEOF'
import json, sys

model, ceiling = (json.load(open(p)) for p in sys.argv[1:])
r, z = model["rates_scenes_per_s"], ceiling["rates_scenes_per_s"]
n = model["corpus"]["scenes"]
print(f"GPU: {model['machine']['gpu']}; {n} scenes; CLIP batch {model['models']['clip_batch_size']}")
a = model["model_bound"]
print(f"ViT-B-32 model alone (embed_tensors, inputs ready):              {a['clip_items'] / a['clip_model_s']:.0f} img/s")
print(f"ViT-B-32 model-bound (read+decode+preprocess+embed, one thread): {r['model_bound_clip']:.0f} img/s")
print(f"ViT-B-32 inside the pipeline (scene_clip_embeddings asset):       {r['pipeline_clip']:.0f} img/s")
print(f"pipeline / model-bound: {model['ratio']:.3f} overall, CLIP {model['ratio_clip']:.3f}")
print(f"pipeline ceiling (zero-cost model, CLIP asset, with Dagster):      {z['pipeline']:.0f} scenes/s")
alone = a["clip_items"] / a["clip_model_s"]
bound = "the pipeline" if z["pipeline"] < alone else "the model"
print(f"pipeline ceiling / model alone: {z['pipeline'] / alone:.2f} -> {bound} sets the pace (< 1: the GPU waits)")
PYEOF
