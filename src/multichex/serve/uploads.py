"""Uploads of ``multichex serve``: sniff the type, copy to a uuid-named temp file within the size limit, name it for display.

The client's file name and content type never reach a path: the type comes from the bytes
(:mod:`multichex.data.sniff`), the file name is only echoed back (:func:`display_name`) and drawn
as the overlay's caption (:func:`caption_for`).
"""

from __future__ import annotations

import unicodedata
import uuid
from pathlib import Path

from fastapi import HTTPException, UploadFile

from multichex.data import sniff
from multichex.data.dicom import describes_image

__all__ = ["CHUNK_BYTES", "RAW_DICOM", "caption_for", "display_name", "save_upload", "sniff_upload"]

CHUNK_BYTES = 1 << 20
"""Uploads are copied to disk in chunks of this size."""
RAW_DICOM = "raw-dicom"
"""Sniff result for a DICOM stream without preamble (accepted only if pydicom can parse it)."""
MAX_CLIENT_NAME = 255
"""Longest client file name echoed back (longer ones are cut)."""
MAX_CAPTION = 80
"""Longest overlay caption (longer names are cut and end in an ellipsis)."""
_SUFFIXES = {"png": ".png", "jpeg": ".jpg", sniff.DICOM: ".dcm", sniff.DICOM_RAW: RAW_DICOM}


def sniff_upload(head: bytes) -> str | None:
    """Suffix for the upload's real type from its first bytes: ``.png``, ``.jpg``, ``.dcm``,
    :data:`RAW_DICOM` (needs a pydicom check), or ``None`` when it is none of PNG, JPEG or DICOM."""
    kind = sniff.sniff(head[: sniff.SNIFF_BYTES])
    return _SUFFIXES.get(kind) if kind is not None else None


def display_name(filename: str | None) -> str:
    """The client's file name as the API echoes it (``image``): at most :data:`MAX_CLIENT_NAME` characters."""
    return (filename or "upload")[:MAX_CLIENT_NAME]


def caption_for(client_name: str) -> str:
    """The overlay caption for a client file name: its last path component on one line, or ``""`` (no caption).

    Control characters become ``?`` and names past :data:`MAX_CAPTION` characters are cut. The
    caption is drawn into the overlay's pixels, so it is plain text: HTML escaping is the page's
    job (it inserts the name as text, never as markup).
    """
    base = client_name.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join("?" if unicodedata.category(c).startswith("C") else c for c in base).strip()
    if text in ("", ".", ".."):
        return ""
    return text if len(text) <= MAX_CAPTION else text[: MAX_CAPTION - 1] + "…"


async def save_upload(upload: UploadFile, folder: Path, limit: int) -> tuple[Path, str]:
    """Copy ``upload`` in chunks to ``folder/<uuid><sniffed suffix>``; return the path and sniffed kind.

    Raises HTTPException 413 past ``limit`` bytes, 415 for content that is not PNG, JPEG or DICOM,
    422 for an empty upload.
    """
    head = b""
    while len(head) < sniff.SNIFF_BYTES:
        chunk = await upload.read(CHUNK_BYTES)
        if not chunk:
            break
        head += chunk
    if not head:
        raise HTTPException(422, "the uploaded file is empty")
    _check_size(len(head), limit)
    kind = sniff_upload(head)
    if kind is None:
        raise HTTPException(415, "unsupported file type: the content is not PNG, JPEG or DICOM "
                                 "(the type is detected from the file's bytes, not its name)")
    path = folder / f"{uuid.uuid4().hex}{'.dcm' if kind == RAW_DICOM else kind}"
    try:
        await _copy_rest(upload, head, path, limit)
        if kind == RAW_DICOM and not describes_image(path):
            raise HTTPException(415, "unsupported file type: looks like DICOM without preamble, but pydicom cannot read it")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, kind


async def _copy_rest(upload: UploadFile, head: bytes, path: Path, limit: int) -> None:
    """Write ``head`` and the rest of the upload to ``path`` (a new file), counting bytes against ``limit``."""
    size = len(head)
    with path.open("xb") as out:
        out.write(head)
        while chunk := await upload.read(CHUNK_BYTES):
            size += len(chunk)
            _check_size(size, limit)
            out.write(chunk)


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        mib = f" ({limit / 2**20:.1f} MiB)" if limit >= 2**20 else ""
        raise HTTPException(413, f"upload too large: the limit is {limit} bytes{mib}")
