"""The chat page bundle in the package is the one web/ builds (no browser, no Node.js needed to check)."""

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "src" / "qwen15" / "serve" / "web"


def test_bundle_was_built_from_the_sources_in_web():
    """web/build.mjs writes this fingerprint; a change under web/ without `npm run build` fails here."""
    src = ROOT / "web"
    names = sorted(["build.mjs", "package.json", "package-lock.json", *(f"src/{p.name}" for p in (src / "src").iterdir())])
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    recorded = (WEB / "ui" / "SOURCES.sha256").read_text().strip()
    assert recorded == h.hexdigest(), "web/ changed since the bundle was built: run `cd web && npm ci && npm run build`"


def test_page_references_only_shipped_files_and_woff2_fonts():
    page = (WEB / "index.html").read_text()
    assets = re.findall(r'(?:src|href)="(ui/[^"]+)"', page)
    assert len(assets) == 2 and all((WEB / a).is_file() for a in assets), assets
    (css_name,) = [a for a in assets if re.fullmatch(r"ui/app-\w+\.css", a)]
    assert [a for a in assets if re.fullmatch(r"ui/app-\w+\.js", a)]
    css = (WEB / css_name).read_text()
    fonts = [f.strip("\"'") for f in re.findall(r"url\(([^)]+)\)", css)]
    assert fonts and all(f.endswith(".woff2") and (WEB / "ui" / f).is_file() for f in fonts)
