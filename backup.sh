#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-3.0-or-later
#
# backup.sh: keep a block-level mirror of a dm-era device on this (backup) host, over ssh.
#
#   backup.sh [SETTINGS_FILE]
#
# Settings come from the environment, or from SETTINGS_FILE (KEY=value lines, # comments), which wins:
#   HOST             the host with the data (required)
#   SSH              command that runs a remote shell command as `$SSH $HOST 'command'` (default: ssh)
#   ERA_DEVICE       dm name of the era device on HOST (required)
#   DATA_DEVICE      device to copy (default: /dev/mapper/$ERA_DEVICE)
#   METADATA_DEVICE  dm-era metadata device on HOST (required)
#   GRANULARITY      era block size in sectors (default: read from `dmsetup table` on HOST)
#   MOUNTPOINT       filesystem on the era device to freeze for the last pass (empty: no freeze)
#   FREEZE_LIMIT     freeze only once a pass would copy at most this many bytes (default: 268435456)
#   FREEZE_TIMEOUT   seconds after which HOST thaws MOUNTPOINT by itself, whatever happens (default: 120)
#   DIR, FILE        the mirror is $DIR/$FILE (DIR required; FILE default: $ERA_DEVICE.img)
#   SOURCE_ID        names the source in streams and state (default: $HOST:$ERA_DEVICE)
#   TOOL             era_tool.py on this host (default: beside backup.sh); it is sent to HOST each run
#   MAX_PASSES       passes before giving up on getting under FREEZE_LIMIT (default: 5)
#   COMPRESS         gzip, zstd, lz4, xz or none (default: gzip)
#   KEEP_UNDO        keep undo files of the last N passes beside the mirror, dated (default: 0, none); with
#                    N >= 1 every pass is all-or-nothing, and older versions can be stepped back to
#   VERIFY           after the backup, compare the mirror with HOST's device block by block (era_tool sum |
#                    verify: only digests cross) and repair what diverged: ALWAYS (every run), N (every N-th
#                    run) or 0 (never; the default)
#   VERIFY_SLICE     K: each verify covers the next 1/K of the device, where the last one stopped (default: 1,
#                    all of it), so that a large mirror is verified whole every K verifying runs
#
# HOST needs python3 and dmsetup, and with MOUNTPOINT fsfreeze and flock: era_tool reads the dm-era metadata
# itself. With MOUNTPOINT, /run/era_tool-backup.DEV on HOST (DEV: the filesystem's device number) records whose
# freeze is in effect.
# The first run (no state beside the mirror) makes a full copy; every run ends with the mirror at a known era,
# recorded by `era_tool.py apply` only after the data is on disk. A pass cut short (without KEEP_UNDO, or the
# first full copy) is resumed by the next run: the rest of it, and everything written since its snapshot.
# Exit 0: the mirror is complete and, with MOUNTPOINT, consistent (copied under fsfreeze); its state is durable.
# Exit 3: the same, after a verify found blocks that had diverged from HOST's device (written behind dm-era's
# back, or rotted here) and repaired them.
# $DIR/$FILE.verify counts the runs and remembers the next slice to verify.
set -euo pipefail

log() { printf '%s backup.sh: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
die() { log "error: $*"; exit 1; }

settings="HOST SSH ERA_DEVICE DATA_DEVICE METADATA_DEVICE GRANULARITY MOUNTPOINT FREEZE_LIMIT FREEZE_TIMEOUT
DIR FILE SOURCE_ID TOOL MAX_PASSES COMPRESS KEEP_UNDO VERIFY VERIFY_SLICE"

load_settings() {
    local line key value lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        line=${line%$'\r'}
        case $line in ''|'#'*) continue ;; esac
        [[ $line =~ ^[[:space:]]*([A-Z_]+)=(.*)$ ]] || die "$1 line $lineno: not KEY=value: $line"
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        case " ${settings//$'\n'/ } " in *" $key "*) ;; *) die "$1 line $lineno: unknown setting $key" ;; esac
        # Optional quotes around the value, as in a shell file.
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
        printf -v "$key" '%s' "$value"
    done < "$1"
}

case $# in
    0) ;;
    1) [ -r "$1" ] || die "cannot read settings file $1"; load_settings "$1" ;;
    *) echo "usage: backup.sh [SETTINGS_FILE]" >&2; exit 2 ;;
esac

: "${HOST:?HOST is not set}" "${ERA_DEVICE:?ERA_DEVICE is not set}"
: "${METADATA_DEVICE:?METADATA_DEVICE is not set}" "${DIR:?DIR is not set}"
SSH=${SSH:-ssh}
DATA_DEVICE=${DATA_DEVICE:-/dev/mapper/$ERA_DEVICE}
GRANULARITY=${GRANULARITY:-}
MOUNTPOINT=${MOUNTPOINT:-}
FREEZE_LIMIT=${FREEZE_LIMIT:-268435456}
FREEZE_TIMEOUT=${FREEZE_TIMEOUT:-120}
FILE=${FILE:-$ERA_DEVICE.img}
SOURCE_ID=${SOURCE_ID:-$HOST:$ERA_DEVICE}
TOOL=${TOOL:-$(dirname "$(readlink -f "$0")")/era_tool.py}
MAX_PASSES=${MAX_PASSES:-5}
COMPRESS=${COMPRESS:-gzip}
KEEP_UNDO=${KEEP_UNDO:-0}
VERIFY=${VERIFY:-0}
VERIFY_SLICE=${VERIFY_SLICE:-1}

for number in FREEZE_LIMIT FREEZE_TIMEOUT MAX_PASSES KEEP_UNDO VERIFY_SLICE; do
    [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, not '${!number}'"
done
[ -z "$GRANULARITY" ] || [[ $GRANULARITY =~ ^[0-9]+$ ]] || die "GRANULARITY must be a number of sectors"
[ "$MAX_PASSES" -ge 1 ] || die "MAX_PASSES must be at least 1"
[ "$VERIFY" = ALWAYS ] || [[ $VERIFY =~ ^[0-9]+$ ]] || die "VERIFY must be ALWAYS, a number of runs or 0, not '$VERIFY'"
[ "$VERIFY_SLICE" -ge 1 ] || die "VERIFY_SLICE must be at least 1"
[ -r "$TOOL" ] || die "cannot read TOOL $TOOL"
[ -d "$DIR" ] || die "DIR $DIR is not a directory"
case $COMPRESS in
    gzip) pack='gzip -1'; unpack='gzip -d' ;;
    zstd) pack='zstd -1 -q'; unpack='zstd -d -q' ;;
    lz4) pack='lz4 -1 -q'; unpack='lz4 -d -q' ;;
    xz) pack='xz -1'; unpack='xz -d' ;;
    none) pack='cat'; unpack='cat' ;;
    *) die "COMPRESS must be gzip, zstd, lz4, xz or none, not '$COMPRESS'" ;;
esac
read -ra ssh_command <<< "$SSH"
mirror=$DIR/$FILE

# Quote a value for the remote POSIX shell.
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# The remote side, in POSIX sh: era_tool.py arrives on its standard input and is kept in a private
# directory, on tmpfs where possible (a frozen root filesystem blocks every write to it).
remote_prelude() {
    cat <<EOF
set -eu
ERA=$(q "$ERA_DEVICE") META=$(q "$METADATA_DEVICE") DATA=$(q "$DATA_DEVICE") MP=$(q "$MOUNTPOINT")
G=$(q "$GRANULARITY") TIMEOUT=$(q "$FREEZE_TIMEOUT")
export PYTHONDONTWRITEBYTECODE=1
for t in /dev/shm /run "\${TMPDIR:-/tmp}"; do d=\$(mktemp -d "\$t/era_backup.XXXXXX" 2>/dev/null) && break; done
[ -n "\${d:-}" ] || { echo "backup.sh (remote): cannot make a temporary directory" >&2; exit 1; }
snap=0 frozen=0 watchdog= record=
# A freeze is thawed only by its own run or its own timer. The record (a file per filesystem, in a fixed
# place) holds the pid of the thaw timer of the run whose freeze is in effect, and is emptied at the thaw;
# it is read and written under flock. A timer that outlived its run (a remote shell killed by SIGKILL never
# runs its trap) must not thaw a later run's freeze: that run's final pass would be copied unfrozen.
# Exit status: 0 thawed; 2 not ours (our timer thawed it after TIMEOUT); else fsfreeze -u failed, it was not
# frozen any more (someone thawed it by hand).
thaw() (
    exec 9<>"\$record"
    flock 9 || exit 1
    [ "\$(cat "\$record")" = "\$watchdog" ] || exit 2
    rc=0
    fsfreeze -u "\$MP" || rc=\$?
    # Only after the thaw: were /run on the frozen filesystem, a write there would wait for the thaw.
    : > "\$record"
    exit "\$rc"
)
cleanup() {
    rc=\$?
    # Through thaw: after TIMEOUT the freeze is not ours any more (our timer thawed it, a later run may have
    # frozen it since).
    if [ "\$frozen" = 1 ]; then thaw 2>/dev/null || true; fi
    if [ -n "\$watchdog" ]; then kill -- "-\$watchdog" 2>/dev/null || true; fi
    if [ "\$snap" = 1 ]; then dmsetup message "\$ERA" 0 drop_metadata_snap || rc=1; fi
    rm -rf "\$d"
    exit "\$rc"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
# Exactly the tool's bytes: what follows on standard input (a block list) is the script's.
python3 -c 'import os, sys
left = int(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    while left:
        piece = os.read(0, min(left, 1 << 16))
        if not piece:
            sys.exit("backup.sh (remote): era_tool.py arrived cut short")
        f.write(piece)
        left -= len(piece)' $(wc -c < "$TOOL") "\$d/era_tool.py"
[ -n "\$G" ] || G=\$(dmsetup table "\$ERA" | awk '{ print \$NF }')
# A snapshot left by a run that died is stale: drop it (an error only means there was none).
dmsetup message "\$ERA" 0 drop_metadata_snap 2>/dev/null || true
snapshot() {
    dmsetup message "\$ERA" 0 take_metadata_snap
    snap=1
    # The era new writes land in from now on: the next pass starts there.
    era=\$(dmsetup status "\$ERA" | awk '{ print \$6 }')
    case \$era in ''|*[!0-9]*) echo "backup.sh (remote): cannot read the era of \$ERA" >&2; exit 1 ;; esac
}
EOF
}

# Run a remote script; era_tool.py goes over the same connection, on its standard input, followed by the
# file $1 if given (the script reads it from its standard input).
remote() {
    "${ssh_command[@]}" "$HOST" "$(remote_prelude; cat)" < <(cat "$TOOL" ${1:+"$1"})
}

# Prints "ERA BYTES": take a snapshot and estimate the changes since era $1. The list comes from the
# snapshot itself (era_tool reads the metadata; era_invalidate 0.9 would read the live roots).
remote_estimate() {
    remote <<EOF
snapshot
bytes=\$(python3 "\$d/era_tool.py" copy --metadata "\$META" --since $(q "$1") "\$G" | awk '{ print \$1 }')
echo "\$era \$bytes"
EOF
}

# Writes the stream of one pass to standard output: kind full | incremental | frozen, since era $2; or kind
# resume, of the token $2 (of a full copy if $3 is full).
remote_copy() {
    local kind=$1 since=${2:-} whole=${3:-}
    remote <<EOF
freeze=$(q "$([ "$kind" = frozen ] && echo 1 || echo 0)")
if [ "\$freeze" = 1 ]; then
    # The record of MP's freeze (see thaw): named by the filesystem's device number, so that every run
    # finds the same one however MOUNTPOINT is spelled.
    dev=\$(python3 -c 'import os, sys; print(os.stat(sys.argv[1]).st_dev)' "\$MP")
    record=/run/era_tool-backup.\$dev
    # The thaw must not depend on this connection: a timer in a session of its own thaws after TIMEOUT
    # whatever happens to this shell, if the record still names it (else the freeze is a later run's).
    # Its pid is its process group, so killing the group stops it.
    setsid sh -c 'echo \$\$ > "\$3"; sleep "\$1"; exec 9<>"\$4"; flock 9
        if [ "\$(cat "\$4")" = \$\$ ]; then fsfreeze -u "\$2" 2>/dev/null; : > "\$4"; fi' era_tool-thaw \
        "\$TIMEOUT" "\$MP" "\$d/watchdog" "\$record" </dev/null >/dev/null 2>&1 &
    while [ ! -s "\$d/watchdog" ]; do sleep 1; done
    watchdog=\$(cat "\$d/watchdog")
    # Set before the freeze, so that the cleanup thaws whenever the record names our timer.
    frozen=1
    (
        exec 9<>"\$record"
        flock 9
        # Ours before the freeze, so that our timer thaws it even if this shell dies right after it.
        old=\$(cat "\$record")
        echo "\$watchdog" > "\$record"
        # A failed freeze (MP still frozen by a run that died, say) gives the record back, to its timer.
        fsfreeze -f "\$MP" || { printf '%s\n' "\$old" > "\$record"; exit 1; }
    )
fi
snapshot
copy() {
    if [ $(q "$kind") = full ]; then
        python3 "\$d/era_tool.py" copy --full --era "\$era" --source-id $(q "$SOURCE_ID") "\$G" "\$DATA"
    elif [ $(q "$kind") = resume ]; then
        # The rest of the interrupted pass, and everything written since its snapshot, from this new one.
        python3 "\$d/era_tool.py" copy --resume $(q "$since") $([ "$whole" = full ] && echo --full) \
            --metadata "\$META" --source-id $(q "$SOURCE_ID") "\$G" "\$DATA"
    else
        # Block list, since-era and era (the snapshot's) straight from the metadata snapshot.
        python3 "\$d/era_tool.py" copy --metadata "\$META" --since $(q "$since") \
            --source-id $(q "$SOURCE_ID") "\$G" "\$DATA"
    fi
}
# The copy's exit status, through the compressor (no pipefail in POSIX sh; set -e must not end the
# group before the status is written).
exec 3>&1
status=\$( { { rc=0; copy || rc=\$?; echo "\$rc" >&4; } | $pack >&3; } 4>&1 )
exec 3>&-
[ "\$status" = 0 ] || { echo "backup.sh (remote): copy failed (exit \$status)" >&2; exit 1; }
if [ "\$freeze" = 1 ]; then
    thawed=0
    thaw || thawed=\$?
    frozen=0
    if [ "\$thawed" = 2 ]; then
        echo "backup.sh (remote): the copy outlasted FREEZE_TIMEOUT (\$TIMEOUT s): the filesystem was thawed during it" >&2
        exit 1
    elif [ "\$thawed" != 0 ]; then
        echo "backup.sh (remote): \$MP was thawed during the copy, not by backup.sh" >&2
        exit 1
    fi
fi
EOF
}

mirror_era() {
    # The era the mirror holds, from its state file; empty when there is none (or it is unknown).
    [ -e "$mirror" ] || return 0
    python3 "$TOOL" info --json "$mirror" | python3 -c 'import json, sys; e = json.load(sys.stdin).get("era"); print("" if e is None else e)'
}

passes_run=0

# Undo files of earlier passes, oldest first (the names sort by date).
undo_files() {
    local f
    for f in "$mirror".undo.*; do
        case $f in *.damaged) continue ;; esac
        [ -e "$f" ] && printf '%s\n' "$f"
    done
    return 0
}

# The interrupted apply the mirror's state records, as "TOKEN full|incremental BYTES_LEFT"; empty when none.
mirror_resume() {
    [ -e "$mirror" ] || return 0
    python3 "$TOOL" info --json "$mirror" | python3 -c 'import json, sys
s = json.load(sys.stdin)
r = s.get("interrupted")
if r and s.get("resume_token"):
    print(s["resume_token"], "full" if r["covers"][0][0] is None else "incremental", r["total_bytes"] - r["applied_bytes"])'
}

# One pass: copy | compress | ssh | decompress | apply. The mirror's era advances only if apply exits 0.
# Without an undo file, apply records its progress as it goes, so a pass cut short is resumed by the next run.
pass() {
    local kind=$1 since=${2:-} whole=${3:-} started=$SECONDS undo=()
    # A mirror with no era yet holds no version to go back to: no undo file, and the first full copy stays resumable.
    if [ "$KEEP_UNDO" -gt 0 ] && [ -n "$(mirror_era)" ]; then
        passes_run=$((passes_run + 1))
        undo=(--undo "$mirror.undo.$(date +%Y%m%d-%H%M%S).$(printf %03d "$passes_run").$kind")
    fi
    remote_copy "$kind" "$since" "$whole" | $unpack | python3 "$TOOL" apply "${undo[@]}" "$mirror"
    log "$kind pass done in $((SECONDS - started)) s; mirror at era $(mirror_era)"
    if [ "$KEEP_UNDO" -gt 0 ]; then
        undo_files | head -n "-$KEEP_UNDO" | while IFS= read -r old; do rm -f -- "$old"; done
    fi
}

# One run at a time per mirror.
exec 9>>"$mirror.lock"
flock -n 9 || die "another backup.sh is running for $mirror"
# An export, serve or verify of the mirror holds it shared, and apply would refuse it only after the data host was
# frozen and copied from: say so before anything starts.
if [ -e "$mirror" ] && ! flock -n "$mirror" true; then
    die "$mirror is in use by another era_tool (an export or serve of a kept version, or a verify): stop it, then run again"
fi
on_exit() {
    local rc=$? era
    case $rc in 0|3) return ;; esac
    era=$(mirror_era 2>/dev/null) || era='?'
    if [ -n "$(mirror_resume 2>/dev/null)" ]; then
        log "failed (exit $rc): the pass stopped midway and its progress is recorded; the next run resumes it"
    elif [ -n "$era" ]; then
        log "failed (exit $rc): $mirror holds era $era, complete but not a consistent image; run again"
    else
        log "failed (exit $rc): $mirror has no recorded era yet; run again"
    fi
}
trap on_exit EXIT

# A pass killed with the backup host (power, OOM) leaves its undo file without a trailer: finish its rollback,
# so the mirror is whole again before anything else. rollback tells that apart from an undo file damaged after
# its pass completed (the mirror's state names the stream it applied), which it refuses: the mirror is whole
# then, and only that one older version is lost.
last_undo=$(undo_files | tail -n 1)
if [ -n "$last_undo" ] && ! python3 "$TOOL" info -i "$last_undo" >/dev/null 2>&1; then
    log "$last_undo is not a complete undo file: rolling back the pass that wrote it"
    python3 "$TOOL" rollback "$last_undo" "$mirror" ||
        die "cannot roll back with $last_undo (the line above says why). If it says the apply completed, $mirror is whole: move $last_undo out of the way (mv -- '$last_undo' '$last_undo.damaged') and run again"
    rm -f -- "$last_undo"
fi

# A pass that stopped midway (the link dropped, this host rebooted) is resumed, not started over: the rest of it and
# everything written since its snapshot (see README, "Resuming an interrupted copy").
read -r token whole left < <(mirror_resume) || true
if [ -n "${token:-}" ]; then
    log "resuming the interrupted $whole pass: $left bytes of it left, and what changed since its snapshot"
    pass resume "$token" "$whole"
fi

era=$(mirror_era)
if [ -z "$era" ]; then
    log "no recorded era for $mirror: first backup, full copy of $HOST:$DATA_DEVICE"
    pass full
    era=$(mirror_era)
fi

passes=0
while :; do
    passes=$((passes + 1))
    read -r _ estimate < <(remote_estimate "$era") || die "cannot estimate the changes on $HOST"
    [[ $estimate =~ ^[0-9]+$ ]] || die "bad estimate from $HOST: '$estimate'"
    if [ "$estimate" -gt "$FREEZE_LIMIT" ]; then
        if [ "$passes" -ge "$MAX_PASSES" ]; then
            die "still $estimate bytes changed since era $era after $MAX_PASSES passes (FREEZE_LIMIT $FREEZE_LIMIT): not frozen, so not consistent; raise MAX_PASSES or FREEZE_LIMIT"
        fi
        log "pass $passes: estimate $estimate bytes since era $era (> FREEZE_LIMIT): incremental pass"
        pass incremental "$era"
    elif [ -n "$MOUNTPOINT" ]; then
        log "pass $passes: estimate $estimate bytes since era $era: final pass with $MOUNTPOINT frozen"
        pass frozen "$era"
        break
    else
        log "pass $passes: estimate $estimate bytes since era $era: final pass (no MOUNTPOINT: not frozen)"
        pass incremental "$era"
        break
    fi
    era=$(mirror_era)
done
log "done: $mirror holds $SOURCE_ID at era $(mirror_era)"

# ---- verify: the mirror compared with the device, block by block, and repaired

# Writes the sum stream of blocks $2 to $3 (end excluded) with key $4; the changes since era $1 (the mirror's)
# are listed in it. sum takes the metadata snapshots itself, one before and one after its read.
remote_sum() {
    remote <<EOF
python3 "\$d/era_tool.py" sum --key $(q "$4") --metadata "\$META" --since $(q "$1") --range $(q "$2:$3") "\$G" "\$DATA"
EOF
}

# Writes a repair stream of the blocks listed in the XML file $2, for the mirror at era $1.
remote_repair() {
    remote "$2" <<EOF
exec 3>&1
status=\$( { { rc=0; python3 "\$d/era_tool.py" copy --repair --era $(q "$1") --source-id $(q "$SOURCE_ID") "\$G" "\$DATA" || rc=\$?; echo "\$rc" >&4; } | $pack >&3; } 4>&1 )
exec 3>&-
[ "\$status" = 0 ] || { echo "backup.sh (remote): copy --repair failed (exit \$status)" >&2; exit 1; }
EOF
}

verify_file=$mirror.verify
runs=0 slice=0
if [ -s "$verify_file" ]; then
    read -r runs slice < "$verify_file" || true
    [[ $runs =~ ^[0-9]+$ && $slice =~ ^[0-9]+$ ]] || { log "$verify_file is damaged: counting from 0 again"; runs=0 slice=0; }
fi
runs=$((runs + 1))
due=0
case $VERIFY in
    ALWAYS) due=1 ;;
    0) ;;
    *) [ $((runs % VERIFY)) -ne 0 ] || due=1 ;;
esac
[ "$slice" -lt "$VERIFY_SLICE" ] || slice=0   # VERIFY_SLICE was lowered since
if [ "$due" = 0 ]; then
    [ "$VERIFY" = 0 ] || printf '%s %s\n' "$runs" "$slice" > "$verify_file"
    exit 0
fi
era=$(mirror_era)
read -r size block_size < <(python3 "$TOOL" info --json "$mirror" | python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["source_size"], s["block_size"])')
blocks=$(( (size + block_size * 512 - 1) / (block_size * 512) ))
begin=$((blocks * slice / VERIFY_SLICE)) end=$((blocks * (slice + 1) / VERIFY_SLICE))
key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
diverged=$mirror.diverged.xml
started=$SECONDS count=0
if [ "$begin" -lt "$end" ]; then
    rc=0
    remote_sum "$era" "$begin" "$end" "$key" | python3 "$TOOL" verify --key "$key" -o "$diverged" "$mirror" || rc=$?
    case $rc in
        0) log "verify of blocks $begin-$((end - 1)) of $blocks (slice $((slice + 1)) of $VERIFY_SLICE) done in $((SECONDS - started)) s: identical" ;;
        3) count=$(python3 "$TOOL" copy --json 8 < "$diverged" | python3 -c 'import json, sys; print(json.load(sys.stdin)["blocks"])')
           log "verify of blocks $begin-$((end - 1)) of $blocks: $count blocks diverged from $HOST:$DATA_DEVICE (written behind dm-era's back, or damaged here): repairing them"
           remote_repair "$era" "$diverged" | $unpack | python3 "$TOOL" apply "$mirror"
           log "repaired $count blocks in $((SECONDS - started)) s; $mirror stays at era $(mirror_era)" ;;
        *) die "verify of $mirror failed (exit $rc)" ;;
    esac
fi
rm -f -- "$diverged"
printf '%s %s\n' "$runs" "$(( (slice + 1) % VERIFY_SLICE ))" > "$verify_file"
[ "$count" = 0 ] || exit 3
