#!/usr/bin/env bash
# Train zflux's small models on one GPU within one time slot, and put what is to be committed in RESULTS:
#   zimg-embedded.tar, flux-embedded.tar   the snapshot folders, to unpack into zimg/embedded/ and flux/embedded/
#   z-image-grid.png, flux-grid.png        each model's pictures of the showcase captions (for the README)
#   pictures.tar                           every run's loss curve, sample grids and the autoencoder's reconstructions
#
#   scripts/train_small.sh RESULTS [AUTOENCODER_MINUTES Z_IMAGE_MINUTES FLUX_MINUTES]    (defaults 1.5 2.5 2.5)
#
# Runs live in out/train/ (their checkpoints: a second call on the same machine resumes them). With
# AUTOENCODER_MINUTES 0 the autoencoder is not trained: the transformers train further from the snapshots
# already in zimg/embedded/ and flux/embedded/ (on a fresh machine, which has no checkpoint), with new data.
set -euo pipefail
results=${1:?usage: scripts/train_small.sh RESULTS [AUTOENCODER_MINUTES Z_IMAGE_MINUTES FLUX_MINUTES]}
autoencoder=${2:-1.5} zimage=${3:-2.5} flux=${4:-2.5}
runs=out/train
train() { python3 -m zflux.cli train "$@" --out "$runs"; }

if [ "$autoencoder" = 0 ]; then
    train z-image-turbo --minutes "$zimage" --vae zimg/embedded/vae --init zimg/embedded --seed 1
    train flux-dev --minutes "$flux" --vae flux/embedded/vae --init flux/embedded --seed 1
else
    train autoencoder --minutes "$autoencoder"
    train z-image-turbo --minutes "$zimage"
    train flux-dev --minutes "$flux"
fi
mkdir -p "$results"
tar -C "$runs/z-image-turbo/model" -cf "$results/zimg-embedded.tar" .
tar -C "$runs/flux-dev/model" -cf "$results/flux-embedded.tar" .
cp "$runs/z-image-turbo/grid.png" "$results/z-image-grid.png"
cp "$runs/flux-dev/grid.png" "$results/flux-grid.png"
tar -cf "$results/pictures.tar" "$runs"/*/*.png
