"""What consumes a trained model: the registry, galleries, bulk sampling, pyfunc serving,
held-out evaluation. None of it imports the train loop: a model is rebuilt from the config
stored beside its weights."""
