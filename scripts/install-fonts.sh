#!/usr/bin/env bash
# Install the Debian CJK font packages that `specialists prepare --source typefaces` renders
# (about 175 MB download, 35 s). The designs each package provides, and which ones are
# near-duplicates, are in docs/DATA-typefaces.md. Idempotent.
set -euo pipefail
PACKAGES=(
  fonts-noto-cjk fonts-noto-cjk-extra fonts-droid-fallback fonts-wqy-microhei fonts-wqy-zenhei
  fonts-arphic-ukai fonts-arphic-uming fonts-ipafont-gothic fonts-ipafont-mincho
  fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-vlgothic fonts-takao-gothic fonts-hanazono
  fonts-cwtex-kai fonts-lxgw-wenkai fonts-klee fonts-seto fonts-cns11643-kai fonts-cns11643-sung
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "[fonts] installing ${#missing[@]} Debian font packages: ${missing[*]}"
$SUDO apt-get update -q >/tmp/specialists-fonts.log 2>&1
if ! $SUDO apt-get install -y -q "${missing[@]}" >>/tmp/specialists-fonts.log 2>&1; then
  echo "[fonts] apt-get install failed (log: /tmp/specialists-fonts.log); the typefaces source needs these fonts" >&2
  exit 1
fi
