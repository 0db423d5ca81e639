"""The paper's experiments, reproduced on real MNIST (run as scripts)."""
