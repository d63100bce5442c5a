"""Registered torch.library ops (namespace `vdit`), their fake tensors and autograd,
and the public functions that validate arguments and pick a backend."""
