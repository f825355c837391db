"""`cnnlab data check --html FILE`: one self-contained page with a thumbnail of every image in every finding.

Thumbnails are the decoded pixels the cache holds (what the network sees), embedded as PNG; each section shows
at most SHOWN entries and says how many more the JSON lists. Written to a temporary name, then renamed.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from cnnlab.data import cache
from cnnlab.data.check import Findings, summary

SHOWN = 300
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h2{margin-top:1.6em}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start;border-top:1px solid #ddd;padding:.5em 0}
figure{margin:0;width:112px;font-size:11px;overflow-wrap:anywhere}img{width:96px;height:96px;
image-rendering:pixelated;object-fit:contain;background:#eee}.note{color:#555}pre{white-space:pre-wrap}
.bad{color:#b00020;font-weight:600}"""


def write_html(found: Findings, entry: cache.Entry, path: str | Path) -> Path:
    path = Path(path)
    thumbs = _Thumbnails(entry)
    parts = [f"<!doctype html><meta charset=utf-8><title>cnnlab data check</title><style>{STYLE}</style>",
             "<h1>Data check</h1>", f"<pre>{html.escape(summary(found))}</pre>"]
    parts += _section("Leaks: training images that are copies of held-out images", found.leaks,
                      lambda leak: [(leak["train"], "train copy"), (leak["held_out"], _how_close(leak))], thumbs)
    parts += _section("Conflicts: one image under several classes", found.conflicts,
                      lambda c: [(r, "") for r in c["images"]], thumbs)
    parts += _section("Likely label errors (most doubted first)", found.label_suspects,
                      lambda s: [(s, f"<span class=bad>{html.escape(s['label'])}</span> → "
                                     f"{html.escape(s['suggested'])} (quality {s['quality']:.2f})")], thumbs)
    parts += _section("Duplicates: groups of copies", found.duplicates,
                      lambda d: [(r, "identical" if d["exact"] else "") for r in d["images"]], thumbs)
    for title, items in (("Tiny images", found.tiny), ("Extreme aspect ratios", found.aspect),
                         ("Grey images in a colour set", found.grey)):
        parts += _section(title, items, lambda r: [(r, "x".join(map(str, r["size"])) if "size" in r else "")],
                          thumbs, per_row=8)
    if found.unreadable:
        parts += ["<h2>Unreadable files</h2><ul>"] + [f"<li>{html.escape(u)}" for u in found.unreadable] + ["</ul>"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path


def _how_close(leak: dict) -> str:
    return f"{leak['held_out']['split']}, " + ("identical" if leak["exact"] else f"{leak['bits']} bits apart")


def _section(title: str, items: list, figures, thumbs: _Thumbnails, per_row: int = 1) -> list[str]:
    if not items:
        return []
    out = [f"<h2>{html.escape(title)}: {len(items):,}</h2>"]
    shown = items[:SHOWN]
    for lo in range(0, len(shown), per_row):
        cells = [thumbs.figure(ref, caption) for item in shown[lo:lo + per_row] for ref, caption in figures(item)]
        out.append("<div class=row>" + "".join(cells) + "</div>")
    if len(items) > SHOWN:
        out.append(f"<p class=note>and {len(items) - SHOWN:,} more: see --json</p>")
    return out


class _Thumbnails:
    def __init__(self, entry: cache.Entry):
        self.entry, self.pixels = entry, {}

    def figure(self, ref: dict, caption: str) -> str:
        name = ref["file"] or f"{ref['split']} #{ref['index']}"
        return (f"<figure><img src='data:image/png;base64,{self.png(ref['split'], ref['index'])}' "
                f"alt='{html.escape(name)}'><figcaption>{html.escape(name)}<br>{html.escape(ref['label'])}"
                f"{'<br>' + caption if caption else ''}</figcaption></figure>")

    def png(self, split: str, index: int) -> str:
        from PIL import Image

        if split not in self.pixels:
            self.pixels[split] = self.entry.images(split)
        a = np.asarray(self.pixels[split][index])
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()
