#!/usr/bin/env bash
# The main job end to end on the embedded default, on the CPU: synthetic shapes-world shards ->
# each landed trainer (CLIP baseline, FILIP, TopoLoRA-SAM) trained by 2 ranks under the deepspeed launcher with
# ZeRO-2 -> exported weights -> zero-shot classification (or segmentation Dice) on held-out images.
source "$(dirname "$0")/setup.sh"
DATA=data/demo
if [ ! -f "$DATA/train/shapes-000011.tar" ]; then
  mm-shards synthetic --out "$DATA/train" --num-samples 6000 --image-size 32 --shard-size 500 --seed 0 --overwrite
fi
if [ ! -f "$DATA/val/shapes-000000.tar" ]; then
  mm-shards synthetic --out "$DATA/val" --num-samples 240 --image-size 32 --balanced --seed 1 --overwrite
fi
for task in clip filip topolora_sam; do
  rm -rf "runs/demo-$task"  # the demo always trains from scratch; real runs resume from their out_dir
  deepspeed --num_gpus 2 "train/$task.py" --config "configs/$task/tiny.yaml" --deepspeed_config configs/ds/zero2.json \
    > "runs/demo-$task.log" 2>&1 || { tail -20 "runs/demo-$task.log"; exit 1; }
  grep "^$task: step" "runs/demo-$task.log"
done
zeroshot() {  # checkpoint scoring: print the human line, keep the JSON record in the run directory
  python eval/zeroshot.py --checkpoint "runs/demo-$1/export/model.safetensors" --scoring "$2" \
    --data "$DATA/val/shapes-000000.tar" --classnames shapes --templates shapes \
    --output "runs/demo-$1/zeroshot-$2.json" | grep "^zero-shot"
}
zeroshot clip pooled
zeroshot filip pooled
zeroshot filip tokenwise
