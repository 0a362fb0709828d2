#!/usr/bin/env bash
# One prepared GPU check, bounded to 8 minutes once installed (bench/gpu_check.py --budget 440: each stage
# gets at most what is left, stages that no longer fit are skipped and named, and the JSON is rewritten
# after every stage; never yet run on a GPU): the GPU-marked tests, 50 training steps of each
# trainer at a realistic size on synthetic data with random weights (FILIP ViT-B/16 batch 128 bf16 ZeRO-2;
# TopoLoRA-SAM vit_b at 1024; STRUCTURE heads at batch 4096; Structure-CLIP ViT-B/32; then FILIP with
# train.contrastive_accum=2 + train.grad_checkpointing and TopoLoRA-SAM 1024 with grad checkpointing),
# the FILIP loss against the naive dense one, the segmentation-inference benchmark at batch 8 and
# bench/engine.py (ViT-B/16 bf16, ZeRO-1/2/3 vs plain AdamW), all into ONE JSON file.
#
#   bash bench/gpu_check.sh [OUT.json]          # default gpu_check.json
#   bash bench/gpu_check.sh --dry-run           # any machine: resolve and check every config
#
# Nothing is downloaded. Fails at once, in one line, without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh >/dev/null
if [[ "${1:-}" == "--dry-run" ]]; then
    exec python bench/gpu_check.py --dry-run
fi
export DS_ACCELERATOR=cuda  # setup.sh pins the CPU accelerator for the test machines
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: bench/gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False); try --dry-run" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 475 python bench/gpu_check.py --out "${1:-gpu_check.json}"
