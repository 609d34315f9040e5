"""Data path: ingest (sources -> shards + manifest) and streaming (shards -> batches)."""

# Imported once by the forkserver that starts DataLoader and ingest workers (see
# pipeline.storage.process_context), so a worker starts without re-importing torch, nor s3fs
# and botocore (0.5-2 s per worker on 2 busy cores; the forkserver skips a module it cannot
# import). Importing s3fs starts no thread: its event loop starts at the first request.
WORKER_PRELOAD = ("pipeline.data.stream", "pipeline.data.ingest", "s3fs")
