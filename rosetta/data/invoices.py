"""The built-in documents: invoices and receipts rendered with varied layouts, fonts, sizes, a slight rotation
and noise, each with the fields printed on it — for evaluating extraction without a download.

    OUT/images/<key>.png and <key>.json (its fields), OUT/test.jsonl ({"image", "fields", "layout"}),
    OUT/schema.json (the fields' JSON Schema)

Same arguments, same documents.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from rosetta.data.records import write_manifest

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "description": "who issued the document"},
        "invoice_number": {"type": "string", "description": "invoice number, receipt number"},
        "date": {"type": "string", "format": "date", "description": "date issued, YYYY-MM-DD"},
        "total": {"type": "number", "description": "total amount due"},
    },
    "required": ["vendor", "invoice_number", "date", "total"],
    "additionalProperties": False,
}
VENDORS = ("Acme Supplies", "Blue River Cafe", "Northwind Traders", "Globex Corp", "Initech Ltd", "Umbrella Foods",
           "Stark Hardware", "Wayne Books", "Oceanic Travel", "Soylent Market", "Vandelay Imports", "Hooli Office")
ITEMS = ("Paper A4", "Coffee beans", "Stapler", "Printer ink", "Notebook", "Desk lamp", "USB cable", "Tea box",
         "Chair mat", "Markers", "Envelopes", "Water 6-pack")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "LiberationSans-Regular.ttf",
         "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%B %d, %Y", "%d %b %Y", "%d.%m.%Y")
LAYOUTS = ("invoice-right", "invoice-below", "receipt")


def make_invoices(out: str | Path, n: int, seed: int = 0) -> int:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        layout = LAYOUTS[i % len(LAYOUTS)]  # every layout as often
        image, fields = render(rng, layout)
        key = f"doc-{i:06d}"
        image.save(out / "images" / f"{key}.png")
        (out / "images" / f"{key}.json").write_text(json.dumps(fields) + "\n")
        records.append({"key": key, "image": f"images/{key}.png", "fields": fields, "layout": layout})
    write_manifest(records, out / "test.jsonl")
    (out / "schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")
    return n


def _font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = FONTS[rng.integers(len(FONTS))]
    for folder in FONT_DIRS:
        if (folder / name).exists():
            return ImageFont.truetype(str(folder / name), size)
    return ImageFont.load_default(size)  # no TrueType fonts installed: Pillow's own


def render(rng: np.random.Generator, layout: str) -> tuple[Image.Image, dict[str, Any]]:
    """One document in `layout` and its fields."""
    vendor = VENDORS[rng.integers(len(VENDORS))]
    number = f"{['INV', 'NO', 'A', 'R'][rng.integers(4)]}-{rng.integers(1000, 99999)}"
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 2000)))
    items = [(ITEMS[j], int(rng.integers(1, 5)), round(float(rng.uniform(1, 200)), 2))
             for j in rng.choice(len(ITEMS), size=int(rng.integers(1, 5)), replace=False)]
    total = round(sum(q * p for _, q, p in items), 2)
    fields = {"vendor": vendor, "invoice_number": number, "date": day.isoformat(), "total": total}
    size = int(rng.integers(18, 30))
    font, big = _font(rng, size), _font(rng, int(size * 1.6))
    width = int(rng.integers(800, 1100)) if layout != "receipt" else int(rng.integers(520, 700))
    page = Image.new("L", (width, 1400), 255)
    draw = ImageDraw.Draw(page)
    x, y, line = 40, 40, int(size * 1.7)
    date_text = day.strftime(DATE_FORMATS[rng.integers(len(DATE_FORMATS))])
    money = "{:,.2f}".format
    draw.text((x, y), vendor, font=big, fill=0)
    y += int(line * 1.8)
    if layout == "receipt":
        draw.text((x, y), f"Receipt No: {number}", font=font, fill=0)
        draw.text((x, y + line), f"Date: {date_text}", font=font, fill=0)
        y += 3 * line
    else:
        draw.text((x, y), "INVOICE", font=big, fill=0)
        y += int(line * 1.6)
        pairs = (("Invoice Number", number), ("Date", date_text))
        for label, value in pairs:
            if layout == "invoice-right":
                draw.text((x, y), f"{label}:", font=font, fill=0)
                draw.text((x + int(size * 10), y), value, font=font, fill=0)
                y += line
            else:  # the value under its label
                draw.text((x, y), label, font=font, fill=0)
                draw.text((x, y + line), value, font=font, fill=0)
                y += int(line * 2.4)
        y += line
    for name, quantity, price in items:
        draw.text((x, y), f"{quantity} x {name}", font=font, fill=0)
        draw.text((width - 40 - int(size * 6), y), money(quantity * price), font=font, fill=0)
        y += line
    y += line // 2
    draw.line((x, y, width - 40, y), fill=0, width=2)
    y += line // 2
    draw.text((x, y), "TOTAL" if layout == "receipt" else "Total Due:", font=font, fill=0)
    draw.text((width - 40 - int(size * 6), y), f"${money(total)}", font=font, fill=0)
    page = page.crop((0, 0, width, y + 3 * line))
    # Scanned: a slight rotation, a little blur, grain.
    page = page.rotate(float(rng.uniform(-1.5, 1.5)), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    page = page.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.6))))
    grain = rng.normal(0, float(rng.uniform(2, 10)), (page.height, page.width))
    page = Image.fromarray(np.clip(np.asarray(page, np.float32) + grain, 0, 255).astype(np.uint8))
    return page.convert("RGB"), fields
