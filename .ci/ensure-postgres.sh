#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 with a `test`
# database and trust auth: use a running one, else start the installed
# cluster, else install Debian's server and start it.
set -euo pipefail

answers() {
    python3 - <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", 5432))
except OSError:
    sys.exit(1)
PY
}

wait_ready() {
    for _ in $(seq 1 30); do
        answers && return 0
        sleep 1
    done
    return 1
}

if answers; then
    echo "postgres: answering on 127.0.0.1:5432"
else
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        echo "postgres: installing Debian's server"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq postgresql >/dev/null
    fi
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    conf=/etc/postgresql/$version/main
    # trust auth on loopback, as the tests expect
    if ! grep -q "hitl-ci" "$conf/pg_hba.conf"; then
        sed -i '1i # hitl-ci\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$conf/pg_hba.conf"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_ready || { echo "postgres: did not come up" >&2; exit 1; }
    echo "postgres: started cluster $version/main"
fi

# the `test` database (createdb fails harmlessly when it exists)
if command -v psql >/dev/null; then
    psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null
fi
