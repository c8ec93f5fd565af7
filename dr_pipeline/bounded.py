"""Decompress foreign bytes without letting them choose how much memory we spend.

A 1.5 MB gzip member can inflate to 1.5 GiB. Every decompression of a member we did not write
(a DataCompDR ``pth.gz`` / ``npz``, a zstd blob) goes through these functions with a byte limit
the caller derives from what the schema expects (e.g. ``expected_bytes x slack``); output is
produced in chunks and the work stops as soon as the limit is passed, so peak memory is about
the limit, never the bomb's size. Over the limit raises ``TooLarge`` (a ``ValueError``), which
readers turn into a counted rejection.
"""

from __future__ import annotations

import io
import zipfile
import zlib

CHUNK = 1 << 20


class TooLarge(ValueError):
    """Decompressed data would exceed the caller's limit."""


def _limit_error(what: str, limit: int) -> TooLarge:
    return TooLarge(f"{what} inflates past {limit} bytes (the limit for what the schema expects); refused")


def gunzip(data: bytes, limit: int, what: str = "gzip member") -> bytes:
    """gzip (or zlib) bytes -> at most ``limit`` decompressed bytes; concatenated members work."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
        src = rest
        while True:
            chunk = d.decompress(src, CHUNK)
            out += chunk
            if len(out) > limit:
                raise _limit_error(what, limit)
            src = d.unconsumed_tail
            if d.eof or (not src and not chunk):
                break
        if not d.eof:
            raise ValueError(f"{what}: truncated compressed data")
        rest = d.unused_data
        if not rest.strip(b"\0"):  # zero padding after the last member
            break
    return bytes(out)


def unzstd(data: bytes, limit: int, what: str = "zstd member") -> bytes:
    """zstd bytes -> at most ``limit`` decompressed bytes (needs the ``zstandard`` package)."""
    import zstandard

    out = bytearray()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
    while chunk := reader.read(CHUNK):
        out += chunk
        if len(out) > limit:
            raise _limit_error(what, limit)
    return bytes(out)


def check_zip(data: bytes, limit: int, what: str = "npz member") -> None:
    """An npz (zip) whose members together inflate to at most ``limit`` bytes. The sizes the zip
    directory declares are checked first; ``np.load`` then reads each member, and a member whose
    real size differs from its declared one fails zipfile's own CRC/size check."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            total = 0
            for info in z.infolist():
                total += info.file_size
                if total > limit:
                    raise _limit_error(what, limit)
                with z.open(info) as f:  # the declared size may lie: count what comes out
                    n = 0
                    while chunk := f.read(CHUNK):
                        n += len(chunk)
                        if n > info.file_size or n > limit:
                            raise _limit_error(what, limit)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{what}: not a valid zip ({e})") from None


__all__ = ["TooLarge", "gunzip", "unzstd", "check_zip"]
