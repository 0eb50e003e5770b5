#!/usr/bin/env bash
# The peer packages that tests/test_integrations.py runs against: verl's policy-loss registry
# (verl.trainer.ppo.core_algos) and TRL's GRPOTrainer, pinned, into the active Python
# environment, never replacing its torch.
#
# verl's declared requirements (ray[default], wandb, tensorboard, peft, torchdata, ...) are far
# more than its loss code imports, so verl and trl go in with --no-deps and the modules their
# import chains need are listed here, resolved against a pin of the torch already installed.
# Idempotent: a second run with both versions in place returns at once.
set -euo pipefail
VERL_VERSION=0.9.1
TRL_VERSION=1.16.0
PY=${PYTHON:-python}

have() {
    "$PY" - "$VERL_VERSION" "$TRL_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("verl") == sys.argv[1] and md.version("trl") == sys.argv[2]
import verl.trainer.ppo.core_algos  # noqa: F401  (the whole import chain is there)
from trl import GRPOTrainer  # noqa: F401
EOF
}

if have; then
    echo "peers: verl $VERL_VERSION, trl $TRL_VERSION already installed"
    exit 0
fi
start=$(date +%s)
cache=${MHPO_CI_CACHE:-$HOME/.cache/mhpo-ci}
mkdir -p "$cache"
pin="$cache/torch-pin.txt"
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$pin"
"$PY" -m pip install -q --no-deps "verl==$VERL_VERSION" "trl==$TRL_VERSION"
# verl 0.9.1: `import verl` imports ray and tensordict (verl.protocol), hydra / omegaconf (configs),
# codetiming, transformers (verl.utils); trl 1.16: transformers, accelerate, datasets.
# Version ranges are verl's own.
"$PY" -m pip install -q -c "$pin" \
    "ray>=2.41.0" "tensordict>=0.8.0,<=0.10.0,!=0.9.0" hydra-core omegaconf codetiming \
    "transformers>=5.5.3,<5.11,!=5.6.0" "accelerate>=1.10.1" "datasets>=4.7.0"
"$PY" -c 'import torch; print("peers: torch", torch.__version__, "kept")'
have || { echo "peers: verl / trl still do not import" >&2; exit 1; }
echo "peers: installed verl $VERL_VERSION, trl $TRL_VERSION in $(( $(date +%s) - start ))s"
