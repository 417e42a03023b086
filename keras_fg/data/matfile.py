"""A small reader of MATLAB v5 .mat files: enough for the Stanford Cars and Stanford Dogs devkits.

The devkits ship their annotations as MATLAB v5 files (`save` with its default `-v7`:
zlib-compressed v5 elements), which h5py cannot open (it reads only the HDF5-based v7.3). Rather
than depend on SciPy for a handful of files, this module reads the element types those files use:
numeric arrays, char arrays, cell arrays and struct arrays, compressed or not, either byte order.
Sparse matrices, objects and function handles are refused with a clear error.

Format: "MAT-File Format", The MathWorks, section "Level 5 MAT-File Format".
"""

import struct
import zlib

import numpy as np

_NUMBER_TYPES = {
    1: "i1",
    2: "u1",
    3: "i2",
    4: "u2",
    5: "i4",
    6: "u4",
    7: "f4",
    9: "f8",
    12: "i8",
    13: "u8",
}
_MATRIX, _COMPRESSED, _UTF8, _UTF16, _UTF32 = 14, 15, 16, 17, 18
_CELL, _STRUCT, _CHAR = 1, 2, 4
_NUMERIC_CLASSES = {
    6: "f8",
    7: "f4",
    8: "i1",
    9: "u1",
    10: "i2",
    11: "u2",
    12: "i4",
    13: "u4",
    14: "i8",
    15: "u8",
}


def load_mat(path):
    """The variables of a MATLAB v5 .mat file as a dict of NumPy values.

    Numeric and logical arrays come back as ndarrays of their MATLAB shape, char arrays as `str`
    (one row) or a list of `str` (one per row), cell arrays as object ndarrays, struct arrays as
    object ndarrays of dicts. All arrays keep MATLAB's (column-major) element order.

    Raises:
        ValueError: for a v7.3 (HDF5) file or an element type this reader does not handle.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    header = data[:128]
    if header[:19] == b"MATLAB 7.3 MAT-file" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise ValueError(
            f"{path} is a MATLAB v7.3 (HDF5) file; the published devkits are v5. Re-save it in "
            f"MATLAB with save(..., '-v7'), or use the CSV layout described in keras_fg.data"
        )
    if len(data) < 128 or header[126:128] not in (b"IM", b"MI"):
        raise ValueError(f"{path} is not a MATLAB v5 .mat file (no v5 header)")
    order = "<" if header[126:128] == b"IM" else ">"
    variables = {}
    for element_type, body in _elements(data, 128, len(data), order):
        if element_type == _COMPRESSED:
            element_type, body = next(_elements(zlib.decompress(body), 0, None, order))
        if element_type == _MATRIX:
            name, value = _matrix(body, order, path)
            variables[name] = value
    return variables


def _elements(data, position, end, order):
    """(type, bytes) of each data element in data[position:end]."""
    end = len(data) if end is None else end
    while position + 8 <= end:
        element_type, size = struct.unpack(order + "II", data[position : position + 8])
        if element_type >> 16:  # small data element: size and type packed in 4 bytes
            size, element_type = element_type >> 16, element_type & 0xFFFF
            yield element_type, data[position + 4 : position + 4 + size]
            position += 8
            continue
        yield element_type, data[position + 8 : position + 8 + size]
        padded = size if element_type == _COMPRESSED else (size + 7) // 8 * 8
        position += 8 + padded


def _matrix(body, order, path):
    """(name, value) of one miMATRIX element."""
    if not body:
        return "", np.zeros((0, 0))
    parts = _elements(body, 0, None, order)
    flags = _numbers(*next(parts), order)
    dims = tuple(int(d) for d in _numbers(*next(parts), order))
    name = next(parts)[1].decode("latin-1")
    array_class = int(flags[0]) & 0xFF
    count = int(np.prod(dims))
    if array_class in _NUMERIC_CLASSES:
        values = _numbers(*next(parts), order).astype(_NUMERIC_CLASSES[array_class])
        return name, values.reshape(dims, order="F")
    if array_class == _CHAR:
        element_type, raw = next(parts, (_UTF8, b""))
        text = _text(element_type, raw, order)
        if len(dims) == 2 and dims[0] > 1:
            columns = np.array(list(text)).reshape(dims, order="F")
            return name, ["".join(row) for row in columns]
        return name, text
    if array_class == _CELL:
        cells = [_matrix(next(parts)[1], order, path)[1] for _ in range(count)]
        return name, _object_array(cells, dims)
    if array_class == _STRUCT:
        field_length = int(_numbers(*next(parts), order)[0])
        raw_names = next(parts)[1]
        fields = [
            raw_names[i : i + field_length].split(b"\0")[0].decode("latin-1")
            for i in range(0, len(raw_names), field_length)
        ]
        items = [
            {field: _matrix(next(parts)[1], order, path)[1] for field in fields}
            for _ in range(count)
        ]
        return name, _object_array(items, dims)
    raise ValueError(
        f"{path}: variable {name!r} has MATLAB array class {array_class}, not supported"
    )


def _numbers(element_type, raw, order):
    return np.frombuffer(raw, dtype=order + _NUMBER_TYPES[element_type])


def _text(element_type, raw, order):
    if element_type in (_UTF8, 2, 1):
        return raw.decode("utf-8")
    if element_type in (_UTF16, 4):
        return raw.decode("utf-16-le" if order == "<" else "utf-16-be")
    if element_type == _UTF32:
        return raw.decode("utf-32-le" if order == "<" else "utf-32-be")
    return "".join(map(chr, _numbers(element_type, raw, order)))


def _object_array(values, dims):
    array = np.empty(len(values), dtype=object)
    for index, value in enumerate(
        values
    ):  # item by item: NumPy would broadcast equal-shaped arrays
        array[index] = value
    return array.reshape(dims, order="F")
