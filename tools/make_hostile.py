"""Writes tests/fixtures/hostile/: small files that try to make vlsm take gigabytes, hang,
run code or load wrong weights. Each is a few hundred bytes to ~100 KB; the tests expect a
clean one-line error for every one (and a load for the `ok_*` checkpoints).

Run: python tools/make_hostile.py  (needs torch, numpy, Pillow; see tools/make_fixtures.py)
"""

import io
import json
import os
import pickle
import struct
import zlib
from collections import OrderedDict

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hostile")


def write(name, data):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png(width, height, bit_depth, colour, raw_rows):
    """A PNG whose IDAT holds `raw_rows` (one filter byte per row included) deflated."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + png_chunk(b"IEND", b"")
    )


def images():
    # 30000×30000, 1-bit: the 109 KB bomb (all-zero rows compress ~1000:1).
    row = b"\x00" + b"\x00" * ((30000 + 7) // 8)
    write("bomb_30000x30000_1bit.png", png(30000, 30000, 1, 0, row * 30000))
    # 16-bit RGBA header declaring 30000×30000 with almost no data (8 bytes/pixel = 7.2 GB).
    write("bomb_rgba16_header.png", png(30000, 30000, 16, 6, b"\x00" * 64))
    # Just over the 64-megapixel budget, valid 1-bit data.
    row = b"\x00" + b"\x00" * ((8001 + 7) // 8)
    write("over_budget_8001x8000.png", png(8001, 8000, 1, 0, row * 8000))
    # TIFF: one strip, 30000×30000 RGBA 16-bit, 214 bytes or so.
    entries = [
        (256, 4, 1, 30000),  # ImageWidth
        (257, 4, 1, 30000),  # ImageLength
        (258, 3, 1, 16),  # BitsPerSample (one value, as many files write it)
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, 8),  # StripOffsets
        (277, 3, 1, 4),  # SamplesPerPixel
        (278, 4, 1, 30000),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
        (338, 3, 1, 2),  # ExtraSamples: unassociated alpha
    ]
    ifd_offset = 8 + 16
    tiff = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * 16
    tiff += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
        tiff += struct.pack("<HHI", tag, kind, count) + packed
    tiff += b"\x00\x00\x00\x00"
    write("bomb_30000x30000.tiff", tiff)
    # BMP, RLE8, 30000×30000, declared in the header, a few bytes of data.
    rle = b"\x00\x01"  # end of bitmap
    palette = b"\x00\x00\x00\x00" * 256
    header_size = 14 + 40 + len(palette)
    bmp = b"BM" + struct.pack("<IHHI", header_size + len(rle), 0, 0, header_size)
    bmp += struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    write("bomb_30000x30000_rle8.bmp", bmp + palette + rle)
    # JPEG: SOF0 declaring 30000×30000, three components, then an empty scan and EOI.
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 30000, 30000, 3)
    sof += b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 3 + 16 + 1) + b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"
    dht += b"\xff\xc4" + struct.pack(">H", 3 + 16 + 1) + b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00" + b"\x00\x3f\x00"
    write("bomb_30000x30000.jpg", b"\xff\xd8" + dqt + sof + dht + sos + b"\x00" * 32 + b"\xff\xd9")
    # A PNG declaring zero width and height.
    write("zero_size.png", png(0, 0, 8, 0, b""))


def tensor_bytes():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def checkpoints():
    # Real torch.save state dicts in every protocol torch.save accepts (1-5; 0 cannot
    # pickle torch's tuple persistent ids).
    for protocol in range(1, 6):
        buf = io.BytesIO()
        torch.save(OrderedDict(tensor_bytes()), buf, pickle_protocol=protocol)
        write(f"ok_protocol{protocol}.bin", buf.getvalue())
    # The legacy (pre-1.6) container.
    buf = io.BytesIO()
    torch.save(OrderedDict(tensor_bytes()), buf, _use_new_zipfile_serialization=False)
    write("ok_legacy.bin", buf.getvalue())

    class System:
        """Pickles as a call of os.system, as a malicious checkpoint does."""

        def __reduce__(self):
            return (os.system, ("echo pwned",))

    class Eval:
        def __reduce__(self):
            return (eval, ("1+1",))

    for name, payload in [
        ("evil_os_system.bin", System()),
        ("evil_eval.bin", Eval()),
    ]:
        buf = io.BytesIO()
        state = OrderedDict(tensor_bytes())
        state["extra"] = payload
        torch.save(state, buf)
        write(name, buf.getvalue())
    # Bare pickles, protocol 0 with INST and protocol 2 with GLOBAL.
    write("evil_inst_protocol0.bin", b"(S'echo pwned'\nios\nsystem\n.")
    write("evil_global_protocol2.bin", pickle.dumps({"w": System()}, protocol=2))


def safetensors_file(tensors, header_extra=None):
    """tensors: (name, dtype, shape, (begin, end)); data is end-of-last bytes of zeros."""
    header = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
        for name, dtype, shape, offsets in tensors
    }
    if header_extra:
        header.update(header_extra)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    end = max((o[1] for _, _, _, o in tensors), default=0)
    return struct.pack("<Q", len(text)) + text + b"\x00" * end


def safetensors():
    write(
        "st_overflow_shape.safetensors",
        safetensors_file([("w", "F32", [2**62, 2**62], (0, 16))]),
    )
    write(
        "st_shifted_offsets.safetensors",
        safetensors_file([("a", "F32", [2], (0, 8)), ("b", "F32", [2], (9, 17))]),
    )
    write(
        "st_overlap.safetensors",
        safetensors_file([("a", "F32", [4], (0, 16)), ("b", "F32", [2], (8, 16))]),
    )
    data = safetensors_file([("a", "F32", [4], (0, 16))])
    write("st_truncated.safetensors", data[:-4])
    write("st_header_past_end.safetensors", struct.pack("<Q", 1 << 40) + b"{}")


if __name__ == "__main__":
    images()
    checkpoints()
    safetensors()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.normpath(OUT)}")
