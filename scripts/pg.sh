#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL cluster for the tests, in a temp dir, on 127.0.0.1.
#   eval "$(bash scripts/pg.sh start)"   # prints `export FLOTILLA_TEST_PG_URL=...; export FLOTILLA_TEST_PG_DIR=...`
#   bash scripts/pg.sh stop "$FLOTILLA_TEST_PG_DIR"
# Needs Debian's postgresql package (scripts/test.sh installs it). initdb refuses to run as
# root, so as root the cluster runs as the `postgres` user.
set -euo pipefail

port="${FLOTILLA_TEST_PG_PORT:-55432}"
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x "$bindir/initdb" ]] || { echo "PostgreSQL server binaries not found; apt-get install postgresql" >&2; exit 1; }

as_pg() {
    if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}

# port_in_use PORT — whether something listens on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "${1:-}" in
start)
    # Another cluster (a second checkout's tests, a developer's own) may hold the default port:
    # take the next free one unless a port was asked for.
    if [[ -z ${FLOTILLA_TEST_PG_PORT:-} ]]; then
        while port_in_use "$port"; do
            port=$((port + 1))
            ((port < 55532)) || { echo "no free port in 55432-55531 for PostgreSQL" >&2; exit 1; }
        done
    fi
    dir=$(mktemp -d /tmp/flotilla-pg.XXXXXX)
    ((EUID == 0)) && chown postgres: "$dir"
    as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    echo "export FLOTILLA_TEST_PG_URL=postgres://postgres@127.0.0.1:$port/postgres"
    echo "export FLOTILLA_TEST_PG_DIR=$dir"
    ;;
stop)
    dir="${2:?usage: pg.sh stop DIR}"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: pg.sh start | stop DIR" >&2
    exit 2
    ;;
esac
