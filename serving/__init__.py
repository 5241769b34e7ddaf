"""The serving internals: everything between RunPod's job and a task, the same for every model.

A forker changes the files at the top of the repository (``handler.py``, ``model_loader.py``,
``storage.py``, ``tasks/``, ``builder/``, ``Dockerfile``) and rarely anything here. What lives
here, one concern per module:

    worker.py         job -> task -> answer: validation of the envelope, output_mode, batch jobs,
                      the whole-job time limit, delivery, and the error boundary
    engine.py         the decode loop of the generate task (sampling, stop strings, KV cache)
    graphs.py         the same loop with a static KV cache and one compiled, graph-captured
                      step (WORKER_DECODE): the GPU's fast path
    batcher.py        work from concurrent jobs gathered into shared forward passes
    device.py         the one device thread, and what an out-of-memory or device fault means
    config.py         every setting, read from the environment in one typed place
    detect.py         what kind of model a directory holds, read exactly from its config
    errors.py         the error tree, and the one place an exception becomes a job answer
    validation.py     the job envelope and pydantic input helpers tasks use
    delivery.py       inline answers, or links to stored answers and files
    downloads.py      safe downloads of job inputs (http(s), s3), under total deadlines
    s3.py             the S3 client: checked uploads, links and reads, retries, safe errors
    s3wire.py         its connections: the address rule, each operation's time limit, a reply budget
    s3config.py       a job's own s3Config, checked, as the storage for that job
    stored.py         object keys and the link object every storage backend returns
    netguard.py       the address rule every job-directed connection obeys, and a watchdog
    redaction.py      secrets masked in everything the process prints
    openai_compat.py  RunPod's OpenAI-compatible routes, translated onto the task
    launch.py         what the container runs: the worker loop, or pod mode
    sdk.py            the runpod SDK, imported beside the model load (never in test mode)
    intake.py         how the SDK's worker loop takes jobs: each counted once, freed slots refilled

The seam, stated once: modules here import the forker's modules (``model_loader``, ``storage``,
``tasks``) only through ``tasks.TASKS``, the ``tasks.base.Task`` interface, ``model_loader``'s
loading functions and ``storage``'s ``Storage``; the forker's modules import from here only
``config``, ``errors``, ``device``, ``validation``, ``batcher``, ``delivery`` and
``downloads`` (the helpers a task uses). Nothing here imports ``dev/``.
"""
