#!/usr/bin/env bash
# Install what the end-to-end suite (tests/e2e) needs; idempotent, quick when done already.
#
# - Playwright's Python package: only its driver. The browser is Debian's chromium
#   (/usr/bin/chromium, installed by .ci/run with apt); never run `playwright install`.
# - The Vite app's npm packages, exactly as locked (npm ci, from the npm registry only;
#   --ignore-scripts: esbuild's binary comes as the @esbuild/<platform> package anyway).
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
if ! "$python" - <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
major, minor = (int(part) for part in version("playwright").split(".")[:2])
sys.exit(0 if (major, minor) >= (1, 50) else 1)
PY
then
  "$python" -m pip install -q 'playwright>=1.50'
fi

app=vite-app
stamp="$app/node_modules/.e2e-package-lock.sha256"
want=$(sha256sum "$app/package-lock.json" | cut -d' ' -f1)
if [ ! -x "$app/node_modules/.bin/vite" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  (cd "$app" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
fi

if [ ! -x "${GATEWAY_TEST_CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "tests/e2e/setup.sh: no chromium at ${GATEWAY_TEST_CHROMIUM:-/usr/bin/chromium}" \
    "(apt-get install chromium; .ci/run does)" >&2
fi
