#!/usr/bin/env bash
# Rebuilds the offline bundle for the lent GPU machines from PyPI and Debian (apt):
#   DEST/.gl/*.deb          libvulkan1 and the GL/EGL libraries (libglvnd) SAPIEN's renderer loads;
#   DEST/.gl/x11/*.deb      libX11 and its dependencies, for machines that lack them;
#   DEST/.gpu/site.tar.xz   a CPython 3.12 x86_64 site-packages: sapien, mani_skill (only the panda robot's assets,
#                           no environment maps or big scene files), their pure-Python dependencies, pytest-xdist,
#                           and a no-op IPython.display (mani_skill.utils.visualization imports it on import).
# Why: the lent GPU machines have Python 3.12 and torch but no internet and none of these packages. Both folders
# are git-ignored: carry them to the machine with the working tree, then set up there with
#   for f in .gl/*.deb; do dpkg -x $f /; done
#   ldconfig -p | grep -q 'libX11.so.6 ' || for f in .gl/x11/*.deb; do dpkg -x $f /; done; ldconfig
#   mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz &&
#     export PYTHONPATH=/tmp/site XDG_RUNTIME_DIR=/tmp PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Usage: bash benchmarks/gpu_bundle.sh [DEST]     (DEST default: the repository root; replaces DEST/.gl and
# DEST/.gpu/site.tar.xz). Needs pip, apt-get (Debian bookworm sources), xz and GNU tar; runs as root for apt.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- Debian packages (amd64, downloaded only; apt's own state is left alone) ---
mkdir -p "$TMP/lists/partial" "$TMP/gl/x11"
APT=(apt-get -qq -oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists="$TMP/lists"
     -oAPT::Sandbox::User=root)
"${APT[@]}" update
(cd "$TMP/gl" && "${APT[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
(cd "$TMP/gl/x11" && "${APT[@]}" download libx11-6 libx11-data libxcb1 libxau6 libxdmcp6 libbsd0 libmd0 libxext6)
for f in "$TMP"/gl/*.deb "$TMP"/gl/x11/*.deb; do  # an epoch's ':' comes as %3a; keep file names plain
  if [[ $f == *%3a* ]]; then mv "$f" "${f//%3a/_}"; fi
done

# --- Python 3.12 site-packages (wheels only, no dependency resolution: the list is complete) ---
SITE=$TMP/site
pip install -q --no-compile --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$SITE" \
  sapien==3.0.3 mani_skill==3.0.1 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 gymnasium==1.4.0 \
  Farama-Notifications==0.0.6 dacite==1.9.2 defusedxml==0.7.1 trimesh==5.2.0 transforms3d==0.4.2 \
  pytorch-kinematics==0.7.6 arm_pytorch_utilities==0.5.0 pytorch-seed==0.2.0 nvidia-ml-py==13.615.71 \
  GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 pyperclip==1.11.0 pytest==9.0.3 pytest-xdist==3.8.0 \
  execnet==2.1.2 iniconfig==2.3.0 pluggy==1.6.0

# Trim what the project's tasks never load (keeps the panda robot, partnet_mobility/meta, the table scene).
MS=$SITE/mani_skill
find "$MS/assets/robots" -mindepth 1 -maxdepth 1 ! -name panda -exec rm -rf {} +
rm -rf "$SITE/bin" "$SITE/sapien/include" "$SITE/sapien/sensor/assets" "$SITE/gitdb/test" "$SITE/smmap/test" \
  "$SITE/transforms3d/tests" "$SITE/example.py" "$MS/assets/environment_maps" "$MS/assets/maniskill2-scene-2.glb" \
  "$MS"/utils/scene_builder/replicacad/*.hdr "$MS"/utils/building/assets/floor_tiles*.png

mkdir -p "$SITE/IPython"
: >"$SITE/IPython/__init__.py"
cat >"$SITE/IPython/display.py" <<'EOF'
def display(*a, **k):
    pass


class Video:
    pass


class HTML:
    def __init__(self, *a, **k):
        pass
EOF

# --- Install into DEST ---
mkdir -p "$DEST/.gpu"
tar -C "$SITE" --sort=name -cf - . | xz -9 -T1 >"$TMP/site.tar.xz"
mv "$TMP/site.tar.xz" "$DEST/.gpu/site.tar.xz"
rm -rf "$DEST/.gl"
mv "$TMP/gl" "$DEST/.gl"
ls -l "$DEST/.gpu/site.tar.xz" "$DEST"/.gl/*.deb "$DEST"/.gl/x11/*.deb
