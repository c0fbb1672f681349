#!/usr/bin/env bash
# Daemon restarts under guest I/O: a Linux guest whose disk QEMU reconnects to
# (`-chardev socket,…,reconnect=1`) runs fio with crc32c verification (direct I/O, libaio, four
# jobs) on files of an ext4 file system, and beside it copies files and syncs them. On the host
# `rewind serve` is restarted RESTARTS times at random instants, by SIGTERM and kill -9 in turn,
# each time on the same image and socket. Expected: no I/O error in the guest's kernel log or
# fio, no verify mismatch, every copied file intact, a clean e2fsck of the image afterwards and
# `rewind verify` (the volume equals its journal). Prints each restart's stall: from the signal
# until the new daemon completes its first request. A guest whose I/O stops after a restart
# fails the test within 30 s, with its rings as guest memory holds them. The soak (README, Restarts) is
# `RESTARTS=100 guest-tests/restart-under-io.sh`. RECONNECT is the chardev's reconnect option
# (`reconnect=1`, QEMU 7.2; QEMU 9.2 and later: e.g. `reconnect-ms=200`), QEMU the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
source guest-tests/lib.sh

REWIND=${REWIND:-target/debug/rewind}
RESTARTS=${RESTARTS:-6}
SEED=${SEED:-$$}
STALLS=${STALLS:-}
work=$(mktemp -d)
daemon=
guest=
cleanup() {
    [ -n "$guest" ] && kill "$guest" 2>/dev/null
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
RANDOM=$SEED
echo "restart-under-io: $RESTARTS restarts, seed $SEED"

image=$work/disk.img
serve() {
    RUST_LOG=${RUST_LOG:-info} "$REWIND" serve "$image" --socket "$work/vhost.sock" --control "$work/ctl.sock" \
        --num-queues 2 --size 512M 2>> "$work/daemon.log" &
    daemon=$!
    wait_for_socket "$work/vhost.sock" "$daemon"
}
# await_exit PID: sets exit_code to the daemon's exit status once it exits; a daemon still
# running 60 s after its signal has hung: it is killed and exit_code is 255.
await_exit() {
    local pid=$1 i
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "rewind serve $pid did not exit within 60 s of its signal" >&2
        kill -9 "$pid"
    fi
    if wait "$pid" 2>/dev/null; then exit_code=0; else exit_code=$?; fi
    if [ "$i" = 600 ]; then exit_code=255; fi
}
# requests: the running daemon's request count (0 until its control socket answers); cheap, as
# it is polled to time the stall.
requests() {
    "$REWIND" status --control "$work/ctl.sock" --json 2>/dev/null |
        grep -o '"requests": [0-9]*' | head -n 1 | grep -o '[0-9]*$' || echo 0
}

# queue_states: the disk's rings in guest memory (read through QEMU's monitor: QEMU keeps no
# indices of its own for a vhost-user device while it runs) and the daemon's status, for a
# guest whose I/O stopped: requests the driver made available but the device never used, or
# used ones the driver was not told about.
queue_states() {
    python3 - "$work/qmp.sock" <<'PY'
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
stream = sock.makefile("rw")
def call(command, **arguments):
    stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
    stream.flush()
    while True:
        reply = json.loads(stream.readline())
        if "return" in reply or "error" in reply:
            return reply
def u16(address):
    words = call("human-monitor-command", **{"command-line": f"xp /1hx {address}"})["return"]
    return int(words.split(":")[1].split()[0], 16)
json.loads(stream.readline())
call("qmp_capabilities")
for device in call("x-query-virtio").get("return", []):
    if device["name"] != "virtio-blk":
        continue
    for queue in (0, 1):
        ring = call("x-query-virtio-queue-status", path=device["path"], queue=queue)["return"]
        avail, used, size = ring["vring-avail"], ring["vring-used"], ring["vring-num"]
        print(f"queue {queue}: avail idx {u16(avail + 2)}, used_event {u16(avail + 4 + 2 * size)}; "
              f"used idx {u16(used + 2)}, avail_event {u16(used + 4 + 8 * size)}")
PY
    "$REWIND" status --control "$work/ctl.sock" --json
}
# requests_grow SECONDS: whether the daemon serves another request within SECONDS.
requests_grow() {
    local since i
    since=$(requests)
    for i in $(seq 1 $(($1 * 10))); do
        [ "$(requests)" -gt "$since" ] && return 0
        sleep 0.1
    done
    return 1
}
# check_guest_io RESTART REQUESTS: fails the test, showing the queues, if the guest's I/O
# stopped after that restart. A guest that runs fio and copies never idles for long: hundreds
# of requests or more between restarts. Far fewer, and none for 30 s, is a guest whose I/O
# stopped (without this check it would show only at the guest's timeout, minutes later).
check_guest_io() {
    [ "$2" -lt 10 ] || return 0
    requests_grow 30 && return 0
    echo "the guest's I/O stopped after restart $1 ($2 request(s) since); its queues:" >&2
    queue_states >&2 || true
    echo "daemon log (tail):" >&2
    tail -40 "$work/daemon.log" >&2
    exit 1
}

# fio and its libraries run through the dynamic loader from /data; /data/a holds files to copy.
guest_fio "$work/data"
file_sets "$work/data"
# Each fio round writes its files in full and then verifies them; rounds go on until the host,
# its restarts done, says "stop" on a virtio console port (or a generous time has passed).
runtime=$((RESTARTS * 7 + 60))
cat > "$work/workload.sh" <<S
set -e
mkdir -p /tmp
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
port=\$(ls /dev/vport*p1 | head -n 1)
# Reading a port the host has not connected to yet returns at once, empty: poll it.
(until [ "\$(head -c 4 < "\$port" 2>/dev/null)" = stop ]; do sleep 1; done; touch /tmp/stop) &
echo WORKLOAD-START
end=\$((\$(cut -d. -f1 /proc/uptime) + $runtime))
going() { [ ! -e /tmp/stop ] && [ "\$(cut -d. -f1 /proc/uptime)" -lt "\$end" ]; }
fio_rounds() {
    round=0
    while going; do
        round=\$((round + 1))
        /data/lib/ld-linux-x86-64.so.2 --library-path /data/lib /data/fio --name=verify --directory=/mnt \\
            --rw=randwrite --bs=4k --size=8M --numjobs=4 --ioengine=libaio --iodepth=8 --direct=1 \\
            --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=0 --group_reporting \\
            --output=/tmp/fio.out || { cat /tmp/fio.out; echo FIO-FAILED; return 1; }
        grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; echo FIO-ERROR; return 1; }
    done
    echo "fio rounds: \$round"
}
copy_rounds() {
    round=0
    while going; do
        round=\$((round + 1))
        mkdir -p /mnt/copies/\$round/a
        cp /data/a/* /mnt/copies/\$round/a/
        sync
        # The newest rounds stay to be checked at the end; older ones make room.
        rm -rf /mnt/copies/\$((round - 3))
    done
    echo "copy rounds: \$round"
}
fio_rounds > /tmp/fio.log 2>&1 &
fio_pid=\$!
copy_rounds > /tmp/copy.log 2>&1 &
copy_pid=\$!
ok=1
wait \$fio_pid || ok=0
wait \$copy_pid || ok=0
cat /tmp/fio.log /tmp/copy.log
echo WORKLOAD-DONE
# Checked from the disk, not the page cache.
umount /mnt
mount -t ext4 /dev/vda /mnt
for dir in /mnt/copies/*; do
    (cd \$dir && sha256sum -c -s /data/a.sha256) || { echo "copies in \$dir differ"; ok=0; }
done
umount /mnt
if busybox dmesg | grep -iE "I/O error|blk_update_request|Buffer I/O|EXT4-fs error|Remounting filesystem read-only|virtio_blk.*error"; then
    echo "the kernel logged I/O errors"
    ok=0
fi
[ \$ok = 1 ]
S

serve
GUEST_TIMEOUT=$((runtime + 300)) guest_boot "$work/guest.log" "$work/workload.sh" "$work/data" \
    -chardev socket,id=disk0,path="$work/vhost.sock","${RECONNECT:-reconnect=1}" \
    -device vhost-user-blk-pci,chardev=disk0,num-queues=2 \
    -device virtio-serial-pci,id=serial0 -chardev socket,id=ctl,path="$work/guest-ctl.sock",server=on,wait=off \
    -device virtserialport,bus=serial0.0,chardev=ctl,name=ctl -qmp unix:"$work/qmp.sock",server=on,wait=off &
guest=$!
for _ in $(seq 1 1200); do
    grep -q WORKLOAD-START "$work/guest.log" 2>/dev/null && break
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.1
done
grep -q WORKLOAD-START "$work/guest.log" || { echo "the guest did not start its workload" >&2; cat "$work/guest.log" >&2; exit 1; }

stalls=()
for i in $(seq 1 "$RESTARTS"); do
    # A random instant 1.0–3.0 s after the last restart, while the guest writes.
    sleep "$((1 + RANDOM % 2)).$((RANDOM % 10))"
    grep -q WORKLOAD-DONE "$work/guest.log" && { echo "the guest's workload ended after $((i - 1)) restarts" >&2; exit 1; }
    before=$(requests)
    check_guest_io "$((i - 1))" "$before"
    if [ $((i % 2)) = 1 ]; then signal=TERM; else signal=KILL; fi
    start=$(date +%s.%N)
    kill -"$signal" "$daemon"
    await_exit "$daemon"
    status=$exit_code
    daemon=
    if [ "$status" = 255 ] || { [ "$signal" = TERM ] && [ "$status" != 0 ]; }; then
        echo "restart $i: rewind serve exited with $status on SIGTERM" >&2; tail -20 "$work/daemon.log" >&2; exit 1
    fi
    serve
    # The stall ends when the new daemon completes a request (QEMU reconnects once a second).
    until [ "$(requests)" -gt 0 ]; do
        kill -0 "$guest" 2>/dev/null || break
        sleep 0.01
    done
    stall=$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $start }")
    stalls+=("$signal $stall")
    echo "restart $i: SIG$signal (requests before: $before), stall ${stall} s"
done
check_guest_io "$RESTARTS" "$(requests)"
echo "restarts done; telling the guest to stop"
# The connection stays open until QEMU exits, so the guest's next poll finds the word.
python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"stop"); s.recv(1)' \
    "$work/guest-ctl.sock" 2>/dev/null &
if ! wait "$guest"; then
    guest=
    echo "the guest's workload failed; its console:" >&2; cat "$work/guest.log" >&2
    echo "daemon log (tail):" >&2; tail -40 "$work/daemon.log" >&2
    exit 1
fi
guest=
grep -E "fio rounds|copy rounds" "$work/guest.log" || true
tracked=$(grep -c "tracking in-flight requests" "$work/daemon.log" || true)
resubmitted=$(grep -c "resubmitting" "$work/daemon.log" || true)
echo "connections with inflight tracking: $tracked; queue starts that resubmitted requests: $resubmitted"
if [ -n "${KEEP_LOG:-}" ]; then cp "$work/daemon.log" "$KEEP_LOG"; fi
kill -TERM "$daemon"
await_exit "$daemon"
[ "$exit_code" = 0 ] || { echo "rewind serve did not exit cleanly" >&2; tail -20 "$work/daemon.log" >&2; exit 1; }
daemon=
e2fsck -fn "$image" > "$work/fsck.log" 2>&1 || { echo "e2fsck found damage:" >&2; cat "$work/fsck.log" >&2; exit 1; }
"$REWIND" verify "$image" > "$work/verify.log" 2>&1 || { echo "rewind verify failed:" >&2; cat "$work/verify.log" >&2; exit 1; }
if [ -n "$STALLS" ]; then printf '%s\n' "${stalls[@]}" > "$STALLS"; fi
echo "restart-under-io: OK ($RESTARTS restarts, file system clean, volume matches its journal)"
