"""Data path: ingest (sources -> shards + manifest) and streaming (shards -> batches)."""

# Imported once by the forkserver that starts DataLoader and ingest workers (see
# pipeline.storage.process_context), so a worker starts without re-importing torch.
WORKER_PRELOAD = ("pipeline.data.stream", "pipeline.data.ingest")
