#!/usr/bin/env bash
# What the full test suite needs beyond Python, installed with apt when missing; used by both
# `make test` and `.ci/run`, so the two cannot drift. On a machine without apt (or without root
# or sudo) it names the packages to install and stops.
set -euo pipefail

missing=()
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)                # the W3C HTML checker (vnu.jar)
[ -x /usr/bin/chromium ] || missing+=(chromium)                                   # the browser tests (Playwright drives it)
fc-list 2>/dev/null | grep -qi "wenquanyi" || missing+=(fonts-wqy-zenhei)         # CJK topics in screenshots
fc-list 2>/dev/null | grep -qi "color emoji" || missing+=(fonts-noto-color-emoji) # emoji topics in screenshots
((${#missing[@]})) || exit 0

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1 || { [ -n "$sudo" ] && ! sudo -n true 2>/dev/null; }; then
    echo "make test needs these Debian/Ubuntu packages (or their equivalents): ${missing[*]}" >&2
    echo "install them, e.g.: sudo apt-get install ${missing[*]}   (make test-fast runs without them)" >&2
    exit 1
fi
echo "installing with apt: ${missing[*]}"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
