#!/usr/bin/env bash
# Makes sure SAPIEN (ManiSkill's renderer) finds a Vulkan device.
# With a GPU driver or a recent Mesa already present it does nothing. Otherwise, on Debian
# bookworm, it installs Mesa's lavapipe CPU driver (>= 24.3) from bookworm-backports, reusing the
# mirror already configured in this machine's apt sources. bookworm's own Mesa 22.3 lacks
# VK_KHR_external_semaphore_fd and SAPIEN rejects it.
set -euo pipefail
PY=${1:-.venv/bin/python}

sapien_ok() {
  "$PY" - <<'PYEOF' >/dev/null 2>&1
import warnings; warnings.filterwarnings("ignore")
import sapien
sapien.render.RenderSystem()
PYEOF
}

if sapien_ok; then exit 0; fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
. /etc/os-release
if [ "${ID:-}" != "debian" ]; then
  echo "No Vulkan device that SAPIEN accepts. Install Mesa >= 24.3 (mesa-vulkan-drivers) or a GPU driver with Vulkan support." >&2
  exit 1
fi
CODENAME=${VERSION_CODENAME:-bookworm}

if [ "$CODENAME" = "bookworm" ]; then
  # Find the Debian mirror in the configured sources (deb822 or one-line format); never hard-code one.
  MIRROR=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR=$(awk '/^URIs:/{u=$2} /^Suites:/ && / bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  if [ -z "$MIRROR" ]; then
    echo "Could not find a Debian bookworm mirror in /etc/apt/sources.list{,.d}; add bookworm-backports yourself." >&2
    exit 1
  fi
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "Adding bookworm-backports ($MIRROR) for Mesa's lavapipe Vulkan driver"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$MIRROR" \
      | $SUDO tee /etc/apt/sources.list.d/rlco-backports.sources >/dev/null
  fi
  echo "Installing mesa-vulkan-drivers from bookworm-backports (CPU Vulkan for SAPIEN)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports \
    mesa-vulkan-drivers libvulkan1 >/dev/null
else
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

if ! sapien_ok; then
  echo "SAPIEN still finds no Vulkan device after installing Mesa; check 'vulkaninfo --summary'." >&2
  exit 1
fi
echo "Vulkan OK (Mesa lavapipe)"
