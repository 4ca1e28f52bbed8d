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
#   METADATA_DEVICE  dm-era metadata device on HOST (required, but with REMOTE=restricted)
#   GRANULARITY      era block size in sectors (default: read from `dmsetup table` on HOST)
#   MOUNTPOINT       filesystem on the era device to freeze for the last pass (empty: no freeze)
#   FREEZE_LIMIT     freeze only once a pass would copy at most this many bytes (default: 268435456)
#   FREEZE_TIMEOUT   seconds after which HOST thaws MOUNTPOINT by itself, whatever happens (default: 120)
#   DIR, FILE        the mirror is $DIR/$FILE (DIR required; FILE default: $ERA_DEVICE.img)
#   SOURCE_ID        names the source in streams and state (default: $HOST:$ERA_DEVICE)
#   TOOL             era_tool.py on this host (default: beside backup.sh); it is sent to HOST each run (but with
#                    REMOTE=restricted)
#   MAX_PASSES       passes before giving up on getting under FREEZE_LIMIT (default: 5)
#   COMPRESS         gzip, zstd, lz4, xz or none (default: gzip)
#   KEEP_UNDO        keep undo files of the last N passes beside the mirror, dated (default: 0, none); with
#                    N >= 1 every pass is all-or-nothing, and older versions can be stepped back to
#   VERIFY           after the backup, compare the mirror with HOST's device block by block (era_tool sum |
#                    verify: only digests cross) and repair what diverged: ALWAYS (every run), N (every N-th
#                    run) or 0 (never; the default)
#   VERIFY_SLICE     K: each verify covers the next 1/K of the device, where the last one stopped (default: 1,
#                    all of it), so that a large mirror is verified whole every K verifying runs
#   RATE_LIMIT       read HOST's device at most this many bytes a second (K, M, G: powers of 1024; e.g. 50M), in
#                    every copy and verify but the final pass under fsfreeze, which writers wait for (default: none)
#   IONICE, NICE     run those copies and verifies on HOST under `ionice IONICE` (e.g. -c3, or -c2 -n7) and
#                    `nice -n NICE` (0 to 19); where HOST lacks the command, one log line says it is skipped
#   ALLOW_OLD_KERNEL 1: go on when HOST runs a kernel older than 5.12 (its dm-era can lose tracked writes after a
#                    crash), for a kernel known to carry the fixes (default: 0, refuse)
#   METRICS          a node_exporter textfile to write after each run, atomically (default: none)
#   REMOTE           send: era_tool.py is sent to HOST and run by a shell there (the default); restricted: HOST's
#                    authorized_keys runs `era_tool.py ssh-gate CONFIG` for this host's key, and backup.sh
#                    sends it requests only: no code, no shell. HOST's CONFIG names the devices and mount
#                    point (DATA_DEVICE, METADATA_DEVICE and GRANULARITY here are not used); MOUNTPOINT and
#                    FREEZE_TIMEOUT here must agree with it
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
# Exit 2: usage. Exit 129, 130, 143: stopped by SIGHUP, SIGINT, SIGTERM (the whole process group, as systemd stops a
# unit; a signal to this shell alone waits for the pass under way).
# $DIR/$FILE.verify counts the runs and remembers the next slice to verify. $DIR/$FILE.runs.jsonl gets one JSON line per
# run past its settings (when, how long, bytes, passes, eras, verify counts, exit code, message).
set -euo pipefail

log() { printf '%s backup.sh: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
run_message=
die() { log "error: $*"; run_message="error: $*"; exit 1; }

settings="HOST SSH ERA_DEVICE DATA_DEVICE METADATA_DEVICE GRANULARITY MOUNTPOINT FREEZE_LIMIT FREEZE_TIMEOUT
DIR FILE SOURCE_ID TOOL MAX_PASSES COMPRESS KEEP_UNDO VERIFY VERIFY_SLICE RATE_LIMIT IONICE NICE
ALLOW_OLD_KERNEL METRICS REMOTE"

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

: "${HOST:?HOST is not set}" "${ERA_DEVICE:?ERA_DEVICE is not set}" "${DIR:?DIR is not set}"
REMOTE=${REMOTE:-send}
case $REMOTE in
    send) : "${METADATA_DEVICE:?METADATA_DEVICE is not set}" ;;
    # HOST's ssh-gate config names the metadata device.
    restricted) METADATA_DEVICE=${METADATA_DEVICE:-} ;;
    *) die "REMOTE must be send or restricted, not '$REMOTE'" ;;
esac
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
RATE_LIMIT=${RATE_LIMIT:-}
IONICE=${IONICE:-}
NICE=${NICE:-}
ALLOW_OLD_KERNEL=${ALLOW_OLD_KERNEL:-0}
METRICS=${METRICS:-}

for number in FREEZE_LIMIT FREEZE_TIMEOUT MAX_PASSES KEEP_UNDO VERIFY_SLICE; do
    [[ ${!number} =~ ^[0-9]+$ ]] || die "$number must be a whole number, not '${!number}'"
done
[ -z "$GRANULARITY" ] || [[ $GRANULARITY =~ ^[0-9]+$ ]] || die "GRANULARITY must be a number of sectors"
[ "$MAX_PASSES" -ge 1 ] || die "MAX_PASSES must be at least 1"
[ "$VERIFY" = ALWAYS ] || [[ $VERIFY =~ ^[0-9]+$ ]] || die "VERIFY must be ALWAYS, a number of runs or 0, not '$VERIFY'"
[ "$VERIFY_SLICE" -ge 1 ] || die "VERIFY_SLICE must be at least 1"
# The idle class, or best effort with an optional level: the real-time class is the opposite of gentle, and
# ionice ignores a level given with the idle class (and says so at every pass).
[ -z "$IONICE" ] || [[ $IONICE =~ ^(-c\ ?3|-c\ ?2(\ -n\ ?[0-7])?)$ ]] || die "IONICE must be ionice's idle class (-c3) or best effort (-c2, or -c2 -n7), not '$IONICE'"
[ -z "$NICE" ] || { [[ $NICE =~ ^[0-9]+$ ]] && [ "$NICE" -le 19 ]; } || die "NICE must be 0 to 19, not '$NICE'"
case $ALLOW_OLD_KERNEL in 0|1) ;; *) die "ALLOW_OLD_KERNEL must be 0 or 1, not '$ALLOW_OLD_KERNEL'" ;; esac
[ -r "$TOOL" ] || die "cannot read TOOL $TOOL"
# Digits and a suffix only (no shell text), and a limit era_tool takes (at least 64K, no more than it can count) by
# era_tool's own rule: a value it refuses would otherwise fail every limited pass on HOST.
if [ -n "$RATE_LIMIT" ] && { [[ ! $RATE_LIMIT =~ ^[0-9]+[KMGkmg]?$ ]] ||
        ! python3 "$TOOL" copy "--rate-limit=$RATE_LIMIT" --help >/dev/null 2>&1; }; then
    die "RATE_LIMIT must be bytes a second, at least 64K (K, M, G: powers of 1024), e.g. 50M, not '$RATE_LIMIT'"
fi
[ -d "$DIR" ] || die "DIR $DIR is not a directory"
[ -z "$METRICS" ] || [ -d "$(dirname -- "$METRICS")" ] || die "METRICS $METRICS: no such directory"
[ -z "$METRICS" ] || [ ! -d "$METRICS" ] || die "METRICS $METRICS is a directory: name the textfile in it, e.g. METRICS=${METRICS%/}/era_backup.prom"
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
# The gentle prefix of the copies and verifies (split into words where used), and their --rate-limit.
GENTLY=$(q "$gently") LIMIT=$(q "${RATE_LIMIT:+--rate-limit=$RATE_LIMIT}")
# The operator's word that HOST's old kernel carries the dm-era fixes: era_tool takes it from the environment.
if [ $(q "$ALLOW_OLD_KERNEL") = 1 ]; then export ALLOW_OLD_KERNEL=1; fi
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
    status=\$(dmsetup status "\$ERA")
    era=\$(echo "\$status" | awk '{ print \$6 }')
    case \$era in ''|*[!0-9]*) echo "backup.sh (remote): cannot read the era of \$ERA" >&2; exit 1 ;; esac
    # A full metadata device fails the data writes: no pass (its snapshot pins more blocks) over 95%.
    if echo "\$status" | awk '{ split(\$5, u, "/"); exit !(u[2] > 0 && u[1] * 100 > u[2] * 95) }'; then
        echo "backup.sh (remote): the metadata of \$ERA is over 95% full (\$(echo "\$status" | awk '{ print \$5 }') blocks): no pass started" >&2
        exit 1
    fi
}
EOF
}

# Run a remote script; era_tool.py goes over the same connection, on its standard input, followed by the
# file $1 if given (the script reads it from its standard input).
remote() {
    "${ssh_command[@]}" "$HOST" "$(remote_prelude; cat)" < <(cat "$TOOL" ${1:+"$1"})
}

# REMOTE=restricted: one request to HOST's ssh-gate, its words quoted with q(), for the era device; the gate does
# what the remote scripts below do, the same way.
gate() {
    "${ssh_command[@]}" "$HOST" "era_tool $* $(q "$ERA_DEVICE")"
}

# Prints "ERA BYTES": take a snapshot and estimate the changes since era $1. The list comes from the
# snapshot itself (era_tool reads the metadata; era_invalidate 0.9 would read the live roots).
remote_estimate() {
    if [ "$REMOTE" = restricted ]; then gate estimate --since "$(q "$1")" "$allow_old" < /dev/null; return; fi
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
    if [ "$REMOTE" = restricted ]; then
        local words
        words="copy --source-id=$(q "$SOURCE_ID") --compress $COMPRESS $allow_old"
        case $kind in
            full) words+=" --full $gate_gently" ;;
            resume)
                words+=" --resume $(q "$since") $gate_gently"
                if [ "$whole" = full ]; then words+=" --full"; fi ;;
            incremental) words+=" --since $(q "$since") $gate_gently" ;;
            # The final pass under fsfreeze at full speed: every writer of the filesystem waits for it.
            frozen) words+=" --since $(q "$since") --freeze $(q "$MOUNTPOINT") --freeze-timeout $(q "$FREEZE_TIMEOUT")" ;;
        esac
        gate "$words" < /dev/null
        return
    fi
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
    # The final pass under fsfreeze at full speed: every writer of the filesystem waits for it.
    [ "\$freeze" = 0 ] || GENTLY= LIMIT=
    if [ $(q "$kind") = full ]; then
        \$GENTLY python3 "\$d/era_tool.py" copy --full --era "\$era" --source-id $(q "$SOURCE_ID") \$LIMIT "\$G" "\$DATA"
    elif [ $(q "$kind") = resume ]; then
        # The rest of the interrupted pass, and everything written since its snapshot, from this new one.
        \$GENTLY python3 "\$d/era_tool.py" copy --resume $(q "$since") $([ "$whole" = full ] && echo --full) \
            --metadata "\$META" --source-id $(q "$SOURCE_ID") \$LIMIT "\$G" "\$DATA"
    else
        # Block list, since-era and era (the snapshot's) straight from the metadata snapshot.
        \$GENTLY python3 "\$d/era_tool.py" copy --metadata "\$META" --since $(q "$since") \
            --source-id $(q "$SOURCE_ID") \$LIMIT "\$G" "\$DATA"
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

# Copies standard input to standard output and appends how many bytes it copied to the file $1 (also when cut).
count_into() {
    python3 -c 'import os, signal, sys
count = 0
# A stopped run (systemctl stop, a hangup) still counts what went through: the signal ends the loop, not the process,
# and a second one (SIGHUP after SIGTERM) does not cut the writing of the count short.
def stop(signum, frame):
    for number in signal.SIGTERM, signal.SIGHUP:
        signal.signal(number, signal.SIG_IGN)
    sys.exit(128 + signum)
for number in signal.SIGTERM, signal.SIGHUP:
    signal.signal(number, stop)
try:
    while True:
        piece = os.read(0, 1 << 20)
        if not piece:
            break
        view = memoryview(piece)
        while view:
            written = os.write(1, view)
            count += written
            view = view[written:]
except OSError:
    sys.exit(1)
finally:
    with open(sys.argv[1], "a") as f:
        f.write("%d\n" % count)' "$1"
}

# One pass: copy | compress | ssh | decompress | apply. The mirror's era advances only if apply exits 0.
# Without an undo file, apply records its progress as it goes, so a pass cut short is resumed by the next run.
pass() {
    local kind=$1 since=${2:-} whole=${3:-} started=$SECONDS undo=() began
    began=$(date +%s.%N)
    run_passes=$((run_passes + 1))
    # A mirror with no era yet holds no version to go back to: no undo file, and the first full copy stays resumable.
    if [ "$KEEP_UNDO" -gt 0 ] && [ -n "$(mirror_era)" ]; then
        passes_run=$((passes_run + 1))
        undo=(--undo "$mirror.undo.$(date +%Y%m%d-%H%M%S).$(printf %03d "$passes_run").$kind")
    fi
    # The frozen pass's length bounds the freeze (which starts after the connection and ends at the thaw).
    [ "$kind" != frozen ] || frozen_began=$began
    remote_copy "$kind" "$since" "$whole" | count_into "$run_dir/sent" | $unpack | count_into "$run_dir/applied" |
        python3 "$TOOL" apply "${undo[@]}" "$mirror"
    [ "$kind" != frozen ] || { run_frozen=$(awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'); frozen_began=; }
    log "$kind pass done in $((SECONDS - started)) s; mirror at era $(mirror_era)"
    if [ "$KEEP_UNDO" -gt 0 ]; then
        undo_files | head -n "-$KEEP_UNDO" | while IFS= read -r old; do rm -f -- "$old"; done
    fi
}

# The run's record: appended to $mirror.runs.jsonl by on_exit, whatever the exit, and with METRICS the textfile.
read -r -d '' record_py <<'PY' || true
import datetime, json, os, sys

runs, metrics = sys.argv[1], sys.argv[2]
env = os.environ


def utf8(name):
    """The variable as the bytes bash gave it, read as UTF-8 whatever the locale (Python 3.6 under LANG=C would
    keep non-ASCII bytes as lone surrogates, which no file can take)."""
    return os.fsencode(env.get(name, "")).decode("utf-8", "replace")


def whole(name):
    value = env.get(name, "")
    return int(value) if value.isdigit() else None


EPOCH = datetime.datetime(1970, 1, 1)


def iso(seconds):
    return (EPOCH + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4] + "Z"


def total(path):
    try:
        with open(path) as f:
            return sum(int(line) for line in f if line.strip().isdigit())
    except OSError:
        return 0


start, end = float(env["RUN_START"]), float(env["RUN_END"])
record = {
    "start": iso(start), "end": iso(end), "seconds": round(end - start, 3),
    "source_id": utf8("RUN_SOURCE"), "mirror": utf8("RUN_MIRROR"),
    "bytes_sent": total(env["RUN_DIR"] + "/sent"), "bytes_applied": total(env["RUN_DIR"] + "/applied"),
    "passes": whole("RUN_PASSES") or 0, "frozen_seconds": round(float(env.get("RUN_FROZEN") or 0), 3),
    "era_before": whole("RUN_ERA_BEFORE"), "era_after": whole("RUN_ERA_AFTER"),
    "verified_blocks": whole("RUN_VERIFIED"), "repaired_blocks": whole("RUN_REPAIRED"),
    "metadata_used_ratio": round(float(env["RUN_META_RATIO"]), 4) if env.get("RUN_META_RATIO") else None,
    "exit_code": int(env["RUN_EXIT"]), "message": utf8("RUN_MESSAGE"),
}
line = (json.dumps(record) + "\n").encode()
failed = None
try:
    fd = os.open(runs, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A last line cut by a full disk ends here: a newline first, or this record would join it.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        if os.write(fd, line) != len(line):                   # one write: whole lines, even side by side
            raise OSError("only part of the record was written (the disk is full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
except OSError as exc:
    print("backup.sh: cannot append to %s: %s" % (runs, exc), file=sys.stderr)
    failed = exc
if metrics:
    # Written even when the record could not be: a failed run must reach the alert.
    success = 0.0
    try:
        with open(runs, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    for text in lines + ([] if failed is None else [line.decode()]):
        try:
            old = json.loads(text)
            if old.get("exit_code") in (0, 3) and old.get("source_id") == record["source_id"]:
                success = (datetime.datetime.strptime(old["end"], "%Y-%m-%dT%H:%M:%S.%fZ")
                           - EPOCH).total_seconds()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue                                          # a line cut by a full disk
    label = '{source="%s"}' % record["source_id"].replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    samples = [
        ("last_success_timestamp_seconds", "when the last run that exited 0 or 3 ended (0: none yet)", success),
        ("last_run_seconds", "how long the last run took", record["seconds"]),
        ("last_bytes", "bytes the last run sent over ssh (compressed)", record["bytes_sent"]),
        ("last_exit_code", "backup.sh's exit code in the last run (0, 3: the mirror is good)", record["exit_code"]),
    ]
    if record["metadata_used_ratio"] is not None:
        samples.append(("metadata_used_ratio", "how full the era device's metadata was, 0 to 1",
                        record["metadata_used_ratio"]))
    text = "".join("# HELP era_backup_%s %s\n# TYPE era_backup_%s gauge\nera_backup_%s%s %s\n"
                   % (name, help_, name, name, label, repr(value) if isinstance(value, float) else value)
                   for name, help_, value in samples)
    temporary = "%s.tmp.%d" % (metrics, os.getpid())
    directory, base = os.path.split(os.path.abspath(metrics))
    try:
        for name in os.listdir(directory):                  # left by a run killed while writing
            if name.startswith(base + ".tmp."):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, metrics)                     # never half-written: whole or the old one
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as exc:
        print("backup.sh: cannot write %s: %s" % (metrics, exc), file=sys.stderr)
        failed = failed or exc
if failed is not None:
    sys.exit(1)
PY
run_start=$(date +%s.%N) run_dir=$(mktemp -d "${TMPDIR:-/tmp}/era_backup.XXXXXX") run_passes=0 run_frozen=0
frozen_began='' run_era_before='' run_verified='' run_repaired='' metadata_ratio='' locked_out=0 rolled_back=0
on_exit() {
    local rc=$? era summary metrics=$METRICS
    trap - HUP INT TERM
    if [ -n "$frozen_began" ]; then
        run_frozen=$(awk -v a="$frozen_began" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    fi
    era=$(mirror_era 2>/dev/null) || era='?'
    if [ "$locked_out" = 1 ]; then
        # A run locked out by a running one touched nothing: its record says so, without eras (the mirror is the
        # other run's), and METRICS stays the other run's to write.
        era='' metrics='' summary="$run_message: this run changed nothing"
    else
        case $rc in
            0|3) summary=$run_message ;;
            *)  if [ -n "$(mirror_resume 2>/dev/null)" ]; then
                    summary="failed (exit $rc): the pass stopped midway and its progress is recorded; the next run resumes it"
                elif [ "$run_passes" = 0 ] && [ "$rolled_back" = 0 ] && [ ! -e "$mirror" ]; then
                    summary="failed (exit $rc) before any pass: no mirror written yet"
                elif [ "$run_passes" = 0 ] && [ "$rolled_back" = 0 ]; then
                    summary="failed (exit $rc) before any pass: $mirror is as the last run left it"
                    [[ ! $era =~ ^[0-9]+$ ]] || summary+=" (era $era)"
                elif [ -n "$era" ] && [ "$era" != '?' ]; then
                    summary="failed (exit $rc): $mirror holds era $era, complete but not a consistent image; run again"
                else
                    summary="failed (exit $rc): $mirror has no recorded era yet; run again"
                fi
                log "$summary"
                case $rc in 129|130|143) summary="stopped by a signal; $summary" ;; esac
                [ -z "$run_message" ] || summary="$run_message; $summary" ;;
        esac
    fi
    RUN_START=$run_start RUN_END=$(date +%s.%N) RUN_SOURCE=$SOURCE_ID RUN_MIRROR=$mirror RUN_DIR=$run_dir \
        RUN_PASSES=$run_passes RUN_FROZEN=$run_frozen RUN_ERA_BEFORE=$run_era_before RUN_ERA_AFTER=${era//\?/} \
        RUN_VERIFIED=$run_verified RUN_REPAIRED=$run_repaired RUN_META_RATIO=$metadata_ratio RUN_EXIT=$rc \
        RUN_MESSAGE=$summary python3 -c "$record_py" "$mirror.runs.jsonl" "$metrics" ||
        log "error: cannot write the run's record to $mirror.runs.jsonl${METRICS:+ or $METRICS}"
    rm -rf -- "$run_dir"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# One run at a time per mirror.
exec 9>>"$mirror.lock"
flock -n 9 || { locked_out=1; die "another backup.sh is running for $mirror"; }
# An export, serve or verify of the mirror holds it shared, and apply would refuse it only after the data host was
# frozen and copied from: say so before anything starts.
if [ -e "$mirror" ] && ! flock -n "$mirror" true; then
    die "$mirror is in use by another era_tool (an export or serve of a kept version, or a verify): stop it, then run again"
fi
run_era_before=$(mirror_era 2>/dev/null) || run_era_before=''

# A pass killed with the backup host (power, OOM) leaves its undo file without a trailer: finish its rollback,
# so the mirror is whole again before anything else. rollback tells that apart from an undo file damaged after
# its pass completed (the mirror's state names the stream it applied), which it refuses: the mirror is whole
# then, and only that one older version is lost.
last_undo=$(undo_files | tail -n 1)
if [ -n "$last_undo" ] && ! python3 "$TOOL" info -i "$last_undo" >/dev/null 2>&1; then
    log "$last_undo is not a complete undo file: rolling back the pass that wrote it"
    rolled_back=1
    python3 "$TOOL" rollback "$last_undo" "$mirror" ||
        die "cannot roll back with $last_undo (the line above says why). If it says the apply completed, $mirror is whole: move $last_undo out of the way (mv -- '$last_undo' '$last_undo.damaged') and run again"
    rm -f -- "$last_undo"
fi

# One look at HOST before anything is copied: its kernel, how full the era device's metadata is, and whether it has
# ionice and nice (one line for what it lacks).
if [ "$REMOTE" = restricted ]; then
    # With MOUNTPOINT, the gate checks the final pass's freeze against its config now, not after the first passes.
    freeze_check=
    [ -z "$MOUNTPOINT" ] || freeze_check="--freeze $(q "$MOUNTPOINT") --freeze-timeout $(q "$FREEZE_TIMEOUT")"
    probe=$(gate status "$freeze_check" </dev/null) ||
        die "cannot reach $HOST, or its ssh-gate refused (the line above says which; REMOTE=restricted needs era_tool.py ssh-gate as the forced command of this host's key there, the same era_tool.py as here)"
else
    # shellcheck disable=SC2016 # expanded on HOST
    probe=$("${ssh_command[@]}" "$HOST" 'echo "era-probe kernel $(uname -r)"
s=$(dmsetup status '"$(q "$ERA_DEVICE")"' 2>&1) || true
l=$(printf "%s\n" "$s" | while IFS= read -r l; do case $l in [0-9]*" era "*) echo "$l"; break ;; esac; done)
echo "era-probe status ${l:-$(printf "%s\n" "$s" | head -n 1)}"
for c in ionice nice; do command -v "$c" >/dev/null 2>&1 && echo "era-probe have $c"; done; true' </dev/null) ||
        die "cannot reach $HOST (ssh failed)"
fi
# Tagged lines: a tool's warning in the output is not taken for an answer. A line with no tag comes from the login
# itself (a shell start-up file that prints): it would corrupt every stream that follows, so say so now.
if [ "$REMOTE" = restricted ] && ! grep -q '^era-probe ' <<< "$probe"; then
    die "$HOST's ssh-gate answers in an older form than this backup.sh reads: install the same era_tool.py on both hosts"
fi
if [ -n "$probe" ] && stray=$(grep -v -m 1 '^era-probe ' <<< "$probe"); then
    [ -n "$stray" ] && stray="'${stray:0:80}'" || stray='an empty line'
    die "$HOST printed $stray ahead of the answers over ssh: text from a login (a shell start-up file that prints, a banner on standard output) would corrupt every stream; make the login quiet for this user"
fi
kernel=$(sed -n 's/^era-probe kernel //p' <<< "$probe" | head -n 1)
status=$(sed -n 's/^era-probe status //p' <<< "$probe" | head -n 1)
have=$(sed -n 's/^era-probe have //p' <<< "$probe")
if [[ $kernel =~ ^([0-9]+)\.([0-9]+) ]] && { [ "${BASH_REMATCH[1]}" -lt 5 ] ||
        { [ "${BASH_REMATCH[1]}" -eq 5 ] && [ "${BASH_REMATCH[2]}" -lt 12 ]; }; }; then
    [ "$ALLOW_OLD_KERNEL" = 1 ] ||
        die "$HOST runs kernel $kernel, older than 5.12: its dm-era can lose tracked writes after a crash, and an incremental would then miss them; upgrade, or set ALLOW_OLD_KERNEL=1 for a kernel that carries the 2021 dm-era fixes"
    log "$HOST runs kernel $kernel, older than 5.12 (ALLOW_OLD_KERNEL=1: going on)"
fi
read -r _ _ target _ usage _ <<< "$status" || true
if ! { [ "${target:-}" = era ] && [[ ${usage:-} =~ ^([0-9]+)/([1-9][0-9]*)$ ]]; }; then
    die "$HOST: $ERA_DEVICE is not an era device: dmsetup status says: $status"
fi
used=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
metadata_percent=$((used * 100 / total))
metadata_ratio=$(awk -v u="$used" -v t="$total" 'BEGIN { printf "%.4f", u / t }')
if [ $((used * 100)) -gt $((total * 95)) ]; then
    die "the metadata of $HOST:$ERA_DEVICE is $metadata_percent% full ($used of $total blocks): when it fills, the kernel fails the writes to the data device; no pass started. A metadata snapshot held by a run that died pins blocks (dmsetup message $ERA_DEVICE 0 drop_metadata_snap); else give the era device a larger metadata device"
elif [ $((used * 100)) -gt $((total * 80)) ]; then
    log "warning: the metadata of $HOST:$ERA_DEVICE is $metadata_percent% full ($used of $total blocks): when it fills, the kernel fails the writes to the data device"
fi
gently=
# REMOTE=restricted: the same as request options, and ALLOW_OLD_KERNEL=1 as one too.
gate_gently=${RATE_LIMIT:+--rate-limit $RATE_LIMIT}
allow_old=
[ "$ALLOW_OLD_KERNEL" = 0 ] || allow_old=--allow-old-kernel
for tool in "ionice IONICE $IONICE" "nice NICE -n $NICE"; do
    read -r tool setting options <<< "$tool"
    [ -n "${!setting}" ] || continue
    if [[ $'\n'$have$'\n' == *$'\n'$tool$'\n'* ]]; then
        gently+="$tool $options "
        gate_gently+=" --$tool=$(q "${!setting}")"
    else
        log "$HOST has no $tool: $setting skipped"
    fi
done
gently=${gently% }
[ -z "$RATE_LIMIT$gently" ] || log "copies and verifies read $HOST:$DATA_DEVICE${RATE_LIMIT:+ at most $RATE_LIMIT a second}${gently:+ under $gently} (not the final pass under fsfreeze)"

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
run_message="done: $mirror holds $SOURCE_ID at era $(mirror_era)"
log "$run_message"

# ---- verify: the mirror compared with the device, block by block, and repaired

# Writes the sum stream of blocks $2 to $3 (end excluded) with key $4; the changes since era $1 (the mirror's)
# are listed in it. sum takes the metadata snapshots itself, one before and one after its read.
remote_sum() {
    if [ "$REMOTE" = restricted ]; then
        gate sum --key "$(q "$4")" --since "$(q "$1")" --range "$(q "$2:$3")" "$gate_gently" < /dev/null
        return
    fi
    remote <<EOF
\$GENTLY python3 "\$d/era_tool.py" sum \$LIMIT --key $(q "$4") --metadata "\$META" --since $(q "$1") --range $(q "$2:$3") "\$G" "\$DATA"
EOF
}

# Writes a repair stream of the blocks listed in the XML file $2, for the mirror at era $1.
remote_repair() {
    if [ "$REMOTE" = restricted ]; then
        gate repair --era "$(q "$1")" --source-id="$(q "$SOURCE_ID")" --compress "$COMPRESS" "$gate_gently" < "$2"
        return
    fi
    remote "$2" <<EOF
exec 3>&1
status=\$( { { rc=0; \$GENTLY python3 "\$d/era_tool.py" copy --repair \$LIMIT --era $(q "$1") --source-id $(q "$SOURCE_ID") "\$G" "\$DATA" || rc=\$?; echo "\$rc" >&4; } | $pack >&3; } 4>&1 )
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
    remote_sum "$era" "$begin" "$end" "$key" | count_into "$run_dir/sent" | python3 "$TOOL" verify --key "$key" -o "$diverged" "$mirror" || rc=$?
    [ "$rc" != 0 ] && [ "$rc" != 3 ] || run_verified=$((end - begin)) run_repaired=0
    case $rc in
        0) log "verify of blocks $begin-$((end - 1)) of $blocks (slice $((slice + 1)) of $VERIFY_SLICE) done in $((SECONDS - started)) s: identical" ;;
        3) count=$(python3 "$TOOL" copy --json 8 < "$diverged" | python3 -c 'import json, sys; print(json.load(sys.stdin)["blocks"])')
           log "verify of blocks $begin-$((end - 1)) of $blocks: $count blocks diverged from $HOST:$DATA_DEVICE (written behind dm-era's back, or damaged here): repairing them"
           remote_repair "$era" "$diverged" | count_into "$run_dir/sent" | $unpack | count_into "$run_dir/applied" |
               python3 "$TOOL" apply "$mirror"
           run_repaired=$count
           run_message="$run_message; repaired $count blocks that had diverged"
           log "repaired $count blocks in $((SECONDS - started)) s; $mirror stays at era $(mirror_era)" ;;
        *) die "verify of $mirror failed (exit $rc)" ;;
    esac
fi
rm -f -- "$diverged"
printf '%s %s\n' "$runs" "$(( (slice + 1) % VERIFY_SLICE ))" > "$verify_file"
[ "$count" = 0 ] || exit 3
