"""Imported by the forkserver that starts DataLoader and ingest workers (last of
:data:`pipeline.data.WORKER_PRELOAD`): botocore's S3 models are parsed there once, so each
worker forked from it starts its S3 client without parsing them again
(:func:`pipeline.storage.preload_s3_models`)."""

from pipeline import storage

storage.preload_s3_models()
