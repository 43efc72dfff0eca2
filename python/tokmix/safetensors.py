"""A small safetensors reader and writer (the format of src/nn/checkpoint.cpp), for when the
`safetensors` package is absent: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw data."""
import json
import struct

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}


def read_bytes(data, origin="safetensors"):
    """Returns (tensors: dict name -> tensor, metadata: dict). Checks what it reads."""
    if len(data) < 8:
        raise ValueError(f"{origin}: {len(data)} bytes; expected at least the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{origin}: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except ValueError as e:
        raise ValueError(f"{origin}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{origin}: header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    out = {}
    for name, e in header.items():
        dtype = _DTYPES.get(e.get("dtype"))
        if dtype is None:
            raise ValueError(f"{origin}: tensor '{name}' has dtype {e.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
        shape = [int(s) for s in e["shape"]]
        begin, end = (int(x) for x in e["data_offsets"])
        count = 1
        for s in shape:
            count *= s
        size = torch.tensor([], dtype=dtype).element_size()
        if not (0 <= begin <= end <= len(body)) or end - begin != count * size:
            raise ValueError(f"{origin}: tensor '{name}' has data_offsets [{begin}, {end}] that do not fit shape {shape}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            buf = bytearray(body[begin:end])  # a private, writable copy
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape).clone()
    return out, meta


def load_file(path):
    with open(path, "rb") as f:
        return read_bytes(f.read(), path)


def save_file(tensors, path, metadata=None):
    """Writes tensors (dict name -> tensor) in header order, without gaps."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _CODES:
            raise ValueError(f"tensor '{name}' has dtype {t.dtype}, which has no safetensors code")
        raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
