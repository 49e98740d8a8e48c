# Sourced by the GPU run scripts of tools/gpu/ (not run on its own): their -h/--help and the checks of their
# directory arguments, before anything is created, collected or written.
#   source "$(dirname "$0")/args.bash"; check_args "OUTDIR [WORKDIR]" 1 2 "$@"
# -h/--help (first argument): the script's header comment (line 2 to the first line that is not a comment) on
# stdout, exit 0. Too few or too many arguments, or one that starts with "-" (an option mistaken for a
# directory: it would be created under that name): the header on stderr and one error line, exit 2.

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

check_args() {
  local names=$1 min=$2 max=$3 prog a
  prog=$(basename "$0")
  shift 3
  case "${1:-}" in -h|--help) usage; exit 0 ;; esac
  for a in "$@"; do
    case "$a" in -*) echo "$prog: error: $a: not a directory name (the only options are -h and --help)" >&2; exit 2 ;; esac
  done
  if [ $# -lt "$min" ] || [ $# -gt "$max" ]; then
    usage >&2
    echo "$prog: error: expected $names" >&2
    exit 2
  fi
}
