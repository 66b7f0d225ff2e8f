"""Is this file a decodable image? A cheap structural test and a full decode, shared by the DALI loader (to name
the file behind a decoder failure, or to skip corrupt files) and by `selfdistill data check`.

DALI's decoders report a corrupt file as "nvImageCodec failure: '#3'" without its path, and the pipeline is dead
afterwards, so the path has to be found by looking at the files.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image

# Magic numbers of the formats DALI's decoders and PIL both read.
_SIGNATURES = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
               (b"MM\x00*", "tiff"), (b"P5", "pnm"), (b"P6", "pnm"))
_HEAD = 16  # bytes read to recognise a format
# Bytes searched at the end for the end marker: some writers append a few bytes of padding after JPEG EOI.
_TAIL = 1024
_END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND"}
_CHUNK = 2048  # files per scheduling round of the thread pool


def sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


def quick_problem(path: str | Path) -> str | None:
    """Reads the first and last bytes only: unknown format, or a JPEG/PNG without its end marker (truncated)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            fmt = sniff(head)
            if fmt is None:
                return "not an image (unknown file signature)"
            marker = _END_MARKERS.get(fmt)
            if marker is not None:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - _TAIL))
                if marker not in f.read():
                    return f"truncated {fmt} (no end marker)"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return None


def decode_problem(path: str | Path) -> str | None:
    """Full decode with PIL (slow, certain)."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"cannot decode: {e}"
    return None


def _confirmed(path: str) -> str | None:
    # A quick flag alone could be a false alarm (an odd but valid file); the full decode decides.
    return decode_problem(path) if quick_problem(path) else None


def find_bad_images(paths: Iterable[str | Path], full: bool = False, limit: int | None = None,
                    threads: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) of the undecodable files, in input order. `full=False` fully decodes only the files that fail
    the quick test (fast, misses damage in the middle of a file); `full=True` decodes every file."""
    paths = [str(p) for p in paths]
    check = decode_problem if full else _confirmed
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        for i in range(0, len(paths), _CHUNK):  # chunks, so that `limit` stops the scan early
            chunk = paths[i:i + _CHUNK]
            bad += [(p, problem) for p, problem in zip(chunk, pool.map(check, chunk), strict=True) if problem]
            if limit is not None and len(bad) >= limit:
                return bad[:limit]
    return bad
