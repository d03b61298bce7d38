"""DomainNet (Peng et al. 2019), the subset TLlib reports: four domains (clipart, painting, real, sketch), 345
classes, the 12 single-source tasks between them, TLlib's protocol on a ResNet-50. (Infograph and quickdraw are
left out, as in TLlib's single-source table.)

One run (``task`` one of c2p c2r c2s p2c p2r p2s r2c r2p r2s s2c s2p s2r; ``method`` one of source_only dann cdan
mcc mdd mmd coral self_training; ``weights`` a converted ImageNet ResNet-50)::

    tl-jax train --workdir runs/domainnet/c2p_mdd \\
        --config experiments/benchmarks/domainnet.py:task=c2p,method=mdd,weights=pretrained/r50,data_dir=data

Data (docs/benchmarks.md): each domain's zip unpacked as ``domainnet/<domain>/<class>/*.jpg`` beside the
official ``domainnet/<domain>_train.txt`` / ``<domain>_test.txt`` lists. :func:`split_by_lists` links each
domain into ``OUT/<domain>/{train,test}/<class>/`` by those lists (the official split, which TLlib trains and
tests on), then each is prepared once at 256x256::

    python experiments/benchmarks/domainnet.py --root domainnet --out domainnet_split
    for d in clipart painting real sketch; do
      tl-jax data prepare --image-folder domainnet_split/$d --name domainnet_$d --data-dir data --image-size 256 256
    done

Recipe: TLlib's (``da_protocol.py``), 30 epochs x 2,500 iterations = 75,000 steps (``dann.sh``); per method
(``SUITE.overrides``): ``erm.sh`` 20 x 2,500, ``mcc.sh`` temperature 2, trade-off 10, batch 32, ``mdd.sh`` 40 x 5,000,
``cdan.sh`` the randomized map of 51,200 dimensions. The source trains on its ``train`` list; the target's
``train`` list is the unlabelled pool and ``test/accuracy`` scores its ``test`` list. These are the protocol's
published hyperparameters; any tuning is on a validation split, never on test: ``tune=1`` reads the target
as ``domainnet_<domain>_tune``, its train list prepared on its own (split 80/20, stratified, by ``tl-jax data
prepare``), so a tuning run sees no test-list image::

    tl-jax data prepare --image-folder domainnet_split/sketch/train --name domainnet_sketch_tune --data-dir data \
        --image-size 256 256

Published (TLlib's README; ``da_protocol.TLLIB``): on a ResNet-101, which tl_jax has no model or converter for,
so they are a reference for the ResNet-50 runs here, not a like-for-like target; e.g. DANN average 47.2, MDD 51.8.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from tl_jax.sweep.study import sibling_module

DOMAINS = {"c": "clipart", "p": "painting", "r": "real", "s": "sketch"}


def _protocol():
    """``da_protocol.py`` beside this file (config files are loaded by path, not as a package)."""
    return sibling_module(__file__, "da_protocol.py")


TASKS = ("c2p", "c2r", "c2s", "p2c", "p2r", "p2s", "r2c", "r2p", "r2s", "s2c", "s2p", "s2r")
_COLUMNS = TASKS + ("avg",)  # TLlib's column order: the tasks as above, then Avg
_ROWS = {  # tl_jax method: TLlib's row (its name in da_protocol.METHODS), ResNet-101, read from TLlib's README
    "source_only": (32.7, 50.6, 39.4, 41.1, 56.8, 35.0, 48.6, 48.8, 36.1, 49.0, 34.8, 46.1, 43.3),
    "dann": (37.9, 54.3, 44.4, 41.7, 55.6, 36.8, 50.7, 50.8, 40.1, 55.0, 45.0, 54.5, 47.2),
    "cdan": (40.4, 56.8, 46.1, 45.1, 58.4, 40.5, 55.6, 53.6, 43.0, 57.2, 46.4, 55.7, 49.9),
    "mcc": (37.7, 55.7, 42.6, 45.4, 59.8, 39.9, 54.4, 53.1, 37.0, 58.1, 46.3, 56.2, 48.9),
    "mdd": (42.9, 59.5, 47.5, 48.6, 59.4, 42.6, 58.3, 53.7, 46.2, 58.7, 46.5, 57.7, 51.8),
    "mmd": (38.8, 55.2, 43.9, 45.9, 59.0, 40.8, 50.8, 49.8, 38.9, 56.1, 45.9, 55.5, 48.4),
}
PUBLISHED = {m: dict(zip(_COLUMNS, row)) for m, row in _ROWS.items()}
SUITE = _protocol().Suite(
    name="domainnet", title="DomainNet", domains=DOMAINS, num_classes=345, tasks=TASKS, steps=75_000,
    published=PUBLISHED, published_backbone="ResNet-101", source_split="train", target_split="train",
    test_split="test",
    overrides={"source_only": {"steps": 50_000}, "mcc": {"temperature": 2.0, "weight": 10.0, "batch": 32},
               "mdd": {"steps": 200_000}, "cdan": {"randomized_dim": 51_200}})


def get_config(arg: str | None = None):
    return _protocol().build(SUITE, arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    return _protocol().sweep(SUITE, arg)


def split_by_lists(root: str | pathlib.Path, domain: str, out: str | pathlib.Path) -> dict[str, int]:
    """Links ``root/<domain>/<class>/<file>`` into ``out/<domain>/<split>/<class>/<file>`` for every line
    ``<domain>/<class>/<file> <label>`` of the official ``root/<domain>_<split>.txt`` (split train, test); returns
    ``{split: images}``. A listed file that is missing is an error naming it and its list."""
    root, out = pathlib.Path(root).resolve(), pathlib.Path(out)
    counts = {}
    for split in ("train", "test"):
        listing = root / f"{domain}_{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing}: DomainNet's official {split} list of {domain} is missing")
        lines = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        for rel in lines:
            src = root / rel
            if not src.is_file():
                raise FileNotFoundError(f"{src} (listed in {listing}) does not exist")
            _, cls, name = pathlib.PurePosixPath(rel).parts
            dst = out / domain / split / cls / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)
        counts[split] = len(lines)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="link DomainNet's domains into train/test folders by the official lists")
    p.add_argument("--root", required=True, help="folder with <domain>/<class>/*.jpg and <domain>_{train,test}.txt")
    p.add_argument("--out", required=True, help="where OUT/<domain>/{train,test}/<class>/ go")
    p.add_argument("--domains", default=";".join(DOMAINS.values()))
    args = p.parse_args(argv)
    for domain in args.domains.split(";"):
        print(domain, split_by_lists(args.root, domain, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
