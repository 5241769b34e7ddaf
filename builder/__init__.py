"""The image's build-time side: everything the Dockerfile's weights step runs, and nothing else.

``builder.defaults`` names the fork's default model and the offline fallback (the one source of
truth for both; config.py imports it), and ``builder.fetch_model`` bakes a model directory from
the Hub, a local directory or the bundled GGUF. The Dockerfile copies this package, config.py and
errors.py before its weights step, so what lies here is what decides the weights layer.

This package never imports runpod or boto3; torch and transformers only for the GGUF conversion.
"""
