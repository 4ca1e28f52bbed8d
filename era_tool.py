#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""era_tool: incremental backups of raw block devices with Linux dm-era.

dm-era records which blocks of a device were written in which era;
era_invalidate prints those blocks as XML.  era_tool turns that list into a
self-checking stream of the changed data and applies the stream to a mirror
file or block device on another host.

Usage examples::

    # estimate: how much changed since era 42
    era_invalidate --metadata-snapshot --written-since 42 /dev/meta \\
        | python3 era_tool.py copy 1024
    # copy the changed blocks to a backup host
    era_invalidate --metadata-snapshot --written-since 42 /dev/meta \\
        | python3 era_tool.py copy --since-era 42 --era 45 --source-id web1:root \\
            1024 /dev/mapper/root_era \\
        | ssh backup python3 era_tool.py apply /backup/root.img
    # the first, full copy (era: `dmsetup status`'s 6th field after a checkpoint)
    python3 era_tool.py copy --full --era 45 --source-id web1:root 1024 \\
        /dev/mapper/root_era > full.stream
    # no era_invalidate: the list straight from the metadata snapshot
    python3 era_tool.py copy --metadata /dev/meta --since 42 --source-id web1:root \\
        /dev/mapper/root_era > delta.stream
    # check a stream without writing anything; show a mirror's era
    python3 era_tool.py info -i full.stream
    python3 era_tool.py info /backup/root.img
    # all-or-nothing apply, and the way back
    python3 era_tool.py apply --undo /backup/root.img.undo.1 /backup/root.img < delta.stream
    python3 era_tool.py rollback /backup/root.img.undo.1 /backup/root.img
    # prove the mirror equal to its source: only digests cross; repair what differs
    ssh host python3 era_tool.py sum --key $KEY 1024 /dev/mapper/root_era \\
        | python3 era_tool.py verify --key $KEY /backup/root.img > diverged.xml
    # the data host's forced command for the backup key (authorized_keys):
    # only backup.sh's requests, for the era devices its configs name
    restrict,command="python3 /usr/local/sbin/era_tool.py ssh-gate /etc/era_tool/root.conf" ssh-ed25519 ...

Exit codes: 0 success, 1 error (one line on stderr), 2 usage error,
3 verify found blocks that diverged, 130 interrupted (SIGINT, SIGTERM, SIGHUP).

Stream format (all integers little-endian; CRC-32 is zlib.crc32):

    header   magic        8  89 45 52 41 0d 0a 1a 0a  ("\\x89ERA\\r\\n\\x1a\\n")
             version      2  1
             flags        2  bit 0 since_era set, bit 1 era set, bit 2 full copy,
                             bit 3 undo file (old content an apply overwrote),
                             bit 4 target fields follow (undo files only),
                             bit 5 previous_crc set (with bit 4),
                             bit 6 a repair (with bits 0 and 1, since_era = era),
                             bit 7 a resume (with bit 1; resume fields follow)
             device_size  8  bytes of the source device
             total_bytes  8  bytes covered by all chunks (data + zero)
             block_size   4  dm-era block size, 512-byte sectors
             chunk_size   4  largest payload of one chunk, bytes
             since_era    4  chain position (0 when flag unset)
             era          4  chain position (0 when flag unset)
             created      8  seconds since the epoch, signed
             id_length    4  bytes of source id that follow (at most 1024)
             source_id    n  UTF-8
             target_size  8  with bit 4: the mirror's size after the apply
             target_crc   4  with bit 4: header_crc of the stream applied
             previous_crc 4  with bit 4: the header_crc the state named before
                             (0 unless bit 5)
             resumed_crc  4  with bit 7: header_crc of the stream whose apply
                             stopped midway
             chunk_crc    4  with bit 7: crc of the last chunk of it applied
             resumed_off  8  with bit 7: the offset below which it was applied
             layers       1  with bit 7: how many layers follow (1 .. 8)
             layer       13  with bit 7, each: kind 1 (0: the blocks written in
                             era `era` or later; 1: every block), era 4, and
                             offset 8: the blocks carried from there on
             header_crc   4  CRC-32 of every header byte before it
    chunk    tag          4  b"DATA" (payload follows) or b"ZERO" (none)
             seq          4  chunk number, from 0
             offset       8  byte offset in the device
             length       4  bytes (1 .. chunk_size)
             crc          4  CRC-32 of the payload then of the 20 bytes
                             above, starting from header_crc
             payload      length bytes, DATA only
    trailer  tag          4  b"DONE"
             chunks       4  number of chunks
             data_bytes   8  payload bytes of DATA chunks
             zero_bytes   8  bytes covered by ZERO chunks
             stream_crc   4  CRC-32 of the whole header, every 24-byte
                             chunk header and the 24 trailer bytes above
    end of stream: nothing may follow the trailer.

The original era_copy stream ("legacy"): per range, b"ERARANGE", offset and
length as signed 64-bit host-order integers, then the data.  No header, no
checksum, no end marker.  apply reads both; copy --format legacy writes it.

Sum stream (sum writes it, verify reads it; little-endian, CRC-32 as above):

    header   magic        8  89 45 52 53 0d 0a 1a 0a  ("\\x89ERS\\r\\n\\x1a\\n")
             version      2  1
             flags        2  bit 0: a changed list follows the digests
             device_size  8  bytes of the device hashed
             block_size   4  dm-era block size, 512-byte sectors
             begin        4  first block hashed
             end          4  block after the last one hashed
             since_era    4  with bit 0: the changed list's first era (else 0)
             hash         16 hashlib name, ASCII, NUL-padded: sha256 or blake2b
             digest_size  1  bytes kept of each digest (16)
             key_length   1  bytes of key that follow (16 .. 64)
             key          n
             header_crc   4  CRC-32 of every header byte before it
    digests  end - begin digests, digest_size bytes each: hash(key + block),
             the block as on the device (the last one clipped at its end)
    changed  with bit 0: tag b"CHNG" 4, era 4 (the metadata's current era),
             count 4, then count ranges of blocks written since since_era,
             each begin 4 and end 4, sorted, within begin .. end
    trailer  tag          4  b"DONE"
             blocks       4  end - begin
             stream_crc   4  CRC-32 of every byte of the sum stream before it

The parts of this file, in order (each a section headed by a comment box):

    Constants                   sizes, limits, magic numbers, struct formats
    Exceptions                  EraError and its kinds: one line, exit 1
    Block list                  era_invalidate's XML into a RangeList
    dm-era metadata             the changed blocks read from the metadata
                                device itself: CRC-32C, checked block reads,
                                superblock, btrees and arrays, writesets and
                                the era array, read_changed_blocks()
    Devices and files           BlockFile (the one place for O_DIRECT and
                                offset I/O), Source, Destination, Output
    Stream format               StreamHeader, Chunk, chunk_crc(), the writers
    Stream readers              Input, StreamReader, LegacyReader
    Mirror state                MirrorState: the state file, the chain
                                guard, the mirror's lock
    Undo                        UndoLog (written by apply --undo), UndoFile
    Versions                    Versions (the chain of a mirror's undo files),
                                VersionImage: one version's bytes, read-only
    NBD                         NbdServer: a version served to nbd-client
    Sums                        SumHeader, sum_device() and verify_mirror():
                                the engines of sum and verify
    Messages and progress       Progress, warn(), err(), shown(), say()
    Engines                     RateLimit, read_ahead() and copy_device() for copy;
                                write_chunks(), apply_stream() and
                                roll_back() for apply and rollback
    Data host gate              ssh-gate: GateConfig, the requests it takes
                                (gate_request()), Gate: each one run as
                                backup.sh's remote shell runs it
    Command line (shared)       help formatting, argument types, --version
    Commands                    per command: its parser part (add_*_parser),
                                its cross-checks, its cmd_* screen
    Command line                build_parser(), main(): the error funnel
"""

import argparse
import array
import collections
import errno
import functools
import io
import itertools
import mmap
import os
import queue
import re
import stat
import struct
import sys
import threading
import time
import zlib

__version__ = "0.2.0"

# What another program may import and call: the engines and the parts they
# take.  The rest may change between versions.
__all__ = [
    "EraError", "BlockListError", "DeviceError", "ShortRead", "StreamError",
    "TruncatedStream", "ChecksumMismatch", "MetadataError", "ChainError", "Interrupted",
    "RangeList", "parse_block_list", "ChangedBlocks", "read_changed_blocks",
    "iter_blocks_xml", "crc32c",
    "BlockFile", "Source", "Destination", "Output",
    "StreamHeader", "Chunk", "chunk_crc", "StreamWriter", "LegacyWriter",
    "Input", "StreamReader", "LegacyReader",
    "MirrorState", "UndoLog", "UndoFile", "Version", "Versions", "VersionImage", "NbdServer",
    "RateLimit", "read_ahead", "copy_device", "write_chunks", "apply_stream", "roll_back",
    "GateRefused", "GateConfig", "gate_request", "Gate",
    "build_parser", "main",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SECTOR = 512                      # dm-era block sizes are counted in these
SECTORS_PER_PAGE = 8              # dm-era block sizes are positive multiples of this
DIRECT_ALIGN = 4096               # O_DIRECT buffer, offset and length alignment
CHUNK_SIZE = 4 << 20              # payload of one chunk written by copy
MAX_CHUNK_SIZE = 64 << 20         # largest chunk apply accepts (memory bound)
MAX_SOURCE_ID = 1024              # bytes of source id in a header
MAX_BLOCK = (1 << 32) - 1         # dm-era counts blocks (nr_blocks) in 32 bits
# Block numbers fit 32 bits: half the memory of 64-bit arrays for huge lists.
BLOCK_TYPECODE = "I" if array.array("I").itemsize == 4 else "L"
LEGACY_PIECE = 4 << 20            # legacy records are copied in these pieces
XML_READ = 1 << 16                # block list is fed to the parser in these
PIPE_SIZE = 1 << 20               # the most an unprivileged process may ask for
READ_AHEAD = 4                    # buffers between a reading and a writing thread
READERS = 2                       # copy's reading threads: requests the disk has at once
MIN_KERNEL = (5, 12)              # dm-era loses tracked writes after a crash before it
METADATA_WARN = 80                # percent of the era metadata device used: warn
METADATA_REFUSE = 95              # ... refuse to start a copy (--force)
UNDO_BATCH = 32 << 20             # apply --undo syncs the undo file once per this much data
OUTPUT_STAGE = 4 << 20            # the undo file is written with O_DIRECT in pieces this big

MAGIC = b"\x89ERA\r\n\x1a\n"      # high bit, CR LF, ^Z: catches text-mode damage
FORMAT_VERSION = 1
FLAG_SINCE_ERA = 1
FLAG_ERA = 2
FLAG_FULL = 4
FLAG_UNDO = 8                     # an undo file: the old content an apply overwrote
FLAG_TARGET = 16                  # an undo file that names its apply (target fields follow)
FLAG_PREVIOUS = 32                # with FLAG_TARGET: previous_crc is set
FLAG_REPAIR = 64                  # the blocks verify found diverged; the era stays
FLAG_RESUME = 128                 # the rest of an interrupted apply (resume fields follow)
KNOWN_FLAGS = (FLAG_SINCE_ERA | FLAG_ERA | FLAG_FULL | FLAG_UNDO | FLAG_TARGET | FLAG_PREVIOUS
               | FLAG_REPAIR | FLAG_RESUME)
MAX_OFFSET = (1 << 63) - 1        # off_t is signed 64-bit: no device or offset beyond
MAX_BLOCK_SIZE = (1 << 32) - 8    # block_size is a u32 of sectors, a multiple of 8
MAX_NUMBER_DIGITS = 10            # a u32 has at most 10 decimal digits
SORT_BATCH = 1 << 18              # out-of-order block lists are sorted this many at a time
FILE_MODE = 0o600                 # mirrors, streams, undo and state files: a disk's image

TAG_DATA = b"DATA"
TAG_ZERO = b"ZERO"
TAG_DONE = b"DONE"

# magic, version, flags, device_size, total_bytes, block_size, chunk_size,
# since_era, era, created, id_length; then source id and header_crc
HEADER = struct.Struct("<8sHHQQIIIIqI")
CRC = struct.Struct("<I")
# tag, seq, offset, length: the part of a chunk header its crc covers
CHUNK_FIELDS = struct.Struct("<4sIQI")
CHUNK = struct.Struct("<4sIQII")
# tag, chunks, data_bytes, zero_bytes; then stream_crc
TRAILER_FIELDS = struct.Struct("<4sIQQ")
# with FLAG_TARGET, after the source id: the mirror's size once its apply is
# complete, the header_crc of the stream that apply wrote, and the one the
# mirror's state recorded before it (0 unless FLAG_PREVIOUS)
TARGET = struct.Struct("<QII")
# with FLAG_RESUME, after the source id: the header_crc of the stream whose
# apply was interrupted, the crc of the last chunk it applied (it covers that
# chunk's data: two streams with equal headers still differ here), the offset
# below which that apply is complete, and how many layers follow.  A layer: its kind (LAYER_SINCE: the blocks written
# in era `era` or later; LAYER_EVERY: every block), era, and the offset from
# which the resume carries them.
RESUME = struct.Struct("<IIQB")
LAYER = struct.Struct("<BIQ")
LAYER_SINCE = 0
LAYER_EVERY = 1
MAX_LAYERS = 8                    # more are merged (a superset: never a change skipped)
CHECKPOINT_BYTES = 256 << 20      # apply records its progress after this much data...
CHECKPOINT_SECONDS = 30           # ...or this long, whichever comes first
# A resume token: version, layers, block_size, stream_crc, chunk_crc,
# device_size, offset, CRC-32 of the source id; then the layers (LAYER), then
# a CRC-32.
TOKEN = struct.Struct("<BBxxIIIQQI")
TOKEN_VERSION = 1

# Sum streams (sum writes, verify reads): one keyed digest per dm-era block.
SUM_MAGIC = b"\x89ERS\r\n\x1a\n"  # like MAGIC, and never taken for a stream
SUM_VERSION = 1
SUM_FLAG_CHANGED = 1              # a changed list (from the metadata) follows the digests
SUM_HASHES = ("sha256", "blake2b")  # sha256 where the CPU has SHA instructions, else blake2b
DEFAULT_HASH = "sha256"
SUM_DIGEST_SIZE = 16              # bytes kept of each digest: 2**-128 that a changed block hides
SUM_KEY_SIZE = 32                 # a random key's bytes, when sum is not given one
MIN_SUM_KEY = 16
MAX_SUM_KEY = 64
MAX_SUM_BLOCK = MAX_CHUNK_SIZE    # a block is hashed from one read: at most this big
# magic, version, flags, device_size, block_size, begin, end, since_era, hash,
# digest_size, key_length; then the key and header_crc
SUM_HEADER = struct.Struct("<8sHHQIIII16sBB")
# tag, era, ranges; then the ranges, each begin and end (with SUM_FLAG_CHANGED)
SUM_CHANGED = struct.Struct("<4sII")
SUM_RANGE = struct.Struct("<II")
# tag, blocks; then stream_crc
SUM_TRAILER_FIELDS = struct.Struct("<4sI")
TAG_CHANGED = b"CHNG"
EXIT_DIFFERS = 3                  # verify: the mirror diverged from its source

# NBD (serve): the fixed newstyle handshake and simple replies; big-endian.
NBD_INIT_MAGIC = b"NBDMAGIC"
NBD_OPTS_MAGIC = 0x49484156454F5054   # "IHAVEOPT": before each option
NBD_REPLY_OPT_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1            # handshake flags (the server's)
NBD_FLAG_NO_ZEROES = 2
NBD_FLAG_C_FIXED_NEWSTYLE = 1          # client flags
NBD_FLAG_C_NO_ZEROES = 2
# HAS_FLAGS, READ_ONLY, CAN_MULTI_CONN: every connection sees the same bytes
NBD_TRANSMISSION_FLAGS = 1 | 2 | 256
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_ERR_UNSUP = (1 << 31) + 1
NBD_REP_ERR_INVALID = (1 << 31) + 3
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_MAX_READ = 32 << 20                # the largest request served (the protocol's usual limit)
NBD_MAX_OPTION = 1 << 16               # an option's data: a name of at most 4096 bytes and a few more
NBD_MAX_CLIENTS = 16
NBD_BACKLOG = 8
NBD_SERVER_HELLO = struct.Struct(">QH")       # after NBDMAGIC: IHAVEOPT, handshake flags
NBD_CLIENT_FLAGS = struct.Struct(">I")
NBD_OPTION = struct.Struct(">QII")            # magic, option, length; then its data
NBD_OPTION_REPLY = struct.Struct(">QIII")     # magic, option, reply type, length; then data
NBD_EXPORT_INFO = struct.Struct(">HQH")       # NBD_INFO_EXPORT, size, transmission flags
NBD_BLOCK_SIZES = struct.Struct(">HIII")      # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
NBD_REQUEST = struct.Struct(">IHHQQI")        # magic, flags, type, handle, offset, length
NBD_REPLY = struct.Struct(">IIQ")             # magic, error, handle; then a read's data
NBD_U32 = struct.Struct(">I")
NBD_U16 = struct.Struct(">H")

STATE_SUFFIX = ".era"             # mirror.img -> mirror.img.era
STATE_FORMAT = "era_tool mirror state"
STATE_VERSION = 1

LEGACY_MAGIC = b"ERARANGE"
LEGACY_RECORD = struct.Struct("=8sqq")   # host byte order, as the C tool wrote

MIN_PYTHON = (3, 6)               # RHEL 8's platform-python, SLES 15, Ubuntu 18.04
FORMATS = ("era", "legacy")
STDOUT_CLOSED = "standard output was closed before everything was printed"

# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


class EraError(Exception):
    """An error reported as one line and exit status 1."""


class BlockListError(EraError):
    """The block list is not a complete era_invalidate list."""


class DeviceError(EraError):
    """A source or destination cannot be used or fails; strerror: the system's word, if any.

    written: of a failed write, the bytes written before it failed.
    """

    strerror = None
    written = 0


class ShortRead(DeviceError):
    """A file or device ends before a read of it does; got: the bytes there were."""

    def __init__(self, message, got):
        DeviceError.__init__(self, message)
        self.got = got


class StreamError(EraError):
    """A stream is not one, or is damaged."""


class TruncatedStream(StreamError):
    """A stream ends early."""


class ChecksumMismatch(StreamError):
    """A stream's data does not match its checksum."""


class MetadataError(EraError):
    """dm-era metadata cannot be read, or is not what dm-era writes."""


class ChainError(EraError):
    """A stream does not continue the mirror's chain of backups."""


class Interrupted(EraError):
    """SIGINT, SIGTERM or SIGHUP: exit status 130, with what was done about it."""


class GateRefused(EraError):
    """A request the data host's gate (ssh-gate) does not take."""


# ---------------------------------------------------------------------------
# Block list: era_invalidate XML
# ---------------------------------------------------------------------------


class RangeList:
    """Sorted, merged, non-overlapping [begin, end) ranges of era blocks.

    Kept in two arrays of 32-bit numbers rather than a list of tuples: a
    worst-case list has close to a million entries.
    """

    def __init__(self):
        self.begins = array.array(BLOCK_TYPECODE)
        self.ends = array.array(BLOCK_TYPECODE)

    def __len__(self):
        return len(self.begins)

    def __iter__(self):
        return zip(self.begins, self.ends)

    @property
    def blocks(self):
        return sum(self.ends) - sum(self.begins)

    def add(self, begin, end):
        """Append a range that starts at or after the last one's start, merging."""
        if self.ends and begin <= self.ends[-1]:
            if end > self.ends[-1]:
                self.ends[-1] = end
        else:
            self.begins.append(begin)
            self.ends.append(end)

    @classmethod
    def from_sorted_runs(cls, runs):
        """Merge sorted runs of begin << 32 | end keys (see sorted_run) into one list."""
        import heapq
        result = cls()
        add = result.add
        for key in (runs[0] if len(runs) == 1 else heapq.merge(*runs)):
            add(key >> 32, key & 0xFFFFFFFF)
        return result


def sorted_run(begins, ends):
    """Ranges as one sorted array of 64-bit keys, begin << 32 | end.

    A list of (begin, end) tuples costs about 120 bytes a range (measured: 10
    million out-of-order blocks took 1.5 GB); the keys cost 8 bytes, and
    sorting them SORT_BATCH at a time bounds the temporary list.
    """
    return array.array("Q", sorted([(begin << 32) | end for begin, end in zip(begins, ends)]))


class _BlockListTarget:
    """xml.etree parser target: checks each element as it arrives.

    Nothing is built in memory but the two arrays of numbers, so a list of a
    million elements costs a few megabytes.  era_invalidate lists ranges in
    order, so they are merged as they come; out-of-order input is sorted at
    the end.
    """

    def __init__(self):
        self.ranges = RangeList()
        self.runs = []            # sorted runs of an out-of-order list, see sorted_run
        self.seen_root = False
        self.closed_root = False
        self.start, self.end = self._handlers()

    def _handlers(self):
        """start() and end(), as closures over local variables.

        They run once per element, close to a million times for a worst-case
        list: locals are much faster than attributes.  The fast path takes
        the exact spellings era_invalidate writes; anything else goes through
        _checked(), which explains what is wrong.
        """
        begins = self.ranges.begins
        ends = self.ranges.ends
        runs = self.runs
        depth = 0
        last_end = -1
        ascii_only = _isascii         # a local: looked up close to a million times

        def start(tag, attrib):
            nonlocal depth, last_end
            depth += 1
            begin = end = None
            if depth == 2:
                if tag == "block" and len(attrib) == 1:
                    text = attrib.get("block")
                    if text is not None and text.isdigit() and ascii_only(text) and \
                            len(text) <= MAX_NUMBER_DIGITS:
                        begin = int(text)
                        end = begin + 1
                elif tag == "range" and len(attrib) == 2:
                    first = attrib.get("begin")
                    last = attrib.get("end")
                    if first is not None and last is not None and first.isdigit() and \
                            last.isdigit() and ascii_only(first) and ascii_only(last) and \
                            len(first) <= MAX_NUMBER_DIGITS and len(last) <= MAX_NUMBER_DIGITS:
                        begin = int(first)
                        end = int(last)
            if begin is None or end <= begin or end > MAX_BLOCK:
                begin, end = self._checked(depth, tag, attrib)
                if begin is None:
                    return
            if begin > last_end:
                begins.append(begin)
                ends.append(end)
                last_end = end
            elif begins and begin >= begins[-1]:
                # Adjacent or overlapping, still in order: extend the last range.
                if end > last_end:
                    ends[-1] = end
                    last_end = end
            else:
                begins.append(begin)
                ends.append(end)
                # The range to merge the next one into is this one now: with the
                # end of an earlier range here, blocks were dropped (before 0.2).
                last_end = end
                if not runs:
                    runs.append(array.array("Q"))   # marks the list as out of order
                if len(begins) >= SORT_BATCH:
                    runs.append(sorted_run(begins, ends))
                    del begins[:]
                    del ends[:]
                    last_end = -1

        def end(tag):
            nonlocal depth
            depth -= 1
            if depth == 0:
                self.closed_root = True

        return start, end

    def _checked(self, depth, tag, attrib):
        """Check an element the slow way; return its (begin, end), or Nones for the root."""
        if depth == 1:
            if tag != "blocks" or attrib:
                raise BlockListError("block list root must be <blocks>, not %s"
                                     % _describe(tag, attrib))
            self.seen_root = True
            return None, None
        if depth == 2 and tag == "block" and set(attrib) == {"block"}:
            begin = _block_number(tag, attrib, "block")
            end = begin + 1
        elif depth == 2 and tag == "range" and set(attrib) == {"begin", "end"}:
            begin = _block_number(tag, attrib, "begin")
            end = _block_number(tag, attrib, "end")
            if end <= begin:
                raise BlockListError("%s: end must be greater than begin"
                                     % _describe(tag, attrib))
        else:
            raise BlockListError("unexpected element %s in block list"
                                 % _describe(tag, attrib))
        if end > MAX_BLOCK:
            raise BlockListError("%s: block %d is out of range (dm-era counts blocks in "
                                 "32 bits)" % (_describe(tag, attrib), end - 1))
        return begin, end

    def doctype(self, name, pubid, system):
        # A DOCTYPE is the door to entity tricks; era_invalidate never writes one.
        raise BlockListError("block list has a DOCTYPE; era_invalidate never writes one")

    def pi(self, target, text):
        raise BlockListError("block list has a processing instruction <?%s?>" % target)

    def comment(self, text):
        pass

    def data(self, text):
        if not text.isspace():
            raise BlockListError("block list has unexpected text %r" % text.strip()[:40])

    def close(self):
        if not self.runs:
            return self.ranges
        runs = [run for run in self.runs if run]
        runs.append(sorted_run(self.ranges.begins, self.ranges.ends))
        self.ranges = None
        return RangeList.from_sorted_runs(runs)


def _ascii_only(text):
    """str.isascii() of Python 3.7+, for 3.6."""
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        return False
    return True


_isascii = getattr(str, "isascii", _ascii_only)


def _describe(tag, attrib):
    """An element as a message shows it: each name and value cut to 40 characters."""
    def short(text):
        return shown(text if len(text) <= 40 else text[:37] + "...")
    attrs = "".join(' %s="%s"' % (short(name), short(value))
                    for name, value in sorted(attrib.items()))
    return "<%s%s>" % (short(tag), attrs)


def _block_number(tag, attrib, name):
    text = attrib[name].strip()
    if _isascii(text):
        if text.isdigit():
            text = text.lstrip("0") or "0"
            if len(text) > MAX_NUMBER_DIGITS:
                raise BlockListError("%s: %s is out of range (dm-era counts blocks in 32 bits)"
                                     % (_describe(tag, attrib), name))
            return int(text)
        if text.startswith("-") and text[1:].isdigit():
            raise BlockListError("%s: negative %s" % (_describe(tag, attrib), name))
    raise BlockListError("%s: %s is not a whole number" % (_describe(tag, attrib), name))


def parse_block_list(stream):
    """Read era_invalidate XML from a binary file; return a RangeList.

    The whole list is read and checked before anything is copied: a list cut
    short (era_invalidate died) must never be mistaken for a short list.
    """
    # Imported here: a command that reads no XML (apply) starts faster without it.
    import xml.etree.ElementTree as ElementTree
    target = _BlockListTarget()
    parser = ElementTree.XMLParser(target=target)
    try:
        while True:
            piece = stream.read(XML_READ)
            if not piece:
                break
            parser.feed(piece)
        if not target.seen_root:
            raise BlockListError("block list is empty: no <blocks> element "
                                 "(did era_invalidate fail?)")
        if not target.closed_root:
            raise BlockListError("block list ends before </blocks> "
                                 "(did era_invalidate fail?)")
        return parser.close()
    except ElementTree.ParseError as exc:
        if not target.seen_root and str(exc).startswith("no element found"):
            raise BlockListError("block list is empty: no <blocks> element "
                                 "(did era_invalidate fail?)") from None
        raise BlockListError("block list is not valid XML: %s" % exc) from None


def byte_ranges(ranges, block_bytes, device_size=None):
    """Yield (offset, length) in bytes; clip the last block at the device end."""
    for begin, end in ranges:
        offset = begin * block_bytes
        stop = end * block_bytes
        if device_size is not None:
            stop = min(stop, device_size)
        yield offset, stop - offset


def check_ranges_fit(ranges, block_bytes, device_size, device_name):
    """Refuse a list that names a block past the device: wrong size or device."""
    nr_blocks = -(-device_size // block_bytes)   # the last block may be partial
    if len(ranges) and ranges.ends[-1] > nr_blocks:
        raise DeviceError("block %d is beyond the end of %s (%d bytes): "
                          "wrong block size or device?"
                          % (ranges.ends[-1] - 1, device_name, device_size))


# ---------------------------------------------------------------------------
# dm-era metadata: the block list without era_invalidate
# ---------------------------------------------------------------------------
#
# Layout (all little-endian, 4096-byte metadata blocks; see
# drivers/md/dm-era-target.c and drivers/md/persistent-data/ in Linux):
#
#   superblock (block 0, and the metadata snapshot's copy)
#       csum u32 @0, flags u32 @4, blocknr u64 @8, uuid [16] @16,
#       magic u64 @32, version u32 @40, space map root [128] @44
#       (nr_blocks u64 first), data_block_size u32 @172 (sectors),
#       metadata_block_size u32 @176 (8), nr_blocks u32 @180,
#       current_era u32 @184, current writeset {nr_bits u32 @188,
#       root u64 @192}, writeset_tree_root u64 @200, era_array_root u64 @208,
#       metadata_snap u64 @216 (0: none)
#   btree node
#       csum u32, flags u32 (1 internal, 2 leaf), blocknr u64,
#       nr_entries u32, max_entries u32, value_size u32, padding u32;
#       max_entries le64 keys from byte 32, then the values (internal
#       nodes: le64 child block numbers)
#   array block (a dm_array is a btree: key = array block index,
#       value = le64 location of an array block)
#       csum u32, max_entries u32, nr_entries u32, value_size u32,
#       blocknr u64; values from byte 24
#   checksum of every kind: CRC-32C of bytes 4..4095 with initial value ~0
#       and no final inversion, xor a per-kind seed.
#
# The era array is a dm_array of le32 eras, one per data block.  A writeset
# is a bitset: a dm_array of le64 words, bit i being bit i % 64 of word
# i // 64.  The writeset tree is a btree from era to {nr_bits u32, root u64}.
# The changed blocks since era T: {b : era_array[b] >= T} together with the
# bits of every archived writeset of era T or later, as era_invalidate
# computes them, with these differences on purpose:
#
# * With a snapshot, the snapshot's roots are read.  thin-provisioning-tools
#   0.9 (Debian 12, Ubuntu 22.04) checks that a snapshot is held and then
#   reads the live roots, which the kernel changes under it.
# * Without one (--live, for a stopped target or a copy), the live
#   superblock's current writeset counts too when current_era >= T: its
#   bits are blocks written, and committed, in the current era.
#   era_invalidate ignores it.  After a clean stop it is empty (root 0).
# * Bits of a writeset past nr_blocks (from before the device shrank) are
#   dropped, as the Rust tools do; 0.9 lists blocks past the end.
# * Bitsets of writesets older than T are not read, so damage there does
#   not stop a backup that does not need them; the writeset tree and the
#   whole era array are always read and checked.
# * Writeset eras and era array entries newer than current_era are refused:
#   the kernel cannot write them.

META_BLOCK_SIZE = 4096            # DM_ERA_METADATA_BLOCK_SIZE
META_BLOCK_SECTORS = META_BLOCK_SIZE // 512
SUPERBLOCK_LOCATION = 0
SUPERBLOCK_MAGIC = 2126579579
ERA_METADATA_VERSION = 1          # MIN_ERA_VERSION == MAX_ERA_VERSION
INVALID_WRITESET_ROOT = SUPERBLOCK_LOCATION   # "no current writeset"
MIN_DATA_BLOCK_SECTORS = 8        # data block size is a positive multiple
MAX_NR_BLOCKS = 1 << 31           # the kernel refuses 2^31 blocks or more
MAX_ERA = (1 << 32) - 1           # eras are u32 on disk and in era_invalidate

# The xor seed of each kind of block, so that a block of one kind never
# passes for another.
SUPERBLOCK_CSUM_XOR = 146538381
BTREE_CSUM_XOR = 121107
ARRAY_CSUM_XOR = 595846735
BLOCK_KINDS = {
    SUPERBLOCK_CSUM_XOR: "a superblock",
    BTREE_CSUM_XOR: "a btree node",
    ARRAY_CSUM_XOR: "an array block",
}

NODE_INTERNAL = 1
NODE_LEAF = 2
# A btree of 2^32 keys with the smallest fan-out that still branches (2) is
# 32 levels deep; the kernel's trees are 1 to 5.  Deeper means a chain of
# distinct blocks built by damage, so stop there instead of wandering on.
MAX_BTREE_DEPTH = 32

# csum, flags, blocknr, uuid, magic, version, space map root,
# data_block_size, metadata_block_size, nr_blocks, current_era,
# current writeset nr_bits and root, writeset_tree_root, era_array_root,
# metadata_snap
SUPERBLOCK = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")
# the space map root's first fields: nr_blocks, nr_allocated
SPACE_MAP_ROOT = struct.Struct("<QQ")
# csum, flags, blocknr, nr_entries, max_entries, value_size, padding
NODE_HEADER = struct.Struct("<IIQIIII")
# csum, max_entries, nr_entries, value_size, blocknr
ARRAY_HEADER = struct.Struct("<IIIIQ")
# a writeset tree value: nr_bits, root
WRITESET_VALUE = struct.Struct("<IQ")
CHILD_POINTER = struct.Struct("<Q")
CSUM = struct.Struct("<I")

ERA_SIZE = 4                      # an era array entry: le32
BITSET_WORD_SIZE = 8              # a bitset entry: le64, 64 bits
BITS_PER_WORD = 64

# array.array type codes of the on-disk integer widths
U32 = BLOCK_TYPECODE
U64 = "Q"
BIG_ENDIAN_HOST = sys.byteorder == "big"

NO_SNAPSHOT_MESSAGE = ("no metadata snapshot is held: run 'dmsetup message DEV 0 "
                       "take_metadata_snap' first, or use --live")

# ---------------------------------------------------------------------------
# dm-era metadata: CRC-32C (Castagnoli)
# ---------------------------------------------------------------------------

CRC32C_POLY = 0x82F63B78          # 0x1EDC6F41 bit-reversed
_TWO_U32 = struct.Struct("<II")
_crc_tables = None


def _build_crc_tables():
    """The byte table, and four 16-bit tables that take 8 bytes in 4 looks.

    slice_k[b] is the CRC register after byte b followed by k zero bytes,
    so 8 bytes are the xor of slice_7[b0] ... slice_0[b7]; pairing
    neighbouring slices into 65536-entry tables halves the lookups, which
    is what costs in Python.  Built on first use: about 20 ms, 1 MiB.
    """
    byte = array.array(U32, bytes(4 * 256))
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
        byte[i] = crc
    slices = [byte]
    for _ in range(7):
        prev = slices[-1]
        slices.append(array.array(U32, [(prev[i] >> 8) ^ byte[prev[i] & 0xFF]
                                        for i in range(256)]))
    pairs = []
    for first, second in ((7, 6), (5, 4), (3, 2), (1, 0)):
        low, high = slices[first], slices[second]
        pairs.append(array.array(U32, [low[i & 0xFF] ^ high[i >> 8]
                                       for i in range(65536)]))
    return (byte,) + tuple(pairs)


def crc32c(data, crc=0):
    """CRC-32C of a bytes-like object, continuing from crc (as zlib.crc32 does).

    crc32c(b"123456789") == 0xE3069283.  About 30 MB/s in CPython.
    """
    global _crc_tables
    if _crc_tables is None:
        _crc_tables = _build_crc_tables()
    byte, w0, w1, w2, w3 = _crc_tables
    view = memoryview(data).cast("B")
    crc ^= 0xFFFFFFFF
    whole = len(view) & ~7
    for low, high in _TWO_U32.iter_unpack(view[:whole]):
        low ^= crc
        crc = w0[low & 0xFFFF] ^ w1[low >> 16] ^ w2[high & 0xFFFF] ^ w3[high >> 16]
    for value in view[whole:]:
        crc = byte[(crc ^ value) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def block_checksum(block, seed):
    """dm_bm_checksum of a metadata block: over bytes 4.., no final inversion."""
    return crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF ^ seed


# ---------------------------------------------------------------------------
# dm-era metadata: reading its blocks
# ---------------------------------------------------------------------------


class _MetadataReader:
    """Reads, checks and remembers 4096-byte blocks of one metadata device.

    Every block that a walk reaches is read once at most: dm-era never
    shares a block between the structures of one superblock, so a second
    visit is a cycle or damage, and refusing it bounds the work by the
    size of the device.
    """

    def __init__(self, path, direct=None):
        self.path = path
        self.visited = {}          # block number -> what it was read as
        self.space_map_blocks = None
        try:
            kind = stat.S_IFMT(os.stat(path).st_mode)
        except OSError as exc:
            raise MetadataError("cannot open metadata device %s: %s"
                                % (path, exc.strerror)) from None
        if kind not in (stat.S_IFREG, stat.S_IFBLK):
            raise MetadataError("%s is not a block device or a regular file" % path)
        block = kind == stat.S_IFBLK
        try:
            # dm-era writes the metadata device below the page cache of its device
            # node, so pages an earlier reader left cached can be stale: O_DIRECT,
            # or the cache dropped where that is refused.
            self.file = BlockFile(path, os.O_RDONLY, direct=block if direct is None else direct,
                                  stale=block)
        except DeviceError as exc:
            raise MetadataError(str(exc).replace("regular file or block device",
                                                 "block device or a regular file")) from None
        except OSError as exc:
            raise MetadataError("cannot open metadata device %s: %s"
                                % (path, exc.strerror)) from None
        try:
            size = self.file.size()
        except OSError as exc:
            self.close()
            raise MetadataError("cannot use metadata device %s: %s"
                                % (path, exc.strerror)) from None
        self.buffer = aligned_buffer(META_BLOCK_SIZE)
        self.device_blocks = size // META_BLOCK_SIZE
        if self.device_blocks == 0:
            self.close()
            raise MetadataError("%s is %d bytes: too small for dm-era metadata "
                                "(one %d-byte block at least)"
                                % (self.path, size, META_BLOCK_SIZE))

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def error(self, blocknr, problem, what):
        """An error at a block: what it was read as (say "btree node of the
        era array") and where, so that it can be found with a hex dump."""
        return MetadataError("metadata block %d (%s, byte offset %d): %s"
                             % (blocknr, what, blocknr * META_BLOCK_SIZE, problem))

    def read_raw(self, blocknr, what):
        """One block's bytes, unchecked; refuses blocks outside the device."""
        if self.space_map_blocks is not None and blocknr >= self.space_map_blocks:
            raise self.error(blocknr, "outside the metadata space map (%d blocks)"
                             % self.space_map_blocks, what)
        if blocknr >= self.device_blocks:
            known = ""
            if self.space_map_blocks is not None:
                known = ", though its space map has %d: a truncated copy?" \
                    % self.space_map_blocks
            raise self.error(blocknr, "past the end of %s (%d blocks%s)"
                             % (self.path, self.device_blocks, known), what)
        try:
            data = bytes(self.file.read(blocknr * META_BLOCK_SIZE, META_BLOCK_SIZE, self.buffer))
        except ShortRead as exc:
            raise self.error(blocknr, "short read (%d bytes): %s changed size?"
                             % (exc.got, self.path), what) from None
        except DeviceError as exc:
            raise self.error(blocknr, "read error: %s" % exc.strerror, what) from None
        return data

    def read(self, blocknr, seed, what):
        """A block checked as the kernel checks it: once, checksum, location."""
        if blocknr in self.visited:
            raise self.error(blocknr, "reached a second time (first as %s): the "
                             "metadata has a cycle or a shared block"
                             % self.visited[blocknr], what)
        self.visited[blocknr] = what
        data = self.read_raw(blocknr, what)
        self.check_checksum(blocknr, data, seed, what)
        location = struct.unpack_from("<Q", data, 16 if seed == ARRAY_CSUM_XOR else 8)[0]
        if location != blocknr:
            raise self.error(blocknr, "written for block %d: misplaced" % location, what)
        return data

    def check_checksum(self, blocknr, data, seed, what):
        stored = CSUM.unpack_from(data)[0]
        unseeded = block_checksum(data, 0)
        if stored != unseeded ^ seed:
            actual = BLOCK_KINDS.get(stored ^ unseeded)
            if actual is not None:
                problem = "bad checksum: it is %s, not %s" % (actual, BLOCK_KINDS[seed])
            elif not any(data):
                problem = "all zeroes, not %s" % BLOCK_KINDS[seed]
            else:
                problem = "bad checksum"
            raise self.error(blocknr, problem, what)


# ---------------------------------------------------------------------------
# dm-era metadata: the superblock
# ---------------------------------------------------------------------------


class Superblock:
    """The fields of a dm-era superblock that a reader needs."""

    def __init__(self, location, fields):
        (_csum, self.flags, _blocknr, _uuid, self.magic, self.version, sm_root,
         self.data_block_size, self.metadata_block_size, self.nr_blocks,
         self.current_era, self.current_writeset_bits, self.current_writeset_root,
         self.writeset_tree_root, self.era_array_root,
         self.metadata_snap) = fields
        self.location = location
        self.space_map_blocks, self.space_map_allocated = SPACE_MAP_ROOT.unpack_from(sm_root)


def _read_superblock(reader, location, what):
    """Read and check a superblock; magic first, so a wrong device says so."""
    data = reader.read_raw(location, what)
    if not any(data):
        raise reader.error(location, "all zeroes: no dm-era metadata here "
                           "(never used, or wiped)", what)
    sb = Superblock(location, SUPERBLOCK.unpack_from(data))
    if sb.magic != SUPERBLOCK_MAGIC:
        raise reader.error(location, "not dm-era metadata: magic %d, expected %d"
                           % (sb.magic, SUPERBLOCK_MAGIC), what)
    reader.read(location, SUPERBLOCK_CSUM_XOR, what)     # checksum, location
    if sb.version != ERA_METADATA_VERSION:
        raise reader.error(location, "metadata version %d; only version %d is known"
                           % (sb.version, ERA_METADATA_VERSION), what)
    if sb.metadata_block_size != META_BLOCK_SECTORS:
        raise reader.error(location, "metadata block size %d sectors, expected %d"
                           % (sb.metadata_block_size, META_BLOCK_SECTORS), what)
    if sb.data_block_size == 0 or sb.data_block_size % MIN_DATA_BLOCK_SECTORS:
        raise reader.error(location, "data block size %d sectors is not a positive "
                           "multiple of %d" % (sb.data_block_size, MIN_DATA_BLOCK_SECTORS),
                           what)
    if sb.nr_blocks >= MAX_NR_BLOCKS:
        raise reader.error(location, "%d data blocks: more than dm-era allows"
                           % sb.nr_blocks, what)
    if sb.space_map_blocks == 0 or sb.space_map_allocated > sb.space_map_blocks:
        raise reader.error(location, "space map root is damaged (%d of %d blocks "
                           "allocated)" % (sb.space_map_allocated, sb.space_map_blocks),
                           what)
    return sb


# ---------------------------------------------------------------------------
# dm-era metadata: btrees and arrays
# ---------------------------------------------------------------------------


def _le_array(typecode, data):
    """Little-endian integers (U32 or U64) of the metadata as an array."""
    values = array.array(typecode, bytes(data))
    if BIG_ENDIAN_HOST:
        values.byteswap()
    return values


def _check_node(reader, blocknr, data, leaf_value_size, what):
    """Check a btree node's header; return (flags, keys, values offset, value size)."""
    (_csum, flags, _blocknr, nr_entries, max_entries, value_size,
     _padding) = NODE_HEADER.unpack_from(data)
    if flags == NODE_INTERNAL:
        want = CHILD_POINTER.size
    elif flags == NODE_LEAF:
        want = leaf_value_size
    else:
        raise reader.error(blocknr, "node flags %d: neither internal (1) nor leaf (2)"
                           % flags, what)
    if value_size != want:
        raise reader.error(blocknr, "%s node has %d-byte values, expected %d"
                           % ("internal" if flags == NODE_INTERNAL else "leaf",
                              value_size, want), what)
    if max_entries == 0 or \
            NODE_HEADER.size + max_entries * (8 + value_size) > META_BLOCK_SIZE:
        raise reader.error(blocknr, "max_entries %d does not fit %d-byte values in a "
                           "block" % (max_entries, value_size), what)
    if nr_entries > max_entries:
        raise reader.error(blocknr, "%d entries, more than max_entries %d"
                           % (nr_entries, max_entries), what)
    if flags == NODE_INTERNAL and nr_entries == 0:
        raise reader.error(blocknr, "internal node with no entries", what)
    keys = _le_array(U64, memoryview(data)[NODE_HEADER.size:NODE_HEADER.size + 8 * nr_entries])
    return flags, keys, NODE_HEADER.size + 8 * max_entries, value_size


def _btree_entries(reader, root, value_size, what):
    """Yield (key, value bytes, leaf block) of a one-level btree, in key order.

    Walked depth first with an explicit stack.  Every key must lie in the
    range its parent gave it, [key i, key i + 1), which with increasing keys
    in each node makes the keys strictly increasing overall; every leaf
    must be at the same depth.
    """
    node_what = "btree node of " + what
    stack = [(root, 0, 0, 1 << 64)]
    leaf_depth = None
    while stack:
        blocknr, depth, low, high = stack.pop()
        if depth >= MAX_BTREE_DEPTH:
            raise reader.error(blocknr, "btree deeper than %d levels" % MAX_BTREE_DEPTH,
                               node_what)
        data = reader.read(blocknr, BTREE_CSUM_XOR, node_what)
        flags, keys, values_at, size = _check_node(reader, blocknr, data, value_size,
                                                   node_what)
        previous = low - 1
        for index, key in enumerate(keys):
            if key <= previous or key >= high:
                raise reader.error(blocknr, "key %d at index %d is out of order "
                                   "(must be above %d and below %d)"
                                   % (key, index, previous, high), node_what)
            previous = key
        if flags == NODE_INTERNAL:
            children = _le_array(U64, memoryview(data)[values_at:values_at + 8 * len(keys)])
            limits = list(keys[1:]) + [high]
            for index in range(len(keys) - 1, -1, -1):
                stack.append((children[index], depth + 1, keys[index], limits[index]))
            continue
        if leaf_depth is None:
            leaf_depth = depth
        elif depth != leaf_depth:
            raise reader.error(blocknr, "leaf at depth %d, others at depth %d"
                               % (depth, leaf_depth), node_what)
        view = memoryview(data)
        for index, key in enumerate(keys):
            start = values_at + index * size
            yield key, view[start:start + size], blocknr


def _array_blocks(reader, root, value_size, length, what):
    """Yield (first index, values, block number) of each block of a dm_array.

    The kernel fills every array block but the last to
    (4096 - 24) // value_size entries, and keys them 0, 1, 2, ...
    """
    per_block = (META_BLOCK_SIZE - ARRAY_HEADER.size) // value_size
    nr_array_blocks = -(-length // per_block)
    array_what = "array block of " + what
    expected = 0
    for key, value, leaf in _btree_entries(reader, root, CHILD_POINTER.size, what):
        if key != expected:
            raise reader.error(leaf, "array block %d is missing (next key is %d)"
                               % (expected, key), "btree node of " + what)
        if key >= nr_array_blocks:
            raise reader.error(leaf, "more array blocks than %d entries need (%d)"
                               % (length, nr_array_blocks), "btree node of " + what)
        blocknr = CHILD_POINTER.unpack(value)[0]
        data = reader.read(blocknr, ARRAY_CSUM_XOR, array_what)
        _csum, max_entries, nr_entries, size, _blocknr = ARRAY_HEADER.unpack_from(data)
        if size != value_size:
            raise reader.error(blocknr, "%d-byte values, expected %d" % (size, value_size),
                               array_what)
        if max_entries != per_block:
            raise reader.error(blocknr, "max_entries %d, expected %d"
                               % (max_entries, per_block), array_what)
        want = per_block if key + 1 < nr_array_blocks else length - key * per_block
        if nr_entries != want:
            raise reader.error(blocknr, "%d entries, expected %d (array block %d of %d, "
                               "%d entries in all)" % (nr_entries, want, key,
                                                       nr_array_blocks, length),
                               array_what)
        start = ARRAY_HEADER.size
        yield key * per_block, memoryview(data)[start:start + nr_entries * size], blocknr
        expected += 1
    if expected != nr_array_blocks:
        raise reader.error(root, "%d array blocks, expected %d for %d entries"
                           % (expected, nr_array_blocks, length), "btree root of " + what)


# ---------------------------------------------------------------------------
# dm-era metadata: writesets and the era array
# ---------------------------------------------------------------------------


def _writesets(reader, sb):
    """Yield (era, nr_bits, root) of each archived writeset."""
    what = "the writeset tree"
    for era, value, leaf in _btree_entries(reader, sb.writeset_tree_root,
                                           WRITESET_VALUE.size, what):
        if era > sb.current_era:
            raise reader.error(leaf, "writeset of era %d is newer than the current era %d"
                               % (era, sb.current_era), "btree node of " + what)
        nr_bits, root = WRITESET_VALUE.unpack(value)
        yield era, nr_bits, root


def _bitset_bits(reader, root, nr_bits, nr_blocks, what):
    """A bitset as one int, bit i = block i, cut to the first nr_blocks bits.

    A writeset from before the device shrank has more bits than blocks;
    those blocks no longer exist (era_invalidate 0.9 lists them anyway,
    the Rust rewrite drops them).
    """
    words = -(-nr_bits // BITS_PER_WORD)
    pieces = [values for _, values, _ in
              _array_blocks(reader, root, BITSET_WORD_SIZE, words, what)]
    # le64 words, least significant bit first: the bytes in order are one
    # little-endian integer whose bit i is bit i of the bitset.
    bits = int.from_bytes(b"".join(pieces), "little")
    limit = min(nr_bits, nr_blocks)
    if bits.bit_length() > limit:
        bits &= (1 << limit) - 1
    return bits


def _era_array_runs(reader, sb, since_era, runs):
    """Add the runs of blocks whose era array entry is since_era or later."""
    what = "the era array"
    for first, values, blocknr in _array_blocks(reader, sb.era_array_root, ERA_SIZE,
                                                sb.nr_blocks, what):
        eras = _le_array(U32, values)
        newest = max(eras)
        if newest > sb.current_era:
            raise reader.error(blocknr, "data block %d has era %d, newer than the "
                               "current era %d" % (first + eras.index(newest), newest,
                                                   sb.current_era), "array block of " + what)
        if newest < since_era:
            continue               # the usual case: nothing here changed
        if min(eras) >= since_era:
            runs.add(first, first + len(eras))
            continue
        start = -1
        for index, era in enumerate(eras):
            if era >= since_era:
                if start < 0:
                    start = index
            elif start >= 0:
                runs.add(first + start, first + index)
                start = -1
        if start >= 0:
            runs.add(first + start, first + len(eras))


# bit positions set in each byte value
_BYTE_BITS = tuple(tuple(bit for bit in range(8) if value >> bit & 1)
                   for value in range(256))
_NONZERO_BYTES = re.compile(b"[^\x00]+")


def _set_bit_positions(bits):
    """Yield the positions of the set bits of a non-negative int, in order."""
    data = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
    for match in _NONZERO_BYTES.finditer(data):
        position = match.start() * 8
        for value in match.group():
            for bit in _BYTE_BITS[value]:
                yield position + bit
            position += 8


def _bit_runs(bits):
    """[begin, end) runs of set bits of an int, as two arrays."""
    begins = array.array(BLOCK_TYPECODE, _set_bit_positions(bits & ~(bits << 1)))
    ends = array.array(BLOCK_TYPECODE, _set_bit_positions((bits << 1) & ~bits))
    return begins, ends


def _union_runs(first, second):
    """Merge two sorted run lists (each a (begins, ends) pair) into a RangeList."""
    runs = RangeList()
    (begins1, ends1), (begins2, ends2) = first, second
    i = j = 0
    while i < len(begins1) or j < len(begins2):
        if j == len(begins2) or (i < len(begins1) and begins1[i] <= begins2[j]):
            runs.add(begins1[i], ends1[i])
            i += 1
        else:
            runs.add(begins2[j], ends2[j])
            j += 1
    return runs


# ---------------------------------------------------------------------------
# dm-era metadata: the changed-block list
# ---------------------------------------------------------------------------


class ChangedBlocks(RangeList):
    """Blocks written since an era, with what the superblock says of the device.

    block_size is in 512-byte sectors.  current_era comes from the
    superblock whose roots were read: with a snapshot, the era that began
    when it was taken, which is the since_era of the next backup.
    snapshot_block is the snapshot superblock's location, or 0 (live).
    """

    def __init__(self, sb, snapshot_block, runs):
        RangeList.__init__(self)
        self.block_size = sb.data_block_size
        self.nr_blocks = sb.nr_blocks
        self.current_era = sb.current_era
        self.snapshot_block = snapshot_block
        self.begins = runs.begins
        self.ends = runs.ends


def read_changed_blocks(path, since_era, snapshot=True, direct=None):
    """The blocks of a dm-era device written in era since_era or later.

    snapshot=True reads the roots of the metadata snapshot (take_metadata_snap):
    the only consistent view of an active target.  snapshot=False reads
    the live superblock, and also its current writeset (the blocks written
    in the current era, which era_invalidate leaves out): use it only on a
    suspended or removed target, or on a copy of its metadata.

    direct: read with O_DIRECT (default: for block devices).
    Raises MetadataError; ValueError for a since_era that is not an era.
    """
    if not isinstance(since_era, int) or not 0 <= since_era <= MAX_ERA:
        raise ValueError("since_era must be an era, 0 to %d" % MAX_ERA)
    with _MetadataReader(path, direct) as reader:
        live = _read_superblock(reader, SUPERBLOCK_LOCATION, "superblock")
        reader.space_map_blocks = live.space_map_blocks
        if snapshot:
            if live.metadata_snap == SUPERBLOCK_LOCATION:
                raise MetadataError(NO_SNAPSHOT_MESSAGE)
            # Only the two roots of the copy are promised to be kept; its
            # other fields are a plain copy of the superblock at the time.
            sb = _read_superblock(reader, live.metadata_snap,
                                  "metadata snapshot superblock")
            if sb.data_block_size != live.data_block_size:
                raise reader.error(sb.location, "data block size %d sectors, but %d in "
                                   "the superblock" % (sb.data_block_size,
                                                       live.data_block_size),
                                   "metadata snapshot superblock")
        else:
            sb = live
        bits = 0
        for era, nr_bits, root in _writesets(reader, sb):
            if era >= since_era:
                bits |= _bitset_bits(reader, root, nr_bits, sb.nr_blocks,
                                     "the writeset of era %d" % era)
        if not snapshot and sb.current_writeset_root != INVALID_WRITESET_ROOT \
                and sb.current_era >= since_era:
            bits |= _bitset_bits(reader, sb.current_writeset_root,
                                 sb.current_writeset_bits, sb.nr_blocks,
                                 "the current writeset (era %d)" % sb.current_era)
        era_runs = RangeList()
        _era_array_runs(reader, sb, since_era, era_runs)
    runs = _union_runs((era_runs.begins, era_runs.ends), _bit_runs(bits))
    return ChangedBlocks(sb, sb.location if snapshot else 0, runs)


def dm_name(path):
    """The device-mapper name of the block device at path, or None (a file, a disk)."""
    try:
        info = os.stat(path)
        if not stat.S_ISBLK(info.st_mode):
            return None
        with open("/sys/dev/block/%d:%d/dm/name" % (os.major(info.st_rdev),
                                                     os.minor(info.st_rdev))) as f:
            return f.read().strip() or None
    except (OSError, UnicodeError):
        return None


def dmsetup(*words):
    """Run dmsetup with these arguments; its output.  The one place that runs it."""
    import subprocess
    try:
        result = subprocess.run(("dmsetup",) + words, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise EraError("cannot run dmsetup %s (%s)" % (" ".join(words[:1]),
                                                       exc.strerror or exc)) from None
    if result.returncode:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise EraError("dmsetup %s failed: %s" % (shown(" ".join(words)), shown(
            lines[-1] if lines else "exit status %d" % result.returncode)))
    return result.stdout.decode("utf-8", "replace")


def dm_message(name, message):
    """Send a message to a device-mapper target (dmsetup message NAME 0 MESSAGE)."""
    dmsetup("message", name, "0", message)


def kernel_problem(release):
    """Why dm-era on the kernel `release` (uname -r) is not to be trusted, or None."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None or (int(match.group(1)), int(match.group(2))) >= MIN_KERNEL:
        return None
    return ("the running kernel %s is older than %d.%d: its dm-era can lose tracked writes "
            "after a crash, and an incremental would then miss them; run %d.%d or later, or, "
            "for a kernel that carries the 2021 dm-era fixes (they were sent to the stable "
            "kernels), ALLOW_OLD_KERNEL=1 in the environment (or --force)"
            % ((shown(release),) + MIN_KERNEL + MIN_KERNEL))


def era_targets_on(metadata):
    """The names of the era devices whose metadata device is `metadata` (none for a file)."""
    try:
        info = os.stat(metadata)
    except OSError:
        return []                 # read_changed_blocks says what is wrong with it
    if not stat.S_ISBLK(info.st_mode):
        return []
    device = "%d:%d" % (os.major(info.st_rdev), os.minor(info.st_rdev))
    names = []
    for line in dmsetup("table", "--target", "era").splitlines():
        name, _, table = line.partition(": ")
        fields = table.split()
        if len(fields) >= 6 and fields[2] == "era" and fields[3] == device:
            names.append(name)
    return names


def era_status(name):
    """(used, total, era) of the era device `name`, from dmsetup status: its metadata's
    4 KiB blocks, and the era new writes land in."""
    fields = dmsetup("status", name).split()
    match = re.match(r"\A([0-9]+)/([0-9]+)\Z", fields[4]) if len(fields) >= 6 else None
    if match is None or fields[2] != "era" or not int(match.group(2)) or \
            not fields[5].isdigit() or not _isascii(fields[5]):
        raise EraError("dmsetup status %s is not an era target's: %s"
                       % (shown(name), shown(" ".join(fields)[:80])))
    return int(match.group(1)), int(match.group(2)), int(fields[5])


def guard_era_host(metadata, force):
    """copy --metadata and blocks: refuse what would make a wrong list (--force: warn).

    A kernel before 5.12 (its dm-era loses tracked writes after a crash; with
    ALLOW_OLD_KERNEL=1 in the environment, the operator's word that this one
    carries the fixes, nothing is said), and an era device whose metadata is
    over METADATA_REFUSE full: when it fills, the kernel fails the writes to
    the data device, and a pass (its snapshot) takes more.  Over METADATA_WARN,
    a warning.
    """
    problems = []
    problem = kernel_problem(os.uname().release)
    if problem is not None and os.environ.get("ALLOW_OLD_KERNEL") != "1":
        problems.append(problem)
    try:
        names = era_targets_on(metadata)
    except EraError as exc:
        # A rescue host without device-mapper, or without dmsetup, reading a metadata
        # partition: the list can still be read; only its fill goes unchecked.
        warn("cannot see which era device uses %s, so its fill is not checked: %s"
             % (shown(metadata), exc))
        names = []
    for name in names:
        used, total, _ = era_status(name)
        percent = used * 100 // total
        if used * 100 <= METADATA_WARN * total:
            continue
        text = ("the metadata of the era device %s is %d%% full (%d of %d blocks): when it "
                "fills, the kernel fails the writes to the data device; a metadata snapshot "
                "held by a tool that died pins blocks (dmsetup message %s 0 "
                "drop_metadata_snap), else give it a larger metadata device"
                % (shown(name), percent, used, total, shown(name)))
        if used * 100 > METADATA_REFUSE * total:
            problems.append(text + ("; --force to copy anyway" if not force else ""))
        else:
            warn(text)
    for problem in problems:
        if not force:
            raise EraError(problem)
        warn(problem + " (--force: going on)")


def take_metadata_snapshot(name):
    """A fresh metadata snapshot of the era device `name`, in place of any held one."""
    try:
        dm_message(name, "drop_metadata_snap")
    except EraError:
        pass                      # none was held
    dm_message(name, "take_metadata_snap")


def iter_blocks_xml(ranges):
    """Yield the lines of era_invalidate's (thin-provisioning-tools 0.9) output."""
    yield "<blocks>\n"
    for begin, end in ranges:
        if end - begin == 1:
            yield '  <block block="%d"/>\n' % begin
        else:
            yield '  <range begin="%d" end = "%d"/>\n' % (begin, end)
    yield "</blocks>\n"


# ---------------------------------------------------------------------------
# Devices and files
# ---------------------------------------------------------------------------


def aligned_buffer(size):
    """A zeroed, page-aligned buffer that O_DIRECT reads accept."""
    size = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    return mmap.mmap(-1, size)


def widen_pipe(fd):
    """Let a pipe hold 1 MiB instead of 64 KiB: four syscalls per chunk, not sixty-four."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            import fcntl
            # F_SETPIPE_SZ is Linux's 1031; the fcntl module names it from Python 3.10 on.
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (OSError, ImportError):
        pass                      # a smaller pipe is only slower


def _os_error(exc, what):
    error = DeviceError("%s: %s" % (what, exc.strerror or exc))
    error.strerror = exc.strerror
    return error


def open_device(path, flags, what="", mode=FILE_MODE):
    """Open a regular file or block device and return (fd, stat); refuse anything else.

    O_NONBLOCK at open: a FIFO opened for reading would wait for a writer
    forever (it is cleared again; it means nothing to files and disks).
    `what` names the path in the message (e.g. "state file ").
    """
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise DeviceError("%s%s is not a regular file or block device" % (what, path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def create_private(path, flags=os.O_WRONLY, mode=FILE_MODE):
    """Create a new file, never through a symlink or over an existing name."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                   | getattr(os, "O_CLOEXEC", 0), mode)


def create_temporary(path, mode=FILE_MODE):
    """A new file beside `path` under a random name: (fd, its path).

    A predictable name (path.tmpPID) lets anyone who can write the directory
    plant a symlink there and have root overwrite its target.
    """
    while True:
        temp = "%s.tmp-%s" % (path, os.urandom(6).hex())
        try:
            return create_private(temp, mode=mode), temp
        except FileExistsError:
            continue


def sync_directory(path):
    """Make a rename or unlink in path's directory durable."""
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_all(fd, data):
    """Write all of `data` to a descriptor at its current position (a pipe, a new file)."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def _identity(path, std_fd):
    """What a path names, to tell two apart; None where it cannot be a file's name.

    A block device by its device number (two nodes of one disk are one disk),
    a file by device and inode (a hard link or symlink is the same file), a
    name not yet created by its resolved path; `path` None or "-" is the
    standard descriptor std_fd.  Pipes and terminals are never the same as a
    file, and /dev/null may be both input and output.
    """
    try:
        if path is None or path == "-":
            info = os.fstat(std_fd)
        else:
            info = os.stat(path)
    except FileNotFoundError:
        return ("new", os.path.realpath(path))
    except OSError:
        return None
    if stat.S_ISBLK(info.st_mode):
        return ("block device", info.st_rdev)
    if stat.S_ISREG(info.st_mode):
        return ("file", info.st_dev, info.st_ino)
    return None


def refuse_same_files(inputs, outputs):
    """Refuse an output that is also an input, or another output.

    inputs and outputs are (label, path) pairs; a path None or "-" is standard
    input (in inputs) or standard output (in outputs).  Seen: --state equal
    to the mirror replaced the mirror with JSON; copy -o equal to DEVICE
    truncated the source.
    """
    seen = [(label, _identity(path, 0)) for label, path in inputs]
    for label, path in outputs:
        identity = _identity(path, 1)
        if identity is None:
            continue
        for other, known in seen:
            if known == identity:
                raise EraError("%s and %s are the same file: an output must never be an "
                               "input or another output" % (shown(label), shown(other)))
        seen.append((label, identity))


# An O_DIRECT read needs the caller's aligned memory: os.preadv (3.7+).  Python
# 3.6 reads into a bytes object of its own, which O_DIRECT refuses, so there a
# BlockFile reads through its ordinary descriptor (and still writes O_DIRECT).
DIRECT_READS = hasattr(os, "preadv")


def _pread_into(fd, view, offset):
    """Read into `view` at `offset`; return the count (short only at the end)."""
    if DIRECT_READS:
        return os.preadv(fd, [view], offset)  # novermin: only where it exists
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


class BlockFile:
    """A regular file or block device read and written by offset: the one place
    that opens O_DIRECT, and the one place with read-exact and write-all loops.

    direct: besides the ordinary descriptor, open a second one with O_DIRECT
    (never a copy through the page cache) and use it for every read or write
    whose offset and length are multiples of DIRECT_ALIGN, from memory that
    aligned_buffer() made.  One fallback rule for all: where O_DIRECT is
    refused with EINVAL, at open or at any read or write (tmpfs, some FUSE and
    network filesystems), the ordinary descriptor does everything from then
    on; `warn`, if given, is told once, and with `stale` the page cache is
    dropped first, because it can hold data older than the disk (a block
    device written below its cache by a mounted filesystem or by dm-era).
    Without os.preadv (Python 3.6) reads take the ordinary descriptor, the
    cache dropped at open where it may be stale; writes stay O_DIRECT.
    """

    def __init__(self, path, flags=os.O_RDONLY, what="", direct=False, stale=False,
                 warn=None, fd=None, nofollow=False):
        self.path = path
        self.warn = warn
        self.stale = stale
        self.direct_fd = None
        self._refused = []            # O_DIRECT descriptors given up: closed at close()
        self._switch = threading.Lock()
        if fd is None:
            fd, info = open_device(path, flags, what)
        else:
            info = os.fstat(fd)
        self.fd = fd
        self.info = info
        self.is_block = stat.S_ISBLK(info.st_mode)
        try:
            if direct:
                self._open_direct(flags, nofollow)
            if stale and (not direct or self.direct_fd is not None and not DIRECT_READS):
                self._drop_cache()    # reads go through the cache: nothing old in it
        except BaseException:
            os.close(fd)
            raise

    def _open_direct(self, flags, nofollow):
        # Opened again by name, never with O_CREAT or O_EXCL (the first open made
        # or claimed the file).
        access = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
        if not hasattr(os, "O_DIRECT"):
            self.warn = None          # not this system's way: nothing to tell
            self._give_up_direct(None)
            return
        try:
            fd = os.open(self.path, access | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0)
                         | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
        except OSError:               # EINVAL: tmpfs, some FUSE and network filesystems
            self._give_up_direct(None)
            return
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino, again.st_rdev) != \
                (self.info.st_dev, self.info.st_ino, self.info.st_rdev):
            os.close(fd)              # the name was replaced between the two opens
            self._give_up_direct(None)
            return
        self.direct_fd = fd

    def _give_up_direct(self, fd):
        """O_DIRECT refused: the ordinary descriptor from now on (two threads may get here)."""
        with self._switch:
            if fd is not None and fd != self.direct_fd:
                return                # the other thread was first
            if self.direct_fd is not None:
                # Not closed yet: another thread may be in a read with it.
                self._refused.append(self.direct_fd)
                self.direct_fd = None
            if self.warn is not None:
                self.warn("%s does not accept O_DIRECT; %s through the page cache%s"
                          % (self.path, "reading" if self.stale else "going",
                             ", dropped first" if self.stale else ""))
                self.warn = None
            if self.stale:
                self._drop_cache()

    def _drop_cache(self):
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def size(self):
        """Bytes in the file or on the device now."""
        if self.is_block:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def _direct_for(self, offset, length):
        fd = self.direct_fd
        return fd if fd is not None and not (offset | length) % DIRECT_ALIGN else None

    def read(self, offset, length, buffer):
        """Read exactly `length` bytes at `offset` into `buffer`; return a view of them.

        With O_DIRECT, a length that is not a multiple of DIRECT_ALIGN is read
        rounded up when `buffer` has room (the device ends within that block:
        the read comes back short there), so the tail too bypasses the cache.
        Raises ShortRead (a DeviceError) when the file ends first.
        """
        view = memoryview(buffer)
        want = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
        fd = None
        if DIRECT_READS:
            fd = self._direct_for(offset, want if want <= len(view) else length)
        if fd is None:
            fd, want = self.fd, length
        done = 0
        while done < length:
            try:
                got = _pread_into(fd, view[done:want], offset + done)
            except OSError as exc:
                if fd != self.fd and exc.errno == errno.EINVAL:
                    self._give_up_direct(fd)
                    fd, want = self.fd, length
                    continue
                raise _os_error(exc, "read error at offset %d of %s"
                                % (offset + done, self.path)) from None
            if got == 0:
                break
            done += got
            if fd != self.fd and done % DIRECT_ALIGN:
                break                 # a short direct read happens only at the end
        if done < length:
            raise ShortRead("%s ended at offset %d, expected %d bytes: did the device shrink?"
                            % (self.path, offset + done, offset + length), done)
        return view[:length]

    def write(self, offset, data):
        """Write all of `data` at `offset`; return the bytes written (len(data)).

        A DeviceError raised says in `written` how much of `data` was written before.
        """
        view = memoryview(data).cast("B")
        fd = self._direct_for(offset, len(view))
        if fd is None:
            fd = self.fd
        total = len(view)
        while len(view):
            try:
                done = os.pwrite(fd, view, offset)
            except OSError as exc:
                if fd != self.fd and exc.errno == errno.EINVAL:
                    self._give_up_direct(fd)
                    fd = self.fd
                    continue
                error = _os_error(exc, "write error at offset %d of %s" % (offset, self.path))
                error.written = total - len(view)
                raise error from None
            view = view[done:]
            offset += done
        return total

    def sync(self):
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _os_error(exc, "cannot sync %s" % self.path) from None

    def close(self):
        for fd in self._refused + [self.direct_fd, self.fd]:
            if fd is not None:
                os.close(fd)
        self._refused, self.direct_fd, self.fd = [], None, None


class Source:
    """The device copy reads, with O_DIRECT.

    The block device's page cache can hold data older than what a mounted
    filesystem wrote through it, so cached reads may copy stale blocks.
    Where O_DIRECT is refused (tmpfs), the cache is dropped and read instead.
    """

    def __init__(self, path, warn):
        self.path = path
        try:
            self.file = BlockFile(path, os.O_RDONLY, direct=True, stale=True, warn=warn)
            self.size = self.file.size()
        except OSError as exc:
            raise _os_error(exc, "cannot open %s" % path) from None

    def read(self, offset, length, buffer):
        """Exactly `length` bytes at `offset`, into an aligned buffer; return a view."""
        return self.file.read(offset, length, buffer)

    def close(self):
        self.file.close()


def loop_devices_over(info):
    """The loop devices whose backing file is the file of `info` (an os.stat result).

    The flock on a mirror file and the O_EXCL of a loop device over it know
    nothing of each other: two applies could write the same blocks at once.
    """
    found = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open("/sys/block/%s/loop/backing_file" % name) as f:
                other = os.stat(f.read().rstrip("\n"))
        except OSError:
            continue                  # not attached, or its file is gone
        if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
            found.append("/dev/" + name)
    return found


class Destination:
    """The mirror: a regular file (created, grown) or a block device (O_EXCL).

    Chunks whose offset and length are whole pages go through O_DIRECT: no
    copy into the page cache (slow on a busy host) and nothing left to flush
    at fsync.
    """

    def __init__(self, path, create=True, readable=False):
        self.path = path
        try:
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                if not create:
                    raise
                mode = None
            self.created = mode is None
            self.is_block = mode is not None and stat.S_ISBLK(mode)
            if mode is not None and not (self.is_block or stat.S_ISREG(mode)):
                raise DeviceError("%s is not a regular file or block device" % path)
            flags = os.O_RDWR if readable else os.O_WRONLY
            if self.is_block:
                # O_EXCL on a block device: refuse one that is mounted or in use.
                flags |= os.O_EXCL
            elif create:
                flags |= os.O_CREAT
            self.file = BlockFile(path, flags, direct=True)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceError("%s is busy (mounted or in use); refusing to write to it"
                                  % path) from None
            raise _os_error(exc, "cannot open %s" % path) from None
        self.fd = self.file.fd
        self.is_block = self.file.is_block
        try:
            self.size = self.file.size()
            if not self.is_block:
                loops = loop_devices_over(self.file.info)
                if loops:
                    raise DeviceError(
                        "%s is the backing file of %s: writing under a loop device (mounted, "
                        "perhaps) corrupts what it shows; detach it (losetup -d) or write to "
                        "%s instead" % (path, ", ".join(loops), loops[0]))
            self._lock()
        except BaseException:
            self.file.close()
            raise
        self.initial_size = self.size
        self.written = 0          # bytes written so far, for messages
        self.zeros = None         # an aligned buffer of zeros, made when first needed

    def _lock(self):
        """One writer per mirror: two applies at once left era 3 recorded over era 2 data.

        flock, not a lock file: it goes with the descriptor, so a killed
        process never leaves a stale lock behind.
        """
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError("%s is in use by another era_tool (apply, rollback, verify, export "
                              "or serve); one at a time" % self.path) from None

    def remove_if_created(self):
        """A refused apply leaves no mirror file that was not there before."""
        if self.created:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def restore_size(self, keep=0):
        """Undo a failed apply's growth: the file is as large as it was (or, to keep
        what its state records as applied, as `keep` bytes, if larger).

        A cut stream whose header claimed a larger device grew a 1 MiB mirror
        to 1 TiB, and the correct stream was then refused as too small.
        """
        if self.is_block:
            return
        size = max(self.initial_size, keep)
        try:
            # Growing to `keep` is right too: zero chunks past the old end were skipped.
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
                self.size = size
        except OSError:
            pass                      # the message says the file is partially updated

    def resize(self, size):
        """Grow a mirror file to the source size, or shrink it back (undo)."""
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _os_error(exc, "cannot %s %s to %d bytes"
                            % ("grow" if size > self.size else "shrink", self.path,
                               size)) from None
        self.size = size

    def check_span(self, offset, length):
        if self.is_block and offset + length > self.size:
            raise DeviceError("record at offset %d (%d bytes) is past the end of %s "
                              "(%d bytes)" % (offset, length, self.path, self.size))

    def read(self, offset, length, buffer):
        """The current content of a region (for the undo file), read into aligned `buffer`."""
        try:
            return self.file.read(offset, length, buffer)
        except ShortRead as exc:
            raise DeviceError("%s ended at offset %d while saving its old content"
                              % (self.path, offset + exc.got)) from None

    def put(self, offset, length, payload=None):
        """Write one chunk: `payload` (a view of aligned memory), or zeros when None.

        Every write to a mirror goes through here.
        """
        if payload is None:
            self._put_zeros(offset, length)
        else:
            self._write(offset, payload)

    def _write(self, offset, data):
        try:
            self.written += self.file.write(offset, data)
        except DeviceError as exc:
            self.written += exc.written     # said in the message
            raise

    def _put_zeros(self, offset, length):
        # A file grown by this apply already reads as zeros there.
        if not self.is_block and offset >= self.initial_size:
            return
        for start, stop in self._data_in(offset, offset + length):
            while start < stop:
                piece = min(stop - start, CHUNK_SIZE)
                if self.zeros is None or len(self.zeros) < piece:
                    self.zeros = memoryview(aligned_buffer(CHUNK_SIZE))
                self._write(start, self.zeros[:piece])
                start += piece

    def _data_in(self, start, stop):
        """The parts of [start, stop) of a file that are not holes (a hole reads as zeros).

        Writing zeros into a hole allocates it: a rollback onto a full disk failed
        on its first zero chunk, restoring nothing, and an apply filled a sparse
        mirror's holes.
        """
        if self.is_block or not hasattr(os, "SEEK_DATA"):
            yield start, stop
            return
        while start < stop:
            try:
                data = os.lseek(self.fd, start, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return                # nothing but a hole up to the end of the file
                yield start, stop         # no SEEK_DATA here: write it all
                return
            if data >= stop:
                return
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError:
                hole = stop
            yield data, min(hole, stop)
            start = hole

    def sync(self):
        """Make everything written durable: exit 0 promises it."""
        self.file.sync()

    def close(self):
        self.file.close()


class Output:
    """Where a stream goes: a file descriptor written with full writes.

    A stream file (-o) is written under a temporary name beside it and renamed
    at the end, once synced: an existing file is never half overwritten, and
    a failed copy removes only what it created.  A path that is not a regular
    file (a FIFO, /dev/null, a tape) is written in place and never removed.

    exclusive: create a new file under its own name (the undo file: it must
    never overwrite one that may be the only way back).

    direct: a file this creates is written with O_DIRECT, through an aligned
    staging buffer, for the undo file, which is synced every UNDO_BATCH bytes:
    no copy into the page cache, and little left to flush at each sync
    (measured: apply --undo in 0.6 to 0.75 of the time). A stream file is not:
    written once and synced once at the end, the page cache lets its writing
    wait until the reading is done, and a disk that both reads and writes at
    once is slower (measured: copy -o 13% slower with O_DIRECT). The last,
    partial block of a sync goes through the page cache and stays staged: once
    full, it is written again, whole and with O_DIRECT; the bytes already
    there are the same, so a crash at any moment leaves what was synced
    intact.
    """

    def __init__(self, path, exclusive=False, label=None, direct=False):
        self.path = path              # the name being written
        self.final = None             # the name it gets at finish(), if not path
        self.file = None              # a BlockFile for a file this creates
        self.staged = None            # the aligned staging buffer, or None: plain writes
        self.created = False          # a regular file this made: synced, removed on failure
        self.syncable = False
        if path is None or path == "-":
            if sys.stdout is None:
                raise EraError("standard output is closed; use -o FILE")
            self.fd = sys.stdout.fileno()
            self.name = "standard output"
            widen_pipe(self.fd)
        else:
            self.name = path if label is None else "%s %s" % (label, path)
            try:
                if exclusive:
                    self.fd = create_private(path)
                    self.created = True
                elif os.path.exists(path) and not os.path.isfile(path):
                    if os.path.isdir(path):
                        raise EraError("%s is a directory" % path)
                    # O_EXCL on a block device: refuse one that is mounted or in use.
                    block = stat.S_ISBLK(os.stat(path).st_mode)
                    self.fd = os.open(path, os.O_WRONLY | (os.O_EXCL if block else 0))
                    self.syncable = block
                else:
                    # Through a symlink: the link stays, its target is what is replaced.
                    final = os.path.realpath(path) if os.path.islink(path) else path
                    self.fd, self.path = create_temporary(final)
                    self.final = final
                    self.created = True
            except FileExistsError:
                raise EraError("%s already exists; refusing to overwrite it" % path) from None
            except OSError as exc:
                raise _os_error(exc, "cannot create %s" % path) from None
            self.syncable = self.syncable or self.created
        if os.isatty(self.fd):
            raise EraError("refusing to write a stream to a terminal; "
                           "redirect it or use -o FILE")
        if direct and self.created:
            try:
                self.file = BlockFile(self.path, os.O_WRONLY, fd=self.fd, direct=True,
                                      nofollow=True)
            except OSError as exc:
                raise _os_error(exc, "cannot create %s" % self.name) from None
            if self.file.direct_fd is not None:
                self.staged = memoryview(aligned_buffer(OUTPUT_STAGE))
                self.fill = 0         # bytes in the stage
                self.base = 0         # where stage[0] goes in the file

    @property
    def direct_fd(self):
        """The O_DIRECT descriptor in use, or None."""
        return None if self.file is None else self.file.direct_fd

    def write(self, *pieces):
        try:
            for piece in pieces:
                if self.staged is not None:
                    self._add(memoryview(piece))
                else:
                    write_all(self.fd, piece)
        except BrokenPipeError:
            raise EraError("%s was closed before the stream ended "
                           "(did the receiving side fail?)" % self.name) from None
        except (OSError, DeviceError) as exc:     # DeviceError: from the O_DIRECT file
            raise _os_error(exc, "cannot write to %s" % self.name) from None

    def _add(self, view):
        size = len(self.staged)
        while len(view):
            count = min(size - self.fill, len(view))
            self.staged[self.fill:self.fill + count] = view[:count]
            self.fill += count
            view = view[count:]
            if self.fill == size:
                self._drain(size)

    def _drain(self, count):
        """Write the first `count` staged bytes (whole blocks); keep the rest staged."""
        self.file.write(self.base, self.staged[:count])
        rest = self.fill - count
        # rest < DIRECT_ALIGN <= count: the two regions do not overlap.
        self.staged[:rest] = self.staged[count:self.fill]
        self.fill = rest
        self.base += count

    def sync(self):
        """Make every byte written so far durable."""
        try:
            if self.staged is not None:
                whole = self.fill - self.fill % DIRECT_ALIGN
                if whole:
                    self._drain(whole)
                # The partial last block (not whole pages: through the page cache),
                # and kept staged.
                self.file.write(self.base, self.staged[:self.fill])
            os.fsync(self.fd)
        except (OSError, DeviceError) as exc:
            raise _os_error(exc, "cannot sync %s" % self.name) from None

    def finish(self):
        """Everything written is durable, and a stream file has its name."""
        if self.syncable:
            self.sync()
        if self.final is not None:
            try:
                os.rename(self.path, self.final)
                sync_directory(self.final)
            except OSError as exc:
                raise _os_error(exc, "cannot rename %s to %s" % (self.path, self.final)) from None
            self.path, self.final = self.final, None

    def close(self, failed=False):
        if self.fd is None or self.name == "standard output":
            return
        if self.file is not None:
            self.file.close()         # and self.fd with it
            self.file = None
        else:
            os.close(self.fd)
        self.fd = None
        if failed and self.created:
            # Half a stream file is worse than none: remove what this made.
            try:
                os.unlink(self.path)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Stream format: header, chunks and the writers
# ---------------------------------------------------------------------------


class Chunk(collections.namedtuple("Chunk", "tag seq offset length crc position payload")):
    """One chunk record of a stream, checked: the fields of its header, where its
    payload starts in the stream (position), and the payload (a view) or None
    (a ZERO chunk, or a chunk of an undo file not read yet).  The original
    format's pieces are chunks too: tag DATA, crc None."""

    __slots__ = ()


def chunk_crc(seed, fields, payload=None):
    """A chunk's crc: CRC-32 of the payload (none for ZERO) then of its 20 header
    bytes `fields`, starting from the stream's header_crc `seed`."""
    return zlib.crc32(fields, seed if payload is None else zlib.crc32(payload, seed))


def resume_layers(covers, offset, era):
    """What a resume must carry once the apply of a stream stopped at `offset`.

    A layer (era, offset) stands for the blocks written in era `era` or later
    (era None: every block) that lie at `offset` or beyond.  The stream
    carried the layers `covers` and was copied from a metadata snapshot that
    began era `era`.  Below `offset` its data is applied; beyond it, not yet;
    and anything written since its snapshot, below the offset too, has era
    `era` or later.  So: each of its layers from max(its offset, `offset`),
    and every block written since `era` from 0.  A layer inside another (a
    later era, the same offset or beyond) is dropped; past MAX_LAYERS the two
    widest are merged into one that holds both, never fewer blocks.
    """
    layers = sorted([(e, max(o, offset)) for e, o in covers] + [(era, 0)],
                    key=lambda layer: (layer[0] is not None, layer[0] or 0, layer[1]))
    kept = []
    for layer in layers:
        # Sorted widest first: a layer with no lower offset than one kept is inside it.
        if not kept or layer[1] < kept[-1][1]:
            kept.append(layer)
    while len(kept) > MAX_LAYERS:
        kept[0:2] = [(kept[0][0], kept[1][1])]
    return tuple(kept)


class Resume(collections.namedtuple("Resume", "crc chunk_crc offset layers")):
    """What a resume stream continues: the header_crc of the stream whose apply
    stopped, the crc of the last chunk applied, the offset below which that
    apply is complete, and the layers it carries (see resume_layers)."""

    def pack(self):
        return RESUME.pack(self.crc, self.chunk_crc, self.offset, len(self.layers)) + b"".join(
            LAYER.pack(LAYER_EVERY if era is None else LAYER_SINCE, era or 0, offset)
            for era, offset in self.layers)

    @classmethod
    def unpack(cls, data, device_size):
        crc, chunk_crc, offset, count = RESUME.unpack_from(data)
        layers = []
        for index in range(count):
            kind, era, start = LAYER.unpack_from(data, RESUME.size + index * LAYER.size)
            if kind not in (LAYER_SINCE, LAYER_EVERY) or start > device_size or \
                    kind == LAYER_EVERY and era:
                raise StreamError("damaged header: resume layer %d (kind %d, era %d, offset %d)"
                                  % (index, kind, era, start))
            layers.append((None if kind == LAYER_EVERY else era, start))
        if offset > device_size:
            raise StreamError("damaged header: resumes from offset %d of a %d-byte device"
                              % (offset, device_size))
        return cls(crc, chunk_crc, offset, tuple(layers))

    def as_dict(self):
        return {"stream_crc": self.crc, "chunk_crc": self.chunk_crc, "offset": self.offset,
                "layers": [list(layer) for layer in self.layers]}


def _source_crc(source_id):
    return zlib.crc32(source_id.encode("utf-8", "surrogatepass"))


class ResumeToken(collections.namedtuple(
        "ResumeToken", "stream_crc chunk_crc device_size block_size source_crc offset layers")):
    """What copy --resume needs from the mirror, as one printable word.

    Base32 (lowercase, no padding: safe in a shell, a file name, a log) of
    TOKEN, the layers and a CRC-32 of both, so that a mistyped token is refused
    before any data moves.
    """

    @classmethod
    def of(cls, interrupted):
        """The token of a state's record of an interrupted apply."""
        return cls(interrupted["stream_crc"], interrupted["chunk_crc"], interrupted["device_size"],
                   interrupted["block_size"], _source_crc(interrupted["source_id"]),
                   interrupted["offset"], resume_layers(
                       [tuple(layer) for layer in interrupted["covers"]],
                       interrupted["offset"], interrupted["era"]))

    def encode(self):
        import base64
        data = TOKEN.pack(TOKEN_VERSION, len(self.layers), self.block_size, self.stream_crc,
                          self.chunk_crc, self.device_size, self.offset,
                          self.source_crc) + b"".join(
            LAYER.pack(LAYER_EVERY if era is None else LAYER_SINCE, era or 0, offset)
            for era, offset in self.layers)
        data += CRC.pack(zlib.crc32(data))
        return base64.b32encode(data).decode("ascii").rstrip("=").lower()

    @classmethod
    def decode(cls, text):
        import base64
        import binascii
        word = text.strip().upper()
        try:
            if not word or not word.isalnum():
                raise ValueError
            data = base64.b32decode(word + "=" * (-len(word) % 8))
        except (ValueError, binascii.Error):
            raise EraError("%s is not a resume token ('era_tool.py info MIRROR' prints the "
                           "mirror's)" % shown(text[:40])) from None
        if len(data) < TOKEN.size + CRC.size or \
                zlib.crc32(data[:-CRC.size]) != CRC.unpack_from(data, len(data) - CRC.size)[0]:
            raise EraError("resume token %s is damaged or mistyped (its checksum does not "
                           "match): copy it again from 'era_tool.py info MIRROR'"
                           % shown(text[:40]))
        (version, count, block_size, stream_crc, chunk_crc, device_size, offset,
         source_crc) = TOKEN.unpack_from(data)
        if version != TOKEN_VERSION:
            raise EraError("resume token of version %d: this era_tool (%s) reads version %d"
                           % (version, __version__, TOKEN_VERSION))
        if len(data) != TOKEN.size + count * LAYER.size + CRC.size or not count:
            raise EraError("resume token %s is damaged" % shown(text[:40]))
        try:
            layers = Resume.unpack(RESUME.pack(0, 0, offset, count) + data[TOKEN.size:-CRC.size],
                                   device_size).layers
        except StreamError:
            raise EraError("resume token %s is damaged" % shown(text[:40])) from None
        return cls(stream_crc, chunk_crc, device_size, block_size, source_crc, offset, layers)


class StreamHeader:
    """The fields of a stream header, and their bytes."""

    def __init__(self, device_size, total_bytes, block_size, chunk_size=None,
                 since_era=None, era=None, full=False, created=None, source_id="",
                 version=FORMAT_VERSION, undo=False, target_size=None, target_crc=None,
                 previous_crc=None, raw=None, repair=False, resume=None):
        self.version = version
        self.device_size = device_size
        self.total_bytes = total_bytes
        self.block_size = block_size
        self.chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
        self.since_era = since_era
        self.era = era
        self.full = full
        self.undo = undo
        self.repair = repair
        self.created = int(time.time()) if created is None else created
        self.source_id = source_id
        # An undo file's apply: the mirror's size once it is complete, and the
        # header_crc of its stream (both None in a stream, and in undo files of 0.1).
        self.target_size = target_size
        self.target_crc = target_crc
        self.previous_crc = previous_crc
        # A resume stream: the Resume (stream, offset, layers) it continues.
        self.resume = resume
        # The header's bytes, header_crc last: as read, or as pack() makes them.
        self.raw = self.pack() if raw is None else raw
        (self.crc,) = CRC.unpack_from(self.raw, len(self.raw) - CRC.size)

    def pack(self):
        source_id = self.source_id.encode("utf-8")
        flags = ((FLAG_SINCE_ERA if self.since_era is not None else 0)
                 | (FLAG_ERA if self.era is not None else 0)
                 | (FLAG_FULL if self.full else 0)
                 | (FLAG_UNDO if self.undo else 0)
                 | (FLAG_REPAIR if self.repair else 0)
                 | (FLAG_RESUME if self.resume is not None else 0)
                 | (FLAG_TARGET if self.target_size is not None else 0)
                 | (FLAG_PREVIOUS if self.target_size is not None and
                    self.previous_crc is not None else 0))
        head = HEADER.pack(MAGIC, self.version, flags, self.device_size, self.total_bytes,
                           self.block_size, self.chunk_size, self.since_era or 0,
                           self.era or 0, self.created, len(source_id)) + source_id
        if self.target_size is not None:
            head += TARGET.pack(self.target_size, self.target_crc, self.previous_crc or 0)
        if self.resume is not None:
            head += self.resume.pack()
        return head + CRC.pack(zlib.crc32(head))

    @classmethod
    def read(cls, inp, magic=None):
        """Read and check a header from `inp`; `magic`: its first 8 bytes, if read already."""
        if magic is None:
            magic = inp.read_exact(len(MAGIC), "the header")
        rest = inp.read_exact(HEADER.size - len(MAGIC), "the header")
        fields = HEADER.unpack(magic + rest)
        (magic, version, flags, device_size, total_bytes, block_size, chunk_size,
         since_era, era, created, id_length) = fields
        if magic != MAGIC:
            raise StreamError("not an era_tool stream (bad magic)")
        if version != FORMAT_VERSION:
            raise StreamError("stream format version %d is not supported (this is %s, "
                              "which reads version %d)" % (version, __version__, FORMAT_VERSION))
        if id_length > MAX_SOURCE_ID:
            raise StreamError("damaged header: source id of %d bytes" % id_length)
        source_id = inp.read_exact(id_length, "the header")
        target = inp.read_exact(TARGET.size, "the header") if flags & FLAG_TARGET else b""
        resume = b""
        if flags & FLAG_RESUME:
            resume = inp.read_exact(RESUME.size, "the header")
            count = RESUME.unpack(resume)[3]
            if not 1 <= count <= MAX_LAYERS:
                raise StreamError("damaged header: %d resume layers" % count)
            resume += inp.read_exact(count * LAYER.size, "the header")
        (header_crc,) = CRC.unpack(inp.read_exact(CRC.size, "the header"))
        raw = magic + rest + source_id + target + resume
        if zlib.crc32(raw) != header_crc:
            raise ChecksumMismatch("damaged header: checksum mismatch")
        # Checksums prove only that the bytes arrived as written: every field is
        # checked too, so that a crafted header cannot reach a system call with
        # a number it cannot take.
        if flags & ~KNOWN_FLAGS:
            raise StreamError("header has unknown flags 0x%x" % flags)
        if flags & FLAG_TARGET and not flags & FLAG_UNDO or \
                flags & FLAG_PREVIOUS and not flags & FLAG_TARGET:
            raise StreamError("header has flags 0x%x: target fields without the undo flag" % flags)
        if flags & FLAG_REPAIR and (flags & (FLAG_SINCE_ERA | FLAG_ERA | FLAG_FULL | FLAG_UNDO)
                                    != FLAG_SINCE_ERA | FLAG_ERA or since_era != era):
            raise StreamError("header has flags 0x%x: a repair names the one era it keeps"
                              % flags)
        if flags & FLAG_RESUME and flags & (FLAG_ERA | FLAG_FULL | FLAG_UNDO | FLAG_REPAIR) \
                != FLAG_ERA:
            raise StreamError("header has flags 0x%x: a resume names its era and is no full "
                              "copy, undo file or repair" % flags)
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise StreamError("header has a chunk size of %d bytes" % chunk_size)
        target_size, target_crc, previous_crc = TARGET.unpack(target) if target else (None,) * 3
        if not flags & FLAG_PREVIOUS:
            previous_crc = None
        for name, value in (("device size", device_size), ("byte count", total_bytes),
                            ("target size", target_size or 0)):
            if value > MAX_OFFSET:
                raise StreamError("header has a %s of %d bytes, more than a file or device "
                                  "can hold" % (name, value))
        if total_bytes > device_size and not flags & FLAG_UNDO:
            raise StreamError("header says %d bytes to copy from a %d-byte device"
                              % (total_bytes, device_size))
        if not SECTORS_PER_PAGE <= block_size <= MAX_BLOCK_SIZE or block_size % SECTORS_PER_PAGE:
            raise StreamError("header has a block size of %d sectors (dm-era's are positive "
                              "multiples of %d)" % (block_size, SECTORS_PER_PAGE))
        try:
            source_id = source_id.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError("header source id is not UTF-8") from None
        resume = Resume.unpack(resume, device_size) if resume else None
        return cls(device_size, total_bytes, block_size, chunk_size,
                   since_era if flags & FLAG_SINCE_ERA else None,
                   era if flags & FLAG_ERA else None, bool(flags & FLAG_FULL), created,
                   source_id, version, bool(flags & FLAG_UNDO), target_size, target_crc,
                   previous_crc, raw=raw + CRC.pack(header_crc),
                   repair=bool(flags & FLAG_REPAIR), resume=resume)

    def as_dict(self):
        return {
            "version": self.version,
            "device_size": self.device_size,
            "total_bytes": self.total_bytes,
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "since_era": self.since_era,
            "era": self.era,
            "full": self.full,
            "undo": self.undo,
            "repair": self.repair,
            "created": self.created,
            "source_id": self.source_id,
            "target_size": self.target_size,
            "target_crc": self.target_crc,
            "previous_crc": self.previous_crc,
            "resume": None if self.resume is None else self.resume.as_dict(),
        }

    def covers(self):
        """The layers of blocks this stream carries (see Resume): what its apply,
        stopped midway, leaves for a resume to carry."""
        if self.resume is not None:
            return self.resume.layers
        return ((None if self.full else self.since_era, 0),)

    @property
    def resumable(self):
        """Whether an apply of this stream stopped midway can be resumed: it is a
        chain step (full, since an era, or a resume) that names its era."""
        return self.era is not None and not (self.undo or self.repair) and (
            self.full or self.since_era is not None or self.resume is not None)


class StreamWriter:
    """Writes chunks with checksums, then the trailer that proves the end."""

    def __init__(self, output, header):
        self.output = output
        self.header = header
        self.chunks = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.zeros = bytes(header.chunk_size)
        self.stream_crc = zlib.crc32(header.raw)
        output.write(header.raw)

    def write_chunk(self, offset, payload):
        length = len(payload)
        # startswith compares in place: no copy to find an all-zero chunk.
        zero = self.zeros.startswith(payload)
        fields = CHUNK_FIELDS.pack(TAG_ZERO if zero else TAG_DATA, self.chunks, offset, length)
        record = fields + CRC.pack(chunk_crc(self.header.crc, fields,
                                             None if zero else payload))
        self.stream_crc = zlib.crc32(record, self.stream_crc)
        if zero:
            self.output.write(record)
            self.zero_bytes += length
        else:
            self.output.write(record, payload)
            self.data_bytes += length
        self.chunks += 1

    def finish(self):
        fields = TRAILER_FIELDS.pack(TAG_DONE, self.chunks, self.data_bytes, self.zero_bytes)
        self.output.write(fields + CRC.pack(zlib.crc32(fields, self.stream_crc)))


class LegacyWriter:
    """Writes the original era_copy stream: no header, checks or end marker."""

    def __init__(self, output):
        self.output = output

    def start_range(self, offset, length):
        """The record header; the range's data follows."""
        self.output.write(LEGACY_RECORD.pack(LEGACY_MAGIC, offset, length))


# ---------------------------------------------------------------------------
# Stream readers
# ---------------------------------------------------------------------------


class Input:
    """A binary input with exact reads and a byte count for messages.

    Unbuffered: payloads are read straight into the caller's (aligned) buffer.
    Through a buffer, a quarter of every 4 MiB chunk was copied twice, and on
    a VM that extra memory traffic slows the O_DIRECT writes running beside it.
    """

    def __init__(self, path, what="a stream", hint="use -i FILE"):
        if path is None or path == "-":
            if sys.stdin is None:
                raise EraError("standard input is closed; %s" % hint)
            if os.isatty(sys.stdin.fileno()):
                # Waiting silently for a terminal to type a binary stream looks like a hang.
                raise EraError("refusing to read %s from a terminal; %s" % (what, hint))
            self.file = io.open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
            self.name = "standard input"
            widen_pipe(sys.stdin.fileno())
        else:
            try:
                self.file = io.open(path, "rb", buffering=0)
            except OSError as exc:
                raise _os_error(exc, "cannot open %s" % path) from None
            self.name = path
        self.position = 0

    @classmethod
    def of(cls, file, name):
        """An Input over an open unbuffered binary file."""
        inp = cls.__new__(cls)
        inp.file = file
        inp.name = name
        inp.position = 0
        return inp

    def read_into(self, view):
        """Fill `view`; return how many bytes were read (less only at the end)."""
        done = 0
        try:
            while done < len(view):
                got = self.file.readinto(view[done:])
                if not got:
                    break
                done += got
        except OSError as exc:
            raise _os_error(exc, "cannot read %s" % self.name) from None
        self.position += done
        return done

    def read_exact(self, size, what):
        buf = bytearray(size)
        got = self.read_into(memoryview(buf))
        if got < size:
            raise TruncatedStream("stream ends inside %s at byte %d" % (what, self.position))
        return bytes(buf)

    def skip(self, size, what):
        """Move past `size` bytes of a file (not a pipe) without reading them."""
        end = self.position + size
        try:
            if end > os.fstat(self.file.fileno()).st_size:
                raise TruncatedStream("stream ends inside %s at byte %d" % (what, self.position))
            self.file.seek(size, io.SEEK_CUR)
        except OSError as exc:
            raise _os_error(exc, "cannot read %s" % self.name) from None
        self.position = end

    def at_end(self):
        return self.read_into(memoryview(bytearray(1))) == 0

    def close(self):
        self.file.close()


class StreamReader:
    """Yields verified chunks of an era_tool stream, then checks the trailer.

    Each chunk is checked before it is handed out, so nothing unverified is
    ever written; the trailer proves that no chunk is missing at the end.
    payloads=False (a file only): the payloads are passed over, unread and
    unchecked, and every chunk comes with payload None; the chunk headers and
    the trailer are checked all the same (an index of an undo file whose
    payloads are checked when they are read).
    """

    def __init__(self, inp, header, take_buffer=None, payloads=True):
        self.inp = inp
        self.header = header
        self.payloads = payloads
        # take_buffer: where each payload goes (a pool shared with a writer
        # thread); by default one buffer, reused.
        if take_buffer is None:
            view = memoryview(bytearray(header.chunk_size))
            take_buffer = lambda: view   # noqa: E731
        self.take_buffer = take_buffer
        self.stream_crc = zlib.crc32(header.raw)
        self.chunks = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.record_start = inp.position
        self.next_offset = 0      # chunks come in offset order and never overlap

    def __iter__(self):
        """Yield each chunk, checked (a Chunk; payload None for zeros)."""
        inp = self.inp
        header = self.header
        stream_crc = self.stream_crc
        while True:
            self.record_start = inp.position
            record = inp.read_exact(CHUNK.size, "a chunk header")
            stream_crc = zlib.crc32(record, stream_crc)
            tag, seq, offset, length, crc = CHUNK.unpack(record)
            if tag == TAG_DONE:
                self._finish(record, stream_crc)
                return
            where = "chunk %d" % self.chunks
            if tag not in (TAG_DATA, TAG_ZERO):
                raise StreamError("%s: damaged chunk header (unknown tag %r)" % (where, tag))
            if seq != self.chunks:
                raise StreamError("%s: damaged chunk header (numbered %d)" % (where, seq))
            if not 0 < length <= header.chunk_size or offset + length > header.device_size:
                raise StreamError("%s: damaged chunk header (offset %d, length %d)"
                                  % (where, offset, length))
            if offset < self.next_offset:
                # copy never writes one: a region twice would make an undo file,
                # applied as a stream, put back the newer of its two contents.
                raise StreamError("%s: damaged chunk header (offset %d is before the end "
                                  "of the chunk before it, %d)" % (where, offset,
                                                                  self.next_offset))
            position = inp.position
            payload = None
            if tag == TAG_DATA and not self.payloads:
                inp.skip(length, where)
            else:
                if tag == TAG_DATA:
                    payload = memoryview(self.take_buffer())[:length]
                    if inp.read_into(payload) < length:
                        raise TruncatedStream("stream ends inside %s at byte %d"
                                              % (where, inp.position))
                if chunk_crc(header.crc, record[:CHUNK_FIELDS.size], payload) != crc:
                    raise ChecksumMismatch("%s at offset %d: checksum mismatch"
                                           % (where, offset))
            self.chunks += 1
            self.next_offset = offset + length
            if tag == TAG_ZERO:
                self.zero_bytes += length
            else:
                self.data_bytes += length
            yield Chunk(tag, seq, offset, length, crc, position, payload)

    def _finish(self, record, stream_crc):
        tag, chunks, data_bytes, zero_bytes = TRAILER_FIELDS.unpack(record)
        (stored,) = CRC.unpack(self.inp.read_exact(CRC.size, "the trailer"))
        if stored != stream_crc:
            raise ChecksumMismatch("damaged stream: trailer checksum mismatch")
        if (chunks, data_bytes, zero_bytes) != (self.chunks, self.data_bytes, self.zero_bytes):
            raise StreamError("trailer counts %d chunks (%d data, %d zero bytes), stream "
                              "had %d (%d, %d)" % (chunks, data_bytes, zero_bytes, self.chunks,
                                                   self.data_bytes, self.zero_bytes))
        # An undo file covers the incoming stream's regions only where the mirror had data.
        covered = data_bytes + zero_bytes
        if covered > self.header.total_bytes or (
                covered != self.header.total_bytes and not self.header.undo):
            raise StreamError("stream has %d bytes, its header promised %d"
                              % (data_bytes + zero_bytes, self.header.total_bytes))
        if not self.inp.at_end():
            raise StreamError("unexpected data after the end of the stream")


class LegacyReader:
    """Yields the original format's data as chunks: a piece of a record at a time.

    The format cannot tell a complete stream from one cut at a record
    boundary; that is why the era_tool format exists.  take_buffer gives the
    (aligned) memory for each piece; check(offset, length) sees each record
    before any of its data is handed out.
    """

    def __init__(self, inp, take_buffer=None, check=None):
        self.inp = inp
        if take_buffer is None:
            view = memoryview(aligned_buffer(LEGACY_PIECE))
            take_buffer = lambda: view   # noqa: E731
        self.take_buffer = take_buffer
        self.check = check
        self.records = 0
        self.data_bytes = 0
        self.pending = None       # a record header read by peek()

    def peek(self):
        """Read and check the first record's header now, before anything is written."""
        self.pending = self._record()

    def _record(self):
        """The next record's (offset, length), or None at the end."""
        inp = self.inp
        head = bytearray(LEGACY_RECORD.size)
        got = inp.read_into(memoryview(head))
        if got == 0:
            return None
        if got < LEGACY_RECORD.size:
            raise TruncatedStream("original-format stream ends inside record %d at byte %d"
                                  % (self.records, inp.position))
        magic, offset, length = LEGACY_RECORD.unpack(head)
        if magic != LEGACY_MAGIC:
            raise StreamError("record %d at byte %d: signature does not match "
                              "(damaged stream?)" % (self.records, inp.position - len(head)))
        if offset < 0 or length < 0:
            raise StreamError("record %d: negative offset %d or length %d"
                              % (self.records, offset, length))
        if offset + length > MAX_OFFSET:
            raise StreamError("record %d: offset %d and length %d reach past what a file "
                              "or device can hold" % (self.records, offset, length))
        return offset, length

    def __iter__(self):
        inp = self.inp
        while True:
            record, self.pending = self.pending or self._record(), None
            if record is None:
                return
            offset, length = record
            if self.check is not None:
                self.check(offset, length)
            size = length
            while length:
                buffer = self.take_buffer()
                piece = memoryview(buffer)[:min(length, LEGACY_PIECE, len(buffer))]
                position = inp.position
                if inp.read_into(piece) < len(piece):
                    raise TruncatedStream("original-format stream ends inside the data of "
                                          "record %d at byte %d" % (self.records, inp.position))
                yield Chunk(TAG_DATA, self.records, offset, len(piece), None, position, piece)
                offset += len(piece)
                length -= len(piece)
            self.records += 1
            self.data_bytes += size


# ---------------------------------------------------------------------------
# Mirror state: the chain guard
# ---------------------------------------------------------------------------


# Each key of a state file: required, the values it may hold (None is null).
STATE_KEYS = {
    "source_id": (True, str),
    "source_size": (True, (0, MAX_OFFSET)),
    "block_size": (True, (SECTORS_PER_PAGE, MAX_BLOCK_SIZE)),
    "era": (True, (0, MAX_ERA)),
    "stream_created": (False, (-(1 << 63), (1 << 63) - 1)),
    "applied": (False, (-(1 << 63), (1 << 63) - 1)),
    "stream_crc": (False, (0, (1 << 32) - 1)),
    "stepping_back": (False, (0, (1 << 32) - 1)),
    "interrupted": (False, dict),
}
# The record of an apply that stopped midway (see MirrorState.save_progress).
INTERRUPTED_KEYS = {
    "stream_crc": (0, (1 << 32) - 1),
    "chunk_crc": (0, (1 << 32) - 1),
    "stream_created": (-(1 << 63), (1 << 63) - 1),
    "era": (0, MAX_ERA),
    "offset": (0, MAX_OFFSET),
    "device_size": (0, MAX_OFFSET),
    "block_size": (SECTORS_PER_PAGE, MAX_BLOCK_SIZE),
    "total_bytes": (0, MAX_OFFSET),
    "applied_bytes": (0, MAX_OFFSET),
}
STATE_MAX = 1 << 16                # bytes: a state file is a few hundred


def _state_problem(state):
    """What is wrong with a parsed state file, or None."""
    if not isinstance(state, dict):
        return "not a JSON object"
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        return "not an era_tool state file"
    for key, (required, allowed) in STATE_KEYS.items():
        if key not in state:
            if required:
                return "no %s" % key
            continue
        value = state[key]
        if value is None:
            continue
        if allowed is dict:
            problem = _interrupted_problem(value)
            if problem:
                return "%s: %s" % (key, problem)
        elif allowed is str:
            if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) \
                    > MAX_SOURCE_ID:
                return "%s is not a source id" % key
        elif type(value) is not int or not allowed[0] <= value <= allowed[1]:
            # type(), not isinstance(): true and false are ints to Python.
            return "%s is %s, not a whole number from %d to %d" % (
                key, shown(repr(value)[:40]), allowed[0], allowed[1])
    if state["block_size"] is not None and state["block_size"] % SECTORS_PER_PAGE:
        return "block_size is not a multiple of %d" % SECTORS_PER_PAGE
    return None


def _whole(value, low, high):
    # type(), not isinstance(): true and false are ints to Python.
    return type(value) is int and low <= value <= high


def _interrupted_problem(record):
    """What is wrong with the record of an interrupted apply, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, (low, high) in INTERRUPTED_KEYS.items():
        if not _whole(record.get(key), low, high):
            return "%s is %s, not a whole number from %d to %d" % (
                key, shown(repr(record.get(key))[:40]), low, high)
    if not isinstance(record.get("source_id"), str):
        return "source_id is not a source id"
    covers = record.get("covers")
    if not isinstance(covers, list) or not 1 <= len(covers) <= MAX_LAYERS or not all(
            isinstance(layer, list) and len(layer) == 2
            and (layer[0] is None or _whole(layer[0], 0, MAX_ERA))
            and _whole(layer[1], 0, record["device_size"]) for layer in covers):
        return "covers is not a list of layers"
    if record["offset"] > record["device_size"] or record["block_size"] % SECTORS_PER_PAGE:
        return "offset or block_size does not fit the device"
    return None


def _no_constant(name):
    raise ValueError("%s is not a number" % name)


def _no_duplicates(pairs):
    """A key twice ("era": 1, "era": 7) is damage, not the later value."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice")
    return result


def recorded_crc(header):
    """The stream_crc a mirror's state records once this stream is applied.

    An undo file takes the mirror back to where its apply found it, so the
    state names again the stream it named then, and older undo files still fit.
    """
    return header.previous_crc if header.undo else header.crc


class MirrorState:
    """Where a mirror is in its chain of backups, kept in its state file.

    The state file is read, checked and written here only, and only while
    the mirror is locked (lock()).  path None: a block device without
    --state, whose era is not recorded.  fields None: no state file (nothing
    chained applied yet, or a damaged one that --force went past: damaged).
    Each field of the file is an attribute (era, source_id, ...; None when
    unset).
    """

    def __init__(self, path, fields=None, damaged=False):
        self.path = path
        self.fields = fields
        self.damaged = damaged

    def __getattr__(self, key):
        if key in STATE_KEYS:
            return None if self.fields is None else self.fields.get(key)
        raise AttributeError(key)

    @property
    def known(self):
        """Whether a state file was read."""
        return self.fields is not None

    @staticmethod
    def path_for(destination, explicit=None):
        """Where the mirror's state lives: --state, or DEST.era beside a mirror file.

        A block device has no "beside" (/dev is not kept), so it needs --state.
        """
        if explicit:
            return explicit
        try:
            if stat.S_ISBLK(os.stat(destination).st_mode):
                return None
        except OSError:
            pass
        return destination + STATE_SUFFIX

    @staticmethod
    def lock(dest):
        """One writer per mirror: two applies at once left era 3 recorded over era 2 data.

        flock on the mirror itself, not a lock file: it goes with the
        descriptor, so a killed process never leaves a stale lock behind.  Taken
        before the state is read: two applies that both read era 1 would both
        write, and the later state would not match the data.
        """
        import fcntl
        try:
            fcntl.flock(dest.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError("%s is in use by another era_tool (apply, rollback, verify, export "
                              "or serve); one at a time" % dest.path) from None

    @classmethod
    def load(cls, path, force=False):
        """The state at `path` (None: not recorded); force: a damaged file reads as none."""
        state = cls(path)
        if path is None:
            return state
        try:
            fd, info = open_device(path, os.O_RDONLY, "state file ")
        except FileNotFoundError:
            return state
        except OSError as exc:
            raise _os_error(exc, "cannot read state file %s" % path) from None
        try:
            if not stat.S_ISREG(info.st_mode):
                raise DeviceError("state file %s is not a regular file" % path)
            data = os.read(fd, STATE_MAX + 1)
        except OSError as exc:
            raise _os_error(exc, "cannot read state file %s" % path) from None
        finally:
            os.close(fd)
        try:
            import json   # here, not at the top: most starts never need it (see _version)
            if len(data) > STATE_MAX:
                raise ValueError("larger than %d bytes" % STATE_MAX)
            # NaN and Infinity are not JSON, and NaN compares false to everything:
            # "era": NaN turned the gap check off.
            fields = json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                                object_pairs_hook=_no_duplicates)
            problem = _state_problem(fields)
            if problem:
                raise ValueError(problem)
        except (ValueError, RecursionError) as exc:
            if force:
                return cls(path, damaged=True)
            raise ChainError("state file %s is damaged (%s): the mirror's era is unknown; "
                             "--force applies anyway" % (shown(path), exc)) from None
        state.fields = fields
        return state

    def save(self, source_id, source_size, block_size, era, stream_created=None,
             stream_crc=None, stepping_back=None, interrupted=None):
        """Record the mirror's era, atomically: only after its data is synced.

        era None means unknown (a stream without an era was forced onto the
        mirror): the next stream must then be a full copy.  stream_crc is the
        header CRC of the stream that brought the mirror here: it tells an undo
        file whose apply completed from one that a crash cut short.  stepping_back
        is the header CRC of an undo file being written back: until that step is
        done, the mirror holds parts of two versions.
        """
        path = self.path
        fields = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "applied": int(time.time()),
            "source_id": source_id,
            "source_size": source_size,
            "block_size": block_size,
            "era": era,
            "stream_created": stream_created,
            "stream_crc": stream_crc,
        }
        if stepping_back is not None:
            fields["stepping_back"] = stepping_back
        if interrupted is not None:
            fields["interrupted"] = interrupted
        temp = None
        try:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)   # a chmod of the state file stays
            except FileNotFoundError:
                mode = FILE_MODE
            fd, temp = create_temporary(path, mode)
            try:
                os.fchmod(fd, mode)   # the umask does not narrow a mode chosen on purpose
                import json
                write_all(fd, (json.dumps(fields, indent=1, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, path)
            temp = None
        except OSError as exc:
            raise _os_error(exc, "cannot write state file %s (the data is synced; the "
                            "mirror's era was not advanced)" % path) from None
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass
        self.fields, self.damaged = fields, False
        # The rename itself is durable only once the directory is synced. It is done
        # already: a failure here must not undo the data it describes.
        try:
            sync_directory(path)
        except OSError as exc:
            warn("cannot sync the directory of state file %s: %s"
                 % (path, exc.strerror or exc))

    def remove(self):
        """The mirror is back before any chained stream: no era to record."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            self.fields = None
            return
        except OSError as exc:
            raise _os_error(exc, "cannot remove state file %s" % self.path) from None
        self.fields = None
        sync_directory(self.path)

    def record(self, header):
        """Record where a stream (None: an original-format one) took the mirror."""
        if self.path is None:
            return
        if self.damaged:
            # --force went past a damaged state file: a new one, or every later apply
            # is refused.
            self.fields = {"source_id": None, "source_size": None, "block_size": None,
                           "era": None}
        if header is None:
            # An original-format stream, forced: the era is now unknown.
            if self.known:
                self.save(self.source_id, self.source_size, self.block_size, None)
        elif header.era is not None:
            # An undo file takes the mirror back to where its apply found it: the stream
            # recorded then is the one recorded now, so that older undo files still fit.
            self.save(header.source_id, header.device_size, header.block_size, header.era,
                      header.created, recorded_crc(header))
        elif header.undo:
            if self.known:
                self.remove()   # back before the first chained stream
        elif self.known:
            self.save(header.source_id, header.device_size, header.block_size, None,
                      header.created, header.crc)

    def save_progress(self, header, offset, applied, chunk_crc):
        """Record, once the mirror is synced, that the apply of `header` is complete
        below `offset` (`applied` of its bytes): what a resume takes up.

        The era stays: the mirror is still complete as of it, and an ordinary
        incremental from it (or a full copy) still repairs everything.  A mirror
        that held nothing chained yet gets a state with no era, which only a full
        copy or this stream's resume may continue.
        """
        record = {
            "stream_crc": header.crc, "chunk_crc": chunk_crc, "stream_created": header.created,
            "era": header.era,
            "covers": [list(layer) for layer in header.covers()], "offset": offset,
            "device_size": header.device_size, "block_size": header.block_size,
            "source_id": header.source_id, "total_bytes": header.total_bytes,
            "applied_bytes": applied,
        }
        if self.known:
            self.save(self.source_id, self.source_size, self.block_size, self.era,
                      self.stream_created, self.stream_crc, interrupted=record)
        else:
            self.save(header.source_id, header.device_size, header.block_size, None,
                      interrupted=record)

    def token(self):
        """The resume token of the interrupted apply this state records, or None."""
        if not self.known or self.interrupted is None:
            return None
        return ResumeToken.of(self.interrupted).encode()

    def _check_resume(self, header):
        """A resume stream goes only onto the mirror whose interrupted apply it continues."""
        record = self.interrupted if self.known else None
        resume = header.resume
        if record is None:
            raise ChainError("this resume stream continues an interrupted apply, but %s records "
                             "none (%s): resumed already, or moved on? Copy an ordinary "
                             "incremental since era %s (--force applies anyway)"
                             % ("the mirror" if self.known else "no state file",
                                shown(self.path), self.era if self.known else "-"))
        expected = ResumeToken.of(record)
        if (resume.crc, resume.chunk_crc, resume.offset, resume.layers) != (
                expected.stream_crc, expected.chunk_crc, expected.offset, expected.layers):
            raise ChainError("this resume stream continues stream 0x%08x from byte %d, but the "
                             "mirror (%s) waits for the rest of stream 0x%08x from byte %d: "
                             "copy --resume %s (--force applies anyway)"
                             % (resume.crc, resume.offset, shown(self.path),
                                record["stream_crc"], record["offset"], expected.encode()))
        if header.era < record["era"]:
            raise ChainError("this resume stream was copied at era %d, before the interrupted "
                             "stream's era %d (%s): from an older metadata snapshot? "
                             "(--force applies anyway)"
                             % (header.era, record["era"], shown(self.path)))
        if header.source_id != record["source_id"] or \
                header.device_size != record["device_size"] or \
                header.block_size != record["block_size"]:
            raise ChainError("this resume stream is of source %r (%d bytes, block size %d), the "
                             "interrupted one of %r (%d, %d) (%s): wrong mirror? (--force applies "
                             "anyway)" % (header.source_id, header.device_size, header.block_size,
                                          record["source_id"], record["device_size"],
                                          record["block_size"], shown(self.path)))

    def mark_stepping_back(self, header):
        """Before an undo file is written back: the state says a step back is under way.

        Stopped midway, the mirror is a mix of two versions under the newer era,
        and the incrementals since that era would never repair the part already
        stepped back: they are refused until the step is run again and completes.
        """
        if self.path is None or not self.known:
            return
        self.save(self.source_id, self.source_size, self.block_size, self.era,
                  self.stream_created, self.stream_crc, stepping_back=header.crc)

    def _check_same_source(self, header, what):
        """Refuse a stream or undo file (`what`) of another source or block size: wrong mirror."""
        if self.source_id is not None and header.source_id != self.source_id:
            raise ChainError("%s is from source %r, the mirror from %r (%s): wrong mirror? "
                             "(--force goes on anyway)"
                             % (what, header.source_id, self.source_id, self.path))
        if self.block_size is not None and header.block_size != self.block_size:
            raise ChainError("%s has block size %d, the mirror %d (%s): wrong mirror? "
                             "(--force goes on anyway)"
                             % (what, header.block_size, self.block_size, self.path))

    def check_apply(self, header):
        """Refuse a stream that would leave a gap or belongs to another source.

        `header` is None for an original-format stream, which carries no position.
        A stream may start earlier than the mirror's era: the overlap only
        re-sends current data.
        """
        path = self.path
        if header is not None and header.undo:
            # Applied as a stream, an undo file takes the mirror back from exactly where
            # its apply left it: that apply must have completed.
            self.check_undo_belongs(header, "this undo file", completed_only=True)
            return
        if self.stepping_back is not None:
            raise ChainError("the mirror holds parts of two versions: a step back with an undo "
                             "file (header CRC 0x%08x) stopped midway (%s): run that rollback or "
                             "apply -i again first (--force applies anyway)"
                             % (self.stepping_back, shown(path)))
        if header is not None and header.resume is not None:
            self._check_resume(header)
            return
        if header is not None and header.repair:
            if self.known and self.interrupted is not None:
                raise ChainError("the mirror holds an apply that stopped midway (%s): resume it "
                                 "first (copy --resume %s), then verify again (--force applies "
                                 "anyway)" % (shown(path), self.token()))
            # Its blocks are the source as it is now, right only on the mirror verify
            # compared: at the era it keeps, with no incremental applied since.
            if not self.known or self.era != header.era:
                raise ChainError("repair stream is for the mirror at era %d, but the mirror is "
                                 "at era %s (%s): verify it again (--force applies anyway)"
                                 % (header.era, self.era if self.known else "unknown",
                                    shown(path)))
            self._check_same_source(header, "repair stream")
            return
        if not self.known:
            if path is not None and header is not None and header.since_era is not None and \
                    not header.full:
                # A typo in the mirror's name, or the mirror under another name (a link):
                # the changes since one era alone, on a mirror with no known era, are garbage
                # that every later incremental would build on.
                raise ChainError("stream holds the changes since era %d, but the mirror has no "
                                 "recorded state (%s): a new or wrong mirror? Apply a --full "
                                 "stream first (--force applies anyway)"
                                 % (header.since_era, shown(path)))
            return
        if header is None:
            raise ChainError("%s records era %s, and an original-format stream carries no era: "
                             "cannot prove no change is skipped (--force applies anyway)"
                             % (path, self.era))
        self._check_same_source(header, "stream")
        if header.full:
            return
        if self.era is None:
            raise ChainError("the mirror's era is unknown (%s): apply a --full stream, or --force"
                             % path)
        if header.since_era is None:
            raise ChainError("stream carries no --since-era and the mirror is at era %d (%s): "
                             "cannot prove no change is skipped (--force applies anyway)"
                             % (self.era, path))
        if header.since_era > self.era:
            raise ChainError("stream starts at era %d but the mirror is at era %d (%s): the "
                             "changes of eras %d..%d would be missing (--force applies anyway)"
                             % (header.since_era, self.era, path, self.era,
                                header.since_era - 1))

    def completed(self, header):
        """Whether this state records the apply that wrote the undo file of `header`."""
        return self.known and header.target_crc is not None and \
            self.stream_crc == header.target_crc

    def check_undo_belongs(self, header, what, completed_only=False):
        """An undo file goes back only onto the mirror and version that its apply left.

        completed_only: it is applied as a stream, which needs the apply to have
        completed; rollback also takes one whose apply stopped midway.
        """
        path = self.path
        if not self.known:
            # since_era set: that apply recorded the era it reached in a state file.
            if path is not None and header.since_era is not None:
                # The mirror under another name (a link): DEST.era is made from the name.
                raise ChainError("%s was written onto a mirror with a recorded state, but this "
                                 "one has none (%s): the mirror under another name, or a wrong "
                                 "mirror? (--force goes on anyway)" % (shown(what), shown(path)))
            return
        self._check_same_source(header, "undo file")
        eras = (header.since_era,) if completed_only else (header.since_era, header.era)
        if header.since_era is not None and self.era not in eras:
            raise ChainError("undo file is for the mirror at era %d, but it is at era %s (%s): "
                             "apply or roll back newer undo files first (--force goes on anyway)"
                             % (header.since_era, self.era, path))
        if header.target_crc is None or self.completed(header):
            return
        if completed_only or self.stream_crc != header.previous_crc:
            # Neither where that apply left the mirror nor (for rollback) where it found
            # it: another mirror's undo file of the same size and source, or one rolled
            # back already and overtaken by a later apply.
            raise ChainError("%s belongs to another apply: the mirror's state (%s) names %s: "
                             "another mirror's, or rolled back already? (--force goes on anyway)"
                             % (shown(what), shown(path),
                                "another stream than the one that apply wrote" if completed_only
                                else "neither the stream that apply wrote nor the one before it"))

    def check_rollback(self, undo, dest):
        """Refuse an undo file that is not this mirror's, or not whole where it must be."""
        header = undo.header
        check_undo_fits(header, dest, undo.path)
        # Killed before it recorded anything: its apply found no state (no era, no
        # stream) and would have written one on completion (since_era set), and none is
        # there; its file is cut, not damaged. A first full pass, typically.
        killed_first = not self.known and not undo.complete and undo.damage is None and \
            header.era is None and header.previous_crc is None and header.since_era is not None
        if not killed_first:
            self.check_undo_belongs(header, "undo file %s" % undo.path)
        if undo.complete or killed_first:
            return
        if not self.known:
            # Nothing records whether that apply finished: a cut could be a crash or damage.
            raise StreamError("undo file %s is cut short, and no state file records whether the "
                              "apply that wrote it finished: if it was killed, --force rolls back "
                              "the %d chunks it holds" % (shown(undo.path), len(undo.chunks)))
        if self.completed(header):
            # The state is saved only after the undo file's trailer is synced: this
            # file was whole once, and lost its end or was damaged afterwards.
            raise StreamError("undo file %s is %s, but the apply that wrote it completed (%s "
                              "records it): the file was damaged afterwards and cannot restore "
                              "that version whole. %s itself is intact; move the undo file away "
                              "(--force rolls back the %d intact chunks anyway)"
                              % (shown(undo.path), "cut short" if undo.damage is None else
                                 "damaged (%s)" % undo.damage,
                                 shown(self.path), shown(dest.path), len(undo.chunks)))
        if undo.damage is not None:
            raise StreamError("undo file %s is damaged (%s): it can restore only the %d chunks "
                              "before the damage (--force rolls those back)"
                              % (shown(undo.path), undo.damage, len(undo.chunks)))


# ---------------------------------------------------------------------------
# Undo: the old content of what an apply overwrites
# ---------------------------------------------------------------------------


class UndoLog:
    """An undo file: a stream of the mirror's old content, written before each overwrite.

    Its header records the mirror's size before the apply (device_size), the
    era the apply takes the mirror to (since_era) and the era it was at
    (era), so the undo file applied as a stream steps the mirror back; and,
    as target fields, the mirror's size once the apply is complete and the
    header CRC of the stream applied, so that rollback can tell the mirror
    it belongs to and whether its apply completed.
    """

    def __init__(self, path, dest, incoming, state):
        self.path = path
        self.dest = dest
        previous_era = state.era
        # At most: every region the stream writes, and what a shrink would cut off.
        total = incoming.total_bytes + max(0, dest.initial_size - incoming.device_size)
        target = recorded_crc(incoming)     # what the mirror's state will name
        header = StreamHeader(dest.initial_size, total, incoming.block_size,
                              incoming.chunk_size, since_era=incoming.era, era=previous_era,
                              source_id=incoming.source_id, undo=True,
                              # No target for the undo of an undo file that names no stream
                              # (one of 0.1): the state will name none either.
                              target_size=None if target is None else
                              dest.size if dest.is_block else incoming.device_size,
                              target_crc=target,
                              previous_crc=state.stream_crc)
        self.chunk_size = incoming.chunk_size
        self.buffer = aligned_buffer(self.chunk_size)     # reused for every region saved
        self.output = Output(path, exclusive=True, label="undo file", direct=True)
        try:
            self.writer = StreamWriter(self.output, header)
            self.sync()
        except BaseException:
            self.output.close(failed=True)    # nothing was overwritten: no undo file
            raise

    def save(self, offset, length):
        """Append the current content of a region; what lies past the old end needs none."""
        stop = min(offset + length, self.dest.initial_size)
        while offset < stop:
            size = min(stop - offset, self.chunk_size)
            self.writer.write_chunk(offset, self.dest.read(offset, size, self.buffer))
            offset += size

    def sync(self):
        self.output.sync()

    def finish(self):
        self.writer.finish()
        self.output.finish()
        self.close()

    def close(self):
        self.output.close()


class ChunkIndex:
    """Where each chunk of an undo file is: its Chunk fields, without the payload.

    Kept in arrays, 29 bytes a chunk: as tuples, 280 (measured: a stream of
    1-byte chunks applied with --undo took 94 MB to roll back 256 KiB).
    """

    def __init__(self):
        self.zero = bytearray()
        self.numbers = array.array(BLOCK_TYPECODE)     # seq, length, crc: 32 bits each
        self.places = array.array(U64)                 # offset, position: 64 bits each

    def append(self, chunk):
        self.zero.append(chunk.tag == TAG_ZERO)
        self.numbers.extend((chunk.seq, chunk.length, chunk.crc))
        self.places.extend((chunk.offset, chunk.position))

    def __len__(self):
        return len(self.zero)

    def __getitem__(self, index):
        numbers, places = self.numbers, self.places
        return Chunk(TAG_ZERO if self.zero[index] else TAG_DATA, numbers[3 * index],
                     places[2 * index], numbers[3 * index + 1], numbers[3 * index + 2],
                     places[2 * index + 1], None)

    def __reversed__(self):
        for index in range(len(self.zero) - 1, -1, -1):
            yield self[index]


class UndoFile:
    """An undo file read back: its header, its intact chunks, and how it ends.

    header None: the file holds no complete header, so the apply that made it
    changed nothing (the header is synced before any overwrite).  complete:
    the trailer is there and proves every chunk.  Otherwise damage is None
    for a file cut short (a crash: it ends, or zeros follow, after its last
    intact chunk) or says what is wrong in the middle of it.  payloads=False:
    only the chunk headers and the trailer are read and checked; whoever reads
    a payload checks it (VersionImage does).
    """

    def __init__(self, path, payloads=True):
        self.path = path
        self.payloads = payloads
        try:
            self.file = BlockFile(path, os.O_RDONLY, "undo file ")
        except OSError as exc:
            raise _os_error(exc, "cannot open undo file %s" % path) from None
        self.fd = self.file.fd
        try:
            if self.file.is_block:
                raise DeviceError("undo file %s is not a regular file" % path)
            self.header = None
            self.chunks = ChunkIndex()
            self.complete = False
            self.damage = None
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self):
        inp = Input.of(io.open(self.fd, "rb", buffering=0, closefd=False), self.path)
        first = os.pread(self.fd, len(MAGIC), 0)
        if first != MAGIC:
            if _zeros_from(self.fd, 0) or (len(first) < len(MAGIC) and MAGIC.startswith(first)):
                return                # created, then the apply died: it changed nothing
            raise StreamError("%s is not an undo file (it starts with %r)"
                              % (shown(self.path), first))
        try:
            header = StreamHeader.read(inp)
        except TruncatedStream:
            return
        except StreamError as exc:
            raise exc.__class__("undo file %s: %s" % (shown(self.path), exc)) from None
        if not header.undo:
            raise StreamError("%s is a stream, not an undo file" % shown(self.path))
        self.header = header
        reader = StreamReader(inp, header, payloads=self.payloads)
        try:
            for chunk in reader:
                self.chunks.append(chunk)
            self.complete = True
        except TruncatedStream:
            pass
        except StreamError as exc:
            # A crash can leave zeros after the last complete chunk: a cut, not damage.
            if not _zeros_from(self.fd, reader.record_start):
                self.damage = str(exc)

    def newest_first(self, take_buffer):
        """Yield the intact chunks, last first, each payload read again and checked."""
        for chunk in reversed(self.chunks):
            if chunk.tag == TAG_ZERO:
                yield chunk
                continue
            try:
                payload = self.file.read(chunk.position, chunk.length, take_buffer())
            except ShortRead:
                payload = None
            except DeviceError as exc:
                raise _os_error(exc, "cannot read %s" % self.path) from None
            fields = CHUNK_FIELDS.pack(chunk.tag, chunk.seq, chunk.offset, chunk.length)
            if payload is None or chunk_crc(self.header.crc, fields, payload) != chunk.crc:
                raise ChecksumMismatch("undo file %s changed while being read (chunk %d)"
                                       % (self.path, chunk.seq))
            yield chunk._replace(payload=payload)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _zeros_from(fd, position):
    """Whether the file holds only zero bytes from `position` on."""
    while True:
        piece = os.pread(fd, 1 << 20, position)
        if not piece:
            return True
        if piece.strip(b"\0"):
            return False
        position += len(piece)


def check_undo_fits(header, dest, path):
    """An undo file goes back only onto the mirror its apply wrote.

    Seen: another mirror's undo file cut a 16 MiB mirror to 4 MiB.  The
    mirror's size must be its size before that apply, after it, or in between
    (a growing apply killed midway); undo files of 0.1 do not say what it was
    after, so only a block device's size is checked for them.
    """
    low = high = header.device_size
    if header.target_size is not None:
        low, high = min(low, header.target_size), max(high, header.target_size)
    elif not dest.is_block:
        return
    if not low <= dest.size <= high:
        after = "" if header.target_size is None else \
            ", %d bytes after its apply" % header.target_size
        raise ChainError("undo file %s is for a mirror of %d bytes before its apply%s, but %s "
                         "has %d bytes: wrong mirror? (--force goes on anyway)"
                         % (shown(path), header.device_size, after, shown(dest.path),
                            dest.size))


# ---------------------------------------------------------------------------
# Versions: what the mirror and its undo files give back, read-only
# ---------------------------------------------------------------------------


class Version(collections.namedtuple("Version", "era size applied replaced undo chain")):
    """A version a mirror can give back.

    era: the era it was at; size: its bytes; applied: when the apply that
    made it ran (None where nothing recorded it); replaced: when the apply
    that replaced it began (None for the mirror's own); undo: the undo file
    of that apply, which holds what it overwrote (None for the mirror's own);
    chain: the undo files that take the mirror back to it, newest first.
    """


class Versions:
    """A mirror's versions: its own, and an older one per undo file of its chain.

    The chain runs down from the mirror's state: the newest link is the undo
    file whose apply took the mirror to the era and stream its state names,
    the next the one whose apply took it to where that one leads back, and
    so on (by era, and by stream where the undo files name it).  It stops at
    the first link that is missing, cut short or damaged: the versions beyond
    it cannot be rebuilt, and `problems` says why, with any undo file left
    outside the chain.  check: every undo file is read through and every
    chunk checked here (versions says a chain is whole); otherwise only their
    chunk headers and trailers, and VersionImage checks each payload it uses
    as it reads it (export and serve: an undo file is not read twice).  The
    mirror and the undo files are opened read-only, and the
    mirror is locked shared while this lives: an apply or rollback cannot
    change it under a reader (nor can a reader start under them).
    """

    def __init__(self, mirror, state=None, undo_paths=None, check=True):
        self.path = mirror
        self.check = check
        self.opened = []              # every UndoFile read, closed at close()
        self.versions = []
        self.problems = []            # (undo file or None, what is wrong)
        self.state_path = MirrorState.path_for(mirror, state)
        try:
            self.mirror = BlockFile(mirror, os.O_RDONLY, "mirror ", direct=True)
        except OSError as exc:
            raise _os_error(exc, "cannot open %s" % mirror) from None
        try:
            import fcntl
            try:
                fcntl.flock(self.mirror.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceError("%s is being written by another era_tool (apply or "
                                  "rollback): read it after that" % mirror) from None
            self._read_chain(undo_paths)
        except BaseException:
            self.close()
            raise

    def _read_chain(self, undo_paths):
        mirror = self.path
        if self.state_path is None:
            raise ChainError("%s is a block device: --state FILE names its state file"
                             % shown(mirror))
        state = MirrorState.load(self.state_path)
        if not state.known or state.era is None:
            raise ChainError("%s has no recorded version (no era in %s): nothing to give back"
                             % (shown(mirror), shown(self.state_path)))
        if state.stepping_back is not None:
            raise ChainError("a step back of %s stopped midway, so it holds parts of two "
                             "versions: finish it first (rollback UNDO_FILE %s)"
                             % (shown(mirror), shown(mirror)))
        if state.interrupted is not None:
            raise ChainError("an apply into %s stopped midway, so it holds parts of two "
                             "versions: resume it first (info %s shows the token)"
                             % (shown(mirror), shown(mirror)))
        size = state.source_size
        if not self.mirror.is_block and self.mirror.size() != size:
            raise ChainError("%s has %d bytes but its state (%s) says %d: changed behind "
                             "era_tool's back?" % (shown(mirror), self.mirror.size(),
                                                   shown(self.state_path), size))
        self.source_id, self.block_size = state.source_id, state.block_size
        self.versions.append(Version(state.era, size, state.applied, None, None, ()))
        left = self._undo_files(undo_paths)
        era, crc, chain = state.era, state.stream_crc, []
        while True:
            undo = next((undo for undo in left if self._leads_to(undo.header, era, crc)), None)
            if undo is None:
                break
            left.remove(undo)
            header = undo.header
            problem = None
            if undo.damage is not None:
                problem = "is damaged (%s)" % undo.damage
            elif not undo.complete:
                problem = "is cut short (its apply did not finish)"
            elif header.target_size is not None and not self.mirror.is_block \
                    and header.target_size != size:
                problem = "is for a version of %d bytes, but the one at era %d has %d" % (
                    header.target_size, era, size)
            if problem is not None:
                self.problems.append((undo.path, "%s: the versions before era %d cannot be "
                                                 "rebuilt" % (problem, era)))
                break
            if header.era is None:
                break                 # it goes back to a mirror with no era: not a version
            chain.append(undo.path)
            self.versions.append(Version(header.era, header.device_size, None, header.created,
                                         undo.path, tuple(chain)))
            era, crc, size = header.era, header.previous_crc, header.device_size
        # A version was made by the apply that the next older one's undo file started.
        for index in range(1, len(self.versions) - 1):
            self.versions[index] = self.versions[index]._replace(
                applied=self.versions[index + 1].replaced)
        for undo in left:
            header = undo.header
            self.problems.append((undo.path, "is not in the chain, which stops at era %d (no "
                                             "undo file left goes back from there): it goes "
                                             "back from era %s to era %s" % (
                                                 era, header.since_era, header.era)))

    def _leads_to(self, header, era, crc):
        """Whether the apply of this undo file took the mirror to `era` and stream `crc`."""
        return header.since_era == era and header.source_id == self.source_id \
            and header.block_size == self.block_size \
            and (crc is None or header.target_crc is None or header.target_crc == crc)

    def _undo_files(self, paths):
        """The undo files named (else MIRROR.undo.* beside the mirror, newest name first), read."""
        if paths is None:
            directory, name = os.path.split(self.path)
            try:
                names = os.listdir(directory or ".")
            except OSError as exc:
                raise _os_error(exc, "cannot list %s" % (directory or ".")) from None
            paths = [os.path.join(directory, other) for other in sorted(names, reverse=True)
                     if other.startswith(name + ".undo.")]
        found, seen = [], set()
        for path in paths:
            try:
                undo = UndoFile(path, payloads=self.check)
            except EraError as exc:
                self.problems.append((path, "cannot be read: %s" % exc))
                continue
            self.opened.append(undo)
            info = undo.file.info
            if (info.st_dev, info.st_ino) in seen:
                continue              # named twice (a link): one file
            seen.add((info.st_dev, info.st_ino))
            if undo.header is not None:  # else its apply changed nothing: no version
                found.append(undo)
        return found

    def select(self, era=None):
        """The newest version at `era` (None: the mirror's own); refused with why if none."""
        if era is None:
            return self.versions[0]
        for version in self.versions:
            if version.era == era:
                return version
        why = "; ".join("%s %s" % (shown(path), problem) for path, problem in self.problems)
        raise ChainError("%s has no version at era %d that can be rebuilt (it has era%s %s)%s"
                         % (shown(self.path), era, "s" if len(self.versions) > 1 else "",
                            ", ".join(str(version.era) for version in self.versions),
                            ": " + why if why else ""))

    def inputs(self):
        """(label, path) of every file read: no output may be one of them."""
        return [("MIRROR %s" % self.path, self.path),
                ("the state file %s" % self.state_path, self.state_path)] + \
            [("undo file %s" % undo.path, undo.path) for undo in self.opened]

    def image(self, version):
        return VersionImage(self, version)

    def close(self):
        for undo in self.opened:
            undo.close()
        self.opened = []
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class VersionImage:
    """One version's bytes, read from the mirror and the undo files of its chain.

    Each region comes from the undo file closest to the version that holds
    it (the oldest of the chain first: it saved the content the version
    had), and the rest from the mirror.  A source for read_ahead
    and the NBD server: read() is safe from several threads.  Undo data is
    read a whole chunk at a time and its checksum checked again before use.
    """

    def __init__(self, versions, version):
        self.versions = versions
        self.version = version
        self.size = version.size
        self.mirror = versions.mirror
        by_path = {undo.path: undo for undo in versions.opened}
        self.layers = [by_path[path] for path in reversed(version.chain)]
        self.local = threading.local()
        self._map()

    def _map(self):
        """Sort the undo chunks into pieces: starts, ends, layer and chunk of each."""
        import heapq
        items = []
        for rank, undo in enumerate(self.layers):
            places, numbers = undo.chunks.places, undo.chunks.numbers
            for number in range(len(undo.chunks)):
                start = places[2 * number]
                end = min(start + numbers[3 * number + 1], self.size)
                if start < end:
                    # The item's place in this list is its priority: the first wins.
                    items.append((start, len(items), end, rank, number))
        items.sort()
        points = sorted(set(item[0] for item in items) | set(item[2] for item in items))
        self.starts, self.ends = array.array(U64), array.array(U64)
        self.ranks, self.numbers = array.array("i"), array.array(U64)
        heap, next_item = [], 0
        for index, point in enumerate(points[:-1]):
            while next_item < len(items) and items[next_item][0] == point:
                _, order, end, rank, number = items[next_item]
                heapq.heappush(heap, (order, end, rank, number))
                next_item += 1
            while heap and heap[0][1] <= point:
                heapq.heappop(heap)   # ended: what lies below it wins from here
            if not heap:
                continue
            _, _, rank, number = heap[0]
            if self.ends and self.ends[-1] == point and self.ranks[-1] == rank \
                    and self.numbers[-1] == number:
                self.ends[-1] = points[index + 1]
            else:
                self.starts.append(point)
                self.ends.append(points[index + 1])
                self.ranks.append(rank)
                self.numbers.append(number)

    def read(self, offset, length, buffer):
        """Exactly `length` bytes of the version at `offset`, into `buffer`; return a view."""
        import bisect
        stop = offset + length
        if offset < 0 or stop > self.size:
            raise ShortRead("the version at era %d ends at offset %d, expected %d bytes"
                            % (self.version.era, self.size, stop), 0)
        view = memoryview(buffer)[:length]
        first = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        pieces, gaps, position = [], [], offset
        index = first
        while index < len(self.starts) and self.starts[index] < stop:
            start, end = self.starts[index], self.ends[index]
            if end > offset:
                if start > position:
                    gaps.append((position, start))    # the mirror's
                pieces.append(index)
                position = end
            index += 1
        if position < stop:
            gaps.append((position, stop))
        if offset % DIRECT_ALIGN and gaps:
            # Not aligned in the buffer, so no O_DIRECT read of a gap alone: one read
            # of all the mirror holds here, and the undo data over it after.
            gaps = [(offset, gaps[-1][1])]
        for start, end in gaps:
            # Only what the version takes from the mirror: an undo file's part is read once.
            self.mirror.read(start, end - start, view[start - offset:])
        for index in pieces:
            start, end = max(self.starts[index], offset), min(self.ends[index], stop)
            chunk, payload = self._chunk(self.ranks[index], self.numbers[index])
            if payload is None:
                view[start - offset:end - offset] = bytes(end - start)
            else:
                view[start - offset:end - offset] = \
                    payload[start - chunk.offset:end - chunk.offset]
        return view

    def _chunk(self, rank, number):
        """An undo chunk and its payload (None: a zero chunk), checked; the last one kept."""
        local = self.local
        if getattr(local, "key", None) == (rank, number):
            return local.chunk, local.payload
        undo = self.layers[rank]
        chunk = undo.chunks[number]
        payload = None
        if chunk.tag == TAG_DATA:
            if getattr(local, "buffer", None) is None or len(local.buffer) < chunk.length:
                local.buffer = aligned_buffer(max(chunk.length, undo.header.chunk_size))
            try:
                payload = undo.file.read(chunk.position, chunk.length, local.buffer)
            except ShortRead:
                payload = None
            fields = CHUNK_FIELDS.pack(chunk.tag, chunk.seq, chunk.offset, chunk.length)
            if payload is None or chunk_crc(undo.header.crc, fields, payload) != chunk.crc:
                raise ChecksumMismatch(
                    "undo file %s is damaged or changed while being read (chunk %d does not "
                    "match its checksum): the version at era %d cannot be rebuilt from it; "
                    "'versions' checks every undo file" % (shown(undo.path), chunk.seq,
                                                          self.version.era))
        local.key, local.chunk, local.payload = (rank, number), chunk, payload
        return chunk, payload


# ---------------------------------------------------------------------------
# NBD: a version served read-only to nbd-client, over a Unix socket
# ---------------------------------------------------------------------------


class NbdServer:
    """A read-only NBD server (fixed newstyle handshake, simple replies) of one image.

    Each client gets a thread.  Any request that would write is answered
    EPERM, a read past the end or a command not known EINVAL, a failed read
    EIO; a client that breaks the protocol (bad magic, an option too long to
    be one) is disconnected.  Nothing here opens anything for writing.
    """

    def __init__(self, image, path, log):
        import socket
        self.image = image
        self.path = path
        self.log = log
        self.reads = 0
        self.clients = {}             # connection -> its thread
        self.guard = threading.Lock()
        self._claim_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound and listening under a temporary name, then linked to its own: a
        # client never finds the name before it answers, and nothing is replaced.
        temporary = "%s.%d.new" % (path, os.getpid())
        old = os.umask(0o177)         # the socket 0600: it gives a disk's image to whoever connects
        try:
            self.sock.bind(temporary)
            self.sock.listen(NBD_BACKLOG)
            os.link(temporary, path)
        except OSError as exc:
            self.sock.close()
            raise _os_error(exc, "cannot create socket %s" % path) from None
        finally:
            os.umask(old)
            try:
                os.unlink(temporary)
            except OSError:
                pass
        self.identity = os.stat(path).st_ino

    def _claim_path(self):
        """A socket left by a server that died is replaced; a live one or anything else is not."""
        import socket
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _os_error(exc, "cannot use %s" % self.path) from None
        if not stat.S_ISSOCK(info.st_mode):
            raise EraError("%s exists and is not a socket: give a new name" % shown(self.path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)      # nobody listens: a dead server's
            return
        finally:
            probe.close()
        raise EraError("%s is being served by another process" % shown(self.path))

    def serve_forever(self):
        """Accept clients until interrupted (KeyboardInterrupt: SIGINT, SIGTERM, SIGHUP)."""
        while True:
            conn, _ = self.sock.accept()
            with self.guard:
                if len(self.clients) >= NBD_MAX_CLIENTS:
                    conn.close()
                    self.log("a client was turned away: %d are connected" % NBD_MAX_CLIENTS)
                    continue
                thread = threading.Thread(target=self._client, args=(conn,), daemon=True,
                                          name="era_tool nbd client")
                self.clients[conn] = thread
            thread.start()

    def close(self):
        import socket
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.identity:
                os.unlink(self.path)
        except OSError:
            pass
        with self.guard:
            clients = list(self.clients.items())
        for conn, _ in clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)   # a client thread's read returns
            except OSError:
                pass
        for _, thread in clients:
            thread.join(1)

    def _client(self, conn):
        try:
            try:
                if self._handshake(conn):
                    self._transmission(conn)
            except _NbdClosed as exc:
                if str(exc):
                    self.log("a client was disconnected: %s" % exc)
            except OSError:
                pass                  # the client went away
        finally:
            with self.guard:
                self.clients.pop(conn, None)
            conn.close()

    def _handshake(self, conn):
        """Option haggling; True once the client asked to go to transmission."""
        image = self.image
        conn.sendall(NBD_INIT_MAGIC + NBD_SERVER_HELLO.pack(
            NBD_OPTS_MAGIC, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        (client_flags,) = NBD_CLIENT_FLAGS.unpack(_recv_exact(conn, NBD_CLIENT_FLAGS.size))
        if client_flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise _NbdClosed("unknown client flags 0x%x" % client_flags)
        fixed = client_flags & NBD_FLAG_C_FIXED_NEWSTYLE
        export = NBD_EXPORT_INFO.pack(NBD_INFO_EXPORT, image.size, NBD_TRANSMISSION_FLAGS)
        while True:
            magic, option, length = NBD_OPTION.unpack(_recv_exact(conn, NBD_OPTION.size))
            if magic != NBD_OPTS_MAGIC:
                raise _NbdClosed("bad option magic 0x%x" % magic)
            if length > NBD_MAX_OPTION:
                raise _NbdClosed("an option of %d bytes" % length)
            data = _recv_exact(conn, length)
            if option == NBD_OPT_EXPORT_NAME:
                # The only export has every name: nbd-client asks for "" by default.
                conn.sendall(export[2:] + (b"" if client_flags & NBD_FLAG_C_NO_ZEROES
                                           else bytes(124)))
                return True
            if not fixed:
                raise _NbdClosed("option %d from a client without the fixed handshake"
                                 % option)
            if option == NBD_OPT_ABORT:
                _nbd_reply(conn, option, NBD_REP_ACK)
                return False
            if option == NBD_OPT_LIST:
                if length:
                    _nbd_reply(conn, option, NBD_REP_ERR_INVALID)
                    continue
                _nbd_reply(conn, option, NBD_REP_SERVER, NBD_U32.pack(0))
                _nbd_reply(conn, option, NBD_REP_ACK)
            elif option in (NBD_OPT_INFO, NBD_OPT_GO):
                wanted = _nbd_info_requests(data)
                if wanted is None:
                    _nbd_reply(conn, option, NBD_REP_ERR_INVALID)
                    continue
                _nbd_reply(conn, option, NBD_REP_INFO, export)
                if NBD_INFO_BLOCK_SIZE in wanted:
                    _nbd_reply(conn, option, NBD_REP_INFO, NBD_BLOCK_SIZES.pack(
                        NBD_INFO_BLOCK_SIZE, 1, DIRECT_ALIGN, NBD_MAX_READ))
                _nbd_reply(conn, option, NBD_REP_ACK)
                if option == NBD_OPT_GO:
                    return True
            else:
                _nbd_reply(conn, option, NBD_REP_ERR_UNSUP)

    def _transmission(self, conn):
        """Serve requests, one at a time, until the client disconnects."""
        image = self.image
        ahead = _ReadAhead(image)
        try:
            while True:
                magic, _, kind, handle, offset, length = NBD_REQUEST.unpack(
                    _recv_exact(conn, NBD_REQUEST.size))
                if magic != NBD_REQUEST_MAGIC:
                    raise _NbdClosed("bad request magic 0x%x" % magic)
                error = 0
                in_range = offset + length <= image.size
                if kind == NBD_CMD_READ:
                    if not in_range or length > NBD_MAX_READ:
                        error = errno.EINVAL
                    else:
                        try:
                            view = ahead.read(offset, length)
                        except EraError as exc:
                            self.log("read of %d bytes at offset %d failed: %s"
                                     % (length, offset, exc))
                            error = errno.EIO
                        else:
                            conn.sendall(NBD_REPLY.pack(NBD_REPLY_MAGIC, 0, handle))
                            conn.sendall(view)
                            self.reads += 1
                            continue
                elif kind == NBD_CMD_DISC:
                    return
                elif kind == NBD_CMD_WRITE:
                    if length > NBD_MAX_READ:
                        raise _NbdClosed("a write of %d bytes" % length)
                    _recv_exact(conn, length)     # its data, to keep in step with the client
                    error = errno.EPERM
                elif kind in (NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES):
                    error = errno.EPERM
                elif kind == NBD_CMD_FLUSH:
                    error = 0                 # nothing is ever written: nothing to flush
                elif kind == NBD_CMD_CACHE:
                    error = 0 if in_range else errno.EINVAL
                else:
                    error = errno.EINVAL
                conn.sendall(NBD_REPLY.pack(NBD_REPLY_MAGIC, error, handle))
        finally:
            ahead.close()


class _ReadAhead:
    """One client's reads; for a client that reads in order, read ahead as copy reads.

    Once a read starts where the one before it ended, the rest of the image
    is read ahead by read_ahead() (CHUNK_SIZE pieces, two in flight, a few
    buffered) and the reads are served from it, while they go in order: the
    disk is kept busy as under copy, not idle while a reply is sent.  Any
    other read stops it and is read alone.  So is a read whose piece read
    ahead failed (damaged undo data there fails only the reads that need it),
    and no read ahead starts again before the end of that piece.  A read is a
    view of one buffer, valid until the next read.
    """

    def __init__(self, image):
        self.image = image
        self.buffer = aligned_buffer(NBD_MAX_READ)
        self.chunks = None            # read_ahead() from where the client reads in order
        self.current = None           # (offset, view) of its chunk now
        self.last_end = None
        self.failed_until = 0         # no read ahead of a piece that failed: read alone

    def read(self, offset, length):
        sequential = offset == self.last_end
        self.last_end = None
        if self.chunks is not None:
            start, view = self.current
            if not start <= offset <= start + len(view):
                self.stop()
        if self.chunks is None and sequential and offset >= self.failed_until:
            self.chunks = read_ahead(self.image, [(offset, self.image.size - offset)],
                                     CHUNK_SIZE)
            self.current = (offset, memoryview(b""))
        result = None
        if self.chunks is not None:
            result = self._from_chunks(offset, length)
        if result is None:
            result = self.image.read(offset, length, self.buffer)
        self.last_end = offset + length
        return result

    def _from_chunks(self, offset, length):
        """The read from the pieces read ahead; None if one of them failed."""
        out = memoryview(self.buffer)
        position, stop = offset, offset + length
        try:
            while position < stop:
                start, view = self.current
                if position >= start + len(view):
                    try:
                        start, view, _ = next(self.chunks)
                    except EraError:
                        self.failed_until = start + len(view) + CHUNK_SIZE
                        self.stop()
                        return None
                    self.current = (start, view)
                count = min(stop, start + len(view)) - position
                out[position - offset:position - offset + count] = \
                    view[position - start:position - start + count]
                position += count
        except BaseException:
            self.stop()
            raise
        return out[:length]

    def stop(self):
        if self.chunks is not None:
            chunks, self.chunks, self.current = self.chunks, None, None
            chunks.close()

    close = stop


class _NbdClosed(Exception):
    """The client is disconnected; the message (if any) says why."""


def _recv_exact(conn, count):
    """Exactly `count` bytes from the client; _NbdClosed if it goes away first."""
    parts, left = [], count
    while left:
        part = conn.recv(min(left, 1 << 20))
        if not part:
            raise _NbdClosed("")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _nbd_reply(conn, option, kind, data=b""):
    conn.sendall(NBD_OPTION_REPLY.pack(NBD_REPLY_OPT_MAGIC, option, kind, len(data)) + data)


def _nbd_info_requests(data):
    """The info types an NBD_OPT_INFO or _GO asks for, or None if it is malformed."""
    if len(data) < 4:
        return None
    (name_length,) = NBD_U32.unpack_from(data)
    rest = len(data) - 4 - name_length
    if name_length > len(data) - 4 or rest < 2:
        return None
    (count,) = NBD_U16.unpack_from(data, 4 + name_length)
    if rest != 2 + 2 * count:
        return None
    return set(struct.unpack_from(">%dH" % count, data, 6 + name_length))


# ---------------------------------------------------------------------------
# Sums: proving a mirror equal to its source without sending the data
# ---------------------------------------------------------------------------


class SumHeader:
    """A sum stream's header: which blocks were hashed, how, with which key.

    A digest is hash(key + block)[:digest_size], over the block's bytes on the
    device (the last block clipped at its end).  The key is chosen by the side
    that compares, so the side that is compared cannot prepare data whose
    digests collide.
    """

    def __init__(self, device_size, block_size, begin, end, hash_name=DEFAULT_HASH, key=None,
                 digest_size=SUM_DIGEST_SIZE, since_era=None):
        self.device_size = device_size
        self.block_size = block_size
        self.begin = begin
        self.end = end
        self.hash_name = hash_name
        self.key = os.urandom(SUM_KEY_SIZE) if key is None else key
        self.digest_size = digest_size
        self.since_era = since_era
        self.raw = None

    @property
    def block_bytes(self):
        return self.block_size * SECTOR

    @property
    def blocks(self):
        return self.end - self.begin

    def pack(self):
        flags = SUM_FLAG_CHANGED if self.since_era is not None else 0
        raw = SUM_HEADER.pack(SUM_MAGIC, SUM_VERSION, flags, self.device_size, self.block_size,
                              self.begin, self.end, self.since_era or 0,
                              self.hash_name.encode("ascii"), self.digest_size,
                              len(self.key)) + self.key
        self.raw = raw + CRC.pack(zlib.crc32(raw))
        return self.raw

    @classmethod
    def read(cls, inp):
        """Read and check a header; StreamError if it is not one era_tool would write."""
        raw = inp.read_exact(SUM_HEADER.size, "the sum header")
        (magic, version, flags, device_size, block_size, begin, end, since_era, name,
         digest_size, key_length) = SUM_HEADER.unpack(raw)
        if magic != SUM_MAGIC:
            raise StreamError("not an era_tool sum stream (%s)" % (
                "an era_tool stream: verify reads what 'sum' writes" if magic == MAGIC else
                "bad magic %s" % magic.hex()))
        if version != SUM_VERSION:
            raise StreamError("sum stream version %d; this era_tool reads version %d"
                              % (version, SUM_VERSION))
        key = inp.read_exact(key_length, "the sum header's key")
        crc = inp.read_exact(CRC.size, "the sum header's CRC")
        if CRC.unpack(crc)[0] != zlib.crc32(raw + key):
            raise ChecksumMismatch("sum header checksum mismatch: the sums are damaged")
        # The CRC holds: what follows is a header someone made, checked field by field.
        hash_name = name.rstrip(b"\0").decode("ascii", "replace")
        problem = None
        if flags & ~SUM_FLAG_CHANGED:
            problem = "unknown flags 0x%x" % (flags & ~SUM_FLAG_CHANGED)
        elif hash_name not in SUM_HASHES or name != hash_name.encode().ljust(16, b"\0"):
            problem = "hash %r is not one of %s" % (hash_name, ", ".join(SUM_HASHES))
        elif not 8 <= digest_size <= 32:
            problem = "digest size %d (8 to 32 bytes)" % digest_size
        elif not MIN_SUM_KEY <= key_length <= MAX_SUM_KEY:
            problem = "key of %d bytes (%d to %d)" % (key_length, MIN_SUM_KEY, MAX_SUM_KEY)
        elif block_size == 0 or block_size % SECTORS_PER_PAGE or \
                block_size * SECTOR > MAX_SUM_BLOCK:
            problem = "block size %d sectors" % block_size
        elif device_size > MAX_OFFSET or -(-device_size // (block_size * SECTOR)) > MAX_BLOCK:
            problem = "device size %d" % device_size
        elif not begin < end or end * block_size * SECTOR - device_size >= block_size * SECTOR:
            problem = "blocks %d to %d of a device of %d bytes" % (begin, end, device_size)
        elif since_era and not flags & SUM_FLAG_CHANGED:
            problem = "a since-era without a changed list"
        if problem:
            raise StreamError("bad sum header: %s" % problem)
        header = cls(device_size, block_size, begin, end, hash_name, key, digest_size,
                     since_era if flags & SUM_FLAG_CHANGED else None)
        header.raw = raw + key + crc
        return header

    def hasher(self):
        """work(offset, view) for read_ahead: the digests of the whole blocks in view."""
        import hashlib
        keyed = hashlib.new(self.hash_name)
        keyed.update(self.key)
        block_bytes, size = self.block_bytes, self.digest_size

        def digests(offset, view):
            out = bytearray()
            for start in range(0, len(view), block_bytes):
                digest = keyed.copy()
                digest.update(view[start:start + block_bytes])
                out += digest.digest()[:size]
            return out
        return digests

    def as_dict(self):
        return {"device_size": self.device_size, "block_size": self.block_size,
                "begin": self.begin, "end": self.end, "hash": self.hash_name,
                "digest_size": self.digest_size, "since_era": self.since_era}


def sum_chunk_size(block_bytes):
    """Reads of whole blocks, about CHUNK_SIZE each (one block, if larger)."""
    return block_bytes * max(1, CHUNK_SIZE // block_bytes)


def sum_device(source, header, output, progress, changed=None, limit=None):
    """sum's engine: the digests of the header's blocks of `source`, to `output`.

    changed: a function returning the blocks written since header.since_era
    (a ChangedBlocks), called after the data is read, so that the writes that
    landed during the read are among them.  limit: a RateLimit for the reads.
    """
    block_bytes = header.block_bytes
    start = header.begin * block_bytes
    stop = min(header.end * block_bytes, header.device_size)
    crc = zlib.crc32(header.pack())
    output.write(header.raw)
    done = 0
    chunk_size = sum_chunk_size(block_bytes)
    if limit is not None:
        chunk_size = limit.chunk_size(chunk_size, block_bytes)
    for _, digests, _ in read_ahead(source, [(start, stop - start)], chunk_size,
                                    header.hasher(), limit):
        output.write(digests)
        crc = zlib.crc32(digests, crc)
        done += len(digests) // header.digest_size * block_bytes
        progress.update(min(done, stop - start))
    if changed is not None:
        ranges = changed()

        def clipped():          # twice over the arrays: a list of tuples costs 120 bytes a range
            for begin, end in ranges:
                if end > header.begin and begin < header.end:
                    yield SUM_RANGE.pack(max(begin, header.begin), min(end, header.end))
        piece = SUM_CHANGED.pack(TAG_CHANGED, ranges.current_era, sum(1 for _ in clipped()))
        pieces = clipped()
        while piece:
            output.write(piece)
            crc = zlib.crc32(piece, crc)
            piece = b"".join(itertools.islice(pieces, 1 << 16))
    piece = SUM_TRAILER_FIELDS.pack(TAG_DONE, header.blocks)
    output.write(piece, CRC.pack(zlib.crc32(piece, crc)))
    return stop - start


class Verdict:
    """What verify found: the blocks whose digests differ, split by the changed list."""

    def __init__(self, header):
        self.header = header
        self.differ = RangeList()   # digests differ (or the block is past the mirror's end)
        self.changed = RangeList()  # the changed list of the sums
        self.changed_era = None
        self.extra_bytes = 0        # the mirror is this much longer than the source
        self.seconds = 0.0

    def split(self):
        """(diverged, changed): differing blocks outside the changed list, and in it."""
        diverged, changed = RangeList(), RangeList()
        others = iter(self.changed)
        other = next(others, None)
        for begin, end in self.differ:
            while begin < end:
                while other is not None and other[1] <= begin:
                    other = next(others, None)
                if other is None or other[0] >= end:
                    diverged.add(begin, end)
                    break
                if begin < other[0]:
                    diverged.add(begin, other[0])
                    begin = other[0]
                stop = min(end, other[1])
                changed.add(begin, stop)
                begin = stop
        return diverged, changed


def verify_mirror(inp, header, mirror, progress):
    """verify's engine: the mirror hashed as `header` says, compared with the sums in `inp`.

    Reads the rest of the sum stream, checking its trailer, and returns a
    Verdict; StreamError for sums that are damaged or cut short.
    """
    started = time.monotonic()
    verdict = Verdict(header)
    block_bytes, size = header.block_bytes, header.digest_size
    # The blocks wholly on the mirror are read; the rest differ without a read.
    readable = header.end if mirror.size >= header.device_size else \
        min(header.end, max(header.begin, mirror.size // block_bytes))
    start = header.begin * block_bytes
    stop = min(readable * block_bytes, header.device_size)
    crc = zlib.crc32(header.raw)
    block = header.begin
    for _, ours, _ in read_ahead(mirror, [(start, stop - start)], sum_chunk_size(block_bytes),
                                 header.hasher()):
        theirs = inp.read_exact(len(ours), "the digests")
        crc = zlib.crc32(theirs, crc)
        if theirs != ours:
            for at in range(0, len(ours), size):
                if theirs[at:at + size] != ours[at:at + size]:
                    verdict.differ.add(block + at // size, block + at // size + 1)
        block += len(ours) // size
        progress.update((block - header.begin) * block_bytes)
    left = (header.end - block) * size
    while left:
        piece = inp.read_exact(min(left, 1 << 20), "the digests")
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    if block < header.end:
        verdict.differ.add(block, header.end)
    if header.since_era is not None:
        piece = inp.read_exact(SUM_CHANGED.size, "the changed list")
        tag, era, count = SUM_CHANGED.unpack(piece)
        if tag != TAG_CHANGED:
            raise StreamError("bad sum stream: no changed list after the digests")
        crc = zlib.crc32(piece, crc)
        verdict.changed_era = era
        last = header.begin
        for _ in range(count):
            piece = inp.read_exact(SUM_RANGE.size, "the changed list")
            crc = zlib.crc32(piece, crc)
            begin, end = SUM_RANGE.unpack(piece)
            if not last <= begin < end <= header.end:
                raise StreamError("bad sum stream: changed range %d..%d out of order or "
                                  "outside blocks %d..%d" % (begin, end, header.begin,
                                                             header.end))
            verdict.changed.add(begin, end)
            last = end
    piece = inp.read_exact(SUM_TRAILER_FIELDS.size, "the sum trailer")
    tag, blocks = SUM_TRAILER_FIELDS.unpack(piece)
    if tag != TAG_DONE or blocks != header.blocks:
        raise StreamError("bad sum stream: no trailer after %d digests" % header.blocks)
    crc = zlib.crc32(piece, crc)
    recorded = CRC.unpack(inp.read_exact(CRC.size, "the sum trailer"))[0]
    if recorded != crc:
        raise ChecksumMismatch("sum stream checksum mismatch: the sums are damaged")
    if not inp.at_end():
        raise StreamError("data after the end of the sum stream at byte %d" % inp.position)
    if mirror.size > header.device_size and header.end * block_bytes >= header.device_size:
        verdict.extra_bytes = mirror.size - header.device_size
    progress.finish(stop - start)
    verdict.seconds = time.monotonic() - started
    return verdict


# ---------------------------------------------------------------------------
# Messages and progress
# ---------------------------------------------------------------------------


def human(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (count, unit)
        count /= 1024.0


class Progress:
    """`--progress`: bytes done of total, rate and ETA on stderr, a few times a second."""

    INTERVAL = 0.5

    def __init__(self, enabled, verb, total=None, limit=None):
        self.enabled = enabled
        self.verb = verb
        self.total = total
        self.limit = limit            # bytes a second, shown beside the rate
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.INTERVAL:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        text = "%s %s" % (self.verb, human(done))
        if self.total:
            text += " / %s (%d%%)" % (human(self.total), done * 100 // self.total)
        text += ", %s/s" % human(rate)
        if self.limit:
            text += " (limit %s/s)" % human(self.limit)
        if self.total and rate > 0 and done < self.total:
            text += ", ETA %s" % _clock((self.total - done) / rate)
        sys.stderr.write("\r%s\033[K" % text)
        sys.stderr.flush()
        self.shown = True

    def finish(self, done):
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clock(seconds):
    seconds = int(seconds)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def warn(message):
    err("era_tool: warning: %s" % message)


def err(line):
    """A line on stderr, if there is one (2>&- closes it)."""
    if sys.stderr is not None:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def shown(text):
    """Text safe to print: control characters (terminal escape sequences in a
    source id) and the undecodable bytes of a file name as backslash escapes."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else
                   ("\\x%02x" % ord(char) if ord(char) < 0x100 else "\\u%04x" % ord(char))
                   for char in text)


def say(text):
    """A line of output on stdout, in whatever encoding it has.

    PYTHONIOENCODING=ascii and a non-ASCII source id ended in a traceback.
    """
    if sys.stdout is None:
        raise EraError("standard output is closed")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    except (LookupError, UnicodeError):
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    try:
        sys.stdout.write(text + "\n")
    except BrokenPipeError:
        raise EraError(STDOUT_CLOSED) from None


# ---------------------------------------------------------------------------
# Engines: copy's reading, apply's and rollback's writing
# ---------------------------------------------------------------------------


class BufferPool:
    """A few page-aligned buffers handed back and forth between two threads."""

    def __init__(self, count, size):
        self.free = queue.Queue()
        for _ in range(count):
            self.free.put(aligned_buffer(size))

    def take(self):
        return self.free.get()

    def give(self, buffer):
        self.free.put(buffer)


class RateLimit:
    """--rate-limit: the reads of copy and sum, at most `rate` bytes a second, evenly.

    Each read reserves the next free slot of the clock, of its size / rate
    seconds, and its thread sleeps until the slot starts.  Nothing is saved
    up while the reads wait for the consumer, so the rate is not exceeded over
    any interval longer than a slot, and the pieces are small (about 1/40 s
    of the rate) so that the disk and the pipe see a steady flow, not a burst
    each second.  The reads are what is held back: the output follows them,
    at most READ_AHEAD pieces behind.
    """

    SLOTS_PER_SECOND = 40

    def __init__(self, rate):
        self.rate = rate
        self.due = None               # when the next slot starts
        self.lock = threading.Lock()

    def chunk_size(self, largest, unit=DIRECT_ALIGN):
        """A read size of about one slot, in whole units, at most `largest` (one unit at least)."""
        size = self.rate // self.SLOTS_PER_SECOND // unit * unit
        return max(unit, min(largest // unit * unit or unit, size))

    def reserve(self, count):
        """Seconds to wait before reading `count` bytes."""
        with self.lock:
            now = time.monotonic()
            start = now if self.due is None or self.due < now else self.due
            self.due = start + count / self.rate
        return start - now


def read_ahead(source, spans, chunk_size, work=None, limit=None):
    """Yield (offset, view, span) for each chunk of the spans, in order, read by other threads.

    span is the (offset, length) being read when the chunk starts it, else None.
    work(offset, view), if given, runs in the reading thread on each chunk and
    its result is yielded instead of the view (sum and verify hash there: hashlib
    releases the GIL, so the hashing of two chunks runs beside the reads).
    The next chunks are read while this thread checks and writes the current
    one, so a copy costs about max(read, write) rather than their sum (the
    reads, checksums and writes all release the GIL); two readers keep two
    requests in flight, which disks serve faster than one at a time.  A view
    is valid until the next one is asked for.  limit: a RateLimit the reads
    keep to (their slots are taken in the order of the chunks).
    """
    pool = BufferPool(READ_AHEAD, chunk_size)
    requests = _chunk_requests(spans, chunk_size)
    ready = {}                        # chunk number -> (offset, view, buffer, span) or error
    arrived = threading.Condition()
    numbering = threading.Lock()
    issued = [0, None]                # chunks handed out; their total, once known
    stop = threading.Event()

    def reader():
        while True:
            buffer = pool.take()      # before a number: the consumer can always go on
            if buffer is None or stop.is_set():
                return
            wait = 0
            with numbering:
                request = next(requests, None)
                number = issued[0]
                if request is None:
                    issued[1] = number
                else:
                    issued[0] += 1
                    if limit is not None:
                        wait = limit.reserve(request[1])
            if wait > 0 and stop.wait(wait):
                return
            if request is None:
                pool.give(buffer)
                with arrived:
                    arrived.notify_all()
                return
            offset, size, span = request
            try:
                view = source.read(offset, size, buffer)
                if work is not None:
                    view = work(offset, view)
                item = (offset, view, buffer, span)
            except BaseException as exc:   # handed over, raised in the main thread
                item = exc
            with arrived:
                ready[number] = item
                arrived.notify_all()

    threads = [threading.Thread(target=reader, name="era_tool reader", daemon=True)
               for _ in range(READERS)]
    for thread in threads:
        thread.start()
    previous = None
    number = 0
    try:
        while True:
            with arrived:
                while number not in ready and issued[1] != number:
                    arrived.wait()
                item = ready.pop(number, None)
            if previous is not None:
                pool.give(previous)          # the consumer is done with it
                previous = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            offset, view, previous, span = item
            number += 1
            yield offset, view, span
    finally:
        stop.set()
        for _ in threads:
            pool.give(None)                  # wakes a reader waiting for a buffer
        for thread in threads:
            thread.join()


def _chunk_requests(spans, chunk_size):
    """(offset, size, span or None) for each chunk of the spans, in order."""
    for span in spans:
        offset, length = span
        end = offset + length
        while offset < end:
            size = min(chunk_size, end - offset)
            yield offset, size, span if offset == span[0] else None
            offset += size


def copy_device(source, spans, writer, progress, limit=None):
    """copy's engine: the spans of `source`, read ahead, through `writer`; bytes copied.

    writer: a StreamWriter (write_chunk) or a LegacyWriter (start_range, then
    the data).  limit: a RateLimit for the reads (and smaller chunks).
    """
    done = 0
    legacy = isinstance(writer, LegacyWriter)
    chunk_size = CHUNK_SIZE if limit is None else limit.chunk_size(CHUNK_SIZE)
    for offset, piece, span in read_ahead(source, spans, chunk_size, limit=limit):
        if legacy:
            if span is not None:
                writer.start_range(*span)
            writer.output.write(piece)
        else:
            writer.write_chunk(offset, piece)
        done += len(piece)
        progress.update(done)
    if not legacy:
        writer.finish()
    return done


class ChunkWriter:
    """Writes checked chunks to the mirror in a second thread while the next are read.

    release(chunk) is called once a chunk's payload is written (or skipped):
    its buffer may be used again.  After a write error it keeps taking chunks
    (to release them) without writing; the error is raised in the main thread.
    """

    def __init__(self, dest, release, after=None):
        self.dest = dest
        self.release = release
        self.after = after        # after(chunk): called here once it is written
        self.queue = queue.Queue()
        self.error = None
        # Set by the thread itself as it ends.  close() waits on this, not on
        # join() alone: on CPython 3.9.8 to 3.12 a join() interrupted by a signal
        # can mark a live thread as ended, and the next join() returns at once.
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="era_tool writer", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                chunk = self.queue.get()
                if chunk is None:
                    return
                if self.error is None:
                    try:
                        self.dest.put(chunk.offset, chunk.length, chunk.payload)
                        if self.after is not None:
                            self.after(chunk)
                    except BaseException as exc:   # raised in the main thread
                        self.error = exc
                if chunk.payload is not None:
                    self.release(chunk)
        finally:
            self.finished.set()

    def put(self, chunk):
        if self.error is not None:
            raise self.error
        self.queue.put(chunk)

    def close(self):
        """Wait for every queued write; then raise the first write error, if any.

        A signal while it waits does not cut the wait short (nothing may touch
        the mirror, by a roll back or a truncate, while this thread writes); it
        is raised once the writes are done, unless a write error comes first.
        """
        interrupted = None
        while True:
            try:
                self.queue.put(None)      # again after a signal: the thread stops at the first
                self.finished.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        self.thread.join()
        if self.error is not None:
            raise self.error
        if interrupted is not None:
            raise interrupted


def write_chunks(dest, chunks, release, progress, before_writing=None, after_writing=None):
    """The one loop that writes to a mirror: every chunk of `chunks`, in order.

    chunks yields checked Chunks (from a stream, the original format, or an
    undo file); release(chunk) gives a payload's buffer back.
    before_writing() runs once, when the first chunk is checked and before
    anything is written; after_writing(chunk) in the writing thread, after each
    chunk is written.  Returns the bytes covered.
    """
    writer = ChunkWriter(dest, release, after_writing)
    done = 0
    try:
        for chunk in chunks:
            if before_writing is not None:
                before_writing()
                before_writing = None
            writer.put(chunk)
            done += chunk.length
            progress.update(done)
        writer.close()
    except BaseException as exc:
        # Waits again: a signal may have come before close() began to wait.
        try:
            writer.close()          # an earlier write error is the one to report
        except BaseException:
            if not isinstance(exc, KeyboardInterrupt):
                raise
        raise
    return done


class Checkpoints:
    """apply's progress, made durable as it goes: where a resume takes up.

    After each chunk is written (in the writing thread), and at most every
    `every` bytes or CHECKPOINT_SECONDS: the mirror is synced, then the state
    records the end of that chunk as the offset below which this stream is
    applied.  Chunks come in offset order (the reader refuses others), so
    everything of the stream below it is on disk.  Never ahead of the data:
    the offset recorded is one whose data a completed fsync covered.
    """

    def __init__(self, dest, mirror, header, every):
        self.dest = dest
        self.mirror = mirror
        self.header = header
        self.every = every
        self.offset = 0           # the end of the last chunk written
        self.chunk_crc = 0        # the crc of that chunk: it names the data as well
        self.applied = 0          # the stream's bytes written so far
        self.recorded = None      # the offset the state records, once it records one
        self.pending = 0
        self.since = time.monotonic()

    def written(self, chunk):
        self.offset = chunk.offset + chunk.length
        self.chunk_crc = chunk.crc
        self.applied += chunk.length
        self.pending += chunk.length
        if self.pending >= self.every or time.monotonic() - self.since >= CHECKPOINT_SECONDS:
            self.record()

    def record(self):
        self.dest.sync()
        self.mirror.save_progress(self.header, self.offset, self.applied, self.chunk_crc)
        self.recorded = self.offset
        # The state names the mirror now: a failed apply keeps it, and what it holds.
        self.dest.created = False
        self.pending = 0
        self.since = time.monotonic()

    def at_failure(self):
        """The apply failed (a cut or damaged stream, a signal, a full disk) after the
        writer stopped: record how far it got, if it can be made durable."""
        if self.offset == (self.recorded or 0):
            return
        try:
            with _SignalsHeld():
                self.record()
        except (EraError, OSError):
            pass                  # the last checkpoint stands: its data was synced


def _saved_first(reader, undo, free):
    """The chunks of `reader`, each region's old content saved to `undo` first.

    The undo file is synced once per batch, before any chunk of the batch
    is handed on to be written.  The reader reuses its buffer: a batch's
    chunks wait in `free`'s slots of one aligned buffer (one, not one per
    chunk: 512-byte chunks made 65536 mappings, past the kernel's limit).
    """
    pending = []              # chunks whose old content is saved but not yet synced
    held = 0                  # slots that pending chunks hold
    for chunk in reader:
        undo.save(chunk.offset, chunk.length)
        if chunk.payload is not None:
            slot = free.try_take()
            if slot is None and held == len(free.taken):
                # Every slot waits here: the batch is full.  (While the writer
                # holds some, wait for it instead: a sync per slot it gives back
                # made one sync per chunk onto a slow mirror.)
                undo.sync()
                for ready in pending:
                    yield ready
                del pending[:]
                held = 0
            if slot is None:
                slot = free.take()    # the writer gives one back soon
            held += 1
            slot[:chunk.length] = chunk.payload
            chunk = chunk._replace(payload=slot[:chunk.length])
        pending.append(chunk)
    undo.sync()
    for ready in pending:
        yield ready


class _Slots:
    """The slots of one aligned buffer, taken and given back in order (a FIFO)."""

    def __init__(self, slot_size, count):
        buffer = memoryview(aligned_buffer(slot_size * count))
        self.free = queue.Queue()
        for index in range(count):
            self.free.put(buffer[index * slot_size:(index + 1) * slot_size])
        self.taken = collections.deque()

    def try_take(self):
        try:
            slot = self.free.get_nowait()
        except queue.Empty:
            return None
        self.taken.append(slot)
        return slot

    def take(self):
        slot = self.free.get()
        self.taken.append(slot)
        return slot

    def release(self, chunk):
        # The writer writes, and releases, in the order the slots were taken.
        self.free.put(self.taken.popleft())


class _SignalsHeld:
    """SIGINT, SIGTERM and SIGHUP ignored for a while: a roll back must not be cut short.

    Only the main thread can change them; elsewhere (a test's thread) this does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __enter__(self):
        import signal
        self.saved = []
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self.saved.append((number, signal.signal(number, signal.SIG_IGN)))
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc_info):
        import signal
        for number, handler in self.saved:
            signal.signal(number, handler)


def _failure(exc, text):
    """An error for a failed apply: `text` in the class that `exc` calls for."""
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return Interrupted(text)
    if isinstance(exc, EraError):
        return exc.__class__(text)
    return EraError(text)


def _cause(exc):
    """What stopped an apply, as the start of a message."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, EraError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return "internal error: %s: %s" % (type(exc).__name__, exc)


def _partial(exc, dest, checkpoints=None):
    """Say what a failed apply left behind (its growth is undone first)."""
    recorded = None if checkpoints is None else checkpoints.recorded
    if recorded is not None:
        # What the state records as applied stays, and so does the file.
        dest.restore_size(recorded)
        return _failure(exc, "%s; %d of its %d bytes are applied (below offset %d) and recorded "
                        "in %s: 'era_tool.py info %s' shows the token that resumes it"
                        % (_cause(exc), checkpoints.applied, checkpoints.header.total_bytes,
                           recorded, checkpoints.mirror.path, dest.path))
    if dest.created:
        # Half a mirror that was not there before is worth nothing: no state names it
        # (apply_stream removes it).
        return _failure(exc, "%s; %s, created by this apply, is removed"
                        % (_cause(exc), dest.path))
    dest.restore_size()
    if dest.written == 0:
        return _failure(exc, "%s; no data was written to %s" % (_cause(exc), dest.path))
    return _failure(exc, "%s; %d bytes were written before it: %s is partially updated"
                    % (_cause(exc), dest.written, dest.path))


def _once(action):
    """A callable that runs `action` the first time only."""
    pending = [action]

    def run():
        if pending:
            pending.pop()()
    return run


class _Prefixed:
    """An Input whose first read returns bytes that were already read."""

    def __init__(self, inp, prefix):
        self.inp = inp
        self.prefix = prefix

    @property
    def position(self):
        return self.inp.position

    def read_into(self, view):
        if self.prefix:
            size = len(self.prefix)
            view[:size] = self.prefix
            self.prefix = b""
            return size + self.inp.read_into(view[size:])
        return self.inp.read_into(view)


def open_stream(path):
    """Open a stream; return (input, kind, first bytes) with kind 'era', 'legacy' or None."""
    inp = Input(path, "a stream", "pipe one in or use -i FILE")
    first = bytearray(len(MAGIC))
    got = inp.read_into(memoryview(first))
    first = bytes(first[:got])
    if got == 0:
        return inp, None, first
    if first == MAGIC:
        return inp, "era", first
    if first == LEGACY_MAGIC:
        return inp, "legacy", first
    inp.close()
    if got < len(MAGIC) and (MAGIC.startswith(first) or LEGACY_MAGIC.startswith(first)):
        raise TruncatedStream("stream ends after %d bytes, inside its first header" % got)
    raise StreamError("%s is not an era_tool or era_copy stream (it starts with %r)"
                      % (shown(inp.name), first))


def _mirror_outputs(destination, state_file, undo=None):
    """What apply or rollback writes, for refuse_same_files."""
    outputs = [("DESTINATION %s" % destination, destination)]
    if state_file is not None:
        outputs.append(("the state file %s" % state_file, state_file))
    if undo:
        outputs.append(("--undo %s" % undo, undo))
    return outputs


def _check_whole_undo_file(path):
    """An undo file applied as a stream must be whole before its first chunk is written.

    Stopped midway it leaves the mirror a mix of two versions, labelled with
    the newer era: no later incremental repairs that (rollback restores what a
    cut file holds, and knows when that is right).
    """
    if (path is None or path == "-") and sys.stdin is not None and \
            stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode):
        path = "/dev/fd/%d" % sys.stdin.fileno()    # `< UNDO_FILE`: the file, opened again
    if path is None or path == "-" or not os.path.isfile(path):
        raise EraError("an undo file is applied only from a file (-i UNDO_FILE), read whole "
                       "first: write it to a file, or use rollback")
    with UndoFile(path) as undo:
        if not undo.complete:
            raise StreamError("undo file %s is %s: applied as a stream it would stop midway "
                              "and leave a mix of two versions; nothing was written (rollback "
                              "restores what it holds where that is safe)"
                              % (shown(path), "damaged (%s)" % undo.damage if undo.damage
                                 else "cut short"))


def _refuse_stream_as_mirror(path):
    """A stream or undo file given as DESTINATION would be overwritten: the only way back."""
    try:
        fd, info = open_device(path, os.O_RDONLY)
    except OSError:
        return                        # missing (created) or unusable: Destination says
    try:
        first = os.pread(fd, len(MAGIC), 0) if stat.S_ISREG(info.st_mode) else b""
    finally:
        os.close(fd)
    if first in (MAGIC, LEGACY_MAGIC):
        raise EraError("%s is an era_tool stream or undo file, not a mirror: wrong argument? "
                       "(--force writes to it anyway)" % shown(path))


def apply_stream(stream, destination, undo=None, force=False, progress=False, state=None,
                 allow_empty=False, checkpoint=CHECKPOINT_BYTES):
    """apply's engine: write a stream into a mirror file or block device.

    stream: a path, or None or "-" for standard input; either format.
    undo: a new undo file to save the old content in, first (all or nothing).
    force: go past the chain and mirror checks.  progress: show it on stderr.
    state: the state file, if not DESTINATION.era.  allow_empty: an empty
    input is an original-format stream with no changes.  checkpoint: without
    undo, record progress (see Checkpoints) after this many bytes.  Raises EraError (and
    its kinds) with what was done about the failure; returns None once the
    data, and then the mirror's new state, are durable.
    """
    inp, kind, first = open_stream(stream)
    try:
        state_file = MirrorState.path_for(destination, state)
        # No name may stand for two of these: --state equal to the mirror replaced
        # the mirror with JSON.
        refuse_same_files([("the stream %s" % (stream or "on standard input"), stream)],
                          _mirror_outputs(destination, state_file, undo))
        if kind is None:
            if not allow_empty:
                raise StreamError(
                    "the stream is empty; an era_tool stream always has a header. An empty "
                    "original-format stream means no changes: --allow-empty accepts it")
            dest = Destination(destination)
            try:
                MirrorState.lock(dest)
                dest.sync()
            finally:
                dest.close()
            return
        # The first header is checked before the destination is touched.
        legacy = None
        if kind == "era":
            header = StreamHeader.read(inp, first)
            if header.undo and not force:
                _check_whole_undo_file(stream)
        else:
            if undo:
                raise EraError("--undo needs an era_tool stream: the original format cannot "
                               "prove a stream complete, so it cannot be undone safely")
            header = None
            # The 8 bytes read to detect the format go back in front.
            legacy = LegacyReader(_Prefixed(inp, first))
            legacy.peek()
        if not force:
            _refuse_stream_as_mirror(destination)
        dest = Destination(destination, readable=bool(undo))
        try:
            MirrorState.lock(dest)
            mirror = MirrorState.load(state_file, force)
            if not force:
                mirror.check_apply(header)
            if state_file is None and header is not None and header.era is not None:
                warn("%s is a block device: its era is not recorded without --state FILE"
                     % destination)
            shown_progress = Progress(progress, "applied",
                                      None if header is None else header.total_bytes)
            if legacy is not None:
                _apply_legacy(legacy, dest, mirror, shown_progress)
            else:
                _apply_era(inp, header, dest, mirror, undo, force, shown_progress, checkpoint)
        except BaseException:
            dest.remove_if_created()   # a refused or failed apply leaves no new mirror
            raise
        finally:
            dest.close()
    finally:
        inp.close()


def _commit(mirror, header):
    """The data is synced: now, and only now, the mirror's era may change, while
    the mirror is still locked."""
    with _SignalsHeld():
        mirror.record(header)


def _apply_legacy(legacy, dest, mirror, progress):
    """An original-format stream: no checksums, so written as it comes."""
    pool = BufferPool(READ_AHEAD, LEGACY_PIECE)
    legacy.take_buffer = pool.take
    legacy.check = dest.check_span
    try:
        done = write_chunks(dest, legacy, lambda chunk: pool.give(chunk.payload.obj),
                            progress)
        dest.sync()
    except (Exception, KeyboardInterrupt) as exc:
        raise _partial(exc, dest) from None
    progress.finish(done)
    _commit(mirror, None)


def _apply_era(inp, header, dest, mirror, undo_path, force, progress, checkpoint):
    """An era_tool stream: each chunk checked before it is written; with undo_path,
    all or nothing, the new state included (a state that cannot be written
    rolls the data back too)."""
    if dest.is_block and header.device_size > dest.size:
        raise DeviceError("stream is for a %d-byte device but %s has %d bytes"
                          % (header.device_size, dest.path, dest.size))
    if header.undo:
        if not force:
            check_undo_fits(header, dest, inp.name)
    elif not dest.is_block and dest.size > header.device_size and not force and not (
            mirror.source_size == header.device_size
            and mirror.source_id == header.source_id):
        # A larger mirror is suspect; an undo file may shrink it back, and so may a stream
        # of the size the state records (an apply killed midway grew it: SIGKILL, no clean-up).
        raise DeviceError("%s (%d bytes) is larger than the source (%d bytes): "
                          "wrong mirror? --force writes to it anyway"
                          % (dest.path, dest.size, header.device_size))
    before_writing = None
    if header.undo and undo_path is None:
        # With --undo a failed step back rolls itself back: all or nothing.
        before_writing = _once(lambda: mirror.mark_stepping_back(header))
    undo = None
    checkpoints = None
    if undo_path is not None:
        # The undo header is durable before anything changes.
        undo = UndoLog(undo_path, dest, header, mirror)
    elif header.resumable and mirror.path is not None and not mirror.damaged and \
            (header.full or not force):
        checkpoints = Checkpoints(dest, mirror, header, checkpoint)
    try:
        if undo is None:
            # From a file, two buffers: one being written while the next is read and
            # checked; reading a chunk is faster than writing it, so more buy nothing
            # and each is memory first touched during the run (measured: four were
            # slower). A pipe (ssh) delivers in bursts: spare buffers let it be
            # drained while the writer is busy (measured: two were slower there).
            from_file = stat.S_ISREG(os.fstat(inp.file.fileno()).st_mode)
            pool = BufferPool(2 if from_file else READ_AHEAD, header.chunk_size)
            done = write_chunks(dest, StreamReader(inp, header, pool.take),
                                lambda chunk: pool.give(chunk.payload.obj),
                                progress, before_writing,
                                None if checkpoints is None else checkpoints.written)
        else:
            slot = -(-header.chunk_size // DIRECT_ALIGN) * DIRECT_ALIGN
            slots = _Slots(slot, max(1, UNDO_BATCH // slot))
            done = write_chunks(dest, _saved_first(StreamReader(inp, header), undo, slots),
                                slots.release, progress)
        progress.finish(done)
        # Grow or shrink only now that the whole stream is proven: a cut stream
        # whose header claims a larger device must not leave the mirror that size.
        if not dest.is_block and dest.size != header.device_size:
            if before_writing is not None:
                before_writing()
            if undo is not None and dest.size > header.device_size:
                undo.save(header.device_size, dest.size - header.device_size)
                undo.sync()
            dest.resize(header.device_size)
        dest.sync()
        if undo is not None:
            undo.finish()
            # The state names the stream applied only once the undo file's trailer is
            # durable: rollback trusts a cut undo file only while the state does not.
            _commit(mirror, header)
    except (Exception, KeyboardInterrupt) as exc:   # SIGINT too: all or nothing
        if undo is None:
            if checkpoints is not None:
                checkpoints.at_failure()
            raise _partial(exc, dest, checkpoints) from None
        raise _roll_back_failed_apply(exc, dest, undo) from None
    if undo is None:
        _commit(mirror, header)


def restore_from_undo(dest, undo):
    """Write an undo file's chunks back, newest first, then the old size."""
    header = undo.header
    # Read into aligned buffers: the old content goes back with O_DIRECT where it
    # fits, as apply writes it, not through the page cache. Two, as apply from a
    # file has: one written while the next is read.
    pool = BufferPool(2, header.chunk_size)
    write_chunks(dest, undo.newest_first(pool.take),
                 lambda chunk: pool.give(chunk.payload.obj), Progress(False, ""))
    # The file's own size, not dest.size: a killed apply's writes may have grown it.
    if not dest.is_block and dest.file.size() != header.device_size:
        dest.resize(header.device_size)
    dest.sync()


def _roll_back_failed_apply(exc, dest, undo):
    """All or nothing: put back what a failed apply --undo changed."""
    with _SignalsHeld():
        undo.close()
        try:
            with UndoFile(undo.path) as saved:
                if saved.header is None:
                    raise StreamError("its header is missing")
                restore_from_undo(dest, saved)
        except (EraError, OSError) as again:
            return _failure(exc, "%s; rolling back failed too (%s): run 'era_tool.py rollback "
                            "%s %s'" % (_cause(exc), _cause(again), undo.path, dest.path))
        try:
            os.unlink(undo.path)
        except OSError:
            pass
    return _failure(exc, "%s; rolled back: %s is as it was before this apply"
                    % (_cause(exc), dest.path))


def roll_back(undo_file, destination, state=None, force=False):
    """rollback's engine: put a mirror back as it was before the apply that wrote
    `undo_file`, and its recorded era with it.  Returns the UndoFile read (closed),
    or None when it holds no complete header (its apply changed nothing)."""
    state_file = MirrorState.path_for(destination, state)
    refuse_same_files([("UNDO_FILE %s" % undo_file, undo_file)],
                      _mirror_outputs(destination, state_file))
    with UndoFile(undo_file) as undo:
        header = undo.header
        if header is None:
            return None
        dest = Destination(destination, create=False)
        try:
            MirrorState.lock(dest)
            # --force: the state is not read, whatever it holds.
            mirror = MirrorState(state_file) if force else MirrorState.load(state_file)
            if dest.is_block and header.device_size > dest.size:
                raise DeviceError("undo file is for a %d-byte device but %s has %d bytes"
                                  % (header.device_size, dest.path, dest.size))
            if not force:
                mirror.check_rollback(undo, dest)
            mirror.mark_stepping_back(header)
            with _SignalsHeld():
                restore_from_undo(dest, undo)
                if state_file is not None:
                    if header.era is not None:
                        mirror.save(header.source_id, header.device_size, header.block_size,
                                    header.era, stream_crc=header.previous_crc)
                    elif mirror.known or force:
                        mirror.remove()
        finally:
            dest.close()
    return undo


# ---------------------------------------------------------------------------
# Data host gate: what a backup host's ssh key may ask for
# ---------------------------------------------------------------------------

# ssh-gate is the forced command of the backup host's key in the data host's
# authorized_keys: sshd runs it whatever the client asked for, and puts what was
# asked for in SSH_ORIGINAL_COMMAND.  The gate splits that into words (no shell
# ever sees it), takes only the requests backup.sh makes (REMOTE=restricted),
# for the era devices and mount points its config files name, and runs each
# as backup.sh's remote shell does: the same era_tool commands, the metadata
# snapshot, and the freeze with its thaw timer and record.  A stolen key can
# then read the configured devices, and nothing else: no shell, no other
# device, no write, no freeze longer than the config allows.

GATE_SETTINGS = ("ERA_DEVICE", "METADATA_DEVICE", "DATA_DEVICE", "MOUNTPOINT", "GRANULARITY",
                 "FREEZE_TIMEOUT", "FREEZE_INTERVAL")
GATE_MAX_CONFIG = 1 << 16         # bytes: a config is a few lines
GATE_MAX_REQUEST = 4096           # bytes of a request: backup.sh's longest is a few hundred
GATE_LOCK_WAIT = 10               # seconds a request waits for the one before it to end
GATE_FREEZE_TIMEOUT = 120         # seconds, where the config does not say
GATE_MAX_FREEZE = 3600            # a config's FREEZE_TIMEOUT: an hour frozen is an outage
GATE_FREEZE_INTERVAL = 900        # seconds from one freeze's start to the next, by default:
                                  # a key cannot keep the filesystem frozen back to back
GATE_MAX_INTERVAL = 7 * 86400
GATE_MAX_LIST = 64 << 20          # bytes of a repair's block list: held on the way in
GATE_STOP_WAIT = 10               # seconds a stopped request's children get to clean up
GATE_LOCK = "/run/era_tool-gate.%s.lock"      # one request at a time per era device
GATE_FROZE = "/run/era_tool-gate.%s.froze"    # when its last freeze started (time.time())
FREEZE_RECORD = "/run/era_tool-backup.%d"     # backup.sh's: whose freeze of st_dev %d is on
DM_NAME = re.compile(r"\A[A-Za-z0-9_.+-]{1,127}\Z")   # what a config's ERA_DEVICE may be
COMPRESSORS = {"gzip": ("gzip", "-1"), "zstd": ("zstd", "-1", "-q"),
               "lz4": ("lz4", "-1", "-q"), "xz": ("xz", "-1"), "none": ()}
# backup.sh's IONICE, gentle only: the idle class, or best effort with an optional level. Not the realtime
# class (1), above every other reader, nor a level with the idle class (ionice ignores it, saying so each time).
IONICE_OPTIONS = re.compile(r"\A(?:-c ?3|-c ?2(?: -n ?[0-7])?)\Z")


class GateConfig:
    """One era device the gate serves: a config file of KEY=value lines, checked.

    The lines are those of backup.sh's settings file: # comments, optional
    quotes around a value; a key it does not know is an error, not ignored.
    """

    def __init__(self, path, values):
        def fail(text):
            return EraError("config %s: %s" % (shown(path), text))

        self.path = path
        for key in ("ERA_DEVICE", "METADATA_DEVICE"):
            if not values.get(key):
                raise fail("%s is not set" % key)
        self.era_device = values["ERA_DEVICE"]
        if not DM_NAME.match(self.era_device):
            raise fail("ERA_DEVICE %s is not a device-mapper name (letters, digits, _ . + -)"
                       % shown(self.era_device[:80]))
        self.metadata_device = values["METADATA_DEVICE"]
        self.data_device = values.get("DATA_DEVICE") or "/dev/mapper/" + self.era_device
        self.mountpoint = values.get("MOUNTPOINT") or None
        for key, path_ in (("METADATA_DEVICE", self.metadata_device),
                           ("DATA_DEVICE", self.data_device), ("MOUNTPOINT", self.mountpoint)):
            if path_ is not None and not path_.startswith("/"):
                raise fail("%s must be an absolute path, not %s" % (key, shown(path_[:80])))
        self.granularity = None
        if values.get("GRANULARITY"):
            try:
                self.granularity = _block_size(values["GRANULARITY"])
            except argparse.ArgumentTypeError as exc:
                raise fail("GRANULARITY %s" % exc) from None
        timeout = values.get("FREEZE_TIMEOUT") or str(GATE_FREEZE_TIMEOUT)
        if not (timeout.isdigit() and _isascii(timeout) and 0 < int(timeout) <= GATE_MAX_FREEZE):
            raise fail("FREEZE_TIMEOUT must be 1 to %d seconds, not %s"
                       % (GATE_MAX_FREEZE, shown(timeout[:20])))
        self.freeze_timeout = int(timeout)
        interval = values.get("FREEZE_INTERVAL") or str(GATE_FREEZE_INTERVAL)
        if not (interval.isdigit() and _isascii(interval) and int(interval) <= GATE_MAX_INTERVAL):
            raise fail("FREEZE_INTERVAL must be 0 to %d seconds, not %s"
                       % (GATE_MAX_INTERVAL, shown(interval[:20])))
        self.freeze_interval = int(interval)

    @staticmethod
    def check_directories(path):
        """Refuse a config in a directory others may change: they could put another config in
        its place.  Every directory above the path as given, above each link on the way and
        above the file it resolves to (a link may be swapped as well as a file) must be root's
        or ours, and not writable by group or others, unless sticky (/tmp: others may add
        names, not replace ours)."""
        seen = set()
        starts, link = [], os.path.abspath(path)
        for _ in range(40):                    # each link on the way, as the kernel follows them
            starts.append(link)
            if not os.path.islink(link):
                break
            link = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
        for start in starts + [os.path.realpath(path)]:
            directory = os.path.dirname(start)
            while directory not in seen:
                seen.add(directory)
                try:
                    info = os.stat(directory)
                except OSError as exc:
                    raise EraError("cannot look at %s, above the config: %s"
                                   % (shown(directory), exc.strerror or exc)) from None
                if info.st_uid not in (0, os.geteuid()) or \
                        (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
                    raise EraError("config %s is in %s, which others may change (owner uid %d, "
                                   "mode %o): they could put another config in its place"
                                   % (shown(path), shown(directory), info.st_uid,
                                      stat.S_IMODE(info.st_mode)))
                directory = os.path.dirname(directory)

    @classmethod
    def load(cls, path):
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                data = f.read(GATE_MAX_CONFIG + 1)
        except OSError as exc:
            raise EraError("cannot read the config %s: %s"
                           % (shown(path), exc.strerror or exc)) from None
        # As sshd's StrictModes: whoever may change the config may point the key elsewhere.
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
            raise EraError("config %s may be changed by others (owner uid %d, mode %o): make it "
                           "root's and not writable by group or others (chmod go-w)"
                           % (shown(path), info.st_uid, stat.S_IMODE(info.st_mode)))
        cls.check_directories(path)
        if len(data) > GATE_MAX_CONFIG:
            raise EraError("config %s: longer than %d bytes" % (shown(path), GATE_MAX_CONFIG))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise EraError("config %s is not UTF-8 text" % shown(path)) from None
        values = {}
        for number, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = re.match(r"\A\s*([A-Z_]+)=(.*)\Z", line)
            if match is None:
                raise EraError("config %s line %d: not KEY=value: %s"
                               % (shown(path), number, shown(line[:80])))
            key, value = match.groups()
            if key not in GATE_SETTINGS:
                raise EraError("config %s line %d: unknown setting %s (known: %s)"
                               % (shown(path), number, key, ", ".join(GATE_SETTINGS)))
            if key in values:
                raise EraError("config %s line %d: %s is set twice" % (shown(path), number, key))
            quoted = re.match(r"\A\"(.*)\"\Z|\A'(.*)'\Z", value)
            if quoted:
                value = quoted.group(1) if quoted.group(1) is not None else quoted.group(2)
            values[key] = value
        return cls(path, values)


class _GateParser(argparse.ArgumentParser):
    """A request's words: a bad one is refused with one line, never a usage exit."""

    def error(self, message):
        raise GateRefused(message)

    def exit(self, status=0, message=None):
        raise GateRefused((message or "not a request").strip())


def _ionice(text):
    if not IONICE_OPTIONS.match(text):
        raise argparse.ArgumentTypeError("%r is not ionice's idle or best-effort class (-c3, or "
                                         "-c2 -n7)" % text[:40])
    return text.split()


def _niceness(text):
    if not (text.isdigit() and _isascii(text) and int(text) <= 19):
        raise argparse.ArgumentTypeError("%r is not a niceness of 0 to 19" % text[:40])
    return int(text)


def _seconds(text):
    if not (text.isdigit() and _isascii(text) and 0 < int(text) <= GATE_MAX_FREEZE):
        raise argparse.ArgumentTypeError("%r is not 1 to %d seconds" % (text[:40], GATE_MAX_FREEZE))
    return int(text)


def _token(text):
    try:
        ResumeToken.decode(text)
    except EraError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_gate_parser():
    """The requests the gate takes: exactly those backup.sh makes with REMOTE=restricted.

    No request names a path: the devices, the metadata and the mount point are
    the config's (--freeze names the mount point only to be checked against it).
    """
    parser = _GateParser(prog="era_tool", add_help=False, allow_abbrev=False)
    requests = parser.add_subparsers(dest="request", metavar="REQUEST")
    requests.required = True

    def request(name):
        part = requests.add_parser(name, add_help=False, allow_abbrev=False)
        part.add_argument("era_device", metavar="ERA_DEVICE")
        return part

    def gently(part):
        part.add_argument("--rate-limit", type=_rate)
        part.add_argument("--ionice", type=_ionice)
        part.add_argument("--nice", type=_niceness)

    def freezing(part):
        part.add_argument("--freeze", metavar="MOUNTPOINT")
        part.add_argument("--freeze-timeout", type=_seconds)

    # status takes the final pass's freeze too: checked against the config before the first
    # pass, not at the end.
    freezing(request("status"))
    estimate = request("estimate")
    estimate.add_argument("--since", type=_era, required=True)
    estimate.add_argument("--allow-old-kernel", action="store_true")
    copy = request("copy")
    copy.add_argument("--full", action="store_true")
    copy.add_argument("--since", type=_era)
    copy.add_argument("--resume", type=_token)
    copy.add_argument("--source-id", type=_source_id, required=True)
    copy.add_argument("--compress", choices=sorted(COMPRESSORS), default="none")
    freezing(copy)
    copy.add_argument("--allow-old-kernel", action="store_true")
    gently(copy)
    sum_ = request("sum")
    sum_.add_argument("--key", type=_key, required=True)
    sum_.add_argument("--since", type=_era, required=True)
    sum_.add_argument("--range", type=_block_range)
    gently(sum_)
    repair = request("repair")
    repair.add_argument("--era", type=_era, required=True)
    repair.add_argument("--source-id", type=_source_id, required=True)
    repair.add_argument("--compress", choices=sorted(COMPRESSORS), default="none")
    gently(repair)
    return parser


def gate_request(text, configs):
    """(request, config) of SSH_ORIGINAL_COMMAND `text`, or GateRefused saying why not."""
    import shlex
    if text is None:
        raise GateRefused("no command (an interactive login): this key takes only backup.sh's "
                          "requests")
    if len(text.encode("utf-8", "surrogateescape")) > GATE_MAX_REQUEST:
        raise GateRefused("longer than %d bytes" % GATE_MAX_REQUEST)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise GateRefused("not words: %s" % exc) from None
    if not words or words[0] != "era_tool":
        raise GateRefused("only era_tool requests are taken, not %s"
                          % shown((words or [""])[0][:80] or "an empty command"))
    # argparse before 3.13 takes "--opt=--" as an empty list, past the option's type check.
    dashes = [word for word in words if word == "--" or word.endswith("=--")]
    if dashes:
        raise GateRefused("%s: no request has a use for --" % shown(dashes[0][:80]))
    request = build_gate_parser().parse_args(words[1:])
    found = [config for config in configs if config.era_device == request.era_device]
    if not found:
        raise GateRefused("%s is not an era device of this gate (its configs name %s)"
                          % (shown(request.era_device[:80]),
                             ", ".join(config.era_device for config in configs)))
    config = found[0]
    if request.request == "copy":
        kinds = [name for name, given in (("--full", request.full and not request.resume),
                                          ("--since", request.since is not None),
                                          ("--resume", request.resume is not None)) if given]
        if len(kinds) != 1:
            raise GateRefused("copy takes one of --full, --since ERA and --resume TOKEN "
                              "(with --full for a first full copy)")
        if request.freeze is not None:
            if request.since is None:
                raise GateRefused("--freeze goes with --since: the final pass")
            if request.rate_limit or request.ionice or request.nice is not None:
                raise GateRefused("--freeze takes no --rate-limit, --ionice or --nice: the pass "
                                  "under fsfreeze runs at full speed (the writers wait for it)")
    if request.request in ("copy", "status"):
        _check_freeze(request, config)
    return request, config


def _check_freeze(request, config):
    """--freeze and --freeze-timeout of a request, against the config."""
    if request.freeze is not None:
        if config.mountpoint is None or \
                os.path.realpath(request.freeze) != os.path.realpath(config.mountpoint):
            raise GateRefused("--freeze %s: the config of %s names %s as the mount point "
                              "to freeze" % (shown(request.freeze[:80]), config.era_device,
                                             shown(config.mountpoint or "none")))
        if (request.freeze_timeout or 0) > config.freeze_timeout:
            raise GateRefused("--freeze-timeout %d: the config of %s allows %d s at most"
                              % (request.freeze_timeout, config.era_device,
                                 config.freeze_timeout))
    elif request.freeze_timeout is not None:
        raise GateRefused("--freeze-timeout goes with --freeze")


class GateLog:
    """Where the gate says what it was asked and what came of it.

    syslog's auth facility (as sshd's own lines), or FILE (--log), or standard
    error where there is no syslog (/dev/log).  A line that cannot be written
    to FILE fails the request: nothing is done unlogged.
    """

    def __init__(self, path=None):
        self.path = path
        self.syslog = None
        if path is None and os.path.exists("/dev/log"):
            import syslog
            syslog.openlog("era_tool-gate", syslog.LOG_PID, syslog.LOG_AUTH)
            self.syslog = syslog

    def __call__(self, line, warning=False):
        """Log `line`; a warning (a refusal, a failure) is the request's error line too,
        which on standard error says it once."""
        line = shown(line)
        if self.syslog is not None:
            self.syslog.syslog(self.syslog.LOG_WARNING if warning else self.syslog.LOG_INFO, line)
        elif self.path is not None:
            text = "%s era_tool-gate[%d]: %s\n" % (
                time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getpid(), line)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                             | getattr(os, "O_CLOEXEC", 0), 0o640)
                try:
                    write_all(fd, text.encode("utf-8", "backslashreplace"))
                finally:
                    os.close(fd)
            except OSError as exc:
                raise EraError("cannot write the log %s: %s"
                               % (shown(self.path), exc.strerror or exc)) from None
        elif not warning:
            err("era_tool: ssh-gate: " + line)


def _locked(path):
    """A descriptor of `path` (made if need be), held under flock until closed."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hold_gate_lock(name):
    """One request at a time per era device: the snapshot of one is not the other's to drop."""
    import fcntl
    path = GATE_LOCK % name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise EraError("cannot open %s: %s" % (path, exc.strerror or exc)) from None
    deadline = time.monotonic() + GATE_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise EraError("another request for %s is still running (a backup from another "
                               "host, or one whose connection dropped): try again later" % name)
            time.sleep(0.1)


def _thaw_timer(mountpoint, record, seconds):
    """Start the thaw timer of a freeze; its pid.

    It thaws `mountpoint` after `seconds` whatever happens to the gate and its
    connection, unless the record names another timer by then (the freeze is
    a later run's).  In a session of its own, with no descriptor of the gate's:
    sshd waits for none of them, and no lock is held by it.
    """
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        time.sleep(seconds)
        fd = _locked(record)
        if os.read(fd, 64).strip() == str(os.getpid()).encode():
            _fsfreeze("-u", mountpoint, check=False)
            os.ftruncate(fd, 0)
    finally:
        os._exit(0)


def _fsfreeze(option, mountpoint, check=True):
    import subprocess
    try:
        result = subprocess.run(["fsfreeze", option, mountpoint], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise EraError("cannot run fsfreeze: %s" % (exc.strerror or exc)) from None
    if check and result.returncode:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise EraError("fsfreeze %s %s failed: %s" % (option, shown(mountpoint), shown(
            lines[-1] if lines else "exit status %d" % result.returncode)))
    return result.returncode


class Gate:
    """One request, run on the data host as backup.sh's remote shell runs it."""

    def __init__(self, config, request):
        self.config = config
        self.request = request
        self.snapshot = False
        self.record = self.watchdog = None
        self.frozen = False
        self.env = dict(os.environ)
        if getattr(request, "allow_old_kernel", False):
            # The operator's word that this kernel carries the dm-era fixes (backup.sh's
            # ALLOW_OLD_KERNEL=1): copy --metadata takes it from the environment.
            self.env["ALLOW_OLD_KERNEL"] = "1"

    def run(self):
        try:
            status = getattr(self, "do_" + self.request.request)()
        except BaseException:
            self.close(failed=True)
            raise
        self.close()
        return status

    def close(self, failed=False):
        """The cleanup of backup.sh's remote shell: thaw, stop the timer, drop the snapshot.

        A snapshot that cannot be dropped fails the request, unless it failed already.
        """
        import signal
        if self.frozen:
            try:
                self.thaw()
                self.frozen = False
            except BaseException:
                # Not thawed here (a signal, a lock that failed): the timer is the thaw now.
                self.watchdog = None
        if self.watchdog is not None:
            # The process, then its group: before its setsid() it has none of its own.
            for kill in (os.kill, os.killpg):
                try:
                    kill(self.watchdog, signal.SIGKILL)
                except OSError:
                    pass
            os.waitpid(self.watchdog, 0)
            self.watchdog = None
        if self.snapshot:
            self.snapshot = False
            try:
                dm_message(self.config.era_device, "drop_metadata_snap")
            except EraError:
                if not failed:
                    raise

    # -- the parts of a request

    def granularity(self):
        if self.config.granularity is not None:
            return self.config.granularity
        fields = dmsetup("table", self.config.era_device).split()
        try:
            return _block_size(fields[-1])
        except (IndexError, argparse.ArgumentTypeError):
            raise EraError("cannot read the block size of %s from dmsetup table: %s"
                           % (self.config.era_device, shown(" ".join(fields)[:80]))) from None

    def take_snapshot(self):
        """A fresh metadata snapshot; the era new writes land in from now on."""
        name = self.config.era_device
        take_metadata_snapshot(name)
        self.snapshot = True
        used, total, era = era_status(name)
        # A full metadata device fails the data writes: no pass (its snapshot pins
        # more blocks) over METADATA_REFUSE.
        if used * 100 > METADATA_REFUSE * total:
            raise EraError("the metadata of %s is over %d%% full (%d/%d blocks): no pass started"
                           % (name, METADATA_REFUSE, used, total))
        return era

    def freeze(self):
        mountpoint = self.config.mountpoint
        try:
            device = os.stat(mountpoint).st_dev
        except OSError as exc:
            raise EraError("cannot freeze %s: %s" % (shown(mountpoint), exc.strerror)) from None
        # A freeze at most every FREEZE_INTERVAL seconds: FREEZE_TIMEOUT bounds one of them,
        # this how much of the time a key may keep the filesystem's writers waiting.
        froze = GATE_FROZE % self.config.era_device
        try:
            with open(froze) as f:
                last = float(f.read(64))
        except (OSError, ValueError):
            last = None
        since = time.time() - last if last is not None else None
        if since is not None and 0 <= since < self.config.freeze_interval:
            raise EraError("the last freeze of %s started %d s ago: the config's FREEZE_INTERVAL "
                           "allows one every %d s" % (shown(mountpoint), since,
                                                      self.config.freeze_interval))
        with open(froze, "w") as f:
            f.write("%f\n" % time.time())
        self.record = FREEZE_RECORD % device
        self.watchdog = _thaw_timer(mountpoint, self.record,
                                    self.request.freeze_timeout or self.config.freeze_timeout)
        # Frozen before the freeze, so that the cleanup thaws whenever the record names
        # our timer; the record names it before the freeze, so that the timer thaws even
        # if the gate dies right after it.
        self.frozen = True
        fd = _locked(self.record)
        try:
            old = os.read(fd, 64)
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % self.watchdog, 0)
            try:
                _fsfreeze("-f", mountpoint)
            except EraError:
                # MP still frozen by a run that died, say: the record goes back to its timer.
                os.ftruncate(fd, 0)
                os.pwrite(fd, old, 0)
                raise
        finally:
            os.close(fd)

    def thaw(self):
        """0: thawed; 2: not ours (our timer thawed it); else: fsfreeze -u failed."""
        fd = _locked(self.record)
        try:
            if os.read(fd, 64).strip() != str(self.watchdog).encode():
                return 2
            status = _fsfreeze("-u", self.config.mountpoint, check=False)
            os.ftruncate(fd, 0)
            return status
        finally:
            os.close(fd)

    def tool(self, *words, stdin=None, compress="none", capture=False):
        """era_tool WORDS (under the request's ionice and nice, with its --rate-limit), into
        standard output through the compressor, or captured; raise if any part fails.

        Values go as --option=VALUE: a source id that starts with a dash stays a value.
        """
        import subprocess
        request = self.request
        prefix, words = [], list(words)
        if getattr(request, "rate_limit", None):
            words[1:1] = ["--rate-limit=%d" % request.rate_limit]
        if getattr(request, "ionice", None):
            prefix += ["ionice"] + request.ionice
        if getattr(request, "nice", None) is not None:
            prefix += ["nice", "-n", str(request.nice)]
        argv = prefix + [sys.executable, os.path.abspath(__file__)] + words
        compressor = list(COMPRESSORS[compress])
        if sys.stdout is not None:
            sys.stdout.flush()
        parts = []
        try:
            for part_argv in ([argv, compressor] if compressor else [argv]):
                first = not parts
                try:
                    parts.append(subprocess.Popen(
                        part_argv, env=self.env,
                        stdin=(stdin if stdin is not None else subprocess.DEVNULL) if first
                        else parts[0].stdout,
                        stdout=subprocess.PIPE if first and (capture or compressor) else None))
                except OSError as exc:
                    raise EraError("cannot run %s: %s" % (part_argv[0], exc.strerror or exc)) \
                        from None
            if compressor:
                parts[0].stdout.close()          # the compressor's now: it sees the end
            output = parts[0].stdout.read() if capture else None
            statuses = [part.wait() for part in parts]
        finally:
            # SIGTERM first: a sum drops the snapshot it took, a copy says why it stopped.
            for part in parts:
                if part.poll() is None:
                    part.terminate()
            for part in parts:
                try:
                    part.wait(GATE_STOP_WAIT)
                except subprocess.TimeoutExpired:
                    part.kill()
                    part.wait()
                if part.stdout is not None:
                    part.stdout.close()
        for name, status in zip([words[0]] + compressor[:1], statuses):
            if status:
                raise EraError("%s failed (exit %d)" % (name, status))
        return output

    # -- the requests

    def do_status(self):
        """What backup.sh looks at first: the kernel, dmsetup status, ionice and nice, in
        tagged lines (backup.sh looks for the tags, so that a login banner is not taken for
        an answer)."""
        import shutil
        try:
            lines = dmsetup("status", self.config.era_device).splitlines()
            status = next((line for line in lines if line.split()[2:3] == ["era"]), None)
            status = status or (lines[0] if lines else "no status")
        except EraError as exc:
            status = str(exc) or "no status"
        say("era-probe kernel " + os.uname().release)
        say("era-probe status " + status)
        for name in ("ionice", "nice"):
            if shutil.which(name):
                say("era-probe have " + name)
        return 0

    def do_estimate(self):
        era = self.take_snapshot()
        config = self.config
        output = self.tool("copy", "--metadata=" + config.metadata_device,
                           "--since=%d" % self.request.since, str(self.granularity()),
                           capture=True)
        words = output.split()
        if not words or not words[0].isdigit():
            raise EraError("copy printed no estimate: %s" % shown(output[:80]))
        say("%d %d" % (era, int(words[0])))
        return 0

    def do_copy(self):
        request, config = self.request, self.config
        granularity = str(self.granularity())
        freeze = request.freeze is not None
        if freeze:
            self.freeze()
        era = self.take_snapshot()
        source = "--source-id=" + request.source_id
        if request.resume is not None:
            # The rest of the interrupted pass, and everything written since its snapshot.
            words = ["copy", "--resume=" + request.resume] + ["--full"] * request.full + [
                "--metadata=" + config.metadata_device, source]
        elif request.full:
            words = ["copy", "--full", "--era=%d" % era, source]
        else:
            words = ["copy", "--metadata=" + config.metadata_device,
                     "--since=%d" % request.since, source]
        # The final pass under fsfreeze has no --rate-limit, --ionice or --nice (gate_request
        # refuses them): every writer of the filesystem waits for it.
        self.tool(*(words + [granularity, config.data_device]), compress=request.compress)
        if freeze:
            thawed = self.thaw()
            self.frozen = False
            if thawed == 2:
                raise EraError("the copy outlasted FREEZE_TIMEOUT (%d s): the filesystem was "
                               "thawed during it" % (request.freeze_timeout
                                                     or config.freeze_timeout))
            if thawed:
                raise EraError("%s was thawed during the copy, not by backup.sh"
                               % shown(config.mountpoint))
        return 0

    def do_sum(self):
        request, config = self.request, self.config
        begin, end = request.range or (0, None)
        # sum takes the metadata snapshots itself, before its read and after it.
        self.tool("sum", "--key=" + request.key.hex(), "--metadata=" + config.metadata_device,
                  "--since=%d" % request.since, "--range=%d:%s" % (begin, "" if end is None else end),
                  str(self.granularity()), config.data_device)
        return 0

    def do_repair(self):
        import tempfile
        request, config = self.request, self.config
        # The list of blocks to repair, verify's XML, arrives on standard input: at most
        # GATE_MAX_LIST bytes of it, which copy then holds as ranges.
        with tempfile.TemporaryFile() as held:
            size = 0
            while sys.stdin is not None:
                piece = os.read(0, 1 << 20)
                if not piece:
                    break
                size += len(piece)
                if size > GATE_MAX_LIST:
                    raise EraError("the block list to repair is longer than %d MiB: copy the "
                                   "device whole instead" % (GATE_MAX_LIST >> 20))
                write_all(held.fileno(), piece)
            held.seek(0)
            self.tool("copy", "--repair", "--era=%d" % request.era,
                      "--source-id=" + request.source_id, str(self.granularity()),
                      config.data_device, stdin=held, compress=request.compress)
        return 0


# ---------------------------------------------------------------------------
# Command line (shared): what every command's parser uses
# ---------------------------------------------------------------------------


def _version():
    import hashlib   # only --version needs it; importing costs every start 2 ms
    try:
        with open(os.path.abspath(__file__), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        return "era_tool %s (%s sha256 %s)" % (__version__, os.path.basename(__file__), digest)
    except OSError:
        return "era_tool %s" % __version__


def _block_size(text):
    if text.strip().isdigit() and len(text.strip()) > 20:
        raise argparse.ArgumentTypeError("%s...: larger than any dm-era block size (at most "
                                         "%d sectors)" % (text.strip()[:20], MAX_BLOCK_SIZE))
    try:
        value = int(text) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError("%r is not a whole number of sectors" % text[:40])
    if value <= 0 or value % SECTORS_PER_PAGE or value > MAX_BLOCK_SIZE:
        raise argparse.ArgumentTypeError(
            "%d: dm-era block sizes are positive multiples of 8 sectors, at most %d"
            % (value, MAX_BLOCK_SIZE))
    return value


def _era(text):
    try:
        value = int(text) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text[:40])
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError("%d is not an era (0 .. 4294967295)" % value)
    return value


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text):
    """A positive number of bytes, with an optional K, M, G or T (powers of 1024)."""
    match = re.match(r"\A([0-9]{1,19})([KMGT]?)(?:i?B)?\Z", text.strip(), re.IGNORECASE)
    value = int(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()] if match else None
    if value is None or not 0 < value <= MAX_OFFSET:
        raise argparse.ArgumentTypeError("%r is not a size in bytes (e.g. 256M, 1G)" % text[:40])
    return value


MIN_RATE = 64 << 10               # --rate-limit below this is a typo, not a plan


def _rate(text):
    """--rate-limit: bytes a second, K, M, G (powers of 1024), optionally followed by /s."""
    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    try:
        value = _byte_size(body)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError("%r is not a rate in bytes a second (e.g. 50M: "
                                         "50 MiB/s)" % text[:40])
    if value < MIN_RATE:
        raise argparse.ArgumentTypeError("%s is below the smallest limit, 64K (K, M and G are "
                                         "powers of 1024)" % text.strip()[:40])
    return value


def _source_id(text):
    # Read as UTF-8 whatever the locale: Python 3.6 under LANG=C decodes the command line as
    # ASCII, keeping the other bytes as lone surrogates, which surrogateescape gives back.
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_SOURCE_ID:
        raise argparse.ArgumentTypeError("longer than %d bytes" % MAX_SOURCE_ID)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None


@functools.lru_cache(maxsize=None)
def _help_width():
    """The width argparse would use (as shutil.get_terminal_size), found once.

    argparse makes a formatter for every add_argument and asks shutil for the
    terminal size each time; importing shutil (with bz2 and lzma) and asking
    forty times costs every start about 2 ms.
    """
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, width or _help_width())


class _RawHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """Epilogs with examples keep their lines."""


class _VersionAction(argparse.Action):
    """--version, with the file's digest computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and the script's sha256, and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        if sys.stdout is None:
            parser.exit(1, "era_tool: error: standard output is closed\n")
        sys.stdout.write(_version() + "\n")
        parser.exit()


# ---------------------------------------------------------------------------
# Commands: each one's options, checks and work, in turn
# ---------------------------------------------------------------------------


COPY_EPILOG = """\
examples:
  era_invalidate --metadata-snapshot --written-since 42 /dev/meta | python3 era_tool.py copy 1024
      print "N bytes to copy" (the estimate; --json for ranges and blocks too)
  era_invalidate --metadata-snapshot --written-since 42 /dev/meta \\
      | python3 era_tool.py copy --since-era 42 --era 45 --source-id web1:root \\
          1024 /dev/mapper/root_era \\
      | gzip -1 | ssh backup 'gzip -d | python3 era_tool.py apply /srv/root.img'
  python3 era_tool.py copy --full --era 45 --source-id web1:root 1024 /dev/mapper/root_era \\
      -o full.stream
      the first backup; its era: `dmsetup status`'s 6th field after `dmsetup message
      NAME 0 checkpoint`, where the next incremental starts
  python3 era_tool.py copy --metadata /dev/sda3 --since 42 --source-id web1:root \\
      /dev/mapper/root_era > delta.stream
      the block list, block size and eras straight from the metadata snapshot
  python3 era_tool.py copy --full --rate-limit 50M --era 45 --source-id db1:data 1024 \\
      /dev/mapper/data_era > full.stream
      at most 50 MiB/s off the disk of a busy host
  python3 era_tool.py copy --resume TOKEN --metadata /dev/sda3 --source-id web1:root \\
      /dev/mapper/root_era > rest.stream
      the rest of an apply that stopped midway ('info MIRROR' prints TOKEN), from a new
      snapshot; --full for a first full copy
"""


def add_copy_parser(commands):
    """The copy command's options."""
    copy = commands.add_parser(
        "copy", help="read the listed blocks from a device into a stream",
        description="Read era_invalidate's XML block list (stdin or -i) and copy those blocks "
                    "of DEVICE into a stream (stdout or -o). Without DEVICE, print how many "
                    "bytes would be copied. The whole list is checked before any data moves.",
        epilog=COPY_EPILOG, formatter_class=_RawHelpFormatter)
    copy.add_argument("block_size", metavar="BLOCK_SIZE", nargs="?",
                      help="dm-era block size in 512-byte sectors (the last number of "
                           "'dmsetup table' for the era device); optional with --metadata")
    copy.add_argument("device", metavar="DEVICE", nargs="?",
                      help="the device (or file) to read; omit for the estimate")
    copy.add_argument("-i", "--input", metavar="XML",
                      help="read the block list from XML instead of standard input")
    copy.add_argument("--metadata", metavar="META_DEV",
                      help="read the block list from the dm-era metadata device itself "
                           "(its metadata snapshot; no era_invalidate needed); needs --since")
    copy.add_argument("--since", type=_era, metavar="ERA",
                      help="with --metadata: blocks written in era ERA or later; recorded "
                           "as the since-era, and the snapshot's era as the era")
    copy.add_argument("--live", action="store_true",
                      help="with --metadata: read the live superblock instead of the "
                           "snapshot (only for a stopped target or a copy of its metadata)")
    copy.add_argument("-o", "--output", metavar="STREAM",
                      help="write the stream to STREAM instead of standard output")
    copy.add_argument("--full", action="store_true",
                      help="copy the whole device, no block list (the first backup); "
                           "all-zero chunks are sent without their data")
    copy.add_argument("--format", choices=FORMATS, default="era",
                      help="stream format: era (checked, default) or legacy (the original "
                           "era_copy format, for the original era_apply)")
    copy.add_argument("--json", action="store_true",
                      help="estimate as JSON: {\"bytes\": ..., \"ranges\": ..., \"blocks\": ...}")
    copy.add_argument("--since-era", type=_era, metavar="N",
                      help="record in the header: the list holds blocks written since era N")
    copy.add_argument("--era", type=_era, metavar="N",
                      help="record in the header: the era the metadata snapshot was taken at")
    copy.add_argument("--repair", action="store_true",
                      help="a repair of the blocks verify listed: with --era N, the mirror's "
                           "era, which apply then keeps (it refuses the stream on a mirror at "
                           "another era)")
    copy.add_argument("--source-id", type=_source_id, metavar="ID",
                      help="record in the header: a name for the source (e.g. host:device)")
    copy.add_argument("--resume", metavar="TOKEN",
                      help="the rest of an apply that stopped midway ('info MIRROR' prints its "
                           "token): what it had not applied yet, and every block written since "
                           "its snapshot (below where it stopped too), with --metadata (a new "
                           "snapshot) or --list; --full for a first full copy")
    copy.add_argument("--list", action="append", metavar="ERA=XML", default=[],
                      help="with --resume and no --metadata: era_invalidate --written-since ERA "
                           "of a new snapshot, for each era the token names (the message says "
                           "which); then --era is that snapshot's era")
    copy.add_argument("--rate-limit", type=_rate, metavar="RATE",
                      help="read DEVICE at most RATE bytes a second (K, M, G: powers of "
                           "1024; e.g. 50M), evenly, in pieces of about 1/40 s")
    copy.add_argument("--force", action="store_true",
                      help="with --metadata: copy even on a kernel older than 5.12 (or "
                           "ALLOW_OLD_KERNEL=1 in the environment), or with the era device's "
                           "metadata over 95%% full (warnings instead)")
    copy.add_argument("--progress", action="store_true",
                      help="show bytes copied, rate (and limit) and ETA on stderr")
    # Cross-checks report through this command's usage line.
    copy.set_defaults(func=cmd_copy, check=functools.partial(check_copy_args, copy))
    return copy


def check_copy_args(parser, args):
    """Cross-option checks of copy, in one place; usage errors exit 2."""
    if args.list and args.resume is None:
        parser.error("--list goes with --resume")
    if args.resume is not None:
        if args.since is not None or args.since_era is not None or args.input is not None \
                or args.repair or args.json or args.format != "era":
            parser.error("--resume takes its block lists from the token and --metadata or "
                         "--list: no --since, --since-era, -i, --repair, --json or --format")
        if args.metadata is not None and args.list:
            parser.error("--resume takes --metadata META_DEV (a new snapshot) or --list "
                         "ERA=XML for each era the token names, not both")
        if args.metadata is None and args.era is None:
            parser.error("--resume without --metadata needs --era N: the era of the snapshot "
                         "the --list lists come from")
        if args.device is None and args.block_size is not None \
                and not args.block_size.isdigit():
            args.device, args.block_size = args.block_size, None   # the token knows it
        if args.device is None:
            parser.error("--resume copies a device: give DEVICE")
        lists = {}
        for item in args.list:
            era, equals, path = item.partition("=")
            try:
                era = _era(era)
            except argparse.ArgumentTypeError as exc:
                parser.error("--list %s: %s" % (item, exc))
            if not equals or not path:
                parser.error("--list takes ERA=XML, not %s" % item)
            if era in lists:
                parser.error("--list names era %d twice" % era)
            lists[era] = path
        args.list = lists
        if args.block_size is not None:
            try:
                args.block_size = _block_size(args.block_size)
            except argparse.ArgumentTypeError as exc:
                parser.error("argument BLOCK_SIZE: %s" % exc)
        return
    if args.metadata is None:
        if args.block_size is None:
            parser.error("copy needs BLOCK_SIZE (or --metadata, which knows it)")
        if args.since is not None or args.live:
            parser.error("--since and --live go with --metadata")
    else:
        if args.since is None:
            parser.error("--metadata needs --since ERA")
        if args.full or args.input is not None or args.since_era is not None:
            parser.error("--metadata reads the block list itself: no --full, -i or --since-era")
        if args.device is None and args.block_size is not None \
                and not args.block_size.isdigit():
            args.device, args.block_size = args.block_size, None   # copy --metadata M DEV
    if args.block_size is not None:
        try:
            args.block_size = _block_size(args.block_size)
        except argparse.ArgumentTypeError as exc:
            parser.error("argument BLOCK_SIZE: %s" % exc)
    if args.full and args.device is None:
        parser.error("--full copies a device: give DEVICE")
    if args.full and args.input is not None:
        parser.error("--full copies the whole device and reads no block list: drop -i")
    if args.json and args.device is not None:
        parser.error("--json prints the estimate, which takes no DEVICE")
    if args.force and args.metadata is None:
        parser.error("--force goes with --metadata (the kernel and metadata checks)")
    if args.rate_limit is not None and args.device is None:
        parser.error("--rate-limit limits the reads of DEVICE: the estimate reads none")
    if args.repair:
        if args.era is None or args.full or args.metadata is not None:
            parser.error("--repair copies the blocks verify listed (-i or stdin) onto the "
                         "mirror at --era N: needs --era, no --full or --metadata")
        if args.since_era not in (None, args.era):
            parser.error("--repair keeps the mirror at --era %d: no other --since-era" % args.era)
        args.since_era = args.era
    since = args.since if args.metadata is not None else args.since_era
    if since is not None and args.era is not None and since > args.era:
        parser.error("the list starts at era %d, later than --era %d" % (since, args.era))


def refuse_terminal(path, what="a stream"):
    """Like gzip: binary data on a terminal is never what was meant."""
    if (path is None or path == "-") and sys.stdout is not None and \
            os.isatty(sys.stdout.fileno()):
        raise EraError("refusing to write %s to a terminal; redirect it or use -o FILE" % what)


def _changed_blocks(args):
    """The block list of a copy: (ranges or None for --full, block size, since-era, era)."""
    if args.full:
        return None, args.block_size, args.since_era, args.era
    if args.metadata is not None:
        changed = read_changed_blocks(args.metadata, args.since, snapshot=not args.live)
        if args.block_size is not None and args.block_size != changed.block_size:
            raise EraError("BLOCK_SIZE %d differs from the block size in %s (%d sectors)"
                           % (args.block_size, args.metadata, changed.block_size))
        if args.since > changed.current_era:
            # Eras only grow: metadata behind the mirror was made anew (a rebuilt or
            # restored data host).  It knows nothing of what changed since --since,
            # and "nothing" would be a silent, wrong incremental.
            raise ChainError("the dm-era metadata in %s is at era %d, before --since %d: it "
                             "was made anew since (a rebuilt or restored data host?) and cannot "
                             "say what changed; start the chain again with a full copy "
                             "(copy --full; backup.sh: move the mirror's state file away)"
                             % (shown(args.metadata), changed.current_era, args.since))
        # The snapshot's era is where the next backup starts.
        era = changed.current_era if args.era is None else args.era
        return changed, changed.block_size, args.since, era
    inp = Input(args.input, "the block list",
                "pipe era_invalidate's output in, or use -i FILE or --metadata")
    try:
        return parse_block_list(inp.file), args.block_size, args.since_era, args.era
    finally:
        inp.close()


def resume_spans(layers, changed, device_size, block_bytes):
    """The byte spans of a resume stream: each layer's blocks from its offset, merged.

    changed: era -> the blocks written in that era or later (a RangeList).
    """
    spans = []
    for era, start in layers:
        if era is None:
            pieces = [(0, device_size)]
        else:
            pieces = byte_ranges(changed[era], block_bytes, device_size)
        for offset, length in pieces:
            end = offset + length
            if end > start:
                spans.append((max(offset, start), end))
    merged = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(begin, end - begin) for begin, end in merged]


def _resume_lists(args, token):
    """For copy --resume: (era -> blocks written since it, block size, the snapshot's era)."""
    eras = sorted({era for era, _ in token.layers if era is not None})
    changed = {}
    if args.metadata is not None:
        snapshot_era = None
        for era in eras:
            blocks = read_changed_blocks(args.metadata, era, snapshot=not args.live)
            if snapshot_era not in (None, blocks.current_era):
                raise EraError("the metadata snapshot of %s changed while it was read (era %d, "
                               "then %d): run again" % (args.metadata, snapshot_era,
                                                        blocks.current_era))
            snapshot_era = blocks.current_era
            changed[era] = blocks
            if blocks.block_size != token.block_size:
                raise EraError("%s has block size %d, the interrupted copy %d sectors: another "
                               "device?" % (args.metadata, blocks.block_size, token.block_size))
        if snapshot_era is None:
            # Only whole-device layers: the snapshot's era is still the stream's.
            snapshot_era = read_changed_blocks(args.metadata, MAX_ERA,
                                               snapshot=not args.live).current_era
        return changed, token.block_size, snapshot_era if args.era is None else args.era
    missing = [era for era in eras if era not in args.list]
    extra = sorted(set(args.list) - set(eras))
    if missing or extra:
        raise EraError("this token needs the blocks written since era%s %s: --metadata META_DEV, "
                       "or each as --list ERA=XML (era_invalidate --written-since ERA of one new "
                       "snapshot)%s"
                       % ("s" if len(eras) > 1 else "", ", ".join(map(str, eras)),
                          "; not era %s" % ", ".join(map(str, extra)) if extra else ""))
    for era in eras:
        inp = Input(args.list[era], "the block list")
        try:
            changed[era] = parse_block_list(inp.file)
        finally:
            inp.close()
    return changed, token.block_size, args.era


def _copy_resume(args, source):
    """copy --resume: the rest of an interrupted apply, and what changed since its snapshot."""
    token = ResumeToken.decode(args.resume)
    full = token.layers[0][0] is None
    if full != args.full:
        raise EraError("the token is of an interrupted %s copy: %s" % (
            "full" if full else "incremental", "add --full" if full else "drop --full"))
    if source.size != token.device_size:
        raise EraError("%s has %d bytes, but the interrupted copy was of %d bytes: it changed "
                       "size; copy again from the start" % (args.device, source.size,
                                                            token.device_size))
    if args.block_size is not None and args.block_size != token.block_size:
        raise EraError("BLOCK_SIZE %d differs from the interrupted copy's (%d sectors)"
                       % (args.block_size, token.block_size))
    source_id = args.source_id or ""
    if _source_crc(source_id) != token.source_crc:
        raise EraError("the token is of a copy with another --source-id than %r: the same "
                       "--source-id as the interrupted copy, please" % source_id)
    changed, block_size, era = _resume_lists(args, token)
    block_bytes = block_size * SECTOR
    for ranges in changed.values():
        check_ranges_fit(ranges, block_bytes, source.size, args.device)
    stream_era = max(e for e, _ in token.layers if e is not None) \
        if any(e is not None for e, _ in token.layers) else None
    if stream_era is not None and era < stream_era:
        raise EraError("the snapshot's era %d is before the interrupted copy's (%d): take a new "
                       "metadata snapshot" % (era, stream_era))
    spans = resume_spans(token.layers, changed, source.size, block_bytes)
    total = sum(length for _, length in spans)
    since = [e for e, _ in token.layers if e is not None]
    header = StreamHeader(source.size, total, block_size,
                          since_era=None if full else min(since), era=era,
                          source_id=source_id,
                          resume=Resume(token.stream_crc, token.chunk_crc, token.offset,
                                        token.layers))
    return header, spans


def cmd_copy(args):
    if args.device is not None:
        refuse_terminal(args.output)
        inputs = [("DEVICE %s" % args.device, args.device)]
        if args.metadata is not None:
            inputs.append(("--metadata %s" % args.metadata, args.metadata))
        elif args.resume is not None:
            inputs.extend(("--list %s" % path, path) for path in args.list.values())
        elif not args.full:
            inputs.append(("the block list %s" % (args.input or "on standard input"),
                           args.input))
        refuse_same_files(inputs, [("the stream %s" % (args.output or "on standard output"),
                                    args.output)])
    elif sys.stdout is None:
        raise EraError("standard output is closed: nowhere to print the estimate")
    if args.metadata is not None:
        guard_era_host(args.metadata, args.force)
    if args.resume is not None:
        return _copy_resumed(args)
    ranges, block_size, since_era, era = _changed_blocks(args)
    block_bytes = block_size * SECTOR

    if args.device is None:
        blocks = ranges.blocks
        if args.json:
            import json
            say(json.dumps({"bytes": blocks * block_bytes, "ranges": len(ranges),
                            "blocks": blocks}))
        else:
            # Number first, as the original printed it: scripts take the first word.
            say("%d bytes to copy" % (blocks * block_bytes))
        return 0

    source = Source(args.device, warn)
    try:
        if args.full:
            total = source.size
            spans = [(0, source.size)]
        else:
            check_ranges_fit(ranges, block_bytes, source.size, args.device)
            total = sum(length for _, length in byte_ranges(ranges, block_bytes, source.size))
            spans = byte_ranges(ranges, block_bytes, source.size)
        _write_stream(args, source, None if args.format == "legacy" else StreamHeader(
            source.size, total, block_size, since_era=since_era, era=era, repair=args.repair,
            full=args.full, source_id=args.source_id or ""), spans, total)
    finally:
        source.close()
    return 0


def _copy_resumed(args):
    source = Source(args.device, warn)
    try:
        header, spans = _copy_resume(args, source)
        _write_stream(args, source, header, spans, header.total_bytes)
    finally:
        source.close()
    return 0


def _write_stream(args, source, header, spans, total):
    """copy's output: the spans of `source` as a stream with `header` (None: legacy).

    Also export's, which has no --rate-limit: it reads the backup host's own files.
    """
    rate = getattr(args, "rate_limit", None)
    output = Output(args.output)
    failed = True
    try:
        writer = LegacyWriter(output) if header is None else StreamWriter(output, header)
        progress = Progress(args.progress, "copied", total, rate)
        done = copy_device(source, spans, writer, progress,
                           None if rate is None else RateLimit(rate))
        output.finish()
        progress.finish(done)
        failed = False
    finally:
        output.close(failed)


APPLY_EPILOG = """\
examples:
  ssh host 'era_invalidate ... | python3 era_tool.py copy 1024 /dev/mapper/root_era' \\
      | python3 era_tool.py apply /srv/root.img
  python3 era_tool.py apply -i full.stream /srv/root.img
  zstd -d < delta.stream.zst | python3 era_tool.py apply --progress /dev/backup/root
  python3 era_tool.py apply --undo /srv/root.img.undo.$(date +%Y%m%d-%H%M%S) /srv/root.img < delta.stream

exit 0 means the stream was complete and intact and the data is on disk (fsync).
On a damaged or cut stream nothing unverified is written; the message says how
much was applied and that the destination is partially updated (with --undo:
rolled back). One apply or rollback per mirror at a time (flock); a mirror,
undo or state file that apply creates is mode 0600 (chmod it to share it).
"""


def add_apply_parser(commands):
    """The apply command's options."""
    apply_ = commands.add_parser(
        "apply", help="write a stream into a mirror file or block device",
        description="Apply a stream (era_tool or original era_copy format, detected) to "
                    "DESTINATION: every chunk is verified before it is written. A missing "
                    "file is created and a file is grown to the source size.",
        epilog=APPLY_EPILOG, formatter_class=_RawHelpFormatter)
    apply_.add_argument("destination", metavar="DESTINATION",
                        help="mirror file (created if missing) or block device (opened "
                             "exclusively: a mounted one is refused)")
    apply_.add_argument("-i", "--input", metavar="STREAM",
                        help="read the stream from STREAM instead of standard input")
    apply_.add_argument("--state", metavar="FILE",
                        help="the mirror's chain state (default: DESTINATION.era beside a "
                             "mirror file; a block device needs this to keep one)")
    apply_.add_argument("--force", action="store_true",
                        help="apply even if the stream does not continue the mirror's chain "
                             "(gap, other source, other block size, an incremental onto a "
                             "mirror with no state), DESTINATION is a stream or undo file, or "
                             "the mirror file is larger than the source (then shrink it to "
                             "the source size once the stream is complete)")
    apply_.add_argument("--undo", metavar="UNDO_FILE",
                        help="first save the old content of every region overwritten into "
                             "UNDO_FILE (a new file), synced before the overwrite: a failed "
                             "apply then rolls itself back, and 'rollback' or applying "
                             "UNDO_FILE steps the mirror back later")
    apply_.add_argument("--allow-empty", action="store_true",
                        help="accept an empty input as an original-format stream with no "
                             "changes")
    apply_.add_argument("--progress", action="store_true",
                        help="show bytes applied, rate and ETA on stderr")
    apply_.add_argument("--checkpoint", type=_byte_size, metavar="SIZE",
                        default=CHECKPOINT_BYTES,
                        help="without --undo: sync the mirror and record in its state how far "
                             "the apply got, every SIZE bytes (K, M, G suffixes; default 256M) "
                             "or %d s, so that an apply that stops midway can be resumed "
                             "(copy --resume)" % CHECKPOINT_SECONDS)
    apply_.set_defaults(func=cmd_apply)
    return apply_


def cmd_apply(args):
    apply_stream(args.input, args.destination, undo=args.undo, force=args.force,
                 progress=args.progress, state=args.state, allow_empty=args.allow_empty,
                 checkpoint=args.checkpoint)
    return 0


BLOCKS_EPILOG = """\
examples:
  dmsetup message root_era 0 take_metadata_snap
  python3 era_tool.py blocks --metadata /dev/sda3 --since 42 | python3 era_tool.py copy 1024
  python3 era_tool.py blocks --metadata /dev/sda3 --since 42 > list.xml
  dmsetup message root_era 0 drop_metadata_snap
  python3 era_tool.py blocks --live --metadata meta-copy.img --since 1
"""


def add_blocks_parser(commands):
    """The blocks command's options."""
    blocks = commands.add_parser(
        "blocks", help="print the changed-block list from dm-era metadata, as era_invalidate",
        description="Read the dm-era metadata device and print the blocks written since ERA "
                    "in era_invalidate's XML, so it can stand in for era_invalidate. By "
                    "default the metadata snapshot is read (take_metadata_snap first); every "
                    "block read is checked (checksums, magic, structure).",
        epilog=BLOCKS_EPILOG, formatter_class=_RawHelpFormatter)
    blocks.add_argument("--metadata", metavar="META_DEV", required=True,
                        help="the dm-era metadata device (or a copy of it)")
    blocks.add_argument("--since", type=_era, metavar="ERA", required=True,
                        help="list blocks written in era ERA or later")
    blocks.add_argument("--live", action="store_true",
                        help="read the live superblock, and its current writeset, instead of "
                             "the snapshot: only for a stopped target or a copy of its "
                             "metadata")
    blocks.add_argument("--force", action="store_true",
                        help="list even on a kernel older than 5.12 (or ALLOW_OLD_KERNEL=1 in "
                             "the environment), or with the era device's metadata over 95%% "
                             "full (warnings instead)")
    blocks.set_defaults(func=cmd_blocks)
    return blocks


def cmd_blocks(args):
    if sys.stdout is None:
        raise EraError("standard output is closed: nowhere to print the list")
    guard_era_host(args.metadata, args.force)
    changed = read_changed_blocks(args.metadata, args.since, snapshot=not args.live)
    out = sys.stdout
    try:
        for line in iter_blocks_xml(changed):
            out.write(line)
        out.flush()
    except BrokenPipeError:
        raise EraError(STDOUT_CLOSED) from None
    return 0


SUM_EPILOG = """\
examples:
  key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')     # on the backup host: its own key
  ssh host python3 era_tool.py sum --key $key 1024 /dev/mapper/root_era \\
      | python3 era_tool.py verify --key $key /srv/root.img > diverged.xml
  python3 era_tool.py sum --range 0:100000 1024 /dev/mapper/root_era -o part1.sums
  python3 era_tool.py sum --metadata /dev/sda3 --since 42 1024 /dev/mapper/root_era > sums
      also the blocks written since era 42 (the mirror's era): verify reports those as
      changes the next incremental brings, not as divergence

Only digests leave the host: 16 bytes a block, keyed with --key so that matching digests
cannot be prepared without it. Reads with O_DIRECT, as copy does.
"""


def _key(text):
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = None
    if key is None or not MIN_SUM_KEY <= len(key) <= MAX_SUM_KEY:
        raise argparse.ArgumentTypeError("%r is not a key of %d to %d bytes in hex"
                                         % (text[:40], MIN_SUM_KEY, MAX_SUM_KEY))
    return key


def _block_range(text):
    begin, colon, end = text.partition(":")
    try:
        if not colon or len(text) > 30 or not (begin + end).isdigit() or not \
                _isascii(begin + end):
            raise ValueError
        begin, end = int(begin) if begin else 0, int(end) if end else None
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not BEGIN:END in blocks (either may be left "
                                         "out)" % text[:40]) from None
    if end is not None and not begin < end:
        raise argparse.ArgumentTypeError("%s: END must be greater than BEGIN" % text)
    return begin, end


def add_sum_parser(commands):
    """The sum command's options."""
    sum_ = commands.add_parser(
        "sum", help="hash a device block by block, for verify on the backup host",
        description="Read DEVICE (the source; every block, or --range) and write a sum stream: "
                    "one keyed digest per dm-era block, with a header and a checked trailer. "
                    "verify compares a mirror with it without the data crossing the network.",
        epilog=SUM_EPILOG, formatter_class=_RawHelpFormatter)
    sum_.add_argument("block_size", metavar="BLOCK_SIZE", type=_block_size,
                      help="dm-era block size in 512-byte sectors (as for copy)")
    sum_.add_argument("device", metavar="DEVICE", help="the device (or file) to hash")
    sum_.add_argument("-o", "--output", metavar="SUMS",
                      help="write the sums to SUMS instead of standard output")
    sum_.add_argument("--key", type=_key, metavar="HEX",
                      help="key the digests with this (%d to %d bytes, in hex), chosen by the "
                           "verifying side (default: a random one)" % (MIN_SUM_KEY, MAX_SUM_KEY))
    sum_.add_argument("--hash", choices=SUM_HASHES, default=DEFAULT_HASH,
                      help="the hash (default %s: fastest where the CPU has SHA instructions; "
                           "blake2b where it has not)" % DEFAULT_HASH)
    sum_.add_argument("--range", type=_block_range, metavar="BEGIN:END",
                      help="only blocks BEGIN to END-1: a large device a part at a time")
    sum_.add_argument("--metadata", metavar="META_DEV",
                      help="also send the blocks written since --since, from the dm-era "
                           "metadata: verify tells those changes from divergence. On an era "
                           "device sum takes a metadata snapshot before the read and another "
                           "after it (dmsetup message), so that writes during the read count "
                           "as changes, and drops it at the end")
    sum_.add_argument("--since", type=_era, metavar="ERA",
                      help="with --metadata: the mirror's era (its state's \"era\")")
    sum_.add_argument("--live", action="store_true",
                      help="with --metadata: read the live superblock (a stopped target or a "
                           "copy of its metadata)")
    sum_.add_argument("--rate-limit", type=_rate, metavar="RATE",
                      help="read DEVICE at most RATE bytes a second, as copy --rate-limit")
    sum_.add_argument("--progress", action="store_true",
                      help="show bytes hashed, rate (and limit) and ETA on stderr")
    sum_.set_defaults(func=cmd_sum, check=functools.partial(check_sum_args, sum_))
    return sum_


def check_sum_args(parser, args):
    """Cross-option checks of sum; usage errors exit 2."""
    if (args.metadata is None) != (args.since is None):
        parser.error("--metadata and --since go together")
    if args.live and args.metadata is None:
        parser.error("--live goes with --metadata")
    if args.block_size * SECTOR > MAX_SUM_BLOCK:
        parser.error("sum hashes blocks of at most %d sectors" % (MAX_SUM_BLOCK // SECTOR))


def cmd_sum(args):
    refuse_terminal(args.output, "sums")
    inputs = [("DEVICE %s" % args.device, args.device)]
    if args.metadata is not None:
        inputs.append(("--metadata %s" % args.metadata, args.metadata))
    refuse_same_files(inputs, [("the sums %s" % (args.output or "on standard output"),
                                args.output)])

    # On an era device, sum takes the snapshots itself: one before the read, one after
    # it, so that the writes that land while it reads are in the changed list too.
    era_device = dm_name(args.device) if args.metadata is not None and not args.live \
        else None

    def changed():
        if era_device is not None:
            take_metadata_snapshot(era_device)
        blocks = read_changed_blocks(args.metadata, args.since, snapshot=not args.live)
        if blocks.block_size != args.block_size:
            raise EraError("BLOCK_SIZE %d differs from the block size in %s (%d sectors)"
                           % (args.block_size, args.metadata, blocks.block_size))
        return blocks
    try:
        if args.metadata is not None:
            changed()             # a wrong block size or metadata fails before the long read
        _sum(args, changed if args.metadata is not None else None)
    finally:
        if era_device is not None:
            try:
                dm_message(era_device, "drop_metadata_snap")
            except EraError:
                pass              # never taken: the first message failed
    return 0


def _sum(args, changed):
    source = Source(args.device, warn)
    try:
        block_bytes = args.block_size * SECTOR
        nr_blocks = -(-source.size // block_bytes)
        begin, end = args.range or (0, None)
        end = nr_blocks if end is None else end
        if not begin < end <= nr_blocks:
            raise EraError("--range %d:%d is not within the %d blocks of %s"
                           % (begin, end, nr_blocks, args.device))
        header = SumHeader(source.size, args.block_size, begin, end, args.hash, args.key,
                           since_era=args.since)
        output = Output(args.output)
        failed = True
        try:
            total = min(end * block_bytes, source.size) - begin * block_bytes
            progress = Progress(args.progress, "hashed", total, args.rate_limit)
            done = sum_device(source, header, output, progress, changed,
                              None if args.rate_limit is None else RateLimit(args.rate_limit))
            output.finish()
            progress.finish(done)
            failed = False
        finally:
            output.close(failed)
    finally:
        source.close()


VERIFY_EPILOG = """\
examples:
  key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \\n')
  ssh host python3 era_tool.py sum --key $key 1024 /dev/mapper/root_era \\
      | python3 era_tool.py verify --key $key /srv/root.img > diverged.xml
  ssh host 'python3 era_tool.py copy --repair --era 42 -i - 1024 /dev/mapper/root_era' \\
      < diverged.xml | python3 era_tool.py apply /srv/root.img
      repairs exactly the diverged blocks; the mirror stays at its era (42)
  python3 era_tool.py verify --json -i sums /srv/root.img

exit 0: every block is identical (or one of the changes the sums list since the mirror's
era); 3: blocks diverged (listed as era_invalidate XML on stdout, or -o); 1: an error,
damaged or cut sums included.
"""


def add_verify_parser(commands):
    """The verify command's options."""
    verify = commands.add_parser(
        "verify", help="compare a mirror with the sums of its source",
        description="Hash MIRROR as the sum stream says (stdin or -i), compare block by block, "
                    "and print the blocks that differ as era_invalidate XML, which copy "
                    "--repair turns into a repair; a summary goes to stderr. Blocks the sums "
                    "list as changed since the mirror's era are not divergence: the next "
                    "incremental brings them.",
        epilog=VERIFY_EPILOG, formatter_class=_RawHelpFormatter)
    verify.add_argument("mirror", metavar="MIRROR", help="the mirror file or block device")
    verify.add_argument("-i", "--input", metavar="SUMS",
                        help="read the sums from SUMS instead of standard input")
    verify.add_argument("-o", "--output", metavar="XML",
                        help="write the diverged blocks' XML to XML instead of standard output")
    verify.add_argument("--key", type=_key, metavar="HEX",
                        help="the key given to sum: sums made with another key are refused")
    verify.add_argument("--state", metavar="FILE",
                        help="the mirror's state file, if not MIRROR.era: sums of a device of "
                             "another size or block size are refused")
    verify.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout instead of the XML")
    verify.add_argument("--progress", action="store_true",
                        help="show bytes compared, rate and ETA on stderr")
    verify.set_defaults(func=cmd_verify)
    return verify


def cmd_verify(args):
    if args.json and sys.stdout is None or args.output is None and sys.stdout is None:
        raise EraError("standard output is closed: nowhere to print the result")
    state_path = MirrorState.path_for(args.mirror, args.state)
    # The mirror and its state are not written, but a list written over either would be
    # the end of them.
    refuse_same_files([("the sums %s" % (args.input or "on standard input"), args.input)],
                      [("MIRROR %s" % args.mirror, args.mirror)] +
                      ([("its state file %s" % state_path, state_path)] if state_path else []) +
                      ([("the list %s" % args.output, args.output)] if args.output else []))
    state = MirrorState.load(state_path)
    inp = Input(args.input, "sums", "pipe 'era_tool.py sum' in, or use -i FILE")
    try:
        header = SumHeader.read(inp)
        if args.key is not None and header.key != args.key:
            raise EraError("the sums were made with another key than --key: not the sums "
                           "asked for (or replayed)")
        if state.known and state.source_size is not None and \
                state.source_size != header.device_size:
            raise ChainError("the sums are of a device of %d bytes; the mirror's state (%s) "
                             "records a source of %d: wrong mirror or device?"
                             % (header.device_size, shown(state.path), state.source_size))
        if state.known and state.block_size is not None and \
                state.block_size != header.block_size:
            raise ChainError("the sums have block size %d, the mirror %d (%s): wrong mirror?"
                             % (header.block_size, state.block_size, shown(state.path)))
        mirror = Source(args.mirror, warn)
        try:
            import fcntl
            try:
                # Shared: an apply (exclusive) does not change the mirror under the compare.
                fcntl.flock(mirror.file.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceError("%s is being written by another era_tool (apply or "
                                  "rollback): verify after it" % args.mirror) from None
            total = min(header.end * header.block_bytes, header.device_size) - \
                header.begin * header.block_bytes
            verdict = verify_mirror(inp, header, mirror,
                                    Progress(args.progress, "compared", total))
        finally:
            mirror.close()
    finally:
        inp.close()
    return report_verdict(args, verdict)


def report_verdict(args, verdict):
    """verify's output: the XML (or JSON), the summary line, the exit status."""
    header = verdict.header
    diverged, changed = verdict.split()
    block_bytes = header.block_bytes
    lines = "".join(iter_blocks_xml(diverged))
    if args.output is not None:
        output = Output(args.output)
        failed = True
        try:
            output.write(lines.encode("ascii"))
            output.finish()
            failed = False
        finally:
            output.close(failed)
    differs = bool(len(diverged)) or verdict.extra_bytes > 0
    if args.json:
        import json
        say(json.dumps({
            "identical": not differs, "blocks": header.blocks, "begin": header.begin,
            "end": header.end, "block_size": header.block_size,
            "diverged": diverged.blocks, "diverged_ranges": [list(r) for r in diverged],
            "changed": changed.blocks, "changed_since_era": header.since_era,
            "extra_bytes": verdict.extra_bytes, "seconds": round(verdict.seconds, 3)}))
    else:
        if args.output is None:
            sys.stdout.write(lines)
            sys.stdout.flush()
        parts = ["%d blocks compared in %.1f s" % (header.blocks, verdict.seconds)]
        parts.append("%d diverged (%s)" % (diverged.blocks, human(diverged.blocks * block_bytes))
                     if diverged.blocks else "none diverged")
        if header.since_era is not None:
            parts.append("%d changed since era %d (the next incremental brings them)"
                         % (changed.blocks, header.since_era))
        if verdict.extra_bytes:
            parts.append("the mirror is %d bytes longer than the source (truncate -s %d)"
                         % (verdict.extra_bytes, header.device_size))
        err("era_tool: verify: %s" % "; ".join(parts))
    return EXIT_DIFFERS if differs else 0


ROLLBACK_EPILOG = """\
examples:
  python3 era_tool.py rollback /srv/root.img.undo.20261126 /srv/root.img
      after a killed apply --undo: the mirror is as before that apply
  for undo in $(ls -r /srv/root.img.undo.*); do python3 era_tool.py rollback "$undo" /srv/root.img; done
      step back through kept versions, newest first
"""


def add_rollback_parser(commands):
    """The rollback command's options."""
    rollback = commands.add_parser(
        "rollback", help="put a mirror back as it was before an apply --undo",
        description="Restore DESTINATION byte for byte to its state before the apply that "
                    "wrote UNDO_FILE, from a complete undo file or one cut short by a killed "
                    "or crashed apply, and restore its recorded era.",
        epilog=ROLLBACK_EPILOG, formatter_class=_RawHelpFormatter)
    rollback.add_argument("undo_file", metavar="UNDO_FILE", help="written by apply --undo")
    rollback.add_argument("destination", metavar="DESTINATION", help="the mirror")
    rollback.add_argument("--state", metavar="FILE",
                          help="the mirror's state file, if not DESTINATION.era")
    rollback.add_argument("--force", action="store_true",
                          help="roll back even if the undo file does not match the mirror "
                               "(source, era, size, the apply its state records), or is cut "
                               "short or damaged where it must be whole: what it holds intact "
                               "is written back")
    rollback.set_defaults(func=cmd_rollback)
    return rollback


def cmd_rollback(args):
    if sys.stdout is None:
        raise EraError("standard output is closed: nowhere to say what was rolled back")
    undo = roll_back(args.undo_file, args.destination, state=args.state, force=args.force)
    if undo is None:
        err("era_tool: %s holds no complete header: the apply that made it changed "
            "nothing in %s" % (shown(args.undo_file), shown(args.destination)))
        return 0
    header = undo.header
    say("rolled back %s: %d chunks restored from %s undo file, size %d bytes%s"
        % (shown(args.destination), len(undo.chunks),
           "a complete" if undo.complete else "a cut-short", header.device_size,
           "" if header.era is None else ", at era %d again" % header.era))
    return 0


INFO_EPILOG = """\
examples:
  python3 era_tool.py info -i delta.stream
  gzip -d < delta.stream.gz | python3 era_tool.py info --json
  python3 era_tool.py info /srv/root.img          the mirror's size and the era it holds
  python3 era_tool.py info -i /srv/root.img.undo.20261204-030001.001.incremental
      an undo file: the stream that puts the mirror back as it was before that
      apply (its era is the one the mirror held then)
"""


def add_info_parser(commands):
    """The info command's options."""
    info = commands.add_parser(
        "info", help="describe and verify a stream, or show a mirror's state",
        description="Print a stream's header (stdin or -i STREAM; an undo file is read as "
                    "the stream it is), read it through and report its chunks, bytes and "
                    "whether it is intact; exit 1 if it is damaged or cut short. With "
                    "MIRROR instead: the mirror's size and its state file (MIRROR.era): "
                    "the era it holds, its source, a resume token. Nothing is written.",
        epilog=INFO_EPILOG, formatter_class=_RawHelpFormatter)
    info.add_argument("-i", "--input", metavar="STREAM",
                      help="read the stream from STREAM instead of standard input")
    info.add_argument("mirror", metavar="MIRROR", nargs="?",
                      help="show a mirror's size and chain state instead of a stream")
    info.add_argument("--state", metavar="FILE",
                      help="with MIRROR: its state file, if not MIRROR.era")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    # Cross-checks report through this command's usage line.
    info.set_defaults(func=cmd_info, check=functools.partial(check_info_args, info))
    return info


def check_info_args(parser, args):
    """A stream or a mirror; usage errors exit 2."""
    if args.mirror is not None and args.input is not None:
        parser.error("info shows a stream (-i) or a mirror (MIRROR), not both")


def cmd_info(args):
    if sys.stdout is None:
        raise EraError("standard output is closed: nowhere to print the description")
    if args.mirror is not None:
        return _mirror_info(args)
    inp, kind, first = open_stream(args.input)
    try:
        if kind is None:
            raise StreamError("the stream is empty")
        info, problem = (_scan_stream if kind == "era" else _scan_legacy)(inp, first)
        if problem is not None:
            info.update(intact=False, problem=str(problem))
        # What was read is shown even when the stream turns out damaged.
        _print_info(info, args.json)
        if problem is not None:
            raise problem
    finally:
        inp.close()
    return 0


def _scan_stream(inp, first):
    """Read an era_tool stream through; return (info, the error that stopped it or None)."""
    header = StreamHeader.read(inp, first)
    info = {"format": "era_tool"}
    info.update(header.as_dict())
    reader = StreamReader(inp, header)
    problem = None
    try:
        for _ in reader:
            pass
    except EraError as exc:
        problem = exc
    info.update(chunks=reader.chunks, data_bytes=reader.data_bytes,
                zero_bytes=reader.zero_bytes, intact=True)
    return info, problem


def _scan_legacy(inp, first):
    """Read an original-format stream through; return (info, error or None)."""
    reader = LegacyReader(_Prefixed(inp, first))
    problem = None
    try:
        for _ in reader:
            pass
    except EraError as exc:
        problem = exc
    # The original format has no checks: it cannot be proven complete (intact None).
    return {"format": "legacy", "records": reader.records, "data_bytes": reader.data_bytes,
            "intact": None}, problem


def _mirror_info(args):
    try:
        mode = os.stat(args.mirror).st_mode
    except OSError as exc:
        raise _os_error(exc, "cannot open %s" % args.mirror) from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DeviceError("%s is not a regular file or block device" % args.mirror)
    path = MirrorState.path_for(args.mirror, args.state)
    state = MirrorState.load(path)
    info = {"mirror": args.mirror}
    try:
        mirror = BlockFile(args.mirror)
    except OSError as exc:
        raise _os_error(exc, "cannot open %s" % args.mirror) from None
    try:
        info["size"] = mirror.size()
    finally:
        mirror.close()
    info["state_file"] = path
    if not state.known:
        info["state"] = "none (no chained stream applied yet)"
    else:
        for key in ("source_id", "source_size", "block_size", "era", "stream_created",
                    "applied"):
            info[key] = getattr(state, key)
        if state.interrupted is not None:
            info["interrupted"] = state.interrupted
        info["resume_token"] = state.token()
    _print_info(info, args.json)
    return 0


def _print_info(info, as_json):
    if as_json:
        import json
        say(json.dumps(info, sort_keys=True))
        return
    for key, value in info.items():
        if key in ("target_size", "target_crc", "previous_crc", "resume", "resume_token") \
                and value is None:
            continue
        if key in ("created", "stream_created", "applied") and isinstance(value, int):
            try:
                value = "%d (%s)" % (value, time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime(value)))
            except (OverflowError, OSError, ValueError):
                value = "%d (not a date)" % value   # a crafted header: still intact
        elif key == "interrupted":
            value = "the apply of %s stream 0x%08x (to era %d) stopped: %d of its %d bytes " \
                "applied, everything below offset %d; resume it with copy --resume %s" % (
                    "a full" if value["covers"][0][0] is None else "an incremental",
                    value["stream_crc"], value["era"], value["applied_bytes"],
                    value["total_bytes"], value["offset"],
                    "--full TOKEN" if value["covers"][0][0] is None else "TOKEN")
        elif key == "resume" and value is not None:
            value = "continues stream 0x%08x from offset %d; layers %s" % (
                value["stream_crc"], value["offset"], ", ".join(
                    "%s from %d" % ("every block" if era is None else "since era %d" % era,
                                    offset) for era, offset in value["layers"]))
        elif key == "intact" and value is None:
            value = "unknown (the original format has no checksums or end marker)"
        elif key == "undo" and value is True:
            # Its eras read backwards: it undoes the apply that took the mirror from
            # era (before) to since era (after).
            value = "yes: it puts the mirror %s (after the apply that wrote it) back %s" % (
                "" if info.get("since_era") is None else "at era %d" % info["since_era"],
                "as it was before" if info.get("era") is None
                else "at era %d, as it was before" % info["era"])
            value = value.replace("mirror  (", "mirror (")
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif value is None:
            value = "-"
        elif key in ("target_crc", "previous_crc"):
            value = "0x%08x" % value
        say("%-12s %s" % (key.replace("_", " ") + ":", shown(value)))


VERSIONS_EPILOG = """\
examples:
  python3 era_tool.py versions /srv/root.img
  python3 era_tool.py versions --json /srv/root.img
  python3 era_tool.py versions --state /srv/root.era --undo /srv/u.2 --undo /srv/u.1 /dev/vg/root

The undo files are MIRROR.undo.* beside the mirror (backup.sh's KEEP_UNDO and
README's naming), or those given with --undo. Each is read through and checked.
A missing, cut or damaged undo file ends the chain there: the versions before it
cannot be rebuilt, and the output says so. Nothing is written.
"""


def _add_version_arguments(parser):
    """MIRROR and how to find its versions: versions, export and serve share them."""
    parser.add_argument("mirror", metavar="MIRROR", help="the mirror file or block device")
    parser.add_argument("--state", metavar="FILE",
                        help="the mirror's state file, if not MIRROR.era")
    parser.add_argument("--undo", metavar="UNDO_FILE", action="append",
                        help="an undo file of the mirror's chain, instead of MIRROR.undo.* "
                             "(repeat for each)")


def add_versions_parser(commands):
    """The versions command's options."""
    versions = commands.add_parser(
        "versions", help="list the versions a mirror and its undo files can give back",
        description="List the versions that export and serve can rebuild: the mirror's own "
                    "and one per undo file of its chain, each with its era, when it was made "
                    "and replaced, and its size.",
        epilog=VERSIONS_EPILOG, formatter_class=_RawHelpFormatter)
    _add_version_arguments(versions)
    versions.add_argument("--json", action="store_true", help="print one JSON object")
    versions.set_defaults(func=cmd_versions)
    return versions


def _date(seconds):
    if seconds is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "%d" % seconds


def cmd_versions(args):
    if sys.stdout is None:
        raise EraError("standard output is closed: nowhere to print the versions")
    with Versions(args.mirror, args.state, args.undo) as found:
        if args.json:
            import json
            say(json.dumps({
                "mirror": args.mirror, "source_id": found.source_id,
                "versions": [{"era": version.era, "size": version.size,
                              "applied": version.applied, "replaced": version.replaced,
                              "undo_file": version.undo, "chain": list(version.chain)}
                             for version in found.versions],
                "problems": [{"undo_file": path, "problem": problem}
                             for path, problem in found.problems]}, sort_keys=True))
            return 0
        say("%-10s  %-19s  %-19s  %15s  %s" % ("era", "made (UTC)", "replaced (UTC)",
                                                "bytes", "from"))
        for version in found.versions:
            say("%-10d  %-19s  %-19s  %15d  %s" % (
                version.era, _date(version.applied), _date(version.replaced), version.size,
                shown(version.undo) if version.undo else "the mirror"))
        for path, problem in found.problems:
            say("%s %s" % (shown(path), problem))
    return 0


EXPORT_EPILOG = """\
examples:
  python3 era_tool.py export --at 41 /srv/root.img -o root-41.era
  python3 era_tool.py export --at 41 /srv/root.img | python3 era_tool.py apply /srv/copy.img
  python3 era_tool.py export /srv/root.img | ssh host python3 era_tool.py apply /dev/sdb2

The stream is a full copy (with ZERO chunks, as copy --full writes them) of the
version at ERA, rebuilt from the mirror and the undo files between them, which
are only read, once. Each undo chunk is checked as it is used: a damaged one
stops the export there (exit 1; 'versions' checks every undo file first).
apply writes it anywhere a full stream goes.
"""


def add_export_parser(commands):
    """The export command's options."""
    export = commands.add_parser(
        "export", help="write any kept version of a mirror as a full stream",
        description="Write the version of MIRROR at --at ERA (default: the mirror's own) as a "
                    "full era_tool stream, from the mirror and its undo files, without "
                    "writing to either.",
        epilog=EXPORT_EPILOG, formatter_class=_RawHelpFormatter)
    _add_version_arguments(export)
    export.add_argument("--at", type=_era, metavar="ERA",
                        help="the version's era (see versions; default: the mirror's own)")
    export.add_argument("-o", "--output", metavar="STREAM",
                        help="write the stream to STREAM instead of standard output")
    export.add_argument("--progress", action="store_true",
                        help="show bytes exported, rate and ETA on stderr")
    export.set_defaults(func=cmd_export)
    return export


def cmd_export(args):
    refuse_terminal(args.output)
    with Versions(args.mirror, args.state, args.undo, check=False) as found:
        version = found.select(args.at)
        refuse_same_files(found.inputs(), [("the stream %s" % (
            args.output or "on standard output"), args.output)])
        header = StreamHeader(version.size, version.size, found.block_size, era=version.era,
                              full=True, source_id=found.source_id)
        _write_stream(args, found.image(version), header, [(0, version.size)], version.size)
    return 0


SERVE_EPILOG = """\
examples:
  python3 era_tool.py serve --at 41 /srv/root.img /run/root-41.sock &
  nbd-client -unix /run/root-41.sock /dev/nbd0 -readonly
  mount -o ro,noload /dev/nbd0 /mnt         (noload: ext4 replays no journal)
  cp -a /mnt/etc/fstab /tmp/ && umount /mnt && nbd-client -d /dev/nbd0
  kill %1

Serves the version at ERA read-only, straight from the mirror and its undo files
(nothing is written to them; writes are answered EPERM). The socket is mode
0600. While it serves, apply and rollback of the mirror are refused: the mirror
must not change under a reader. SIGINT or SIGTERM stop it (exit 0).
"""


def add_serve_parser(commands):
    """The serve command's options."""
    serve = commands.add_parser(
        "serve", help="serve a kept version read-only over NBD on a Unix socket",
        description="Serve the version of MIRROR at --at ERA (default: the mirror's own) as a "
                    "read-only NBD export on the Unix socket SOCKET, for nbd-client, from "
                    "the mirror and its undo files, without writing to either.",
        epilog=SERVE_EPILOG, formatter_class=_RawHelpFormatter)
    _add_version_arguments(serve)
    serve.add_argument("socket", metavar="SOCKET", help="the Unix socket to listen on")
    serve.add_argument("--at", type=_era, metavar="ERA",
                       help="the version's era (see versions; default: the mirror's own)")
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args):
    with Versions(args.mirror, args.state, args.undo, check=False) as found:
        version = found.select(args.at)
        image = found.image(version)
        server = NbdServer(image, args.socket, lambda line: err("era_tool: serve: " + line))
        try:
            err("era_tool: serving %s at era %d (%d bytes) read-only on %s; SIGINT or "
                "SIGTERM stops it" % (shown(args.mirror), version.era, version.size,
                                      shown(args.socket)))
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
        finally:
            server.close()
        err("era_tool: serve: stopped after %d reads" % server.reads)
    return 0


SSH_GATE_EPILOG = """\
the data host's authorized_keys, one line (the backup host's key, only these requests):
  restrict,command="/usr/bin/python3 /usr/local/sbin/era_tool.py ssh-gate /etc/era_tool/data.conf" ssh-ed25519 AAAA... backup@backup1
/etc/era_tool/data.conf (KEY=value lines, # comments):
  ERA_DEVICE=data_era                 the era device's dm name (required)
  METADATA_DEVICE=/dev/vg0/data_meta  its metadata device (required)
  DATA_DEVICE=/dev/mapper/data_era    the device copied (default: /dev/mapper/ERA_DEVICE)
  MOUNTPOINT=/srv/data                the filesystem the final pass may freeze (default: none)
  FREEZE_TIMEOUT=120                  the longest freeze a request may ask for, seconds
  FREEZE_INTERVAL=900                 seconds from the start of one freeze to the next, at least
  GRANULARITY=128                     the era block size (default: from dmsetup table)
requests (SSH_ORIGINAL_COMMAND; backup.sh's REMOTE=restricted sends them):
  era_tool status [--freeze MOUNTPOINT [--freeze-timeout S]] ERA_DEVICE
  era_tool estimate --since ERA [--allow-old-kernel] ERA_DEVICE
  era_tool copy (--full | --since ERA | --resume TOKEN [--full]) --source-id ID
      [--compress gzip|zstd|lz4|xz|none] [--freeze MOUNTPOINT [--freeze-timeout S]]
      [--rate-limit RATE] [--ionice=-c3|-c2 -n7] [--nice N] [--allow-old-kernel] ERA_DEVICE
  era_tool sum --key HEX --since ERA [--range BEGIN:END] [--rate-limit ...] ERA_DEVICE
  era_tool repair --era ERA --source-id ID [--compress ...] ERA_DEVICE  (verify's XML on stdin)
anything else is refused with one line (exit 1) and logged; so is a request for a device
or mount point no config names
"""


def add_ssh_gate_parser(commands):
    """The ssh-gate command's options."""
    gate = commands.add_parser(
        "ssh-gate", help="the data host's forced command: take only backup.sh's requests",
        description="For command=\"...\" in the data host's authorized_keys: run the request "
                    "in SSH_ORIGINAL_COMMAND if it is one of backup.sh's (REMOTE=restricted) "
                    "for an era device a CONFIG names, the way backup.sh's remote shell would; "
                    "refuse anything else. No shell runs and no code is taken from the "
                    "backup host. Each request is logged.",
        epilog=SSH_GATE_EPILOG, formatter_class=_RawHelpFormatter)
    gate.add_argument("config", metavar="CONFIG", nargs="+",
                      help="a config file per era device the key may read")
    gate.add_argument("--log", metavar="FILE",
                      help="append a line per request to FILE (default: syslog, the auth "
                           "facility; standard error where there is no /dev/log)")
    gate.set_defaults(func=cmd_ssh_gate)
    return gate


def cmd_ssh_gate(args):
    log = GateLog(args.log)
    text = os.environ.get("SSH_ORIGINAL_COMMAND")
    client = (os.environ.get("SSH_CLIENT") or "").split()
    # The whole request (a longer one is refused): nothing it does hides behind a cut.
    said = "from %s: %s" % (client[0] if client else "?", "(no command)" if text is None
                            else text[:GATE_MAX_REQUEST] + "..." * (len(text) > GATE_MAX_REQUEST))
    try:
        configs = [GateConfig.load(path) for path in args.config]
        names = [config.era_device for config in configs]
        if len(set(names)) != len(names):
            raise EraError("two configs name the same ERA_DEVICE: %s" % ", ".join(names))
        request, config = gate_request(text, configs)
    except GateRefused as exc:
        log("refused %s: %s" % (said, exc), warning=True)
        raise GateRefused("refused: %s" % exc) from None
    except BaseException as exc:
        log("failed %s: %s" % (said, shown(exc) or type(exc).__name__), warning=True)
        raise
    log("request %s" % said)
    try:
        lock = _hold_gate_lock(config.era_device)
        try:
            status = Gate(config, request).run()
        finally:
            os.close(lock)
    except KeyboardInterrupt:
        log("stopped %s" % said, warning=True)
        raise
    except BaseException as exc:
        log("failed %s: %s" % (said, shown(exc) or type(exc).__name__), warning=True)
        raise
    log("done %s" % said)
    return status


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="era_tool", formatter_class=_HelpFormatter,
        description="Incremental backups of raw block devices with Linux dm-era: copy the "
                    "blocks era_invalidate lists into a checked stream, apply it to a mirror.",
        epilog="exit codes: 0 success, 1 error, 2 usage error, 3 verify found diverged "
               "blocks, 130 interrupted. "
               "Run 'era_tool COMMAND --help' for each command.")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for add in (add_copy_parser, add_apply_parser, add_blocks_parser, add_sum_parser,
                add_verify_parser, add_rollback_parser, add_info_parser, add_versions_parser,
                add_export_parser, add_serve_parser, add_ssh_gate_parser):
        add(commands)
    return parser


def _fill_closed_descriptors():
    """Put /dev/null on a closed standard descriptor (`<&-`, `>&-`).

    Otherwise the next file opened takes its number: a mirror opened as
    descriptor 1 would receive whatever is printed.  Python has already set
    sys.stdin/stdout/stderr to None for each one closed, and the commands that
    need one say so.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:            # the lowest free number: fd itself
                os.dup2(null, fd)
                os.close(null)


def main(argv=None):
    """Run one command line; return its exit status (usage errors raise SystemExit(2)).

    Every error ends here as one line on stderr: EraError and its kinds as
    themselves, anything else as what it is, and a bug as an internal error,
    with its traceback only when ERA_TOOL_DEBUG=1 asks for it.
    """
    if sys.version_info < MIN_PYTHON:
        # 3.5 would import this file and run, on behaviour only 3.6 guarantees
        # (ordered dicts, bytes to json); Python 2 stops at a SyntaxError before this.
        err("era_tool: error: needs Python %d.%d or later; this is %s"
            % (MIN_PYTHON + (sys.version.split()[0],)))
        return 1
    try:
        _fill_closed_descriptors()
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "check", None) is not None:
            args.check(args)
        return args.func(args)
    except KeyboardInterrupt:
        err("\nera_tool: interrupted")
        return 130
    except Interrupted as exc:
        err("\nera_tool: %s" % shown(exc))
        return 130
    except EraError as exc:
        # shown(): a file name with an escape sequence must not reach the terminal raw.
        err("era_tool: error: %s" % shown(exc))
        return 1
    except BrokenPipeError:
        # One rule for every command: output that did not all arrive is a failure.
        err("era_tool: error: %s" % STDOUT_CLOSED)
        return 1
    except OSError as exc:
        # Anything not caught closer to its cause still gets one line, not a traceback.
        err("era_tool: error: %s" % shown(exc.strerror or exc))
        return 1
    except MemoryError:
        err("era_tool: error: out of memory")
        return 1
    except Exception as exc:
        # A bug: one line all the same, and the traceback for a report when asked for.
        if os.environ.get("ERA_TOOL_DEBUG"):
            raise
        err("era_tool: internal error: %s: %s (ERA_TOOL_DEBUG=1 shows where; please "
            "report it)" % (type(exc).__name__, shown(exc)))
        return 1


def _terminate(signum, frame):
    """SIGTERM and SIGHUP (ssh gone, systemd stopping) are handled as Ctrl-C is."""
    raise KeyboardInterrupt


def install_signal_handlers():
    import signal
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        # An ignored signal stays ignored: nohup means it.
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            signal.signal(number, _terminate)


def exit_now(code):
    """Flush what Python buffers (stdout, stderr), then exit without the interpreter's teardown.

    The teardown (modules, threads, buffers) costs 4 ms at every exit, measured,
    and nothing is left to it: every file this tool writes is written with
    os.write and closed, or synced, before main returns.  A failed flush of
    standard output (a full disk, a closed pipe) is an error, not lost output.
    """
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        err("era_tool: error: %s" % STDOUT_CLOSED)
        code = code or 1
    except OSError as exc:
        err("era_tool: error: cannot write to standard output: %s" % (exc.strerror or exc))
        code = code or 1
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except OSError:
        pass
    os._exit(code or 0)


if __name__ == "__main__":
    install_signal_handlers()
    exit_now(main())
