"""Make the img2dataset fixtures in this folder with the REAL img2dataset, as users' data is made.

What it does: draws 10 small pictures with Pillow (solid shapes, 64x64 to 200x150; JPEG and PNG, one CMYK
JPEG, one RGBA PNG, one JPEG with camera EXIF), serves them from a local `http.server` on 127.0.0.1 in a
thread together with one URL that answers 404 and one that serves HTML bytes under a `.jpg` name, writes
the URL list as Parquet (`url`, `caption`, `license`; captions as plain alt-text, one missing, one non-ASCII),
then runs `img2dataset.download` three times, once per output format, into

    webdataset/   00000.tar 00000.parquet 00000_stats.json  00001.tar ...
    parquet/      00000.parquet 00000_stats.json  00001.parquet ...
    files/        00000/{KEY}.jpg .txt .json  00000.parquet 00000_stats.json  00001/ ...

(12 URLs, 6 per shard: two shards per format; the 404 is in shard 00000, the non-image in shard 00001.)
Any run-level `*.json` other than the per-shard `NNNNN_stats.json` would be removed; img2dataset 1.47.0
writes none. The per-shard files are kept exactly as the tool writes them.

How to run it: img2dataset pins old dependencies, so install it in its OWN virtual environment (never in
the project's .venv), and run it from the repository root (not from a folder holding a `ray/` directory,
which img2dataset would import as the `ray` package):

    python3 -m venv /tmp/i2d
    /tmp/i2d/bin/pip install img2dataset==1.47.0 pillow
    /tmp/i2d/bin/python tests/data/img2dataset/make_fixtures.py

Options: `--port N` (default 18765, so that the `url` column is the same on every run; 0 picks a free
port) and `--out DIR` (default: this script's folder).

Deterministic enough: the pictures, URLs, keys, captions and the set of samples per shard are the same on
every run. What changes: the `duration`/`start_time`/`end_time` in `NNNNN_stats.json`, and the ORDER of the
samples inside a shard (img2dataset downloads with a thread pool and writes samples as they complete).
The JPEG bytes depend on the OpenCV build that img2dataset re-encodes with.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent

NOT_FOUND = "missing/IMG_0404.jpg"
NOT_AN_IMAGE = "not_an_image.jpg"


def _pictures() -> list[tuple[str, bytes, str | None, str | None]]:
    """(file name, bytes, caption, license) of every picture served, in URL-list order."""
    from PIL import Image, ImageDraw

    def canvas(size, background, mode="RGB"):
        image = Image.new(mode, size, background)
        return image, ImageDraw.Draw(image)

    def jpeg(image, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, **options)
        return buffer.getvalue()

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=False)
        return buffer.getvalue()

    out: list[tuple[str, bytes, str | None, str | None]] = []

    image, draw = canvas((64, 64), "white")
    draw.ellipse((12, 12, 52, 52), fill="red")
    out.append(("red_circle.jpg", jpeg(image), "red circle on white", "CC BY 4.0"))

    image, draw = canvas((200, 150), (30, 90, 200))
    draw.rectangle((60, 40, 140, 110), fill="yellow")
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS 5D"  # Model
    exif[0x0132] = "2019:07:14 10:21:33"  # DateTime
    out.append(("IMG_2031.JPG", jpeg(image, exif=exif.tobytes()), "IMG_2031.JPG", "unknown"))

    image, draw = canvas((120, 90), (240, 240, 230))
    draw.polygon([(60, 10), (110, 80), (10, 80)], fill="green")
    out.append(("green_triangle.png", png(image), "green triangle", "CC0"))

    image, draw = canvas((150, 100), (250, 235, 215))
    draw.rectangle((20, 60, 130, 90), fill=(120, 70, 30))
    draw.ellipse((55, 15, 95, 55), fill=(200, 30, 30))
    out.append(("cafe_paris.jpg", jpeg(image), "café à Paris", "CC BY-SA 2.0"))

    image, draw = canvas((100, 100), (0, 0, 0, 0), "RGBA")
    draw.rectangle((20, 20, 80, 80), fill=(0, 0, 255, 255))
    out.append(("logo_transparent.png", png(image), "blue square logo", None))

    image, draw = canvas((80, 120), (0, 0, 0, 0), "CMYK")  # CMYK: no ink; draw cyan and magenta
    draw.rectangle((10, 10, 70, 60), fill=(255, 0, 0, 0))
    draw.rectangle((10, 65, 70, 110), fill=(0, 255, 0, 0))
    out.append(("print_cmyk.jpg", jpeg(image), "Print-ready CMYK artwork", "All rights reserved"))

    image, draw = canvas((64, 64), (128, 128, 128))
    out.append(("grey.jpg", jpeg(image), None, "CC BY 4.0"))  # no alt-text at all

    image, draw = canvas((160, 120), "black")
    draw.ellipse((40, 20, 120, 100), outline="white", width=6)
    out.append(("ring.png", png(image.convert("L")), "white ring on black background", "CC0"))

    image, draw = canvas((96, 64), "orange")
    for x in range(0, 96, 16):
        draw.rectangle((x, 0, x + 7, 63), fill="purple")
    out.append(("stripes.jpg", jpeg(image), "purple & orange stripes | wallpaper 1080p", "CC BY-NC 3.0"))

    image, draw = canvas((128, 128), (255, 255, 255))
    draw.rectangle((0, 0, 63, 63), fill="black")
    draw.rectangle((64, 64, 127, 127), fill="black")
    out.append(("checker.png", png(image), "  checkerboard  ", "CC BY 4.0"))
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # `format`: the base class names it so
        pass


def _serve(root: Path, port: int) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _write_url_list(path: Path, rows: list[dict[str, str | None]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("license", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _tidy(folder: Path) -> None:
    """Remove run-level JSON (config, logs) that would embed temp paths or times; keep NNNNN_stats.json."""
    for path in folder.glob("*.json"):
        if not path.name.endswith("_stats.json"):
            path.unlink()
    shutil.rmtree(folder / "_tmp", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    from img2dataset import download

    with tempfile.TemporaryDirectory(prefix="i2d-fixtures-") as tmp:
        tmp_path = Path(tmp)
        site = tmp_path / "site"
        site.mkdir()
        pictures = _pictures()
        for name, data, _, _ in pictures:
            (site / name).write_bytes(data)
        (site / NOT_AN_IMAGE).write_bytes(b"<!doctype html><html><body>Hotlinking not allowed</body></html>\n")

        server = _serve(site, args.port)
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            rows = [{"url": f"{base}/{name}", "caption": caption, "license": lic} for name, _, caption, lic in pictures]
            rows.insert(3, {"url": f"{base}/{NOT_FOUND}", "caption": "broken link", "license": "CC BY 4.0"})
            rows.insert(9, {"url": f"{base}/{NOT_AN_IMAGE}", "caption": "hotlink protected", "license": "unknown"})
            url_list = tmp_path / "urls.parquet"
            _write_url_list(url_list, rows)

            for output_format in ("webdataset", "parquet", "files"):
                staging = tmp_path / output_format
                download(
                    url_list=str(url_list),
                    input_format="parquet",
                    url_col="url",
                    caption_col="caption",
                    save_additional_columns=["license"],
                    output_folder=str(staging),
                    output_format=output_format,
                    number_sample_per_shard=6,
                    processes_count=1,
                    thread_count=2,
                    image_size=64,
                    resize_mode="border",
                    encode_format="jpg",
                    enable_wandb=False,
                    retries=0,
                    timeout=5,
                )
                _tidy(staging)
                target = args.out / output_format
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(staging, target)
                print(f"wrote {target}: {sorted(p.name for p in target.iterdir())}")
        finally:
            server.shutdown()
            server.server_close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would look for a newer version online
    sys.exit(main())
