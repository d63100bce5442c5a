"""Adapters that run other libraries' models on vdit_kernels' ops.

Each adapter is its own module and imports its library only when used, so
`import vdit_kernels` never needs any of them:
  vdit_kernels.integrations.diffusers   attention processors for diffusers' video
                                        transformers (Wan, HunyuanVideo, CogVideoX), use_vdit_attention
"""
