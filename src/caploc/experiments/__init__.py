"""Experiments: what the commands do, each a function over the evaluator and methods that returns a typed
result (`caploc.experiments.results`)."""
