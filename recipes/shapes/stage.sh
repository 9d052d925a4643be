# Sourced by the shapes recipes (run.sh, run128.sh) after they set RUNS.
mkdir -p "$RUNS"
TIMES="$RUNS/timings.jsonl"
stage() {  # stage NAME CMD...: run, append the wall time to $TIMES
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: $*" >&2
  "$@"
  echo "{\"stage\": \"$name\", \"seconds\": $(( $(date +%s) - t0 ))}" >> "$TIMES"
}
