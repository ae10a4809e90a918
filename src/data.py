"""Read the Kaggle dog photos once: find the layout, parse the VOC boxes, crop every dog to a uint8 tensor, and
squash every whole photo to 64x64 as Kaggle's MiFID reference did."""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import stat
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from src.console import log


def lanczos_square(image: Image.Image, size: int = 64) -> np.ndarray:
    """An RGB PIL image squashed to size x size as Kaggle's evaluator did (resize with Image.ANTIALIAS, i.e.
    Lanczos; a no-op at size) -> uint8 3 x size x size. The one definition: the MiFID reference photos and
    src.mifid's resize of any image both use it."""
    return np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.uint8).transpose(2, 0, 1)


class DataError(ValueError):
    """The data folder cannot be used (missing, empty, nothing loadable); the message says what was looked for."""


# Kaggle's all-dogs holds .jpg files (a few of them really PNGs: PIL sniffs the content, not the name).
DOG_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Below this many photos a process pool costs more than it saves.
DOG_POOL_MIN_PHOTOS = 512
# Folders (and zips, with .zip) that hold the VOC files, in any case: Kaggle's Annotation, PASCAL VOC's Annotations.
DOG_ANNOTATION_FOLDER_NAMES = ("annotation", "annotations")
# Stanford's breed folders: <wnid>-<Breed>, e.g. n02085620-Chihuahua.
DOG_BREED_FOLDER = re.compile(r"n\d+-.+")
# Skipped files named in the log before the rest are only counted.
DOG_SKIP_LOG_LIMIT = 5
# JPEG's largest dimension: a VOC <size> above it is no real photo's size.
DOG_MAX_SIDE = 65535
# Boxes may run past their VOC <size> by this fraction (+ 2 px) before the size is distrusted; Stanford's two boxes
# past the edge overshoot by 2.2 % and 5.6 %.
DOG_BOX_SLACK = 0.1
# A VOC <size> whose aspect ratio is within this fraction of the photo's, beyond a pixel of rounding on each side,
# describes a resized copy of it.
DOG_ASPECT_TOLERANCE = 0.02
# min_box never asks for more than this fraction of the photo's shortest side: a small photo's one dog is kept.
DOG_MIN_BOX_PHOTO_FRACTION = 0.5
DOG_EXIF_ORIENTATION = 0x0112
DOG_JPEG_END_MARKER = b"\xff\xd9"
DOG_JPEG_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
DOG_JPEG_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}


@dataclass(frozen=True)
class DogCropSettings:
    """How a photo becomes samples; sent to every decode worker."""
    margin: float = 0.0           # widen each box by this fraction of its size on every side
    size: int = 64                # side of the square crops and of the whole-photo images
    min_box: int = 0              # drop boxes whose shortest side is under this many px (see _dog_min_side)
    whole_photos: bool = False    # also return each whole photo squashed to size x size (MiFID reference, training)


# ---- sources: a folder on disk, a .zip read in place, or a folder inside such a zip ---------------------
# A "source" is just a path string: a folder, a .zip file whose entries are read without extracting, or
# 'x.zip/all-dogs' (the entries of x.zip under all-dogs/; a --data-dir that is one zip of the Kaggle layout).

def _dog_zip_and_folder(source: str) -> tuple[str, str] | None:
    """(zip file, folder inside it: '' or 'a/b/') when the source is a zip or a folder inside one, else None."""
    head, inner = source, []
    while head:
        if head.lower().endswith(".zip") and os.path.isfile(head):
            return head, "".join(f"{part}/" for part in reversed(inner))
        parent, tail = os.path.split(head)
        if parent == head or not tail:
            return None
        inner.append(tail)
        head = parent
    return None


# One open ZipFile per (process, zip): forked workers must not share the parent's file offset.
_DOG_ZIP_HANDLES: dict = {}


def _dog_zip(path: str) -> zipfile.ZipFile:
    key = (os.getpid(), path)
    if key not in _DOG_ZIP_HANDLES:
        try:
            _DOG_ZIP_HANDLES[key] = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{path} is not a readable zip file (truncated or damaged?): {exc}") from None
    return _DOG_ZIP_HANDLES[key]


def _dog_entry_is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop raises instead of answering
        return False


def _dog_source_files(source: str, recursive: bool) -> list[str]:
    """Names in `source` ('/'-separated, relative), sorted: zip entries, every folder entry when not recursive
    (odd ones, such as broken links or a folder named x.jpg, are skipped and counted when read), else files."""
    zipped = _dog_zip_and_folder(source)
    if zipped is not None:
        path, folder = zipped
        return sorted(info.filename[len(folder):] for info in _dog_zip(path).infolist()
                      if not info.is_dir() and info.filename.startswith(folder))
    if not recursive:
        with os.scandir(source) as entries:
            return sorted(e.name for e in entries)
    names = []
    for folder, _, files in os.walk(source):
        rel_folder = os.path.relpath(folder, source).replace(os.sep, "/")
        names.extend(f if rel_folder == "." else f"{rel_folder}/{f}" for f in files)
    return sorted(names)


def _dog_source_read(source: str, name: str) -> bytes:
    zipped = _dog_zip_and_folder(source)
    if zipped is not None:
        path, folder = zipped
        return _dog_zip(path).read(folder + name)
    path = os.path.join(source, name)
    # stat follows links: a loop or a dangling link raises here; a FIFO would block open(), so only plain files pass
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file ({'a directory' if stat.S_ISDIR(mode) else 'a device, pipe or socket'})")
    with open(path, "rb") as f:
        return f.read()


def _dog_is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(DOG_IMAGE_EXTENSIONS) and not base.startswith(".")  # no macOS ._ files


def _dog_is_hidden(name: str) -> bool:
    """A '/'-separated name inside a hidden folder or file, or macOS's __MACOSX shadow folder of a zip."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


# ---- finding the Kaggle layout --------------------------------------------------------------------------

def _dog_scandir(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError:  # unreadable or vanished: nothing to find there
        return []


def _dog_folder_has_images(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    return any(_dog_is_image_name(e.name) and _dog_entry_is_file(e) for e in _dog_scandir(folder))


def _dog_zip_has_images(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    return any(_dog_is_image_name(n) for n in _dog_zip(path).namelist())


def _dog_images_at(root: str, bare: bool) -> str | None:
    """The photo source directly under `root` (root itself too when `bare`), or None."""
    for folder in (os.path.join(root, "all-dogs", "all-dogs"), os.path.join(root, "all-dogs")):
        if _dog_folder_has_images(folder):
            return folder
    if _dog_zip_has_images(os.path.join(root, "all-dogs.zip")):
        return os.path.join(root, "all-dogs.zip")
    if bare and _dog_folder_has_images(root):
        return root
    return None


def _dog_is_annotation_name(name: str) -> bool:
    """Annotation, annotation, Annotations (PASCAL VOC's own name), in any case."""
    return name.lower() in DOG_ANNOTATION_FOLDER_NAMES


def _dog_is_zip_name(name: str) -> bool:
    return name.lower().endswith(".zip")


def _dog_annotation_candidates(root: str) -> list[str]:
    """Paths directly under root named like an annotation folder or zip, in the order they are tried: each
    folder's own annotation folder first (Kaggle's annotation/Annotation), then the folder, then the zips."""
    entries = _dog_scandir(root)
    folders = [e.path for e in entries if _dog_is_annotation_name(e.name) and not _dog_is_zip_name(e.name)]
    zips = [e.path for e in entries if _dog_is_zip_name(e.name) and _dog_is_annotation_name(e.name[:-4])]
    candidates = []
    for folder in folders:
        candidates += [e.path for e in _dog_scandir(folder) if _dog_is_annotation_name(e.name) and _dog_entry_is_dir(e)]
        candidates.append(folder)
    return candidates + zips


def _dog_folder_has_files(folder: str) -> bool:
    """Whether any non-hidden file lies anywhere under folder (VOC files loose in it or in breed folders)."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _dog_is_hidden(d)]
        if any(not _dog_is_hidden(f) for f in files):
            return True
    return False


def _dog_annotations_at(root: str) -> str | None:
    """The annotation source directly under `root`: a folder holding VOC files (in breed folders, loose, or
    nested deeper) or an Annotation.zip; None when there is none."""
    for path in _dog_annotation_candidates(root):
        if os.path.isdir(path) and _dog_folder_has_files(path):
            return path
        if _dog_is_zip_name(path) and os.path.isfile(path):
            return path
    return None


def _dog_annotation_roots(images: str, root: str) -> list[str]:
    """Where the annotations of the photo source `images` found under `root` are looked for: root, and one and
    two levels up when root is the all-dogs folder (or all-dogs/all-dogs) itself."""
    if images != root:
        return [root]
    parent = os.path.dirname(os.path.abspath(root))
    return [root, parent, os.path.dirname(parent)]


def _dog_annotations_missing(roots: list[str]) -> str:
    """What was seen where annotations were looked for and none was usable: one clause for the data line."""
    seen = []
    for root in roots:
        for path in _dog_annotation_candidates(root):
            if os.path.isdir(path):
                seen.append(f"{path} holds no files")
            elif os.path.islink(path) and not os.path.exists(path):
                seen.append(f"{path} is a link to {os.readlink(path)}, which does not exist")
            elif not os.path.exists(path):
                continue
            elif not os.path.isfile(path):
                seen.append(f"{path} is not a folder or a file")
            elif not _dog_is_zip_name(path):
                seen.append(f"{path} is a file, not a folder or a zip")
    return "; ".join(seen) if seen else f"no Annotation folder or zip in {' or '.join(dict.fromkeys(roots))}"


def _dog_layout_at(root: str, bare: bool) -> tuple[str, str | None, list[str]] | None:
    images = _dog_images_at(root, bare)
    if images is None:
        return None
    roots = _dog_annotation_roots(images, root)
    for folder in roots:
        annotations = _dog_annotations_at(folder)
        if annotations is not None:
            return images, annotations, roots
    return images, None, roots


def _dog_subfolders(folder: str) -> list[str]:
    return [e.path for e in _dog_scandir(folder) if not e.name.startswith(".") and _dog_entry_is_dir(e)]


def _dog_entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _dog_common_folder(names: list[str]) -> str:
    """The deepest folder ('' or 'a/b/') holding every one of the '/'-separated names."""
    folders = [name.split("/")[:-1] for name in names]
    common = []
    for parts in zip(*folders):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return "".join(f"{part}/" for part in common)


def _dog_zip_annotation_folder(names: list[str]) -> str | None:
    """The folder of a zip's entries ('' or 'a/b/') where its annotations start: the first annotation folder or,
    without one, the folder holding the breed folders; None when no entry is a VOC file in either."""
    for name in names:
        parts = name.split("/")[:-1]
        for depth, part in enumerate(parts):
            if _dog_is_annotation_name(part):
                return "".join(f"{p}/" for p in parts[:depth + 1])
            if DOG_BREED_FOLDER.fullmatch(part):
                return "".join(f"{p}/" for p in parts[:depth])
    return None


def _dog_layout_in_zip(path: str) -> tuple[str, str | None, list[str]]:
    """(photo source, annotation source or None, folders searched beside it) of a --data-dir that is a zip file:
    one zip of the Kaggle layout (all-dogs/ and Annotation/ inside), or all-dogs.zip with its annotations beside it."""
    names = [n for n in _dog_zip(path).namelist() if not n.endswith("/") and not _dog_is_hidden(n)]
    photos = [n for n in names if _dog_is_image_name(n)]
    if not photos:
        inner_zips = [n for n in names if _dog_is_zip_name(n)]
        if inner_zips:
            raise DataError(f"--data-dir {path} is a zip of zips ({', '.join(inner_zips[:3])}), which are not read "
                            f"in place: unzip it (unzip {path} -d DIR) and pass --data-dir DIR")
        raise DataError(f"--data-dir {path} is a zip without dog photos: {len(names)} files, none named "
                        f"{'/'.join('*' + ext for ext in DOG_IMAGE_EXTENSIONS)}"
                        + (f" (e.g. {names[0]})" if names else "")
                        + "; pass the folder or zip holding all-dogs/ and Annotation/")
    photo_folder = _dog_common_folder(photos)
    images = os.path.join(path, photo_folder[:-1]) if photo_folder else path
    annotation_folder = _dog_zip_annotation_folder([n for n in names if not _dog_is_image_name(n)])
    if annotation_folder is not None:
        return images, os.path.join(path, annotation_folder[:-1]) if annotation_folder else path, [path]
    beside = os.path.dirname(os.path.abspath(path))
    return images, _dog_annotations_at(beside), [path, beside]


def _dog_not_a_folder(path: str) -> str:
    """Why a --data-dir that is no folder cannot be read, and what to pass instead."""
    wanted = "pass the folder holding Kaggle's all-dogs/ and Annotation/ (or one zip of them)"
    if os.path.islink(path) and not os.path.exists(path):
        return f"--data-dir {path} is a symbolic link to {os.readlink(path)}, which does not exist; {wanted}"
    if not os.path.lexists(path):
        return f"data folder {path!r} does not exist (expected Kaggle's all-dogs/ and Annotation/ in it)"
    if not os.path.isfile(path):
        return f"--data-dir {path} is not a folder, a file or a zip (a device, pipe or socket); {wanted}"
    try:
        size = os.path.getsize(path)
        is_tar = tarfile.is_tarfile(path)
    except OSError as exc:
        return f"--data-dir {path} is a file that cannot be read ({exc.strerror or exc}); {wanted}"
    if is_tar:
        return (f"--data-dir {path} is a tar archive, which is not read in place: extract it "
                f"(tar -xf {path} -C DIR) and pass --data-dir DIR")
    if _dog_is_zip_name(path):
        return f"--data-dir {path} is not a readable zip file (truncated or damaged?); {wanted}"
    return f"--data-dir {path} is a file ({size} bytes), not a folder or a zip; {wanted}"


def _dog_find_layout(data_dir: str) -> tuple[str, str | None, list[str]]:
    """find_kaggle_layout, with the folders where annotations were looked for (for the data line)."""
    data_dir = os.fspath(data_dir)
    if os.path.isfile(data_dir) and zipfile.is_zipfile(data_dir):
        return _dog_layout_in_zip(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(_dog_not_a_folder(data_dir))
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise DataError(f"--data-dir {data_dir} is a folder this user may not read (permission denied)")
    level1 = _dog_subfolders(data_dir)
    level2 = [sub for folder in level1 for sub in _dog_subfolders(folder)]
    for root in [data_dir] + level1 + level2:
        layout = _dog_layout_at(root, bare=root == data_dir)
        if layout is not None:
            return layout
    raise DataError(
        f"no dog photos found under {data_dir!r}: looked for all-dogs/*.jpg, all-dogs/all-dogs/*.jpg, "
        f"all-dogs.zip and *.jpg directly in it and in its sub-folders one and two levels down "
        f"({len(level1)} + {len(level2)} folders searched)")


def find_kaggle_layout(data_dir: str) -> tuple[str, str | None]:
    """(photo source, annotation source or None) under data_dir; a source is a folder, a .zip read in place, or a
    folder inside such a zip ('x.zip/all-dogs').

    Looks at data_dir (which may be the all-dogs folder itself), then for an all-dogs folder or zip one and two
    folder levels down (a /kaggle/input-style root, where other data sets' stray .jpg files must not win).
    data_dir may also be one zip holding the layout, or all-dogs.zip itself (annotations beside it).
    Annotations are a folder named Annotation (any case, also Annotations) holding VOC files in breed folders,
    loose, or nested deeper, or an Annotation.zip.
    """
    images, annotations, _ = _dog_find_layout(data_dir)
    return images, annotations


# ---- VOC annotations ------------------------------------------------------------------------------------

def _voc_number(node, tag: str) -> float:
    text = node.findtext(tag)
    if text is None:
        raise DataError(f"VOC <bndbox> lacks <{tag}>")
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"VOC <{tag}> is not a number: {text.strip()!r}")
    return value


def _voc_size(root, tag: str) -> int:
    """A <size> dimension in pixels; 0 when missing or not a usable number (the photo's own size is used then)."""
    try:
        value = float((root.findtext(f"size/{tag}") or "0").strip())
    except ValueError:
        return 0
    return int(value) if math.isfinite(value) and 0 < value <= DOG_MAX_SIDE else 0


def parse_voc(xml_bytes: bytes) -> tuple[int, int, list[tuple[str, float, float, float, float]]]:
    """(width, height, [(breed_name, xmin, ymin, xmax, ymax), ...]) of one VOC file; raises DataError if malformed.

    width/height are 0 when <size> is missing or absurd (not a number, <= 0, beyond JPEG's 65535); the breed is
    <name> ("" when empty).
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise DataError(f"malformed VOC XML: {exc}") from None
    width, height = _voc_size(root, "width"), _voc_size(root, "height")
    boxes = []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError("VOC <object> without <bndbox>")
        name = (obj.findtext("name") or "").strip()
        boxes.append((name, *(_voc_number(bndbox, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))))
    return width, height, boxes


def _dog_breed_of_folder(folder: str) -> str:
    """'n02085620-Chihuahua' -> 'Chihuahua' (breeds may hold '-', e.g. 'Shih-Tzu')."""
    return folder.split("-", 1)[1] if "-" in folder else folder


def _dog_annotation_index(source: str) -> tuple[dict[str, list[tuple[str, str | None]]], dict[str, str], Counter]:
    """photo id -> [(annotation file name, breed of its folder or None), ...] (several when an id sits in several
    folders), wnid -> folder breed, and the layout seen (files in breed folders, loose, nested deeper).

    A file's breed folder is the nearest folder above it named <wnid>-<Breed> (Stanford's, e.g.
    n02085620-Chihuahua); a file without one is loose and its dogs' breeds come from their VOC <name>. Images
    (a zip holding photos and annotations together) and hidden files are not annotations.
    """
    by_id, by_wnid, layout, folders = {}, {}, Counter(), set()
    for name in _dog_source_files(source, recursive=True):
        if _dog_is_hidden(name) or _dog_is_image_name(name):
            continue
        parts = name.split("/")
        breed_folder = next((part for part in reversed(parts[:-1]) if DOG_BREED_FOLDER.fullmatch(part)), None)
        breed = None
        if breed_folder is None:
            layout["loose"] += 1
        else:
            breed = _dog_breed_of_folder(breed_folder)
            by_wnid.setdefault(breed_folder.split("-", 1)[0], breed)
            folders.add(breed_folder)
            layout["in_breed_folders"] += 1
        # folders other than the breed folder and an Annotation folder (a zip's top one, Annotation/Annotation)
        layout["nested"] += any(part != breed_folder and not _dog_is_annotation_name(part) for part in parts[:-1])
        file = parts[-1]
        photo_id = file[:-4] if file.lower().endswith(".xml") else file
        by_id.setdefault(photo_id, []).append((name, breed))
    layout["breed_folders"] = len(folders)
    return by_id, by_wnid, layout


def _dog_describe_layout(layout: Counter) -> str:
    """The annotation layout seen, for the data line."""
    in_folders, loose, nested = layout["in_breed_folders"], layout["loose"], layout["nested"]
    if in_folders and loose:
        described = (f"mixed, {in_folders} VOC files in {layout['breed_folders']} breed folders and {loose} loose "
                     f"(breeds from their <name>)")
    elif in_folders:
        described = f"{in_folders} VOC files in {layout['breed_folders']} breed folders"
        described = described if nested else f"Kaggle's layout, {described}"
    elif loose:
        described = f"{loose} loose VOC files, no breed folders (breeds from their <name>)"
    else:
        return "no annotation files"
    return described + (f"; {nested} of them below other folders" if nested else "")


def _dog_read_annotations(annotation_source, entries, counts) -> list[tuple[str, tuple[int, int], list]]:
    """[(folder breed, (xml width, xml height), boxes)] of one photo's annotation files; a box already given by an
    earlier file of the photo (the same file copied into two folders) is dropped and counted; unreadable files
    count as bad_xml."""
    annotations, earlier = [], set()
    for name, folder_breed in entries:
        try:
            width, height, boxes = parse_voc(_dog_source_read(annotation_source, name))
        except Exception:  # malformed XML, unreadable file or damaged zip entry: the photo itself is still used
            counts["bad_xml"] += 1
            continue
        keys = [(box[0] or folder_breed, width, height, *box[1:]) for box in boxes]
        kept = [box for box, key in zip(boxes, keys) if key not in earlier]
        counts["duplicate_boxes"] += len(boxes) - len(kept)
        earlier.update(keys)
        annotations.append((folder_breed, (width, height), kept))
    return annotations


# ---- decoding one photo into its dog crops and its whole-photo image ------------------------------------

def _dog_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16-bit scaled down to 8 bits, CMYK/palette/grey converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL clips 16-bit values at 255 when converting; scale 0..65535 to 0..255 instead.
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) // 257
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _dog_jpeg_scans_complete(data: bytes) -> bool:
    """Whether the scan headers in a JPEG's bytes cover every component and, for a progressive JPEG, every
    coefficient down to its last bit: a file cut short of its last scans fails; one cut inside its last scan passes."""
    pos, coverage, progressive = 2, {}, False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if length < 2 or len(segment) < length - 2:
            break
        pos += 2 + length
        if marker in DOG_JPEG_SOF_MARKERS and len(segment) >= 6:
            progressive = marker in DOG_JPEG_PROGRESSIVE_SOF
            coverage = {segment[6 + 3 * i]: [99] * 64 for i in range(segment[5]) if 6 + 3 * i < len(segment)}
        elif marker == 0xDA and segment:  # start of scan: components, spectral band Ss..Se, successive bit Al
            n_components = segment[0]
            if len(segment) < 4 + 2 * n_components:
                break
            first, last, al = segment[1 + 2 * n_components:4 + 2 * n_components]
            first, last, low_bit = (first, min(last, 63), al & 15) if progressive else (0, 63, 0)
            for component in (segment[1 + 2 * i] for i in range(n_components)):
                for k in range(first, last + 1) if component in coverage else ():
                    coverage[component][k] = min(coverage[component][k], low_bit)
            # entropy-coded data runs to the next marker that is neither a stuffed FF00 nor a restart marker
            while pos + 1 < len(data) and not (data[pos] == 0xFF and data[pos + 1] != 0
                                               and not 0xD0 <= data[pos + 1] <= 0xD7):
                pos += 1
    return bool(coverage) and all(bit == 0 for bits in coverage.values() for bit in bits)


def _dog_load_truncated_jpeg(data: bytes) -> Image.Image:
    """A JPEG that stops early, decoded as far as it goes; OSError unless the whole picture came out."""
    if not _dog_jpeg_scans_complete(data):
        raise OSError("image file is truncated: scans are missing")
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # for this one decode: globally it would also let half files in
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    # libjpeg fills blocks it never received with mid-grey (or leaves them black): a last block of exactly that
    # means the picture's end is missing, not only its end marker.
    corner = np.asarray(img)[-4:, -4:]
    if (corner == 128).all() or (corner == 0).all():
        raise OSError("image file is truncated: the end of the picture is missing")
    return img


def _dog_open_image(data: bytes, counts) -> Image.Image:
    """The decoded photo; a JPEG that lacks only its end marker is decoded anyway and counted as truncated."""
    img = Image.open(io.BytesIO(data))
    try:
        img.load()
        return img
    except OSError as exc:
        if img.format not in ("JPEG", "MPO") or data.endswith(DOG_JPEG_END_MARKER) or "truncated" not in str(exc):
            raise
    img = _dog_load_truncated_jpeg(data)
    counts["truncated"] += 1
    return img


def _dog_boxes_fit(boxes, width: int, height: int) -> bool:
    return all(x1 <= width * (1 + DOG_BOX_SLACK) + 2 and y1 <= height * (1 + DOG_BOX_SLACK) + 2
               for _, _, _, x1, y1 in boxes)


def _dog_is_resized_copy(xml_size, frame) -> bool:
    """Whether a photo of `frame` pixels can be a resized copy of one of `xml_size` pixels: one scale fits both
    sides, each rounded to whole pixels (up to 1 px either way: round, floor or ceil), within DOG_ASPECT_TOLERANCE.
    A photo shrunk to a thumbnail keeps its aspect only to a pixel, which is several percent at 32 px."""
    (xml_w, xml_h), (width, height) = xml_size, frame
    lowest = max((width - 1) / xml_w, (height - 1) / xml_h)
    highest = min((width + 1) / xml_w, (height + 1) / xml_h)
    return lowest <= highest * (1 + DOG_ASPECT_TOLERANCE)


def _dog_box_frame(xml_size, boxes, stored_size, orientation: int) -> tuple[bool, float, float, str]:
    """(exif_frame, sx, sy, how): whether the boxes refer to the EXIF-rotated photo, the scale from the XML's
    <size> onto that frame's pixels, and how that was decided: "same" (the size matches the stored pixels),
    "exif" (it matches the photo turned by its EXIF orientation), "rescaled" (the size of another copy of the
    photo, larger or smaller: same aspect to a pixel, boxes inside it; scaled by photo size / stated size), or
    "fallback" (missing, zero, absurd, boxes outside it, or another aspect: the photo's own pixels are used)."""
    width, height = stored_size
    if not boxes or tuple(xml_size) == (width, height):
        return False, 1.0, 1.0, "same"
    turned = orientation in (5, 6, 7, 8)  # EXIF orientations that swap width and height
    frames = [(False, (width, height))] + ([(True, (height, width))] if turned else [])
    xml_w, xml_h = xml_size
    if xml_w > 0 and xml_h > 0 and _dog_boxes_fit(boxes, xml_w, xml_h):
        for exif_frame, frame in frames:
            if tuple(xml_size) == frame:
                return exif_frame, 1.0, 1.0, "exif"
        for exif_frame, frame in frames:
            if _dog_is_resized_copy(xml_size, frame):
                return exif_frame, frame[0] / xml_w, frame[1] / xml_h, "rescaled"
    return False, 1.0, 1.0, "fallback"


def _dog_min_side(min_box: int, frame_size) -> float:
    """Shortest box side kept: min_box px, but at most half the photo's shortest side (a small photo keeps its dog)."""
    return min(float(min_box), DOG_MIN_BOX_PHOTO_FRACTION * min(frame_size))


def _dog_box_regions(boxes, frame_size, sx: float, sy: float, settings: DogCropSettings, counts):
    """[(name, region)] of the boxes in the frame's pixels, widened by the margin and clipped; boxes with no pixels
    in the photo (skipped_boxes) or a shortest side under the minimum (tiny_boxes) are dropped and counted."""
    img_w, img_h = frame_size
    min_side = _dog_min_side(settings.min_box, frame_size)
    regions = []
    for name, xmin, ymin, xmax, ymax in boxes:
        xmin, xmax, ymin, ymax = xmin * sx, xmax * sx, ymin * sy, ymax * sy
        inside_w, inside_h = min(img_w, xmax) - max(0.0, xmin), min(img_h, ymax) - max(0.0, ymin)
        if inside_w < 1 or inside_h < 1:
            counts["skipped_boxes"] += 1
            continue
        if min(inside_w, inside_h) < min_side:
            counts["tiny_boxes"] += 1
            continue
        if xmin < 0 or ymin < 0 or xmax > img_w or ymax > img_h:
            counts["clipped_boxes"] += 1
        # widen by margin * box size on each side: [x0 - m*w, x1 + m*w]
        dx, dy = settings.margin * (xmax - xmin), settings.margin * (ymax - ymin)
        regions.append((name, (max(0.0, xmin - dx), max(0.0, ymin - dy), min(img_w, xmax + dx), min(img_h, ymax + dy))))
    return regions


def _dog_square(img: Image.Image, size: int) -> np.ndarray:
    """RGB, squashed to size x size exactly as Kaggle's evaluator squashed every image (lanczos_square)
    -> 3 x size x size uint8; aspect not kept: the whole dog fills the square."""
    return np.ascontiguousarray(lanczos_square(_dog_to_rgb(img), size))


def _dog_crop_resize(img: Image.Image, region, size: int) -> np.ndarray:
    """Crop the region -> 3 x size x size uint8."""
    w, h = img.size
    x0, y0, x1, y1 = region
    # Whole pixels covering the region; at least one pixel wide and high.
    left, top = min(int(math.floor(x0 + 1e-6)), w - 1), min(int(math.floor(y0 + 1e-6)), h - 1)
    right, bottom = max(int(math.ceil(x1 - 1e-6)), left + 1), max(int(math.ceil(y1 - 1e-6)), top + 1)
    return _dog_square(img.crop((left, top, min(right, w), min(bottom, h))), size)


def _dog_centre_region(img_size) -> tuple[float, float, float, float]:
    w, h = img_size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return (left, top, left + side, top + side)


def _dog_decode_photo(image_source, annotation_source, task, settings: DogCropSettings, counts, notes):
    """One photo -> ([3 x size x size uint8 crops], [breed name or None per crop], whole photo or None, the
    photo's breed name or None).

    Raises on unreadable files. `counts` is this photo's own Counter; `notes` keeps the first example of each
    <size> decision ("rescaled_annotations", "size_fallback"). The whole photo is the stored pixels as PIL opens
    them, without EXIF rotation, as Kaggle's evaluator read them; crops follow the frame the boxes were drawn in.
    The photo's breed is its first annotated dog's (XML order, even a dog too small to crop), else its centre
    crop's, else its wnid's breed folder's.
    """
    image_name, annotation_entries, folder_breed = task
    annotations = []
    if not annotation_entries:
        counts["no_annotation"] += 1
    else:
        annotations = _dog_read_annotations(annotation_source, annotation_entries, counts)
    img = _dog_open_image(_dog_source_read(image_source, image_name), counts)
    whole = _dog_square(img, settings.size) if settings.whole_photos else None
    try:
        orientation = img.getexif().get(DOG_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block does not make the pixels unusable: read them as stored
        orientation = 1
    turned_img = None
    regions, names, frames = [], [], []
    for file_breed, xml_size, boxes in annotations:
        exif_frame, sx, sy, how = _dog_box_frame(xml_size, boxes, img.size, orientation)
        counts["exif_transposed"] += exif_frame
        if how in ("rescaled", "fallback"):
            key = "rescaled_annotations" if how == "rescaled" else "size_fallback"
            counts[key] += 1
            stated = f"<size> {xml_size[0]}x{xml_size[1]}" if min(xml_size) > 0 else "<size> missing or not a number"
            notes.setdefault(key, f"{image_name}: {stated}, photo {img.size[0]}x{img.size[1]}")
        if exif_frame and turned_img is None:
            turned_img = ImageOps.exif_transpose(img)
        frame_img = turned_img if exif_frame else img
        for name, region in _dog_box_regions(boxes, frame_img.size, sx, sy, settings, counts):
            regions.append(region)
            names.append(name or file_breed)
            frames.append(frame_img)
    first_dog = next((name or file_breed for file_breed, _, boxes in annotations for name, *_ in boxes), None)
    if not regions and counts["tiny_boxes"]:
        # every dog of the photo is too small: its smudge, or a centre crop of the background, would be no better
        counts["tiny_only_photos"] += 1
        return [], [], whole, first_dog or folder_breed
    if not regions:
        counts["centre_crops"] += 1
        xml_breed = next((name for _, _, boxes in annotations for name, *_ in boxes if name), None)
        regions, names, frames = [_dog_centre_region(img.size)], [xml_breed or folder_breed], [img]
    crops = [_dog_crop_resize(frame_img, region, settings.size) for frame_img, region in zip(frames, regions)]
    if len(crops) > 1:
        counts["multi_dog_photos"] += 1
    return crops, names, whole, first_dog or names[0]


@dataclass
class DogDecodedChunk:
    """What a decode worker sends back for its share of the photos."""
    crops: np.ndarray             # uint8 N x 3 x size x size
    names: list                   # breed name or None per crop
    counts: Counter
    skipped: list                 # (file name, reason) of unreadable files
    truncated: list               # names of JPEGs kept without their end marker
    photos: np.ndarray            # uint8 P x 3 x size x size whole photos (P = 0 unless asked for)
    photo_names: list             # breed name or None per decoded photo
    notes: dict                   # first example of each <size> decision


def _dog_decode_chunk(job) -> DogDecodedChunk:
    """Pool worker (top level, so pickling finds it in a bundled __main__ or a notebook): a list of photos."""
    image_source, annotation_source, tasks, settings = job
    counts, crops, names, skipped, truncated, wholes, photo_names, notes = Counter(), [], [], [], [], [], [], {}
    for task in tasks:
        photo_counts = Counter()
        try:
            photo_crops, crop_names, whole, photo_name = _dog_decode_photo(image_source, annotation_source, task,
                                                                           settings, photo_counts, notes)
        except Exception as exc:  # any unreadable file (truncated JPEG, not an image, a broken link) is a counted skip
            counts["skipped_files"] += 1
            skipped.append((task[0], f"{type(exc).__name__}: {exc}"))
            continue
        counts.update(photo_counts)
        crops.extend(photo_crops)
        names.extend(crop_names)
        photo_names.append(photo_name)
        if photo_counts["truncated"]:
            truncated.append(task[0])
        if whole is not None:
            wholes.append(whole)
    size = settings.size
    stacked = np.stack(crops) if crops else np.zeros((0, 3, size, size), np.uint8)
    photos = np.stack(wholes) if wholes else np.zeros((0, 3, size, size), np.uint8)
    return DogDecodedChunk(stacked, names, counts, skipped, truncated, photos, photo_names, notes)


# ---- the loader -----------------------------------------------------------------------------------------

@dataclass
class DogData:
    """Every dog crop of the data set, decoded once (and, when asked for, every whole photo at 64x64)."""
    images: torch.Tensor          # uint8 N x 3 x size x size, contiguous: the training crops
    labels: torch.Tensor          # int64 N, index into breeds
    breeds: list[str]             # label id -> breed name, sorted by name
    counts: dict = field(default_factory=dict)  # photos, samples, multi_dog_photos, centre_crops, skipped_*, ...
    seconds: float = 0.0          # load time
    # uint8 P x 3 x size x size, one per decoded photo, squashed with Lanczos and not EXIF-rotated: Kaggle's MiFID
    # reference, and training images for --train-on photos|both (load_dogs(whole_photos=True)); None otherwise.
    photos: torch.Tensor | None = None
    photo_labels: torch.Tensor | None = None    # int64 P with photos: each photo's breed (see load_dogs)


def _dog_worker_count(workers: int) -> int:
    if workers > 0:
        return workers
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))  # the cores this container may use
    return max(1, os.cpu_count() or 1)


def _dog_pool_context():
    """A multiprocessing context whose workers can run _dog_decode_chunk, or None."""
    # fork: workers inherit the code, so a bundled __main__ or a notebook cell needs no importable module.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    # spawn re-imports the worker's module; code living in a notebook's __main__ would hang the pool.
    if _dog_decode_chunk.__module__ != "__main__":
        return multiprocessing.get_context()
    return None


def _dog_run_jobs(jobs, processes: int):
    """Chunk results in order: worker processes when asked for, else (or if they fail) in this process.

    Forked workers each take every processes-th job and answer on a pipe of their own, so they share no lock: a stop
    signal (SIGTERM to the whole process group, a terminal's Ctrl-C) or a worker killed outright can leave nothing
    waiting forever, and no worker prints a traceback. Without fork, a multiprocessing pool does the work.
    """
    context = _dog_pool_context() if processes > 1 else None
    if processes > 1 and context is None:
        log("data", "no 'fork' start method and the code lives in __main__; decoding in-process")
    elif context is not None:
        import signal
        stop_signals = {signal.SIGINT, signal.SIGTERM}

        def decode_share(share, writer, signal_mask):
            # in a forked worker: Ctrl-C is for the parent to handle, SIGTERM ends the worker at once
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
            for index in share:
                writer.send((index, _dog_decode_chunk(jobs[index])))
            writer.close()

        workers = []
        try:
            if context.get_start_method() != "fork":
                with context.Pool(processes) as pool:
                    return pool.map(_dog_decode_chunk, jobs), processes
            results, readers = [None] * len(jobs), []
            # Stop signals wait while the workers are set up: a handler raising inside multiprocessing's fork
            # bookkeeping would be swallowed there ("Exception ignored in ...") and the stop lost.
            signal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            try:
                for first in range(processes):
                    reader, writer = context.Pipe(duplex=False)
                    worker = context.Process(target=decode_share, daemon=True,
                                             args=(range(first, len(jobs), processes), writer, signal_mask))
                    worker.start()
                    writer.close()  # only the worker writes: its end closing is this reader's EOF
                    workers.append(worker)
                    readers.append(reader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
            while readers:
                # a timeout: a signal the kernel hands to another thread runs its Python handler only when the
                # main thread wakes, and an endless wait would never wake
                for reader in multiprocessing.connection.wait(readers, timeout=0.2):
                    try:
                        index, result = reader.recv()
                        results[index] = result
                    except EOFError:
                        readers.remove(reader)
                        reader.close()
            if any(result is None for result in results):
                raise RuntimeError("a decode worker ended before its share was done")
            return results, processes
        except Exception as exc:
            log("data", f"decode pool failed ({type(exc).__name__}: {exc}); decoding in-process")
        finally:
            # on success the workers have finished; on an error or a stop signal they are ended here
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                worker.join()
    return [_dog_decode_chunk(job) for job in jobs], 1


def _dog_pick_subset(names: list[str], max_images: int) -> list[str]:
    """max_images photos spread evenly over the sorted list, so a quick run still sees every breed."""
    if max_images <= 0 or max_images >= len(names):
        return names
    picks = np.linspace(0, len(names) - 1, max_images).round().astype(int)
    return [names[i] for i in picks]


def _dog_warn_about_annotations(photo_ids: list[str], by_id: dict, annotation_source: str) -> None:
    """One line when photos lack annotations (all of them: the names do not match) or an id sits in several folders."""
    matched = sum(photo_id in by_id for photo_id in photo_ids)
    if matched == 0:
        example = next(iter(by_id), "none")
        log("data", f"warning: {len(by_id)} annotated ids in {annotation_source} but none matches any of the "
            f"{len(photo_ids)} photo names (photo {photo_ids[0]!r}, annotation {example!r}): every photo is "
            f"centre-cropped and labelled by its name's wnid, if any")
    elif matched < len(photo_ids):
        log("data", f"warning: {len(photo_ids) - matched} of {len(photo_ids)} photos have no annotation file; "
            f"they are centre-cropped")
    shared = [photo_id for photo_id in photo_ids if len(by_id.get(photo_id, ())) > 1]
    if shared:
        folders = " and ".join(name.rsplit("/", 1)[0] if "/" in name else "the top folder"
                               for name, _ in by_id[shared[0]])
        log("data", f"warning: {len(shared)} photo ids have annotation files in several folders (e.g. {shared[0]} in "
            f"{folders}); the boxes of every file are kept")


def _dog_log_size_decisions(counts: Counter, notes: dict) -> None:
    """One line for each way a VOC <size> other than the photo's was read, with the first example."""
    if counts["rescaled_annotations"]:
        log("data", f"{counts['rescaled_annotations']} annotation files state the size of another copy of their "
            f"photo (same aspect to a pixel, boxes inside it): boxes scaled onto the photo "
            f"(e.g. {notes['rescaled_annotations']})")
    if counts["size_fallback"]:
        log("data", f"{counts['size_fallback']} annotation files state a <size> that cannot be their photo's "
            f"(missing, zero, absurd, boxes outside it, or another aspect): boxes read in the photo's own pixels "
            f"(e.g. {notes['size_fallback']})")


def load_dogs(data_dir: str, crop_margin: float = 0.0, max_images: int = 0, workers: int = 0,
              size: int = 64, min_box: int = 0, whole_photos: bool = False) -> DogData:
    """Decode every photo under data_dir once and crop every annotated dog to size x size uint8.

    Photos without a usable box are centre-cropped; their label is the breed of the folder their wnid belongs to,
    else the most common breed of the set (or the single breed "dog" when there are no annotations at all).
    min_box > 0 drops dogs whose box is smaller (see _dog_min_side); a photo that loses every dog gives no crop.
    whole_photos: also keep every decoded photo squashed to size x size (DogData.photos): Kaggle's MiFID reference,
    and the training images of --train-on photos|both (training_images). Each photo's label (DogData.photo_labels)
    is the breed of its first annotated dog; a photo with no usable annotation keeps the label its centre crop
    got, and a first dog of a breed no crop has (all its dogs under min_box) gives the most common breed.
    """
    start = time.time()
    data_dir = os.fspath(data_dir)
    image_source, annotation_source, annotation_roots = _dog_find_layout(data_dir)
    image_names = _dog_pick_subset([n for n in _dog_source_files(image_source, recursive=False)
                                    if _dog_is_image_name(n)], max_images)
    photo_ids = [os.path.splitext(name.rsplit("/", 1)[-1])[0] for name in image_names]
    if annotation_source is None:
        missing = _dog_annotations_missing(annotation_roots)
        log("data", f"warning: {missing}; every photo is centre-cropped and labelled 'dog'")
        by_id, by_wnid, layout = {}, {}, f"none ({missing})"
    else:
        by_id, by_wnid, seen = _dog_annotation_index(annotation_source)
        layout = f"{annotation_source}: {_dog_describe_layout(seen)}"
        if image_names:
            _dog_warn_about_annotations(photo_ids, by_id, annotation_source)

    tasks = []
    for name, photo_id in zip(image_names, photo_ids):
        entries = tuple(by_id.get(photo_id, ()))
        folder_breed = next((breed for _, breed in entries if breed), None)
        tasks.append((name, entries, folder_breed or by_wnid.get(photo_id.split("_", 1)[0])))

    processes = _dog_worker_count(workers)
    if len(tasks) < DOG_POOL_MIN_PHOTOS and workers == 0:
        processes = 1
    # ~8 chunks per process balances the load; chunks of at least 16 keep the pickling overhead small.
    chunk = max(16, min(512, -(-len(tasks) // (processes * 8))))
    settings = DogCropSettings(margin=crop_margin, size=size, min_box=min_box, whole_photos=whole_photos)
    jobs = [(image_source, annotation_source, tasks[i:i + chunk], settings) for i in range(0, len(tasks), chunk)]
    processes = min(processes, len(jobs))
    results, processes = _dog_run_jobs(jobs, processes)

    counts = Counter()
    names, photo_names, skipped, truncated, notes = [], [], [], [], {}
    for result in results:
        names.extend(result.names)
        photo_names.extend(result.photo_names)
        counts.update(result.counts)
        skipped.extend(result.skipped)
        truncated.extend(result.truncated)
        for key, example in result.notes.items():
            notes.setdefault(key, example)
    for file_name, reason in skipped[:DOG_SKIP_LOG_LIMIT]:
        log("data", f"skipped unreadable {file_name}: {reason}")
    if len(skipped) > DOG_SKIP_LOG_LIMIT:
        log("data", f"... and {len(skipped) - DOG_SKIP_LOG_LIMIT} more unreadable files")
    if truncated:
        log("data", f"{len(truncated)} JPEGs lack their end marker but decode whole; kept (e.g. {truncated[0]})")
    _dog_log_size_decisions(counts, notes)
    if not names:
        raise DataError(f"no usable dog images in {image_source}: {len(tasks)} photos found, "
                        f"{counts['skipped_files']} unreadable, {counts['tiny_only_photos']} with only dogs "
                        f"under --min-box {min_box} px")

    known = Counter(n for n in names if n)
    fallback_breed = known.most_common(1)[0][0] if known else "dog"
    names = [n or fallback_breed for n in names]
    breeds = sorted(set(names))
    breed_id = {breed: i for i, breed in enumerate(breeds)}
    labels = torch.tensor([breed_id[n] for n in names], dtype=torch.int64)
    # Copy chunk by chunk into one tensor, dropping each chunk: peak memory stays near one copy of the set.
    images = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
    n_photos = sum(len(result.photos) for result in results)
    photos = torch.empty((n_photos, 3, size, size), dtype=torch.uint8) if whole_photos else None
    row, photo_row = 0, 0
    for i, result in enumerate(results):
        images[row:row + len(result.crops)] = torch.from_numpy(result.crops)
        row += len(result.crops)
        if photos is not None:
            photos[photo_row:photo_row + len(result.photos)] = torch.from_numpy(result.photos)
            photo_row += len(result.photos)
        results[i] = None
    photo_labels = None
    if whole_photos:
        photo_labels = torch.tensor([breed_id.get(n, breed_id[fallback_breed]) for n in photo_names],
                                    dtype=torch.int64)
        counts["photos_of_no_cropped_breed"] = sum(n not in breed_id for n in photo_names)

    summary = {"photos": len(tasks), "samples": len(names), "breeds": len(breeds)}
    for key in ("multi_dog_photos", "centre_crops", "skipped_files", "truncated", "skipped_boxes", "clipped_boxes",
                "tiny_boxes", "tiny_only_photos", "no_annotation", "bad_xml", "duplicate_boxes",
                "rescaled_annotations", "exif_transposed", "size_fallback", "photos_of_no_cropped_breed"):
        summary[key] = counts.get(key, 0)
    summary["whole_photos"] = n_photos if whole_photos else 0
    summary["decode_processes"] = processes
    seconds = time.time() - start
    how = f"{processes} processes" if processes > 1 else "in-process"
    notes_line = ", ".join(f"{k} {v}" for k, v in summary.items()
                           if v and k not in ("photos", "samples", "breeds", "decode_processes", "whole_photos"))
    log("data", f"{summary['photos']} photos -> {summary['samples']} dogs of {len(breeds)} breeds"
        + (f" + {n_photos} whole photos ({size}x{size} Lanczos)" if whole_photos else "")
        + f" in {seconds:.1f}s ({how}) from {image_source}; annotations: {layout}; min_box {min_box} px"
        + (f"; {notes_line}" if notes_line else ""))
    return DogData(images=images, labels=labels, breeds=breeds, counts=summary, seconds=seconds, photos=photos,
                   photo_labels=photo_labels)


# What --train-on chooses between: the dog crops, the whole photos (what Kaggle's MiFID compares with), or both.
TRAIN_ON_CHOICES = ("crops", "photos", "both")


def training_images(data: DogData, train_on: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x 3 x size x size images, int64 N labels) to train on: the dog crops ("crops"), every decoded whole
    photo squashed to size x size with its photo label ("photos"), or the crops followed by the photos ("both")."""
    if train_on not in TRAIN_ON_CHOICES:
        raise DataError(f"--train-on {train_on!r}: choose one of {', '.join(TRAIN_ON_CHOICES)}")
    if train_on == "crops":
        images, labels = data.images, data.labels
    elif data.photos is None or data.photo_labels is None:
        raise DataError(f"--train-on {train_on} needs the whole photos, which were not decoded "
                        f"(load_dogs(..., whole_photos=True))")
    elif train_on == "photos":
        images, labels = data.photos, data.photo_labels
    else:
        images, labels = torch.cat([data.images, data.photos]), torch.cat([data.labels, data.photo_labels])
    log("data", f"training on {train_on}: {len(images)} images"
        + (f" ({len(data.images)} dog crops + {len(data.photos)} whole photos)" if train_on == "both" else ""))
    return images, labels


if __name__ == "__main__":
    import sys
    data = load_dogs(sys.argv[1] if len(sys.argv) > 1 else "/kaggle/input")
    log("data", f"images {tuple(data.images.shape)} {data.images.dtype}, labels {tuple(data.labels.shape)}")
