"""Download named prompt corpora (sha256-checked) into data/prompt_corpora or --dest.

    python scripts/download_corpora.py mg15 df415 --dest data/prompt_corpora
    python scripts/download_corpora.py --list
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from amortized3d.corpora import CorpusError, default_download_dir, download_corpus, load_manifest


def main(argv: list[str] | None = None) -> int:
    manifest = load_manifest()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch: {', '.join(manifest)}")
    parser.add_argument("--dest", default=None, help=f"target directory (default: {default_download_dir()})")
    parser.add_argument("--force", action="store_true", help="download even if a verified copy exists")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    parser.add_argument("--list", action="store_true", help="list the known corpora and exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for spec in manifest.values():
            where = spec.url or ("shipped with the repository" if spec.shipped
                                 else f"not downloadable: {spec.notes}")
            print(f"{spec.name:12s} {spec.file:40s} {where}")
        if not args.list:
            parser.print_usage(sys.stderr)
        return 0 if args.list else 2
    failed = 0
    for name in args.names:
        try:
            path = download_corpus(name, args.dest, force=args.force, timeout=args.timeout)
            print(f"{name}: {path}")
        except CorpusError as e:
            print(f"{name}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
