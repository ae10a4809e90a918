"""A tiny generated dog data set in the Kaggle layout, for the demo and the tests."""
from __future__ import annotations

import colorsys
import io
import os

import numpy as np
from PIL import Image, ImageDraw

# Breeds of the tiny set: (name, body colour, head colour); more breeds get generated colours.
SYNTH_BREEDS = [
    ("Crimson_hound", (190, 40, 35), (120, 20, 20)),
    ("Azure_terrier", (40, 90, 200), (20, 50, 130)),
    ("Golden_retriever", (225, 170, 60), (170, 110, 30)),
    ("Moss_spaniel", (60, 150, 60), (30, 90, 30)),
    ("Snow_samoyed", (240, 240, 235), (200, 200, 195)),
    ("Coal_labrador", (35, 35, 40), (15, 15, 20)),
    ("Violet_poodle", (150, 70, 180), (95, 40, 120)),
    ("Rust_setter", (170, 80, 30), (110, 50, 15)),
]


def _synth_breed(i: int) -> tuple[str, tuple, tuple]:
    if i < len(SYNTH_BREEDS):
        return SYNTH_BREEDS[i]
    # Golden-ratio hues give well separated colours for any number of extra breeds.
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.85)
    body = (int(r * 255), int(g * 255), int(b * 255))
    return f"Breed{i:03d}_synth", body, tuple(c * 2 // 3 for c in body)


def _synth_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Muted vertical gradient (sky to ground) with grain: texture for D to see, unlike any dog colour."""
    top = rng.uniform(120, 220, 3)
    bottom = rng.uniform(40, 140, 3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = top * (1 - t) + bottom * t + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _synth_draw_dog(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, body_w: float,
                    body_colour, head_colour, facing_right: bool) -> tuple[int, int, int, int]:
    """Body ellipse, head, ears, legs and tail with (x, y) the body's top-left; returns the dog's box."""
    body_h = body_w * rng.uniform(0.45, 0.6)
    head_r = body_w * rng.uniform(0.18, 0.24)
    leg_w, leg_h = body_w * 0.08, body_h * 0.7
    direction = 1 if facing_right else -1
    head_cx = x + (body_w if facing_right else 0) + direction * head_r * 0.6
    head_cy = y - head_r * 0.3
    parts = []  # every drawn shape's bounding box, to frame the dog
    for leg_x in (0.12, 0.3, 0.62, 0.8):
        lx = x + body_w * leg_x
        parts.append((lx, y + body_h * 0.6, lx + leg_w, y + body_h * 0.6 + leg_h))
        draw.rectangle(parts[-1], fill=head_colour)
    tail_x = x + (0 if facing_right else body_w)
    parts.append((min(tail_x, tail_x - direction * body_w * 0.2), y - body_h * 0.25,
                  max(tail_x, tail_x - direction * body_w * 0.2), y + body_h * 0.3))
    draw.line([(tail_x, y + body_h * 0.3), (tail_x - direction * body_w * 0.2, y - body_h * 0.25)],
              fill=head_colour, width=max(2, int(leg_w * 0.8)))
    parts.append((x, y, x + body_w, y + body_h))
    draw.ellipse(parts[-1], fill=body_colour)
    ear = (head_cx - direction * head_r * 0.5, head_cy - head_r * 1.5)
    parts.append((min(ear[0], head_cx) - head_r * 0.4, ear[1], max(ear[0], head_cx) + head_r * 0.4, head_cy))
    ear_base_y = head_cy - head_r * 0.5
    draw.polygon([ear, (head_cx - head_r * 0.4, ear_base_y), (head_cx + head_r * 0.4, ear_base_y)], fill=head_colour)
    parts.append((head_cx - head_r, head_cy - head_r, head_cx + head_r, head_cy + head_r))
    draw.ellipse(parts[-1], fill=head_colour)
    eye_x = head_cx + direction * head_r * 0.4
    draw.ellipse((eye_x - 1.5, head_cy - head_r * 0.3 - 1.5, eye_x + 1.5, head_cy - head_r * 0.3 + 1.5), fill=(0, 0, 0))
    return (int(min(p[0] for p in parts)), int(min(p[1] for p in parts)),
            int(np.ceil(max(p[2] for p in parts))), int(np.ceil(max(p[3] for p in parts))))


def _synth_voc(photo_id: str, wnid: str, width: int, height: int, objects) -> str:
    """The Stanford Dogs VOC XML of one photo."""
    blocks = "".join(
        f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation>\n\t<folder>{wnid[1:]}</folder>\n\t<filename>{photo_id}</filename>\n"
            f"\t<source>\n\t\t<database>ImageNet database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segment>0</segment>\n{blocks}</annotation>")


def _synth_write(path: str, data: bytes) -> None:
    """Write by renaming a finished hidden file into place: ranks that generate the same data set side by side
    (--demo with several processes) write identical bytes, and a reader sees a whole file, old or new."""
    tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp_path, "wb") as f:
        f.write(data)
    os.replace(tmp_path, path)


def make_tiny_dataset(root: str, n_images: int = 96, n_breeds: int = 4, seed: int = 0) -> str:
    """Write n_images JPEG photos of coloured cartoon dogs (~1 in 4 with two dogs) and their VOC boxes under root.

    Kaggle layout: root/all-dogs/<id>.jpg and root/Annotation/<wnid>-<Breed>/<id>. Deterministic for a seed.
    """
    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "all-dogs"), exist_ok=True)
    for index in range(n_images):
        breed_index = index % n_breeds
        breed, body_colour, head_colour = _synth_breed(breed_index)
        wnid = f"n{90000000 + breed_index:08d}"
        photo_id = f"{wnid}_{index}"
        width, height = int(rng.integers(80, 161)), int(rng.integers(80, 161))
        img = _synth_background(rng, width, height)
        draw = ImageDraw.Draw(img)
        n_dogs = 2 if rng.random() < 0.25 else 1
        objects = []
        for dog in range(n_dogs):
            # Each dog gets its own horizontal slot; head, ears and tail reach ~0.45 body widths past the body.
            slot_w = width / n_dogs
            body_w = min(slot_w * rng.uniform(0.38, 0.5), height * 0.75)
            x = dog * slot_w + 0.45 * body_w + rng.random() * (slot_w - 1.9 * body_w)
            y = 0.45 * body_w + rng.random() * max(0.0, height - 1.25 * body_w)
            box = _synth_draw_dog(draw, rng, x, y, body_w, body_colour, head_colour, bool(rng.random() < 0.5))
            x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])
            objects.append((breed, (x0, y0, x1, y1)))
        jpeg = io.BytesIO()
        img.save(jpeg, format="JPEG", quality=90)
        _synth_write(os.path.join(root, "all-dogs", f"{photo_id}.jpg"), jpeg.getvalue())
        folder = os.path.join(root, "Annotation", f"{wnid}-{breed}")
        os.makedirs(folder, exist_ok=True)
        _synth_write(os.path.join(folder, photo_id), _synth_voc(photo_id, wnid, width, height, objects).encode())
    return root


if __name__ == "__main__":
    import sys
    print(make_tiny_dataset(sys.argv[1] if len(sys.argv) > 1 else "tiny_dogs"))
