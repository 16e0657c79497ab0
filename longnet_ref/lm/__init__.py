"""The small language model built on the layer: model, data, train, checkpoint, generate, evaluate, experiment."""
