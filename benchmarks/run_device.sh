#!/usr/bin/env bash
# Run the GPU tests and the benchmarks on a lent GPU machine, writing everything under $OUT.
#
#   bash benchmarks/run_device.sh                 # tests, kernels, sp (in that order)
#   bash benchmarks/run_device.sh kernels sp      # only some parts: any of  tests kernels sp target train maxlen host sweep breakdown mfu
#
# From the repo root, with `.whl` carried (fill it here with `bash ../shared/device/wheels.sh`).
# The device's copy has no .git: pass the commit, e.g.  LASP_HF_COMMIT=<sha> bash benchmarks/run_device.sh
# Optional: KERNELS_ARGS / SP_ARGS / TRAIN_ARGS / MAXLEN_ARGS / MAXLEN1_ARGS / SWEEP_ARGS / BREAKDOWN_ARGS / HOST_ARGS / MFU_ARGS (extra arguments, e.g. KERNELS_ARGS="--cases chunk-B1-*";
# MAXLEN1_ARGS=skip leaves out the one-GPU max_seq_len run),
# TEST_FILES (the tests part's pytest files), PART_TIMEOUT (seconds per part, default 540), SKIP_INSTALL=1, SP_WORLDS (e.g. "2 4"; default: min(4, #GPUs), and 2 if 4).
# SP_ARGS defaults to --profile (each sp world also writes sp-<card>-W<n>-profile.txt).
#
# Files under $OUT (the device returns at most 8): every part's output goes to ONE log, run-device.log
# (sections "=== <part>"); the .md files written by this run are merged into summary.md at the end
# (with the compact summary); the JSON and profile files stay. `tests sp` on 4 GPUs: run-device.log,
# summary.md, sp-*-W4.json, sp-*-W2.json and their two -profile.txt = 6 files; + kernels: 7.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PART_TIMEOUT=${PART_TIMEOUT:-540}
export LASP_HF_COMMIT=${LASP_HF_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# The two install lines of ../shared/device/wheels.sh (shared/ is not carried to the device).
# SKIP_INSTALL=1 skips them (a warm machine that has run this script already).
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  else
    echo "run_device.sh: no .whl/ (carry it): fla and the LASP reference rows will be skipped" >&2
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "editable install failed" >&2; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests kernels sp)
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "run_device.sh: parts ${PARTS[*]}; $NGPU GPU(s); commit $LASP_HF_COMMIT; results in $OUT"
STATUS=()

LOG="$OUT/run-device.log"   # one log for every part (few files come back from the device)
MARK=$(mktemp); PART_OUT=$(mktemp)  # MARK: files newer than it were written by this run
TAILS=()

run_part() {  # name, command...: run with a time limit, append to the log, remember its exit status
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  : > "$PART_OUT"
  timeout "$PART_TIMEOUT" "$@" 2>&1 | tee -a "$LOG" "$PART_OUT"
  local rc=${PIPESTATUS[0]}
  STATUS+=("$name: exit $rc")
  case "$name" in  # pytest: its result line, and its FAILED/ERROR lines (-rfE), for the summary
    pytest-*) TAILS+=("$name: $(grep -v '^\s*$' "$PART_OUT" | tail -n 1)")
      while IFS= read -r line; do TAILS+=("  ${line:0:240}"); done \
        < <(grep -E '^(FAILED|ERROR) ' "$PART_OUT" | head -n 20) ;;
  esac
}

for part in "${PARTS[@]}"; do
  case "$part" in
    tests)
      # One pytest per file, each with its own limit, so a slow file cannot hide the others' summaries.
      for f in ${TEST_FILES:-tests/test_host.py tests/test_sp_gpu.py tests/gpu/test_triton_gpu.py tests/test_modeling_gpu.py}; do
        run_part "pytest-$(basename "$f" .py)" python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider "$f"
      done ;;
    kernels)
      # shellcheck disable=SC2086
      # Default: per-head decay only (fla 0.6.0 refuses per-token decay on triton 3.6 and its rows hung the part).
      run_part kernels python3 benchmarks/kernel_speed.py --out "$OUT" ${KERNELS_ARGS:---decays head} ;;
    sp)
      if [ -n "${SP_WORLDS:-}" ]; then WORLDS=$SP_WORLDS
      elif [ "$NGPU" -ge 4 ]; then WORLDS="4 2"
      elif [ "$NGPU" -ge 2 ]; then WORLDS="2"
      else WORLDS="1"; fi
      for W in $WORLDS; do
        # shellcheck disable=SC2086
        run_part "sp-W$W" python3 -m torch.distributed.run --standalone --nproc_per_node "$W" \
          benchmarks/sp_scaling.py --out "$OUT" ${SP_ARGS:---profile}
      done ;;
    target)
      # Issue 4's protocol in one part, on all GPUs (W = 4 on a 4-GPU machine): eager single-layer steps at 8K, 32K and
      # 128K with every provider; the same 32K / 128K rows replayed from CUDA graphs (the GPU side, like for like);
      # and four chained layers per step (--layers 4, as a model runs them). JSON: sp-<card>-W<n>{,-graphs,-L4}.json.
      TW=$(( NGPU >= 4 ? 4 : NGPU ))
      if [ "$TW" -lt 2 ]; then echo "=== target: needs 2 or more GPUs, found $NGPU" | tee -a "$LOG"; STATUS+=("target: skipped"); continue; fi
      SP_RUN=(python3 -m torch.distributed.run --standalone --nproc_per_node "$TW" benchmarks/sp_scaling.py
              --out "$OUT" --timing pipelined)
      run_part "target-eager-W$TW" "${SP_RUN[@]}"
      run_part "target-graphs-W$TW" "${SP_RUN[@]}" --cuda-graphs --cases sp-T32K sp-T128K
      run_part "target-layers4-W$TW" "${SP_RUN[@]}" --layers 4 --cases sp-T32K sp-T128K --providers single ring allgather ;;
    train)
      # Loss parity SP=1 vs SP=min(4, #GPUs) through accelerate launch (benchmarks/train_parity.py): 32K tokens
      # per GPU, one SP run per accelerate config (DDP and FSDP2 on 4 GPUs).
      TW=$(( NGPU >= 4 ? 4 : NGPU ))
      CONFIGS=""
      [ "$TW" -eq 4 ] && CONFIGS="--accelerate_config recipes/accelerate/ddp_sp4.yaml recipes/accelerate/fsdp2_sp4.yaml"
      # shellcheck disable=SC2086
      run_part "train-W$TW" python3 benchmarks/train_parity.py --world "$TW" --out "$OUT" $CONFIGS \
        ${TRAIN_ARGS:---model_config recipes/configs/tnl-385m.json --block_size $((32768 * TW)) --steps 20 --bf16 --gradient_checkpointing} ;;
    maxlen)
      # The longest tnl-1b sequence on all GPUs (SP = #GPUs, FSDP2 config on 4) with every memory saver, and on one;
      # on 4 GPUs each rank's first out-of-memory also writes what held the memory (mem-tnl-1b-W4.rank<r>.txt).
      MW=$(( NGPU >= 4 ? 4 : 1 ))
      if [ "$MW" -eq 4 ]; then
        # shellcheck disable=SC2086
        run_part "maxlen-W4" python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2_sp4.yaml \
          recipes/max_seq_len.py --json "$OUT/max-seq-len-tnl-1b-W4.json" \
          ${MAXLEN_ARGS:---model_config recipes/configs/tnl-1b.json --offload_activations --mlp_chunk_size 16384 --attention_chunk_size 16384 --start 1048576 --granularity 524288 --max_block_size 4194304 --memory_report $OUT/mem-tnl-1b-W4}
      fi
      # shellcheck disable=SC2086
      [ "${MAXLEN1_ARGS:-}" != skip ] && CUDA_VISIBLE_DEVICES=0 run_part "maxlen-W1" python3 recipes/max_seq_len.py --json "$OUT/max-seq-len-tnl-1b-W1.json" \
        ${MAXLEN1_ARGS:---model_config recipes/configs/tnl-1b.json --offload_activations --mlp_chunk_size 16384 --attention_chunk_size 16384 --start 262144 --granularity 131072 --max_block_size 2097152} ;;
    sweep)
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=0 run_part sweep python3 benchmarks/kernel_sweep.py --out "$OUT" ${SWEEP_ARGS:-} ;;
    breakdown)
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=0 run_part breakdown python3 benchmarks/kernel_breakdown.py --out "$OUT" ${BREAKDOWN_ARGS:-} ;;
    mfu)
      # Training throughput / MFU of tnl-1b at 32K tokens per GPU (SP = min(4, #GPUs)), checkpointing off and on,
      # with the profile of the first run (FSDP2 on 4 GPUs: DDP without checkpointing does not fit 80 GB there).
      FW=$(( NGPU >= 4 ? 4 : NGPU ))
      # (train_mfu.py's default config: none on one GPU, ddp_sp2.yaml on two.)
      MFU_CONFIG=""
      [ "$FW" -eq 4 ] && MFU_CONFIG="--accelerate_config recipes/accelerate/fsdp2_sp4.yaml"
      # shellcheck disable=SC2086
      run_part "mfu-W$FW" python3 benchmarks/train_mfu.py --world "$FW" --out "$OUT" \
        ${MFU_ARGS:-$MFU_CONFIG --checkpointing off on --profile_steps 8 9} ;;
    host)
      # shellcheck disable=SC2086
      run_part "host-W1" python3 benchmarks/host_overhead.py --out "$OUT" ${HOST_ARGS:-}
      # shellcheck disable=SC2086
      [ "$NGPU" -ge 2 ] && run_part "host-W$(( NGPU >= 4 ? 4 : 2 ))" python3 -m torch.distributed.run --standalone \
        --nproc_per_node "$(( NGPU >= 4 ? 4 : 2 ))" benchmarks/host_overhead.py --out "$OUT" ${HOST_ARGS:-} ;;
    *)
      echo "run_device.sh: unknown part '$part' (use tests, kernels, sp, train, maxlen, host, sweep, mfu)" >&2; exit 2 ;;
  esac
done

SUMMARY=$(
  echo "=================== summary ==================="
  python3 benchmarks/common.py summary "$OUT"
  printf '%s\n' "${TAILS[@]}" "${STATUS[@]}"
)
echo
echo "$SUMMARY"
# summary.md: the summary, then every .md this run wrote (which are then removed: fewer files).
MDS=$(find "$OUT" -maxdepth 1 -name '*.md' ! -name summary.md -newer "$MARK" | sort)
{
  echo "# run_device.sh: parts ${PARTS[*]}, commit $LASP_HF_COMMIT"
  echo; echo '```'; echo "$SUMMARY"; echo '```'
  for md in $MDS; do echo; echo "<!-- $(basename "$md") -->"; cat "$md"; done
} > "$OUT/summary.md"
[ -n "$MDS" ] && rm -f $MDS
rm -f "$MARK" "$PART_OUT"
NFILES=$(find "$OUT" -type f | wc -l)
[ "$NFILES" -gt 8 ] && echo "run_device.sh: WARNING: $NFILES files under $OUT; the device returns at most 8" >&2
echo "files under $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
