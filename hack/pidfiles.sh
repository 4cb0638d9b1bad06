# Processes started in the background and known by the pid file "$dir/<name>.pid", shared by
# cluster.sh and quickstart.sh (sourced after they set $dir). They stop a process by its pid
# file, never by name, so nothing someone else started is touched.

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

# stop NAME: SIGTERM, up to 5 s to exit, then SIGKILL; the pid file goes either way.
stop() {
  local name=$1 pid i
  [ -f "$dir/$name.pid" ] || return 0
  pid=$(cat "$dir/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$dir/$name.pid"
}
