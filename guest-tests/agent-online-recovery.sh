#!/usr/bin/env bash
# The guest-agent channel and online recovery: a guest writes batch A, syncs, adds marker
# "after-a" through /dev/virtio-ports/org.rewind.agent.0 (QMP framing over virtio-serial),
# writes batch B and powers off. The host lists the marker (source guest) and recovers to it
# online while a second guest keeps writing on the live disk; a third guest boots the recovered
# image and finds exactly batch A.
set -euo pipefail
cd "$(dirname "$0")/.."
source guest-tests/lib.sh

guest_test_daemons

serve() { # serve IMAGE NAME: rewind serve with control and agent sockets under $work/NAME.*
    RUST_LOG=${RUST_LOG:-warn} "$REWIND" serve "$1" --socket "$work/$2.vhost" --control "$work/$2.control" \
        --agent-socket "$work/$2.agent" --size 128M --num-queues 2 2>> "$work/daemon.log" &
    daemons+=($!)
    wait_for_socket "$work/$2.agent" "$!"
}
qemu_args() { # qemu_args NAME: the disk and the agent port of daemon NAME
    echo -chardev socket,id=disk0,path="$work/$1.vhost" -device vhost-user-blk-pci,chardev=disk0,num-queues=2 \
        -device virtio-serial-pci -chardev socket,id=agent0,path="$work/$1.agent" \
        -device virtserialport,chardev=agent0,name=org.rewind.agent.0
}
boot() { # boot LOG SCRIPT NAME
    echo "== guest boot: $1"
    # shellcheck disable=SC2046
    guest_boot "$work/$1.log" "$2" "$work/data" $(qemu_args "$3") || { cat "$work/$1.log" >&2; return 1; }
}

file_sets "$work/data"

# The agent helper the guest uses: QMP over the virtio-serial port. The port is one stream for
# the whole boot, so the greeting and negotiation happen once, in agent_open.
cat > "$work/data/agent.sh" <<'S'
agent_open() {
    for name in /sys/class/virtio-ports/*/name; do
        [ "$(cat "$name")" = org.rewind.agent.0 ] || continue
        port=/dev/$(basename "$(dirname "$name")")
        mkdir -p /dev/virtio-ports && ln -sf "$port" /dev/virtio-ports/org.rewind.agent.0
    done
    exec 3<>/dev/virtio-ports/org.rewind.agent.0
    read -r greeting <&3
    echo '{"execute":"qmp_capabilities"}' >&3
    read -r negotiated <&3
}
# agent COMMAND_JSON: sends one command, prints the reply.
agent() {
    echo "$1" >&3
    read -r reply <&3
    echo "$reply"
}
S

cat > "$work/boot1.sh" <<'S'
set -e
. /data/agent.sh
agent_open
mkfs.ext4 -q /dev/vda
mount /dev/vda /mnt
mkdir /mnt/a && cp /data/a/* /mnt/a/ && sync
reply=$(agent '{"execute":"marker-add","arguments":{"name":"after-a","note":"from the guest"}}')
echo "agent replied: $reply"
echo "$reply" | grep -q '"return"'
# The agent channel refuses host commands.
refused=$(agent '{"execute":"recover","arguments":{"marker":"after-a","output":"/tmp/x.img"}}')
echo "agent replied: $refused"
echo "$refused" | grep -q CommandNotFound
mkdir /mnt/b && cp /data/b/* /mnt/b/ && sync
cd /mnt && sha256sum -c /data/a.sha256 && sha256sum -c /data/b.sha256
cd / && umount /mnt
S
cat > "$work/boot2.sh" <<'S'
set -e
mount /dev/vda /mnt
mkdir -p /mnt/c
echo GUEST-WRITING
for i in $(seq 1 40); do
    dd if=/dev/urandom of=/mnt/c/f$i bs=64k count=4 2>/dev/null
    sync
done
cd / && umount /mnt
S
cat > "$work/boot3.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256
test ! -e /mnt/b && test ! -e /mnt/c
echo "only batch A is there"
cd / && umount /mnt
S

serve "$work/disk.img" live
boot write-a-mark-write-b "$work/boot1.sh" live
"$REWIND" marker list --control "$work/live.control" | tee "$work/markers.txt"
grep -E 'guest +ok +after-a' "$work/markers.txt"

echo "== guest boot: keep-writing (background), recovering online meanwhile"
# shellcheck disable=SC2046
(guest_boot "$work/writer.log" "$work/boot2.sh" "" $(qemu_args live)) &
writer=$!
for _ in $(seq 1 6000); do grep -q GUEST-WRITING "$work/writer.log" 2>/dev/null && break; sleep 0.05; done
grep -q GUEST-WRITING "$work/writer.log" || { echo "the writing guest never started" >&2; cat "$work/writer.log" >&2; exit 1; }
"$REWIND" recover --control "$work/live.control" --marker after-a --output "$work/recovered.img"
"$REWIND" status --control "$work/live.control" | grep "frontend connected: true"
wait "$writer" || { echo "the writing guest failed" >&2; cat "$work/writer.log" >&2; exit 1; }

serve "$work/recovered.img" recovered
boot recovered-has-only-a "$work/boot3.sh" recovered
echo "guest test agent-online-recovery: 1 passed, 0 failed"
