"""Turn refer-format datasets into the prepared Arrow format that training and evaluation read.

Usage:

    python scripts/prepare_data.py --root data --out data/prepared
    python scripts/prepare_data.py --root data --out data/prepared \
        --datasets refcoco:unc refcoco+:unc refcocog:umd refcocog:google \
        --image-dir /datasets/coco/train2014

``--root`` holds ``<dataset>/refs(<splitBy>).p`` + ``instances.json`` (refer layout); the images
default to ``<root>/images/mscoco/images/train2014``. Without ``--datasets`` every refs file
under the root is prepared. Prints refs / images / sentences per dataset and split with their
status against the published counts (complete / incomplete), and lists missing or unreadable
images and refs without sentences by id (also in ``<out>/manifest.json``). A split that would
come out empty or lose more than ``--max-dropped`` of its refs stops it with one line (status 1)
before that source is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

DATA_SOURCES = """\
where the data comes from (README.md, section 'Data'):
  annotations  the refer project, https://github.com/lichengunc/refer:
               https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcoco.zip (also refcoco+.zip,
               refcocog.zip); that server has been known to go down: whatever copy you use, this
               script's counts table says whether it is complete
  split files  refcoco: refs(unc).p, refs(google).p; refcoco+: refs(unc).p;
               refcocog: refs(umd).p, refs(google).p
  images       COCO train2014, http://images.cocodataset.org/zips/train2014.zip (82,783 images)
layout:
  <root>/refcoco/{refs(unc).p,refs(google).p,instances.json}
  <root>/refcoco+/{refs(unc).p,instances.json}
  <root>/refcocog/{refs(umd).p,refs(google).p,instances.json}
  <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg
"""


def share(text: str) -> float:
    """A share from 0 to 1 (argparse type)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(text)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__.split("\n\n")[0],
        epilog=DATA_SOURCES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default="data", help="refer data root")
    parser.add_argument("--out", default="data/prepared", help="prepared root (data.prepared)")
    parser.add_argument(
        "--datasets",
        nargs="*",
        default=None,
        metavar="DATASET:SPLITBY",
        help="sources to prepare, e.g. refcoco:unc refcocog:google (default: all found)",
    )
    parser.add_argument("--image-dir", default=None, help="image folder (default: refer layout)")
    parser.add_argument(
        "--check-images",
        default="header",
        metavar="MODE",
        help="header: open each image and compare its size (default); full: decode it; none",
    )
    parser.add_argument(
        "--max-dropped",
        type=share,
        default=0.01,
        metavar="SHARE",
        help="share (0 to 1) of a split's refs that may be left out, e.g. for missing images, "
        "before it stops without writing that source (default: 0.01; 1 writes whatever is left)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    from prompt_ris.data.prepare import CHECK_IMAGES  # after parsing: --help stays instant

    if args.check_images not in CHECK_IMAGES:
        parser.error(
            f"argument --check-images: invalid choice: '{args.check_images}' "
            f"(choose from {', '.join(CHECK_IMAGES)})"
        )
    return args


def main(argv: list[str] | None = None) -> list[Any]:
    """Prepare the sources; a missing or unsafe refs file ends it with one line (status 1)."""
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from prompt_ris.data.prepare import IncompleteSourceError, format_counts_table, prepare_refer
    from prompt_ris.data.refer import UnsafeRefsError
    from prompt_ris.data.splits import PUBLISHED_COUNTS

    sources = None
    if args.datasets:
        sources = []
        for item in args.datasets:
            if item.count(":") != 1:
                raise SystemExit(f"--datasets entry '{item}' must look like refcoco:unc")
            dataset, split_by = item.split(":")
            sources.append((dataset, split_by))
    try:
        reports = prepare_refer(
            args.root,
            args.out,
            sources,
            image_dir=args.image_dir,
            check_images=args.check_images,
            max_dropped=args.max_dropped,
        )
    except (FileNotFoundError, UnsafeRefsError, IncompleteSourceError) as err:
        if args.verbose:
            raise
        sys.stderr.write(f"prepare_data.py: error: {' '.join(str(err).split())}\n")
        raise SystemExit(1) from None
    print(format_counts_table(reports, PUBLISHED_COUNTS))
    print(f"prepared data written to {args.out}")
    return reports


if __name__ == "__main__":
    main()
