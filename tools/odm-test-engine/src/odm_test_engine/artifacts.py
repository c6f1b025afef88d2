"""Placeholder output files of the ODM test double.

Each builder returns the bytes of a tiny but *syntactically valid* file of the kind ODM writes,
derived from the input image positions so that bounds and counts are consistent across products:

* GeoTIFF (uncompressed, little-endian, a few pixels, EPSG:4326 geokeys) for the orthophoto and the
  DEMs;
* PNG, PDF 1.4 (one page), ASCII PLY (point cloud and mesh), OBJ + MTL, binary glTF (GLB);
* LAS 1.2 point format 2 for ``*.laz`` files — **uncompressed** despite the name (LAZ compression is
  out of scope);
* JSON documents: ``images.json``, ``cameras.json``, OpenSfM ``reconstruction.json`` and
  ``reference_lla.json``, ``shots.geojson``, Entwine ``ept.json`` and 3D Tiles ``tileset.json``;
* an OpenSfM ``tracks.csv`` and a GeoPackage (``cutline.gpkg``: one polygon layer, built with the
  standard library's ``sqlite3``) for split-merge.

None of this is a processing result: the numbers are synthetic.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from . import ODM_VERSION, __version__
from .images import ImageInfo

GENERATOR = f"odm-test-engine {__version__} (TEST DOUBLE of ODM {ODM_VERSION})"
_METRES_PER_DEGREE = 111_320.0
_NODATA = -9999.0


def to_json(value: object) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Scene:
    """Geometry shared by all placeholder products (WGS84 degrees, metres above the ellipsoid)."""

    images: tuple[ImageInfo, ...]
    west: float
    south: float
    east: float
    north: float
    ground: float
    top: float

    @classmethod
    def from_images(cls, images: Sequence[ImageInfo]) -> Scene:
        lats = [i.latitude for i in images]
        lons = [i.longitude for i in images]
        alts = [i.altitude for i in images]
        margin = 30.0 / _METRES_PER_DEGREE  # the footprint extends beyond the camera positions
        ground = round(min(alts) - 80.0, 3)
        return cls(
            images=tuple(images),
            west=min(lons) - margin,
            south=min(lats) - margin,
            east=max(lons) + margin,
            north=max(lats) + margin,
            ground=ground,
            top=round(ground + 25.0, 3),
        )

    def local(self, lat: float, lon: float, alt: float) -> tuple[float, float, float]:
        """East/north/up metres relative to the south-west corner at ground level."""
        east = (lon - self.west) * _METRES_PER_DEGREE * math.cos(math.radians(self.south))
        north = (lat - self.south) * _METRES_PER_DEGREE
        return round(east, 3), round(north, 3), round(alt - self.ground, 3)

    def ground_points(self) -> list[tuple[float, float, float, tuple[int, int, int]]]:
        """A few (lon, lat, height, rgb) points: footprint corners and one under each camera."""
        corners = [
            (self.west, self.south),
            (self.east, self.south),
            (self.east, self.north),
            (self.west, self.north),
        ]
        points = [(lon, lat, self.ground, (96, 128, 64)) for lon, lat in corners]
        for n, image in enumerate(self.images):
            shade = 100 + (37 * n) % 120
            points.append(
                (image.longitude, image.latitude, self.ground + (n % 7) * 0.5, (shade, shade, 90))
            )
        return points

    @property
    def utm_zone(self) -> str:
        lon = (self.west + self.east) / 2.0
        lat = (self.south + self.north) / 2.0
        zone = int((lon + 180.0) // 6.0) % 60 + 1
        return f"{zone}{'N' if lat >= 0 else 'S'}"


# ------------------------------------------------------------------------------------------ raster


def _tiff(
    width: int, height: int, pixels: bytes, tags: list[tuple[int, int, Sequence[float] | bytes]]
) -> bytes:
    """Assemble a little-endian baseline TIFF with one strip at offset 8 and the IFD after it."""
    type_codes = {3: "H", 4: "I", 12: "d"}
    sizes = {2: 1, 3: 2, 4: 4, 12: 8}
    all_tags = sorted(
        [
            (256, 4, [width]),
            (257, 4, [height]),
            (259, 3, [1]),
            (273, 4, [8]),
            (278, 4, [height]),
            (279, 4, [len(pixels)]),
            (284, 3, [1]),
            (305, 2, GENERATOR.encode() + b"\x00"),
            *tags,
        ],
        key=lambda t: t[0],
    )
    data_end = 8 + len(pixels) + (len(pixels) % 2)
    ifd_size = 2 + 12 * len(all_tags) + 4
    extra_offset = data_end + ifd_size
    entries = b""
    extra = b""
    for tag, kind, values in all_tags:
        if isinstance(values, bytes):
            encoded = values
            count = len(values)
        else:
            encoded = struct.pack(f"<{len(values)}{type_codes[kind]}", *values)
            count = len(values)
        assert len(encoded) == count * sizes[kind]
        if len(encoded) <= 4:
            field = encoded.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", extra_offset + len(extra))
            extra += encoded + (b"\x00" if len(encoded) % 2 else b"")
        entries += struct.pack("<HHI", tag, kind, count) + field
    ifd = struct.pack("<H", len(all_tags)) + entries + struct.pack("<I", 0)
    header = b"II*\x00" + struct.pack("<I", data_end)
    return header + pixels + b"\x00" * (data_end - 8 - len(pixels)) + ifd + extra


def _geo_tags(
    scene: Scene, width: int, height: int
) -> list[tuple[int, int, Sequence[float] | bytes]]:
    scale_x = (scene.east - scene.west) / width
    scale_y = (scene.north - scene.south) / height
    geokeys = [
        1,
        1,
        0,
        3,
        1024,
        0,
        1,
        2,
        1025,
        0,
        1,
        1,
        2048,
        0,
        1,
        4326,
    ]  # geographic, pixel-is-area, WGS84
    return [
        (33550, 12, [scale_x, scale_y, 0.0]),
        (33922, 12, [0.0, 0.0, 0.0, scene.west, scene.north, 0.0]),
        (34735, 3, geokeys),
    ]


RASTER_SIZE = 128  # pixels a side: small, but enough for map tiles to show something


def _terrain(col: int, row: int, size: int) -> float:
    """Height above ``scene.ground`` (m) of a synthetic landscape at pixel (col, row): a gentle
    slope, two hills and a valley, smooth enough to shade and colour-map."""
    x, y = col / size, row / size
    hills = (6.0 * math.exp(-((x - 0.3) ** 2 + (y - 0.35) ** 2) / 0.02)
             + 4.0 * math.exp(-((x - 0.72) ** 2 + (y - 0.65) ** 2) / 0.03))
    valley = -2.5 * math.exp(-((x - y) ** 2) / 0.01)
    return 3.0 * x + 1.5 * (1 - y) + hills + valley


def _objects(scene: Scene, col: int, row: int, size: int) -> float:
    """What stands on the ground at (col, row): a few blocks ("buildings") and, under each
    camera position, a small mound ("tree"); 0 elsewhere."""
    x, y = col / size, row / size
    height = 0.0
    for bx, by, h in ((0.15, 0.7, 6.0), (0.55, 0.2, 9.0), (0.8, 0.85, 4.0)):
        if abs(x - bx) < 0.06 and abs(y - by) < 0.05:
            height = max(height, h)
    for image in scene.images:
        cx = (image.longitude - scene.west) / (scene.east - scene.west)
        cy = (scene.north - image.latitude) / (scene.north - scene.south)
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        if d2 < 0.0004:
            height = max(height, 2.5 * (1 - d2 / 0.0004))
    return height


def _inside(col: int, row: int, size: int) -> bool:
    """The mapped area: the footprint with rounded corners (ODM's rasters have a nodata
    collar outside the reconstruction)."""
    x, y = (col + 0.5) / size - 0.5, (row + 0.5) / size - 0.5
    r = 0.42
    return max(abs(x), abs(y)) < 0.5 and (abs(x) < r or abs(y) < r or (
        (abs(x) - r) ** 2 + (abs(y) - r) ** 2 < (0.5 - r) ** 2))


def orthophoto_tiff(scene: Scene, size: int = RASTER_SIZE) -> bytes:
    """An RGBA 8-bit GeoTIFF covering the scene footprint: the synthetic landscape in shaded
    greens and browns, roofs grey, each camera's position a light spot; transparent outside
    the mapped area."""
    pixels = bytearray()
    for row in range(size):
        for col in range(size):
            if not _inside(col, row, size):
                pixels += b"\x00\x00\x00\x00"
                continue
            h = _terrain(col, row, size)
            east = _terrain(min(col + 1, size - 1), row, size) - h
            north = _terrain(col, max(row - 1, 0), size) - h
            shade = max(0.35, min(1.0, 0.75 + 0.6 * (north - east)))
            obj = _objects(scene, col, row, size)
            if obj >= 4.0:  # a roof
                rgb = (150, 150, 155)
            elif obj > 0.0:  # a camera's spot
                rgb = (210, 200, 150)
            else:
                rgb = (int(70 + 6 * h), int(120 + 4 * h), 60)
            pixels += bytes(min(255, int(c * shade)) for c in rgb) + b"\xff"
    tags: list[tuple[int, int, Sequence[float] | bytes]] = [
        (258, 3, [8, 8, 8, 8]),
        (262, 3, [2]),
        (277, 3, [4]),
        (338, 3, [2]),
        (339, 3, [1, 1, 1, 1]),
        *_geo_tags(scene, size, size),
    ]
    return _tiff(size, size, bytes(pixels), tags)


def dem_tiff(scene: Scene, *, surface: bool, size: int = RASTER_SIZE) -> bytes:
    """A float32 single-band GeoTIFF of the synthetic landscape: the DSM (``surface``) with
    what stands on the ground, the DTM without; nodata -9999 outside the mapped area."""
    values = []
    for row in range(size):
        for col in range(size):
            if not _inside(col, row, size):
                values.append(_NODATA)
                continue
            height = scene.ground + _terrain(col, row, size)
            if surface:
                height += _objects(scene, col, row, size)
            values.append(height)
    pixels = struct.pack(f"<{len(values)}f", *values)
    tags: list[tuple[int, int, Sequence[float] | bytes]] = [
        (258, 3, [32]),
        (262, 3, [1]),
        (277, 3, [1]),
        (339, 3, [3]),
        *_geo_tags(scene, size, size),
        (42113, 2, f"{_NODATA:g}".encode() + b"\x00"),
    ]
    return _tiff(size, size, pixels, tags)


def png(
    width: int = 8, height: int = 8, rgba: tuple[int, int, int, int] = (90, 120, 70, 255)
) -> bytes:
    """A small RGBA PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + bytes(rgba) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------- documents


def pdf(lines: Sequence[str]) -> bytes:
    """A one-page PDF 1.4 showing ``lines`` in Helvetica, with a correct cross-reference table."""

    def escape(text: str) -> str:
        safe = text.encode("latin-1", "replace").decode("latin-1")
        return safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    text_ops = ["BT", "/F1 14 Tf", "56 780 Td", "18 TL"]
    for line in lines:
        text_ops.append(f"({escape(line)}) Tj T*")
    text_ops.append("ET")
    stream = "\n".join(text_ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Producer (" + escape(GENERATOR).encode("latin-1") + b") >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R /Info 6 0 R >>"
    out += f"trailer\n{trailer}\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# --------------------------------------------------------------------------------------- 3D models


def point_cloud_ply(scene: Scene) -> bytes:
    """An ASCII PLY point cloud with colours (local metres)."""
    points = scene.ground_points()
    header = [
        "ply",
        "format ascii 1.0",
        f"comment generated by {GENERATOR}",
        f"element vertex {len(points)}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        "end_header",
    ]
    body = []
    for lon, lat, height, (r, g, b) in points:
        x, y, z = scene.local(lat, lon, height)
        body.append(f"{x} {y} {z} {r} {g} {b}")
    return ("\n".join(header + body) + "\n").encode()


def _footprint_quad(scene: Scene) -> list[tuple[float, float, float]]:
    corners = [
        (scene.south, scene.west),
        (scene.south, scene.east),
        (scene.north, scene.east),
        (scene.north, scene.west),
    ]
    return [scene.local(lat, lon, scene.ground) for lat, lon in corners]


def mesh_ply(scene: Scene) -> bytes:
    """An ASCII PLY mesh: the footprint as two triangles."""
    vertices = _footprint_quad(scene)
    header = [
        "ply",
        "format ascii 1.0",
        f"comment generated by {GENERATOR}",
        f"element vertex {len(vertices)}",
        "property float x",
        "property float y",
        "property float z",
        "element face 2",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    body = [f"{x} {y} {z}" for x, y, z in vertices] + ["3 0 1 2", "3 0 2 3"]
    return ("\n".join(header + body) + "\n").encode()


TEXTURE_NAME = "odm_textured_model_geo_material0000_map_Kd.png"


def textured_obj(scene: Scene, mtl_name: str) -> bytes:
    lines = [f"# {GENERATOR}", f"mtllib {mtl_name}"]
    lines += [f"v {x} {y} {z}" for x, y, z in _footprint_quad(scene)]
    lines += ["vt 0 0", "vt 1 0", "vt 1 1", "vt 0 1", "vn 0 0 1", "usemtl material0000"]
    lines += ["f 1/1/1 2/2/1 3/3/1", "f 1/1/1 3/3/1 4/4/1"]
    return ("\n".join(lines) + "\n").encode()


def textured_mtl() -> bytes:
    lines = [
        f"# {GENERATOR}",
        "newmtl material0000",
        "Ka 1.000000 1.000000 1.000000",
        "Kd 1.000000 1.000000 1.000000",
        "Ks 0.000000 0.000000 0.000000",
        "d 1.0",
        "illum 2",
        f"map_Kd {TEXTURE_NAME}",
    ]
    return ("\n".join(lines) + "\n").encode()


def glb(scene: Scene) -> bytes:
    """A binary glTF 2.0 file holding the footprint quad as an indexed triangle mesh."""
    vertices = _footprint_quad(scene)
    positions = struct.pack(f"<{3 * len(vertices)}f", *(c for v in vertices for c in v))
    indices = struct.pack("<6H", 0, 1, 2, 0, 2, 3)
    binary = positions + indices + b"\x00" * ((-len(positions + indices)) % 4)
    mins = [min(v[i] for v in vertices) for i in range(3)]
    maxs = [max(v[i] for v in vertices) for i in range(3)]
    document = {
        "asset": {"version": "2.0", "generator": GENERATOR},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "odm_textured_model_geo"}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}]}],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": len(vertices),
                "type": "VEC3",
                "min": mins,
                "max": maxs,
            },
            {"bufferView": 1, "componentType": 5123, "count": 6, "type": "SCALAR"},
        ],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(positions), "target": 34962},
            {
                "buffer": 0,
                "byteOffset": len(positions),
                "byteLength": len(indices),
                "target": 34963,
            },
        ],
        "buffers": [{"byteLength": len(binary)}],
    }
    json_chunk = json.dumps(document, separators=(",", ":")).encode()
    json_chunk += b" " * ((-len(json_chunk)) % 4)
    total = 12 + 8 + len(json_chunk) + 8 + len(binary)
    return (
        struct.pack("<4sII", b"glTF", 2, total)
        + struct.pack("<I4s", len(json_chunk), b"JSON")
        + json_chunk
        + struct.pack("<I4s", len(binary), b"BIN\x00")
        + binary
    )


# ------------------------------------------------------------------------------------ point clouds

_LAS_SCALE = (1e-7, 1e-7, 1e-3)


def las_bounds(scene: Scene) -> tuple[float, float, float, float, float, float]:
    """(min lon, min lat, min z, max lon, max lat, max z) of the placeholder point cloud."""
    points = scene.ground_points()
    return (
        min(p[0] for p in points),
        min(p[1] for p in points),
        min(p[2] for p in points),
        max(p[0] for p in points),
        max(p[1] for p in points),
        max(p[2] for p in points),
    )


def las(scene: Scene, created: datetime) -> bytes:
    """An uncompressed LAS 1.2 file (point format 2, lon/lat/height), also for ``*.laz`` names."""
    points = scene.ground_points()
    min_x, min_y, min_z, max_x, max_y, max_z = las_bounds(scene)
    offsets = (min_x, min_y, min_z)
    records = bytearray()
    for lon, lat, height, (r, g, b) in points:
        coords = [
            round((value - offsets[i]) / _LAS_SCALE[i])
            for i, value in enumerate((lon, lat, height))
        ]
        records += struct.pack(
            "<iiiHBBbBHHHH", *coords, 100, 0b00001001, 2, 0, 0, 0, r * 257, g * 257, b * 257
        )
    header = struct.pack(
        "<4sHHIHH8sBB32s32sHHHIIBHI5I3d3d6d",
        b"LASF",
        0,
        0,
        0,
        0,
        0,
        b"\x00" * 8,
        1,
        2,
        b"odm-test-engine (TEST DOUBLE)",
        f"ODM {ODM_VERSION} test double".encode(),
        created.timetuple().tm_yday,
        created.year,
        227,
        227,
        0,
        2,
        26,
        len(points),
        len(points),
        0,
        0,
        0,
        0,
        *_LAS_SCALE,
        *offsets,
        max_x,
        min_x,
        max_y,
        min_y,
        max_z,
        min_z,
    )
    assert len(header) == 227
    return header + bytes(records)


def ept_files(scene: Scene, created: datetime) -> dict[str, bytes]:
    """Files of a one-node Entwine Point Tile dataset, keyed by path in ``entwine_pointcloud/``."""
    min_x, min_y, min_z, max_x, max_y, max_z = las_bounds(scene)
    count = len(scene.ground_points())
    half = max(max_x - min_x, max_y - min_y, (max_z - min_z) * 1e-5) / 2.0 or 1e-5
    centre = ((min_x + max_x) / 2.0, (min_y + max_y) / 2.0, (min_z + max_z) / 2.0)
    cube = [
        centre[0] - half,
        centre[1] - half,
        centre[2] - half,
        centre[0] + half,
        centre[1] + half,
        centre[2] + half,
    ]
    schema = [
        {"name": "X", "type": "signed", "size": 4, "scale": _LAS_SCALE[0], "offset": min_x},
        {"name": "Y", "type": "signed", "size": 4, "scale": _LAS_SCALE[1], "offset": min_y},
        {"name": "Z", "type": "signed", "size": 4, "scale": _LAS_SCALE[2], "offset": min_z},
        {"name": "Intensity", "type": "unsigned", "size": 2},
        {"name": "Classification", "type": "unsigned", "size": 1},
        {"name": "Red", "type": "unsigned", "size": 2},
        {"name": "Green", "type": "unsigned", "size": 2},
        {"name": "Blue", "type": "unsigned", "size": 2},
    ]
    ept = {
        "bounds": cube,
        "boundsConforming": [min_x, min_y, min_z, max_x, max_y, max_z],
        "dataType": "laszip",
        "hierarchyType": "json",
        "points": count,
        "schema": schema,
        "span": 128,
        "srs": {"authority": "EPSG", "horizontal": "4326"},
        "version": "1.0.0",
    }
    sources = [{"path": "odm_georeferenced_model.laz", "points": count, "status": "inserted"}]
    return {
        "ept.json": to_json(ept),
        "ept-hierarchy/0-0-0-0.json": to_json({"0-0-0-0": count}),
        "ept-data/0-0-0-0.laz": las(scene, created),
        "ept-sources/list.json": to_json(sources),
    }


def tileset(scene: Scene) -> bytes:
    """A 3D Tiles 1.0 tileset whose root tile covers the scene (no content)."""
    region = [
        math.radians(scene.west),
        math.radians(scene.south),
        math.radians(scene.east),
        math.radians(scene.north),
        scene.ground,
        scene.top,
    ]
    document = {
        "asset": {"version": "1.0", "generator": GENERATOR},
        "geometricError": 50.0,
        "root": {"boundingVolume": {"region": region}, "geometricError": 0.0, "refine": "ADD"},
    }
    return to_json(document)


# ----------------------------------------------------------------------------------- JSON products


def camera_id(image: ImageInfo) -> str:
    """OpenSfM-style camera key (``v2 <make> <model> <w> <h> brown 0.85``)."""
    size = f"{image.width} {image.height}"
    return f"v2 {image.camera_make} {image.camera_model} {size} brown 0.85".lower()


def images_json(scene: Scene) -> bytes:
    """``images.json``: the per-image metadata ODM collects in its dataset stage."""
    entries = []
    for image in scene.images:
        entries.append(
            {
                "filename": image.filename,
                "mask": None,
                "width": image.width,
                "height": image.height,
                "camera_make": image.camera_make,
                "camera_model": image.camera_model,
                "orientation": 1,
                "latitude": image.latitude,
                "longitude": image.longitude,
                "altitude": image.altitude,
                "band_name": "RGB",
                "band_index": 0,
                "focal_ratio": round(image.focal_length_mm / 6.3, 4)
                if image.focal_length_mm
                else None,
                "utc_time": None,
                "capture_time": image.capture_time,
                "gps_xy_stddev": None,
                "gps_z_stddev": None,
                "camera_projection": "brown",
                "exif_width": image.width,
                "exif_height": image.height,
            }
        )
    return to_json(entries)


def _camera_model(image: ImageInfo) -> dict[str, object]:
    return {
        "projection_type": "brown",
        "width": image.width,
        "height": image.height,
        "focal_x": 0.85,
        "focal_y": 0.85,
        "c_x": 0.0,
        "c_y": 0.0,
        "k1": -0.0123,
        "k2": 0.0045,
        "p1": 0.0001,
        "p2": -0.0002,
        "k3": -0.0011,
    }


def cameras_json(scene: Scene) -> bytes:
    return to_json({camera_id(image): _camera_model(image) for image in scene.images})


def reconstruction_json(scene: Scene) -> bytes:
    """An OpenSfM ``reconstruction.json`` (one reconstruction, every image registered)."""
    cameras = {camera_id(image): _camera_model(image) for image in scene.images}
    shots = {}
    for image in scene.images:
        x, y, z = scene.local(image.latitude, image.longitude, image.altitude)
        shots[image.filename] = {
            "rotation": [3.14159, 0.0, 0.0],
            "translation": [-x, y, z],
            "camera": camera_id(image),
            "orientation": 1,
            "capture_time": 0.0,
            "gps_dop": 10.0,
            "gps_position": [x, y, z],
        }
    points = {}
    for n, (lon, lat, height, rgb) in enumerate(scene.ground_points()):
        points[str(n)] = {"color": list(rgb), "coordinates": list(scene.local(lat, lon, height))}
    reference = {"latitude": scene.south, "longitude": scene.west, "altitude": scene.ground}
    return to_json(
        [
            {
                "cameras": cameras,
                "shots": shots,
                "points": points,
                "biases": {},
                "rig_cameras": {},
                "rig_instances": {},
                "reference_lla": reference,
            }
        ]
    )


def shots_geojson(scene: Scene) -> bytes:
    """``odm_report/shots.geojson``: one Point feature per camera position."""
    features = []
    for image in scene.images:
        features.append(
            {
                "type": "Feature",
                "properties": {
                    "filename": image.filename,
                    "camera": camera_id(image),
                    "focal": 0.85,
                    "width": image.width,
                    "height": image.height,
                    "capture_time": 0.0,
                    "translation": list(
                        scene.local(image.latitude, image.longitude, image.altitude)
                    ),
                    "rotation": [3.14159, 0.0, 0.0],
                },
                "geometry": {
                    "type": "Point",
                    "coordinates": [image.longitude, image.latitude, image.altitude],
                },
            }
        )
    return to_json({"type": "FeatureCollection", "features": features})


def reference_lla_json(scene: Scene) -> bytes:
    """OpenSfM ``reference_lla.json``: the origin of the local coordinates (a split-merge seed)."""
    return to_json({"latitude": scene.south, "longitude": scene.west, "altitude": scene.ground})


def tracks_csv(scene: Scene) -> bytes:
    """An OpenSfM ``tracks.csv`` (v2 header, one observation of one track per image)."""
    lines = ["OPENSFM_TRACKS_VERSION_v2"]
    for n, image in enumerate(scene.images):
        lines.append(f"{image.filename}\t{n}\t{n}\t0.0\t0.0\t0.004\t96\t128\t64\t-1\t-1")
    return ("\n".join(lines) + "\n").encode()


def geopackage(scene: Scene, layer: str = "cutline") -> bytes:
    """A GeoPackage 1.3 with one polygon layer holding the scene footprint (EPSG:4326).

    Built in memory with :mod:`sqlite3` and returned with ``Connection.serialize`` so that the file
    opens in GDAL/QGIS like ODM's ``cutline.gpkg`` does; the polygon itself means nothing.
    """
    ring = [
        (scene.west, scene.south),
        (scene.east, scene.south),
        (scene.east, scene.north),
        (scene.west, scene.north),
        (scene.west, scene.south),
    ]
    wkb = struct.pack("<BIII", 1, 3, 1, len(ring)) + b"".join(struct.pack("<2d", *p) for p in ring)
    # GeoPackage binary header: magic, version 0, flags (little-endian, xy envelope), srs id
    header = b"GP\x00\x03" + struct.pack(
        "<i4d", 4326, scene.west, scene.east, scene.south, scene.north
    )
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(
            f"""
            PRAGMA application_id = 1196444487;
            PRAGMA user_version = 10300;
            CREATE TABLE gpkg_spatial_ref_sys (
                srs_name TEXT NOT NULL, srs_id INTEGER PRIMARY KEY, organization TEXT NOT NULL,
                organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL,
                description TEXT);
            CREATE TABLE gpkg_contents (
                table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL,
                identifier TEXT UNIQUE, description TEXT DEFAULT '',
                last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
                min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER);
            CREATE TABLE gpkg_geometry_columns (
                table_name TEXT NOT NULL, column_name TEXT NOT NULL,
                geometry_type_name TEXT NOT NULL, srs_id INTEGER NOT NULL, z TINYINT NOT NULL,
                m TINYINT NOT NULL, PRIMARY KEY (table_name, column_name));
            CREATE TABLE "{layer}" (fid INTEGER PRIMARY KEY AUTOINCREMENT, geom POLYGON);
            """
        )
        connection.executemany(
            "INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", None),
                ("Undefined geographic SRS", 0, "NONE", 0, "undefined", None),
                ("WGS 84 geodetic", 4326, "EPSG", 4326, _WGS84_WKT, None),
            ],
        )
        connection.execute(
            "INSERT INTO gpkg_contents (table_name, data_type, identifier, description,"
            " min_x, min_y, max_x, max_y, srs_id) VALUES (?, 'features', ?, ?, ?, ?, ?, ?, 4326)",
            (layer, layer, GENERATOR, scene.west, scene.south, scene.east, scene.north),
        )
        connection.execute(
            "INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', 'POLYGON', 4326, 0, 0)", (layer,)
        )
        connection.execute(f'INSERT INTO "{layer}" (geom) VALUES (?)', (header + wkb,))
        connection.commit()
        return connection.serialize()
    finally:
        connection.close()


_WGS84_WKT = (
    'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],AUTHORITY["EPSG","4326"]]'
)
