# Sourced by the evaluation scripts: `run_once FILE COMMAND...` runs COMMAND with its
# output into FILE (through FILE.tmp, so an interrupted run leaves no partial FILE) unless
# FILE already holds a result, and says how long it took. A rerun picks up where an
# earlier one stopped.
run_once() {
  local file=$1; shift
  if [ -s "$file" ]; then echo "have $file"; return; fi
  echo "== $file: $*"
  local t0=$SECONDS
  "$@" > "$file.tmp"
  mv "$file.tmp" "$file"
  echo "   $((SECONDS - t0)) s"
}
