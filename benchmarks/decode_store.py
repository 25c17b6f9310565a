"""Decode share of a study: every run decoding its own images in RAM versus one shared decoded store.

Before the shared store, every run decoded its train and val images, and every evaluation (one per
run and test domain) decoded its test images again. Now a study decodes each image once into a
memory-mapped store (``histotoken.data.store``) and every run and evaluation selects its rows.

1. The demo study (``configs/demo.yaml`` on the synthetic set that ``histotoken demo`` makes): counts
   the decodes each scheme does, times them (the old scheme by decoding each run's images in RAM as
   ``ImageStore.build`` used to; the new one by building the shared store cold, then opening it for
   every run and evaluation), and, given the demo's wall time (``--demo-seconds``, e.g. from
   ``time histotoken demo``), prints the decode share of the study before and after.
2. A 224 px study over the magnification spec's image count (``configs/magnification_study.yaml``;
   real BreakHis counts per magnification): an estimate from decoding a measured sample of synthetic
   700x460 PNGs at 224 px (serially and with ``--workers`` processes).

    python benchmarks/decode_store.py                                  # demo-sized, a few minutes on 2 cores
    python benchmarks/decode_store.py --tiny                           # seconds: a check that it runs
    python benchmarks/decode_store.py --demo-seconds 780 --sample 64 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from histotoken.data.breakhis import MAGNIFICATIONS
from histotoken.data.dataset import ImageStore, load_image
from histotoken.data.domains import select_domain
from histotoken.data.index import load_index
from histotoken.data.splits import make_split
from histotoken.experiments.spec import expand, spec_from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "histotoken" / "configs"
# Official BreakHis image counts per magnification (Spanhol et al., 2016).
BREAKHIS_COUNTS = {40: 1995, 100: 2081, 200: 2013, 400: 1820}


@dataclasses.dataclass
class Selection:
    """One decode the old scheme did: a run's train+val images, or one evaluation's test images."""

    what: str
    frame: pd.DataFrame


def study_selections(spec, index: pd.DataFrame) -> tuple[list[Selection], dict[str, pd.DataFrame]]:
    """Every run's train+val selection and every (run, test domain) test selection; splits per seed/fold."""
    splits: dict[str, pd.DataFrame] = {}
    base = spec.base_config()
    selections = []
    for run in expand(spec):
        if run.split_name not in splits:
            splits[run.split_name] = make_split(
                index, base.split_scheme, base.val_fraction, base.test_fraction, spec.folds, run.fold or 0, run.seed
            )
        split = splits[run.split_name]
        train_val = select_domain(split[split["split"].isin(["train", "val"])], run.train_domain)
        selections.append(Selection(f"{run.run_id} train+val", train_val))
        for domain in spec.test_domains:
            test = select_domain(split[split["split"] == "test"], domain)
            selections.append(Selection(f"{run.run_id} test {domain}", test))
    return selections, splits


def time_old_scheme(selections: list[Selection], img_size: int) -> tuple[float, int]:
    """Decode every selection in RAM, as each run and evaluation used to."""
    decodes = 0
    start = time.perf_counter()
    for selection in selections:
        for path in selection.frame["path"]:
            load_image(path, img_size)
            decodes += 1
    return time.perf_counter() - start, decodes


def time_new_scheme(
    selections: list[Selection], splits: dict[str, pd.DataFrame], img_size: int, workers: int, cache: Path
) -> tuple[float, float, int]:
    """Build the shared store cold (once per split's image list), then open it for every selection."""
    start = time.perf_counter()
    for split in splits.values():
        ImageStore.build(split, img_size, universe=split, workers=workers, cache_dir=cache)
    build = time.perf_counter() - start
    universe = next(iter(splits.values()))  # every split of a study holds the same images
    start = time.perf_counter()
    for selection in selections:
        ImageStore.build(selection.frame, img_size, universe=universe, cache_dir=cache)
    opens = time.perf_counter() - start
    return build, opens, len(universe)


def demo_spec(tiny: bool) -> tuple[dict, dict]:
    import yaml

    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    synthetic = dict(raw.pop("synthetic"))
    if tiny:
        synthetic.update(patients_per_class=3, images_per_patient=1, size=[64, 48])
        raw["models"] = raw["models"][:2]
    return raw, synthetic


def measure_demo(args, work: Path) -> dict[str, float]:
    from histotoken.data.synthetic import generate_synthetic_breakhis

    raw, synthetic = demo_spec(args.tiny)
    data = Path(args.data) if args.data else work / "synthetic_breakhis"
    if not args.data:
        print(f"making the demo's synthetic set in {data} ...", flush=True)
        generate_synthetic_breakhis(
            data, synthetic["patients_per_class"], synthetic["images_per_patient"],
            tuple(synthetic["magnifications"]), tuple(synthetic["size"]), synthetic["seed"],
        )
    spec = spec_from_dict(raw, "demo.yaml", str(data))
    index = load_index(data).frame
    img_size = spec.base_config().img_size
    selections, splits = study_selections(spec, index)
    old_seconds, old_decodes = time_old_scheme(selections, img_size)
    build, opens, stored = time_new_scheme(selections, splits, img_size, args.workers, work / "stores")
    print(f"\n== demo study ({len(expand(spec))} runs, {len(selections)} decode selections, {img_size} px, "
          f"{len(index)} images)")
    print(f"before: each run and evaluation decodes in RAM: {old_decodes} decodes, {old_seconds:.1f} s")
    print(f"after:  one shared store: {stored} decodes, {build:.1f} s to build (workers={args.workers}), "
          f"{opens:.2f} s to open it {len(selections)} times")
    if args.demo_seconds:
        after_total = args.demo_seconds - old_seconds + build + opens
        print(f"decode share of the demo's {args.demo_seconds:.0f} s: before {old_seconds / args.demo_seconds:.1%}, "
              f"after {(build + opens) / after_total:.1%} of {after_total:.0f} s")
    else:
        print("decode share: pass --demo-seconds (the demo's measured wall time) to print it")
    return {"old_seconds": old_seconds, "old_decodes": old_decodes, "build_seconds": build}


def estimate_224(args, work: Path) -> None:
    """Per-image decode+resize cost at 224 px from a sample of 700x460 PNGs, scaled to the magnification study."""
    import yaml

    from histotoken.data.synthetic import generate_synthetic_breakhis

    raw = yaml.safe_load((CONFIGS / "magnification_study.yaml").read_text())
    size = (160, 104) if args.tiny else (700, 460)
    per_patient = max(1, args.sample // (8 * 3 * len(MAGNIFICATIONS)))
    sample_root = work / "sample_700x460"
    generate_synthetic_breakhis(sample_root, 3, per_patient, MAGNIFICATIONS, size, seed=1)
    sample = load_index(sample_root).frame.head(args.sample)
    start = time.perf_counter()
    for path in sample["path"]:
        load_image(path, 224)
    serial = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    ImageStore.build(sample, 224, workers=args.workers, cache_dir=work / "sample_stores")
    parallel = (time.perf_counter() - start) / len(sample)

    # Image counts of the magnification study on real BreakHis: runs x their train+val share of the train
    # domain, plus runs x test domains x the test share; the store decodes all images once.
    test = raw["split"]["test"]

    def count(domain: str) -> int:
        return sum(BREAKHIS_COUNTS[int(m)] for m in domain.split("+"))
    runs_per_domain = len(raw["models"]) * len(raw["seeds"])
    before = sum(
        runs_per_domain * (count(str(d)) * (1 - test) + sum(count(str(t)) * test for t in raw["test_domains"]))
        for d in raw["train_domains"]
    )
    after = sum(BREAKHIS_COUNTS.values())
    print(f"\n== 224 px estimate for {raw['name']} ({len(raw['train_domains']) * runs_per_domain} runs, "
          f"{len(raw['test_domains'])} test domains, real BreakHis counts)")
    print(f"measured on {len(sample)} synthetic {size[0]}x{size[1]} PNGs: {serial * 1e3:.1f} ms/image serially, "
          f"{parallel * 1e3:.1f} ms/image building a store with workers={args.workers}")
    print(f"before: about {before:,.0f} decodes, about {before * serial / 60:.1f} min of decoding")
    print(f"after:  {after:,} decodes once, about {after * parallel / 60:.1f} min "
          f"(store about {after * 3 * 224 * 224 / 1e9:.1f} GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="an existing demo synthetic set (default: make one in a temporary folder)")
    parser.add_argument("--demo-seconds", type=float, help="the demo study's measured wall time, for the decode share")
    parser.add_argument("--sample", type=int, default=64, help="700x460 images decoded for the 224 px estimate")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes for the shared store")
    parser.add_argument("--tiny", action="store_true", help="a tiny setting that only checks the script runs")
    args = parser.parse_args()
    if args.tiny:
        args.sample = min(args.sample, 8)
    with tempfile.TemporaryDirectory(prefix="decode-store-") as tmp:
        work = Path(tmp)
        os.environ["HISTOTOKEN_CACHE"] = str(work / "cache")  # index caches of throwaway folders stay here
        measure_demo(args, work)
        estimate_224(args, work)


if __name__ == "__main__":
    main()
