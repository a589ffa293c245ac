"""Safe, validated reading and atomic writing of safetensors files (adapters and training state).

Only `.safetensors` is ever read from a user, and its header is checked before any tensor is
touched, so a malformed or hostile file gives one clear error instead of a crash or a blow-up.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from .errors import FormatError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_TENSORS = 50_000  # an SDXL LoCon with both text encoders has about 8,000; full SDXL checkpoints about 2,500
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}  # the safetensors dtypes sdlora reads
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's framing and header; return the header (without metadata)."""
    return read_header(path)[0]


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """The validated header (tensor names, dtypes, shapes, offsets) and the metadata, without reading any tensor."""
    path = _suffix_checked(path)
    try:
        with open(path, "rb") as f:
            return _header(path, f, path.stat().st_size)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None


def _suffix_checked(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise FormatError(f"{path} is a folder; give a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise FormatError(
            f"{path}: only .safetensors files are read; {path.suffix or 'this'} files may be pickled and can run "
            "code when loaded. Ask for the .safetensors version, or convert it with a trusted tool."
        )
    return path


def _header(path: Path, f, size: int) -> tuple[dict, dict[str, str]]:
    head = f.read(9)
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    # A safetensors file is an 8-byte length and then a JSON object: its 9th byte is always '{'. Only a file that is
    # not framed like that is judged by its first bytes (a valid header length such as 640 starts with the bytes of
    # pickle's PROTO 2).
    framed = n is not None and n + 8 <= size and head[8:9] == b"{"
    if not framed and head.startswith(PICKLE_MAGIC):
        raise FormatError(f"{path}: this is a pickled PyTorch file renamed to .safetensors; it is refused because "
                          "unpickling can run code. Get the real .safetensors version.")
    if n is None:
        raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
    if n > MAX_HEADER or n + 8 > size:
        raise FormatError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
    f.seek(8)
    raw = f.read(n)
    try:  # strictly UTF-8 (no BOM, no UTF-16), as the format and the safetensors library require
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
    except RecursionError:
        raise FormatError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    if len(header) > MAX_TENSORS:
        raise FormatError(f"{path}: holds {len(header):,} tensors; a LoRA or model file has far fewer (at most "
                          f"{MAX_TENSORS:,} are read), so the file is refused")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FormatError(f"{path}: corrupt safetensors metadata (values must be strings)")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise FormatError(f"{path}: corrupt entry for tensor {key!r}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise FormatError(f"{path}: tensor {key!r} has unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise FormatError(f"{path}: tensor {key!r} has a malformed shape {shape!r}; the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise FormatError(f"{path}: tensor {key!r} has malformed data offsets {offsets!r}; the file is corrupt")
        start, end = offsets
        if not (_count(start) and _count(end) and start <= end <= data_len):
            raise FormatError(f"{path}: tensor {key!r} points outside the file (offsets {start}..{end}, data {data_len} bytes)")
        spans.append((start, end, key))
    spans.sort()
    for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {k0!r} and {k1!r} overlap; the file is corrupt")
    return header, dict(meta or {})


def _count(x) -> bool:
    """A JSON value usable as a size or offset: a non-negative integer (true and false are not numbers here)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path: Path, *, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata after validating the file; refuse NaN or Inf values."""
    tensors, meta, _ = read_safetensors_bytes(path, check_finite=check_finite)
    return tensors, meta


def read_safetensors_bytes(path: Path, *, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                                              bytes]:
    """As read_safetensors, plus the file's bytes: the file is read from disk once (header checked first, so a
    huge or hostile file is refused before it is read), and hashes come from the same bytes as the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = _suffix_checked(path)
    try:
        with open(path, "rb") as f:
            _, meta = _header(path, f, path.stat().st_size)
            f.seek(0)
            blob = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        tensors = load(blob)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise FormatError(f"{path}: cannot read tensors: {e}") from None
    if check_finite:
        for k, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(f"{path}: tensor {k!r} contains NaN or Inf values; the file is broken")
    return tensors, meta, blob


def read_metadata(path: Path) -> dict[str, str]:
    return read_header(path)[1]


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


_WRITES = [0]


def _fault_point() -> None:
    """Fault injection for the kill-matrix test: SDLORA_KILL_AT_WRITE=N kills this process (SIGKILL, as a power
    cut would) after the N-th atomic write has its data on disk and before it replaces the file."""
    at = os.environ.get("SDLORA_KILL_AT_WRITE")
    if at:
        _WRITES[0] += 1
        if _WRITES[0] == int(at):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes via a temp file in the same folder and os.replace, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would: the replaced file's, or
        # 0666 less the umask, so adapters and images stay readable by whoever could read them before.
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fault_point()
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # say which file, and that the old one is whole
            raise OSError(e.errno, f"{e.strerror}: could not write {len(data):,} bytes (the disk or quota is full); "
                          f"{'the previous version is unchanged' if path.exists() else 'nothing was written'}",
                          str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata or {}))


def atomic_save_image(image, path: Path, **kwargs) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    import io

    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    image.save(buf, format=fmt, **kwargs)
    atomic_write_bytes(path, buf.getvalue())
