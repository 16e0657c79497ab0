"""The small language model on the layer: model, data, config, train, checkpoint, generate, evaluate, experiment,
report."""
