"""Input-shape ranges: ``name:MIN-OPT-MAX`` specs such as ``input_ids:1x16-8x128-16x512``.

A single shape (``x:1x3x224x224``) is a fixed range (min = opt = max); two
shapes (``x:1x16-8x512``) mean min and max with opt = max. Benchmarks and
seeded inputs use the opt shape; TensorRT builds its optimization profile
from all three.
"""
from __future__ import annotations

from dataclasses import dataclass

from onnxforge.errors import OptionError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    @property
    def fixed(self) -> bool:
        return self.min == self.opt == self.max


def _parse_dims(text: str, spec: str) -> Shape:
    if text == "":
        return ()
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise OptionError(f"--input-shape {spec!r}: dims must be integers separated by 'x'") from None
    if any(d <= 0 for d in dims):
        raise OptionError(f"--input-shape {spec!r}: dims must be positive")
    return dims


def parse_shape_range(spec: str) -> tuple[str, ShapeRange]:
    name, sep, body = spec.rpartition(":")
    if not sep or not name:
        raise OptionError(f"--input-shape {spec!r}: expected NAME:SHAPE or NAME:MIN-OPT-MAX, e.g. ids:1x16-8x128-16x512")
    parts = [_parse_dims(p, spec) for p in body.split("-")]
    if len(parts) == 1:
        rng = ShapeRange(parts[0], parts[0], parts[0])
    elif len(parts) == 2:
        rng = ShapeRange(parts[0], parts[1], parts[1])
    elif len(parts) == 3:
        rng = ShapeRange(*parts)
    else:
        raise OptionError(f"--input-shape {spec!r}: at most three shapes (MIN-OPT-MAX)")
    _check_order(spec, rng)
    return name, rng


def _check_order(spec: str, rng: ShapeRange) -> None:
    if not len(rng.min) == len(rng.opt) == len(rng.max):
        raise OptionError(f"--input-shape {spec!r}: min, opt and max must have the same rank")
    for lo, mid, hi in zip(rng.min, rng.opt, rng.max):
        if not lo <= mid <= hi:
            raise OptionError(f"--input-shape {spec!r}: need min <= opt <= max in every dim")


def parse_shape_ranges(specs: list[str] | None) -> dict[str, ShapeRange]:
    ranges: dict[str, ShapeRange] = {}
    for spec in specs or []:
        name, rng = parse_shape_range(spec)
        if name in ranges:
            raise OptionError(f"--input-shape: {name!r} given twice")
        ranges[name] = rng
    return ranges


def opt_shapes(ranges: dict[str, ShapeRange]) -> dict[str, Shape]:
    """The shapes to run with (feeds, benchmarks): each range's opt shape."""
    return {name: rng.opt for name, rng in ranges.items()}


def format_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)
