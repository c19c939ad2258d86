#!/bin/sh
# Make sure a RabbitMQ broker accepts connections on $RABBITMQ_HOST:$RABBITMQ_PORT
# (default 127.0.0.1:5672). Starts the local rabbitmq-server (detached) when the
# port is closed, then waits up to $RABBITMQ_WAIT seconds (default 60).
# Exit 0: broker is up. Exit 1: it could not be started (message on stderr).
# Installing the package is `make deps-system`'s job, not this script's.
set -eu

HOST=${RABBITMQ_HOST:-127.0.0.1}
PORT=${RABBITMQ_PORT:-5672}
WAIT=${RABBITMQ_WAIT:-60}
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
export PATH

log() { echo "ensure_rabbitmq: $*" >&2; }

port_open() {
    # No nc/bash /dev/tcp dependency: the system python3 is always there (we need it for the venv).
    python3 - "$HOST" "$PORT" <<'PY' >/dev/null 2>&1
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
# An AMQP broker answers a protocol header with its own; a bare TCP accept
# (e.g. a broker still booting) is not enough.
s.sendall(b"AMQP\x00\x00\x09\x01")
s.settimeout(3)
data = s.recv(8)
# 0-9-1 brokers answer with a Connection.Start method frame (type 1, channel 0),
# or with their own protocol header on a version mismatch.
sys.exit(0 if data[:3] == b"\x01\x00\x00" or data.startswith(b"AMQP") else 1)
PY
}

if port_open; then
    log "RabbitMQ already answering on $HOST:$PORT"
    exit 0
fi

case "$HOST" in
    127.0.0.1|localhost|::1) ;;
    *) log "RabbitMQ at $HOST:$PORT does not answer and is not local: cannot start it"; exit 1 ;;
esac

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "rabbitmq-server is not installed and $HOST:$PORT does not answer (run: make deps-system)"
    exit 1
fi

log "nothing on $HOST:$PORT; starting rabbitmq-server -detached"
# -detached returns at once; a broker that is already booting makes it fail
# harmlessly ("node already running"), so its status is not decisive.
rabbitmq-server -detached || log "rabbitmq-server -detached returned $? (waiting for the port anyway)"

start=$(date +%s)
if command -v rabbitmqctl >/dev/null 2>&1; then
    # await_startup blocks until the app is running (or its own timeout).
    timeout "$WAIT" rabbitmqctl await_startup --timeout "$WAIT" >/dev/null 2>&1 || true
fi
while :; do
    if port_open; then
        log "RabbitMQ is up on $HOST:$PORT after $(( $(date +%s) - start ))s"
        exit 0
    fi
    if [ $(( $(date +%s) - start )) -ge "$WAIT" ]; then
        break
    fi
    sleep 1
done

log "RabbitMQ did not come up on $HOST:$PORT within ${WAIT}s"
newest=$(ls -t /var/log/rabbitmq/*.log 2>/dev/null | grep -v '_upgrade\.log$' | head -n 1 || true)
if [ -n "$newest" ]; then
    log "--- errors in $newest (last 20):"
    grep -E '\[(error|critical)\]' "$newest" | tail -n 20 >&2 || tail -n 20 "$newest" >&2 || true
fi
exit 1
