"""The worker's framed script calls, read back by hiredis's RESP parser."""

import hiredis
import pytest

from stream_worker.resp import Words, bulk, script_call, unframe


def parse(data: bytes):
    reader = hiredis.Reader()
    reader.feed(data)
    out = reader.gets()
    assert reader.gets() is False  # nothing left over
    return out


def test_a_script_call_is_the_array_a_packer_would_send():
    keys, args = Words(), Words()
    keys.extend(["k1", b"k\r\n2"])
    args.extend([3, "é", b"", b"\x00\xff"])
    args.command("HSET", b"key", b"f", 12)
    args.add_framed(bulk(b"x") + bulk(7), 2)
    call = script_call("a" * 40, keys, args)
    expected = [b"EVALSHA", b"a" * 40, b"2", b"k1", b"k\r\n2", b"3", "é".encode(), b"",
                b"\x00\xff", b"4", b"HSET", b"key", b"f", b"12", b"x", b"7"]  # fmt: skip
    assert parse(call) == expected
    assert call == hiredis.pack_command(tuple(expected))
    assert unframe(keys.parts + args.parts) == expected[3:]


def test_unframe_refuses_what_is_not_bulk_strings():
    with pytest.raises(ValueError, match="not a RESP bulk string"):
        unframe([b"+OK\r\n"])
    with pytest.raises(ValueError, match="not terminated"):
        unframe([b"$2\r\nabc\r\n"])
