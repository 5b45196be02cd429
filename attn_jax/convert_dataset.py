"""Converts a tfds dataset prepared as TFRecord into tfds' ArrayRecord format, without TensorFlow.

    python -m attn_jax.convert_dataset --name=cifar10 --data_dir=OLD_DIR --out_dir=NEW_DIR

attn_jax reads datasets by random access (`tfds.data_source`), which needs ArrayRecord files; most
tfds data prepared before is TFRecord, readable only through tf.data. Both formats hold the same
serialized examples, so the conversion copies each record as it is: every `*.tfrecord-*` shard of
`OLD_DIR/NAME/VERSION` becomes the `*.array_record-*` shard of the same name in `NEW_DIR`, the
metadata files are copied and `dataset_info.json` says `"fileFormat": "array_record"`. TFRecord
framing is read here (length, checksums skipped), so neither step imports TensorFlow. Nothing in
OLD_DIR changes; an existing prepared copy in NEW_DIR is never overwritten.
"""

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path


def tfrecord_records(path: Path) -> Iterator[bytes]:
    """The records of one TFRecord file: each is a little-endian uint64 length, its masked CRC32C
    (4 bytes), the data and the data's masked CRC32C (4 bytes)."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            record = f.read(length)
            if len(record) < length or len(f.read(4)) < 4:
                raise ValueError(f"{path}: truncated record")
            yield record


def find_version_dir(data_dir: Path, name: str, version: str | None) -> Path:
    """DATA_DIR/NAME/VERSION (the newest prepared version when `version` is None)."""
    root = data_dir / name
    versions = sorted((p for p in root.glob("*") if (p / "dataset_info.json").exists()),
                      key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    if version is not None:
        versions = [p for p in versions if p.name == version]
    if not versions:
        raise FileNotFoundError(f"no prepared dataset {name!r}{' ' + version if version else ''} "
                                f"in {data_dir}")
    return versions[-1]


def convert(data_dir: Path, name: str, out_dir: Path, version: str | None = None) -> Path:
    """Writes the ArrayRecord copy of DATA_DIR/NAME/VERSION into OUT_DIR/NAME/VERSION; returns it."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source = find_version_dir(Path(data_dir), name, version)
    info = json.loads((source / "dataset_info.json").read_text())
    if info.get("fileFormat", "tfrecord") != "tfrecord":
        raise ValueError(f"{source} is prepared as {info['fileFormat']!r}, not TFRecord")
    target = Path(out_dir) / name / source.name
    if (target / "dataset_info.json").exists():
        raise FileExistsError(f"{target} already holds a prepared dataset: choose another --out_dir")
    target.mkdir(parents=True, exist_ok=True)
    shards = sorted(source.glob("*.tfrecord-*"))
    if not shards:
        raise FileNotFoundError(f"no *.tfrecord-* shards in {source}")
    for shard in shards:
        writer = ArrayRecordWriter(str(target / shard.name.replace(".tfrecord-", ".array_record-")),
                                   "group_size:1")  # one record per chunk: random access, as tfds
        for record in tfrecord_records(shard):
            writer.write(record)
        writer.close()
    for path in source.iterdir():
        if path.is_file() and ".tfrecord-" not in path.name and path.name != "dataset_info.json":
            shutil.copy2(path, target / path.name)
    info["fileFormat"] = "array_record"
    (target / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the tfds dataset name, e.g. cifar10")
    parser.add_argument("--data_dir", required=True, help="the tfds data_dir holding it as TFRecord")
    parser.add_argument("--out_dir", required=True, help="the tfds data_dir to write it into")
    parser.add_argument("--version", default=None, help="e.g. 3.0.2 (default: the newest prepared)")
    args = parser.parse_args(argv)
    try:
        target = convert(Path(args.data_dir), args.name, Path(args.out_dir), args.version)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {target}: use --config.dataset.data_dir={args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
