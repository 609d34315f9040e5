"""Data path: ingest (sources -> shards + manifest) and streaming (shards -> batches)."""

# Imported once by the forkserver that starts DataLoader and ingest workers (see
# pipeline.storage.process_context), so a worker starts without re-importing torch, nor s3fs
# and botocore (0.5-2 s per worker on 2 busy cores; the forkserver skips a module it cannot
# import). Importing s3fs starts no thread: its event loop starts at the first request.
# pipeline.data.preload parses botocore's S3 models there too, once for every worker.
WORKER_PRELOAD = ("pipeline.data.stream", "pipeline.data.ingest", "s3fs", "pipeline.data.preload")
