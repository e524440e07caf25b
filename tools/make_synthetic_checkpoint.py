"""Write a synthetic RecurrentGemma checkpoint: the released layout, random values.

The real weights cannot be downloaded everywhere, so benchmarks and tests use
checkpoints with the real names, shapes, dtype and file layout whose values are
random. Two layouts are written, each in its own directory:

  huggingface  config.json (as in google/recurrentgemma-2b, `_block_types`
               spelling included), model-0000N-of-0000M.safetensors shards of at
               most --max-shard-size, model.safetensors.index.json, tokenizer.model
  kaggle       the official PyTorch state dict as torch.save writes it (`2b.pt`,
               official `blocks.N...` names) beside tokenizer.model

The .pt file is written without PyTorch, entry by entry as torch.save writes
it. `<stem>/data.pkl` is a protocol 2 pickle of an OrderedDict whose tensors
are `_rebuild_tensor_v2` calls on persistent storage ids. Each tensor's bytes
are one stored (uncompressed) entry `<stem>/data/<key>`, aligned to 64 bytes,
and `byteorder` and `version` entries follow. PyTorch 2.13 reads the file with
`torch.load(path, weights_only=True)`.

Values: every tensor is N(0, --std), rounded to bfloat16 so that the float32
and bfloat16 checkpoints of one seed contain the same numbers. Drawing 2.7e9
normal numbers would take minutes, so each tensor is read cyclically from one
random block of POOL_SIZE values, starting at an offset derived from the
tensor's name. The weights look random to every layer but are not independent
draws; they are for timing and memory, and the model's output is meaningless.
A tensor gets the same values in both layouts, so both load to the same model.

Writing is streamed, tensor by tensor, so memory stays near the 200 MB pool
(both dtypes) plus one block's tensors. A run writes into `<directory>.partial` and
renames it when done; a complete directory (one with `synthetic.json`) is never
written again.

The tokenizer is the small SentencePiece model bundled in rgref/data/tiny
(4096 pieces with Gemma's special ids). rgref accepts a tokenizer smaller than
the embedding and decodes ids past it as <unk>.

Examples:
  python tools/make_synthetic_checkpoint.py              # 2B, bfloat16, both layouts
  python tools/make_synthetic_checkpoint.py --dtype float32 --layout huggingface
  python tools/make_synthetic_checkpoint.py --shrink 64 --num-blocks 4 --out /tmp/synthetic
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import struct
import sys
import time
import zipfile
import zlib
from typing import Iterator

import numpy as np

# Run from a checkout without `pip install -e .`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rgref import names  # noqa: E402
from rgref.config import PRESET_NAMES, Config  # noqa: E402
from rgref.dtypes import BFLOAT16_BITS, bfloat16_to_float32, float32_to_bfloat16  # noqa: E402
from rgref.safetensors_file import save_safetensors_streaming  # noqa: E402

LAYOUTS = ("huggingface", "kaggle")
DTYPES = {"bfloat16": BFLOAT16_BITS, "float32": np.dtype(np.float32)}
DEFAULT_ROOT = os.path.join(ROOT, "bench-cache")
TOKENIZER = os.path.join(ROOT, "rgref", "data", "tiny", "tokenizer.model")
TOKENIZER_FILE = "tokenizer.model"
METADATA_FILE = "synthetic.json"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Hugging Face's default `max_shard_size` when the RecurrentGemma checkpoints were
# published (transformers 4.40): 5 GB, in powers of 1000.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# An odd number of values, so rows of any power-of-two width start at
# different places of the block. 16M values, stored twice in bfloat16 and twice
# in float32, take 200 MB.
POOL_SIZE = 2**24 - 3
DEFAULT_STD = 0.02
# Pieces of the bundled tokenizer: a shrunk vocabulary stays at least this large.
TOKENIZER_PIECES = 4096
# torch.save aligns each storage to 64 bytes (its `.storage_alignment` entry).
TORCH_ALIGNMENT = 64
# The zip extra field record torch.save pads with; any unknown id is skipped by readers.
PADDING_EXTRA_ID = 0x4246
ZIP64_LOCAL_EXTRA_BYTES = 20
ZIP_LOCAL_HEADER_BYTES = 30
# Order of a block's tensors in the official state dict (recurrentgemma.torch modules).
OFFICIAL_BLOCK_ORDER = (
    "temporal_pre_norm.scale",
    "recurrent_block.linear_y.weight", "recurrent_block.linear_y.bias",
    "recurrent_block.linear_x.weight", "recurrent_block.linear_x.bias",
    "recurrent_block.linear_out.weight", "recurrent_block.linear_out.bias",
    "recurrent_block.conv_1d.w", "recurrent_block.conv_1d.b",
    "recurrent_block.rg_lru.a_param",
    "recurrent_block.rg_lru.input_gate.w", "recurrent_block.rg_lru.input_gate.b",
    "recurrent_block.rg_lru.a_gate.w", "recurrent_block.rg_lru.a_gate.b",
    "attention_block.proj_q.weight", "attention_block.proj_k.weight",
    "attention_block.proj_v.weight",
    "attention_block.proj_final.weight", "attention_block.proj_final.bias",
    "channel_pre_norm.scale",
    "mlp_block.ffw_up.w", "mlp_block.ffw_up.b",
    "mlp_block.ffw_down.weight", "mlp_block.ffw_down.bias",
)


# =============================================================================
# Config
# =============================================================================

def synthetic_config(preset: str = "recurrentgemma-2b", shrink: int = 1,
                     num_blocks: int | None = None) -> Config:
    """Return a preset's config, optionally scaled down for tests.

    shrink: divide the width, MLP width, RG-LRU width and vocabulary by this
      factor (the number of heads stays). The vocabulary never drops below the
      bundled tokenizer's 4096 pieces, so the command line can run the model.
    num_blocks: keep only the first blocks of the preset's pattern.
    """
    config = Config.from_preset(preset)
    if shrink < 1 or (num_blocks is not None and num_blocks < 1):
        raise ValueError(f"shrink and num_blocks must be >= 1, got {shrink} and {num_blocks}")
    for field in ("width", "mlp_width", "lru_width"):
        if getattr(config, field) % shrink:
            raise ValueError(f"--shrink {shrink} does not divide the {preset} {field} "
                             f"{getattr(config, field)}; use a power of two")
    blocks = config.block_types if num_blocks is None else config.block_types[:num_blocks]
    return Config(
        vocab_size=max(config.vocab_size // shrink, TOKENIZER_PIECES),
        width=config.width // shrink, mlp_width=config.mlp_width // shrink,
        num_heads=config.num_heads, lru_width=config.lru_width // shrink,
        block_types=blocks, attention_window=config.attention_window,
        conv1d_width=config.conv1d_width,
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=config.logits_soft_cap, rms_norm_eps=config.rms_norm_eps,
        rope_max_wavelength=config.rope_max_wavelength)


def repeating_unit(block_types: tuple[str, ...]) -> list[str]:
    """Return the shortest prefix whose repetition gives `block_types` (R, R, A for Griffin)."""
    for length in range(1, len(block_types) + 1):
        unit = block_types[:length]
        if all(kind == unit[i % length] for i, kind in enumerate(block_types)):
            return list(unit)
    raise AssertionError("unreachable: the whole sequence repeats itself")


def hf_config_json(config: Config, dtype: str) -> dict:
    """Return the config.json of a Hugging Face checkpoint of `config`.

    The published RecurrentGemma config.json files store the block pattern as
    `_block_types` (the repeating unit). They also carry the initialisation and
    dropout settings of transformers' RecurrentGemmaConfig, which inference
    ignores. Both are written here so that loaders meet the same keys.
    """
    hf = config.to_hf_config()
    del hf["block_types"]
    hf["_block_types"] = repeating_unit(config.block_types)
    hf.update({
        "attention_bias": False,
        "attention_dropout": 0.0,
        "w_init_variance_scale": 0.01,
        "final_w_init_variance_scale": 2.0 / config.num_blocks,
        "use_cache": True,
        "torch_dtype": dtype,
    })
    return dict(sorted(hf.items()))


# =============================================================================
# Values
# =============================================================================

class RandomPool:
    """N(0, std) values, rounded to bfloat16, read cyclically by tensor name.

    The block is stored twice in a row, so any window of at most `size` values
    starting inside the first copy is one contiguous slice: chunks are views,
    never copies.
    """

    def __init__(self, seed: int, std: float, size: int = POOL_SIZE):
        values = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)
        values *= np.float32(std)
        bits = float32_to_bfloat16(values)
        del values
        self.size = size
        self.bfloat16 = np.concatenate([bits, bits])                    # (2 * size,)
        self.float32 = bfloat16_to_float32(self.bfloat16)               # same numbers

    def chunks(self, name: str, count: int, dtype: np.dtype) -> Iterator[np.ndarray]:
        """Yield the `count` values of tensor `name` in C order, at most `size` at a time."""
        source = self.bfloat16 if dtype == BFLOAT16_BITS else self.float32
        start = zlib.crc32(name.encode("utf-8")) % self.size
        for done in range(0, count, self.size):
            offset = (start + done) % self.size
            yield source[offset:offset + min(self.size, count - done)]

    def tensor(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Return tensor `name` as one array (a view when it fits in one chunk)."""
        count = int(np.prod(shape, dtype=np.int64))
        parts = list(self.chunks(name, count, dtype))
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return flat.reshape(shape)


# =============================================================================
# Progress
# =============================================================================

class Progress:
    """Bytes written so far, reported on stderr about once a second."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.quiet = label, total, quiet
        self.done = 0
        self.start = self.last_report = time.perf_counter()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last_report >= 1.0:
            self.last_report = now
            self._report(end="")

    def finish(self) -> None:
        self._report(end="\n")

    def _report(self, end: str) -> None:
        if self.quiet:
            return
        print(f"\r{self.label}: {self.done / 1e9:.2f} / {self.total / 1e9:.2f} GB "
              f"({time.perf_counter() - self.start:.0f} s)", end=end, file=sys.stderr,
              flush=True)


def counted(chunks: Iterator[np.ndarray], progress: Progress) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield chunk
        progress.add(chunk.nbytes)


# =============================================================================
# Hugging Face layout
# =============================================================================

def hf_order(config: Config) -> list[str]:
    """Hugging Face tensor names in module order: embedding, blocks, final norm."""
    shapes = names.expected_shapes(config)
    ordered = [names.EMBEDDING] + [n for n in shapes if n not in (names.EMBEDDING,
                                                                    names.FINAL_NORM)]
    return ordered + [names.FINAL_NORM]


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own, as in Hugging Face.
    """
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, nbytes in sizes:
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def write_huggingface(directory: str, config: Config, dtype: str, pool: RandomPool,
                      max_shard_bytes: int, progress: Progress) -> None:
    np_dtype = DTYPES[dtype]
    shapes = names.expected_shapes(config)
    order = hf_order(config)
    sizes = [(n, np_dtype.itemsize * int(np.prod(shapes[n], dtype=np.int64))) for n in order]
    shards = plan_shards(sizes, max_shard_bytes)

    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        layout = {name: (np_dtype, shapes[name]) for name in shard}

        def read_chunks(name: str) -> Iterator[np.ndarray]:
            count = int(np.prod(shapes[name], dtype=np.int64))
            return counted(pool.chunks(name, count, np_dtype), progress)

        save_safetensors_streaming(os.path.join(directory, filename), layout, read_chunks,
                                   metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})

    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    write_json(os.path.join(directory, INDEX_FILE), index)
    write_json(os.path.join(directory, CONFIG_FILE), hf_config_json(config, dtype))


# =============================================================================
# Kaggle layout: torch.save without PyTorch
# =============================================================================

_STORAGE_TYPES = {"bfloat16": "BFloat16Storage", "float32": "FloatStorage"}


def _pickle_int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)                          # BININT
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw                            # LONG1


def _pickle_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw                     # BINUNICODE


def _pickle_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")                 # GLOBAL


def _pickle_tuple(values) -> bytes:
    return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"       # MARK ... TUPLE


def state_dict_pickle(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """Return the `data.pkl` torch.save writes for contiguous tensors, one storage each.

    entries: (tensor name, dtype name, shape); storage i is `data/<i>`. Each
    tensor pickles as
    `_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` with the
    storage as the persistent id `('storage', <type>Storage, '<i>', 'cpu', numel)`.
    """
    ordered_dict = _pickle_global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = bytearray(b"\x80\x02")                                        # PROTO 2
    out += ordered_dict + b"("                                          # dict, MARK
    for key, (name, dtype, shape) in enumerate(entries):
        numel = int(np.prod(shape, dtype=np.int64))
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        storage_id = (b"(" + _pickle_str("storage") + _pickle_global("torch", _STORAGE_TYPES[dtype])
                      + _pickle_str(str(key)) + _pickle_str("cpu") + _pickle_int(numel)
                      + b"tQ")                                          # TUPLE, BINPERSID
        out += _pickle_str(name)
        out += _pickle_global("torch._utils", "_rebuild_tensor_v2")
        out += (b"(" + storage_id + _pickle_int(0) + _pickle_tuple(shape)
                + _pickle_tuple(strides) + b"\x89" + ordered_dict + b"tR")  # NEWFALSE; call
    out += b"u."                                                        # SETITEMS, STOP
    return bytes(out)


class TorchZipWriter:
    """Write zip entries the way torch.save does: stored, data aligned to 64 bytes.

    Python's zipfile writes the archive (zip64 where sizes or offsets need it).
    Each entry's local header gets a padding record in its extra field so that
    its data starts at a multiple of TORCH_ALIGNMENT, which lets a reader
    memory-map every tensor in place.
    """

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.archive = zipfile.ZipFile(self.file, "w", compression=zipfile.ZIP_STORED,
                                       allowZip64=True)

    def write(self, entry: str, chunks: Iterator[np.ndarray | bytes]) -> None:
        info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        # The local header is fixed bytes, the name, our extra field and, because
        # force_zip64 is set, a 20-byte zip64 record zipfile appends.
        header_offset = self.file.tell()
        unpadded = (header_offset + ZIP_LOCAL_HEADER_BYTES + len(entry.encode("utf-8"))
                    + 4 + ZIP64_LOCAL_EXTRA_BYTES)
        padding = -unpadded % TORCH_ALIGNMENT
        info.extra = struct.pack("<HH", PADDING_EXTRA_ID, padding) + b"Z" * padding
        with self.archive.open(info, "w", force_zip64=True) as f:
            if info.header_offset != header_offset:
                raise AssertionError(f"zipfile put entry {entry} at byte {info.header_offset}, "
                                     f"not {header_offset}, so its data is not aligned")
            for chunk in chunks:
                f.write(chunk if isinstance(chunk, bytes) else chunk.reshape(-1))

    def close(self) -> None:
        self.archive.close()
        self.file.close()


def official_entries(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """Official tensor names and shapes in the state dict's module order."""
    # Zero-stride stand-ins let names.hf_to_official work out the official shapes.
    stand_ins = {name: np.broadcast_to(np.zeros((), np.float32), shape)
                 for name, shape in names.expected_shapes(config).items()}
    official = names.hf_to_official(stand_ins)
    ordered = ["embedder.input_embedding"]
    for i in range(config.num_blocks):
        ordered += [f"blocks.{i}.{part}" for part in OFFICIAL_BLOCK_ORDER
                    if f"blocks.{i}.{part}" in official]
    ordered.append("final_norm.scale")
    if sorted(ordered) != sorted(official):
        raise AssertionError("OFFICIAL_BLOCK_ORDER does not list every official tensor")
    return [(name, tuple(official[name].shape)) for name in ordered]


def block_official_tensors(config: Config, index: int, dtype: str,
                           pool: RandomPool) -> dict[str, np.ndarray]:
    """Block `index`'s tensors under official names, with the Hugging Face values."""
    np_dtype = DTYPES[dtype]
    prefix = names.block_prefix(index)
    hf = {name: pool.tensor(name, shape, np_dtype)
          for name, shape in names.expected_shapes(config).items() if name.startswith(prefix)}
    return names.hf_to_official(hf)


def write_kaggle(directory: str, config: Config, dtype: str, pool: RandomPool,
                 torch_file: str, progress: Progress) -> None:
    np_dtype = DTYPES[dtype]
    entries = official_entries(config)
    stem = os.path.splitext(torch_file)[0]
    writer = TorchZipWriter(os.path.join(directory, torch_file))
    try:
        writer.write(f"{stem}/data.pkl", [state_dict_pickle(
            [(name, dtype, shape) for name, shape in entries])])
        writer.write(f"{stem}/.format_version", [b"1"])
        writer.write(f"{stem}/.storage_alignment", [str(TORCH_ALIGNMENT).encode()])
        writer.write(f"{stem}/byteorder", [b"little"])

        block_index, block = -1, {}
        for key, (name, shape) in enumerate(entries):
            entry = f"{stem}/data/{key}"
            if name == "embedder.input_embedding":
                count = int(np.prod(shape, dtype=np.int64))
                chunks = pool.chunks(names.EMBEDDING, count, np_dtype)
            elif name == "final_norm.scale":
                chunks = [pool.tensor(names.FINAL_NORM, shape, np_dtype)]
            else:
                index = int(name.split(".")[1])
                if index != block_index:
                    block_index, block = index, block_official_tensors(config, index, dtype,
                                                                        pool)
                chunks = [np.ascontiguousarray(block.pop(name))]
            writer.write(entry, counted(iter(chunks), progress))
        writer.write(f"{stem}/version", [b"3\n"])
    finally:
        writer.close()


# =============================================================================
# Driver
# =============================================================================

def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def default_directory(root: str, name: str, dtype: str, layout: str) -> str:
    return os.path.join(root, f"{name}-{dtype}-{layout}")


def torch_file_name(name: str) -> str:
    """`2b.pt` for recurrentgemma-2b, as the Kaggle download names it."""
    return name.removeprefix("recurrentgemma-") + ".pt"


@functools.lru_cache(maxsize=1)
def shared_pool(seed: int, std: float) -> RandomPool:
    """Return the pool for (seed, std), built once for consecutive checkpoints."""
    return RandomPool(seed, std)


def write_checkpoint(directory: str, config: Config, layout: str, dtype: str = "bfloat16",
                     seed: int = 0, std: float = DEFAULT_STD, name: str = "recurrentgemma-2b",
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     quiet: bool = False) -> bool:
    """Write a synthetic checkpoint into `directory`; return False if it was already complete.

    A complete directory contains `synthetic.json` with the settings it was
    written with. Requesting other settings for it raises FileExistsError.
    name: the model name recorded in the metadata; it also names the .pt file
      (`2b.pt` for recurrentgemma-2b).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    metadata = {
        "generator": "tools/make_synthetic_checkpoint.py",
        "name": name, "layout": layout, "dtype": dtype, "seed": seed, "std": std,
        "pool_size": POOL_SIZE, "config": config.to_hf_config(),
        "values": "N(0, std) rounded to bfloat16, read cyclically from one random block",
    }
    if layout == "huggingface":
        metadata["max_shard_bytes"] = max_shard_bytes
    directory = os.path.abspath(directory)
    metadata_path = os.path.join(directory, METADATA_FILE)
    if os.path.isfile(metadata_path):
        with open(metadata_path, encoding="utf-8") as f:
            existing = json.load(f)
        if existing != metadata:
            raise FileExistsError(f"{directory} contains a synthetic checkpoint written with "
                                  f"other settings (see its {METADATA_FILE}); delete the "
                                  "directory or pass another output directory")
        return False
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} exists but has no {METADATA_FILE}, so it is not a "
                              "complete synthetic checkpoint; delete it or choose another "
                              "directory")

    partial = directory + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)        # left by an interrupted run of this tool
    os.makedirs(partial)
    pool = shared_pool(seed, std)
    total = DTYPES[dtype].itemsize * sum(
        int(np.prod(s, dtype=np.int64)) for s in names.expected_shapes(config).values())
    progress = Progress(f"writing {directory}", total, quiet)
    if layout == "huggingface":
        write_huggingface(partial, config, dtype, pool, max_shard_bytes, progress)
    else:
        write_kaggle(partial, config, dtype, pool, torch_file_name(name), progress)
    progress.finish()
    shutil.copyfile(TOKENIZER, os.path.join(partial, TOKENIZER_FILE))
    write_json(os.path.join(partial, METADATA_FILE), metadata)
    os.rename(partial, directory)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a synthetic RecurrentGemma checkpoint (real layout, random values).",
        epilog=__doc__.split("Examples:")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESET_NAMES, default="recurrentgemma-2b",
                        help="model shapes to write (default: %(default)s)")
    parser.add_argument("--layout", choices=LAYOUTS + ("both",), default="both",
                        help="checkpoint layout (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="stored dtype of every tensor (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_ROOT,
                        help="parent directory; each checkpoint goes into "
                             "DIR/<preset>-<dtype>-<layout> (default: bench-cache/)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--std", type=float, default=DEFAULT_STD,
                        help="standard deviation of the values (default: %(default)s)")
    parser.add_argument("--shrink", type=int, default=1, metavar="F",
                        help="divide widths and vocabulary by F, for tests (default: 1)")
    parser.add_argument("--num-blocks", type=int, metavar="N",
                        help="keep only the first N residual blocks, for tests")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                        metavar="BYTES", help="largest safetensors shard in bytes "
                                              "(default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = synthetic_config(args.preset, args.shrink, args.num_blocks)
    name = args.preset
    if args.shrink != 1 or args.num_blocks is not None:
        name += f"-shrink{args.shrink}-{config.num_blocks}blocks"
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    for layout in layouts:
        directory = default_directory(args.out, name, args.dtype, layout)
        try:
            written = write_checkpoint(directory, config, layout, args.dtype, args.seed,
                                       args.std, name, args.max_shard_size)
        except FileExistsError as e:
            print(f"make_synthetic_checkpoint: error: {e}", file=sys.stderr)
            return 1
        print(f"{'wrote' if written else 'already complete:'} {directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
