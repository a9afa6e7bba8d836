"""Draw one embedded street view and its ADE20K mask.

A pinhole camera one unit above the ground looks east along a straight road. A ground point at
depth ``z`` (>= 1) and lateral offset ``x`` (road units, + = right) lands at screen
``(vpx + f·x/z, h + f·(1 - height)/z)``. Every primitive is drawn into the RGB image and, with
its class id, into the mask, so the mask is exact by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from georeasoner.world import facts
from georeasoner.world.ade20k import CLASS_ID, UNLABELLED
from georeasoner.world.facts import CountryStyle

C = CLASS_ID


@dataclass
class Scene:
    """What to draw: the country/city style and which clue kinds are visible."""

    style: CountryStyle | None
    city: facts.City | None
    kinds: frozenset[str]  # clue kinds shown, e.g. {"drive", "centre", "facade"}
    backdrop: str = "street"  # street | wall | field | plain_road (clue-free backdrops)


class Canvas:
    """An RGB image and its class mask, drawn together."""

    def __init__(self, size: int):
        self.size = size
        self.img = Image.new("RGB", (size, size))
        self.mask = Image.new("L", (size, size), UNLABELLED)
        self.di = ImageDraw.Draw(self.img)
        self.dm = ImageDraw.Draw(self.mask)

    def polygon(self, pts, color, cls: int) -> None:
        pts = [(float(x), float(y)) for x, y in pts]
        self.di.polygon(pts, fill=tuple(color))
        self.dm.polygon(pts, fill=cls)

    def rect(self, box, color, cls: int) -> None:
        x0, y0, x1, y1 = box
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color, cls)

    def ellipse(self, box, color, cls: int) -> None:
        self.di.ellipse(box, fill=tuple(color))
        self.dm.ellipse(box, fill=cls)

    def line(self, pts, color, width: float, cls: int | None) -> None:
        w = max(1, int(round(width)))
        self.di.line(pts, fill=tuple(color), width=w)
        if cls is not None:
            self.dm.line(pts, fill=cls, width=w)


class Camera:
    """Ground-plane perspective for one image."""

    def __init__(self, size: int, horizon: float, vpx: float):
        self.h = horizon
        self.vpx = vpx
        self.f = size - horizon

    def pt(self, x: float, z: float, height: float = 0.0) -> tuple[float, float]:
        return self.vpx + self.f * x / z, self.h + self.f * (1.0 - height) / z

    def quad_ground(self, x0: float, x1: float, z0: float, z1: float):
        return [self.pt(x0, z0), self.pt(x1, z0), self.pt(x1, z1), self.pt(x0, z1)]

    def scale(self, z: float) -> float:
        return self.f / z


def _jitter(rng: np.random.Generator, color, amount: int = 12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _sky(cv: Canvas, rng, horizon: float) -> None:
    kind = rng.choice(["clear", "overcast", "hazy"])
    top, bottom = {
        "clear": ((60, 120, 200), (165, 200, 232)),
        "overcast": ((150, 154, 160), (205, 205, 208)),
        "hazy": ((140, 170, 200), (215, 220, 225)),
    }[kind]
    top, bottom = _jitter(rng, top, 10), _jitter(rng, bottom, 10)
    hy = int(math.ceil(horizon))
    for y in range(hy + 1):
        t = y / max(hy, 1)
        cv.di.line([(0, y), (cv.size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    cv.dm.rectangle([0, 0, cv.size, hy], fill=C["sky"])


def _sun(cv: Canvas, style: CountryStyle) -> None:
    s = cv.size
    cx = s * (0.84 if style.hemisphere == "N" else 0.16)
    cy, r = s * 0.12, s * 0.055
    cv.di.ellipse([cx - 1.9 * r, cy - 1.9 * r, cx + 1.9 * r, cy + 1.9 * r], fill=(250, 236, 180))
    cv.di.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 252, 225))


def _landmark(cv: Canvas, rng, city: facts.City, horizon: float) -> None:
    s = cv.size
    cx = s * rng.uniform(0.35, 0.65)
    hgt = s * rng.uniform(0.26, 0.36)
    w = s * rng.uniform(0.07, 0.1)
    col = _jitter(rng, (62, 66, 84), 8)
    top = horizon - hgt
    t = C["tower"]
    shape = city.landmark
    if shape == "spire":
        cv.polygon([(cx - w / 2, horizon), (cx - w / 2, top + hgt * 0.45), (cx, top), (cx + w / 2, top + hgt * 0.45), (cx + w / 2, horizon)], col, t)
    elif shape == "dome":
        cv.rect([cx - w, top + hgt * 0.5, cx + w, horizon], col, t)
        cv.ellipse([cx - w * 0.9, top + hgt * 0.15, cx + w * 0.9, top + hgt * 0.85], col, t)
        cv.rect([cx - 1.5, top, cx + 1.5, top + hgt * 0.2], col, t)
    elif shape == "needle":
        cv.rect([cx - w * 0.12, top + hgt * 0.1, cx + w * 0.12, horizon], col, t)
        cv.ellipse([cx - w * 0.4, top + hgt * 0.25, cx + w * 0.4, top + hgt * 0.25 + w * 0.8], col, t)
        cv.rect([cx - 1, top, cx + 1, top + hgt * 0.12], col, t)
    elif shape == "twin_towers":
        for dx in (-w * 0.7, w * 0.7):
            cv.rect([cx + dx - w * 0.45, top, cx + dx + w * 0.45, horizon], col, t)
    elif shape == "pagoda":
        tiers = 4
        for i in range(tiers):
            y0 = horizon - hgt * (i + 1) / tiers
            half = w * (1.2 - 0.22 * i)
            cv.polygon([(cx - half, y0 + hgt / tiers), (cx - half * 0.6, y0), (cx + half * 0.6, y0), (cx + half, y0 + hgt / tiers)], col, t)
        cv.rect([cx - 1, top - hgt * 0.1, cx + 1, top], col, t)
    elif shape == "arch":
        cv.rect([cx - w * 1.2, top + hgt * 0.35, cx + w * 1.2, horizon], col, t)
        cv.ellipse([cx - w * 0.45, top + hgt * 0.55, cx + w * 0.45, horizon + hgt * 0.25], _jitter(rng, (170, 190, 210), 5), C["sky"])
    elif shape == "pyramid":
        cv.polygon([(cx - w * 1.4, horizon), (cx, top + hgt * 0.3), (cx + w * 1.4, horizon)], col, t)
    elif shape == "clock_tower":
        cv.rect([cx - w * 0.4, top + hgt * 0.15, cx + w * 0.4, horizon], col, t)
        cv.polygon([(cx - w * 0.45, top + hgt * 0.15), (cx, top), (cx + w * 0.45, top + hgt * 0.15)], col, t)
        cv.ellipse([cx - w * 0.25, top + hgt * 0.22, cx + w * 0.25, top + hgt * 0.22 + w * 0.5], (225, 220, 200), t)
    elif shape == "onion_dome":
        for dx, sc in ((-w, 0.7), (0, 1.0), (w, 0.7)):
            bh = hgt * sc
            cv.rect([cx + dx - w * 0.3, horizon - bh * 0.55, cx + dx + w * 0.3, horizon], col, t)
            cv.ellipse([cx + dx - w * 0.42, horizon - bh * 0.8, cx + dx + w * 0.42, horizon - bh * 0.5], col, t)
            cv.polygon([(cx + dx - w * 0.2, horizon - bh * 0.76), (cx + dx, horizon - bh), (cx + dx + w * 0.2, horizon - bh * 0.76)], col, t)
    elif shape == "bridge_towers":
        for dx in (-w * 1.5, w * 1.5):
            cv.rect([cx + dx - w * 0.15, top, cx + dx + w * 0.15, horizon], col, t)
            cv.rect([cx + dx - w * 0.3, top + hgt * 0.3, cx + dx + w * 0.3, top + hgt * 0.36], col, t)
        cv.line([(cx - w * 3, horizon - hgt * 0.3), (cx - w * 1.5, top), (cx, horizon - hgt * 0.35), (cx + w * 1.5, top), (cx + w * 3, horizon - hgt * 0.3)], col, 2, t)
    elif shape == "stepped_tower":
        for i in range(4):
            half = w * (1.0 - 0.2 * i)
            cv.rect([cx - half, horizon - hgt * (i + 1) / 4, cx + half, horizon - hgt * i / 4], col, t)
    elif shape == "mountain_peak":
        m = C["mountain"]
        cv.polygon([(cx - w * 4, horizon), (cx - w * 1.5, top + hgt * 0.35), (cx + w * 1.5, top + hgt * 0.3), (cx + w * 4, horizon)], _jitter(rng, (80, 96, 90), 6), m)
        cv.rect([cx - w * 0.12, top + hgt * 0.05, cx + w * 0.12, top + hgt * 0.32], col, t)
    else:
        raise ValueError(f"unknown landmark '{shape}'")


def _facade_quad(cam: Camera, x: float, z0: float, z1: float, height: float):
    return [cam.pt(x, z0, 0), cam.pt(x, z0, height), cam.pt(x, z1, height), cam.pt(x, z1, 0)]


def _buildings(cv: Canvas, cam: Camera, rng, road_w: float, colour_of, sides=(-1, 1)) -> None:
    for side in sides:
        x = side * (road_w + rng.uniform(0.7, 1.1))
        z = 1.05
        while z < 14:
            length = rng.uniform(1.5, 4.0)
            height = rng.uniform(1.6, 4.5)
            col = colour_of()
            z1 = min(z + length, 30)
            cv.polygon(_facade_quad(cam, x, z, z1, height), col, C["building"])
            win = tuple(max(0, c - 60) for c in col)
            for zz in np.arange(z + 0.3, z1 - 0.3, 0.8):
                for hh in np.arange(1.3, height - 0.4, 0.9):
                    cv.polygon([cam.pt(x, zz, hh), cam.pt(x, zz, hh + 0.45), cam.pt(x, zz + 0.35, hh + 0.45), cam.pt(x, zz + 0.35, hh)], win, C["building"])
            z = z1 + rng.uniform(0.0, 0.4)


def _ground(cv: Canvas, cam: Camera, colour, cls: int) -> None:
    cv.rect([0, cam.h, cv.size, cv.size], colour, cls)


def _road(cv: Canvas, cam: Camera, rng, road_w: float) -> None:
    grey = int(rng.integers(70, 112))
    cv.polygon(cam.quad_ground(-road_w, road_w, 1.0, 400.0), (grey, grey, grey + 4), C["road"])


def _strip(cv: Canvas, cam: Camera, x: float, width: float, colour, pattern: str, cls: int, rng) -> None:
    """A painted strip along the road at lateral ``x``: solid, dashed, short_dashed or double."""
    if pattern == "double":
        for dx in (-width * 0.9, width * 0.9):
            _strip(cv, cam, x + dx, width * 0.7, colour, "solid", cls, rng)
        return
    if pattern == "solid":
        segs = [(1.0, 200.0)]
    else:
        on, off = (1.2, 1.2) if pattern == "dashed" else (0.5, 0.6)
        start = 1.0 + rng.uniform(0, on + off)
        segs, z = [], start
        while z < 60:
            segs.append((z, z + on))
            z += on + off
    for z0, z1 in segs:
        cv.polygon(cam.quad_ground(x - width / 2, x + width / 2, z0, z1), colour, cls)


def _kerb(cv: Canvas, cam: Camera, road_w: float, colours) -> None:
    for side in (-1, 1):
        x0, x1 = sorted((side * road_w, side * (road_w + 0.07)))
        z, i = 1.0, 0
        while z < 60:
            cv.polygon(cam.quad_ground(x0, x1, z, z + 0.5), colours[i % 2], C["sidewalk"])
            z += 0.5
            i += 1


def _post(cv: Canvas, cam: Camera, x: float, z: float, height: float, width: float, colour, cls: int):
    sx, sy = cam.pt(x, z, 0)
    _, ty = cam.pt(x, z, height)
    half = max(1.0, cam.scale(z) * width / 2)
    cv.rect([sx - half, ty, sx + half, sy], colour, cls)
    return sx, ty, half


def _bollards(cv: Canvas, cam: Camera, road_w: float, key: str) -> None:
    body, band, reflector, _ = facts.BOLLARDS[key]
    for side in (-1, 1):
        for z in np.arange(1.6, 14, 1.6):
            x = side * (road_w + 0.25)
            sx, ty, half = _post(cv, cam, x, z, 0.5, 0.11, body, C["pole"])
            sc = cam.scale(z)
            if band is not None:
                cv.rect([sx - half, ty + 0.08 * sc, sx + half, ty + 0.16 * sc], band, C["pole"])
            cv.rect([sx - half * 0.6, ty + 0.02 * sc, sx + half * 0.6, ty + 0.07 * sc], reflector, C["pole"])


def _trees(cv: Canvas, cam: Camera, rng, road_w: float, veg: str) -> None:
    leaf, _, shape, _, _ = facts.VEGETATION[veg]
    trunk = (90, 70, 50)
    cls = C["palm"] if shape == "palm" else C["tree"]
    spots = [(side, z) for side in (-1, 1) for z in np.arange(rng.uniform(1.8, 2.6), 16, rng.uniform(2.2, 3.2))]
    for side, z in sorted(spots, key=lambda s: -s[1]):
        x = side * (road_w + rng.uniform(0.45, 0.65))
        h = rng.uniform(2.0, 3.2)
        sx, ty, half = _post(cv, cam, x, z, h * 0.55, 0.12, trunk, cls)
        sc = cam.scale(z)
        col = _jitter(rng, leaf, 10)
        if shape == "round":
            r = 0.7 * sc
            cv.ellipse([sx - r, ty - r * 1.1, sx + r, ty + r * 0.5], col, cls)
        elif shape == "conifer":
            cv.polygon([(sx - 0.55 * sc, ty + 0.3 * sc), (sx, ty - 1.3 * sc), (sx + 0.55 * sc, ty + 0.3 * sc)], col, cls)
        elif shape == "palm":
            _post(cv, cam, x, z, h, 0.08, trunk, cls)
            _, top = cam.pt(x, z, h)
            for ang in (-150, -120, -60, -30, -90):
                a = math.radians(ang)
                cv.line([(sx, top), (sx + math.cos(a) * 0.8 * sc, top - math.sin(a) * -0.45 * sc)], col, max(2, 0.12 * sc), cls)
        elif shape == "scrub":
            for dx in (-0.3, 0.1, 0.35):
                r = 0.35 * sc
                cv.ellipse([sx + dx * sc - r, ty - r * 1.3, sx + dx * sc + r, ty + r * 0.2], col, cls)
        elif shape == "acacia":
            cv.ellipse([sx - 0.9 * sc, ty - 0.35 * sc, sx + 0.9 * sc, ty + 0.05 * sc], col, cls)


def _wires(cv: Canvas, cam: Camera, road_w: float) -> None:
    concrete = (150, 150, 146)
    for side in (-1, 1):
        tops = []
        for z in np.arange(1.8, 16, 2.4):
            x = side * (road_w + 0.35)
            sx, ty, _ = _post(cv, cam, x, z, 3.2, 0.1, concrete, C["pole"])
            sc = cam.scale(z)
            cv.rect([sx - 0.3 * sc, ty + 0.15 * sc, sx + 0.3 * sc, ty + 0.2 * sc], concrete, C["pole"])
            tops.append((sx, ty, sc))
        for k in range(4):
            pts = [(sx, ty + (0.15 + 0.25 * k) * sc) for sx, ty, sc in tops]
            cv.line(pts, (40, 40, 40), 1, C["pole"])
        cv.line([(tops[0][0], tops[0][1] + 0.3 * tops[0][2]), (cam.vpx, cam.h - cv.size * 0.15)], (40, 40, 40), 1, C["pole"])


def _warning_sign(cv: Canvas, cam: Camera, rng, road_w: float, kind: str) -> None:
    side = rng.choice([-1, 1])
    z = rng.uniform(1.8, 3.0)
    x = side * (road_w + 0.35)
    sx, ty, _ = _post(cv, cam, x, z, 1.7, 0.06, (160, 160, 160), C["pole"])
    r = 0.42 * cam.scale(z)
    cy = ty - r * 0.4
    sb = C["signboard"]
    if kind == "yellow_diamond":
        cv.polygon([(sx, cy - r), (sx + r, cy), (sx, cy + r), (sx - r, cy)], (20, 20, 20), sb)
        k = 0.82
        cv.polygon([(sx, cy - r * k), (sx + r * k, cy), (sx, cy + r * k), (sx - r * k, cy)], (245, 200, 20), sb)
        cv.rect([sx - r * 0.08, cy - r * 0.45, sx + r * 0.08, cy + r * 0.2], (20, 20, 20), sb)
    elif kind in ("red_triangle", "yellow_triangle"):
        inner = (245, 245, 245) if kind == "red_triangle" else (245, 205, 30)
        cv.polygon([(sx - r, cy + r * 0.7), (sx, cy - r), (sx + r, cy + r * 0.7)], (210, 25, 30), sb)
        cv.polygon([(sx - r * 0.62, cy + r * 0.48), (sx, cy - r * 0.45), (sx + r * 0.62, cy + r * 0.48)], inner, sb)
        cv.rect([sx - r * 0.06, cy - r * 0.15, sx + r * 0.06, cy + r * 0.3], (20, 20, 20), sb)
    elif kind == "inverted_red_triangle":
        cv.polygon([(sx - r, cy - r * 0.7), (sx + r, cy - r * 0.7), (sx, cy + r)], (215, 25, 30), sb)
        for i in range(3):
            x0 = sx - r * 0.45 + i * r * 0.32
            cv.rect([x0, cy - r * 0.45, x0 + r * 0.18, cy - r * 0.3], (245, 245, 245), sb)
    else:
        raise ValueError(f"unknown sign '{kind}'")


# Glyph strokes in a unit box: ("l", x0, y0, x1, y1) line, ("o", cx, cy, r) circle, ("a", x0, y0, x1, y1, start, end) arc.
_GLYPHS = {
    "cyrillic": [
        [("l", .2, 0, .2, 1), ("l", .8, 0, .8, 1), ("l", .2, 1, .8, 0)],  # И
        [("l", .5, 0, .5, 1), ("l", .1, 0, .9, 1), ("l", .9, 0, .1, 1)],  # Ж
        [("l", .3, 0, .1, .8), ("l", .3, 0, .8, 0), ("l", .8, 0, .8, .8), ("l", 0, .8, 1, .8), ("l", 0, .8, 0, 1), ("l", 1, .8, 1, 1)],  # Д
        [("l", .8, 0, .8, 1), ("a", .1, 0, .8, .55, 90, 270), ("l", .45, .55, .1, 1)],  # Я
        [("l", .1, 0, .1, 1), ("l", .5, 0, .5, 1), ("l", .9, 0, .9, 1), ("l", .1, 1, .9, 1)],  # Ш
        [("l", .1, 1, .4, 0), ("l", .4, 0, .9, 0), ("l", .9, 0, .9, 1)],  # Л
    ],
    "devanagari": [
        [("l", .8, 0, .8, 1), ("a", .1, .2, .7, .7, 90, 300)],
        [("l", .75, 0, .75, 1), ("o", .35, .45, .2), ("l", .35, .65, .55, 1)],
        [("l", .8, 0, .8, 1), ("a", .05, .1, .55, .55, 180, 360), ("a", .05, .45, .55, .95, 0, 180)],
        [("l", .5, 0, .5, .6), ("a", .2, .4, .8, .95, 0, 180)],
    ],
    "thai": [
        [("o", .2, .8, .13), ("l", .2, .67, .2, .2), ("a", .2, 0, .85, .5, 180, 360), ("l", .85, .25, .85, 1)],
        [("o", .15, .25, .12), ("l", .15, .37, .15, 1), ("l", .15, 1, .85, 1), ("l", .85, 1, .85, .2)],
        [("a", .1, 0, .9, .6, 180, 360), ("l", .1, .3, .1, 1), ("o", .85, .85, .12)],
        [("o", .5, .8, .15), ("a", .2, .1, .8, .7, 200, 340), ("l", .8, .4, .8, 1)],
    ],
    "japanese": [
        [("l", .1, .2, .9, .2), ("l", .5, 0, .5, 1), ("l", .2, .6, .8, .6)],  # 十-like
        [("l", .15, .1, .85, .1), ("l", .15, .1, .15, .9), ("l", .85, .1, .85, .9), ("l", .15, .9, .85, .9), ("l", .15, .5, .85, .5)],  # 日
        [("l", .5, 0, .5, .4), ("l", .1, .4, .9, .4), ("l", .5, .4, .1, 1), ("l", .5, .4, .9, 1)],  # 大
        [("a", .1, .1, .9, .9, 200, 60), ("l", .3, 0, .6, .5)],  # kana curve
        [("l", .2, .2, .8, .2), ("l", .8, .2, .4, 1), ("l", .3, .55, .7, .55)],  # kana
        [("l", .1, .3, .9, .3), ("l", .1, .7, .9, .7), ("l", .35, 0, .35, 1), ("l", .65, 0, .65, 1)],  # 井
    ],
}

_LATIN_WORDS = ["CAFE", "HOTEL", "BAKERY", "PHARMACY", "MARKET", "BANK", "SHOP", "PIZZA", "BAR", "GARAGE"]


def _draw_glyph(di: ImageDraw.ImageDraw, strokes, box, colour, width: int) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    for s in strokes:
        if s[0] == "l":
            di.line([(x0 + s[1] * w, y0 + s[2] * h), (x0 + s[3] * w, y0 + s[4] * h)], fill=colour, width=width)
        elif s[0] == "o":
            cx, cy, r = x0 + s[1] * w, y0 + s[2] * h, s[3] * min(w, h)
            di.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
        elif s[0] == "a":
            di.arc([x0 + s[1] * w, y0 + s[2] * h, x0 + s[3] * w, y0 + s[4] * h], s[5], s[6], fill=colour, width=width)


def _script_board(cv: Canvas, cam: Camera, rng, road_w: float, script: str) -> None:
    side = rng.choice([-1, 1])
    z = rng.uniform(2.2, 3.4)
    x = side * (road_w + 0.55)
    sc = cam.scale(z)
    cx, bottom = cam.pt(x, z, 1.2)
    w, h = 1.7 * sc, 0.6 * sc
    box = [cx - w / 2, bottom - h, cx + w / 2, bottom]
    for px in (cx - w * 0.35, cx + w * 0.35):
        _post(cv, cam, x + (px - cx) / sc, z, 1.2, 0.05, (120, 120, 120), C["pole"])
    bg = _jitter(rng, rng.choice([(250, 250, 245), (30, 90, 160), (170, 30, 40), (30, 110, 60)]), 8)
    fg = (20, 20, 20) if sum(bg) > 500 else (250, 250, 250)
    cv.rect(box, bg, C["signboard"])
    pad = h * 0.18
    inner = [box[0] + pad, box[1] + pad, box[2] - pad, box[3] - pad]
    width = max(1, int(h * 0.08))
    if script == "latin":
        word = str(rng.choice(_LATIN_WORDS))
        font = ImageFont.load_default(size=max(8, int(inner[3] - inner[1])))
        cv.di.text((inner[0], inner[1]), word, fill=fg, font=font)
        return
    glyphs = _GLYPHS[script]
    n = max(3, int((inner[2] - inner[0]) / (inner[3] - inner[1]) * 1.1))
    gw = (inner[2] - inner[0]) / n
    if script == "devanagari":
        cv.di.line([(inner[0], inner[1]), (inner[2], inner[1])], fill=fg, width=width + 1)
    for i in range(n):
        g = glyphs[int(rng.integers(len(glyphs)))]
        gbox = [inner[0] + i * gw + gw * 0.1, inner[1], inner[0] + (i + 1) * gw - gw * 0.1, inner[3]]
        if script == "thai":
            gbox[1] += (gbox[3] - gbox[1]) * 0.25
        _draw_glyph(cv.di, g, gbox, fg, width)


_CAR_COLOURS = [(200, 200, 205), (30, 30, 35), (160, 20, 25), (30, 60, 140), (235, 235, 235), (90, 95, 100), (130, 110, 80)]


def _car(cv: Canvas, cam: Camera, rng, road_w: float, style: CountryStyle, show_plate: bool) -> None:
    lane = 1 if style.drive == "right" else -1
    z = rng.uniform(2.0, 3.2)
    x = lane * road_w * 0.5
    sc = cam.scale(z)
    cx, ground = cam.pt(x, z, 0)
    w = 0.8 * sc
    body = _jitter(rng, _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))], 10)
    car = C["car"]
    cv.rect([cx - w / 2, ground - 0.5 * sc, cx + w / 2, ground - 0.08 * sc], body, car)
    cv.polygon([(cx - w * 0.42, ground - 0.5 * sc), (cx - w * 0.32, ground - 0.8 * sc), (cx + w * 0.32, ground - 0.8 * sc), (cx + w * 0.42, ground - 0.5 * sc)], body, car)
    cv.polygon([(cx - w * 0.36, ground - 0.52 * sc), (cx - w * 0.28, ground - 0.75 * sc), (cx + w * 0.28, ground - 0.75 * sc), (cx + w * 0.36, ground - 0.52 * sc)], (45, 55, 65), car)
    for sgn in (-1, 1):
        cv.rect([cx + sgn * w * 0.45 - w * 0.05, ground - 0.42 * sc, cx + sgn * w * 0.45 + w * 0.05, ground - 0.32 * sc], (200, 20, 20), car)
        cv.rect([cx + sgn * w * 0.35 - w * 0.06, ground - 0.1 * sc, cx + sgn * w * 0.35 + w * 0.06, ground], (15, 15, 15), car)
    pw, ph = 0.34 * sc, 0.12 * sc
    pbox = [cx - pw / 2, ground - 0.3 * sc, cx + pw / 2, ground - 0.3 * sc + ph]
    if not show_plate:
        cv.rect(pbox, (150, 150, 150), car)  # blurred, as street-view imagery does
        return
    bg, band, where, _ = facts.PLATES[style.plate]
    cv.rect(pbox, bg, car)
    bw = pw * 0.14
    if where in ("left", "both"):
        cv.rect([pbox[0], pbox[1], pbox[0] + bw, pbox[3]], band, car)
    if where in ("right", "both"):
        cv.rect([pbox[2] - bw, pbox[1], pbox[2], pbox[3]], band, car)
    if where == "top":
        cv.rect([pbox[0], pbox[1], pbox[2], pbox[1] + ph * 0.3], band, car)
    text = band if where == "text" else (25, 25, 25)
    for i in range(4):
        tx = pbox[0] + pw * (0.22 + 0.16 * i)
        cv.rect([tx, pbox[1] + ph * 0.4, tx + pw * 0.08, pbox[3] - ph * 0.15], text, car)


def _neutral(rng, base=(150, 146, 140), amount=18):
    return _jitter(rng, base, amount)


def _backdrop(cv: Canvas, cam: Camera, rng, kind: str, road_w: float) -> None:
    s = cv.size
    if kind == "wall":
        col = _neutral(rng, (176, 168, 156), 22)
        top = cam.h * rng.uniform(0.1, 0.5)
        cv.rect([0, top, s, s], col, C["wall"])
        mortar = tuple(max(0, c - 25) for c in col)
        step = s / rng.integers(10, 18)
        for i, y in enumerate(np.arange(top + step, s, step)):
            cv.di.line([(0, y), (s, y)], fill=mortar, width=1)
            off = (i % 2) * step
            for x in np.arange(off, s, step * 2):
                cv.di.line([(x, y - step), (x, y)], fill=mortar, width=1)
    elif kind == "field":
        cv.polygon([(0, cam.h), (s * 0.3, cam.h - s * rng.uniform(0.05, 0.15)), (s * 0.7, cam.h - s * 0.04), (s, cam.h - s * rng.uniform(0.03, 0.12)), (s, cam.h)], _neutral(rng, (120, 125, 130), 10), C["mountain"])
        cv.rect([0, cam.h, s, s], _neutral(rng, (150, 150, 120), 15), C["field"])
    elif kind == "plain_road":
        _ground(cv, cam, _neutral(rng), C["sidewalk"])
        _road(cv, cam, rng, road_w)


def render(scene: Scene, rng: np.random.Generator, size: int = 256) -> tuple[Image.Image, Image.Image]:
    """Draw ``scene``; returns (RGB image, mask of ADE20K ids with 255 = unlabelled)."""
    cv = Canvas(size)
    cam = Camera(size, horizon=size * rng.uniform(0.40, 0.50), vpx=size * rng.uniform(0.44, 0.56))
    road_w = rng.uniform(0.75, 1.0)
    _sky(cv, rng, cam.h)
    style, kinds = scene.style, scene.kinds
    if scene.backdrop != "street":
        _backdrop(cv, cam, rng, scene.backdrop, road_w)
    else:
        if "sun" in kinds:
            _sun(cv, style)
        if "landmark" in kinds:
            _landmark(cv, rng, scene.city, cam.h)
        if "vegetation" in kinds:
            _, ground, _, ground_cls, _ = facts.VEGETATION[style.vegetation]
            _ground(cv, cam, _jitter(rng, ground, 10), C[ground_cls])
        else:
            _ground(cv, cam, _neutral(rng), C["sidewalk"])
        facade = facts.FACADES[scene.city.facade] if "facade" in kinds else None
        if facade is not None or rng.random() < 0.5:
            _buildings(cv, cam, rng, road_w, (lambda: _jitter(rng, facade, 12)) if facade else (lambda: _neutral(rng, (165, 160, 152), 20)))
        _road(cv, cam, rng, road_w)
        if "kerb" in kinds:
            _kerb(cv, cam, road_w, facts.KERBS[style.kerb][0])
        if "edge" in kinds:
            colour, pattern, _ = facts.LINE_STYLES[style.edge]
            for side in (-1, 1):
                _strip(cv, cam, side * (road_w - 0.08), 0.05, colour, pattern, C["road"], rng)
        if "centre" in kinds:
            colour, pattern, _ = facts.LINE_STYLES[style.centre]
            _strip(cv, cam, 0.0, 0.06, colour, pattern, C["road"], rng)
        if "vegetation" in kinds:
            _trees(cv, cam, rng, road_w, style.vegetation)
        if "wires" in kinds:
            _wires(cv, cam, road_w)
        if "bollard" in kinds:
            _bollards(cv, cam, road_w, style.bollard)
        if "sign" in kinds:
            _warning_sign(cv, cam, rng, road_w, style.sign)
        if "script" in kinds:
            _script_board(cv, cam, rng, road_w, style.script)
        if "drive" in kinds:
            _car(cv, cam, rng, road_w, style, show_plate="plate" in kinds)
    arr = np.asarray(cv.img, dtype=np.int16)
    noise = rng.normal(0, 3.0, arr.shape).astype(np.int16)
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    return img, cv.mask
