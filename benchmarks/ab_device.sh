#!/usr/bin/env bash
# A/B on one GPU machine: sp_scaling.py under several environment variants, interleaved, so that host-to-host
# differences (32K tokens per GPU is host-bound on some hosts) do not pose as a code change.
#
#   AB_ROUNDS=2 bash benchmarks/ab_device.sh "fr-on:" "fr-off:TORCH_FR_BUFFER_SIZE=0" \
#       -- --cases sp-T32K --timing pipelined --providers single ring allgather
#
# Each variant is "name:VAR=value VAR=value" (nothing after the colon: the defaults). Rows are printed prefixed by
# "<name><round>"; every run's JSON goes to $OUT/<name><round>/. From the repo root with `.whl` carried (installs as
# run_device.sh does, unless SKIP_INSTALL=1). NGPU (default 4) ranks per run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ab}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || { echo "editable install failed" >&2; exit 1; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
VARIANTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do VARIANTS+=("$1"); shift; done
[ $# -gt 0 ] && shift
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for variant in "${VARIANTS[@]}"; do
    name=${variant%%:*}; settings=${variant#*:}
    # shellcheck disable=SC2086
    env $settings timeout "${AB_TIMEOUT:-240}" python3 -m torch.distributed.run --standalone \
      --nproc_per_node "${NGPU:-4}" benchmarks/sp_scaling.py --out "$OUT/$name$round" "$@" 2>&1 \
      | grep -E "^ *(case|sp-)|Error|FAILED" | sed "s/^/$name$round  /"
  done
done
