#!/usr/bin/env bash
# The main job end to end on the embedded default, on the CPU: synthetic shapes-world shards ->
# CLIP baseline trained by 2 ranks under the deepspeed launcher with ZeRO-2 -> exported weights ->
# zero-shot classification of held-out images, printed next to chance level.
source "$(dirname "$0")/setup.sh"
DATA=data/demo
if [ ! -f "$DATA/train/shapes-000011.tar" ]; then
  mm-shards synthetic --out "$DATA/train" --num-samples 6000 --image-size 32 --shard-size 500 --seed 0 --overwrite
fi
if [ ! -f "$DATA/val/shapes-000000.tar" ]; then
  mm-shards synthetic --out "$DATA/val" --num-samples 240 --image-size 32 --balanced --seed 1 --overwrite
fi
rm -rf runs/demo-clip  # the demo always trains from scratch; real runs resume from their out_dir
deepspeed --num_gpus 2 train/clip.py --config configs/clip/tiny.yaml --deepspeed_config configs/ds/zero2.json
python eval/zeroshot.py --checkpoint runs/demo-clip/export/model.safetensors \
  --data "$DATA/val/shapes-000000.tar" --classnames shapes --templates shapes \
  --output runs/demo-clip/zeroshot.json
