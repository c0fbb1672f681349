#!/usr/bin/env bash
# The same fio jobs in a QEMU guest on rewind serve and on qemu-storage-daemon, as a sanity
# check (a guest under TCG cannot issue I/O fast enough to tell backends apart; the backend
# benchmark is benches/vhost.rs). Writes target/bench/guest-fio.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source guest-tests/lib.sh
REWIND=${REWIND:-target/release/rewind}
[ -x "$REWIND" ] || cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# fio and every library it loads, run through the dynamic loader from /data.
guest_fio "$work/data"
cat > "$work/fio.sh" <<'S'
set -e
mkdir -p /tmp
run() { # run NAME RW BS DEPTH
    /data/lib/ld-linux-x86-64.so.2 --library-path /data/lib /data/fio --name="$1" --filename=/dev/vda \
        --direct=1 --ioengine=psync --rw="$2" --bs="$3" --iodepth="$4" --numjobs=1 --runtime=8 --time_based \
        --size=256M --group_reporting --output-format=terse --terse-version=3 > /tmp/out
    # terse v3: field 8 read IOPS, field 49 write IOPS
    echo "fio-result $1 $(cut -d';' -f8 /tmp/out) $(cut -d';' -f49 /tmp/out)"
}
run randwrite-4k randwrite 4k 1
run randread-4k randread 4k 1
run seqwrite-1m write 1m 1
S

results() { grep '^fio-result' "$1" | awk '{print $2, ($3 > 0 ? $3 : $4)}'; }
for backend in rewind qsd; do
    image=$work/$backend.img
    truncate -s 1G "$image"
    sock=$work/$backend.sock
    if [ "$backend" = rewind ]; then
        "$REWIND" serve "$image" --socket "$sock" 2>/dev/null &
    else
        qemu-storage-daemon --blockdev driver=file,node-name=f0,filename="$image",cache.direct=off,aio=io_uring \
            --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$sock",writable=on,num-queues=1 &
    fi
    pids+=($!)
    wait_for_socket "$sock" "$!"
    guest_boot "$work/$backend.log" "$work/fio.sh" "$work/data" \
        -chardev socket,id=disk0,path="$sock" -device vhost-user-blk-pci,chardev=disk0,num-queues=1 \
        || { cat "$work/$backend.log" >&2; exit 1; }
    results "$work/$backend.log" > "$work/$backend.txt"
done
{
    echo "| fio job in a TCG guest (psync, O_DIRECT, 8 s) | rewind IOPS | qemu-storage-daemon IOPS | ratio |"
    echo "|---|---|---|---|"
    join "$work/rewind.txt" "$work/qsd.txt" | awk '{printf "| %s | %d | %d | %.2f× |\n", $1, $2, $3, ($3 > 0 ? $2 / $3 : 0)}'
} | tee target/bench/guest-fio.md
