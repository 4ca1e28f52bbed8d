# SPDX-License-Identifier: GPL-3.0-or-later
"""Tests for era_tool.py: python3 -m pytest -q

Grouped by feature: block lists, the estimate, the stream format (golden
bytes), copy and apply round trips, the original format, damaged streams,
apply's safety rules, info, the command line, and real era_invalidate output.
Tests that need a real dm-era kernel are at the end and skip elsewhere.
"""

import argparse
import errno
import json
import os
import pty
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib

import pytest

import era_tool

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "era_tool.py")
BLOCK_SECTORS = 8                  # smallest dm-era block: 4096 bytes
BLOCK = BLOCK_SECTORS * 512


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def blocks_xml(ranges, spelling="cxx"):
    """era_invalidate's output for [begin, end) block ranges, in either spelling.

    cxx: thin-provisioning-tools 0.9 (C++): `end = "E"`, trailing newline.
    rust: 1.x: `end="E"`, no trailing newline.
    """
    lines = ["<blocks>"]
    for begin, end in ranges:
        if end == begin + 1:
            lines.append('  <block block="%d"/>' % begin)
        elif spelling == "cxx":
            lines.append('  <range begin="%d" end = "%d"/>' % (begin, end))
        else:
            lines.append('  <range begin="%d" end="%d"/>' % (begin, end))
    lines.append("</blocks>")
    text = "\n".join(lines)
    return (text + "\n" if spelling == "cxx" else text).encode()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def random_bytes(size, seed):
    return random.Random(seed).randbytes(size) if hasattr(random.Random, "randbytes") \
        else bytes(random.Random(seed).getrandbits(8) for _ in range(size))


def run_main(argv, capsys=None):
    """Run main(argv) in-process; return (exit code, stdout, stderr)."""
    code = era_tool.main(argv)
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(args, stdin=b"", **kw):
    """Run era_tool.py as a real subprocess."""
    return subprocess.run([sys.executable, TOOL] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def assert_one_line_error(err, *fragments):
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("era_tool: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def make_stream(tmp_path, source, ranges, *extra, name="s.era"):
    """copy the listed blocks of `source` (a path) into a stream file; return its bytes."""
    xml = write(tmp_path / (name + ".xml"), blocks_xml(ranges))
    out = tmp_path / name
    code = era_tool.main(["copy", "-i", xml, "-o", str(out)] + list(extra)
                         + [str(BLOCK_SECTORS), str(source)])
    assert code == 0
    return read(out)


def blocks_of(data, block):
    return data[block * BLOCK:(block + 1) * BLOCK]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one 4 KiB block, so small streams have many chunks."""
    monkeypatch.setattr(era_tool, "CHUNK_SIZE", BLOCK)


# ---------------------------------------------------------------------------
# Block lists
# ---------------------------------------------------------------------------


def parse(data):
    import io
    ranges = era_tool.parse_block_list(io.BytesIO(data))
    return list(ranges)


class TestBlockList:
    @pytest.mark.parametrize("spelling", ["cxx", "rust"])
    def test_both_spellings(self, spelling):
        data = blocks_xml([(3, 4), (10, 13), (20, 21)], spelling)
        assert parse(data) == [(3, 4), (10, 13), (20, 21)]

    def test_literal_cxx_output(self):
        data = b'<blocks>\n  <block block="3"/>\n  <range begin="10" end = "13"/>\n</blocks>\n'
        assert parse(data) == [(3, 4), (10, 13)]

    def test_literal_rust_output_no_newline(self):
        data = b'<blocks>\n  <block block="3"/>\n  <range begin="10" end="13"/>\n</blocks>'
        assert parse(data) == [(3, 4), (10, 13)]

    def test_empty_list(self):
        assert parse(b"<blocks>\n</blocks>\n") == []
        assert parse(b"<blocks/>") == []

    def test_adjacent_and_overlapping_merge(self):
        data = (b'<blocks><range begin="0" end="4"/><block block="4"/>'
                b'<range begin="3" end="9"/><range begin="20" end="22"/></blocks>')
        assert parse(data) == [(0, 9), (20, 22)]

    def test_unsorted_is_sorted(self):
        data = b'<blocks><block block="9"/><range begin="2" end="5"/><block block="0"/></blocks>'
        assert parse(data) == [(0, 1), (2, 5), (9, 10)]

    def test_whitespace_inside_quotes_tolerated(self):
        assert parse(b'<blocks><range begin=" 2 " end = " 5"/></blocks>') == [(2, 5)]

    def test_comments_and_declaration_allowed(self):
        data = b'<?xml version="1.0"?>\n<!-- x --><blocks><block block="1"/></blocks>'
        assert parse(data) == [(1, 2)]

    def test_large_list(self):
        ranges = [(i * 3, i * 3 + 1 + i % 2) for i in range(50000)]
        result = parse(blocks_xml(ranges))
        assert result == ranges

    BAD = [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"<blocks>\n  <block block=\"3\"/>\n", "ends before </blocks>"),
        (b"<blocks>\n  <block block=\"3\"/>\n</blo", "ends before </blocks>"),
        (b"<superblock/>", "root must be <blocks>"),
        (b'<blocks x="1"></blocks>', "root must be <blocks>"),
        (b'<blocks><bits block="1"/></blocks>', "unexpected element <bits"),
        (b'<blocks><block block="1" value="true"/></blocks>', "unexpected element"),
        (b'<blocks><block/></blocks>', "unexpected element <block>"),
        (b'<blocks><range begin="1"/></blocks>', "unexpected element <range"),
        (b'<blocks><block block="1"><block block="2"/></block></blocks>', "unexpected element"),
        (b'<!DOCTYPE blocks><blocks></blocks>', "DOCTYPE"),
        (b'<!DOCTYPE b [<!ENTITY n "5">]><blocks><block block="&n;"/></blocks>', "DOCTYPE"),
        (b'<blocks><block block="&n;"/></blocks>', "not valid XML"),
        (b'<blocks><block block="-5"/></blocks>', "negative block"),
        (b'<blocks><range begin="-1" end="3"/></blocks>', "negative begin"),
        (b'<blocks><range begin="5" end="5"/></blocks>', "end must be greater than begin"),
        (b'<blocks><range begin="6" end="5"/></blocks>', "end must be greater than begin"),
        (b'<blocks><block block="1.5"/></blocks>', "not a whole number"),
        (b'<blocks><block block="0x10"/></blocks>', "not a whole number"),
        (b'<blocks><block block=""/></blocks>', "not a whole number"),
        (b'<blocks><block block="+3"/></blocks>', "not a whole number"),
        (b'<blocks><block block="\xd9\xa3"/></blocks>', "not a whole number"),
        (b'<blocks><block block="4294967296"/></blocks>', "out of range"),
        (b'<blocks>5</blocks>', "unexpected text"),
        (b'<blocks></blocks><blocks></blocks>', "not valid XML"),
        (b'<blocks><?php x?></blocks>', "processing instruction"),
        (b'<blocks><block block="1"/>', "ends before </blocks>"),
        (b'\x00\x01garbage', "not valid XML"),
    ]

    @pytest.mark.parametrize("data,message", BAD)
    def test_bad_input_refused(self, data, message):
        with pytest.raises(era_tool.BlockListError) as info:
            parse(data)
        assert message in str(info.value)

    @pytest.mark.parametrize("data,message", BAD)
    def test_bad_input_cli_writes_nothing(self, tmp_path, capsys, data, message):
        source = write(tmp_path / "src", random_bytes(8 * BLOCK, 1))
        xml = write(tmp_path / "list.xml", data)
        out = tmp_path / "out.era"
        code, _, err = run_main(["copy", "-i", xml, "-o", str(out), "8", source], capsys)
        assert code == 1
        assert_one_line_error(err, message)
        assert not out.exists()


# ---------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------


class TestEstimate:
    def test_text_matches_original(self, tmp_path, capsys):
        # The original: sum of range lengths x block size x 512, number first.
        xml = write(tmp_path / "l.xml", blocks_xml([(3, 4), (10, 13), (18, 100)]))
        code, out, err = run_main(["copy", "-i", xml, "128"], capsys)
        assert code == 0 and err == ""
        assert out == "%d bytes to copy\n" % (86 * 128 * 512)

    def test_json(self, tmp_path, capsys):
        xml = write(tmp_path / "l.xml", blocks_xml([(3, 4), (10, 13)], "rust"))
        code, out, _ = run_main(["copy", "--json", "-i", xml, "1024"], capsys)
        assert code == 0
        assert json.loads(out) == {"bytes": 4 * 1024 * 512, "ranges": 2, "blocks": 4}

    def test_empty_list_is_zero(self, tmp_path, capsys):
        xml = write(tmp_path / "l.xml", b"<blocks>\n</blocks>\n")
        code, out, _ = run_main(["copy", "-i", xml, "8"], capsys)
        assert (code, out) == (0, "0 bytes to copy\n")

    def test_from_stdin_subprocess(self):
        result = run_cli(["copy", "1024"], stdin=blocks_xml([(0, 2)]))
        assert result.returncode == 0
        assert result.stdout.split()[0] == str(2 * 1024 * 512).encode()

    def test_json_with_device_is_refused(self, tmp_path, capsys):
        xml = write(tmp_path / "l.xml", blocks_xml([(0, 1)]))
        code, _, err = run_main(["copy", "--json", "-i", xml, "8", xml], capsys)
        assert code == 1
        assert_one_line_error(err, "--json")


# ---------------------------------------------------------------------------
# Stream format: golden bytes
# ---------------------------------------------------------------------------

# copy --since-era 5 --era 7 --source-id host:/dev/vdb 8 DEVICE, created at
# 1700000000, where DEVICE is 8242 bytes: block 0 zeros, block 1 not listed,
# block 2 clipped to 50 bytes of b"0123456789" * 5.  Fields as README documents.
GOLDEN = (
    "89455241 0d0a1a0a"            # magic
    "0100"                         # version 1
    "0300"                         # flags: since_era, era
    "3220000000000000"             # device size 8242
    "3210000000000000"             # total bytes 4096 + 50
    "08000000"                     # block size 8 sectors
    "00004000"                     # chunk size 4 MiB
    "05000000"                     # since era 5
    "07000000"                     # era 7
    "00f1536500000000"             # created 1700000000
    "0d000000"                     # source id length 13
    "686f73743a2f6465762f766462"   # "host:/dev/vdb"
    "HEADER_CRC"
    "5a45524f 00000000 0000000000000000 00100000 CHUNK0_CRC"   # ZERO #0 @0 4096
    "44415441 01000000 0020000000000000 32000000 CHUNK1_CRC"   # DATA #1 @8192 50
    + "30313233343536373839" * 5 +
    "444f4e45 02000000 3200000000000000 0010000000000000 STREAM_CRC"  # DONE
)


def golden_bytes():
    """The golden stream, its CRCs computed as README says they are."""
    def unhex(text):
        return bytes.fromhex(text.replace(" ", ""))
    head, rest = GOLDEN.split("HEADER_CRC")
    head = unhex(head)
    header_crc = zlib.crc32(head)
    header = head + struct.pack("<I", header_crc)
    zero_fields = unhex(rest.split("CHUNK0_CRC")[0])
    data_part = rest.split("CHUNK0_CRC")[1].split("CHUNK1_CRC")
    data_fields = unhex(data_part[0])
    payload_and_trailer = data_part[1].split("STREAM_CRC")[0]
    payload = unhex(payload_and_trailer[:100])
    trailer = unhex(payload_and_trailer[100:])
    zero_record = zero_fields + struct.pack("<I", zlib.crc32(zero_fields, header_crc))
    data_record = data_fields + struct.pack(
        "<I", zlib.crc32(data_fields, zlib.crc32(payload, header_crc)))
    stream_crc = zlib.crc32(header + zero_record + data_record + trailer)
    return (header + zero_record + data_record + payload + trailer
            + struct.pack("<I", stream_crc))


class TestGolden:
    def test_golden_stream(self, tmp_path, monkeypatch):
        monkeypatch.setattr(era_tool.time, "time", lambda: 1700000000.5)
        device = bytes(BLOCK) + random_bytes(BLOCK, 2) + b"0123456789" * 5
        source = write(tmp_path / "dev", device)
        stream = make_stream(tmp_path, source, [(0, 1), (2, 3)], "--since-era", "5",
                             "--era", "7", "--source-id", "host:/dev/vdb")
        assert stream.hex() == golden_bytes().hex()

    def test_golden_stream_applies(self, tmp_path):
        dest = tmp_path / "m.img"
        write(dest, b"\xff" * 9000)
        stream = write(tmp_path / "g.era", golden_bytes())
        # The mirror is larger than the source: refused unless --force.
        assert era_tool.main(["apply", "-i", stream, str(dest)]) == 1
        assert read(dest) == b"\xff" * 9000
        assert era_tool.main(["apply", "--force", "-i", stream, str(dest)]) == 0
        expected = bytes(BLOCK) + b"\xff" * BLOCK + b"0123456789" * 5
        assert read(dest) == expected

    def test_magic_never_legacy(self):
        assert era_tool.MAGIC != era_tool.LEGACY_MAGIC
        assert era_tool.MAGIC[0] != era_tool.LEGACY_MAGIC[0]


# ---------------------------------------------------------------------------
# copy and apply round trips
# ---------------------------------------------------------------------------


def changed_device(old, ranges, seed):
    """A copy of `old` with the blocks in `ranges` rewritten."""
    new = bytearray(old)
    rng = random.Random(seed)
    for begin, end in ranges:
        for block in range(begin, end):
            start = block * BLOCK
            stop = min(start + BLOCK, len(new))
            if start < len(new):
                new[start:stop] = bytes(rng.getrandbits(8) for _ in range(16)) * (
                    (stop - start) // 16) + bytes((stop - start) % 16)
    return bytes(new)


class TestRoundTrip:
    @pytest.mark.parametrize("spelling", ["cxx", "rust"])
    def test_pipe_onto_older_mirror(self, tmp_path, spelling):
        old = random_bytes(64 * BLOCK + 1000, 3)
        ranges = [(0, 1), (5, 9), (30, 31), (60, 65)]       # last block is partial
        new = changed_device(old, ranges, 4)
        source = write(tmp_path / "dev", new)
        mirror = write(tmp_path / "mirror", old)
        copy = subprocess.Popen([sys.executable, TOOL, "copy", str(BLOCK_SECTORS), source],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        apply = subprocess.Popen([sys.executable, TOOL, "apply", mirror], stdin=copy.stdout)
        copy.stdout.close()
        copy.stdin.write(blocks_xml(ranges, spelling))
        copy.stdin.close()
        assert copy.wait() == 0 and apply.wait() == 0
        assert read(mirror) == new

    def test_only_listed_blocks_change(self, tmp_path):
        old = random_bytes(32 * BLOCK, 5)
        new = changed_device(old, [(0, 32)], 6)           # everything changed...
        source = write(tmp_path / "dev", new)
        mirror = write(tmp_path / "mirror", old)
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(2, 4), (10, 11)]))
        assert era_tool.main(["apply", "-i", stream, mirror]) == 0
        result = read(mirror)
        for block in range(32):                           # ...but only 2, 3, 10 listed
            want = new if block in (2, 3, 10) else old
            assert blocks_of(result, block) == blocks_of(want, block), block

    def test_full_copy_new_mirror(self, tmp_path, small_chunks):
        device = bytearray(random_bytes(20 * BLOCK + 123, 7))
        device[4 * BLOCK:9 * BLOCK] = bytes(5 * BLOCK)
        source = write(tmp_path / "dev", bytes(device))
        out = tmp_path / "full.era"
        assert era_tool.main(["copy", "--full", "-o", str(out), "8", source]) == 0
        mirror = tmp_path / "new" / "mirror"
        mirror.parent.mkdir()
        assert era_tool.main(["apply", "-i", str(out), str(mirror)]) == 0
        assert read(mirror) == bytes(device)
        # The zero blocks travel without their data.
        assert len(read(out)) < len(device) - 5 * BLOCK + 30 * 24 + 200
        assert oct(os.stat(mirror).st_mode & 0o777) == oct(0o644 & ~_umask())

    def test_full_then_incremental_onto_zero_mirror(self, tmp_path):
        # Zero chunks must overwrite old data where the mirror had some.
        old = random_bytes(16 * BLOCK, 8)
        new = bytearray(old)
        new[BLOCK:3 * BLOCK] = bytes(2 * BLOCK)
        source = write(tmp_path / "dev", bytes(new))
        mirror = write(tmp_path / "mirror", old)
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(1, 3)]))
        assert era_tool.main(["apply", "-i", stream, mirror]) == 0
        assert read(mirror) == bytes(new)

    def test_mirror_grows_to_source_size(self, tmp_path):
        new = random_bytes(10 * BLOCK, 9)
        source = write(tmp_path / "dev", new)
        mirror = write(tmp_path / "mirror", new[:3 * BLOCK])
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(3, 10)]))
        assert era_tool.main(["apply", "-i", stream, mirror]) == 0
        assert read(mirror) == new

    def test_many_chunks(self, tmp_path, small_chunks):
        old = random_bytes(40 * BLOCK, 10)
        new = changed_device(old, [(1, 39)], 11)
        source = write(tmp_path / "dev", new)
        mirror = write(tmp_path / "mirror", old)
        stream = make_stream(tmp_path, source, [(1, 39)])
        assert era_tool.main(["apply", "-i", write(tmp_path / "s", stream), mirror]) == 0
        assert read(mirror) == new


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------
# copy: the source side
# ---------------------------------------------------------------------------


class TestCopy:
    def test_block_beyond_end(self, tmp_path, capsys):
        source = write(tmp_path / "dev", random_bytes(10 * BLOCK, 12))
        xml = write(tmp_path / "l.xml", blocks_xml([(2, 3), (12, 13)]))
        out = tmp_path / "o"
        code, _, err = run_main(["copy", "-i", xml, "-o", str(out), "8", source], capsys)
        assert code == 1
        assert_one_line_error(err, "block 12 is beyond the end of %s (%d bytes): wrong block "
                              "size or device?" % (source, 10 * BLOCK))
        assert not out.exists()

    def test_partial_last_block_is_clipped(self, tmp_path):
        device = random_bytes(3 * BLOCK + 100, 13)
        source = write(tmp_path / "dev", device)
        stream = make_stream(tmp_path, source, [(2, 4)])
        mirror = tmp_path / "m"
        assert era_tool.main(["apply", "-i", write(tmp_path / "s", stream), str(mirror)]) == 0
        assert read(mirror)[2 * BLOCK:] == device[2 * BLOCK:]
        assert len(read(mirror)) == len(device)

    def test_missing_device(self, tmp_path, capsys):
        xml = write(tmp_path / "l.xml", blocks_xml([(0, 1)]))
        code, _, err = run_main(["copy", "-i", xml, "-o", str(tmp_path / "o"), "8",
                                 str(tmp_path / "nope")], capsys)
        assert code == 1
        assert_one_line_error(err, "cannot open", "nope")

    def test_directory_is_not_a_device(self, tmp_path, capsys):
        xml = write(tmp_path / "l.xml", blocks_xml([(0, 1)]))
        code, _, err = run_main(["copy", "-i", xml, "-o", str(tmp_path / "o"), "8",
                                 str(tmp_path)], capsys)
        assert code == 1
        assert "era_tool: error:" in err and "Traceback" not in err

    def test_full_needs_device(self, capsys):
        code, _, err = run_main(["copy", "--full", "8"], capsys)
        assert code == 1
        assert_one_line_error(err, "--full")

    def test_refuses_terminal(self, tmp_path):
        source = write(tmp_path / "dev", random_bytes(2 * BLOCK, 14))
        master, slave = pty.openpty()
        try:
            result = subprocess.run([sys.executable, TOOL, "copy", "--full", "8", source],
                                    stdout=slave, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(slave)
            os.close(master)
        assert result.returncode == 1
        assert b"refusing to write a stream to a terminal" in result.stderr

    def test_buffered_fallback_warns_once(self, tmp_path):
        shm = "/dev/shm"
        if not os.path.isdir(shm) or not _refuses_direct(shm):
            pytest.skip("no filesystem here refuses O_DIRECT (tmpfs at /dev/shm)")
        path = os.path.join(shm, "era_tool_test_%d" % os.getpid())
        try:
            device = random_bytes(6 * BLOCK, 15)
            write(path, device)
            result = run_cli(["copy", "8", path, "-o", str(tmp_path / "s")],
                             stdin=blocks_xml([(0, 6)]))
            assert result.returncode == 0
            assert result.stderr.count(b"O_DIRECT") == 1
            assert era_tool.main(["apply", "-i", str(tmp_path / "s"),
                                  str(tmp_path / "m")]) == 0
            assert read(tmp_path / "m") == device
        finally:
            os.unlink(path)

    def test_output_file_removed_when_copy_fails(self, tmp_path, capsys, monkeypatch):
        source = write(tmp_path / "dev", random_bytes(4 * BLOCK, 16))
        xml = write(tmp_path / "l.xml", blocks_xml([(0, 4)]))
        real_read = era_tool.Source.read

        def failing_read(self, offset, length):
            if offset >= 2 * BLOCK:
                raise era_tool.DeviceError("read error at offset %d of %s: Input/output error"
                                           % (offset, self.path))
            return real_read(self, offset, length)
        monkeypatch.setattr(era_tool, "CHUNK_SIZE", BLOCK)
        monkeypatch.setattr(era_tool.Source, "read", failing_read)
        out = tmp_path / "o"
        code, _, err = run_main(["copy", "-i", xml, "-o", str(out), "8", source], capsys)
        assert code == 1
        assert_one_line_error(err, "read error at offset 8192")
        assert not out.exists()

    def test_header_fields(self, tmp_path, capsys):
        source = write(tmp_path / "dev", random_bytes(4 * BLOCK, 17))
        stream = make_stream(tmp_path, source, [(1, 2)], "--since-era", "3", "--era", "9",
                             "--source-id", "db1:/dev/sda2")
        code, out, _ = run_main(["info", "--json", "-i", write(tmp_path / "s", stream)], capsys)
        info = json.loads(out)
        assert code == 0
        assert (info["since_era"], info["era"], info["source_id"]) == (3, 9, "db1:/dev/sda2")
        assert (info["device_size"], info["block_size"], info["total_bytes"]) == (
            4 * BLOCK, 8, BLOCK)
        assert abs(info["created"] - time.time()) < 60

    def test_since_era_after_era_is_usage_error(self, tmp_path):
        with pytest.raises(SystemExit) as exc:
            era_tool.main(["copy", "--since-era", "9", "--era", "3", "8"])
        assert exc.value.code == 2

    @pytest.mark.parametrize("size", ["0", "7", "12", "-8", "abc"])
    def test_bad_block_size_is_usage_error(self, size):
        result = run_cli(["copy", size])
        assert result.returncode == 2
        assert b"block size" in result.stderr or b"whole number" in result.stderr


class TestBufferedFallback:
    def test_o_direct_refused_at_open(self, tmp_path, capsys, monkeypatch):
        # What tmpfs on older kernels does: open(O_DIRECT) fails with EINVAL.
        real_open = os.open

        def no_direct(path, flags, *rest):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *rest)
        monkeypatch.setattr(era_tool.os, "open", no_direct)
        advice = []
        monkeypatch.setattr(era_tool.os, "posix_fadvise",
                            lambda fd, o, n, a: advice.append(a))
        device = random_bytes(6 * BLOCK, 34)
        source = write(tmp_path / "dev", device)
        stream = make_stream(tmp_path, source, [(0, 6)])
        _, err = capsys.readouterr()
        assert err.count("O_DIRECT") == 1 and err.startswith("era_tool: warning: ")
        assert advice == [os.POSIX_FADV_DONTNEED]
        monkeypatch.undo()
        mirror = tmp_path / "m"
        assert era_tool.main(["apply", "-i", write(tmp_path / "s", stream), str(mirror)]) == 0
        assert read(mirror) == device


def _refuses_direct(directory):
    path = os.path.join(directory, ".era_tool_direct_probe_%d" % os.getpid())
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        os.close(fd)
        return False
    except OSError:
        return True
    finally:
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------------------
# The original era_copy format
# ---------------------------------------------------------------------------


def legacy_record(offset, data):
    """A record exactly as the original era_copy writes it (x86-64: little-endian)."""
    return b"ERARANGE" + struct.pack("<qq", offset, len(data)) + data


class TestLegacy:
    def test_copy_legacy_format_bytes(self, tmp_path):
        device = random_bytes(12 * BLOCK, 18)
        source = write(tmp_path / "dev", device)
        xml = write(tmp_path / "l.xml", blocks_xml([(1, 2), (4, 7)]))
        out = tmp_path / "o"
        assert era_tool.main(["copy", "--format", "legacy", "-i", xml, "-o", str(out), "8",
                              source]) == 0
        expected = (legacy_record(BLOCK, device[BLOCK:2 * BLOCK])
                    + legacy_record(4 * BLOCK, device[4 * BLOCK:7 * BLOCK]))
        assert read(out) == expected

    def test_apply_original_stream(self, tmp_path):
        old = random_bytes(10 * BLOCK, 19)
        new = changed_device(old, [(0, 2), (7, 8)], 20)
        stream = write(tmp_path / "s", legacy_record(0, new[:2 * BLOCK])
                       + legacy_record(7 * BLOCK, new[7 * BLOCK:8 * BLOCK]))
        mirror = write(tmp_path / "m", old)
        assert era_tool.main(["apply", "-i", stream, mirror]) == 0
        assert read(mirror) == new

    def test_apply_original_stream_to_new_file(self, tmp_path):
        stream = write(tmp_path / "s", legacy_record(3 * BLOCK, b"x" * 100))
        mirror = tmp_path / "m"
        assert era_tool.main(["apply", "-i", stream, str(mirror)]) == 0
        assert read(mirror) == bytes(3 * BLOCK) + b"x" * 100

    def test_legacy_round_trip_through_pipe(self, tmp_path):
        old = random_bytes(16 * BLOCK, 21)
        new = changed_device(old, [(3, 6)], 22)
        source = write(tmp_path / "dev", new)
        mirror = write(tmp_path / "m", old)
        copy = run_cli(["copy", "--format", "legacy", "8", source], stdin=blocks_xml([(3, 6)]))
        assert copy.returncode == 0
        apply = run_cli(["apply", mirror], stdin=copy.stdout)
        assert apply.returncode == 0
        assert read(mirror) == new

    @pytest.mark.parametrize("offset,length,message", [
        (-4096, 10, "negative offset"), (0, -1, "negative offset")])
    def test_negative_refused_before_writing(self, tmp_path, capsys, offset, length, message):
        stream = write(tmp_path / "s", legacy_record(0, b"a" * 10) + b"ERARANGE"
                       + struct.pack("<qq", offset, length) + b"b" * 10)
        mirror = write(tmp_path / "m", b"\0" * 100)
        code, _, err = run_main(["apply", "-i", stream, mirror], capsys)
        assert code == 1
        assert_one_line_error(err, message, "partially updated")
        assert read(mirror) == b"a" * 10 + b"\0" * 90

    def test_bad_signature(self, tmp_path, capsys):
        stream = write(tmp_path / "s", legacy_record(0, b"a" * 10) + b"ERARANGX" + bytes(16))
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path / "m")], capsys)
        assert code == 1
        assert_one_line_error(err, "signature does not match")

    @pytest.mark.parametrize("cut", [1, 5, 8, 20, 23, 24, 30, 33])
    def test_truncated_inside_record(self, tmp_path, capsys, cut):
        data = legacy_record(0, b"a" * 10)[:cut] if cut < 34 else b""
        stream = write(tmp_path / "s", legacy_record(100, b"z" * 10) + data)
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path / "m")], capsys)
        assert code == 1
        assert_one_line_error(err, "ends")

    def test_empty_needs_allow_empty(self, tmp_path, capsys):
        stream = write(tmp_path / "s", b"")
        mirror = tmp_path / "m"
        code, _, err = run_main(["apply", "-i", stream, str(mirror)], capsys)
        assert code == 1
        assert_one_line_error(err, "empty", "--allow-empty")
        assert not mirror.exists()
        code, _, err = run_main(["apply", "--allow-empty", "-i", stream, str(mirror)], capsys)
        assert code == 0 and err == ""

    def test_info_on_legacy(self, tmp_path, capsys):
        stream = write(tmp_path / "s", legacy_record(0, b"a" * 10) + legacy_record(50, b"b"))
        code, out, _ = run_main(["info", "--json", "-i", stream], capsys)
        assert code == 0
        info = json.loads(out)
        assert (info["format"], info["records"], info["data_bytes"], info["intact"]) == (
            "legacy", 2, 11, None)


# ---------------------------------------------------------------------------
# Damaged streams: cut short, flipped bits
# ---------------------------------------------------------------------------


@pytest.fixture
def damage_case(tmp_path, small_chunks):
    """A stream of several 4 KiB chunks (one all-zero) and the mirror it updates."""
    old = random_bytes(12 * BLOCK, 23)
    new = bytearray(changed_device(old, [(1, 4), (6, 7), (9, 12)], 24))
    new[6 * BLOCK:7 * BLOCK] = bytes(BLOCK)              # a ZERO chunk too
    source = write(tmp_path / "dev", bytes(new))
    stream = make_stream(tmp_path, source, [(1, 4), (6, 7), (9, 12)])
    return old, bytes(new), stream


def apply_damaged(tmp_path, old, stream):
    """Apply `stream` onto a fresh copy of `old`; return (code, mirror bytes)."""
    mirror = write(tmp_path / "mirror", old)
    path = write(tmp_path / "damaged", stream)
    code = era_tool.main(["apply", "-i", path, mirror])
    return code, read(mirror)


def apply_quick(tmp_path, old, stream):
    """apply's own code without the argument parser, for thousands of runs.

    Returns (error message or None, mirror bytes).
    """
    mirror = write(tmp_path / "mirror", old)
    path = write(tmp_path / "damaged", stream)
    args = argparse.Namespace(input=path, destination=mirror, force=False, state=None, undo=None,
                              allow_empty=False, progress=False)
    try:
        era_tool.cmd_apply(args)
        message = None
    except era_tool.EraError as exc:
        message = str(exc)
    return message, read(mirror)


def only_old_or_new(result, old, new):
    """Each block of the mirror is wholly the old or wholly the new content."""
    assert len(result) == len(old)
    for block in range(len(old) // BLOCK):
        got = blocks_of(result, block)
        assert got == blocks_of(old, block) or got == blocks_of(new, block), block


class TestDamage:
    def test_intact_stream_applies(self, tmp_path, damage_case):
        old, new, stream = damage_case
        assert apply_damaged(tmp_path, old, stream) == (0, new)

    def test_cut_at_every_byte(self, tmp_path, damage_case):
        old, new, stream = damage_case
        for cut in range(len(stream)):
            message, result = apply_quick(tmp_path, old, stream[:cut])
            assert message is not None, cut
            assert "ends" in message or "empty" in message, message
            only_old_or_new(result, old, new)

    def test_cut_at_every_chunk_boundary_reports_progress(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        header = era_tool.read_header(_BytesInput(stream))
        position = header.raw_size if hasattr(header, "raw_size") else len(header.raw)
        boundaries = []
        while stream[position:position + 4] in (b"DATA", b"ZERO"):
            boundaries.append(position)
            tag, _, _, length, _ = era_tool.CHUNK.unpack(stream[position:position + 24])
            position += 24 + (length if tag == b"DATA" else 0)
        boundaries.append(position)                          # before the trailer
        assert len(boundaries) == 8
        for number, cut in enumerate(boundaries):
            code, result = apply_damaged(tmp_path, old, stream[:cut])
            _, err = capsys.readouterr()
            assert code == 1
            assert_one_line_error(err, "stream ends inside a chunk header")
            if number == 0:
                assert "no data was written" in err
            else:
                assert "partially updated" in err
            only_old_or_new(result, old, new)

    def test_every_bit_of_every_header_flipped(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        positions = _structure_positions(stream)
        for position in positions:
            for bit in range(8):
                damaged = bytearray(stream)
                damaged[position] ^= 1 << bit
                code, result = apply_damaged(tmp_path, old, bytes(damaged))
                assert code == 1, (position, bit)
                only_old_or_new(result, old, new)
        _, err = capsys.readouterr()
        assert "Traceback" not in err
        assert err.count("\n") == 8 * len(positions)

    def test_every_bit_of_a_small_stream_flipped(self, tmp_path):
        # Small enough to flip every single bit, payload included.
        old = random_bytes(2 * BLOCK + 100, 41)
        new = bytes(BLOCK) + old[BLOCK:2 * BLOCK] + random_bytes(100, 42)
        source = write(tmp_path / "dev", new)
        stream = make_stream(tmp_path, source, [(0, 1), (2, 3)])
        assert len(stream) < 300
        for position in range(len(stream)):
            for bit in range(8):
                damaged = bytearray(stream)
                damaged[position] ^= 1 << bit
                message, result = apply_quick(tmp_path, old, bytes(damaged))
                assert message is not None, (position, bit)
                assert result[:BLOCK] in (old[:BLOCK], new[:BLOCK])
                assert result[2 * BLOCK:] in (old[2 * BLOCK:], new[2 * BLOCK:])
                assert result[BLOCK:2 * BLOCK] == old[BLOCK:2 * BLOCK]

    def test_payload_bits_flipped(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        structure = set(_structure_positions(stream))
        payload = [i for i in range(len(stream)) if i not in structure]
        rng = random.Random(25)
        for position in rng.sample(payload, 300):
            damaged = bytearray(stream)
            damaged[position] ^= 1 << rng.randrange(8)
            code, result = apply_damaged(tmp_path, old, bytes(damaged))
            assert code == 1, position
            only_old_or_new(result, old, new)
        _, err = capsys.readouterr()
        assert err.count("checksum mismatch") == 300

    def test_trailing_garbage(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        code, result = apply_damaged(tmp_path, old, stream + b"\0")
        _, err = capsys.readouterr()
        assert code == 1
        assert_one_line_error(err, "after the end of the stream")

    def test_swapped_chunks_refused(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        position = len(era_tool.read_header(_BytesInput(stream)).raw)
        first = 24 + BLOCK
        swapped = (stream[:position] + stream[position + first:position + 2 * first]
                   + stream[position:position + first] + stream[position + 2 * first:])
        code, result = apply_damaged(tmp_path, old, swapped)
        _, err = capsys.readouterr()
        assert code == 1
        assert_one_line_error(err, "chunk 0", "numbered 1")
        assert result == old

    def test_info_detects_damage(self, tmp_path, damage_case, capsys):
        old, new, stream = damage_case
        code, out, err = run_main(["info", "-i", write(tmp_path / "s", stream[:-1])], capsys)
        assert code == 1
        assert "intact:" in out and "no" in out.split("intact:")[1]
        assert_one_line_error(err, "stream ends inside the trailer")
        code, out, err = run_main(["info", "-i", write(tmp_path / "s", stream)], capsys)
        assert code == 0 and "intact:      yes" in out


class _BytesInput:
    """Just enough of era_tool.Input over bytes, for reading a header in tests."""

    def __init__(self, data):
        self.data = data
        self.position = 0

    def read_exact(self, size, what):
        chunk = self.data[self.position:self.position + size]
        assert len(chunk) == size
        self.position += size
        return chunk


def _structure_positions(stream):
    """Byte positions of the header, every chunk header and the trailer."""
    header = era_tool.read_header(_BytesInput(stream))
    positions = list(range(len(header.raw)))
    position = len(header.raw)
    while stream[position:position + 4] in (b"DATA", b"ZERO"):
        tag, _, _, length, _ = era_tool.CHUNK.unpack(stream[position:position + 24])
        positions.extend(range(position, position + 24))
        position += 24 + (length if tag == b"DATA" else 0)
    positions.extend(range(position, len(stream)))
    return positions


# ---------------------------------------------------------------------------
# apply: the destination side
# ---------------------------------------------------------------------------


class TestApply:
    def test_not_a_stream(self, tmp_path, capsys):
        stream = write(tmp_path / "s", b"<blocks>\n</blocks>\n")
        mirror = tmp_path / "m"
        code, _, err = run_main(["apply", "-i", stream, str(mirror)], capsys)
        assert code == 1
        assert_one_line_error(err, "is not an era_tool or era_copy stream")
        assert not mirror.exists()

    def test_short_first_header(self, tmp_path, capsys):
        stream = write(tmp_path / "s", era_tool.MAGIC[:5])
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path / "m")], capsys)
        assert code == 1
        assert_one_line_error(err, "ends after 5 bytes")

    def test_unsupported_version(self, tmp_path, capsys):
        head = era_tool.HEADER.pack(era_tool.MAGIC, 2, 0, 100, 0, 8, 4096, 0, 0, 0, 0)
        stream = write(tmp_path / "s", head + struct.pack("<I", zlib.crc32(head)))
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path / "m")], capsys)
        assert code == 1
        assert_one_line_error(err, "version 2 is not supported")
        assert not (tmp_path / "m").exists()

    def test_damaged_header_creates_nothing(self, tmp_path, capsys, damage_case):
        old, new, stream = damage_case
        damaged = bytearray(stream)
        damaged[20] ^= 4
        mirror = tmp_path / "fresh"
        code, _, err = run_main(["apply", "-i", write(tmp_path / "s", bytes(damaged)),
                                 str(mirror)], capsys)
        assert code == 1
        assert_one_line_error(err, "damaged header")
        assert not mirror.exists()

    def test_larger_mirror_refused_without_force(self, tmp_path, capsys):
        source = write(tmp_path / "dev", random_bytes(4 * BLOCK, 26))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 1)]))
        mirror = write(tmp_path / "m", b"q" * (5 * BLOCK))
        code, _, err = run_main(["apply", "-i", stream, mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "larger than the source", "--force")
        assert read(mirror) == b"q" * (5 * BLOCK)
        assert era_tool.main(["apply", "--force", "-i", stream, mirror]) == 0
        assert len(read(mirror)) == 4 * BLOCK

    def test_destination_directory_missing(self, tmp_path, capsys):
        source = write(tmp_path / "dev", random_bytes(BLOCK, 27))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 1)]))
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path / "no" / "m")], capsys)
        assert code == 1
        assert_one_line_error(err, "cannot open")

    def test_destination_not_a_file(self, tmp_path, capsys):
        source = write(tmp_path / "dev", random_bytes(BLOCK, 28))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 1)]))
        code, _, err = run_main(["apply", "-i", stream, str(tmp_path)], capsys)
        assert code == 1
        assert_one_line_error(err, "not a regular file or block device")

    def test_full_disk(self, tmp_path, capsys):
        # A size-limited file stands in for a full disk: RLIMIT_FSIZE.
        source = write(tmp_path / "dev", random_bytes(64 * BLOCK, 29))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 64)]))
        mirror = tmp_path / "m"
        script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d));"
                  "sys.path.insert(0, %r); import era_tool;"
                  "sys.exit(era_tool.main(['apply', '-i', %r, %r]))"
                  % (10 * BLOCK, 10 * BLOCK, HERE, stream, str(mirror)))
        result = subprocess.run([sys.executable, "-c", script], stderr=subprocess.PIPE)
        assert result.returncode == 1
        assert_one_line_error(result.stderr.decode(), "cannot grow")

    def test_disk_full(self, tmp_path, capsys):
        # A real full filesystem: a small tmpfs (root only).
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        mountpoint = tmp_path / "small"
        mountpoint.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                           str(mountpoint)]).returncode != 0:
            pytest.skip("cannot mount tmpfs here")
        try:
            source = write(tmp_path / "dev", random_bytes(64 * BLOCK, 43))
            stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 64)]))
            code, _, err = run_main(["apply", "-i", stream, str(mountpoint / "m")], capsys)
            assert code == 1
            assert_one_line_error(err, "write error at offset", "No space left on device",
                                  "partially updated")
        finally:
            subprocess.run(["umount", str(mountpoint)])

    def test_progress(self, tmp_path):
        source = write(tmp_path / "dev", random_bytes(8 * BLOCK, 30))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 8)]))
        result = run_cli(["apply", "--progress", "-i", stream, str(tmp_path / "m")])
        assert result.returncode == 0
        assert b"applied 32.0 KiB / 32.0 KiB (100%)" in result.stderr
        result = run_cli(["copy", "--progress", "8", source, "-o", str(tmp_path / "o")],
                         stdin=blocks_xml([(0, 8)]))
        assert b"copied 32.0 KiB / 32.0 KiB (100%)" in result.stderr


@pytest.fixture
def loop_device(tmp_path):
    """Make loop block devices over sparse files (root and loop support needed)."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a loop block device")
    devices = []

    def make(size, data=b""):
        image = tmp_path / ("loop%d.img" % len(devices))
        with open(image, "wb") as f:
            f.write(data)
            f.truncate(size)
        result = subprocess.run(["losetup", "--find", "--show", str(image)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            pytest.skip("no loop device: %s" % result.stderr.decode().strip())
        devices.append(result.stdout.decode().strip())
        return devices[-1]
    yield make
    for device in devices:
        subprocess.run(["umount", device], stderr=subprocess.DEVNULL)
        subprocess.run(["losetup", "-d", device])


def read_device(path, size):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


class TestBlockDevice:
    def test_copy_from_and_apply_to_block_devices(self, tmp_path, loop_device):
        old = random_bytes(64 * BLOCK, 35)
        new = changed_device(old, [(1, 5), (40, 41)], 36)
        source = loop_device(len(new), new)
        mirror = loop_device(len(old), old)
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(1, 5), (40, 41)]))
        assert era_tool.main(["apply", "-i", stream, mirror]) == 0
        assert read_device(mirror, len(new)) == new

    def test_device_too_small_refused_before_writing(self, tmp_path, capsys, loop_device):
        source = write(tmp_path / "dev", random_bytes(64 * BLOCK, 37))
        stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 1)]))
        mirror = loop_device(32 * BLOCK, b"k" * BLOCK)
        code, _, err = run_main(["apply", "-i", stream, mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "stream is for a %d-byte device" % (64 * BLOCK))
        assert read_device(mirror, BLOCK) == b"k" * BLOCK

    def test_legacy_record_past_end_refused(self, tmp_path, capsys, loop_device):
        mirror = loop_device(8 * BLOCK)
        stream = write(tmp_path / "s", legacy_record(0, b"a" * 10)
                       + legacy_record(8 * BLOCK - 5, b"b" * 10))
        code, _, err = run_main(["apply", "-i", stream, mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "past the end of %s" % mirror)
        assert read_device(mirror, 8 * BLOCK) == b"a" * 10 + bytes(8 * BLOCK - 10)

    def test_mounted_device_refused(self, tmp_path, capsys, loop_device):
        device = loop_device(16 << 20)
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        if subprocess.run(["mkfs.ext4", "-q", device]).returncode != 0 or \
                subprocess.run(["mount", device, str(mountpoint)]).returncode != 0:
            pytest.skip("cannot make and mount ext4 here")
        try:
            source = write(tmp_path / "dev", random_bytes(BLOCK, 38))
            stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 1)]))
            code, _, err = run_main(["apply", "-i", stream, device], capsys)
            assert code == 1
            assert_one_line_error(err, "busy")
        finally:
            subprocess.run(["umount", str(mountpoint)])


# ---------------------------------------------------------------------------
# Chain guard: the mirror's state
# ---------------------------------------------------------------------------


class ChainCase:
    """A source device, its mirror, and streams with chain fields."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.device = random_bytes(16 * BLOCK, 50)
        self.source = write(tmp_path / "dev", self.device)
        self.mirror = str(tmp_path / "mirror.img")
        self.state = self.mirror + ".era"
        self.count = 0

    def stream(self, *options, ranges=((0, 2),)):
        self.count += 1
        return write(self.tmp_path / ("s%d" % self.count),
                     make_stream(self.tmp_path, self.source, list(ranges), *options,
                                 name="c%d" % self.count))

    def full(self, era, source_id="web1:root"):
        out = str(self.tmp_path / ("full%d" % era))
        assert era_tool.main(["copy", "--full", "--era", str(era), "--source-id", source_id,
                              "-o", out, "8", self.source]) == 0
        return out

    def apply(self, stream, *options):
        return era_tool.main(["apply", "-i", stream] + list(options) + [self.mirror])

    def era(self):
        with open(self.state) as f:
            return json.load(f)["era"]


@pytest.fixture
def chain(tmp_path):
    return ChainCase(tmp_path)


class TestChainGuard:
    def test_full_then_incrementals(self, chain):
        assert chain.apply(chain.full(5)) == 0
        state = json.load(open(chain.state))
        assert (state["era"], state["source_id"], state["block_size"], state["source_size"]) \
            == (5, "web1:root", 8, 16 * BLOCK)
        assert chain.apply(chain.stream("--since-era", "5", "--era", "8",
                                        "--source-id", "web1:root")) == 0
        assert chain.era() == 8
        # Overlap: starting earlier than the mirror's era only re-sends data.
        assert chain.apply(chain.stream("--since-era", "6", "--era", "9",
                                        "--source-id", "web1:root")) == 0
        assert chain.era() == 9
        assert read(chain.mirror) == chain.device
        assert os.listdir(str(chain.tmp_path)).count("mirror.img.era") == 1
        assert not [name for name in os.listdir(str(chain.tmp_path)) if ".tmp" in name]

    def test_gap_refused_nothing_written(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        before = read(chain.mirror)
        chain.device = random_bytes(16 * BLOCK, 51)
        write(chain.source, chain.device)
        stream = chain.stream("--since-era", "7", "--era", "9", "--source-id", "web1:root")
        capsys.readouterr()
        assert chain.apply(stream) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "starts at era 7 but the mirror is at era 5",
                              "eras 5..6 would be missing", "--force")
        assert read(chain.mirror) == before
        assert chain.era() == 5
        assert chain.apply(stream, "--force") == 0
        assert chain.era() == 9

    @pytest.mark.parametrize("options,message", [
        (["--since-era", "5", "--era", "6", "--source-id", "db1:root"], "from source 'db1:root'"),
        (["--since-era", "5", "--era", "6"], "from source ''"),
        (["--era", "6", "--source-id", "web1:root"], "carries no --since-era"),
    ])
    def test_foreign_streams_refused(self, chain, capsys, options, message):
        assert chain.apply(chain.full(5)) == 0
        before = read(chain.mirror)
        stream = chain.stream(*options)
        capsys.readouterr()
        assert chain.apply(stream) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, message)
        assert read(chain.mirror) == before and chain.era() == 5

    def test_other_block_size_refused(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        xml = write(chain.tmp_path / "l16.xml", blocks_xml([(0, 1)]))
        out = str(chain.tmp_path / "b16")
        assert era_tool.main(["copy", "-i", xml, "-o", out, "--since-era", "5", "--era", "6",
                              "--source-id", "web1:root", "16", chain.source]) == 0
        capsys.readouterr()
        assert chain.apply(out) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "block size 16, the mirror 8")

    def test_legacy_stream_breaks_chain_only_with_force(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        stream = write(chain.tmp_path / "leg", legacy_record(0, b"x" * 10))
        capsys.readouterr()
        assert chain.apply(stream) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "original-format stream carries no era")
        assert chain.apply(stream, "--force") == 0
        assert chain.era() is None
        # Era unknown: an incremental is refused, a full copy restarts the chain.
        capsys.readouterr()
        assert chain.apply(chain.stream("--since-era", "5", "--era", "7",
                                        "--source-id", "web1:root")) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "era is unknown", "--full")
        assert chain.apply(chain.full(8)) == 0
        assert chain.era() == 8

    def test_damaged_state_refused(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        write(chain.state, b'{"format": "era_tool mirror state", "ver')
        capsys.readouterr()
        assert chain.apply(chain.stream("--since-era", "5", "--era", "6",
                                        "--source-id", "web1:root")) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "state file", "is damaged")

    def test_failed_apply_keeps_state(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        stream = read(chain.stream("--since-era", "5", "--era", "9", "--source-id",
                                   "web1:root"))
        cut = write(chain.tmp_path / "cut", stream[:-3])
        assert chain.apply(cut) == 1
        assert chain.era() == 5

    def test_state_written_after_data_synced(self, chain, monkeypatch):
        events = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd):
            events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
            return real_fsync(fd)

        def rename(src, dst):
            events.append(("rename", dst))
            return real_rename(src, dst)
        stream = chain.full(5)
        monkeypatch.setattr(era_tool.os, "fsync", fsync)
        monkeypatch.setattr(era_tool.os, "rename", rename)
        assert chain.apply(stream) == 0
        names = [(kind, os.path.basename(path)) for kind, path in events]
        assert names.index(("fsync", "mirror.img")) < names.index(("rename", "mirror.img.era"))
        # The temp file is synced before the rename, the directory after it.
        rename_at = names.index(("rename", "mirror.img.era"))
        assert names[rename_at - 1][0] == "fsync" and ".tmp" in names[rename_at - 1][1]
        assert names[rename_at + 1] == ("fsync", os.path.basename(str(chain.tmp_path)))

    def test_sync_failure_keeps_state(self, chain, capsys, monkeypatch):
        assert chain.apply(chain.full(5)) == 0
        stream = chain.stream("--since-era", "5", "--era", "9", "--source-id", "web1:root")

        def failing_sync(self):
            raise era_tool.DeviceError("cannot sync %s: Input/output error" % self.path)
        monkeypatch.setattr(era_tool.Destination, "sync", failing_sync)
        capsys.readouterr()
        assert chain.apply(stream) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "cannot sync")
        assert chain.era() == 5

    def test_info_shows_mirror_state(self, chain, capsys):
        assert chain.apply(chain.full(5)) == 0
        capsys.readouterr()
        code, out, _ = run_main(["info", "--json", chain.mirror], capsys)
        info = json.loads(out)
        assert code == 0
        assert (info["era"], info["source_id"], info["size"]) == (5, "web1:root", 16 * BLOCK)
        code, out, _ = run_main(["info", chain.mirror], capsys)
        assert "era:" in out and " 5" in out.split("era:")[1].split("\n")[0]

    def test_plain_streams_keep_no_state(self, chain):
        assert chain.apply(chain.stream()) == 0
        assert not os.path.exists(chain.state)

    def test_explicit_state_file(self, chain, tmp_path):
        state = str(tmp_path / "elsewhere.json")
        assert chain.apply(chain.full(5), "--state", state) == 0
        assert not os.path.exists(chain.state)
        assert json.load(open(state))["era"] == 5

    def test_block_device_needs_state_option(self, tmp_path, capsys, loop_device, chain):
        device = loop_device(16 * BLOCK)
        stream = chain.full(5)
        capsys.readouterr()
        assert era_tool.main(["apply", "-i", stream, device]) == 0
        _, err = capsys.readouterr()
        assert "era_tool: warning: " in err and "--state" in err
        state = str(tmp_path / "dev.era")
        assert era_tool.main(["apply", "-i", stream, "--state", state, device]) == 0
        assert json.load(open(state))["era"] == 5


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class TestCommandLine:
    def test_version(self):
        result = run_cli(["--version"])
        assert result.returncode == 0
        assert result.stdout.startswith(b"era_tool " + era_tool.__version__.encode())

    def test_help_lists_commands(self):
        result = run_cli(["--help"])
        assert result.returncode == 0
        for command in (b"copy", b"apply", b"info"):
            assert command in result.stdout

    @pytest.mark.parametrize("command", ["copy", "apply", "info"])
    def test_command_help_has_examples(self, command):
        result = run_cli([command, "--help"])
        assert result.returncode == 0 and b"examples:" in result.stdout

    def test_usage_error_exits_2(self):
        assert run_cli(["frobnicate"]).returncode == 2
        assert run_cli(["apply"]).returncode == 2

    def test_interrupt_exits_130(self, tmp_path):
        # apply waits on a pipe that stays open; Ctrl-C must give 130, no traceback.
        proc = subprocess.Popen([sys.executable, TOOL, "apply", str(tmp_path / "m")],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(era_tool.MAGIC[:4])
        proc.stdin.flush()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert b"Traceback" not in err

    def test_broken_pipe_is_one_line(self, tmp_path):
        source = write(tmp_path / "dev", random_bytes(256 * BLOCK, 31))
        copy = subprocess.Popen([sys.executable, TOOL, "copy", "--full", "8", source],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        copy.stdout.read(10)
        copy.stdout.close()
        err = copy.stderr.read().decode()
        assert copy.wait() == 1
        assert_one_line_error(err, "closed before the stream ended")

    def test_python38_compatible(self):
        vermin = shutil.which("vermin")
        if vermin is None:
            pytest.skip("vermin is not installed (pip install vermin)")
        result = subprocess.run([vermin, "-q", "--no-tips", "--violations", "-t=3.8-", TOOL],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert result.returncode == 0, result.stdout.decode()

    def test_stdlib_only(self):
        with open(TOOL) as f:
            source = f.read()
        imports = {line.split()[1].split(".")[0] for line in source.splitlines()
                   if line.startswith(("import ", "from "))}
        assert imports <= set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") \
            else True
        assert "era_tool" not in imports


# ---------------------------------------------------------------------------
# Undo and rollback
# ---------------------------------------------------------------------------


class UndoCase:
    """An old mirror with a chain state, and a stream that changes it."""

    def __init__(self, tmp_path, blocks=64, old_blocks=None, seed=60):
        self.tmp_path = tmp_path
        old_blocks = blocks if old_blocks is None else old_blocks
        self.old = random_bytes(old_blocks * BLOCK, seed)
        padded = self.old[:blocks * BLOCK] + bytes(max(0, blocks * BLOCK - len(self.old)))
        self.ranges = [(1, 3), (10, 20), (blocks - 5, blocks)]
        self.new = changed_device(padded, self.ranges, seed + 1)
        self.source = write(tmp_path / "dev", self.new)
        self.mirror = str(tmp_path / "mirror.img")
        self.undo = str(tmp_path / "mirror.img.undo")
        write(self.mirror, self.old)
        era_tool.save_state(self.mirror + ".era", "web1:root", len(self.old), 8, 5)
        self.stream = make_stream(tmp_path, self.source, self.ranges, "--since-era", "5",
                                  "--era", "9", "--source-id", "web1:root", name="u.era")
        self.stream_path = write(tmp_path / "u.era", self.stream)

    def era(self):
        with open(self.mirror + ".era") as f:
            return json.load(f)["era"]


class TestUndo:
    def test_apply_then_rollback(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        assert read(case.mirror) == case.new and case.era() == 9
        code, out, _ = run_main(["rollback", case.undo, case.mirror], capsys)
        assert code == 0 and "a complete undo file" in out and "era 5 again" in out
        assert read(case.mirror) == case.old and case.era() == 5

    def test_undo_file_is_a_stream(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        code, out, _ = run_main(["info", "--json", "-i", case.undo], capsys)
        info = json.loads(out)
        assert code == 0 and info["intact"] and info["undo"]
        assert (info["since_era"], info["era"], info["device_size"]) == (9, 5, len(case.old))
        assert era_tool.main(["apply", "-i", case.undo, case.mirror]) == 0
        assert read(case.mirror) == case.old and case.era() == 5

    def test_grown_file_shrinks_back(self, tmp_path):
        case = UndoCase(tmp_path, blocks=64, old_blocks=40)
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        assert read(case.mirror) == case.new
        assert era_tool.main(["rollback", case.undo, case.mirror]) == 0
        assert read(case.mirror) == case.old

    def test_forced_shrink_is_undone(self, tmp_path):
        case = UndoCase(tmp_path, blocks=32, old_blocks=48)
        assert era_tool.main(["apply", "--force", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        assert read(case.mirror) == case.new
        assert era_tool.main(["rollback", case.undo, case.mirror]) == 0
        assert read(case.mirror) == case.old

    def test_new_mirror_rolls_back_to_empty(self, tmp_path):
        case = UndoCase(tmp_path)
        os.unlink(case.mirror)
        os.unlink(case.mirror + ".era")
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        assert era_tool.main(["rollback", case.undo, case.mirror]) == 0
        assert read(case.mirror) == b""
        assert not os.path.exists(case.mirror + ".era")

    def test_versions_step_back_newest_first(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        versions = [case.old]
        undos = []
        device = case.new
        for number, (since, era) in enumerate([(5, 9), (9, 12), (12, 15)]):
            device = changed_device(device, [(number * 7, number * 7 + 4)], 70 + number)
            write(case.source, device)
            stream = write(tmp_path / ("v%d" % number), make_stream(
                tmp_path, case.source, [(0, 64)], "--since-era", str(since), "--era",
                str(era), "--source-id", "web1:root", name="v%d.era" % number))
            undos.append(str(tmp_path / ("undo%d" % number)))
            assert era_tool.main(["apply", "--undo", undos[-1], "-i", stream,
                                  case.mirror]) == 0
            versions.append(device)
        # An older undo file first would mix two versions: refused.
        capsys.readouterr()
        assert era_tool.main(["apply", "-i", undos[0], case.mirror]) == 1
        _, err = capsys.readouterr()
        assert_one_line_error(err, "undo file is for the mirror at era 9, but it is at era 15")
        assert era_tool.main(["rollback", undos[1], case.mirror]) == 1
        for undo, version in zip(reversed(undos), reversed(versions[:-1])):
            assert era_tool.main(["apply", "-i", undo, case.mirror]) == 0
            assert read(case.mirror) == version
        assert case.era() == 5

    @pytest.mark.parametrize("cut", ["header", "chunk", "payload", "trailer", "flip"])
    def test_damaged_stream_rolls_back(self, tmp_path, capsys, monkeypatch, cut):
        monkeypatch.setattr(era_tool, "UNDO_BATCH", BLOCK)     # overwrite as early as possible
        case = UndoCase(tmp_path)
        stream = bytearray(case.stream)
        header_size = len(era_tool.read_header(_BytesInput(case.stream)).raw)
        damaged = {
            "header": bytes(stream[:header_size]),
            "chunk": bytes(stream[:header_size + 3 * (24 + 4 * BLOCK) + 10]),
            "payload": bytes(stream[:len(stream) - 5000]),
            "trailer": bytes(stream[:-1]),
        }.get(cut)
        if damaged is None:
            stream[len(stream) - 300] ^= 0x10
            damaged = bytes(stream)
        code, _, err = run_main(["apply", "--undo", case.undo, "-i",
                                 write(tmp_path / "d", damaged), case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err)
        if cut != "header":
            assert "rolled back" in err
        assert read(case.mirror) == case.old and case.era() == 5
        assert not os.path.exists(case.undo)

    def test_disk_full_rolls_back(self, tmp_path, capsys):
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        mountpoint = tmp_path / "small"
        mountpoint.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs",
                           str(mountpoint)]).returncode != 0:
            pytest.skip("cannot mount tmpfs here")
        try:
            old = random_bytes(16 * BLOCK, 80)
            mirror = write(mountpoint / "m", old)
            source = write(tmp_path / "dev", random_bytes(64 * BLOCK, 81))
            stream = write(tmp_path / "s", make_stream(tmp_path, source, [(0, 64)]))
            code, _, err = run_main(["apply", "--undo", str(tmp_path / "undo"), "-i", stream,
                                     mirror], capsys)
            assert code == 1
            assert_one_line_error(err, "No space left on device", "rolled back")
            assert read(mirror) == old
        finally:
            subprocess.run(["umount", str(mountpoint)])

    def test_sigkill_then_rollback(self, tmp_path):
        """Thirty kills at random moments: rollback always gives back the old mirror."""
        case = UndoCase(tmp_path, blocks=256)
        small = make_stream(tmp_path, case.source, case.ranges + [(30, 200)], "--since-era",
                            "5", "--era", "9", "--source-id", "web1:root", name="k.era")
        script = ("import sys; sys.path.insert(0, %r); import era_tool; "
                  "era_tool.UNDO_BATCH = 3 * 4096; "
                  "sys.exit(era_tool.main(['apply', '--undo', %r, %r]))"
                  % (HERE, case.undo, case.mirror))
        rng = random.Random(82)
        outcomes = set()
        for attempt in range(30):
            write(case.mirror, case.old)
            era_tool.save_state(case.mirror + ".era", "web1:root", len(case.old), 8, 5)
            if os.path.exists(case.undo):
                os.unlink(case.undo)
            proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            # Stop feeding at a random byte (the first few inside the header), then kill
            # at once or a moment later: while it waits for data, or while it writes.
            stop = rng.randrange(60) if attempt < 3 else rng.randrange(len(small))
            try:
                position = 0
                while position < stop:
                    piece = min(rng.randrange(1000, 6000), stop - position)
                    proc.stdin.write(small[position:position + piece])
                    proc.stdin.flush()
                    position += piece
            except BrokenPipeError:
                pass
            time.sleep(rng.choice([0, 0.001, 0.005, 0.02, 0.1]))
            proc.kill()
            proc.wait()
            changed = read(case.mirror) != case.old
            outcomes.add((changed, os.path.exists(case.undo)))
            if os.path.exists(case.undo):
                assert era_tool.main(["rollback", case.undo, case.mirror]) == 0, attempt
            else:
                assert not changed, attempt       # no undo file: nothing was overwritten
            assert read(case.mirror) == case.old, attempt
            assert case.era() == 5
        # The kills landed both before and after overwrites began.
        assert (True, True) in outcomes and any(not changed for changed, _ in outcomes), \
            outcomes

    def test_rollback_of_header_cut_undo_changes_nothing(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        write(case.undo, era_tool.MAGIC + b"\x01")
        code, _, err = run_main(["rollback", case.undo, case.mirror], capsys)
        assert code == 0 and "changed nothing" in err
        assert read(case.mirror) == case.old

    def test_rollback_refuses_foreign_undo(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        era_tool.save_state(case.mirror + ".era", "db1:root", len(case.old), 8, 9)
        code, _, err = run_main(["rollback", case.undo, case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "from source 'web1:root'", "--force")
        assert read(case.mirror) == case.new
        assert era_tool.main(["rollback", "--force", case.undo, case.mirror]) == 0
        assert read(case.mirror) == case.old

    def test_rollback_refuses_a_stream(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        code, _, err = run_main(["rollback", case.stream_path, case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "is a stream, not an undo file")

    def test_rollback_refuses_damaged_undo(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        assert era_tool.main(["apply", "--undo", case.undo, "-i", case.stream_path,
                              case.mirror]) == 0
        data = bytearray(read(case.undo))
        data[200] ^= 1
        write(case.undo, bytes(data))
        code, _, err = run_main(["rollback", case.undo, case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "is damaged")
        assert read(case.mirror) == case.new

    def test_existing_undo_file_not_overwritten(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        write(case.undo, b"precious")
        code, _, err = run_main(["apply", "--undo", case.undo, "-i", case.stream_path,
                                 case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "already exists")
        assert read(case.undo) == b"precious" and read(case.mirror) == case.old

    def test_undo_refuses_legacy_stream(self, tmp_path, capsys):
        case = UndoCase(tmp_path)
        stream = write(tmp_path / "leg", legacy_record(0, b"x"))
        code, _, err = run_main(["apply", "--force", "--undo", case.undo, "-i", stream,
                                 case.mirror], capsys)
        assert code == 1
        assert_one_line_error(err, "--undo needs an era_tool stream")


# ---------------------------------------------------------------------------
# Shell scripts: backup.sh settings, shellcheck
# ---------------------------------------------------------------------------

BACKUP = os.path.join(HERE, "backup.sh")
ZZ = os.path.join(HERE, "zz_dm-era.sh")


def run_backup(tmp_path, settings, env=None):
    path = write(tmp_path / "settings", settings.encode())
    clean = {key: value for key, value in os.environ.items()
             if key not in ("HOST", "DIR", "ERA_DEVICE", "METADATA_DEVICE")}
    clean.update(env or {})
    return subprocess.run(["bash", BACKUP, path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=clean, timeout=60)


class TestBackupSettings:
    GOOD = "HOST=h\nERA_DEVICE=e\nMETADATA_DEVICE=/dev/m\nDIR=%s\n"

    @pytest.mark.parametrize("extra,message", [
        ("FOO=1\n", "unknown setting FOO"),
        ("this is not a setting\n", "not KEY=value"),
        ("COMPRESS=rar\n", "COMPRESS must be"),
        ("FREEZE_LIMIT=1G\n", "FREEZE_LIMIT must be a whole number"),
        ("MAX_PASSES=0\n", "MAX_PASSES must be at least 1"),
        ("TOOL=/nonexistent/era_tool.py\n", "cannot read TOOL"),
    ])
    def test_bad_settings(self, tmp_path, extra, message):
        result = run_backup(tmp_path, self.GOOD % tmp_path + extra)
        assert result.returncode == 1
        assert message in result.stderr.decode()

    def test_required_setting(self, tmp_path):
        result = run_backup(tmp_path, "HOST=h\nDIR=%s\n" % tmp_path)
        assert result.returncode != 0
        assert b"ERA_DEVICE is not set" in result.stderr

    def test_ssh_failure_fails_the_run(self, tmp_path):
        # A host that cannot be reached: exit non-zero, no state, no mirror.
        result = run_backup(tmp_path, self.GOOD % tmp_path + "SSH=false\n")
        assert result.returncode != 0
        assert b"failed" in result.stderr
        assert not (tmp_path / "e.img").exists() and not (tmp_path / "e.img.era").exists()

    def test_usage(self, tmp_path):
        result = subprocess.run(["bash", BACKUP, "a", "b"], stderr=subprocess.PIPE)
        assert result.returncode == 2 and b"usage" in result.stderr

    def test_zz_prereqs_and_quiet_without_devices(self):
        result = subprocess.run(["sh", ZZ, "prereqs"], stdout=subprocess.PIPE)
        assert result.returncode == 0 and result.stdout.strip() == b""
        result = subprocess.run(["sh", ZZ], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")

    def test_shellcheck(self):
        if not shutil.which("shellcheck"):
            pytest.skip("shellcheck is not installed")
        scripts = [BACKUP, ZZ] + [os.path.join(HERE, ".ci", name) for name in ("run", "vm")
                                  if os.path.exists(os.path.join(HERE, ".ci", name))]
        result = subprocess.run(["shellcheck"] + scripts, stdout=subprocess.PIPE)
        assert result.returncode == 0, result.stdout.decode()


# ---------------------------------------------------------------------------
# Real era_invalidate output (thin-provisioning-tools)
# ---------------------------------------------------------------------------

needs_era_tools = pytest.mark.skipif(
    not (shutil.which("era_restore") and shutil.which("era_invalidate")),
    reason="thin-provisioning-tools (era_restore, era_invalidate) is not installed")


def era_metadata_xml(nr_blocks, current_era, era_array, writesets, block_size=BLOCK_SECTORS):
    """era_dump-style XML for era_restore."""
    lines = ['<superblock uuid="" block_size="%d" nr_blocks="%d" current_era="%d">'
             % (block_size, nr_blocks, current_era)]
    for era, bits in sorted(writesets.items()):
        lines.append('  <writeset era="%d" nr_bits="%d">' % (era, nr_blocks))
        lines.extend('    <bit block="%d" value="true"/>' % bit for bit in sorted(bits))
        lines.append("  </writeset>")
    lines.append("  <era_array>")
    lines.extend('    <era block="%d" era="%d"/>' % item for item in sorted(era_array.items()))
    lines.append("  </era_array>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


@needs_era_tools
class TestRealEraInvalidate:
    def make_metadata(self, tmp_path, nr_blocks, seed):
        rng = random.Random(seed)
        era_array = {block: rng.randrange(1, 20) for block in range(nr_blocks)
                     if rng.random() < 0.3}
        writesets = {era: {rng.randrange(nr_blocks) for _ in range(5)} for era in (20, 21)}
        xml = write(tmp_path / "meta.xml",
                    era_metadata_xml(nr_blocks, 22, era_array, writesets).encode())
        meta = tmp_path / "meta.bin"
        with open(meta, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["era_restore", "-i", xml, "-o", str(meta)], check=True)
        return str(meta), era_array, writesets

    @staticmethod
    def expected(nr_blocks, era_array, writesets, since):
        changed = {b for b in range(nr_blocks) if era_array.get(b, 0) >= since}
        for era, bits in writesets.items():
            if era >= since:
                changed |= bits
        return changed

    @pytest.mark.parametrize("since", [1, 5, 12, 19, 21, 22])
    def test_copy_from_era_invalidate(self, tmp_path, since):
        nr_blocks = 200
        meta, era_array, writesets = self.make_metadata(tmp_path, nr_blocks, since)
        listing = subprocess.run(["era_invalidate", "--written-since", str(since), meta],
                                 stdout=subprocess.PIPE, check=True).stdout
        changed = self.expected(nr_blocks, era_array, writesets, since)
        old = random_bytes(nr_blocks * BLOCK, 32)
        new = changed_device(old, [(b, b + 1) for b in changed], 33)
        # Blocks that changed on the device but are not listed must not travel.
        new = bytearray(new)
        source = write(tmp_path / "dev", bytes(new))
        mirror = write(tmp_path / "m", old)
        copy = run_cli(["copy", "8", source], stdin=listing)
        assert copy.returncode == 0, copy.stderr
        apply = run_cli(["apply", mirror], stdin=copy.stdout)
        assert apply.returncode == 0, apply.stderr
        assert read(mirror) == bytes(new)
        estimate = run_cli(["copy", "--json", "8"], stdin=listing)
        assert json.loads(estimate.stdout)["blocks"] == len(changed)

    def test_empty_listing(self, tmp_path):
        meta, _, _ = self.make_metadata(tmp_path, 50, 40)
        listing = subprocess.run(["era_invalidate", "--written-since", "23", meta],
                                 stdout=subprocess.PIPE, check=True).stdout
        result = run_cli(["copy", "8"], stdin=listing)
        assert result.stdout == b"0 bytes to copy\n"

    def test_era_invalidate_failure_is_not_an_empty_list(self, tmp_path):
        # era_invalidate on a missing device prints nothing: copy must fail, not copy nothing.
        listing = subprocess.run(["era_invalidate", "--written-since", "1",
                                  str(tmp_path / "missing")], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert listing.returncode != 0
        source = write(tmp_path / "dev", bytes(BLOCK))
        result = run_cli(["copy", "8", source, "-o", str(tmp_path / "o")],
                         stdin=listing.stdout)
        assert result.returncode == 1
        assert b"block list is empty" in result.stderr
        assert not (tmp_path / "o").exists()
