#!/usr/bin/env bash
# GPU tests and benchmarks in one call, from the repository root of a GPU machine; everything goes under $OUT.
#
#   bash benchmarks/run_device.sh                 # tests, kernels, sp
#   bash benchmarks/run_device.sh kernels sp      # some parts: tests kernels sp target parity mfu maxlen generate
#                                                 # gla-tune gla-ablation decode-linear
#   bash benchmarks/run_device.sh long-tnl        # multi-GPU parts, each within one PART_TIMEOUT: long-tnl long-hybrid
#                                                 # long-llama long-llama-1m step4m finetune prefill gla w8; multi: all
#
# Peers (flash-linear-attention, fla-core, lasp) are installed from wheels in .whl/ if there are any (their rows
# are SKIP otherwise). A copy without .git, or whose .git lags its files: pass the commit, LASP_HF_COMMIT=<sha>.
# Each part's extra arguments: KERNELS_ARGS, SP_ARGS, PARITY_ARGS, MFU_ARGS, MAXLEN_ARGS, GENERATE_ARGS, LONG_ARGS,
# STEP4M_ARGS, FINETUNE_ARGS, PREFILL_ARGS, GLA_ARGS, GLA_TUNE_ARGS, GLA_ABLATION_ARGS, DECODE_LINEAR_ARGS;
# TEST_FILES, TEST_STREAMS (test files run side by side, default 3), SP_WORLDS (e.g. "2 4"), MULTI_WORLD (GPUs of
# the multi-GPU parts, default 4 or fewer), PART_TIMEOUT (seconds per part or test file, default 540),
# SKIP_INSTALL=1 (already installed).
# Writes run-device.log (every part's output), each program's JSON, and summary.md (exit statuses, then the .md
# files this run wrote, which are then removed: few files to bring back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export LASP_HF_COMMIT=${LASP_HF_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "editable install failed" >&2; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests kernels sp)
MULTI=(long-tnl long-hybrid long-llama long-llama-1m step4m finetune prefill gla w8)  # the multi-GPU runs, in order
[ "${PARTS[*]}" = multi ] && PARTS=("${MULTI[@]}")
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
W4=${MULTI_WORLD:-$(( NGPU >= 4 ? 4 : NGPU ))}  # the SP size of the multi-GPU parts
LOG="$OUT/run-device.log"; MARK=$(mktemp); STATUS=()
echo "run_device.sh: parts ${PARTS[*]}; $NGPU GPU(s); commit $LASP_HF_COMMIT; results in $OUT" | tee -a "$LOG"

run_part() {  # name, command...: run with a time limit, append to the log, keep the exit status
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "${PART_TIMEOUT:-540}" "$@" 2>&1 | tee -a "$LOG"
  STATUS+=("$name: exit ${PIPESTATUS[0]}")
}
SP=(python3 -m torch.distributed.run --standalone --nproc_per_node)

for part in "${PARTS[@]}"; do
  # shellcheck disable=SC2086
  case "$part" in
    tests)  # one pytest per file, each with its own limit, TEST_STREAMS files at a time (correctness only: no
      # timing runs beside them); the logs join the main log in file order
      FILES=(${TEST_FILES:-tests/test_host.py tests/test_sp_gpu.py tests/gpu/*.py tests/test_modeling_gpu.py tests/test_modeling_generation.py})
      STREAMS=${TEST_STREAMS:-3}
      for ((s = 0; s < STREAMS; s++)); do
        for ((i = s; i < ${#FILES[@]}; i += STREAMS)); do
          name="pytest-$(basename "${FILES[i]}" .py)"
          timeout "${PART_TIMEOUT:-540}" python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider "${FILES[i]}" \
            > "$OUT/.$name.log" 2>&1
          echo "$name: exit $?" > "$OUT/.$name.status"
        done &
      done
      wait
      for f in "${FILES[@]}"; do
        name="pytest-$(basename "$f" .py)"
        echo "=== $name: python3 -m pytest -m gpu $f" | tee -a "$LOG"
        tee -a "$LOG" < "$OUT/.$name.log"
        STATUS+=("$(cat "$OUT/.$name.status")")
        rm -f "$OUT/.$name.log" "$OUT/.$name.status"
      done ;;
    kernels)  # per-head decay (fla's chunk_simple_gla) and per key channel (fla's chunk_gla) by default: fla 0.6.0
      # refuses per-token decay on triton 3.6
      CUDA_VISIBLE_DEVICES=0 run_part kernels python3 benchmarks/kernel_speed.py --out "$OUT" ${KERNELS_ARGS:---decays head,channel} ;;
    sp)
      for W in ${SP_WORLDS:-$W4}; do run_part "sp-W$W" "${SP[@]}" "$W" benchmarks/sp_scaling.py --out "$OUT" ${SP_ARGS:-}; done ;;
    target)  # the README's SP table: eager, CUDA graph replays, four layers per step
      run_part "target-eager-W$W4" "${SP[@]}" "$W4" benchmarks/sp_scaling.py --out "$OUT"
      run_part "target-graphs-W$W4" "${SP[@]}" "$W4" benchmarks/sp_scaling.py --out "$OUT" --cuda-graphs --cases sp-T32K sp-T128K
      run_part "target-layers4-W$W4" "${SP[@]}" "$W4" benchmarks/sp_scaling.py --out "$OUT" --layers 4 \
        --cases sp-T32K sp-T128K --providers single ring allgather ;;
    parity)  # loss parity SP = 1 against SP = W4 (DDP and FSDP2 on 4 GPUs)
      CONFIGS=""; [ "$W4" -eq 4 ] && CONFIGS="--accelerate_config recipes/accelerate/ddp_sp4.yaml recipes/accelerate/fsdp2_sp4.yaml"
      run_part "parity-W$W4" python3 benchmarks/train_parity.py --world "$W4" --out "$OUT" $CONFIGS ${PARITY_ARGS:---model_config \
        recipes/configs/tnl-385m.json --block_size $((32768 * W4)) --steps 20 --bf16 --gradient_checkpointing} ;;
    mfu)  # tnl-1b on one GPU at 32K / 128K / 512K tokens, bf16 weights
      run_part mfu-W1 python3 benchmarks/train_mfu.py --world 1 --out "$OUT" ${MFU_ARGS:---tokens_per_gpu 32768 131072 \
        524288 --steps 8 --skip 3 --extra --model_dtype bfloat16} ;;
    maxlen)  # the longest tnl-1b step with every memory saver: SP = 4 with FSDP2 on 4 GPUs, else one GPU
      LAUNCH=(python3); [ "$W4" -eq 4 ] && LAUNCH=(python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2_sp4.yaml)
      run_part "maxlen-W$W4" "${LAUNCH[@]}" recipes/max_seq_len.py --json "$OUT/max-seq-len-W$W4.json" ${MAXLEN_ARGS:---model_config \
        recipes/configs/tnl-1b.json --offload_activations --mlp_chunk_size 16384 --attention_chunk_size 16384 --start 1048576 --granularity 524288 \
        --max_block_size 4194304} ;;
    generate)
      CUDA_VISIBLE_DEVICES=0 run_part generate python3 benchmarks/generate_speed.py --out "$OUT" ${GENERATE_ARGS:-} ;;
    decode-linear)  # the fused decoding projections against the plain ops, per tile setting
      CUDA_VISIBLE_DEVICES=0 run_part decode-linear python3 benchmarks/decode_linear.py --out "$OUT" \
        ${DECODE_LINEAR_ARGS:-} ;;
    gla-tune)  # settings of the GLA kernels side by side (step length, tiles, warps)
      CUDA_VISIBLE_DEVICES=0 run_part gla-tune python3 benchmarks/gla_tune.py --out "$OUT" ${GLA_TUNE_ARGS:-} ;;
    gla-ablation)  # the parts of a GLA scan step, each switched off in turn
      CUDA_VISIBLE_DEVICES=0 run_part gla-ablation python3 benchmarks/gla_step_ablation.py --out "$OUT" \
        ${GLA_ABLATION_ARGS:-} ;;
    long-tnl|long-hybrid|long-llama|long-llama-1m)  # long-context training, one system per part (within PART_TIMEOUT)
      case $part in  # each a system and its ladder (a Llama + CP step at 1M takes minutes: a part of its own)
        long-tnl) LONG=(--systems tnl-1b --steps 3);; long-hybrid) LONG=(--systems hybrid-1b --steps 2);;
        long-llama) LONG=(--systems llama-cp --steps 2 --lengths 64K 128K 256K 512K);;
        *) LONG=(--systems llama-cp --steps 2 --lengths 1M);;
      esac
      run_part "$part-W$W4" python3 benchmarks/long_context.py --world "$W4" "${LONG[@]}" --skip 1 --out "$OUT" \
        --budget-s $(( ${PART_TIMEOUT:-540} - 15 )) ${LONG_ARGS:-} ;;
    step4m)  # the LASP paper's 4096K-token step on 4 GPUs, then the largest that fits (to 8M, 2M resolution)
      run_part "step4m-W$W4" python3 -m accelerate.commands.launch --config_file "recipes/accelerate/fsdp2_sp$W4.yaml" \
        recipes/max_seq_len.py --json "$OUT/max-seq-len-4m-W$W4.json" ${STEP4M_ARGS:---model_config \
        recipes/configs/tnl-1b.json --offload_activations --mlp_chunk_size 16384 --attention_chunk_size 16384 \
        --start 4194304 --granularity 2097152 --max_block_size 8388608} ;;
    finetune)  # a converted TransNormerLLM-1B (random weights, its exact layout): 20 steps at 512K, SP = 4 vs SP = 2
      SCRATCH=$(mktemp -d); SRC=$SCRATCH/tnl-1b-source; DST=$SCRATCH/tnl-1b-lasp
      run_part finetune-convert bash -c "python3 benchmarks/transnormer_source.py $SRC ${SOURCE_ARGS:-} && python3 -m lasp_hf.convert --from transnormer $SRC $DST"
      BASE=(--base_world $(( W4 / 2 ))); [ "$W4" -ge 4 ] && BASE+=(--base_config "recipes/accelerate/fsdp2_sp$(( W4 / 2 )).yaml")
      CONFIG=(); [ "$NGPU" -ge "$W4" ] && CONFIG=(--accelerate_config "recipes/accelerate/fsdp2_sp$W4.yaml")
      run_part "finetune-W$W4" python3 benchmarks/train_parity.py --world "$W4" "${BASE[@]}" "${CONFIG[@]}" --out "$OUT" \
        --model_name_or_path "$DST" ${FINETUNE_ARGS:---block_size 524288 --steps 20 --bf16 --gradient_checkpointing}
      rm -rf "$SCRATCH" ;;
    prefill)  # SP prefill of a 1M-token prompt on W4 GPUs, decoding on one, against one GPU's chunked prefill
      run_part "prefill-W$W4" "${SP[@]}" "$W4" benchmarks/sp_prefill_speed.py --out "$OUT" ${PREFILL_ARGS:---length 1M} ;;
    gla)  # GLA's per-key-channel decay under LASP: weak scaling at 32K and 128K tokens per GPU, ring and all-gather
      run_part "gla-W$W4" "${SP[@]}" "$W4" benchmarks/sp_scaling.py --out "$OUT" --decay channel \
        --providers single ring allgather ${GLA_ARGS:---cases sp-T32K sp-T128K} ;;
    w8)  # 8 GPUs only: weak scaling of the op at W = 8 (both decays) and a tnl-1b training run at 8 x 512K tokens
      if [ "$NGPU" -lt 8 ]; then echo "=== w8: skipped ($NGPU GPUs)" | tee -a "$LOG"; STATUS+=("w8: skipped, $NGPU GPUs"); continue; fi
      run_part sp-W8 "${SP[@]}" 8 benchmarks/sp_scaling.py --out "$OUT" --cases sp-T32K sp-T128K --providers single ring allgather
      run_part gla-W8 "${SP[@]}" 8 benchmarks/sp_scaling.py --out "$OUT" --decay channel --cases sp-T32K sp-T128K \
        --providers single ring allgather
      run_part long-tnl-W8 python3 benchmarks/long_context.py --world 8 --systems tnl-1b --lengths 4M --savers_from 4M \
        --steps 3 --out "$OUT" ;;
    *) echo "run_device.sh: unknown part '$part' (tests kernels sp target parity mfu maxlen generate $(echo "${MULTI[@]}") multi)" >&2; exit 2 ;;
  esac
done

MDS=$(find "$OUT" -maxdepth 1 -name '*.md' ! -name summary.md -newer "$MARK" | sort)
{
  echo "# run_device.sh: parts ${PARTS[*]}, commit $LASP_HF_COMMIT"; echo
  grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped)' "$LOG" | tail -n 40 | sed 's/^/    /'
  printf -- '- %s\n' "${STATUS[@]}"
  for md in $MDS; do echo; echo "<!-- $(basename "$md") -->"; cat "$md"; done
} > "$OUT/summary.md"
[ -n "$MDS" ] && rm -f $MDS
rm -f "$MARK"
cat "$OUT/summary.md"
