"""The ELPV solar cells as two folder-layout products, the first user's kind (issue 28).

    python benchmarks/elpv_products.py --out runs/data/elpv

The PyPI package ``elpv-dataset`` (the ``peers`` extra; CC BY-NC-SA 4.0, Deitsch et al.)
holds 2,624 grayscale electroluminescence cells of 300x300, each with the probability an
expert gave it of being defective (0, 1/3, 2/3, 1) and its type (mono, poly). Per type:

    OUT/elpv_mono/good/            probability 0: good parts
    OUT/elpv_mono/defects/defective/   probability 1
    OUT/uncertain/elpv_mono/p033/, p067/   the uncertain ones, apart (scored separately)

and the same for ``elpv_poly``. No masks, image labels only: ``fod train --format folder``
holds a part of ``good/`` out as test normals. The files are links into the installed
package (nothing is copied). Mono makes choices; poly is for the final table only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

UNCERTAIN = {1 / 3: "p033", 2 / 3: "p067"}


def package_labels() -> list[tuple[Path, float, str]]:
    """(image path, defect probability, type) of every cell, from the package's labels."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit(
            "the ELPV images come from the benchmark extra: "
            'pip install -c constraints.txt -e ".[peers]"'
        ) from None
    data = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    for line in (data / "labels.csv").read_text().splitlines():
        if line.strip():
            name, probability, kind = line.split()
            rows.append((data / name, float(probability), kind))
    return rows


def lay_out(out: Path) -> dict:
    """Link every cell into its product's folder; the counts per folder."""
    counts: dict[str, int] = {}
    for path, probability, kind in package_labels():
        product = f"elpv_{kind}"
        if probability == 0:
            folder = out / product / "good"
        elif probability == 1:
            folder = out / product / "defects" / "defective"
        else:
            nearest = min(UNCERTAIN, key=lambda p: abs(p - probability))
            folder = out / "uncertain" / product / UNCERTAIN[nearest]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path.resolve())
        key = str(folder.relative_to(out))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/data/elpv"))
    args = parser.parse_args()
    print(json.dumps({"root": str(args.out), "images": lay_out(args.out)}, indent=2))


if __name__ == "__main__":
    main()
