#!/usr/bin/env bash
# CHASE_DB1 for the configs/*/chase_*.yaml runs (docs/segmentation.md, "CHASE_DB1"):
#   scripts/chase_data.sh CHASEDB1 [data/chase]
# Shards: children 01-10 (20 images) train, 11-14 (8 images) test, first observer's labels, fields of
# view derived from the photographs (mm's reader). Also writes the test images' derived fields of view
# as PNGs (OUT/fov/Image_NNX.png) for `mm segment --fov`: CHASE_DB1 ships none.
set -euo pipefail
root=${1:?usage: scripts/chase_data.sh CHASEDB1_FOLDER [OUT]}
out=${2:-data/chase}
python -m mm shards dataset --name chase --root "$root" --split train --out "$out"
python -m mm shards dataset --name chase --root "$root" --split test --out "$out"
python - "$root" "$out/fov" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mm.data.seg_readers import read_chase_db1

out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
samples = read_chase_db1(sys.argv[1], split="test")
for s in samples:
    Image.fromarray(np.where(s.fov, 255, 0).astype(np.uint8)).save(out / f"{s.image.stem}.png")
print(f"wrote {len(samples)} field-of-view masks to {out}")
PY
