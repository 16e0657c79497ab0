"""The small language model on the layer: model, data, train, checkpoint, generate, evaluate, experiment, report."""
