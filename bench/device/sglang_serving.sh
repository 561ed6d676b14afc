#!/usr/bin/env bash
# One device call: one setup of one model, one phase, through bench/sglang_serving.py (method v2; bench/README.md,
# "Serving method (v2)"), on one GPU; or, detached, legs of them one after the other. Setups are never run at the
# same time.
#   bash bench/device/sglang_serving.sh MODEL SETUP PHASE [sglang_serving.py run arguments...]
#   MODEL: 8b | 14b | 24b    SETUP: shared | unshared | colocated    PHASE: tune | sweep | goodput
#   e.g. bash bench/device/sglang_serving.sh 14b shared sweep --free-gib 77 --splits 65536
# Carry .pdbundle (and, on a fresh machine, .gpubundle and .whl: see setup.sh).
# The checkpoint is generated once per machine as /tmp/llama<MODEL> with the image's transformers; when the disk
# cannot hold it beside the others they are removed first (KEEP_MODELS=1: never).
# Cells already measured are skipped: those of bench/results/<card>-serving-v2.json (committed: it travels with
# the tree) and of this warm machine's earlier calls (/tmp/serving-v2). --wall-s is what is left of the call
# (CALL_S, default 590 s) so that it ends with its files written; --budget-s counts load seconds only.
# Out: serving-v2-part-*.json (this call's cells), <card>-serving-v2.{json,md} (all cells merged, summarised),
# serving-<model>-<setup>-<phase>.log, serving-logs-<model>-<setup>-<phase>.tgz (the servers' logs).
#
# A run longer than one call (bench/device/detached.sh): --detach starts it in a session of its own with RUN_S
# seconds of wall (default 1500; keep it inside the session's device time), waits for it while the call lasts
# and hands back what it wrote so far; each later call `bash bench/device/sglang_serving.sh --wait`, issued at
# once (the machine goes back 30 s after a call), waits again and hands back the same files, updated. The
# servers start once per setup for the whole run instead of once per call: three 171 s cells and more per call,
# not two. A detached run may chain legs, separated by `++`, one after the other within RUN_S, each leg knowing
# the cells of those before it (so `--splits tuned` follows a tuning leg; one model per run):
#   bash bench/device/sglang_serving.sh --detach 14b unshared sweep --free-gib 77 --splits 16384 ...
#   bash bench/device/sglang_serving.sh --detach 14b unshared sweep --free-gib 77 --splits tuned --points 8,32,64 \
#     --repeats-per-call 1 ++ 14b shared sweep --free-gib 77 --splits tuned --points 8,32,64 --repeats-per-call 1
#   bash bench/device/sglang_serving.sh --wait     # exit 75: still going, call again
T0=$SECONDS
W=${SERVING_DIR:-/tmp/serving-v2}  # the warm machine's state between calls
pack_cache() {  # NAME DIR CAP [find tests]: DIR's entries that pass the tests, handed back as $OUT/NAME.tgz if
  # at most CAP bytes; packed again only when one was written since the last pack (a --wait call hands back the
  # same file), and not at all when those entries are too large to carry
  local name=$1 dir=$2 cap=$3 tgz=$W/$1.tgz
  shift 3
  [ -d "$dir" ] || return 0
  local files bytes  # none yet (a build going on or failed): nothing to hand back, not an empty pack
  read -r files bytes < <(cd "$dir" && find . "$@" -type f -printf '%s\n' | awk '{n += $1} END {print NR, n + 0}')
  [ "$files" -gt 0 ] && [ "$bytes" -le 60000000 ] || return 0
  if [ ! -f $tgz ] || [ -n "$(cd "$dir" && find . -newer $tgz "$@" -print -quit)" ]; then
    touch $tgz.stamp  # an entry written while tar reads is newer than the pack, so packed next time
    (cd "$dir" && find . "$@" -print0 | tar --null --no-recursion -T - -czf $tgz.tmp) 2>/dev/null \
      && touch -r $tgz.stamp $tgz.tmp && mv $tgz.tmp $tgz
  fi
  [ "$(stat -c %s $tgz 2>/dev/null || echo 0)" -le $cap ] && cp $tgz "$OUT/$name.tgz"
  return 0
}
collect() {  # this run's parts, the merged results and the logs so far, into $OUT (whatever of them exists)
  local tag=$1 work=$2  # work: the servers' folders of the run's setups
  cp $W/out/$card-serving-v2.json $W/latest.json 2>/dev/null
  cp $W/out/serving-v2-part-*.json $W/out/$card-serving-v2.json $W/out/$card-serving-v2.md "$OUT"/ 2>/dev/null
  # servers still writing their logs make tar say "file changed as we read it" (status 1): what it read is kept
  [ -n "$work" ] && (cd $W/out && tar -czf "$OUT/serving-logs-$tag.tgz" $(ls -d $work 2>/dev/null)) 2>/dev/null
  # the kernels the servers compiled, for a later session to carry (.tritoncache/, setup.sh): Triton's (less its
  # half-written tmp.* folders), and SGLang's own JIT kernels, built with nvcc through tvm-ffi (the libraries
  # only: a built one in its folder is loaded without a build). With the Triton cache carried, the first prefill
  # on a fresh machine still spent 44-67 s in its first forward, and later starts 1 s: the pack handed back on
  # 2026-12-07 holds the four kernels (rope, KV store, activation, clamp) built in that minute (bench/README.md)
  pack_cache triton-cache ~/.triton/cache 10000000 -not -path '*/tmp.*'
  pack_cache jit-cache "${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}" 8000000 -name '*.so'
  return 0
}
known_cells() {  # the committed cells, this machine's earlier runs' and this run's (a tuning just measured)
  echo "bench/results/$card-serving-v2.json $W/latest.json $(ls $W/old/serving-v2-part-*.json \
    $W/out/serving-v2-part-*.json 2>/dev/null)"
}
run_legs() {  # in the detached session: each leg of $1 (one per line, shell-quoted) within RUN_S of wall
  local rc=0 line known left
  card=$(cat $W/runner.card) || return 1
  while IFS= read -r line; do
    eval "set -- $line"
    local model=$1 setup=$2 phase=$3
    shift 3
    left=$(( ${RUN_S:-1500} - (SECONDS - T0) ))
    known=$(known_cells)  # with this run's earlier legs' parts
    if [ $left -lt ${LEG_MIN_S:-250} ]; then  # not a start and one cell: the leg is the next run's
      echo "[serving] leg $model $setup $phase $*: not started, $left s of the run's wall left"; continue
    fi
    # the last leg's servers are gone from the GPU before this one's ballast measures what is free
    for _ in $(seq 60); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break
      sleep 1; done
    echo "[serving] leg $model $setup $phase $*: $left s of the run's wall left"
    python3 bench/sglang_serving.py run --model /tmp/llama$model --tag $model --setup $setup --phase $phase \
      --out $W/out --results $known --wall-s $left --commit "${COMMIT:-}" "$@" < /dev/null || rc=$?
  done < "$1"
  return $rc
}
wait_run() {
  local left=$(( ${CALL_S:-590} - (SECONDS - T0) - 20 ))
  bash bench/device/detached.sh wait $W $(( left > 0 ? left : 0 ))
  local rc=$? tag
  tag=$(cat $W/runner.tag 2>/dev/null) || return $rc
  cp $W/runner.log "$OUT/serving-$tag.log" 2>/dev/null
  card=$(cat $W/runner.card 2>/dev/null) \
    && collect "$tag" "$(cat $W/runner.work 2>/dev/null || echo "work-${tag%-*}")"  # or a run of one setup
  return $rc
}
detach=0
case ${1:-} in
  --wait) wait_run; exit $? ;;
  --legs) run_legs "$2"; exit $? ;;  # what --detach starts
  --detach) detach=1; shift ;;
esac
usage="usage: $0 [--detach] MODEL SETUP PHASE [run arguments] [++ MODEL SETUP PHASE [run arguments]]... | $0 --wait"
legs=() leg=() setups=()
add_leg() {  # one leg's words, checked, quoted onto one line
  if [ ${#leg[@]} -lt 3 ]; then echo "$usage" >&2; exit 2; fi
  case ${leg[1]} in shared|unshared|colocated) ;; *) echo "[serving] SETUP is shared, unshared or colocated, not \
'${leg[1]}'" >&2; exit 2 ;; esac
  case ${leg[2]} in tune|sweep|goodput) ;; *) echo "[serving] PHASE is tune, sweep or goodput, not '${leg[2]}'" >&2
    exit 2 ;; esac
  if [ ${#legs[@]} -gt 0 ] && [ "${leg[0]}" != "$model" ]; then
    echo "[serving] one model per run: '${leg[0]}' after '$model' (the checkpoint is generated once)" >&2; exit 2
  fi
  model=${leg[0]}
  legs+=("$(printf '%q ' "${leg[@]}")")
  [[ " ${setups[*]} " == *" ${leg[1]} "* ]] || setups+=("${leg[1]}")
  tag=${tag:+${tag}_}${leg[1]}-${leg[2]}  # a file name the device tool hands back: no odd characters
  leg=()
}
tag=
for word in "$@"; do
  if [ "$word" = "++" ]; then add_leg; else leg+=("$word"); fi
done
add_leg
if [ ${#legs[@]} -gt 1 ] && [ $detach = 0 ]; then
  echo "[serving] legs (++) need --detach: one call holds two 171 s cells, not a chain" >&2; exit 2
fi
eval "set -- ${legs[0]}"  # the first leg: its model is the run's, its setup and phase a one-leg call's
model=$1 setup=$2 phase=$3
shift 3
tag=$model-$tag
if bash bench/device/detached.sh going $W; then
  echo "[serving] a detached run is still going: --wait for it first (one setup at a time on a host)" >&2; exit 1
fi
case $model in
  8b) shape=llama-3-8b need=20 ;;
  14b) shape=llama-14b need=33 ;;
  24b) shape=llama-24b need=50 ;;
  *) echo "[serving] MODEL is 8b, 14b or 24b, not '$model'" >&2; exit 2 ;;
esac
M=/tmp/llama$model
if [ $detach = 1 ]; then  # the run works from a copy of this call's tree (a later call may bring another)
  COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}  # the copy has no .git to read it from
  rm -rf $W/tree && mkdir -p $W/tree || exit 1
  tar --exclude=./.git --exclude=./.gpubundle --exclude=./.pdbundle --exclude=./.whl -cf - . | tar -C $W/tree -xf - \
    || exit 1
  for b in .gpubundle .pdbundle .whl; do [ -e $b ] && ln -s "$PWD/$b" $W/tree/$b; done  # read by setup.sh once
  cd $W/tree || exit 1
fi
if [ ! -f $M/.complete ]; then
  avail=$(df -BG --output=avail /tmp | tail -1 | tr -dc 0-9)
  if [ "${KEEP_MODELS:-0}" != 1 ] && [ "$avail" -lt "$need" ]; then
    for d in /tmp/llama8b /tmp/llama14b /tmp/llama24b; do [ "$d" != "$M" ] && rm -rf "$d"; done
  fi
  python3 bench/make_model.py --out $M --shape $shape || exit 1  # before setup.sh: the image's transformers
fi
export SETUP_MODEL_8B=0
source bench/device/setup.sh || exit 1
mkdir -p $W/out $W/old
name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${CUDA_VISIBLE_DEVICES:-0}" | head -1)
card=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from serving_results import card_slug; \
print(card_slug(sys.argv[1]))" "$name") || exit 1
earlier=$(ls $W/out/serving-v2-part-*.json 2>/dev/null)
[ -n "$earlier" ] && mv $earlier $W/old/  # an earlier call's parts: known below, not this call's output
known=$(known_cells)
work=$(printf 'work-%s ' "${setups[@]/#/$model-}")
if [ $detach = 1 ]; then
  echo "$tag" > $W/runner.tag && echo "$card" > $W/runner.card && echo "$work" > $W/runner.work
  printf '%s\n' "${legs[@]}" > $W/legs
  # the session keeps this environment (PYTHONPATH from setup.sh, sharedcache installed from the tree's copy);
  # its wall is RUN_S, not a call's
  export RUN_S COMMIT
  bash bench/device/detached.sh start $W bash bench/device/sglang_serving.sh --legs $W/legs || exit 1
  wait_run; exit $?
fi
left=$(( ${CALL_S:-590} - (SECONDS - T0) - 25 ))
timeout $(( left + 15 )) python3 bench/sglang_serving.py run --model $M --tag $model --setup $setup \
  --phase $phase --out $W/out --results $known --wall-s $left --commit "${COMMIT:-}" "$@" 2>&1 \
  | tee "$OUT/serving-$tag.log"
rc=${PIPESTATUS[0]}
collect $tag "$work"
exit $rc
