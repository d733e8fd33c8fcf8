#!/usr/bin/env bash
# Installs what is missing to run this repository: a CPU build of torch where there is no GPU, the Python packages
# of requirements.txt, and a Vulkan driver that SAPIEN accepts (ManiSkill needs one even for state observations).
# Safe to re-run: each step is skipped when already satisfied. Usage: bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# 1. torch: a bare `pip install torch` pulls a multi-GB CUDA build, so CPU-only machines get the CPU build first.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.4"
  else
    # PyTorch's CPU index (pip's own configured indexes and find-links still apply); if it cannot be reached, the
    # release whose CPU build some offline machines keep on disk.
    "$PY" -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 1 \
      || "$PY" -m pip install torch==2.13.0
  fi
fi

# 2. Python packages.
"$PY" -m pip install -q -r requirements.txt

# 3. Vulkan: SAPIEN must find a rendering device. On Debian 12 the stock Mesa (22.3) lavapipe is too old; Mesa >= 24.3
#    from bookworm-backports works. Other systems: install your GPU's Vulkan driver, or Mesa >= 24.3's lavapipe
#    (Ubuntu 24.04+: apt install mesa-vulkan-drivers; Fedora: dnf install mesa-vulkan-drivers).
probe() { "$PY" -c "import gymnasium as gym, mani_skill.envs; gym.make('PegInsertionSide-v1', sim_backend='physx_cpu').reset(seed=0)" >/dev/null 2>&1; }
if ! probe; then
  if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    echo "install.sh: installing Mesa's lavapipe Vulkan driver from bookworm-backports"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
      | $SUDO tee /etc/apt/sources.list.d/backports-mesa.list >/dev/null
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
  probe || { echo "install.sh: SAPIEN finds no Vulkan device; install a Vulkan driver (see the comment above)" >&2; exit 1; }
fi
echo "install.sh: ready ($("$PY" -c 'import torch, mani_skill; print("torch", torch.__version__, "| mani_skill", mani_skill.__version__)'))"
