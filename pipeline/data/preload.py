"""Imported by the forkserver that starts DataLoader and ingest workers (last of
:data:`pipeline.data.WORKER_PRELOAD`): botocore's S3 models are parsed there once, and
the S3 client for the environment's keys is built there, unused, so each worker forked from it
starts with its S3 client (:func:`pipeline.storage.preload_s3_models`,
:func:`pipeline.storage.preload_s3_client`).

Last, every object the forkserver holds (torch, botocore, the client: ~230,000) is frozen
(``gc.freeze``): they live as long as it does and are shared with each worker forked from it.
Unfrozen, a worker's first full garbage collection walked them all and so copied ~55 MB of
their pages into the worker: with the S3 client preloaded that came before the first batch,
0.20 s instead of 0.07 for local shards (every epoch: the workers are new), and it is 55 MB of
RSS per worker (``tests/data/test_storage.py``).
"""

import gc

from pipeline import storage

storage.preload_s3_models()
storage.preload_s3_client()
gc.freeze()
