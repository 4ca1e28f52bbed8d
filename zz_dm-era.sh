#!/bin/sh
# SPDX-License-Identifier: GPL-3.0-or-later
#
# zz_dm-era.sh: set up a dm-era device in the initramfs, before the root filesystem is mounted.
#
# Install (see README): copy to /etc/initramfs-tools/scripts/local-block/, add dm_era to
# /etc/initramfs-tools/modules, set the four settings below, run `update-initramfs -u -k all`.
# Name devices by stable IDs: dm-era does not check that it was given the right partitions.

# --- settings ---------------------------------------------------------------------------------
DATA_DEVICE=/dev/disk/by-partuuid/CHANGE-ME-DATA     # the device with the data (e.g. the root partition)
META_DEVICE=/dev/disk/by-partuuid/CHANGE-ME-META     # a small zeroed partition for dm-era's metadata
ERA_DEVICE_NAME=root_era                             # gives /dev/mapper/root_era
BLOCK_SIZE=1024                                      # era block size in 512-byte sectors (multiple of 8)
# ----------------------------------------------------------------------------------------------

PREREQ=""
prereqs() { echo "$PREREQ"; }
case "${1:-}" in
    prereqs) prereqs; exit 0 ;;
esac

log() {
    # The kernel log is what survives an initramfs; stderr is the fallback.
    { echo "zz_dm-era: $*" > /dev/kmsg; } 2>/dev/null || echo "zz_dm-era: $*" >&2
}

# local-block scripts run again and again while devices appear: stay quiet until both exist.
[ -b "$DATA_DEVICE" ] && [ -b "$META_DEVICE" ] || exit 0

data=$(readlink -f "$DATA_DEVICE")
meta=$(readlink -f "$META_DEVICE")
if [ "$data" = "$meta" ]; then
    log "refusing: data and metadata devices are the same ($data); dm-era would destroy the data"
    exit 1
fi
case $BLOCK_SIZE in
    ''|*[!0-9]*) log "refusing: BLOCK_SIZE '$BLOCK_SIZE' is not a number of sectors"; exit 1 ;;
esac
if [ "$BLOCK_SIZE" -eq 0 ] || [ $((BLOCK_SIZE % 8)) -ne 0 ]; then
    log "refusing: BLOCK_SIZE $BLOCK_SIZE is not a positive multiple of 8 sectors"
    exit 1
fi

modprobe dm-era 2>/dev/null || true
if dmsetup info "$ERA_DEVICE_NAME" >/dev/null 2>&1; then
    exit 0  # already set up (this script runs more than once)
fi

# Size in sectors, from sysfs (no tool needed), else blockdev.
sectors=$(cat "/sys/class/block/${data##*/}/size" 2>/dev/null || blockdev --getsz "$data")
case $sectors in
    ''|*[!0-9]*|0) log "cannot read the size of $data"; exit 1 ;;
esac

if dmsetup create "$ERA_DEVICE_NAME" --table "0 $sectors era $meta $data $BLOCK_SIZE"; then
    log "created /dev/mapper/$ERA_DEVICE_NAME: era over $data ($sectors sectors), metadata on $meta," \
        "block size $BLOCK_SIZE sectors"
else
    log "dmsetup create $ERA_DEVICE_NAME failed (data $data, metadata $meta)"
    exit 1
fi
