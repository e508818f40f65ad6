#!/usr/bin/env bash
# Builds the dashboard's browser half into target/site/pkg: the wasm (hydrate feature), its JS glue
# (wasm-bindgen, the CLI at exactly the version in Cargo.lock), and the CSS. With --release the wasm
# is optimised for size and run through wasm-opt (npm's binaryen; Debian's is too old and breaks
# hydration). Installs what it needs on first use; idempotent.
#
#   ui/build.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dev; dir=debug
if [ "${1:-}" = "--release" ]; then profile=wasm-release; dir=wasm-release; fi

rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "installing wasm-bindgen-cli $want (once, a few minutes)"
  cargo install -q wasm-bindgen-cli --version "=$want"
fi

cargo rustc -q --locked -p ui --lib --crate-type cdylib --target wasm32-unknown-unknown --no-default-features --features hydrate --profile "$profile"
site=target/site
mkdir -p "$site/pkg"
wasm-bindgen --target web --no-typescript --out-dir "$site/pkg" --out-name ui "target/wasm32-unknown-unknown/$dir/ui.wasm"

if [ "$profile" = wasm-release ] && ! command -v npm >/dev/null; then
  echo "npm not found: the wasm is not run through wasm-opt (larger, but it works)" >&2
elif [ "$profile" = wasm-release ]; then
  tools=target/tools
  [ -x "$tools/node_modules/.bin/wasm-opt" ] || npm install -s --no-audit --no-fund --prefix "$tools" binaryen@132.0.0 >/dev/null
  "$tools/node_modules/.bin/wasm-opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    -o "$site/pkg/ui_bg.wasm" "$site/pkg/ui_bg.wasm"
fi
cp ui/style/ui.css "$site/pkg/ui.css"
# The worker that decodes and lays out a trace's outline off the page's thread (it imports ui.js).
cp ui/js/outline-worker.js "$site/pkg/outline-worker.js"
# Served precompressed to browsers that accept gzip.
for f in ui_bg.wasm ui.js ui.css outline-worker.js; do gzip -9 -k -f "$site/pkg/$f"; done
echo "dashboard built into $site/pkg ($(du -h "$site/pkg/ui_bg.wasm" | cut -f1) wasm)"
