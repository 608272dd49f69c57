#!/bin/bash
# GlassGPT against nanoGPT on one GPU, in one device call: the GPU recipe, generate.py, decoding and the
# GPT-2 body. Layout (all git-ignored): .gpu/nanogpt = karpathy/nanoGPT as fetched (measurement only, with
# data/shakespeare_char/input.txt copied in), .gpu/snap = this repo at HEAD (git archive HEAD) with the same
# input.txt, .gpu/ts.py = a line timestamper; then: cp tools/gpu_compare.sh .gpu/run.sh && bash .gpu/run.sh
# SMOKE=1 OUT=/tmp/x bash .gpu/run.sh runs tiny versions on a CPU first.
set -u
export PYTHONUNBUFFERED=1
D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/devout}; mkdir -p "$OUT"
TS="python3 $D/ts.py"
R=$D/snap  # the project as committed (git archive HEAD), apart from the live checkout
T0=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - T0) )); }
lim() { local want=$1 l; l=$(left); if [ "$l" -lt "$want" ]; then want=$l; fi; if [ "$want" -lt 5 ]; then want=5; fi; echo $want; }
if [ "${SMOKE:-0}" = 1 ]; then
  EXTRA="--device=cpu --compile=False --max_iters=20 --lr_decay_iters=20 --eval_interval=10 --eval_iters=2 --n_layer=2 --n_embd=64 --n_head=2 --block_size=32 --batch_size=4"
  NEXTRA="--device=cpu --dtype=float32 --compile=False --max_iters=20 --lr_decay_iters=20 --eval_interval=10 --eval_iters=2 --n_layer=2 --n_embd=64 --n_head=2 --block_size=32 --batch_size=4"
  G2=" --n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --device=cpu --compile=False"; GEN="--device=cpu"
else
  EXTRA=""; NEXTRA=""; G2=" --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024"; GEN=""
fi
cd "$R"
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"; nproc; git log --oneline -1; } > "$OUT/env.txt" 2>&1
[ "${SMOKE:-0}" = 1 ] || { timeout $(lim 90) python3 -m pytest -q tests/test_cuda.py 2>&1 | tail -15 >> "$OUT/env.txt"; }  # needs pytest there (carry a wheel if absent)

run_g2() {  # label, dir, extra flags for ours: the GPT-2 body, 100 iterations, log every 10
  local label=$1 dir=$2 flags=${3:-}
  echo "== $label"; cd "$dir"
  if [ "$dir" = "$D/nanogpt" ]; then
    timeout $(lim 100) python3 train.py config/train_shakespeare_char.py $G2 --batch_size=12 --max_iters=100 --lr_decay_iters=100 --warmup_iters=5 --eval_interval=100000 --eval_iters=2 --log_interval=10 --dropout=0.0 --out_dir=out-g2 --gradient_accumulation_steps=1 2>&1
  else
    timeout $(lim 100) python3 train.py --dataset=shakespeare_char $G2 --batch_size=12 --max_iters=100 --lr_decay_iters=100 --warmup_iters=5 --eval_interval=100000 --eval_at_start=False --eval_iters=2 --log_interval=10 --dropout=0.0 --out_dir=out-g2 --always_save_checkpoint=False --replace_earlier_run=True --bias=False $flags 2>&1
  fi
  echo "rc $?"; cd "$R"
}

# 1. the GPU recipe, ours then nanoGPT's, whole processes
{ echo "== ours: python train.py config/shakespeare_char.py"; S=$(date +%s.%N)
  timeout $(lim 200) python3 train.py config/shakespeare_char.py $EXTRA 2>&1; echo "rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"; } | $TS > "$OUT/ours_recipe.log"
{ echo "== generate.py --ckpt best_model.pt (500 tokens), whole process"; S=$(date +%s.%N)
  timeout $(lim 60) python3 generate.py --ckpt best_model.pt $GEN 2>&1 | tail -3; echo "rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"
  S=$(date +%s.%N); timeout $(lim 60) python3 generate.py --ckpt best_model.pt --dtype float32 $GEN > /dev/null 2>&1; echo "float32 rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"
  S=$(date +%s.%N); timeout $(lim 90) python3 generate.py --ckpt best_model.pt --compile $GEN > /dev/null 2>&1; echo "--compile rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"
} 2>&1 | $TS > "$OUT/generate.log"
{ echo "== nanoGPT: python train.py config/train_shakespeare_char.py"; cd "$D/nanogpt/data/shakespeare_char" && python3 prepare.py > /dev/null; cd "$D/nanogpt"; S=$(date +%s.%N)
  timeout $(lim 200) python3 train.py config/train_shakespeare_char.py $NEXTRA 2>&1; echo "rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"; cd "$R"; } | $TS > "$OUT/nano_recipe.log"

# 2. decode ms/token
[ "${SMOKE:-0}" = 1 ] || timeout $(lim 90) python3 bench.py --decode --repeats 3 > "$OUT/decode.log" 2>&1

# 3. GPT-2 body ms/iter: ours, nanoGPT, and two inductor variants of ours
{ run_g2 "ours gpt2-body" "$R"; run_g2 "nanoGPT gpt2-body" "$D/nanogpt";
  run_g2 "ours gpt2-body compile_mode=reduce-overhead" "$R" --compile_mode=reduce-overhead; } 2>&1 | $TS > "$OUT/g2.log"

# 4. recipe variant without compile, if time is left
{ echo "== ours --compile_mode=reduce-overhead"; S=$(date +%s.%N)
  timeout $(lim 120) python3 train.py config/shakespeare_char.py --compile_mode=reduce-overhead --out_dir=out-graphs $EXTRA 2>&1 | grep -v "^iter"; echo "rc $? wall $(awk "BEGIN{print $(date +%s.%N) - $S}")"; } | $TS > "$OUT/ours_graphs.log"
echo "total $(( $(date +%s) - T0 ))s" >> "$OUT/env.txt"
