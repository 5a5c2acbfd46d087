"""
fashion_mnist.py: Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`: the four idx
files, gzipped, in /usr/share/datasets/fashion-mnist) unpacked into torchvision's layout, where
wfnet.py reads it (--data-dir, default data/):

    python data/fashion_mnist.py                    # -> data/FashionMNIST/raw/*-ubyte
    python data/fashion_mnist.py --root DIR --debian /usr/share/datasets/fashion-mnist

Elsewhere, torchvision downloads the same files on first use instead.
"""
import argparse, gzip, os, sys
from pathlib import Path

DEBIAN = "/usr/share/datasets/fashion-mnist"


def unpack(root=Path(__file__).resolve().parent, debian=DEBIAN):
    """Every *-ubyte.gz of `debian` unpacked once into <root>/FashionMNIST/raw; returns the files."""
    files = sorted(Path(debian).glob("*-ubyte.gz"))
    if not files:
        raise FileNotFoundError(f"no *-ubyte.gz in {debian}: apt-get install dataset-fashion-mnist")
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in files:
        if not (raw / gz.stem).exists():
            tmp = raw / f"{gz.stem}.{os.getpid()}.tmp"   # written whole, then renamed
            tmp.write_bytes(gzip.decompress(gz.read_bytes()))
            tmp.replace(raw / gz.stem)
    return [raw / gz.stem for gz in files]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="unpack Debian's Fashion-MNIST for wfnet.py")
    p.add_argument("--root", default=Path(__file__).resolve().parent, help="the data folder (default: data/)")
    p.add_argument("--debian", default=DEBIAN, help="where the gzipped idx files are")
    args = p.parse_args()
    try:
        print("\n".join(map(str, unpack(args.root, args.debian))))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
