"""Two synthetic genomes where one is the other with a substitution every EVERY bases: where exact-match counts miss
and a homolog read through its substitutions does not. For side-by-side runs of the global memories:

    python bench/homolog_genomes.py --out /tmp/homologs [--bases 20000] [--every 25]
    python bench/time_to_quality.py --name homolog_copy_cpu --steps 150 --concurrent 2 \
        --variant "retrieval:--data_dir=/tmp/homologs --global_memory=retrieval --index_layout=suffix_array ..." \
        --variant "neighbours:--data_dir=/tmp/homologs --global_memory=neighbours --index_layout=suffix_array ..."
Writes OUT/a/a.fa (random bases) and OUT/b/b.fa (a with the substitutions).
"""

import argparse
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--bases", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=25, help="one substitution every this many bases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    a = rng.integers(0, 4, args.bases)
    b = a.copy()
    b[10::args.every] = (b[10::args.every] + 1) % 4
    for name, codes in (("a", a), ("b", b)):
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        with open(os.path.join(args.out, name, f"{name}.fa"), "w") as f:
            f.write(f">{name}1\n{''.join('ACGT'[x] for x in codes)}\n")
    print(f"wrote {args.out}/a/a.fa and {args.out}/b/b.fa: {args.bases:,} bases, b with a substitution every "
          f"{args.every}")


if __name__ == "__main__":
    main()
