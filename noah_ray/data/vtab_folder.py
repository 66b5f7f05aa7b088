"""Writing a task in the VTAB-1k folder layout, atomically (used by the generated and mini-VTAB tasks).

``<root>/<name>/images/<split>/<i>.png`` plus ``train800.txt``, ``val200.txt``,
``train800val200.txt`` (their concatenation) and ``test.txt`` with ``path label`` lines, and a
``.generated`` stamp naming what was written.  The folder is built beside the target and moved
into place, so concurrent writers and crashes never leave a half-written task; a complete
earlier write with the same stamp is reused, one with another stamp replaced.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

SPLITS = ("train800", "val200", "test")
#: ``split -> [(image, label), ...]``
SplitRenderer = Callable[[str], Iterable[tuple[Image.Image, int]]]


def read_stamp(folder: Path) -> str | None:
    try:
        return (folder / ".generated").read_text()
    except OSError:
        return None


def write_vtab_folder(root: str | Path, name: str, stamp: str, render: SplitRenderer) -> Path:
    """Write task ``name`` under ``root`` (unless the same ``stamp`` is there); returns its folder."""
    root = Path(root).expanduser()
    out = root / name
    if read_stamp(out) == stamp:
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    tmp.chmod(0o755)
    try:
        lines: dict[str, list[str]] = {}
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            rows = []
            for i, (img, y) in enumerate(render(split)):
                rel = f"images/{split}/{i:05d}.png"
                img.save(tmp / rel)
                rows.append(f"{rel} {int(y)}")
            lines[split] = rows
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, rows in lines.items():
            (tmp / f"{split}.txt").write_text("\n".join(rows) + "\n")
        (tmp / ".generated").write_text(stamp)
        return _move_into_place(tmp, out, root, name, stamp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, root: Path, name: str, stamp: str) -> Path:
    if read_stamp(out) == stamp:          # another writer finished first
        return out
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=root))
        out.rename(old / name)
    try:
        tmp.rename(out)
    except OSError:
        if read_stamp(out) != stamp:      # lost a race to a writer with other arguments
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
