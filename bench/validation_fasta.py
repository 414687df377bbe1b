"""Write one species' validation chunks (the default Config's split) as FASTA: sequence in no training chunk and no
index, for `plant_lm_infer.py eval` with models trained with that species and without it (bench/held_out_genome.sh).

    python bench/validation_fasta.py SPECIES OUT.fa [--checkpoint_dir DIR (its data cache)]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("species")
    parser.add_argument("out")
    parser.add_argument("--checkpoint_dir", default="/tmp/validation_fasta")
    args = parser.parse_args()
    cfg = plm.Config(checkpoint_dir=args.checkpoint_dir)
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    chunks = [c for c in catalog.val_chunks if c.key[0] == args.species]
    if not chunks:
        raise SystemExit(f"error: no validation chunk of {args.species!r}; species: {', '.join(catalog.species)}")
    with open(args.out, "w") as f:
        for chunk in plm.tokenized_chunks(catalog, cfg, chunks):
            codes = plm.token_bases(chunk.tokens)
            sequence = "".join("ACGT"[c] for c in codes)
            f.write(f">{args.species}_record{chunk.key[2]}_{plm.chunk_start(chunk.key, cfg)}\n")
            f.writelines(sequence[i:i + 80] + "\n" for i in range(0, len(sequence), 80))
            print(f"{chunk.key[1]} record {chunk.key[2]} from base {plm.chunk_start(chunk.key, cfg):,}: "
                  f"{len(sequence):,} bases")


if __name__ == "__main__":
    main()
