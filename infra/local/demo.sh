#!/usr/bin/env bash
# `make demo`: the whole product on one machine, from the local stack to a gallery.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - start ))"; }

step "local stack: SeaweedFS S3, MLflow, Ray head, Prometheus (127.0.0.1 only)"
$BIN/pipeline stack up
$BIN/pipeline stack status
step "validate the job yamls"
$BIN/pipeline validate jobs/ingest.yaml jobs/train.yaml jobs/sample.yaml
step "ingest Fashion-MNIST into WebDataset shards on s3://data/fashion-mnist"
$BIN/pipeline ingest jobs/ingest.yaml
step "train: Ray Train, 2 DDP workers, checkpoints on s3://checkpoints/ray"
$BIN/pipeline train jobs/train.yaml
step "sample galleries from the registered model"
$BIN/pipeline sample jobs/sample.yaml
step "done in $(( $(date +%s) - start ))s"
cat <<MSG
MLflow UI:      http://127.0.0.1:5000/#/experiments?workflowType=machine_learning
                (experiments vae-fashion-mnist, vae-galleries; model vae-fashion-mnist@candidate)
Ray dashboard:  http://127.0.0.1:8265
Prometheus:     http://127.0.0.1:9090   (query: vae_train_images_per_second)
Gallery:        s3://data/galleries/vae-fashion-mnist/  (also in MLflow, experiment vae-galleries)
Stop the stack: make down
MSG
