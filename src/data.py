"""Read the Kaggle dog photos once: find the layout, parse the VOC boxes, crop every dog to a uint8 tensor."""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from src.console import log


class DataError(ValueError):
    """The data folder cannot be used (missing, empty, nothing loadable); the message says what was looked for."""


# Kaggle's all-dogs holds .jpg files (a few of them really PNGs: PIL sniffs the content, not the name).
DOG_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Below this many photos a process pool costs more than it saves.
DOG_POOL_MIN_PHOTOS = 512
# Skipped files named in the log before the rest are only counted.
DOG_SKIP_LOG_LIMIT = 5


# ---- sources: a folder on disk or a .zip read in place ------------------------------------------------
# A "source" is just a path string: a folder, or a .zip file whose entries are read without extracting.

def _dog_source_is_zip(source: str) -> bool:
    return source.lower().endswith(".zip") and os.path.isfile(source)


# One open ZipFile per (process, zip): forked workers must not share the parent's file offset.
_DOG_ZIP_HANDLES: dict = {}


def _dog_zip(source: str) -> zipfile.ZipFile:
    key = (os.getpid(), source)
    if key not in _DOG_ZIP_HANDLES:
        _DOG_ZIP_HANDLES[key] = zipfile.ZipFile(source)
    return _DOG_ZIP_HANDLES[key]


def _dog_source_files(source: str, recursive: bool) -> list[str]:
    """Names of the files in `source` ('/'-separated, relative), sorted."""
    if _dog_source_is_zip(source):
        return sorted(info.filename for info in _dog_zip(source).infolist() if not info.is_dir())
    if not recursive:
        with os.scandir(source) as entries:
            return sorted(e.name for e in entries if e.is_file())
    names = []
    for folder, _, files in os.walk(source):
        rel_folder = os.path.relpath(folder, source).replace(os.sep, "/")
        names.extend(f if rel_folder == "." else f"{rel_folder}/{f}" for f in files)
    return sorted(names)


def _dog_source_read(source: str, name: str) -> bytes:
    if _dog_source_is_zip(source):
        return _dog_zip(source).read(name)
    with open(os.path.join(source, name), "rb") as f:
        return f.read()


def _dog_is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(DOG_IMAGE_EXTENSIONS) and not base.startswith(".")  # no macOS ._ files


# ---- finding the Kaggle layout --------------------------------------------------------------------------

def _dog_folder_has_images(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    with os.scandir(folder) as entries:
        return any(e.is_file() and _dog_is_image_name(e.name) for e in entries)


def _dog_zip_has_images(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        return any(_dog_is_image_name(n) for n in _dog_zip(path).namelist())
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path} is not a readable zip file: {exc}") from exc


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


def parse_voc(xml_bytes: bytes) -> tuple[int, int, list[tuple[str, float, float, float, float]]]:
    """(width, height, [(breed_name, xmin, ymin, xmax, ymax), ...]) of one VOC file; raises DataError if malformed.

    width/height are 0 when <size> is missing; the breed is <name> ("" when empty).
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise DataError(f"malformed VOC XML: {exc}") from None
    try:
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
    except ValueError:
        raise DataError("VOC <size> holds a non-number") from None
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


def _dog_annotation_index(source: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """photo id -> (annotation file name, folder breed) and wnid -> folder breed."""
    by_id, by_wnid = {}, {}
    for name in _dog_source_files(source, recursive=True):
        parts = name.split("/")
        if len(parts) < 2 or parts[-1].startswith("."):
            continue
        folder, file = parts[-2], parts[-1]
        breed = _dog_breed_of_folder(folder)
        photo_id = file[:-4] if file.lower().endswith(".xml") else file
        by_id[photo_id] = (name, breed)
        by_wnid.setdefault(folder.split("-", 1)[0], breed)
    return by_id, by_wnid


# ---- decoding one photo into its dog crops --------------------------------------------------------------

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


def _dog_usable_boxes(boxes, xml_size, img_size, margin, counts) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Boxes in the photo's pixel frame, widened by margin and clipped; zero-area ones dropped and counted."""
    img_w, img_h = img_size
    xml_w, xml_h = xml_size
    # A VOC file written for another size of the same photo: map its boxes onto the stored pixels.
    sx = img_w / xml_w if xml_w > 0 and xml_h > 0 else 1.0
    sy = img_h / xml_h if xml_w > 0 and xml_h > 0 else 1.0
    if (sx, sy) != (1.0, 1.0):
        counts["rescaled_annotations"] += 1
    usable = []
    for name, xmin, ymin, xmax, ymax in boxes:
        xmin, xmax, ymin, ymax = xmin * sx, xmax * sx, ymin * sy, ymax * sy
        # widen by margin * box size on each side: [x0 - m*w, x1 + m*w]
        dx, dy = margin * (xmax - xmin), margin * (ymax - ymin)
        x0, y0, x1, y1 = max(0.0, xmin - dx), max(0.0, ymin - dy), min(img_w, xmax + dx), min(img_h, ymax + dy)
        if x1 - x0 < 1 or y1 - y0 < 1:
            counts["skipped_boxes"] += 1
            continue
        if xmin < 0 or ymin < 0 or xmax > img_w or ymax > img_h:
            counts["clipped_boxes"] += 1
        usable.append((name, (x0, y0, x1, y1)))
    return usable


def _dog_apply_draft(img: Image.Image, regions, size: int) -> float:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when every region keeps >= size pixels; returns that scale."""
    if img.format not in ("JPEG", "MPO"):
        return 1.0
    full_w, full_h = img.size
    smallest_side = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in regions)
    factor = next((f for f in (8, 4, 2) if smallest_side / f >= size), 1)
    if factor == 1:
        return 1.0
    img.draft(img.mode, (full_w // factor, full_h // factor))
    # libjpeg's scaled output is ceil(full / f) pixels; find the factor it actually used.
    w, h = img.size
    used = next((f for f in (8, 4, 2, 1) if -(-full_w // f) == w and -(-full_h // f) == h), 1)
    return 1.0 / used


def _dog_crop_resize(img: Image.Image, region, scale: float, size: int) -> np.ndarray:
    """Crop the region (full-resolution coordinates) from the possibly draft-scaled image -> 3 x size x size uint8."""
    w, h = img.size
    x0, y0, x1, y1 = (v * scale for v in region)
    # Whole pixels covering the region; at least one pixel wide and high.
    left, top = min(int(math.floor(x0 + 1e-6)), w - 1), min(int(math.floor(y0 + 1e-6)), h - 1)
    right, bottom = max(int(math.ceil(x1 - 1e-6)), left + 1), max(int(math.ceil(y1 - 1e-6)), top + 1)
    crop = _dog_to_rgb(img.crop((left, top, min(right, w), min(bottom, h))))
    crop = crop.resize((size, size), Image.LANCZOS)  # aspect not kept: the whole dog fills the square
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def _dog_centre_region(img_size) -> tuple[float, float, float, float]:
    w, h = img_size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return (left, top, left + side, top + side)


def _dog_decode_photo(image_source, annotation_source, task, margin, size, counts):
    """One photo -> ([3 x size x size uint8 crops], [breed name or None per crop]); raises on unreadable files."""
    image_name, annotation_name, folder_breed = task
    boxes, xml_size = [], (0, 0)
    if annotation_name is None:
        counts["no_annotation"] += 1
    else:
        try:
            xml_w, xml_h, boxes = parse_voc(_dog_source_read(annotation_source, annotation_name))
            xml_size = (xml_w, xml_h)
        except DataError:
            counts["bad_xml"] += 1
    img = Image.open(io.BytesIO(_dog_source_read(image_source, image_name)))
    # No EXIF transpose: Stanford's boxes refer to the stored pixel orientation, not the displayed one.
    usable = _dog_usable_boxes(boxes, xml_size, img.size, margin, counts)
    if usable:
        regions = [region for _, region in usable]
        names = [name or folder_breed for name, _ in usable]
    else:
        counts["centre_crops"] += 1
        xml_breed = next((name for name, *_ in boxes if name), None)
        regions, names = [_dog_centre_region(img.size)], [xml_breed or folder_breed]
    scale = _dog_apply_draft(img, regions, size)
    if scale < 1.0:
        counts["draft_decodes"] += 1
    crops = [_dog_crop_resize(img, region, scale, size) for region in regions]
    if len(crops) > 1:
        counts["multi_dog_photos"] += 1
    return crops, names


def _dog_decode_chunk(job):
    """Pool worker (top level, so pickling finds it in a bundled __main__ or a notebook): a list of photos."""
    image_source, annotation_source, tasks, margin, size = job
    counts, crops, names, skipped = Counter(), [], [], []
    for task in tasks:
        photo_counts = Counter()
        try:
            photo_crops, photo_names = _dog_decode_photo(image_source, annotation_source, task, margin, size,
                                                         photo_counts)
        except Exception as exc:  # any unreadable file (truncated JPEG, not an image) is a counted skip
            counts["skipped_files"] += 1
            skipped.append((task[0], f"{type(exc).__name__}: {exc}"))
            continue
        counts.update(photo_counts)
        crops.extend(photo_crops)
        names.extend(photo_names)
    stacked = np.stack(crops) if crops else np.zeros((0, 3, size, size), np.uint8)
    return stacked, names, counts, skipped


# ---- the loader -----------------------------------------------------------------------------------------

@dataclass
class DogData:
    """Every dog crop of the data set, decoded once."""
    images: torch.Tensor          # uint8 N x 3 x size x size, contiguous
    labels: torch.Tensor          # int64 N, index into breeds
    breeds: list[str]             # label id -> breed name, sorted by name
    counts: dict = field(default_factory=dict)  # photos, samples, multi_dog_photos, centre_crops, skipped_*, ...
    seconds: float = 0.0          # load time


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


def load_dogs(data_dir: str, crop_margin: float = 0.0, max_images: int = 0, workers: int = 0,
              size: int = 64) -> DogData:
    """Decode every photo under data_dir once and crop every annotated dog to size x size uint8.

    Photos without a usable box are centre-cropped; their label is the breed of the folder their wnid belongs to,
    else the most common breed of the set (or the single breed "dog" when there are no annotations at all).
    """
    start = time.time()
    data_dir = os.fspath(data_dir)
    image_source, annotation_source = find_kaggle_layout(data_dir)
    image_names = _dog_pick_subset([n for n in _dog_source_files(image_source, recursive=False)
                                    if _dog_is_image_name(n)], max_images)
    if annotation_source is None:
        log("data", f"warning: no Annotation folder or zip found near {image_source}; "
            f"every photo is centre-cropped and labelled 'dog'")
        by_id, by_wnid = {}, {}
    else:
        by_id, by_wnid = _dog_annotation_index(annotation_source)

    tasks = []
    for name in image_names:
        photo_id = os.path.splitext(name.rsplit("/", 1)[-1])[0]
        annotation_name, folder_breed = by_id.get(photo_id, (None, by_wnid.get(photo_id.split("_", 1)[0])))
        tasks.append((name, annotation_name, folder_breed))

    processes = _dog_worker_count(workers)
    if len(tasks) < DOG_POOL_MIN_PHOTOS and workers == 0:
        processes = 1
    # ~8 chunks per process balances the load; chunks of at least 16 keep the pickling overhead small.
    chunk = max(16, min(512, -(-len(tasks) // (processes * 8))))
    jobs = [(image_source, annotation_source, tasks[i:i + chunk], crop_margin, size)
            for i in range(0, len(tasks), chunk)]
    processes = min(processes, len(jobs))
    results, processes = _dog_run_jobs(jobs, processes)

    counts = Counter()
    names, skipped = [], []
    for _, chunk_names, chunk_counts, chunk_skipped in results:
        names.extend(chunk_names)
        counts.update(chunk_counts)
        skipped.extend(chunk_skipped)
    for file_name, reason in skipped[:DOG_SKIP_LOG_LIMIT]:
        log("data", f"skipped unreadable {file_name}: {reason}")
    if len(skipped) > DOG_SKIP_LOG_LIMIT:
        log("data", f"... and {len(skipped) - DOG_SKIP_LOG_LIMIT} more unreadable files")
    if not names:
        raise DataError(f"no usable dog images in {image_source}: {len(tasks)} photos found, "
                        f"{counts['skipped_files']} unreadable")

    known = Counter(n for n in names if n)
    fallback_breed = known.most_common(1)[0][0] if known else "dog"
    names = [n or fallback_breed for n in names]
    breeds = sorted(set(names))
    breed_id = {breed: i for i, breed in enumerate(breeds)}
    labels = torch.tensor([breed_id[n] for n in names], dtype=torch.int64)
    # Copy chunk by chunk into one tensor, dropping each chunk: peak memory stays near one copy of the set.
    images = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
    row = 0
    for i, (chunk_images, *_) in enumerate(results):
        images[row:row + len(chunk_images)] = torch.from_numpy(chunk_images)
        row += len(chunk_images)
        results[i] = None

    summary = {"photos": len(tasks), "samples": len(names), "breeds": len(breeds)}
    for key in ("multi_dog_photos", "centre_crops", "skipped_files", "skipped_boxes", "clipped_boxes",
                "no_annotation", "bad_xml", "rescaled_annotations", "draft_decodes"):
        summary[key] = counts.get(key, 0)
    summary["decode_processes"] = processes
    seconds = time.time() - start
    how = f"{processes} processes" if processes > 1 else "in-process"
    log("data", f"{summary['photos']} photos -> {summary['samples']} dogs of {len(breeds)} breeds in "
        f"{seconds:.1f}s ({how}) from {image_source}: "
        + ", ".join(f"{k} {v}" for k, v in summary.items()
                    if k not in ("photos", "samples", "breeds", "decode_processes")))
    return DogData(images=images, labels=labels, breeds=breeds, counts=summary, seconds=seconds)


if __name__ == "__main__":
    import sys
    data = load_dogs(sys.argv[1] if len(sys.argv) > 1 else "/kaggle/input")
    log("data", f"images {tuple(data.images.shape)} {data.images.dtype}, labels {tuple(data.labels.shape)}")
