"""Image inputs: every kind a user has, every PIL mode to RGB, EXIF orientation, and the loading errors."""
from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lfm2vl.processor.io import load_image

RGB = np.random.RandomState(0).randint(0, 256, (20, 30, 3), dtype=np.uint8)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_all_input_kinds_agree(tmp_path):
    im = Image.fromarray(RGB)
    data = _png_bytes(im)
    (tmp_path / "a.png").write_bytes(data)
    expect = torch.from_numpy(RGB).permute(2, 0, 1)
    b64 = base64.b64encode(data).decode()
    for src in [im, RGB, torch.from_numpy(RGB).permute(2, 0, 1), torch.from_numpy(RGB), data, bytearray(data),
                str(tmp_path / "a.png"), tmp_path / "a.png", "data:image/png;base64," + b64, b64]:
        out = load_image(src)
        assert out.dtype == torch.uint8 and out.shape == (3, 20, 30), type(src)
        assert torch.equal(out, expect), type(src)


def test_http_url(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(Image.fromarray(RGB)))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert torch.equal(load_image(url + "/a.png"), torch.from_numpy(RGB).permute(2, 0, 1))
        with pytest.raises(ValueError, match="could not fetch"):
            load_image(url + "/missing.png")
    finally:
        srv.shutdown()


def test_modes_to_rgb():
    g = Image.fromarray(RGB).convert("L")
    out = load_image(g)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], torch.from_numpy(np.array(g)))
    rgba = np.dstack([RGB, np.zeros((20, 30), np.uint8)])
    rgba[0, 0, 3] = 255
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert (out[:, 1:, :] == 255).all() and torch.equal(out[:, 0, 0], torch.from_numpy(RGB[0, 0]))  # white bg
    out_np = load_image(rgba)  # arrays: transformers' float compositing, same result here
    assert torch.equal(out_np, out)
    la = Image.fromarray(RGB).convert("LA")
    assert load_image(la).shape == (3, 20, 30)
    p = Image.fromarray(RGB).convert("P")
    assert torch.equal(load_image(p), torch.from_numpy(np.array(p.convert("RGB"))).permute(2, 0, 1))
    pt = Image.fromarray(RGB).convert("P")
    pt.info["transparency"] = int(np.asarray(pt)[0, 0])
    assert (load_image(pt)[:, 0, 0] == 255).all()  # transparent palette entry -> white
    cmyk = Image.fromarray(RGB).convert("CMYK")
    assert torch.equal(load_image(cmyk), torch.from_numpy(np.array(cmyk.convert("RGB"))).permute(2, 0, 1))
    ycc = Image.fromarray(RGB).convert("YCbCr")
    assert load_image(ycc).shape == (3, 20, 30)
    one = Image.fromarray(RGB).convert("1")
    assert set(load_image(one).unique().tolist()) <= {0, 255}


def test_16bit_and_float_are_scaled():
    a16 = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    im = Image.fromarray(a16)
    assert im.mode.startswith("I;16")
    out = load_image(im)
    assert torch.equal(out[0], torch.from_numpy(np.rint(a16 / 257.0).astype(np.uint8)))
    f = RGB.astype(np.float32) / 255
    assert torch.equal(load_image(f), torch.from_numpy(RGB).permute(2, 0, 1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(f * 255)


def test_exif_orientation(tmp_path):
    im = Image.fromarray(RGB)
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=ex)
    out = load_image(buf.getvalue())
    assert out.shape == (3, 30, 20)
    assert torch.equal(out, torch.from_numpy(RGB).permute(2, 0, 1).rot90(-1, dims=(1, 2)))


def _huge_png_header(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty image file"):
        load_image(str(tmp_path / "empty.png"))
    data = _png_bytes(Image.fromarray(RGB))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(str(tmp_path / "cut.png"))
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ValueError, match="unsupported or corrupt image format"):
        load_image(str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(_huge_png_header(30000, 30000))
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(data, max_pixels=100)
    with pytest.raises(ValueError, match="zero-sized"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="zero-sized"):
        load_image(torch.zeros(3, 5, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not an existing file"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="unsupported image input"):
        load_image(12345)
    with pytest.raises(ValueError, match="channel axis"):
        load_image(np.zeros((10, 10, 7), np.uint8))


def test_processor_surfaces_loading_errors(tmp_path):
    import processor_cases as pc
    from lfm2vl.processor import Processor
    p = Processor.from_pretrained(pc.write_checkpoint(tmp_path / "ck", "v25"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty image file"):
        p(text="<image>", images=[str(tmp_path / "empty.jpg")])


def test_decode_image_bytes_checks_format_and_size_before_decoding():
    """The one decoder of encoded images (the server's too): a refused format or size is a typed ValueError, raised
    from the header alone."""
    from lfm2vl.processor.io import ImageFormatError, ImageTooLargeError, decode_image_bytes

    bmp = io.BytesIO()
    Image.fromarray(RGB).save(bmp, format="BMP")
    with pytest.raises(ImageFormatError, match="format BMP, not one of GIF, PNG"):
        decode_image_bytes(bmp.getvalue(), formats={"PNG", "GIF"})
    with pytest.raises(ImageTooLargeError, match="3000x3000 = 9000000 pixels, over the limit of 1000"):
        decode_image_bytes(_huge_png_header(3000, 3000), max_pixels=1000)  # the header lies: there are no pixels
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0)]]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    im = decode_image_bytes(gif.getvalue(), formats={"GIF"})
    assert im.format == "GIF" and im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("image, says", [
    (np.full((10, 10, 3), np.nan), r"float image values must lie in \[0, 1\], got NaN"),
    (np.zeros((10, 10, 3), np.complex128), "dtype complex128 is not supported: expected bool, integer or real"),
    (torch.zeros(3, 10, 10, dtype=torch.complex64), r"complex values \(torch.complex64\) is not supported"),
    (np.array([[object()]]), "dtype object is not supported"),
    (torch.zeros(3, 10, 10, device="meta"), "got a meta-device tensor"),
])
def test_arrays_without_real_pixel_values_are_refused(image, says):
    with pytest.raises(ValueError, match=says):
        load_image(image)


def test_read_only_buffers_load_without_a_torch_warning(recwarn):
    """A read-only numpy array and a 32-bit float TIFF (PIL hands out a read-only buffer) are copied, not shared
    with torch, so torch's "not writable" warning never reaches the user's terminal."""
    a = (RGB.astype(np.float32) / 255)
    a.flags.writeable = False
    tiff = io.BytesIO()
    Image.fromarray(a[..., 0], mode="F").save(tiff, format="TIFF")
    assert torch.equal(load_image(a), load_image(RGB))
    assert load_image(tiff.getvalue()).shape == (3, *RGB.shape[:2])
    assert not [w for w in recwarn if "writable" in str(w.message)]


@pytest.mark.parametrize("source, says", [
    ("", "the image path is empty"),
    ("data:image/png;base64,@@@", r"the data: URI's base64 payload is invalid .*: '@@@'"),
    ("data:image/png,rawbytes", r"is not base64 data: expected 'data:<type>;base64,<payload>'"),
    ("notadict", r"image string 'notadict' is not an existing file, an http\(s\) URL or a data: URI, and not "
                 "base64 data of a supported image"),
])
def test_image_strings_say_what_is_wrong_with_them(source, says):
    with pytest.raises(ValueError, match=says):
        load_image(source)
