"""Read the Kaggle dog photos once: find the layout, parse the VOC boxes, crop every dog to a uint8 tensor, and
squash every whole photo to 64x64 as Kaggle's MiFID reference did."""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import stat
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
# Skipped files named in the log before the rest are only counted.
DOG_SKIP_LOG_LIMIT = 5
# JPEG's largest dimension: a VOC <size> above it is no real photo's size.
DOG_MAX_SIDE = 65535
# Boxes may run past their VOC <size> by this fraction (+ 2 px) before the size is distrusted; Stanford's two boxes
# past the edge overshoot by 2.2 % and 5.6 %.
DOG_BOX_SLACK = 0.1
# A VOC <size> whose aspect ratio is within this fraction of the photo's describes a resized copy of it.
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
    whole_photos: bool = False    # also return each whole photo squashed to size x size (Kaggle's MiFID reference)


# ---- sources: a folder on disk or a .zip read in place ------------------------------------------------
# A "source" is just a path string: a folder, or a .zip file whose entries are read without extracting.

def _dog_source_is_zip(source: str) -> bool:
    return source.lower().endswith(".zip") and os.path.isfile(source)


# One open ZipFile per (process, zip): forked workers must not share the parent's file offset.
_DOG_ZIP_HANDLES: dict = {}


def _dog_zip(source: str) -> zipfile.ZipFile:
    key = (os.getpid(), source)
    if key not in _DOG_ZIP_HANDLES:
        try:
            _DOG_ZIP_HANDLES[key] = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{source} is not a readable zip file (truncated or damaged?): {exc}") from None
    return _DOG_ZIP_HANDLES[key]


def _dog_entry_is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop raises instead of answering
        return False


def _dog_source_files(source: str, recursive: bool) -> list[str]:
    """Names in `source` ('/'-separated, relative), sorted: zip entries, every folder entry when not recursive
    (odd ones, such as broken links or a folder named x.jpg, are skipped and counted when read), else files."""
    if _dog_source_is_zip(source):
        return sorted(info.filename for info in _dog_zip(source).infolist() if not info.is_dir())
    if not recursive:
        with os.scandir(source) as entries:
            return sorted(e.name for e in entries)
    names = []
    for folder, _, files in os.walk(source):
        rel_folder = os.path.relpath(folder, source).replace(os.sep, "/")
        names.extend(f if rel_folder == "." else f"{rel_folder}/{f}" for f in files)
    return sorted(names)


def _dog_source_read(source: str, name: str) -> bytes:
    if _dog_source_is_zip(source):
        return _dog_zip(source).read(name)
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


# ---- finding the Kaggle layout --------------------------------------------------------------------------

def _dog_folder_has_images(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    with os.scandir(folder) as entries:
        return any(_dog_is_image_name(e.name) and _dog_entry_is_file(e) for e in entries)


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


def _dog_annotations_at(root: str) -> str | None:
    """The annotation source (breed folders of VOC files) directly under `root`, or None."""
    for parts in (("annotation", "Annotation"), ("Annotation", "Annotation"), ("Annotation",), ("annotation",)):
        folder = os.path.join(root, *parts)
        if os.path.isdir(folder) and _dog_subfolders(folder):
            return folder
    for name in ("Annotation.zip", "annotation.zip"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _dog_layout_at(root: str, bare: bool) -> tuple[str, str | None] | None:
    images = _dog_images_at(root, bare)
    if images is None:
        return None
    # When root is the all-dogs folder itself (or all-dogs/all-dogs), Annotation sits one or two levels up.
    search = [root] if images != root else [root, os.path.dirname(root), os.path.dirname(os.path.dirname(root))]
    for folder in search:
        annotations = _dog_annotations_at(folder)
        if annotations is not None:
            return images, annotations
    return images, None


def _dog_subfolders(folder: str) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def find_kaggle_layout(data_dir: str) -> tuple[str, str | None]:
    """(photo source, annotation source or None) under data_dir; a source is a folder or a .zip read in place.

    Looks at data_dir (which may be the all-dogs folder itself), then for an all-dogs folder or zip one and two
    folder levels down (a /kaggle/input-style root, where other data sets' stray .jpg files must not win).
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder {data_dir!r} does not exist (expected Kaggle's all-dogs/ and Annotation/ in it)")
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


def _dog_annotation_index(source: str) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str]]:
    """photo id -> [(annotation file name, folder breed), ...] (several when an id sits in several breed folders)
    and wnid -> folder breed."""
    by_id, by_wnid = {}, {}
    for name in _dog_source_files(source, recursive=True):
        parts = name.split("/")
        if len(parts) < 2 or parts[-1].startswith("."):
            continue
        folder, file = parts[-2], parts[-1]
        breed = _dog_breed_of_folder(folder)
        photo_id = file[:-4] if file.lower().endswith(".xml") else file
        by_id.setdefault(photo_id, []).append((name, breed))
        by_wnid.setdefault(folder.split("-", 1)[0], breed)
    return by_id, by_wnid


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


def _dog_aspect_matches(size_a, size_b) -> bool:
    ratio_a, ratio_b = size_a[0] / size_a[1], size_b[0] / size_b[1]
    return abs(ratio_a - ratio_b) <= DOG_ASPECT_TOLERANCE * ratio_b


def _dog_box_frame(xml_size, boxes, stored_size, orientation: int) -> tuple[bool, float, float, str]:
    """(exif_frame, sx, sy, how): whether the boxes refer to the EXIF-rotated photo, the scale from the XML's
    <size> onto that frame's pixels, and how that was decided: "same" (the size matches the stored pixels),
    "exif" (it matches the photo turned by its EXIF orientation), "rescaled" (a resized copy's size: same aspect),
    or "fallback" (missing, absurd or inconsistent with the boxes: the photo's real size is used)."""
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
            if _dog_aspect_matches(xml_size, frame):
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


def _dog_decode_photo(image_source, annotation_source, task, settings: DogCropSettings, counts):
    """One photo -> ([3 x size x size uint8 crops], [breed name or None per crop], whole photo or None).

    Raises on unreadable files. `counts` is this photo's own Counter. The whole photo is the stored pixels as PIL
    opens them, without EXIF rotation, as Kaggle's evaluator read them; crops follow the frame the boxes were drawn in.
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
        counts["rescaled_annotations"] += how == "rescaled"
        counts["size_fallback"] += how == "fallback"
        if exif_frame and turned_img is None:
            turned_img = ImageOps.exif_transpose(img)
        frame_img = turned_img if exif_frame else img
        for name, region in _dog_box_regions(boxes, frame_img.size, sx, sy, settings, counts):
            regions.append(region)
            names.append(name or file_breed)
            frames.append(frame_img)
    if not regions and counts["tiny_boxes"]:
        # every dog of the photo is too small: its smudge, or a centre crop of the background, would be no better
        counts["tiny_only_photos"] += 1
        return [], [], whole
    if not regions:
        counts["centre_crops"] += 1
        xml_breed = next((name for _, _, boxes in annotations for name, *_ in boxes if name), None)
        regions, names, frames = [_dog_centre_region(img.size)], [xml_breed or folder_breed], [img]
    crops = [_dog_crop_resize(frame_img, region, settings.size) for frame_img, region in zip(frames, regions)]
    if len(crops) > 1:
        counts["multi_dog_photos"] += 1
    return crops, names, whole


def _dog_decode_chunk(job):
    """Pool worker (top level, so pickling finds it in a bundled __main__ or a notebook): a list of photos."""
    image_source, annotation_source, tasks, settings = job
    counts, crops, names, skipped, truncated, wholes = Counter(), [], [], [], [], []
    for task in tasks:
        photo_counts = Counter()
        try:
            photo_crops, photo_names, whole = _dog_decode_photo(image_source, annotation_source, task, settings,
                                                                photo_counts)
        except Exception as exc:  # any unreadable file (truncated JPEG, not an image, a broken link) is a counted skip
            counts["skipped_files"] += 1
            skipped.append((task[0], f"{type(exc).__name__}: {exc}"))
            continue
        counts.update(photo_counts)
        crops.extend(photo_crops)
        names.extend(photo_names)
        if photo_counts["truncated"]:
            truncated.append(task[0])
        if whole is not None:
            wholes.append(whole)
    size = settings.size
    stacked = np.stack(crops) if crops else np.zeros((0, 3, size, size), np.uint8)
    photos = np.stack(wholes) if wholes else np.zeros((0, 3, size, size), np.uint8)
    return stacked, names, counts, skipped, truncated, photos


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
    # reference (load_dogs(whole_photos=True)); None otherwise. Scoring only: training never moves it to a GPU.
    photos: torch.Tensor | None = None


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
        folders = " and ".join(name.rsplit("/", 2)[-2] for name, _ in by_id[shared[0]])
        log("data", f"warning: {len(shared)} photo ids have annotation files in several folders (e.g. {shared[0]} in "
            f"{folders}); the boxes of every file are kept")


def load_dogs(data_dir: str, crop_margin: float = 0.0, max_images: int = 0, workers: int = 0,
              size: int = 64, min_box: int = 0, whole_photos: bool = False) -> DogData:
    """Decode every photo under data_dir once and crop every annotated dog to size x size uint8.

    Photos without a usable box are centre-cropped; their label is the breed of the folder their wnid belongs to,
    else the most common breed of the set (or the single breed "dog" when there are no annotations at all).
    min_box > 0 drops dogs whose box is smaller (see _dog_min_side); a photo that loses every dog gives no crop.
    whole_photos: also keep every photo squashed to size x size (DogData.photos, Kaggle's MiFID reference).
    """
    start = time.time()
    data_dir = os.fspath(data_dir)
    image_source, annotation_source = find_kaggle_layout(data_dir)
    image_names = _dog_pick_subset([n for n in _dog_source_files(image_source, recursive=False)
                                    if _dog_is_image_name(n)], max_images)
    photo_ids = [os.path.splitext(name.rsplit("/", 1)[-1])[0] for name in image_names]
    if annotation_source is None:
        log("data", f"warning: no Annotation folder or zip found near {image_source}; "
            f"every photo is centre-cropped and labelled 'dog'")
        by_id, by_wnid = {}, {}
    else:
        by_id, by_wnid = _dog_annotation_index(annotation_source)
        if image_names:
            _dog_warn_about_annotations(photo_ids, by_id, annotation_source)

    tasks = []
    for name, photo_id in zip(image_names, photo_ids):
        entries = tuple(by_id.get(photo_id, ()))
        fallback_breed = entries[0][1] if entries else by_wnid.get(photo_id.split("_", 1)[0])
        tasks.append((name, entries, fallback_breed))

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
    names, skipped, truncated = [], [], []
    for _, chunk_names, chunk_counts, chunk_skipped, chunk_truncated, _ in results:
        names.extend(chunk_names)
        counts.update(chunk_counts)
        skipped.extend(chunk_skipped)
        truncated.extend(chunk_truncated)
    for file_name, reason in skipped[:DOG_SKIP_LOG_LIMIT]:
        log("data", f"skipped unreadable {file_name}: {reason}")
    if len(skipped) > DOG_SKIP_LOG_LIMIT:
        log("data", f"... and {len(skipped) - DOG_SKIP_LOG_LIMIT} more unreadable files")
    if truncated:
        log("data", f"{len(truncated)} JPEGs lack their end marker but decode whole; kept (e.g. {truncated[0]})")
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
    n_photos = sum(len(result[5]) for result in results)
    photos = torch.empty((n_photos, 3, size, size), dtype=torch.uint8) if whole_photos else None
    row, photo_row = 0, 0
    for i, (chunk_images, *_, chunk_photos) in enumerate(results):
        images[row:row + len(chunk_images)] = torch.from_numpy(chunk_images)
        row += len(chunk_images)
        if photos is not None:
            photos[photo_row:photo_row + len(chunk_photos)] = torch.from_numpy(chunk_photos)
            photo_row += len(chunk_photos)
        results[i] = None

    summary = {"photos": len(tasks), "samples": len(names), "breeds": len(breeds)}
    for key in ("multi_dog_photos", "centre_crops", "skipped_files", "truncated", "skipped_boxes", "clipped_boxes",
                "tiny_boxes", "tiny_only_photos", "no_annotation", "bad_xml", "duplicate_boxes",
                "rescaled_annotations", "exif_transposed", "size_fallback"):
        summary[key] = counts.get(key, 0)
    summary["whole_photos"] = n_photos if whole_photos else 0
    summary["decode_processes"] = processes
    seconds = time.time() - start
    how = f"{processes} processes" if processes > 1 else "in-process"
    notes = ", ".join(f"{k} {v}" for k, v in summary.items()
                      if v and k not in ("photos", "samples", "breeds", "decode_processes", "whole_photos"))
    log("data", f"{summary['photos']} photos -> {summary['samples']} dogs of {len(breeds)} breeds"
        + (f" + {n_photos} whole photos ({size}x{size} Lanczos)" if whole_photos else "")
        + f" in {seconds:.1f}s ({how}) from {image_source}; min_box {min_box} px"
        + (f"; {notes}" if notes else ""))
    return DogData(images=images, labels=labels, breeds=breeds, counts=summary, seconds=seconds, photos=photos)


if __name__ == "__main__":
    import sys
    data = load_dogs(sys.argv[1] if len(sys.argv) > 1 else "/kaggle/input")
    log("data", f"images {tuple(data.images.shape)} {data.images.dtype}, labels {tuple(data.labels.shape)}")
