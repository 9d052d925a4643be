"""Image + caption sources: where samples come from, before any preprocessing.

A source lists `Sample`s (id, where the image bytes are, captions as {field: (caption, ...)}) and decodes
images on demand. Problems found while listing (a missing caption, an empty caption file, a metadata row
naming a missing file) are logged with their path and then skipped (``on_error="skip"``, recorded in
``source.problems``) or raised as a one-line `FormatError` (``on_error="raise"``).

Kinds: `ImageFolderSource` (metadata.jsonl / metadata.csv), `TextCaptionSource` (same-stem .txt files),
`WebDatasetSource` (.tar shards read with the stdlib tarfile), `ClassFolderSource` (root/<class>/*.png and a
template), `ManifestSource` (the jsonl written by `rectiflow data check --write-manifest`), `ArraySource` (in
memory images, e.g. the shapes world). `open_source(path)` picks one by looking at the path.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rectiflow.data.captions import DEFAULT_TEMPLATE, class_caption
from rectiflow.data.transforms import decode_image, image_size
from rectiflow.errors import ConfigError, FormatError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("text", "caption", "prompt")  # tried in this order when no caption column is named
ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class Problem:
    """Something wrong with one sample: kind (see check.KINDS), where (a path, or shard#member) and detail."""

    kind: str
    location: str
    detail: str

    def __str__(self) -> str:
        return f"{self.location}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Sample:
    """One image and its captions. `member`/`offset`/`length` locate the bytes inside a tar shard."""

    id: str
    path: str
    captions: dict[str, tuple[str, ...]]
    member: str | None = None
    offset: int = 0
    length: int = -1

    @property
    def location(self) -> str:
        return f"{self.path}#{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.member is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.length)

    def to_json(self, relative_to: Path | None = None) -> dict:
        path = os.path.relpath(self.path, relative_to) if relative_to is not None else self.path
        row = {"id": self.id, "image": path, "captions": {k: list(v) for k, v in self.captions.items()}}
        if self.member is not None:
            row.update(member=self.member, offset=self.offset, length=self.length)
        return row


def _captions_from(value, field_name: str) -> tuple[str, ...]:
    """Captions from a metadata value: a string (one caption) or a list of strings; blanks dropped."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(" ".join(str(v).split()) for v in values if str(v).strip())


class Source:
    """A list of samples plus the problems met while listing them."""

    kind = "source"

    def __init__(self, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error={on_error!r}; use one of {ON_ERROR}")
        self.on_error = on_error
        self.samples: list[Sample] = []
        self.problems: list[Problem] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def read_bytes(self, i: int) -> bytes:
        return self.samples[i].read_bytes()

    def load_image(self, i: int):
        """Sample i as an RGB PIL image; raises one of transforms.IMAGE_ERRORS if it cannot be decoded."""
        return decode_image(self.read_bytes(i))

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample i, reading the header only."""
        return image_size(self.read_bytes(i))

    def describe(self) -> dict:
        return {"kind": self.kind}

    def add_trigger(self, trigger: str) -> None:
        """Put a LoRA trigger word into every caption (rectiflow.data.captions.add_trigger)."""
        from dataclasses import replace

        from rectiflow.data.captions import add_trigger

        self.samples = [replace(s, captions={f: tuple(add_trigger(c, trigger) for c in caps)
                                             for f, caps in s.captions.items()}) for s in self.samples]

    def report(self, kind: str, location: str, detail: str) -> None:
        """Log a problem; raise it if on_error == "raise", else remember it and go on."""
        problem = Problem(kind, location, detail)
        if self.on_error == "raise":
            raise FormatError(f"{problem} (fix it, or skip such samples with on_error='skip')")
        log.warning("skipping %s", problem)
        self.problems.append(problem)

    def _add(self, sample: Sample, empty_kind: str = "missing_caption", detail: str = "no caption") -> None:
        if any(sample.captions.values()):
            self.samples.append(sample)
        else:
            self.report(empty_kind, sample.location, detail)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _stem_id(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


class ImageFolderSource(Source):
    """A folder of images with metadata.jsonl or metadata.csv (Hugging Face "imagefolder" layout): a
    `file_name` column and one or more caption columns (string, or a list of strings in jsonl)."""

    kind = "imagefolder"

    def __init__(self, root, caption_columns: Sequence[str] | None = None, on_error: str = "skip"):
        super().__init__(on_error)
        self.root = Path(root)
        rows = self._read_metadata()
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
        if caption_columns is None:
            found = [c for c in CAPTION_COLUMNS if c in columns]
            if not found:
                raise FormatError(f"{self.metadata}: no caption column among {sorted(columns)}; name one "
                                  "with caption_columns / --caption-column")
            caption_columns = found[:1]
        missing = [c for c in caption_columns if c not in columns]
        if missing:
            raise FormatError(f"{self.metadata}: caption column(s) {missing} not found; columns are "
                              f"{sorted(columns)}")
        self.caption_columns = tuple(caption_columns)
        listed = set()
        for row in rows:
            name = row.get("file_name")
            if not name:
                self.report("missing_image", str(self.metadata), f"row without file_name: {row}")
                continue
            path = self.root / name
            listed.add(path.resolve())
            if not path.is_file():
                self.report("missing_image", str(path), "listed in metadata but not found")
                continue
            caps = {c: _captions_from(row.get(c), c) for c in self.caption_columns}
            self._add(Sample(_stem_id(self.root, path), str(path), caps))
        for path in _images_in(self.root, recursive=True):
            if path.resolve() not in listed:
                self.report("missing_caption", str(path), f"image has no row in {self.metadata.name}")

    def _read_metadata(self) -> list[dict]:
        jsonl, csv_path = self.root / "metadata.jsonl", self.root / "metadata.csv"
        if jsonl.is_file():
            self.metadata = jsonl
            rows = []
            for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise FormatError(f"{jsonl}:{n}: not valid JSON ({e.msg}); fix the line") from None
            return rows
        if csv_path.is_file():
            self.metadata = csv_path
            with open(csv_path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        raise FormatError(f"{self.root}: no metadata.jsonl or metadata.csv; add one with file_name + caption "
                          "columns")

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "caption_columns": list(self.caption_columns)}


class TextCaptionSource(Source):
    """Images with a same-stem .txt file; each non-empty line of it is one caption (field "caption")."""

    kind = "txt"

    def __init__(self, root, recursive: bool = True, on_error: str = "skip"):
        super().__init__(on_error)
        self.root = Path(root)
        for path in _images_in(self.root, recursive):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                self.report("missing_caption", str(path), f"no caption file {txt.name}")
                continue
            text = txt.read_text(encoding="utf-8")
            lines = tuple(" ".join(s.split()) for s in text.splitlines() if s.strip())
            self._add(Sample(_stem_id(self.root, path), str(path), {"caption": lines}), "empty_caption",
                      f"caption file {txt.name} is empty")

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root)}


class ClassFolderSource(Source):
    """root/<class>/*.png, captioned by a template such as "a photo of a {class}" (field "caption")."""

    kind = "classes"

    def __init__(self, root, template: str = DEFAULT_TEMPLATE, on_error: str = "skip"):
        super().__init__(on_error)
        self.root, self.template = Path(root), template
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise FormatError(f"{self.root}: no class folders; expected root/<class>/<image>")
        for name in self.classes:
            caption = class_caption(name, template)
            for path in _images_in(self.root / name, recursive=True):
                self._add(Sample(_stem_id(self.root, path), str(path), {"caption": (caption,)}))

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "template": self.template}


class WebDatasetSource(Source):
    """WebDataset .tar shards: files grouped into samples by key (the member path up to the first dot of its
    basename), an image (.jpg/.jpeg/.png/.webp) plus a .txt (one caption per line, field "caption") and/or a
    .json whose `caption_keys` (default "caption"/"text", whichever exist) are caption fields."""

    kind = "webdataset"

    def __init__(self, shards: Sequence, caption_keys: Sequence[str] | None = None, on_error: str = "skip"):
        super().__init__(on_error)
        self.shards = [str(s) for s in shards]
        self.caption_keys = tuple(caption_keys) if caption_keys else None
        for shard in self.shards:
            self._read_shard(shard)

    def _read_shard(self, shard: str) -> None:
        try:
            with tarfile.open(shard, "r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            self.report("unreadable", shard, f"not a readable uncompressed tar ({e})")
            return
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            folder, base = os.path.split(m.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
        with open(shard, "rb") as f:
            for key, files in groups.items():
                self._add_group(shard, f, key, files)

    def _add_group(self, shard: str, f, key: str, files: dict) -> None:
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        location = f"{shard}#{key}"
        if image_ext is None:
            self.report("missing_image", location, f"sample has no image (files: {sorted(files)})")
            return
        caps: dict[str, tuple[str, ...]] = {}
        if "txt" in files:
            f.seek(files["txt"].offset_data)
            text = f.read(files["txt"].size).decode("utf-8", errors="replace")
            caps["caption"] = tuple(" ".join(s.split()) for s in text.splitlines() if s.strip())
        if "json" in files:
            f.seek(files["json"].offset_data)
            try:
                meta = json.loads(f.read(files["json"].size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
                where = f"{shard}#{files['json'].name}"
                self.report("bad_metadata", where, "not valid JSON; captions ignored")
            keys = self.caption_keys or [k for k in ("caption", "text") if k in meta]
            for k in keys:
                if isinstance(meta, dict) and k in meta:
                    caps[k] = _captions_from(meta[k], k)
        m = files[image_ext]
        sample = Sample(key, shard, caps, member=m.name, offset=m.offset_data, length=m.size)
        if not caps:
            self.report("missing_caption", sample.location, "no .txt or caption field in .json")
        else:
            self._add(sample, "empty_caption", "caption is empty")

    def describe(self) -> dict:
        return {"kind": self.kind, "shards": self.shards,
                "caption_keys": list(self.caption_keys) if self.caption_keys else None}


class ManifestSource(Source):
    """The jsonl manifest written by `rectiflow data check --write-manifest` (paths relative to it)."""

    kind = "manifest"

    def __init__(self, path, on_error: str = "skip"):
        super().__init__(on_error)
        self.path = Path(path)
        base = self.path.parent
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
                caps = {k: _captions_from(v, k) for k, v in row["captions"].items()}
                sample = Sample(str(row["id"]), str(base / image), caps, row.get("member"),
                                int(row.get("offset", 0)), int(row.get("length", -1)))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise FormatError(f"{self.path}:{n}: not a manifest row ({e!r}); regenerate it with "
                                  "`rectiflow data check --write-manifest`") from None
            self._add(sample)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path)}


class ArraySource(Source):
    """In-memory samples: `n` items from `get(i) -> (image uint8 [H, W, 3], {field: [captions]}, id)`."""

    kind = "arrays"

    def __init__(self, n: int, get: Callable, name: str = "arrays", meta: dict | None = None):
        super().__init__("raise")
        self.get, self.name, self.meta = get, name, dict(meta or {})
        for i in range(n):
            _, caps, sid = get(i)
            captions = {k: _captions_from(list(v), k) for k, v in caps.items()}
            self._add(Sample(str(sid), f"{name}[{i}]", captions))

    def load_image(self, i: int):
        from PIL import Image

        return Image.fromarray(self.get(i)[0]).convert("RGB")

    def image_size(self, i: int) -> tuple[int, int]:
        h, w = self.get(i)[0].shape[:2]
        return w, h

    def read_bytes(self, i: int) -> bytes:
        import io

        buf = io.BytesIO()
        self.load_image(i).save(buf, format="PNG")  # lossless
        return buf.getvalue()

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "n": len(self), **self.meta}


def shapes_source(world, n: int) -> ArraySource:
    """The first `n` items of a `rectiflow.data.shapes.ShapesWorld` as a source: field "caption" holds the
    item's captions (primary first)."""

    def get(i: int):
        item = world[i]
        caps = [item.caption, *[c for c in item.captions if c != item.caption]]
        return item.image, {"caption": caps}, f"shapes-{i:06d}"

    meta = {"world": type(world).__name__, "seed": getattr(world, "seed", None),
            "size": getattr(world, "size", None)}
    return ArraySource(n, get, name="shapes", meta=meta)


def open_source(path, *, kind: str | None = None, caption_columns: Sequence[str] | None = None,
                template: str | None = None, on_error: str = "skip") -> Source:
    """Open `path` as a source, guessing its kind unless `kind` is given ("imagefolder", "txt", "webdataset",
    "classes", "manifest")."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    kind = kind or _guess_kind(p, template)
    if kind == "manifest":
        return ManifestSource(p, on_error)
    if kind == "webdataset":
        shards = [p] if p.is_file() else sorted(p.glob("*.tar"))
        return WebDatasetSource(shards, caption_columns, on_error)
    root = p.parent if p.is_file() else p
    if kind == "imagefolder":
        return ImageFolderSource(root, caption_columns, on_error)
    if kind == "classes":
        return ClassFolderSource(root, template or DEFAULT_TEMPLATE, on_error)
    if kind == "txt":
        return TextCaptionSource(root, on_error=on_error)
    raise ConfigError(f"unknown source kind {kind!r}; use imagefolder, txt, webdataset, classes or manifest")


def _guess_kind(p: Path, template: str | None) -> str:
    if p.is_file():
        if p.name in ("metadata.jsonl", "metadata.csv"):
            return "imagefolder"
        if p.suffix == ".jsonl":
            return "manifest"
        if p.suffix == ".tar":
            return "webdataset"
        raise FormatError(f"{p}: cannot tell what dataset this is; pass a folder, a .tar shard or a "
                          "manifest .jsonl")
    if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file():
        return "imagefolder"
    if any(p.glob("*.tar")):
        return "webdataset"
    if template is not None:
        return "classes"
    top_images = _images_in(p, recursive=False)
    if not top_images and any(_images_in(d, True) for d in p.iterdir() if d.is_dir()) \
            and not any(p.rglob("*.txt")):
        return "classes"
    if _images_in(p, recursive=True):
        return "txt"
    raise FormatError(f"{p}: no images, metadata or .tar shards found; see docs for the supported layouts")
