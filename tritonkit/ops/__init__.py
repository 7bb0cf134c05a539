"""``torch.ops.tritonkit.*``: the custom ops that wrap tritonkit's kernels, each with a fake impl."""
