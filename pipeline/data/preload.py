"""Imported by the forkserver that starts DataLoader and ingest workers (last of
:data:`pipeline.data.WORKER_PRELOAD`): botocore's S3 models are parsed there once, and
the S3 client for the environment's keys is built there, unused, so each worker forked from it
starts with its S3 client (:func:`pipeline.storage.preload_s3_models`,
:func:`pipeline.storage.preload_s3_client`)."""

from pipeline import storage

storage.preload_s3_models()
storage.preload_s3_client()
