#!/bin/bash
# The GPU checks of the healing bench in one device call: bench/heal_speed.py at GPT-2 shapes (bare
# compiled loop, pretrain, online distill; 5 profiled steps each) and bench/engines_resume.py (the
# multi-device engines run and resume). Results and profiles land in $OUT; a short table is printed last.
#
# Prepared on the CPU machine first (both folders listed in .git/info/exclude, carried by the call):
#   python bench/heal_speed.py --prepare .gpu-assets          # tokenizers, SmolLM2's config, text
#   .whl/: Python 3.12 wheels the GPU image lacks: datasets dill multiprocess gguf, and for DeepSpeed
#   pydantic pydantic-core annotated-types typing-inspection hjson plus deepspeed itself, built here
#   with `DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`.
# Dry run on a CPU: NO_INSTALL=1 OUT=/tmp/out SHAPES=tiny ENGINES=ddp bash bench/gpu_check.sh
set -u
[ -n "${NO_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 LMSHRINK_CACHE=/tmp/lmcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, accelerate, datasets, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
R=/tmp/r
S=$(date +%s)
timeout ${HEAL_S:-330} python3 bench/heal_speed.py --assets .gpu-assets --output $R/heal --shapes ${SHAPES:-gpt2} --steps 60 --log-every 10 \
  --loss-rows 0 --only "torch.compile,pretrain,(online)" --budget-s 150 --profile-steps 5 ${HEAL_EXTRA:-} > $OUT/heal.log 2>&1
echo "heal bench: rc $? in $(( $(date +%s) - S )) s"
cp $R/heal/bench-gpu.json $OUT/ 2>/dev/null
for p in pretrain distill bare-compiled; do cp $R/heal/${SHAPES:-gpt2}/$p/profile/ops.txt $OUT/ops-$p.txt 2>/dev/null; done
gzip -c $R/heal/${SHAPES:-gpt2}/pretrain/profile/trace.json > $OUT/trace-pretrain.json.gz 2>/dev/null
S=$(date +%s)
timeout ${ENG_S:-240} python3 bench/engines_resume.py --assets .gpu-assets --output $R/eng --engines ${ENGINES:-zero2,fsdp2} > $OUT/engines.log 2>&1
echo "engines: rc $? in $(( $(date +%s) - S )) s"
cp $R/eng/engines.json $OUT/ 2>/dev/null
grep -v "it/s\]" $OUT/heal.log | grep -E "^\[|^\||target|Error|error" | cut -c1-600 | tail -20
grep -E "^\||Error" $OUT/engines.log | tail -12
