"""Print what make_world produced: images per country and split, clue coverage, where the files are."""

from __future__ import annotations

import sys
from collections import Counter

from georeasoner.core import storage
from georeasoner.world import facts


def main(world: str) -> None:
    rows = storage.read_parquet(storage.join(world, "manifest.parquet"), columns=["country", "city", "split", "clues"]).to_pylist()
    print(f"\nembedded world: {len(rows)} street views, {len({r['country'] for r in rows})} countries, "
          f"{len({(r['country'], r['city']) for r in rows})} cities")
    per = Counter((r["country"], r["split"]) for r in rows)
    print(f"  {'country':<22}{'train':>6}{'val':>6}{'test':>6}   cities")
    for style in facts.COUNTRIES:
        cities = sorted({r["city"] for r in rows if r["country"] == style.iso2})
        print(f"  {style.iso2} {style.name:<19}{per[(style.iso2, 'train')]:>6}{per[(style.iso2, 'val')]:>6}"
              f"{per[(style.iso2, 'test')]:>6}   {', '.join(cities)}")
    kinds = Counter(c.split("_", 1)[0] for r in rows for c in r["clues"])
    print("  clue coverage (share of images showing it): " + ", ".join(f"{k} {v / len(rows):.0%}" for k, v in kinds.most_common()))
    counts = Counter(len(r["clues"]) for r in rows)
    print("  clues per image: " + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)))
    print(f"  files: {storage.join(world, 'images')}/<country>/<city>/*.jpg, masks in {storage.join(world, 'masks')}, "
          f"{storage.join(world, 'manifest.parquet')}, {storage.join(world, 'clues.jsonl')}")


if __name__ == "__main__":
    main(sys.argv[1])
