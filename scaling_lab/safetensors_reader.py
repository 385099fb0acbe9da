"""A checkpoint's .safetensors files, and their tensors read into ordinary memory (no memory map): whole, or a range
of a tensor's elements straight into the tensor that keeps them, a few MB at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

from scaling_lab.model_sources import local_directory


def safetensors_files(location: str, options: dict) -> list[Path] | None:
    directory = local_directory(location)
    if directory is None:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors"]
        directory = Path(snapshot_download(location, allow_patterns=patterns, **options))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


class SafetensorsReader:
    """Tensors of .safetensors files, read one at a time into ordinary memory."""

    CHUNK_BYTES = 1 << 24  # the most read beside its destination, where the checkpoint's dtype differs from it

    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self.entries[name] = (path, 8 + header_size, entry)

    def find(self, name: str, prefix: str) -> str | None:
        """The checkpoint's name for model parameter `name` (a bare base model's checkpoint lacks the prefix)."""
        for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
            if candidate in self.entries:
                return candidate
        return None

    def read(self, name: str):
        import torch

        path, data_start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            handle.readinto(buffer)
        dtype = getattr(torch, self.DTYPES[entry["dtype"]])
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def numel(self, name: str) -> int:
        return math.prod(self.entries[name][2]["shape"])

    def read_range(self, name: str, start: int, out) -> None:
        """Elements start, start+1, ... of the flattened tensor `name` into the 1-D tensor `out`, converted to its
        dtype: read straight into it where the dtypes agree, else through a buffer of at most CHUNK_BYTES."""
        import torch

        path, data_start, entry = self.entries[name]
        dtype = getattr(torch, self.DTYPES[entry["dtype"]])
        itemsize = dtype.itemsize
        if out.dim() != 1 or not out.is_contiguous() or start < 0 or start + out.numel() > self.numel(name):
            raise ValueError(f"{path}: elements {start}..{start + out.numel()} of {name} do not fit its "
                             f"{self.numel(name)} elements, or the destination is not one contiguous row")
        per_chunk = max(1, out.numel() if out.dtype == dtype else self.CHUNK_BYTES // itemsize)
        with open(path, "rb") as handle:
            handle.seek(data_start + entry["data_offsets"][0] + start * itemsize)
            for first in range(0, out.numel(), per_chunk):
                target = out.narrow(0, first, min(per_chunk, out.numel() - first))
                if target.dtype == dtype:
                    destination, converted = target.view(torch.uint8).numpy(), None
                else:
                    converted = torch.empty(target.numel(), dtype=dtype)
                    destination = converted.view(torch.uint8).numpy()
                if handle.readinto(memoryview(destination)) != destination.nbytes:
                    raise ValueError(f"{path}: the file ends inside tensor {name}")
                if converted is not None:
                    target.copy_(converted)

    def read_into(self, name: str, out) -> None:
        """The whole tensor `name` into `out` (same number of elements, any shape and dtype)."""
        if out.numel() != self.numel(name):
            raise ValueError(f"{name}: the checkpoint holds {self.numel(name)} elements, the model {out.numel()}")
        self.read_range(name, 0, out.view(-1))
