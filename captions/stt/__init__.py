"""Speech to text with Kyutai STT: one batched model serves every stream (engine.py).

Callers that only need the engine's interface (events, streams, the audio format) import `api`,
which does not import torch.
"""
