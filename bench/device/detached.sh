#!/usr/bin/env bash
# A run that outlives the device call that started it, so that a benchmark longer than one call's 600 s pays for
# its servers' start once, not once per call. The device machine ends a call's processes when the call returns,
# except those in a session of their own (../.library/device/README.md): the run gets one, and later calls on
# the same warm machine wait for it and take what it wrote so far. The machine goes back 30 s after a call ends
# with none following, and then the run dies with it: issue the next call at once.
#   bash bench/device/detached.sh start DIR COMMAND...   # refuses while DIR's run is still going
#   bash bench/device/detached.sh wait DIR SECONDS        # until the run ends or SECONDS pass
#   bash bench/device/detached.sh going DIR               # exit 0 while DIR's run goes on, 1 otherwise
# DIR holds runner.pid, runner.rc (once it ended) and runner.log (its output). `wait` exits with the run's exit
# status once it ended, or 75 while it is still going (call `wait` again). POLL_S: how often it looks (5 s).
set -u
cmd=${1:-} dir=${2:-}
if [ -z "$dir" ]; then echo "usage: $0 start DIR COMMAND... | $0 wait DIR SECONDS | $0 going DIR" >&2; exit 2; fi
pid_of() { cat "$dir/runner.pid" 2>/dev/null; }
going() {  # alive, not a zombie left unreaped (where no init reaps the orphaned session)
  local p; p=$(pid_of) && [ -n "$p" ] && [ ! -f "$dir/runner.rc" ] && kill -0 "$p" 2>/dev/null \
    && [ "$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null)" != Z ]
}
case $cmd in
  going) going ;;
  start)
    shift 2
    [ $# -gt 0 ] || { echo "[detached] start needs a command" >&2; exit 2; }
    mkdir -p "$dir"
    if going; then
      echo "[detached] a run is still going in $dir (pid $(pid_of)): wait for it (bash $0 wait $dir SECONDS)" >&2
      exit 1
    fi
    rm -f "$dir/runner.pid" "$dir/runner.rc"
    # the rc is written by the session's own shell: a waiter tells "ended" from "killed with the machine"
    setsid bash -c 'echo $$ > "$0/runner.pid.tmp" && mv "$0/runner.pid.tmp" "$0/runner.pid"; "$@"; \
      echo $? > "$0/runner.rc.tmp"; mv "$0/runner.rc.tmp" "$0/runner.rc"' "$dir" "$@" \
      > "$dir/runner.log" 2>&1 < /dev/null &
    for _ in $(seq 100); do [ -f "$dir/runner.pid" ] && break; sleep 0.05; done
    [ -f "$dir/runner.pid" ] || { echo "[detached] the run did not start" >&2; exit 1; }
    echo "[detached] started pid $(pid_of) in its own session, output in $dir/runner.log"
    ;;
  wait)
    limit=${3:-}
    [[ "$limit" =~ ^[0-9]+$ ]] || { echo "[detached] wait needs SECONDS, a whole number" >&2; exit 2; }
    [ -f "$dir/runner.pid" ] || { echo "[detached] no run was started in $dir" >&2; exit 2; }
    end=$(( SECONDS + limit ))
    while going && [ $SECONDS -lt $end ]; do sleep "${POLL_S:-5}"; done
    if [ -f "$dir/runner.rc" ]; then
      rc=$(cat "$dir/runner.rc")
      echo "[detached] the run ended with status $rc"
      exit "$rc"
    fi
    if going; then echo "[detached] the run is still going (pid $(pid_of)): wait again"; exit 75; fi
    echo "[detached] the run is gone without a status: killed (the machine went back, or a signal)" >&2
    exit 1
    ;;
  *) echo "[detached] the first argument is start, wait or going, not '$cmd'" >&2; exit 2 ;;
esac
