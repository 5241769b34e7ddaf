"""The image's build-time side: everything the Dockerfile's weights step runs, and nothing else.

``builder.defaults`` names the fork's default model and the offline fallback (the one source of
truth for both), ``builder.settings`` declares the settings the builder reads (and the helper
every setting is declared with; serving/config.py builds on both), and ``builder.fetch_model``
bakes a model directory from the Hub, a local directory or the bundled GGUF. The Dockerfile
copies only this package before its weights step, so what lies here is what decides the weights
layer, and editing the worker's settings never rebuilds it.

This package never imports ``serving``, runpod or boto3; torch and transformers only for the
GGUF conversion.
"""
