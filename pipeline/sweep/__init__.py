"""Rate-distortion sweeps: one Ray Tune trial per KL weight (and latent size), each the
training job's DDP run, the held-out curve in MLflow. See :mod:`pipeline.sweep.driver`."""
