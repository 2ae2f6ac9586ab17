"""The worker's script calls as RESP bytes, assembled from words framed once.

A micro-batch commit is one EVALSHA with a few thousand arguments. Packing them
(hiredis or redis-py) frames every word again on every call, though most of them are
the same each time: the HSET word, the Redis field names, word counts, small
integers, categories. Here a word is framed as a RESP bulk string (`$<len>\\r\\n<word>\\r\\n`)
where it is made, constants and cached values are framed once per process, and the
call is one `b"".join`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Word = bytes | str | int


def bulk(word: Word) -> bytes:
    """`word` as a RESP bulk string (str as UTF-8, int in decimal, as Redis reads them)."""
    if isinstance(word, str):
        word = word.encode()
    elif isinstance(word, int):
        word = b"%d" % word
    return b"$%d\r\n%b\r\n" % (len(word), word)


class Words:
    """Arguments of one call, each already framed; `count` of them."""

    __slots__ = ("count", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.count = 0

    def add(self, word: Word) -> None:
        self.parts.append(bulk(word))
        self.count += 1

    def extend(self, words: Iterable[Word]) -> None:
        for word in words:
            self.add(word)

    def add_words(self, other: Words) -> None:
        """Append every word of `other` (no copy of their bytes)."""
        self.parts += other.parts
        self.count += other.count

    def add_framed(self, piece: bytes, words: int) -> None:
        """Append `piece`, which holds `words` framed words."""
        self.parts.append(piece)
        self.count += words

    def command(self, *words: Word) -> None:
        """A command as the commit script reads it: its word count, then its words."""
        self.add(len(words))
        self.extend(words)


def script_call(sha: str, keys: Words, args: Words) -> bytes:
    """EVALSHA of the script `sha` with `keys` and `args`, as one RESP array."""
    head = b"*%d\r\n%b%b%b" % (3 + keys.count + args.count, bulk(b"EVALSHA"), bulk(sha),
                               bulk(keys.count))  # fmt: skip
    return b"".join([head, *keys.parts, *args.parts])


def unframe(parts: Sequence[bytes]) -> list[bytes]:
    """The words in framed pieces (tests and tools: what a call will send)."""
    data = b"".join(parts)
    words = []
    i = 0
    while i < len(data):
        if data[i : i + 1] != b"$":
            raise ValueError(f"not a RESP bulk string at byte {i}")
        end = data.index(b"\r\n", i)
        n = int(data[i + 1 : end])
        words.append(data[end + 2 : end + 2 + n])
        if data[end + 2 + n : end + 4 + n] != b"\r\n":
            raise ValueError(f"bulk string at byte {i} is not terminated")
        i = end + 4 + n
    return words
