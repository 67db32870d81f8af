#!/usr/bin/env bash
# Create TPU VMs / pod slices, install dalle_jax on every worker and launch a stage on all of them.
# Not written yet: it arrives with the pod-scale issue (multi-host runtime, AOT compilation for TPU
# topologies). Until then, on a TPU VM: pip install -e ".[tpu]" and run dalle-jax on every worker.
set -euo pipefail
echo "tpu_setup.sh: not implemented yet (pod-scale issue); see README 'TPU use'" >&2
exit 2
